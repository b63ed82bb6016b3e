"""analyze_attention.py end to end: the files it writes, what they hold, and every bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vggt.analysis import COLUMNS, run_analysis
from vggt.analysis.cli import main
from vggt.testing.synthetic import write_synthetic_export

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analysis") / "export"
    return write_synthetic_export(root, num_layers=3, per_head=True, kinds=("global", "frame"), rollout=True)


def test_command_writes_table_arrays_summary_and_figures(export_root: Path, capsys) -> None:
    assert main(["--attn_dir", str(export_root)]) == 0
    out = export_root / "analysis"
    with open(out / "layer_head_metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = run_analysis(export_root).records
    assert list(rows[0]) == list(COLUMNS) and len(rows) == len(expected)
    for row, record in zip(rows, expected, strict=True):
        assert (row["layer"], row["head"]) == (record["layer"], record["head"])
        for name in ("cross_view_mass", "entropy", "cells_90", "mask_recall", "pck_1"):
            value = record[name]
            assert (
                (row[name] == "") if math.isnan(value) else float(row[name]) == pytest.approx(value, rel=1e-5)
            )
    with np.load(out / "per_query.npz", allow_pickle=False) as arrays:
        assert arrays["layer"].tolist() == [r["layer"] for r in expected]
        assert arrays["entropy"].shape == (len(expected), 20)
        assert arrays["pck_0_per_frame"].shape == (len(expected), 3, 20)
        assert arrays["mask_recall_per_mass"].shape == (len(expected), 3, 20)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["columns"] == COLUMNS and summary["options"]["reference_layer"] == "global_02"
    assert summary["correspondence"] == {"source": None, "pairs": 0}
    assert set(summary["baselines"]) == {"same_uv", "uniform", "uniform_within_frame"}
    for stem in ("heatmap_entropy", "heatmap_mask_recall", "curves", "stability_bars"):
        for suffix in ("png", "svg"):
            assert (out / "figures" / f"{stem}.{suffix}").stat().st_size > 1000
    assert "figures/curves.svg" in summary["files"]
    assert "wrote" in capsys.readouterr().out


def test_a_redrawn_heatmap_shows_only_the_new_table() -> None:
    """The metrics' heatmaps share one figure, redrawn per metric: values, written cells and title are the
    new table's, none of the previous one's left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vggt.analysis.figures import draw_heatmap, redraw_heatmap

    first = np.array([[0.1, 0.2, np.nan], [0.3, 0.4, 0.5]])
    second = np.array([[0.9, np.nan, 0.7], [0.6, 0.5, 0.4]])
    fig, ax = plt.subplots()
    image = draw_heatmap(ax, first, ["a", "b"], ["avg", "1", "2"], "first", 0.0, 1.0)
    assert sorted(t.get_text() for t in ax.texts) == ["0.10", "0.20", "0.30", "0.40", "0.50"]
    redraw_heatmap(image, second, "second")
    assert ax.get_title() == "second"
    assert sorted(t.get_text() for t in ax.texts) == ["0.40", "0.50", "0.60", "0.70", "0.90"]
    np.testing.assert_array_equal(np.ma.filled(image.get_array(), -1.0), np.nan_to_num(second, nan=-1.0))
    plt.close(fig)


def test_figures_drawn_side_by_side_are_the_figures_drawn_here(export_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    from vggt.analysis.figures import write_figures

    result = run_analysis(export_root)
    here = write_figures(result, tmp_path / "here")
    side_by_side = write_figures(result, tmp_path / "side_by_side", workers=2)
    assert [p.name for p in side_by_side] == [p.name for p in here]
    assert {p.stem for p in here} >= {"curves", "stability_bars", "heatmap_entropy", "heatmap_mask_recall"}
    for path in side_by_side:
        if path.suffix == ".png":
            with Image.open(path) as image, Image.open(tmp_path / "here" / path.name) as expected:
                assert image.size == expected.size


def test_options_reach_the_analysis(export_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    args = ["--attn_dir", str(export_root / "attn_maps" / "layers_manifest.json"), "--out", str(out)]
    args += ["--reference_layer", "0", "--masses", "0.4,0.6", "--radius", "2", "--stability_scope", "all"]
    assert main([*args, "--no_figures", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"] == {
        "reference_layer": "global_01",
        "masses": [0.4, 0.6],
        "radius": 2,
        "stability_scope": "all",
        "pck_radii": [0, 1, 2],
    }
    assert not (out / "figures").exists()
    with np.load(out / "per_query.npz") as arrays:
        assert np.isfinite(arrays["mask_recall_overall"][0]).all()


def test_zipped_export_writes_beside_the_zip(export_root: Path, tmp_path: Path) -> None:
    archive = Path(shutil.make_archive(str(tmp_path / "shared"), "zip", export_root.parent, export_root.name))
    assert main(["--attn_dir", str(archive), "--no_figures", "--quiet"]) == 0
    assert (tmp_path / "shared_analysis" / "layer_head_metrics.csv").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--masses", "0.3,1.5"], "mass shares must lie in (0, 1)"),
        (["--masses", "0.3,x"], "--masses must be numbers"),
        (["--masses", "0"], "mass shares must lie in (0, 1)"),
        (["--reference_layer", "7"], "no global layer 7"),
        (["--reference_layer", "layer_99"], "no layer 'layer_99'"),
        (["--radius", "-1"], "--radius must be 0 or more"),
        (["--stability_scope", "some"], "invalid choice"),
    ],
)
def test_bad_options_are_one_line_errors(export_root: Path, tmp_path: Path, extra, message, capsys) -> None:
    try:
        code = main(["--attn_dir", str(export_root), "--out", str(tmp_path / "o"), *extra])
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "o" / "layer_head_metrics.csv").exists()


def test_a_failed_analysis_leaves_no_folder_it_made(export_root: Path, tmp_path: Path) -> None:
    """The output folder is made (and tried) before the analysis; when the analysis then stops, the folders
    it made are removed again, a folder that was there before is kept."""
    made = tmp_path / "new" / "deeper"
    assert main(["--attn_dir", str(export_root), "--out", str(made), "--reference_layer", "7"]) == 2
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["--attn_dir", str(export_root), "--out", str(kept), "--reference_layer", "7"]) == 2
    assert kept.is_dir() and not any(kept.iterdir())


def test_not_an_export_and_unwritable_output(export_root: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--attn_dir", str(tmp_path / "empty")], "holds no attn_maps/"),
        (["--attn_dir", str(tmp_path / "missing")], "no such file or folder"),
        (["--attn_dir", str(export_root), "--out", str(blocker / "sub")], "cannot write the analysis into"),
    ]
    for args, message in cases:
        done = subprocess.run(
            [sys.executable, str(REPO / "analyze_attention.py"), *args, "--no_figures"],
            capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr


def test_docs_define_every_column_and_array(export_root: Path) -> None:
    text = (REPO / "docs" / "analysis.md").read_text()
    for name in COLUMNS:
        assert f"| `{name}` |" in text, name
    arrays = run_analysis(export_root).per_query
    table = text[text.index("`per_query.npz`") :]
    for key in arrays:
        assert f"`{key}`" in table, key
