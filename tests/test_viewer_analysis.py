"""The viewer's Analysis tab, through its handlers as Gradio calls them, on real exports on disk."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest

from tests.test_viewer import load, panel, reported, rerender, select, text
from vggt.analysis import METRICS
from vggt.testing.synthetic import write_synthetic_export
from vggt.viewer import analysis as analysis_panel
from vggt.viewer import handlers
from vggt.viewer.state import CACHE, Session


@pytest.fixture(autouse=True)
def _fresh_caches():
    CACHE.clear()
    analysis_panel.ANALYSES.clear()
    yield
    CACHE.clear()
    analysis_panel.ANALYSES.clear()


@pytest.fixture()
def export_root(tmp_path: Path) -> Path:
    """Per head, with the geometry's true positions, frame layers and the rollout."""
    return write_synthetic_export(
        tmp_path / "export", H_p=4, W_p=6, num_layers=2, per_head=True, kinds=("global", "frame"),
        rollout=True, geometry=True,
    )  # fmt: skip


def open_tab(session: Session, layer: str, head: str = "Average", metric: str = "pck_1"):
    """The Analysis tab opened (or its metric chosen) on ``layer`` and ``head``."""
    if session.view is not None:
        session = rerender(session, layer, head).session
    return handlers.on_analysis(session, 0.6, metric)


def plain(value: str) -> str:
    return html.unescape(value)


def test_first_use_computes_and_saves_then_reads(export_root: Path) -> None:
    session = load(export_root).session
    out = open_tab(session, "global_02")
    assert out.message == ""
    assert "computed now and saved in analysis/" in plain(out.analysis_note)
    assert "true positions: truth" in plain(out.analysis_note)
    assert (export_root / "analysis" / "per_query.npz").is_file()
    table = out.analysis_table.data
    assert isinstance(table, pd.DataFrame)
    assert table["layer"].tolist() == [
        "Global 01",
        "Global 02",
        "Frame 01",
        "Frame 02",
        "Rollout (discard 0.9)",
    ]
    assert list(table.columns) == ["layer", "Average", "Head 1", "Head 2", "Head 3", "Head 4"]
    # The geometry's truth is where the first layer's blobs are: its head average finds every point.
    assert table.loc[0, "Average"] == "1.000" and table.loc[2, "Average"] == "–"  # frame layers: no pairs
    assert table.loc[4, "Head 1"] == "–"  # the rollout is a head average only
    assert "Click a patch" in plain(out.analysis_readout)
    # Another metric, the same analysis (nothing recomputed); a new session of the same export reads it.
    assert open_tab(session, "global_02", metric="entropy").analysis_table.data.shape == table.shape
    analysis_panel.ANALYSES.clear()
    assert "read from analysis/" in plain(open_tab(load(export_root).session, "global_01").analysis_note)
    reported(open_tab(session, "global_02", metric="nonsense"), "unknown metric")


def test_the_clicked_query_has_its_own_metrics_in_the_readouts(export_root: Path) -> None:
    session = load(export_root).session
    open_tab(session, "global_01")
    clicked = select(session, 20, 20, "global_01", head="Head 2")
    main_readout = text(clicked.query_view)
    assert "Analysis of this query (Global 01, Head 2):" in main_readout and "pck_1 1.000" in main_readout
    panels = panel(clicked.session, "analysis", "global_01", "Head 2")
    assert "Analysis of this query (Global 01, Head 2):" in plain(panels.analysis_readout)
    rollout = select(session, 20, 20, "rollout", head="Head 2")  # the rollout has only its average
    assert "Analysis of this query (Rollout (discard 0.9), Average):" in text(rollout.query_view)
    for metric in METRICS:
        assert f"{metric} " in main_readout or metric.startswith(("pck", "corr", "cross"))


def test_a_cell_of_the_heat_map_opens_its_layer_and_head(export_root: Path) -> None:
    session = load(export_root).session
    reported(
        handlers.on_analysis_cell(session, 0.6, gr.SelectData(None, {"index": [0, 1], "value": "x"})),
        "open the Analysis tab first",
    )
    open_tab(session, "global_02")
    out = handlers.on_analysis_cell(session, 0.6, gr.SelectData(None, {"index": [1, 3], "value": "x"}))
    assert out.layer.value == "global_02" and out.head.value == "Head 2"
    out = handlers.on_analysis_cell(session, 0.6, gr.SelectData(None, {"index": [2, 0], "value": "x"}))
    assert out.layer.value == "frame_01" and out.head.value == "Average"
    for bad in ([9, 0], [0, 9], "x", [0]):
        reported(
            handlers.on_analysis_cell(session, 0.6, gr.SelectData(None, {"index": bad, "value": "x"})),
            "no cell|unexpected",
        )


def test_a_zipped_export_is_analysed_but_nothing_is_written(export_root: Path, tmp_path: Path) -> None:
    archive = shutil.make_archive(str(tmp_path / "shared"), "zip", export_root.parent, export_root.name)
    out = open_tab(load(archive).session, "global_01")
    assert "not saved" in plain(out.analysis_note)
    assert not (export_root / "analysis").exists()


def test_before_any_load_the_tab_does_nothing() -> None:
    out = open_tab(Session(), "global_01")
    assert all(isinstance(v, dict) and v.get("__type__") == "update" for v in out[:-1])
