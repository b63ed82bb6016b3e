"""The viewer on exports with every layer kind (global, frame, DINOv2, rollout) and token queries.

The exports are real ones: the tiny reference model's attention, exported by ``export_attention``. The
expected pixels are computed here from the stored codes or the reader's dequantized maps, with the
independent overlay reference of ``tests/test_viewer.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_format import _write_seed_export
from tests.test_viewer import click, expected_overlay, reported
from vggt.attn_format import open_export
from vggt.export import ExportOptions, export_attention
from vggt.viewer import handlers, render
from vggt.viewer.state import CACHE, Session

SOURCES = ["a.png", "b.png", "c.png"]
LABEL_ROWS = 40  # frame labels are drawn over the top-left corner of each overlay
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


def load(path: Path) -> handlers.Loaded:
    return handlers.on_load(str(path), Session())


def clicked(loaded: handlers.Loaded, row: int, col: int, layer: str = "global_02") -> Session:
    """The session after a click in the middle of query cell (row, col)."""
    geometry = CACHE.get(loaded.session.export_key).geometry
    y0, y1, x0, x1 = geometry.cell_box(row, col)
    out = handlers.on_query_select(loaded.session, layer, "Average", 0.6, False, False,
                                   click((x0 + x1) / 2, (y0 + y1) / 2))  # fmt: skip
    assert out.session.query == (row, col)
    return out.session


def change_layer(session: Session, layer: str, head: str = "Average", token: str | None = None,
                 opacity: float = 0.6, all_layers: bool = False) -> handlers.LayerChanged:  # fmt: skip
    return handlers.on_layer_change(session, layer, head, opacity, all_layers, False, token)


def assert_overlay(image: np.ndarray, frame: np.ndarray, codes: np.ndarray, geometry, opacity: float,
                   top: int = LABEL_ROWS) -> None:  # fmt: skip
    """``image`` is ``frame`` with ``codes`` drawn in jet, each cell over exactly its block of pixels."""
    reference = expected_overlay(frame, codes, geometry, opacity)
    assert np.abs(np.asarray(image)[top:].astype(float) - reference[top:]).max() <= 1.0


def codes_of(values: np.ndarray, scale: float) -> np.ndarray:
    return np.rint(np.clip(values / scale, 0, 1) * 255).astype(np.uint8)


# ---- layer choice ----------------------------------------------------------------------------------------


def test_layer_choice_is_grouped_by_kind_and_starts_on_the_last_global_layer(
    kinds_export: Path, tiny_model, tiny_reference, tmp_path: Path
) -> None:
    loaded = load(kinds_export)
    assert loaded.layer.choices == list(zip(KIND_LABELS, KIND_LAYERS, strict=True))
    assert loaded.layer.value == "global_02"
    assert [c[1] for c in loaded.head.choices] == ["Average", "Head 1", "Head 2", "Head 3", "Head 4"]
    assert "Global 02" in loaded.readout and "global attention" in loaded.readout
    assert "2 global, 2 frame, 2 DINOv2, rollout with discard 0.9" in loaded.info
    assert len(loaded.token_gallery) == 3  # the default layer's camera-token view is there at once

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
    cached = CACHE.get(loaded.session.export_key)
    geometry = cached.geometry
    export = open_export(kinds_export)
    meta = export.layer_meta(layer)
    session = clicked(loaded, 0, 1)
    qi = 0 * geometry.W_ds + 1

    one_head = change_layer(session, layer, "Head 2", opacity=0.7)
    assert [caption for _, caption in one_head.gallery] == ["frame 0 · a.png"]
    # the cells below the query cell (outlined on frame 0): the stored codes of head 2
    codes = np.asarray(export.heatmaps(layer)[qi, 1, 0])
    top = geometry.cell_box(1, 0)[0]
    assert_overlay(one_head.gallery[0][0], cached.frames[0], codes, geometry, 0.7, top=top)
    kind = "frame attention" if layer.startswith("frame") else "DINOv2 patch-embedding attention"
    assert kind in one_head.readout and "within frame 0 only" in one_head.readout

    average = handlers.on_settings_change(session, layer, "Average", 0.6, False, False)
    stored = np.asarray(export.heatmaps(layer)[qi], dtype=np.float64)  # [heads, 1, H_ds, W_ds]
    raw = (stored / 255 * np.asarray(meta["per_head_vmax99"])[:, None, None, None]).mean(axis=0)
    scale = np.percentile(raw, 99)
    assert f"{scale:.4g}" in average.readout
    assert_overlay(average.gallery[0][0], cached.frames[0], codes_of(raw[0], scale), geometry, 0.6, top=top)

    # special tokens of the one key frame, under the layer's own names (cls first in DINOv2 layers)
    first = "cls" if layer.startswith("dino") else "camera"
    table = average.shares_table
    assert list(table.columns) == ["frame", "source", first, "registers", "patches", "total"]
    assert list(table["frame"]) == ["0", "all"]
    special = export.special_mass(layer)[qi].astype(np.float64).mean(axis=0)  # [1, 5]
    np.testing.assert_allclose(float(table[first].iloc[0]), special[0, 0], atol=1e-5)
    assert set(average.shares_chart["token"]) == {first, "registers", "patches"}
    assert f"Special tokens: {first}, register_1" in average.shares_note


# ---- the rollout and the Head control ---------------------------------------------------------------------


def test_rollout_shows_the_average_only_and_its_discard_ratio(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    cached = CACHE.get(loaded.session.export_key)
    export = open_export(kinds_export)
    session = clicked(loaded, 1, 1)
    qi = 1 * cached.geometry.W_ds + 1

    out = change_layer(session, "rollout", "Head 2", opacity=0.5)
    assert out.head.choices == [("Average", "Average")] and out.head.value == "Average"
    assert out.head.interactive is False
    assert len(out.gallery) == 3
    assert "Rollout (discard 0.9)" in out.readout and "attention rollout" in out.readout
    assert "discard ratio **0.9**" in out.readout
    codes = np.asarray(export.heatmaps("rollout")[qi])  # averaged, layer-normalized: the codes themselves
    for frame in (1, 2):
        assert_overlay(out.gallery[frame][0], cached.frames[frame], codes[frame], cached.geometry, 0.5)
    # rollout rows are distributions (renormalized after discarding): camera, registers and patches add
    # up to 1, the patch part a little less where uint8 cells were clipped at vmax99
    total = float(out.shares_table.iloc[-1]["total"])
    assert 0.95 < total <= 1.0 + 2e-3, total

    all_heads = handlers.on_settings_change(out.session, "rollout", "Average", 0.5, False, True)
    assert len(all_heads.gallery) == 3 and "No per-head data in this layer" in all_heads.readout
    # a head left in the control while the layer changes shows the average rather than failing
    stale = handlers.on_settings_change(out.session, "rollout", "Head 2", 0.5, False, False)
    np.testing.assert_array_equal(np.asarray(stale.gallery[1][0]), np.asarray(out.gallery[1][0]))


def test_head_control_follows_the_layer(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    session = clicked(loaded, 0, 0)
    heads = ["Average", "Head 1", "Head 2", "Head 3", "Head 4"]
    on_frame = change_layer(session, "frame_01", "Head 3")
    assert [c[1] for c in on_frame.head.choices] == heads and on_frame.head.value == "Head 3"
    assert on_frame.head.interactive is True
    assert "Head 3 vmax99" in on_frame.readout  # the kept head is the one shown
    on_rollout = change_layer(on_frame.session, "rollout", "Head 3")
    assert [c[1] for c in on_rollout.head.choices] == ["Average"] and on_rollout.head.value == "Average"
    back = change_layer(on_rollout.session, "global_01", "Average")
    assert [c[1] for c in back.head.choices] == heads and back.head.value == "Average"
    assert back.head.interactive is True
    reported(
        handlers.on_settings_change(session, "global_01", "Head 9", 0.6, False, False), "head 9 out of range"
    )


# ---- camera-token view ----------------------------------------------------------------------------------


def test_camera_token_view_of_a_global_layer(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    cached = CACHE.get(loaded.session.export_key)
    export = open_export(kinds_export)
    meta = export.layer_meta("global_02")
    assert loaded.token_query.choices == [
        ("camera token of frame 0 · a.png", "camera:0"),
        ("camera token of frame 1 · b.png", "camera:1"),
        ("camera token of frame 2 · c.png", "camera:2"),
    ]
    out = handlers.on_token_view(loaded.session, "global_02", "Head 2", 0.8, "camera:1")
    assert out.token_query.value == "camera:1"
    assert [caption for _, caption in out.token_gallery] == [
        "frame 0 · a.png", "frame 1 · b.png (the token's frame)", "frame 2 · c.png"
    ]  # fmt: skip
    maps = export.token_maps("global_02", 1, head=1)  # [S, H_ds, W_ds]
    scale = meta["token_per_head_vmax99"][1]
    assert f"Head 2 token vmax99 = **{scale:.4g}**" in out.token_readout
    for frame in range(3):
        codes = codes_of(maps[frame], scale)
        assert_overlay(out.token_gallery[frame][0], cached.frames[frame], codes, cached.geometry, 0.8)

    average = handlers.on_token_view(loaded.session, "global_02", "Average", 0.6, "camera:1")
    mean = export.token_maps("global_02", 1).mean(axis=0)  # each head with its own token scale
    scale = np.percentile(mean, 99)
    assert f"Full colour (dark red) = probability **{scale:.4g}**" in average.token_readout
    lo, hi = min(meta["token_per_head_vmax99"]), max(meta["token_per_head_vmax99"])
    assert f"head token vmax99 range **{lo:.4g} – {hi:.4g}**" in average.token_readout
    assert_overlay(
        average.token_gallery[2][0], cached.frames[2], codes_of(mean[2], scale), cached.geometry, 0.6
    )
    special = export.token_special_mass("global_02")[1].astype(np.float64).mean(axis=0).sum()
    assert f"**{special:.4f}**" in average.token_readout


def test_camera_token_view_of_the_rollout(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    cached = CACHE.get(loaded.session.export_key)
    export = open_export(kinds_export)
    out = change_layer(loaded.session, "rollout", "Head 1", token="camera:2")
    assert out.token_query.value == "camera:2" and len(out.token_gallery) == 3
    scale = export.layer_meta("rollout")["token_vmax99"]
    assert f"layer token vmax99 = **{scale:.4g}**" in out.token_readout
    assert "discard ratio **0.9**" in out.token_readout
    maps = export.token_maps("rollout", 2)
    for frame in range(3):
        codes = codes_of(maps[frame], scale)
        assert_overlay(out.token_gallery[frame][0], cached.frames[frame], codes, cached.geometry, 0.6)


def test_class_token_of_a_dino_layer(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    cached = CACHE.get(loaded.session.export_key)
    export = open_export(kinds_export)
    out = change_layer(loaded.session, "dino_01", "Head 4", token="camera:1")
    assert out.token_query.choices == [("class token of frame 0 · a.png", "cls:0")]
    assert out.token_query.value == "cls:0"  # frame 1's camera token is not in this layer: its only token
    assert [caption for _, caption in out.token_gallery] == ["frame 0 · a.png (the token's frame)"]
    scale = export.layer_meta("dino_01")["token_per_head_vmax99"][3]
    codes = codes_of(export.token_maps("dino_01", 0, head=3)[0], scale)
    assert_overlay(out.token_gallery[0][0], cached.frames[0], codes, cached.geometry, 0.6)
    assert "class token of frame 0" in out.token_readout and "cls, register_1" in out.token_readout
    # the same token is kept across layers that have it
    again = change_layer(out.session, "global_01", "Head 4", token="camera:0")
    assert again.token_query.value == "camera:0" and len(again.token_gallery) == 3


def test_token_view_of_a_seed_export_says_there_is_none(tmp_path: Path) -> None:
    export_dir, _, _ = _write_seed_export(tmp_path, "head")
    loaded = load(export_dir)
    assert loaded.token_gallery == [] and loaded.token_query.choices == []
    assert "stores no token queries" in loaded.token_readout
    out = handlers.on_token_view(loaded.session, "layer_01", "Head 2", 0.6, None)
    assert out.token_gallery == [] and "stores no token queries" in out.token_readout


def test_token_view_before_any_load_does_nothing() -> None:
    out = handlers.on_token_view(Session(), None, "Average", 0.6, None)
    assert all(isinstance(value, dict) and value.get("__type__") == "update" for value in out[:-1])


# ---- composite and reverse view -------------------------------------------------------------------------


def test_all_layers_composite_has_a_strip_per_layer_of_every_kind(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    cached = CACHE.get(loaded.session.export_key)
    height, width = cached.geometry.display_height, cached.geometry.display_width
    session = clicked(loaded, 1, 0)
    out = handlers.on_settings_change(session, "global_02", "Head 2", 0.6, True, False)
    titles = [caption for _, caption in out.gallery]
    assert [title.split("  ")[0] for title in titles] == [
        *KIND_LABELS[:-1], "Rollout (discard 0.9) · average"
    ]  # fmt: skip
    frames = [3, 3, 1, 1, 1, 1, 3]
    assert [image.shape for image, _ in out.gallery] == [
        (render.TITLE_HEIGHT + count * height, width, 3) for count in frames
    ]
    assert "discard ratio **0.9**" in out.readout and "frame 0 only" in out.readout
    # the frame layer's strip holds the same overlay as the single view of that layer and head
    single = change_layer(session, "frame_01", "Head 2")
    strip = np.asarray(out.gallery[2][0])[render.TITLE_HEIGHT :]
    np.testing.assert_array_equal(strip[LABEL_ROWS:], np.asarray(single.gallery[0][0])[LABEL_ROWS:])


def test_reverse_view_of_a_frame_layer_needs_frame_0(kinds_export: Path) -> None:
    loaded = load(kinds_export)
    session = handlers.on_reverse_frame(loaded.session, 1, "frame_01", "Average", 0.6).session
    reported(
        handlers.on_reverse_select(session, 1, "frame_01", "Average", 0.6, click(5, 5)),
        "holds no attention to frame 1",
    )
    # the app keeps working: frame 0 of the same layer, and frame 1 of a global layer
    ok = handlers.on_reverse_select(session, 0, "frame_01", "Average", 0.6, click(5, 5))
    assert ok.reverse_result is not None and ok.session.reverse_cell == (0, 0)
    on_global = handlers.on_reverse_select(session, 1, "global_01", "Head 1", 0.6, click(5, 5))
    assert on_global.reverse_result is not None
    # a frame layer chosen while frame 1's reverse view is open clears it instead of failing
    on_frame = change_layer(on_global.session, "frame_02")
    assert on_frame.reverse_result is None and len(on_frame.token_gallery) == 1
    back = change_layer(on_frame.session, "global_02")
    assert back.reverse_result is not None
