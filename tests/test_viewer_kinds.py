"""The viewer on exports with every layer kind (global, frame, DINOv2, rollout) and token queries.

The exports are real ones: the tiny reference model's attention, exported by ``export_attention``. The
expected colour codes are computed here from the stored codes or the reader's dequantized maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_format import _write_seed_export
from tests.test_viewer import (
    captions,
    cells,
    click,
    codes_of,
    in_mode,
    panel,
    reported,
    rerender,
    select,
    text,
)
from vggt.attn_format import open_export
from vggt.export import ExportOptions, export_attention
from vggt.viewer import handlers
from vggt.viewer.state import CACHE, Session

SOURCES = ["a.png", "b.png", "c.png"]
KIND_LAYERS = ["global_01", "global_02", "frame_01", "frame_02", "dino_01", "dino_02", "rollout"]
KIND_LABELS = [
    "Global 01",
    "Global 02",
    "Frame 01",
    "Frame 02",
    "DINOv2 01",
    "DINOv2 02",
    "Rollout (discard 0.9)",
]


@pytest.fixture(autouse=True)
def _fresh_cache():
    CACHE.clear()
    yield
    CACHE.clear()


def export_tiny(tiny_model, tiny_reference, out: Path, **options) -> Path:
    images = tiny_reference["input.images"][0]
    return export_attention(tiny_model, images, out, sources=SOURCES, options=ExportOptions(**options),
                            progress=False)  # fmt: skip


@pytest.fixture()
def kinds_export(tiny_model, tiny_reference, tmp_path: Path) -> Path:
    """Every kind, per head, uint8, strides 2 x 3 (the last column of cells is ragged: 5 patches)."""
    return export_tiny(tiny_model, tiny_reference, tmp_path / "kinds", blocks=("global", "frame", "dino"),
                       rollout=True, per_head=True, stride_h=2, stride_w=3)  # fmt: skip


def load(path: Path) -> handlers.MainView:
    return handlers.on_load(Session(), str(path))


def clicked(loaded: handlers.MainView, row: int, col: int, layer: str = "global_02") -> Session:
    """The session after a click in the middle of query cell (row, col)."""
    geometry = CACHE.get(loaded.session.export_key).geometry
    y0, y1, x0, x1 = geometry.cell_box(row, col)
    out = select(loaded.session, (x0 + x1) / 2, (y0 + y1) / 2, layer)
    assert out.session.query == (row, col)
    return out.session


def change_layer(
    session: Session, layer: str, head: str = "Average", opacity: float = 0.6
) -> handlers.MainView:
    """Choose ``head`` (where the current layer has it), then ``layer``, in the controls."""
    chosen = handlers.on_head_change(session, head, opacity)
    if isinstance(chosen.session, Session):
        session = chosen.session
    return handlers.on_layer_change(session, layer, opacity)


def token_view(session: Session, layer: str, head: str, token: str | None, opacity: float = 0.6) -> dict:
    session = rerender(session, layer, head).session
    return handlers.on_token_view(session, opacity, token).token_view


# ---- layer choice ----------------------------------------------------------------------------------------


def test_layer_choice_is_grouped_by_kind_and_starts_on_the_last_global_layer(
    kinds_export: Path, tiny_model, tiny_reference, tmp_path: Path
) -> None:
    loaded = load(kinds_export)
    assert loaded.layer.choices == list(zip(KIND_LABELS, KIND_LAYERS, strict=True))
    assert loaded.layer.value == "global_02"
    assert [c[1] for c in loaded.head.choices] == ["Average", "Head 1", "Head 2", "Head 3", "Head 4"]
    assert "Global 02" in text(loaded.query_view) and "global attention" in text(loaded.query_view)
    assert "7 layers (2 global, 2 frame, 2 DINOv2, rollout with discard 0.9)" in text(loaded.query_view)

    global_only = load(
        export_tiny(tiny_model, tiny_reference, tmp_path / "g", rollout=True, rollout_discard=0.5)
    )
    assert global_only.layer.choices == [("Global 01", "layer_01"), ("Global 02", "layer_02"),
                                         ("Rollout (discard 0.5)", "rollout")]  # fmt: skip
    assert global_only.layer.value == "layer_02"
    frames_only = load(export_tiny(tiny_model, tiny_reference, tmp_path / "f", blocks=("frame",)))
    assert frames_only.layer.choices == [("Frame 01", "frame_01"), ("Frame 02", "frame_02")]
    assert frames_only.layer.value == "frame_02"  # no global layer: the last layer


# ---- frame and DINOv2 layers ----------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["frame_01", "dino_02"])
def test_frame_and_dino_layers_show_frame_0_only(kinds_export: Path, layer: str) -> None:
    loaded = load(kinds_export)
    export = open_export(kinds_export)
    meta = export.layer_meta(layer)
    session = clicked(loaded, 0, 1)
    qi = 0 * CACHE.get(session.export_key).geometry.W_ds + 1

    one_head = change_layer(session, layer, "Head 2", opacity=0.7)
    assert captions(one_head.overlays) == ["frame 0 · a.png"]
    np.testing.assert_array_equal(cells(one_head.overlays)[0][0]["codes"], export.heatmaps(layer)[qi, 1, 0])
    kind = "frame attention" if layer.startswith("frame") else "DINOv2 patch-embedding attention"
    assert kind in text(one_head.query_view) and "within frame 0 only" in text(one_head.query_view)

    average = rerender(one_head.session, layer, "Average")
    stored = np.asarray(export.heatmaps(layer)[qi], dtype=np.float64)  # [heads, 1, H_ds, W_ds]
    raw = (stored / 255 * np.asarray(meta["per_head_vmax99"])[:, None, None, None]).mean(axis=0)
    scale = np.percentile(raw, 99)
    assert f"{scale:.4g}" in text(average.query_view)
    assert np.abs(cells(average.overlays)[0][0]["codes"].astype(int) - codes_of(raw[0], scale)).max() <= 1

    # special tokens of the one key frame, under the layer's own names (cls first in DINOv2 layers)
    first = "cls" if layer.startswith("dino") else "camera"
    shares = panel(average.session, "tokens", layer)
    table = shares.shares_table
    assert list(table.columns) == ["frame", "source", first, "registers", "patches", "total"]
    assert list(table["frame"]) == ["0", "all"]
    special = export.special_mass(layer)[qi].astype(np.float64).mean(axis=0)  # [1, 5]
    np.testing.assert_allclose(float(table[first].iloc[0]), special[0, 0], atol=1e-5)
    assert set(shares.shares_chart["token"]) == {first, "registers", "patches"}
    assert f"Special tokens: {first}, register_1" in shares.shares_note


# ---- the rollout and the Head control ---------------------------------------------------------------------


def test_rollout_shows_the_average_only_and_its_discard_ratio(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    export = open_export(kinds_export)
    session = clicked(loaded, 1, 1)
    qi = 1 * CACHE.get(session.export_key).geometry.W_ds + 1

    out = change_layer(session, "rollout", "Head 2", opacity=0.5)
    assert out.head.choices == [("Average", "Average")] and out.head.value == "Average"
    assert out.head.interactive is False
    assert out.mode_heads.interactive is False  # no per-head maps in the rollout
    assert len(captions(out.overlays)) == 3
    readout = text(out.query_view)
    assert "Rollout (discard 0.9)" in readout and "attention rollout" in readout
    assert "discard ratio 0.9" in readout
    stored = export.heatmaps("rollout")[qi]  # averaged, layer-normalized: the codes themselves
    np.testing.assert_array_equal(np.stack([c["codes"] for c in cells(out.overlays)[0]]), stored)
    # rollout rows are distributions (renormalized after discarding): camera, registers and patches add
    # up to 1, the patch part a little less where uint8 cells were clipped at vmax99
    total = float(panel(out.session, "tokens", "rollout").shares_table.iloc[-1]["total"])
    assert 0.95 < total <= 1.0 + 2e-3, total

    reported(in_mode(out.session, "heads", "rollout"), "needs per-head maps")
    # a head left in the control while the layer changes shows the average rather than failing
    stale = handlers.on_head_change(out.session, "Head 2", 0.5)
    np.testing.assert_array_equal(cells(stale.overlays)[0][1]["codes"], cells(out.overlays)[0][1]["codes"])
    reported(rerender(session, "global_01", "Head 9"), "head 9 out of range")


def test_head_control_follows_the_layer(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    session = clicked(loaded, 0, 0)
    heads = ["Average", "Head 1", "Head 2", "Head 3", "Head 4"]
    on_frame = change_layer(session, "frame_01", "Head 3")
    assert [c[1] for c in on_frame.head.choices] == heads and on_frame.head.value == "Head 3"
    assert on_frame.head.interactive is True
    assert "Head 3 vmax99" in text(on_frame.query_view)  # the kept head is the one shown
    on_rollout = change_layer(on_frame.session, "rollout", "Head 3")
    assert [c[1] for c in on_rollout.head.choices] == ["Average"] and on_rollout.head.value == "Average"
    back = change_layer(on_rollout.session, "global_01", "Average")
    assert [c[1] for c in back.head.choices] == heads and back.head.value == "Average"
    assert back.head.interactive is True and back.mode_heads.interactive is True


def test_all_heads_on_a_global_layer_falls_back_to_frames_on_the_rollout(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    heads = in_mode(clicked(loaded, 0, 0), "heads", "global_02")
    assert heads.session.view.mode == "heads" and len(heads.overlays["view"]["rows"]) == 4
    on_rollout = change_layer(heads.session, "rollout")
    assert on_rollout.session.view.mode == "frames" and on_rollout.mode_frames.variant == "primary"
    assert len(on_rollout.overlays["view"]["rows"]) == 1


# ---- camera-token view ----------------------------------------------------------------------------------


def test_camera_token_view_of_a_global_layer(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    export = open_export(kinds_export)
    meta = export.layer_meta("global_02")
    opened = panel(loaded.session, "camera", "global_02")
    assert opened.token_query.choices == [
        ("camera token of frame 0 · a.png", "camera:0"),
        ("camera token of frame 1 · b.png", "camera:1"),
        ("camera token of frame 2 · c.png", "camera:2"),
    ]
    assert len(captions(opened.token_view)) == 3  # the default layer's first token, at once
    out = token_view(loaded.session, "global_02", "Head 2", "camera:1", opacity=0.8)
    assert out["opacity"] == 0.8
    assert captions(out) == ["frame 0 · a.png", "frame 1 · b.png (the token's frame)", "frame 2 · c.png"]
    maps = export.token_maps("global_02", 1, head=1)  # [S, H_ds, W_ds]
    scale = meta["token_per_head_vmax99"][1]
    assert f"Head 2 token vmax99 = {scale:.4g}" in text(out)
    for frame in range(3):
        assert np.abs(cells(out)[0][frame]["codes"].astype(int) - codes_of(maps[frame], scale)).max() <= 1

    average = token_view(loaded.session, "global_02", "Average", "camera:1")
    mean = export.token_maps("global_02", 1).mean(axis=0)  # each head with its own token scale
    scale = np.percentile(mean, 99)
    assert f"Full colour (dark red) = probability {scale:.4g}" in text(average)
    lo, hi = min(meta["token_per_head_vmax99"]), max(meta["token_per_head_vmax99"])
    assert f"head token vmax99 from {lo:.4g} to {hi:.4g}" in text(average)
    assert np.abs(cells(average)[0][2]["codes"].astype(int) - codes_of(mean[2], scale)).max() <= 1
    special = export.token_special_mass("global_02")[1].astype(np.float64).mean(axis=0).sum()
    assert f"{special:.4f}" in text(average)


def test_camera_token_view_of_the_rollout(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    export = open_export(kinds_export)
    out = panel(loaded.session, "camera", "rollout", "Head 1", token="camera:2")
    assert out.token_query.value == "camera:2" and len(captions(out.token_view)) == 3
    scale = export.layer_meta("rollout")["token_vmax99"]
    assert f"layer token vmax99 = {scale:.4g}" in text(out.token_view)
    assert "discard ratio 0.9" in text(out.token_view)
    maps = export.token_maps("rollout", 2)
    for frame in range(3):
        sent = cells(out.token_view)[0][frame]["codes"].astype(int)
        assert np.abs(sent - codes_of(maps[frame], scale)).max() <= 1


def test_class_token_of_a_dino_layer(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    export = open_export(kinds_export)
    out = panel(loaded.session, "camera", "dino_01", "Head 4", token="camera:1")
    assert out.token_query.choices == [("class token of frame 0 · a.png", "cls:0")]
    assert out.token_query.value == "cls:0"  # frame 1's camera token is not in this layer: its only token
    assert captions(out.token_view) == ["frame 0 · a.png (the token's frame)"]
    scale = export.layer_meta("dino_01")["token_per_head_vmax99"][3]
    expected = codes_of(export.token_maps("dino_01", 0, head=3)[0], scale)
    assert np.abs(cells(out.token_view)[0][0]["codes"].astype(int) - expected).max() <= 1
    assert "class token of frame 0" in text(out.token_view) and "cls, register_1" in text(out.token_view)
    # the same token is kept across layers that have it
    again = panel(loaded.session, "camera", "global_01", "Head 4", token="camera:0")
    assert again.token_query.value == "camera:0" and len(captions(again.token_view)) == 3


def test_token_view_of_a_seed_export_says_there_is_none(tmp_path: Path) -> None:
    export_dir, _, _ = _write_seed_export(tmp_path, "head")
    loaded = load(export_dir)
    out = panel(loaded.session, "camera", "layer_01", "Head 2")
    assert out.token_query.choices == [] and "view" not in out.token_view
    assert "stores no token queries" in out.token_view["empty"]


def test_token_view_before_any_load_does_nothing() -> None:
    out = handlers.on_token_view(Session(), 0.6, None)
    assert all(isinstance(value, dict) and value.get("__type__") == "update" for value in out[:-1])


# ---- composite and reverse view -------------------------------------------------------------------------


def test_all_layers_composite_has_a_row_per_layer_of_every_kind(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    session = clicked(loaded, 1, 0)
    out = in_mode(session, "layers", "global_02", "Head 2")
    rows = out.overlays["view"]["rows"]
    assert [row["label"] for row in rows] == [*KIND_LABELS[:-1], "Rollout (discard 0.9) · average"]
    frames = [[c is not None for c in row["cells"]] for row in rows]
    assert frames == [[True] * 3] * 2 + [[True, False, False]] * 4 + [[True] * 3]  # frame 0 only
    assert "discard ratio 0.9" in text(out.query_view) and "frame 0 only" in text(out.query_view)
    # the frame layer's row holds the same codes as the single view of that layer and head
    single = change_layer(handlers.on_mode("frames")(out.session, 0.6).session, "frame_01", "Head 2")
    np.testing.assert_array_equal(cells(out.overlays)[2][0]["codes"], cells(single.overlays)[0][0]["codes"])
    # layers x heads on frame 1: the frame and DINOv2 layers do not attend to it
    grid = in_mode(session, "layers_heads", "global_02", frame=1)
    assert [row["label"] for row in grid.overlays["view"]["rows"]] == ["Global 01", "Global 02",
                                                                       "Rollout (discard 0.9)"]  # fmt: skip
    rollout = grid.overlays["view"]["rows"][2]["cells"]
    assert rollout[0]["opens"] == {"layer": "rollout", "head": None} and rollout[1:] == [None] * 4


def test_reverse_view_of_a_frame_layer_needs_frame_0(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    on_frame_layer = rerender(loaded.session, "frame_01").session
    session = handlers.on_reverse_frame(on_frame_layer, 1, 0.6).session
    reported(
        handlers.on_reverse_select(session, 1, 0.6, click(5, 5)),
        "holds no attention to frame 1",
    )
    # the app keeps working: frame 0 of the same layer, and frame 1 of a global layer
    ok = handlers.on_reverse_select(session, 0, 0.6, click(5, 5))
    assert "view" in ok.reverse_view and ok.session.reverse_cell == (0, 0)
    on_global_layer = rerender(session, "global_01", "Head 1").session
    on_global = handlers.on_reverse_select(on_global_layer, 1, 0.6, click(5, 5))
    assert "view" in on_global.reverse_view
    # a frame layer chosen while frame 1's reverse view is open clears it instead of failing
    on_frame = panel(on_global.session, "reverse", "frame_02", reverse_frame=1)
    assert "view" not in on_frame.reverse_view and on_frame.message.get("__type__") == "update"
    back = panel(on_global.session, "reverse", "global_02", reverse_frame=1)
    assert "view" in back.reverse_view
