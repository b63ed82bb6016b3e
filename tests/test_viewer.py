"""The viewer's Gradio handlers, called as Gradio calls them, on real exports written to disk.

The handlers answer with the values the page's attention views draw (:mod:`vggt.viewer.payload`): the
colour codes of every cell are checked here against the stored maps; how the page colours them is
checked in a real browser (``tests/test_viewer_browser.py``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from tests.test_format import _write_seed_export
from vggt.attn_format import open_export
from vggt.attn_format.quantization import percentile99
from vggt.testing.synthetic import write_synthetic_export
from vggt.viewer import handlers, render
from vggt.viewer.state import CACHE, Session, SessionBox
from visualize_attn_gradio import main, parse_args

REPO = Path(__file__).resolve().parents[1]


def click(x: float, y: float) -> gr.EventData:
    """The event the page triggers for a click at frame pixel (x, y) of a picker."""
    return gr.EventData(None, {"x": x, "y": y})


@pytest.fixture(autouse=True)
def _fresh_cache():
    CACHE.clear()
    yield
    CACHE.clear()


@pytest.fixture()
def per_head_export(tmp_path: Path) -> Path:
    """Per-head uint8, non-square frames (5x7 patches) and strides that do not divide the grid."""
    return write_synthetic_export(
        tmp_path / "per_head", H_p=5, W_p=7, stride_h=2, stride_w=3, num_layers=3, per_head=True
    )


@pytest.fixture()
def averaged_export(tmp_path: Path) -> Path:
    return write_synthetic_export(tmp_path / "averaged", H_p=4, W_p=6, num_layers=2, random_weights=False)


@pytest.fixture()
def raw_export(tmp_path: Path) -> Path:
    return write_synthetic_export(tmp_path / "raw", precision="float16", per_head=True, num_layers=2)


# ---- calling the handlers and reading their values ------------------------------------------------------


def load(path: Path | str) -> handlers.MainView:
    return handlers.on_load(Session(), str(path))


def rerender(session: Session, layer: str, head: str = "Average", opacity: float = 0.6, frame: int = 0):
    """The main view after choosing ``layer``, then ``head`` (then ``frame`` for layers x heads), as a user
    would in the controls; a failure's outputs where one is reported."""
    out = handlers.on_layer_change(session, layer, opacity)
    if out.message or not isinstance(out.session, Session):
        return out
    out = handlers.on_head_change(out.session, head, opacity)
    if frame and not out.message:
        out = handlers.on_grid_frame(out.session, frame, opacity)
    return out


def select(session: Session, x: float, y: float, layer: str, head: str = "Average", opacity: float = 0.6,
           frame: int = 0) -> handlers.MainView:  # fmt: skip
    """A click at frame pixel (x, y) of the query frame, on ``layer`` and ``head``."""
    if session.view is not None:
        chosen = rerender(session, layer, head, opacity, frame)
        session = chosen.session if isinstance(chosen.session, Session) else session
    return handlers.on_query_select(session, opacity, click(x, y))


def in_mode(session: Session, mode: str, layer: str, head: str = "Average", frame: int = 0):
    if session.view is not None:
        session = rerender(session, layer, head, frame=frame).session
    return handlers.on_mode(mode)(session, 0.6)


def panel(session: Session, name: str, layer: str, head: str = "Average", token: str | None = None,
          reverse_frame: int = 0, opacity: float = 0.6) -> handlers.Panels:  # fmt: skip
    """The secondary panel ``name`` ("tokens", "camera", "3d", "reverse") brought up to date on ``layer``
    and ``head``."""
    session = rerender(session, layer, head, opacity).session
    return handlers.on_panels(session, opacity, token, reverse_frame, name)


def codes(cell: dict) -> np.ndarray:
    """A cell's colour codes as sent: ``[H_ds, W_ds] uint8``."""
    return np.frombuffer(base64.b64decode(cell["codes"]), dtype=np.uint8)


def cells(value: dict) -> list[list[dict | None]]:
    """The rows of cells of a view's value, each cell's codes decoded to ``[H_ds, W_ds] uint8``."""
    shape = (value["grid"]["rows"], value["grid"]["cols"])
    rows = []
    for row in value["view"]["rows"]:
        rows.append([None if c is None else c | {"codes": codes(c).reshape(shape)} for c in row["cells"]])
    return rows


def captions(value: dict) -> list[str]:
    return [cell["caption"] for cell in value["view"]["rows"][0]["cells"] if cell is not None]


def text(value: dict) -> str:
    """The readout (and notes) of a value, one line each."""
    return "\n".join([*value.get("readout", []), *value.get("notes", [])])


def codes_of(values: np.ndarray, scale: float) -> np.ndarray:
    return np.rint(np.clip(values / scale, 0, 1) * 255).astype(np.uint8)


def reported(out: tuple, match: str) -> str:
    """Assert that a handler reported a failure the viewer's way: every output but the message left as
    it was (``gr.skip()``), and the message one escaped line matching ``match``; returns the message."""
    *others, message = out
    assert all(isinstance(value, dict) and value.get("__type__") == "update" for value in others), others
    assert re.search(match, html.unescape(message)), message
    assert "\n" not in message and 'class="viewer-message viewer-error"' in message
    return message


def expected_overlay(
    frame: np.ndarray, codes: np.ndarray, geometry: render.Geometry, opacity: float
) -> np.ndarray:
    """Independent float reference of one overlay: every cell fills exactly its block of pixels."""
    out = frame.astype(np.float64)
    lut = render.jet_lut().astype(np.float64)
    for row in range(geometry.H_ds):
        for col in range(geometry.W_ds):
            y0, y1, x0, x1 = geometry.cell_box(row, col)
            alpha = codes[row, col] / 255.0 * opacity
            out[y0:y1, x0:x1] = out[y0:y1, x0:x1] * (1 - alpha) + lut[codes[row, col]] * alpha
    return out


# ---- 1. open -----------------------------------------------------------------------------------------


def test_load_every_entry_point(per_head_export: Path, tmp_path: Path) -> None:
    archive = shutil.make_archive(
        str(tmp_path / "sent"), "zip", root_dir=per_head_export.parent, base_dir="per_head"
    )
    frames = np.stack(open_export(per_head_export).frames())
    for entry in (
        per_head_export,
        per_head_export / "attn_maps",
        per_head_export / "attn_maps" / "layers_manifest.json",
        archive,
    ):
        loaded = load(entry)
        assert loaded.message == ""
        assert loaded.layer.value == "layer_03"  # default: the last global layer
        assert loaded.layer.choices == [("Global 01", "layer_01"), ("Global 02", "layer_02"),
                                        ("Global 03", "layer_03")]  # fmt: skip
        assert [c[1] for c in loaded.head.choices] == ["Average", "Head 1", "Head 2", "Head 3", "Head 4"]
        picker = loaded.query_view
        assert picker["size"] == [7 * 14, 5 * 14] and picker["picker"]["cell"] is None
        assert picker["grid"] == {"rows": 3, "cols": 3, "cell": [42, 28]}
        # the frames, sent once, exactly as the model saw them
        sent = [np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))) for url in
                picker["frames"]]  # fmt: skip
        np.testing.assert_array_equal(np.stack(sent), frames)
        assert loaded.overlays["empty"] == handlers.CLICK_PROMPT and "view" not in loaded.overlays
        assert any(line.startswith("Random weights") for line in picker["notes"])
        assert "3 frames of 98 x 70 px (W x H)" in picker["notes"][0]
        assert [c[1] for c in loaded.grid_frame.choices] == [0, 1, 2]
        assert str(per_head_export) not in json.dumps([picker, loaded.overlays])  # no path in the page
    lone = load(per_head_export / "attn_maps" / "layer_02_metadata.json")
    assert [c[1] for c in lone.layer.choices] == ["layer_02"] and lone.layer.value == "layer_02"


def test_no_banner_for_trained_weights_and_controls_that_do_not_apply(averaged_export: Path) -> None:
    loaded = load(averaged_export)
    assert not any("Random weights" in line for line in loaded.query_view["notes"])
    assert [c[1] for c in loaded.head.choices] == ["Average"] and loaded.head.interactive is False
    # no per-head maps: the views of heads are disabled, and refused if asked for anyway
    assert loaded.mode_frames.interactive and loaded.mode_layers.interactive
    assert loaded.mode_heads.interactive is False and loaded.mode_layers_heads.interactive is False
    assert loaded.grid_frame.interactive is False
    session = select(loaded.session, 5, 5, "layer_02").session
    reported(in_mode(session, "heads", "layer_02"), "needs per-head maps")


def test_attn_dir_cli_defaults() -> None:
    args = parse_args(["--attn_dir", "x"])
    assert (args.attn_dir, args.server_name, args.share) == ("x", "127.0.0.1", False)
    args = parse_args(["--attn-dir", "y", "--server-port", "7999", "--share", "--server_name", "0.0.0.0"])
    assert (args.attn_dir, args.server_port, args.share, args.server_name) == ("y", 7999, True, "0.0.0.0")


def test_a_bad_attn_dir_is_a_one_line_error_in_the_terminal(tmp_path: Path, capsys) -> None:
    assert main(["--attn_dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open --attn_dir: ") and "no such file" in err
    assert err.count("\n") == 1


def test_an_unexpected_failure_is_reported_too(per_head_export: Path, monkeypatch) -> None:
    loaded = load(per_head_export)

    def broken(*args: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(handlers.views, "view_for", broken)
    reported(select(loaded.session, 5, 5, "layer_01"), r"failed on this request \(KeyError\)")


# ---- 3. clicks and the maps of the clicked cell ---------------------------------------------------------


def test_click_maps_exactly_to_the_cell_under_the_pointer(per_head_export: Path) -> None:
    loaded = load(per_head_export)
    geometry = CACHE.get(loaded.session.export_key).geometry
    assert (geometry.H_ds, geometry.W_ds) == (3, 3)
    for row in range(3):
        for col in range(3):
            y0, y1, x0, x1 = geometry.cell_box(row, col)
            for x, y in ((x0, y0), (x1 - 1, y1 - 1), (x1 - 0.5, y0 + 0.4)):
                out = select(loaded.session, x, y, "layer_03")
                assert out.session.query == (row, col), (x, y)
                assert out.query_view["picker"]["cell"] == [row, col]
    # ragged last cells: 5 patch rows with stride 2 -> the last cell row is one patch (14 px) tall
    assert geometry.cell_box(2, 2) == (56, 70, 84, 98)
    for bad in ({"x": "nan", "y": 1}, {"x": 1}, None, {"x": [1], "y": 2}, {"x": 1e300, "y": 0}):
        event = gr.EventData(None, bad)
        reported(handlers.on_query_select(loaded.session, 0.6, event), "unexpected click")


def test_one_map_per_frame_with_the_stored_codes(averaged_export: Path) -> None:
    loaded = load(averaged_export)
    export = open_export(averaged_export)
    out = select(loaded.session, 60, 30, "layer_02", opacity=0.7)
    assert out.session.query == (2, 4)
    assert captions(out.overlays) == [
        "frame 0 · view_000.png",
        "frame 1 · view_001.png",
        "frame 2 · view_002.png",
    ]
    assert out.overlays["opacity"] == 0.7
    qi = 2 * 6 + 4
    stored = np.asarray(export.heatmaps("layer_02")[qi])  # layer-normalized uint8: the codes themselves
    row = cells(out.overlays)[0]
    for frame in range(3):
        np.testing.assert_array_equal(row[frame]["codes"], stored[frame])
    assert row[0]["outline"] == [2, 4] and row[1]["outline"] is None  # the query cell, on frame 0
    scale = export.layer_meta("layer_02")["layer_vmax99"]
    assert out.overlays["colorbar"]["max"] == pytest.approx(scale)
    assert f"Full colour (dark red) = probability {scale:.4g}" in text(out.query_view)


def test_average_over_heads_renormalizes_the_raw_average(per_head_export: Path) -> None:
    loaded = load(per_head_export)
    out = select(loaded.session, 10, 10, "layer_02")
    export = open_export(per_head_export)
    meta = export.layer_meta("layer_02")
    stored = np.asarray(export.heatmaps("layer_02")[0], dtype=np.float64)  # [heads, S, H_ds, W_ds]
    raw = stored / 255.0 * np.asarray(meta["per_head_vmax99"])[:, None, None, None]
    average = raw.mean(axis=0)
    scale = np.percentile(average, 99)
    assert f"{scale:.4g}" in text(out.query_view)
    assert "the colours use the average's own 99th percentile" in text(out.query_view)
    sent = np.stack([cell["codes"] for cell in cells(out.overlays)[0]]).astype(int)
    assert np.abs(sent - codes_of(average, scale)).max() <= 1  # float32 against float64 rounding


def test_controls_rerender_without_a_new_click(per_head_export: Path) -> None:
    loaded = load(per_head_export)
    session = select(loaded.session, 60, 40, "layer_03").session
    base = rerender(session, "layer_03")
    other_layer = handlers.on_layer_change(rerender(session, "layer_03", "Head 2").session, "layer_01", 0.6)
    one_head = rerender(session, "layer_03", "Head 2")
    for out in (other_layer, one_head):
        assert len(captions(out.overlays)) == 3 and out.session.query == session.query
        assert not np.array_equal(cells(out.overlays)[0][1]["codes"], cells(base.overlays)[0][1]["codes"])
    assert "layer_01" in text(other_layer.query_view)
    assert other_layer.head.value == "Head 2"  # kept: the new layer has it
    export = open_export(per_head_export)
    qi = session.query[0] * 3 + session.query[1]
    np.testing.assert_array_equal(
        cells(one_head.overlays)[0][1]["codes"], export.heatmaps("layer_03")[qi, 1, 1]
    )


def test_value_readout(per_head_export: Path, averaged_export: Path, raw_export: Path) -> None:
    meta = open_export(per_head_export).layer_meta("layer_03")
    loaded = load(per_head_export)
    session = select(loaded.session, 5, 5, "layer_03").session
    head3 = text(rerender(session, "layer_03", "Head 3").query_view)
    average = text(rerender(session, "layer_03").query_view)
    assert f"Head 3 vmax99 = {meta['per_head_vmax99'][2]:.4g} (the colours' scale)" in head3
    assert f"layer vmax99 = {meta['layer_vmax99']:.4g}" in head3
    lo, hi = min(meta["per_head_vmax99"]), max(meta["per_head_vmax99"])
    assert f"Average of 4 heads (head vmax99 from {lo:.4g} to {hi:.4g})" in average

    averaged_meta = open_export(averaged_export).layer_meta("layer_01")
    loaded = load(averaged_export)
    out = select(loaded.session, 5, 5, "layer_01")
    assert f"Full colour (dark red) = probability {averaged_meta['layer_vmax99']:.4g}" in text(out.query_view)
    # which scale the colours use, said in words
    assert f"layer vmax99 = {averaged_meta['layer_vmax99']:.4g} (the colours' scale)" in text(out.query_view)
    assert "the colours use the average's own 99th percentile" in average

    loaded = load(raw_export)
    out = rerender(select(loaded.session, 5, 5, "layer_02").session, "layer_02", "Head 1")
    assert "raw float16 probabilities" in text(out.query_view)


# ---- 5. composites ------------------------------------------------------------------------------------


def test_all_layers_all_heads_and_layers_by_heads(per_head_export: Path) -> None:
    loaded = load(per_head_export)
    export = open_export(per_head_export)
    session = select(loaded.session, 50, 50, "layer_03").session
    qi = session.query[0] * 3 + session.query[1]

    layers = in_mode(session, "layers", "layer_02", "Head 1")
    assert layers.session.view.mode == "layers" and layers.mode_layers.variant == "primary"
    rows = layers.overlays["view"]["rows"]
    assert [row["label"] for row in rows] == ["Global 01", "Global 02", "Global 03"]  # labels as text
    assert layers.overlays["view"]["columns"] == ["frame 0 · view_000.png", "frame 1 · view_001.png",
                                                  "frame 2 · view_002.png"]  # fmt: skip
    vmax = [export.layer_meta(name)["per_head_vmax99"][0] for name in ("layer_01", "layer_02", "layer_03")]
    assert [row["note"] for row in rows] == [f"full colour = {v:.4g}" for v in vmax]  # each row's scale
    assert layers.overlays["colorbar"]["max"] is None
    for index, name in enumerate(("layer_01", "layer_02", "layer_03")):
        stored = export.heatmaps(name)[qi, 0]  # head 1, its own scale: the stored codes
        np.testing.assert_array_equal(np.stack([c["codes"] for c in cells(layers.overlays)[index]]), stored)
        assert rows[index]["cells"][2]["opens"] == {"layer": name, "head": 0}

    heads = in_mode(session, "heads", "layer_02")
    vmax = export.layer_meta("layer_02")["per_head_vmax99"]
    assert [row["label"] for row in heads.overlays["view"]["rows"]] == [f"Head {h + 1}" for h in range(4)]
    assert [row["note"] for row in heads.overlays["view"]["rows"]] == [f"full colour = {v:.4g}" for v in vmax]
    single = rerender(handlers.on_mode("frames")(heads.session, 0.6).session, "layer_02", "Head 2")
    np.testing.assert_array_equal(cells(heads.overlays)[1][2]["codes"], cells(single.overlays)[0][2]["codes"])

    grid = in_mode(session, "layers_heads", "layer_02", frame=1)
    assert grid.grid_frame.interactive is True
    view = grid.overlays["view"]
    assert view["columns"] == ["Average", "Head 1", "Head 2", "Head 3", "Head 4"]
    assert [row["label"] for row in view["rows"]] == ["Global 01", "Global 02", "Global 03"]
    meta = export.layer_meta("layer_03")
    maps = export.query_maps("layer_03", qi)[:, 1]  # [heads, H_ds, W_ds] on frame 1
    row_scale = max(meta["per_head_vmax99"])  # one scale per row: its layer's largest head vmax99
    assert view["rows"][2]["note"] == f"full colour = {row_scale:.4g}"
    got = np.stack([c["codes"] for c in cells(grid.overlays)[2]]).astype(int)
    expected = codes_of(np.concatenate([maps.mean(0, keepdims=True), maps]), row_scale).astype(int)
    assert np.abs(got - expected).max() <= 1
    assert {c["frame"] for c in view["rows"][0]["cells"]} == {1}
    assert view["rows"][1]["cells"][3]["opens"] == {"layer": "layer_02", "head": 2}
    other_frame = rerender(grid.session, "layer_02", frame=2)
    assert {c["frame"] for c in other_frame.overlays["view"]["rows"][0]["cells"]} == {2}


def test_a_composite_cell_opens_its_layer_and_head(per_head_export: Path) -> None:
    loaded = load(per_head_export)
    session = in_mode(select(loaded.session, 50, 50, "layer_03").session, "heads", "layer_03").session
    out = handlers.on_open_cell(session, 0.6, gr.EventData(None, {"layer": "layer_01", "head": 2}))
    assert out.session.view.mode == "frames" and out.mode_frames.variant == "primary"
    assert out.layer.value == "layer_01" and out.head.value == "Head 3"
    assert out.overlays["view"]["rows"][0]["label"] == "Global 01 · Head 3"
    average = handlers.open_layer_head(session, "layer_02", None, 0.6)
    assert (
        average.head.value == "Average"
        and "Global 02 · Average" in average.overlays["view"]["rows"][0]["label"]
    )
    for bad in ({"layer": "nope", "head": 1}, {"layer": "layer_01", "head": 9}, {"layer": 3},
                {"layer": "layer_01", "head": "1"}):  # fmt: skip
        reported(
            handlers.on_open_cell(session, 0.6, gr.EventData(None, bad)), "unknown layer|out of range|cell"
        )


# ---- 6. reverse view and special tokens ---------------------------------------------------------------


def test_reverse_view_shows_the_column_on_frame_0(averaged_export: Path) -> None:
    loaded = load(averaged_export)
    cached = CACHE.get(loaded.session.export_key)
    chosen = handlers.on_reverse_frame(loaded.session, 2, 0.6)
    assert chosen.session.reverse_frame == 2 and "view" not in chosen.reverse_view
    assert chosen.reverse_view["picker"] == {
        "frame": 2,
        "cell": None,
        "caption": "click a patch of frame 2 · view_002.png",
    }
    y0, y1, x0, x1 = cached.geometry.cell_box(1, 4)
    out = handlers.on_reverse_select(chosen.session, 2, 0.5, click(x0 + 3, y0 + 3))
    assert out.session.reverse_cell == (1, 4) and out.reverse_view["picker"]["cell"] == [1, 4]
    stored = np.asarray(open_export(averaged_export).heatmaps("layer_02"))
    result = cells(out.reverse_view)[0][0]
    assert result["frame"] == 0
    np.testing.assert_array_equal(result["codes"], stored[:, 2, 1, 4].reshape(4, 6))  # the column's codes
    # the open panel follows the layer
    again = panel(out.session, "reverse", "layer_01", reverse_frame=2)
    assert not np.array_equal(cells(again.reverse_view)[0][0]["codes"], result["codes"])


def test_special_token_shares(raw_export: Path, per_head_export: Path) -> None:
    loaded = load(raw_export)
    session = select(loaded.session, 3, 3, "layer_02").session
    out = panel(session, "tokens", "layer_02")
    export = open_export(raw_export)
    table = out.shares_table
    assert list(table.columns) == ["frame", "source", "camera", "registers", "patches", "total"]
    assert list(table["frame"]) == ["0", "1", "2", "all"]
    special = np.asarray(export.special_mass("layer_02")[0], dtype=np.float64).mean(axis=0)
    np.testing.assert_allclose(table["camera"][:3].astype(float), special[:, 0], atol=1e-5)
    np.testing.assert_allclose(table["registers"][:3].astype(float), special[:, 1:].sum(-1), atol=1e-5)
    assert abs(float(table["total"].iloc[-1]) - 1.0) < 2e-3  # raw probabilities: everything sums to 1
    chart = out.shares_chart
    assert set(chart["token"]) == {"camera", "registers", "patches"} and len(chart) == 9
    head = panel(session, "tokens", "layer_02", "Head 4").shares_table
    np.testing.assert_allclose(head["camera"][:3].astype(float), export.special_mass("layer_02")[0, 3, :, 0],
                               atol=1e-5)  # fmt: skip
    # a closed panel is not computed
    closed = panel(session, "camera", "layer_02")
    assert closed.shares_table.get("__type__") == "update"

    loaded = load(per_head_export)
    out = panel(select(loaded.session, 30, 30, "layer_01").session, "tokens", "layer_01")
    assert "lower bound" in out.shares_note
    assert float(out.shares_table["total"].iloc[-1]) <= 1.0 + 1e-3


@pytest.mark.parametrize("form", ["layer", "head", "raw"])
def test_seed_export_in_the_viewer(tmp_path: Path, form: str) -> None:
    export_dir, _, _ = _write_seed_export(tmp_path, form)
    loaded = load(export_dir / "attn_maps" / "layers_manifest.json")
    assert any("Seed-format export" in line for line in loaded.query_view["notes"])
    out = select(loaded.session, 30, 30, "layer_01")
    assert len(captions(out.overlays)) == 3
    shares = panel(out.session, "tokens", "layer_01")
    assert "no special-token mass" in shares.shares_note
    assert shares.shares_table["camera"].isna().all()
    if form == "head":
        heads = in_mode(out.session, "heads", "layer_01")
        assert len(heads.overlays["view"]["rows"]) == 4


# ---- 8. safety and sessions ---------------------------------------------------------------------------


def _gr_error(path: Path | str, match: str) -> None:
    reported(load(path), match)


def test_bad_inputs_give_a_clear_error_and_the_app_keeps_working(
    averaged_export: Path, tmp_path: Path
) -> None:
    good = load(averaged_export)
    good_session = select(good.session, 5, 5, "layer_02").session

    _gr_error("", "enter the path of an export")
    _gr_error(tmp_path / "missing", "no such file")

    broken = tmp_path / "broken"
    shutil.copytree(averaged_export, broken)
    manifest = broken / "attn_maps/layers_manifest.json"
    manifest.write_text("{ nope")
    _gr_error(broken, "malformed JSON in manifest")

    shutil.rmtree(broken)
    shutil.copytree(averaged_export, broken)
    data = json.loads(manifest.read_text())
    data["layers"][0]["metadata_path"] = "../../averaged/attn_maps/layer_01_metadata.json"
    manifest.write_text(json.dumps(data))
    _gr_error(broken, "points outside the export")

    shutil.rmtree(broken)
    shutil.copytree(averaged_export, broken)
    (broken / "attn_maps/layer_02/heatmaps_uint8.npz").unlink()
    _gr_error(broken, "not found in the export")

    shutil.rmtree(broken)
    shutil.copytree(averaged_export, broken)
    npz = broken / "attn_maps/layer_02/heatmaps_uint8.npz"
    npz.write_bytes(npz.read_bytes()[:300])
    _gr_error(broken, "truncated or corrupt")

    with np.load(averaged_export / "attn_maps/layer_02/heatmaps_uint8.npz") as arrays:
        others = {key: arrays[key] for key in arrays.files}  # special-token mass, token queries' maps
    heatmaps = others.pop("heatmaps")
    np.savez(npz, heatmaps=heatmaps[:, :2], **others)
    _gr_error(broken, "heatmaps has shape")
    np.savez(npz, heatmaps=heatmaps.astype(np.int16), **others)
    _gr_error(broken, "heatmaps has dtype int16")
    np.savez(npz, heatmaps=np.empty(heatmaps.shape, dtype=object), **others)
    _gr_error(broken, "holds Python objects")
    np.savez(npz, heatmaps=heatmaps, special_mass=others["special_mass"])
    _gr_error(broken, "has no 'token_heatmaps' array")

    bad_zip = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad_zip, "w") as archive:
        archive.writestr("export/attn_maps/layers_manifest.json", "{}")
        archive.writestr("../../escape.txt", "x")
    _gr_error(bad_zip, "points outside the archive root")

    reported(select(Session(), 1, 1, "layer_01"), "load an export first")
    reported(rerender(good_session, "layer_99"), "unknown layer")
    reported(rerender(good_session, "layer_02", frame=7), "frame 7 out of range")

    # the first session still works, and a good export still loads
    assert len(captions(rerender(good_session, "layer_01").overlays)) == 3
    assert load(averaged_export).layer.value == "layer_02"


def test_controls_before_any_load_do_nothing() -> None:
    panels = handlers.on_panels(Session(), 0.6, None, 0, "tokens")
    layer = handlers.on_layer_change(None, None, 0.6)
    for out in (rerender(Session(), None), layer, in_mode(Session(), "layers", None), panels):
        assert all(isinstance(value, dict) and value.get("__type__") == "update" for value in out[:-1])
        assert out.message == ""


def test_two_sessions_do_not_share_state(per_head_export: Path, averaged_export: Path) -> None:
    first = load(per_head_export)
    second = load(averaged_export)
    first_click = select(first.session, 10, 10, "layer_03")
    second_click = select(second.session, 80, 50, "layer_02")
    assert first_click.session.export_key != second_click.session.export_key
    assert first_click.session.query == (0, 0) and second_click.session.query == (3, 5)
    again = rerender(first_click.session, "layer_01", "Head 1")
    assert again.session.query == (0, 0) and again.query_view["size"] == [98, 70]
    assert second_click.query_view["size"] == [84, 56]


def test_strings_from_the_export_reach_the_page_as_text(tmp_path: Path) -> None:
    """Export strings travel as JSON strings for textContent (the page never parses them as markup);
    what Python renders as HTML itself (the message area) is escaped."""
    root = write_synthetic_export(tmp_path / "e", num_layers=1)
    manifest_path = root / "attn_maps/layers_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["image_set_name"] = "<img src=x onerror=alert(1)> **bold** ![](http://example.invalid/x.png)"
    manifest_path.write_text(json.dumps(manifest))
    loaded = load(root)
    assert manifest["image_set_name"] in loaded.query_view["notes"][0]  # verbatim, for textContent
    bad = reported(load(tmp_path / "<b>missing</b>"), "no such file")
    assert "<b>" not in bad and "&lt;b&gt;" in bad


def test_viewer_and_reader_never_import_torch() -> None:
    code = (
        "import sys; import visualize_attn_gradio, vggt.viewer.cli, vggt.viewer.app, vggt.viewer.handlers; "
        "import vggt.attn_format; vggt.viewer.app.build_app(None); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr or "torch was imported"


def test_percentile_helper_matches_numpy() -> None:
    values = np.random.default_rng(3).random(1000)
    assert percentile99(values) == pytest.approx(np.percentile(values, 99))


@pytest.mark.parametrize("bad_value", ["x", -1, None, [], {}, [{"metadata_path": 3}], True])
def test_any_corrupt_manifest_field_is_reported_or_loads(per_head_export: Path, bad_value: object) -> None:
    manifest_path = per_head_export / "attn_maps/layers_manifest.json"
    original = json.loads(manifest_path.read_text())
    for key in original:
        manifest_path.write_text(json.dumps(original | {key: bad_value}))
        loaded = load(per_head_export)
        if loaded.message:
            reported(loaded, ".")
        else:
            out = select(loaded.session, 5, 5, loaded.layer.value)
            assert len(captions(out.overlays)) == 3


# ---- figures ------------------------------------------------------------------------------------------


def test_save_figure_writes_png_and_svg_with_text(per_head_export: Path) -> None:
    pytest.importorskip("matplotlib")
    loaded = load(per_head_export)
    reported(handlers.on_save_figure(loaded.session, 0.6), "click a patch")
    session = select(loaded.session, 50, 30, "layer_03").session
    saved = handlers.on_save_figure(rerender(session, "layer_02", "Head 2").session, 0.6)
    files = [item["path"] if isinstance(item, dict) else item for item in saved.figure_files.value]
    png, svg = (Path(path) for path in files)
    assert png.suffix == ".png" and svg.suffix == ".svg" and saved.message == ""
    with Image.open(png) as image:
        assert image.info["dpi"][0] == pytest.approx(300, abs=1) and image.width >= 1500
    drawing = svg.read_text()
    for words in (
        "synthetic",
        "Global 02 · Head 2",
        "query cell (1, 1)",
        "frame 2 · view_002.png",
        "probability",
    ):
        assert f">{html.escape(words, quote=False)}<" in drawing.replace("\n", " ") or words in drawing, words
    assert "<text" in drawing


# ---- the tiny reference model's real global attention -------------------------------------------------

TINY_REFERENCE = REPO / "tests" / "fixtures" / "tiny_vggt_reference.safetensors"


def _write_tiny_reference_export(root: Path, precision: str, stride: int) -> tuple[Path, dict]:
    """Export the tiny model's global attention (upstream's fixture) exactly as the format specifies."""
    from safetensors.numpy import load_file

    from vggt.attn_format import ExportWriter, query_grid_shape
    from vggt.attn_format.quantization import quantize_uint8

    tensors = load_file(TINY_REFERENCE)
    images = tensors["input.images"][0]  # [S, 3, H, W] in [0, 1]
    num_frames, _, height, width = images.shape
    H_p, W_p, n_special = height // 14, width // 14, 5
    tokens_per_frame = n_special + H_p * W_p
    H_ds, W_ds = query_grid_shape(H_p, W_p, stride, stride)
    rows, cols = np.meshgrid(np.arange(0, H_p, stride), np.arange(0, W_p, stride), indexing="ij")
    query_tokens = (n_special + rows * W_p + cols).reshape(-1)
    writer = ExportWriter(root)
    frames = np.rint(images.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    writer.write_frames(frames, [f"tiny_{i}.png" for i in range(num_frames)])
    truth = {}
    for block in range(2):
        attention = tensors[f"expected.attn.global.{block}"][0]  # [heads, S*P, S*P]
        heads = attention.shape[0]
        probs = (
            attention[:, query_tokens].reshape(heads, -1, num_frames, tokens_per_frame).transpose(1, 0, 2, 3)
        )
        special = probs[..., :n_special]  # [Q, heads, S, 5]
        patches = probs[..., n_special:].reshape(*probs.shape[:3], H_p, W_p)
        padded = np.pad(patches, [(0, 0)] * 3 + [(0, H_ds * stride - H_p), (0, W_ds * stride - W_p)])
        pooled = padded.reshape(*probs.shape[:3], H_ds, stride, W_ds, stride).sum(axis=(4, 6))
        meta = {"layer_index": block + 1, "block_index": block, "H_p": H_p, "W_p": W_p, "stride_h": stride,
                "stride_w": stride, "num_heads": heads, "layer_vmax99": percentile99(pooled)}  # fmt: skip
        if precision == "float16":
            stored = pooled.astype(np.float16)
        else:
            head_vmax = [percentile99(pooled[:, h]) for h in range(heads)]
            meta["per_head_vmax99"] = head_vmax
            stored = quantize_uint8(pooled, np.asarray(head_vmax, dtype=np.float32)[:, None, None, None])
        name = f"layer_{block + 1:02d}"
        writer.write_layer(name, stored, special.astype(np.float16), meta)
        truth[name] = (pooled, special)
    model = {"id": "tiny-reference", "random_weights": True, "random_seed": 0}
    writer.write_manifest(
        {"image_set_name": "tiny", "model": model, "preprocess_mode": "crop", "first_image_idx": 0}
    )
    return root, truth


@pytest.mark.parametrize("precision", ["uint8", "float16"])
@pytest.mark.parametrize("stride", [1, 2])
def test_tiny_model_attention_in_the_viewer(tmp_path: Path, precision: str, stride: int) -> None:
    root, truth = _write_tiny_reference_export(tmp_path / "tiny", precision, stride)
    export = open_export(root)
    loaded = load(root)
    geometry = CACHE.get(loaded.session.export_key).geometry
    head = 1
    if (
        precision == "uint8"
    ):  # per-head uint8: values clip at the head's vmax99, each cell rounds by half a step
        vmax = export.layer_meta("layer_02")["per_head_vmax99"][head]
        clip, step = vmax, vmax / 255
    else:
        clip, step = np.inf, 2e-3
    pooled, special = truth["layer_02"]
    for row in range(geometry.H_ds):
        for col in range(geometry.W_ds):
            y0, _, x0, _ = geometry.cell_box(row, col)
            session = select(loaded.session, x0 + 1, y0 + 1, "layer_02", head=f"Head {head + 1}").session
            table = panel(session, "tokens", "layer_02", f"Head {head + 1}").shares_table
            qi = row * geometry.W_ds + col
            np.testing.assert_allclose(table["camera"][:3].astype(float), special[qi, head, :, 0], atol=1e-3)
            registers = special[qi, head, :, 1:].sum(-1)
            np.testing.assert_allclose(table["registers"][:3].astype(float), registers, atol=2e-3)
            expected_patches = np.minimum(pooled[qi, head], clip).sum(axis=(-2, -1))
            count = geometry.H_ds * geometry.W_ds
            np.testing.assert_allclose(
                table["patches"][:3].astype(float), expected_patches, atol=count * step / 2
            )
            if precision == "float16":
                assert abs(float(table["total"].iloc[-1]) - 1.0) < 3e-3  # all of the query's attention

    # reverse view: the column of the exported maps is the model's attention into that key cell
    on_head = rerender(loaded.session, "layer_02", f"Head {head + 1}").session
    out = handlers.on_reverse_select(on_head, 1, 0.6, click(1, 1))
    assert out.session.reverse_cell == (0, 0)
    column = export.key_maps("layer_02", 1, 0, 0, head=head)
    expected = np.minimum(pooled[:, head, 1, 0, 0], clip).reshape(column.shape)
    assert np.abs(column - expected).max() <= step / 2 + 1e-6
    sent = cells(out.reverse_view)[0][0]["codes"].astype(int)
    if precision == "uint8":  # one head on its own scale: the stored codes of the column
        assert (
            np.abs(sent - codes_of(column, export.layer_meta("layer_02")["per_head_vmax99"][head])).max() <= 1
        )


# ---- attention in 3D ----------------------------------------------------------------------------------


def read_glb(path: Path) -> dict[str, np.ndarray]:
    """The points and lines of a GLB written by the 3D view, back in the export's coordinates."""
    data = Path(path).read_bytes()
    magic, version, total = struct.unpack_from("<4sII", data)
    assert (magic, version, total) == (b"glTF", 2, len(data))
    length, kind = struct.unpack_from("<I4s", data, 12)
    assert kind == b"JSON"
    document = json.loads(data[20 : 20 + length])
    binary_at = 20 + length + 8
    assert struct.unpack_from("<I4s", data, 20 + length)[1] == b"BIN\0"

    def accessor(index: int) -> np.ndarray:
        spec = document["accessors"][index]
        view = document["bufferViews"][spec["bufferView"]]
        dtype, width = {5126: (np.float32, 3), 5121: (np.uint8, 4)}[spec["componentType"]]
        start = binary_at + view["byteOffset"]
        return np.frombuffer(data[start : start + view["byteLength"]], dtype=dtype).reshape(
            spec["count"], width
        )

    out = {}
    for primitive in document["meshes"][0]["primitives"]:
        name = {0: "points", 1: "lines"}[primitive["mode"]]
        out[name] = accessor(primitive["attributes"]["POSITION"]) * np.float32([1, -1, -1])  # back from y up
        out[f"{name}_rgb"] = accessor(primitive["attributes"]["COLOR_0"])[:, :3]
    return out


def test_the_3d_view_colours_the_predicted_points_by_attention(tmp_path: Path) -> None:
    root = write_synthetic_export(tmp_path / "geo", num_frames=3, H_p=6, W_p=8, num_layers=2, geometry=True)
    loaded = load(root)
    before = panel(loaded.session, "3d", "layer_02")
    assert "Click a patch" in before.points_note and before.points_3d is None
    session = select(loaded.session, 50, 40, "layer_02").session  # query cell (row 2, col 3)
    out = panel(session, "3d", "layer_02", opacity=0.8)
    assert out.message.get("__type__") == "update"  # no failure reported
    glb = read_glb(Path(out.points_3d))
    export = open_export(root)
    geometry = export.geometry()
    frames = CACHE.get(session.export_key).frames
    # every pixel of the 3 small frames (the cloud is under the cap): the confident 90%
    world = np.asarray(geometry.world_points, np.float32).reshape(-1, 3)
    assert 0.85 * len(world) <= len(glb["points"]) <= len(world)
    # each point has its pixel's overlay colour: frame 1's points under the query's map of frame 1
    maps = codes_of(*_map_and_scale(export, 2 * 8 + 3))
    for frame in (0, 1):
        pixels = np.asarray(geometry.world_points[frame], np.float32)
        for y, x in ((5, 5), (40, 50), (80, 100)):
            index = np.flatnonzero(np.all(np.abs(glb["points"] - pixels[y, x]) < 1e-4, axis=1))
            if index.size == 0:
                continue  # among the least confident, left out
            code = maps[frame][y // 14, x // 14]
            expected = expected_overlay(frames[frame][y : y + 1, x : x + 1], np.array([[code]]),
                                        render.Geometry(1, 1, 1, 1, 1, 1, 1, 1), 0.8)[0, 0]  # fmt: skip
            assert np.abs(glb["points_rgb"][index[0]].astype(float) - expected).max() <= 1
    # the cameras (8 segments each) and the query's own point, a cross of 3 segments around it
    x, y = geometry.query_points[2 * 8 + 3]  # the query patch's centre, (48.5, 34.5)
    own = np.asarray(geometry.world_points[0][round(float(y)), round(float(x))], np.float32)
    lines = glb["lines"].reshape(-1, 2, 3)
    assert len(lines) == 3 * 8 + 3
    np.testing.assert_allclose(lines[-3:].mean(axis=(0, 1)), own, atol=1e-4)
    assert (glb["lines_rgb"][-6:] == [255, 0, 255]).all()
    assert "magenta cross" in out.points_note and "probability" in out.points_note

    plain = write_synthetic_export(tmp_path / "plain", num_layers=1)
    loaded = load(plain)
    out = panel(select(loaded.session, 5, 5, "layer_01").session, "3d", "layer_01")
    assert "holds no geometry" in out.points_note and out.points_3d is None


def _map_and_scale(export, qi: int) -> tuple[np.ndarray, float]:
    """The layer_02 head-average maps of query ``qi`` and their full-colour scale (averaged export)."""
    return export.query_maps("layer_02", qi), export.layer_meta("layer_02")["layer_vmax99"]


def test_requests_of_one_page_apply_one_after_the_other(per_head_export: Path, monkeypatch) -> None:
    """Without Gradio's queue a page's requests run at once: each takes the page's session in turn, so a
    click and a head change made together both hold."""
    box = SessionBox(load(per_head_export).session)
    slow_view = handlers.views.view_for

    def view_for(*args: object):
        time.sleep(0.3)  # both requests are in flight together
        return slow_view(*args)

    monkeypatch.setattr(handlers.views, "view_for", view_for)
    click_on = threading.Thread(
        target=handlers.in_session(handlers.on_query_select), args=(box, 0.6, click(60, 40))
    )
    head_on = threading.Thread(target=handlers.in_session(handlers.on_head_change), args=(box, "Head 2", 0.6))
    for thread in (click_on, head_on):
        thread.start()
    for thread in (click_on, head_on):
        thread.join()
    assert box.session.query == (1, 1) and box.session.view.head == 1
