"""The analysis kept beside an export: read back only when it is that export's and whole, saved only
where the export folder can be written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from vggt.analysis import AnalysisError, run_analysis
from vggt.analysis.store import analysis_for, format_value, load_analysis, query_metrics
from vggt.analysis.table import layer_head_table
from vggt.attn_format import open_export
from vggt.testing.synthetic import write_synthetic_export


@pytest.fixture()
def export_root(tmp_path: Path) -> Path:
    return write_synthetic_export(tmp_path / "export", num_layers=2, per_head=True, rollout=True)


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(y[key]), key
            elif isinstance(value, float):
                assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
            else:
                assert y[key] == value, key


def test_computed_once_then_read_back(export_root: Path) -> None:
    export = open_export(export_root)
    seen = []
    first, origin = analysis_for(export, progress=lambda *a: seen.append(a))
    assert origin == "saved" and seen and (export_root / "analysis" / "per_query.npz").is_file()
    assert not (export_root / "analysis" / "figures").exists()
    again, origin = analysis_for(open_export(export_root))
    assert origin == "loaded"
    _same(first.records, again.records)  # the table is rebuilt from the saved per-query arrays


def test_not_this_exports_or_damaged_is_recomputed(export_root: Path, tmp_path: Path) -> None:
    analysis_for(open_export(export_root))
    folder = export_root / "analysis"
    # Another export's analysis (copied over) is not taken for this one's.
    other = write_synthetic_export(tmp_path / "other", num_layers=3, per_head=True)
    assert load_analysis(folder, open_export(other)) is None
    with np.load(folder / "per_query.npz") as npz:
        arrays = dict(npz)
    cases = {
        "wrong shape": arrays | {"entropy": arrays["entropy"][:, :3]},
        "unknown layer": arrays | {"layer": np.array(["evil"] * arrays["layer"].size)},
        "no masses": {k: v for k, v in arrays.items() if k != "masses"},
        "strings as numbers": arrays | {"entropy": arrays["entropy"].astype(str)},
    }
    export = open_export(export_root)
    for name, damaged in cases.items():
        np.savez(folder / "per_query.npz", **damaged)
        assert load_analysis(folder, export) is None, name
    (folder / "summary.json").write_text("{not json")
    assert load_analysis(folder, export) is None
    np.savez(folder / "per_query.npz", objects=np.array([{"a": 1}], dtype=object))
    (folder / "summary.json").write_text(json.dumps(run_analysis(export).summary))
    assert load_analysis(folder, export) is None  # object arrays are never unpickled
    _, origin = analysis_for(export)
    assert origin == "saved"


def test_folder_that_cannot_be_written_is_left_alone(export_root: Path) -> None:
    (export_root / "analysis").write_text("a file where the analysis folder would go")
    _, origin = analysis_for(open_export(export_root))
    assert origin == "computed"
    assert (export_root / "analysis").read_text().startswith("a file")


def test_zipped_export_is_computed_not_saved(export_root: Path, tmp_path: Path) -> None:
    archive = shutil.make_archive(str(tmp_path / "shared"), "zip", export_root.parent, export_root.name)
    with open_export(archive) as export:
        _, origin = analysis_for(export)
    assert origin == "computed"


def test_query_metrics_and_table(export_root: Path) -> None:
    result, _ = analysis_for(open_export(export_root))
    metrics = query_metrics(result, "layer_02", "3", 7)
    index = [i for i, r in enumerate(result.records) if (r["layer"], r["head"]) == ("layer_02", "3")][0]
    assert metrics["entropy"] == result.per_query["entropy"][index, 7]
    assert math.isnan(metrics["pck_0"]) and format_value(metrics["pck_0"]) == "–"
    assert format_value(0.12345) == "0.123"
    with pytest.raises(AnalysisError, match="no row"):
        query_metrics(result, "rollout", "3", 0)
    with pytest.raises(AnalysisError, match="out of range"):
        query_metrics(result, "layer_02", "avg", 20)
    values, layers, heads = layer_head_table(result.records, "entropy")
    assert layers == ["layer_01", "layer_02", "rollout"] and heads == ["avg", "1", "2", "3", "4"]
    assert np.isnan(values[2, 1:]).all() and np.isfinite(values[:2]).all()
