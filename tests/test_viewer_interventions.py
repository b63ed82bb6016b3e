"""The Analysis tab's intervention results (a sweep's results.csv beside the export), through the
viewer's handlers as Gradio calls them, on real files on disk."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import gradio as gr
import pytest

from tests.test_viewer import load, reported
from tests.test_viewer_analysis import open_tab
from vggt import intervention_results
from vggt.intervention_metrics import ERROR_COLUMNS
from vggt.intervention_results import COLUMNS, NUMBER_COLUMNS, ResultRow, write_results
from vggt.testing.synthetic import write_synthetic_export
from vggt.viewer import analysis as analysis_panel
from vggt.viewer import handlers, render
from vggt.viewer.serving import PathRule
from vggt.viewer.state import CACHE, Session


@pytest.fixture(autouse=True)
def _fresh_caches():
    CACHE.clear()
    analysis_panel.ANALYSES.clear()
    yield
    CACHE.serve(PathRule())  # a test that served one folder leaves the viewer serving any path again
    analysis_panel.ANALYSES.clear()


@pytest.fixture()
def export_root(tmp_path: Path) -> Path:
    """4 heads; global and frame layers and the rollout (layers numbered from 1, as the sweep's)."""
    return write_synthetic_export(
        tmp_path / "export", H_p=4, W_p=6, num_layers=2, per_head=True, kinds=("global", "frame"),
        rollout=True,
    )  # fmt: skip


def row(kind: str, layers: str, head: int | None, depth: float, **numbers: float) -> ResultRow:
    values = dict.fromkeys(NUMBER_COLUMNS, math.nan) | {"depth_abs_rel": depth} | numbers
    return ResultRow(f"{kind} {layers} {head}", kind, layers, head, values)


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """A sweep's output folder: the unmodified run, head ablations (two beyond the export: a DINOv2 layer,
    a fifth head) and a key mask, as intervene_attention.py writes them."""
    folder = tmp_path / "interventions_room"
    folder.mkdir()
    rows = [
        row("none", "", None, 0.0, track_px=0.0),
        row("ablate_heads", "global:2", 3, 0.5, track_px=2.0),
        row("ablate_heads", "global:2", 1, 0.25, track_px=1.0),
        row("ablate_heads", "frame:1", 4, 0.125),
        row("ablate_heads", "dino:1", 1, 9.0),
        row("ablate_heads", "global:1", 5, 9.0),
        row("mask_keys", "global:2", None, 7.0, value=0.5),
    ]
    write_results(folder / "results.csv", rows)
    return folder


def plain(value: str) -> str:
    return html.unescape(value)


def opened(session: Session, path: Path | str, column: str | None = None) -> handlers.InterventionPanel:
    out = handlers.on_interventions(session, str(path), column)
    assert out.message == "", plain(out.message)
    return out


def test_a_sweep_is_drawn_on_the_axes_of_the_analysis_heat_map(export_root: Path, sweep: Path) -> None:
    session = load(export_root).session
    analysis = open_tab(session, "global_02").analysis_table.data
    for path in (sweep, sweep / "results.csv"):  # the folder or the file
        out = opened(session, path)
        table = out.intervention_table.data
        assert list(table.columns) == list(analysis.columns)
        assert table["layer"].tolist() == analysis["layer"].tolist()
        assert table.loc[1, "Head 3"] == "0.5" and table.loc[1, "Head 1"] == "0.25"
        assert table.loc[2, "Head 4"] == "0.125"
        assert (table["Average"] == "–").all() and table.loc[0, "Head 1"] == "–"
        assert out.intervention_column.value == "depth_abs_rel"
        assert [value for _, value in out.intervention_column.choices] == ["depth_abs_rel", "track_px"]
        assert out.intervention_side.visible is True
    note = plain(out.intervention_note)
    assert "5 head ablations in the file; 3 on this export's layers, coloured from 0 to 0.5" in note
    assert "2 ablations not on this export's layers and heads: dino:1 head 1, global:1 head 5" in note
    assert "1 other intervention (mask_keys): not per head, not shown" in note
    # Coloured by value on [0, max] with the viewer's jet colours: 0.5 the top, 0.25 the middle.
    page = out.intervention_table.to_html()
    for value in (0.5, 0.25, 0.125):
        red, green, blue = render.JET_LUT[round(value / 0.5 * 255)]
        assert f"background-color: rgb({red}, {green}, {blue})" in page
    # Another column: that column's values; one that is not measured falls back to the default.
    out = opened(session, sweep, "track_px")
    assert out.intervention_column.value == "track_px" and out.intervention_table.data.loc[1, "Head 3"] == "2"
    assert opened(session, sweep, "fov_rel").intervention_column.value == "depth_abs_rel"
    reported(handlers.on_interventions(session, str(sweep), "rm -rf"), "unknown column 'rm -rf'")


def test_a_cell_opens_its_layer_and_head(export_root: Path, sweep: Path) -> None:
    session = load(export_root).session
    opened(session, sweep)
    click = gr.SelectData(None, {"index": [1, 4], "value": "0.5"})
    out = handlers.on_intervention_cell(session, 0.6, click)
    assert out.layer.value == "global_02" and out.head.value == "Head 3"
    out = handlers.on_intervention_cell(session, 0.6, gr.SelectData(None, {"index": [2, 1], "value": "–"}))
    assert out.layer.value == "frame_01" and out.head.value == "Average"
    for bad in ([9, 0], [0, -1], "x", [0], [0, 9]):
        reported(
            handlers.on_intervention_cell(session, 0.6, gr.SelectData(None, {"index": bad, "value": "x"})),
            "no cell|unexpected|out of range",
        )


def test_the_tab_opening_redraws_or_says_what_the_path_is_for(export_root: Path, sweep: Path) -> None:
    before = handlers.on_interventions_shown(Session(), str(sweep), None)
    assert "results.csv of an intervene_attention.py sweep" in plain(before.intervention_note)
    assert before.message == "" and isinstance(before.intervention_table, dict)  # skipped
    session = load(export_root).session
    assert "Intervention results" in plain(
        handlers.on_interventions_shown(session, "  ", None).intervention_note
    )
    assert handlers.on_interventions_shown(session, str(sweep), None).intervention_table.data.shape == (5, 6)
    reported(handlers.on_interventions(Session(), str(sweep), None), "load an export first")
    reported(handlers.on_interventions(session, " ", None), "enter the path of an intervention sweep")


def test_a_results_file_from_someone_else_is_checked(export_root: Path, sweep: Path, tmp_path: Path) -> None:
    session = load(export_root).session
    header = ",".join(COLUMNS)
    numbers = "," * (len(NUMBER_COLUMNS) - 1)

    def written(name: str, text: str | bytes) -> str:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    cases = {
        str(tmp_path / "missing.csv"): "cannot read",
        written("other.csv", "a,b\n1,2\n"): "not an intervention results file",
        written(
            "kind.csv", f"{header}\nx,<script>,global:1,1,{numbers}\n"
        ): "line 2: unknown kind '<script>'",
        written("head.csv", f"{header}\nx,ablate_heads,global:1,0,{numbers}\n"): "head '0' is not a number",
        written("inf.csv", f"{header}\nx,ablate_heads,global:1,1,1e999{numbers}\n"): "holds an infinity",
        written("text.csv", f"{header}\nx,ablate_heads,global:1,1,abc{numbers}\n"): "holds something else",
        written("fields.csv", f"{header}\nx,none\n"): "line 2: 2 fields, expected",
        written("binary.csv", b"\xff\xfe\x00garbage"): "cannot read",
        written("none.csv", f"{header}\nx,none,,,{numbers}\n"): "hold no single-head ablation",
        written("unmeasured.csv", f"{header}\nx,ablate_heads,global:1,1,{numbers}\n"): "measured no error",
    }
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)  # read without end if it were opened: refused as not a regular file
    cases[str(fifo)] = "not a regular file"
    for path, match in cases.items():
        message = reported(handlers.on_interventions(session, path, None), match)
        assert "<script>" not in message  # shown as text
    big = written("big.csv", header + "\n" + "x" * 2048)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(intervention_results, "MAX_RESULTS_BYTES", 1024)
        reported(handlers.on_interventions(session, big, None), "larger than")
        patch.setattr(intervention_results, "MAX_ROWS", 2)
        rows = "".join(f"x,none,,,{numbers}\n" for _ in range(3))
        reported(
            handlers.on_interventions(session, written("rows.csv", f"{header}\n{rows}"), None), "more than 2"
        )
    assert set(ERROR_COLUMNS) <= set(COLUMNS)


def test_a_viewer_serving_one_folder_opens_results_there_only(
    export_root: Path, sweep: Path, tmp_path: Path
) -> None:
    CACHE.serve(PathRule(tmp_path))
    session = load("export").session
    assert opened(session, "interventions_room").intervention_table.data.shape == (5, 6)
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.mkdir()
    (outside / "results.csv").write_bytes((sweep / "results.csv").read_bytes())
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "results.csv").symlink_to(outside / "results.csv")  # a link in a served folder leads out
    for typed in (str(outside), str(outside / "results.csv"), "../" + outside.name, "linked"):
        message = reported(handlers.on_interventions(session, typed, None), "no intervention results file at")
        assert str(tmp_path) not in plain(message).replace(typed, "")  # the served folder is not told
