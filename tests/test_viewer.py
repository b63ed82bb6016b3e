"""The viewer's Gradio handlers, called as Gradio calls them, on real exports written to disk."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from tests.test_format import _write_seed_export
from vggt.attn_format import open_export
from vggt.attn_format.quantization import percentile99
from vggt.testing.synthetic import write_synthetic_export
from vggt.viewer import handlers, render
from vggt.viewer.state import CACHE, Session
from visualize_attn_gradio import main, parse_args

REPO = Path(__file__).resolve().parents[1]


def click(x: float, y: float) -> gr.SelectData:
    """The event Gradio passes to a ``.select`` handler for a click at image pixel (x, y)."""
    return gr.SelectData(None, {"index": [x, y], "value": None, "selected": True})


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


def load(path: Path | str) -> handlers.Loaded:
    return handlers.on_load(str(path), Session())


def select(session: Session, x: float, y: float, layer: str, head: str = "Average", opacity: float = 0.6,
           all_layers: bool = False, all_heads: bool = False) -> handlers.Rendered:  # fmt: skip
    return handlers.on_query_select(session, layer, head, opacity, all_layers, all_heads, click(x, y))


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
    for entry in (
        per_head_export,
        per_head_export / "attn_maps",
        per_head_export / "attn_maps" / "layers_manifest.json",
        archive,
    ):
        loaded = load(entry)
        assert loaded.layer.value == "layer_03"  # default: the last global layer
        assert loaded.layer.choices == [("Global 01", "layer_01"), ("Global 02", "layer_02"),
                                        ("Global 03", "layer_03")]  # fmt: skip
        assert [c[1] for c in loaded.head.choices] == ["Average", "Head 1", "Head 2", "Head 3", "Head 4"]
        assert loaded.query_image.shape == (5 * 14 * 5, 7 * 14 * 5, 3)  # small frames shown 5x larger
        assert loaded.gallery == [] and loaded.reverse_result is None
        assert "Random weights" in loaded.banner
        assert [c[1] for c in loaded.reverse_frame.choices] == [0, 1, 2]
    lone = load(per_head_export / "attn_maps" / "layer_02_metadata.json")
    assert [c[1] for c in lone.layer.choices] == ["layer_02"] and lone.layer.value == "layer_02"


def test_no_banner_for_trained_weights_and_no_heads_without_per_head_data(averaged_export: Path) -> None:
    loaded = load(averaged_export)
    assert loaded.banner == ""
    assert [c[1] for c in loaded.head.choices] == ["Average"]


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

    monkeypatch.setattr(handlers.views, "gallery_for", broken)
    reported(select(loaded.session, 5, 5, "layer_01"), r"failed on this request \(KeyError\)")


# ---- 3. clicks, highlight, overlays ---------------------------------------------------------------------


def test_click_maps_exactly_to_the_cell_under_the_pointer(per_head_export: Path) -> None:
    loaded = load(per_head_export)
    geometry = CACHE.get(loaded.session.export_key).geometry
    assert (geometry.H_ds, geometry.W_ds) == (3, 3)
    grid_image = loaded.query_image
    for row in range(3):
        for col in range(3):
            y0, y1, x0, x1 = geometry.cell_box(row, col)
            for x, y in ((x0, y0), (x1 - 1, y1 - 1), (x1 - 0.5, y0 + 0.4)):
                out = select(loaded.session, x, y, "layer_03")
                assert out.session.query == (row, col), (x, y)
            changed = np.any(out.query_image != grid_image, axis=-1)
            inside = np.zeros_like(changed)
            inside[y0:y1, x0:x1] = True
            assert changed[inside].all() and not changed[~inside].any()
    # ragged last cells: 5 patch rows with stride 2 -> the last cell row is one patch (70 px) tall
    assert geometry.cell_box(2, 2) == (280, 350, 420, 490)


def test_one_overlay_per_frame_with_exact_cell_blocks(averaged_export: Path) -> None:
    loaded = load(averaged_export)
    export = open_export(averaged_export)
    out = select(loaded.session, 100, 60, "layer_02", opacity=0.7)
    assert [caption for _, caption in out.gallery] == [
        "frame 0 · view_000.png",
        "frame 1 · view_001.png",
        "frame 2 · view_002.png",
    ]
    cached = CACHE.get(loaded.session.export_key)
    qi = out.session.query[0] * 6 + out.session.query[1]
    codes = np.asarray(export.heatmaps("layer_02")[qi])  # layer-normalized uint8: the codes themselves
    label_rows = 30  # the frame label is drawn over the top-left corner
    for frame in (1, 2):
        image = np.asarray(out.gallery[frame][0])
        reference = expected_overlay(cached.frames[frame], codes[frame], cached.geometry, 0.7)
        assert np.abs(image[label_rows:].astype(float) - reference[label_rows:]).max() <= 1.0


def test_average_over_heads_renormalizes_the_raw_average(per_head_export: Path) -> None:
    loaded = load(per_head_export)
    out = select(loaded.session, 10, 10, "layer_02")
    export = open_export(per_head_export)
    meta = export.layer_meta("layer_02")
    stored = np.asarray(export.heatmaps("layer_02")[0], dtype=np.float64)  # [heads, S, H_ds, W_ds]
    raw = stored / 255.0 * np.asarray(meta["per_head_vmax99"])[:, None, None, None]
    average = raw.mean(axis=0)
    scale = np.percentile(average, 99)
    assert f"{scale:.4g}" in out.readout
    codes = np.rint(np.clip(average / scale, 0, 1) * 255).astype(np.uint8)
    cached = CACHE.get(loaded.session.export_key)
    reference = expected_overlay(cached.frames[2], codes[2], cached.geometry, 0.6)
    assert np.abs(np.asarray(out.gallery[2][0])[40:].astype(float) - reference[40:]).max() <= 1.0


def test_controls_rerender_without_a_new_click(per_head_export: Path) -> None:
    loaded = load(per_head_export)
    session = select(loaded.session, 300, 200, "layer_03").session
    base = handlers.on_settings_change(session, "layer_03", "Average", 0.6, False, False)
    other_layer = handlers.on_settings_change(session, "layer_01", "Average", 0.6, False, False)
    one_head = handlers.on_settings_change(session, "layer_03", "Head 2", 0.6, False, False)
    invisible = handlers.on_settings_change(session, "layer_03", "Head 2", 0.0, False, False)
    for out in (other_layer, one_head):
        assert len(out.gallery) == 3 and out.session.query == session.query
        assert not np.array_equal(np.asarray(out.gallery[1][0]), np.asarray(base.gallery[1][0]))
    assert "layer_01" in other_layer.readout
    cached = CACHE.get(session.export_key)
    without_label = np.asarray(invisible.gallery[1][0])[40:]
    np.testing.assert_array_equal(without_label, cached.frames[1][40:])  # opacity 0: the frame itself


def test_value_readout(per_head_export: Path, averaged_export: Path, raw_export: Path) -> None:
    meta = open_export(per_head_export).layer_meta("layer_03")
    loaded = load(per_head_export)
    session = select(loaded.session, 5, 5, "layer_03").session
    head3 = handlers.on_settings_change(session, "layer_03", "Head 3", 0.6, False, False).readout
    average = handlers.on_settings_change(session, "layer_03", "Average", 0.6, False, False).readout
    assert f"Head 3 vmax99 = **{meta['per_head_vmax99'][2]:.4g}**" in head3
    assert f"layer vmax99 = **{meta['layer_vmax99']:.4g}**" in head3
    lo, hi = min(meta["per_head_vmax99"]), max(meta["per_head_vmax99"])
    assert f"head vmax99 range **{lo:.4g} – {hi:.4g}**" in average

    averaged_meta = open_export(averaged_export).layer_meta("layer_01")
    loaded = load(averaged_export)
    out = select(loaded.session, 5, 5, "layer_01")
    assert f"Full colour (dark red) = probability **{averaged_meta['layer_vmax99']:.4g}**" in out.readout

    loaded = load(raw_export)
    out = handlers.on_settings_change(select(loaded.session, 5, 5, "layer_02").session, "layer_02", "Head 1",
                                      0.6, False, False)  # fmt: skip
    assert "raw float16 probabilities" in out.readout


# ---- 5. composites ------------------------------------------------------------------------------------


def test_all_layers_and_all_heads_composites(per_head_export: Path) -> None:
    loaded = load(per_head_export)
    cached = CACHE.get(loaded.session.export_key)
    session = select(loaded.session, 50, 50, "layer_03").session
    height, width = cached.geometry.display_height, cached.geometry.display_width
    layers = handlers.on_settings_change(session, "layer_02", "Head 1", 0.6, True, False)
    titles = [caption.split("  ")[0] for _, caption in layers.gallery]
    assert titles == ["Global 01", "Global 02", "Global 03"]  # the layers' labels
    assert all(image.shape == (render.TITLE_HEIGHT + 3 * height, width, 3) for image, _ in layers.gallery)
    heads = handlers.on_settings_change(session, "layer_02", "Average", 0.6, False, True)
    vmax = open_export(per_head_export).layer_meta("layer_02")["per_head_vmax99"]
    assert [caption for _, caption in heads.gallery] == [
        f"Head {h + 1}  (vmax99 {vmax[h]:.4g})" for h in range(4)
    ]
    # the strip of head 2 holds the same overlays as the single view of head 2
    single = handlers.on_settings_change(session, "layer_02", "Head 2", 0.6, False, False)
    strip = np.asarray(heads.gallery[1][0])
    frame2 = strip[render.TITLE_HEIGHT + 2 * height : render.TITLE_HEIGHT + 3 * height]
    np.testing.assert_array_equal(frame2[40:], np.asarray(single.gallery[2][0])[40:])
    both = handlers.on_settings_change(session, "layer_02", "Average", 0.6, True, True)
    assert len(both.gallery) == 3 and "uncheck it to see all heads" in both.readout


def test_all_heads_without_per_head_data(averaged_export: Path) -> None:
    loaded = load(averaged_export)
    session = select(loaded.session, 5, 5, "layer_02").session
    out = handlers.on_settings_change(session, "layer_02", "Average", 0.6, False, True)
    assert len(out.gallery) == 3 and "No per-head data" in out.readout


# ---- 6. reverse view and special tokens ---------------------------------------------------------------


def test_reverse_view_draws_the_column_on_frame_0(averaged_export: Path) -> None:
    loaded = load(averaged_export)
    cached = CACHE.get(loaded.session.export_key)
    chosen = handlers.on_reverse_frame(loaded.session, 2, "layer_02", "Average", 0.6)
    assert chosen.session.reverse_frame == 2 and chosen.reverse_result is None
    np.testing.assert_array_equal(chosen.reverse_source, cached.grid_frames[2])
    y0, y1, x0, x1 = cached.geometry.cell_box(1, 4)
    out = handlers.on_reverse_select(chosen.session, 2, "layer_02", "Average", 0.5, click(x0 + 3, y0 + 3))
    assert out.session.reverse_cell == (1, 4)
    highlighted = np.any(out.reverse_source != cached.grid_frames[2], axis=-1)
    assert highlighted[y0:y1, x0:x1].all() and highlighted.sum() == (y1 - y0) * (x1 - x0)
    stored = np.asarray(open_export(averaged_export).heatmaps("layer_02"))
    column_codes = stored[:, 2, 1, 4].reshape(4, 6)  # layer-normalized uint8: the column's codes
    reference = expected_overlay(cached.frames[0], column_codes, cached.geometry, 0.5)
    assert np.abs(np.asarray(out.reverse_result)[40:].astype(float) - reference[40:]).max() <= 1.0
    # changing the layer re-renders the reverse view too
    again = handlers.on_settings_change(out.session, "layer_01", "Average", 0.5, False, False)
    assert again.reverse_result is not None
    assert not np.array_equal(np.asarray(again.reverse_result), np.asarray(out.reverse_result))


def test_special_token_shares(raw_export: Path, per_head_export: Path) -> None:
    loaded = load(raw_export)
    out = select(loaded.session, 30, 30, "layer_02")
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
    head = handlers.on_settings_change(out.session, "layer_02", "Head 4", 0.6, False, False).shares_table
    np.testing.assert_allclose(head["camera"][:3].astype(float), export.special_mass("layer_02")[0, 3, :, 0],
                               atol=1e-5)  # fmt: skip

    loaded = load(per_head_export)
    out = select(loaded.session, 30, 30, "layer_01")
    assert "lower bound" in out.shares_note
    assert float(out.shares_table["total"].iloc[-1]) <= 1.0 + 1e-3


@pytest.mark.parametrize("form", ["layer", "head", "raw"])
def test_seed_export_in_the_viewer(tmp_path: Path, form: str) -> None:
    export_dir, _, _ = _write_seed_export(tmp_path, form)
    loaded = load(export_dir / "attn_maps" / "layers_manifest.json")
    assert "Seed-format export" in loaded.banner
    out = select(loaded.session, 100, 100, "layer_01")
    assert len(out.gallery) == 3
    assert "no special-token mass" in out.shares_note
    assert out.shares_table["camera"].isna().all()
    if form == "head":
        heads = handlers.on_settings_change(out.session, "layer_01", "Average", 0.6, False, True)
        assert len(heads.gallery) == 4


# ---- 8. safety and sessions ---------------------------------------------------------------------------


def reported(out: tuple, match: str) -> str:
    """Assert that a handler reported a failure the viewer's way: every output but the message left as
    it was (``gr.skip()``), and the message one escaped line matching ``match``; returns the message."""
    *others, message = out
    assert all(isinstance(value, dict) and value.get("__type__") == "update" for value in others), others
    assert re.search(match, html.unescape(message)), message
    assert "\n" not in message and 'class="viewer-message viewer-error"' in message
    return message


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
    reported(
        handlers.on_settings_change(good_session, "layer_99", "Average", 0.6, False, False), "unknown layer"
    )

    # the first session still works, and a good export still loads
    assert (
        len(handlers.on_settings_change(good_session, "layer_01", "Average", 0.6, False, False).gallery) == 3
    )
    assert load(averaged_export).layer.value == "layer_02"


def test_controls_before_any_load_do_nothing() -> None:
    out = handlers.on_settings_change(Session(), None, "Average", 0.6, False, False)
    assert all(isinstance(value, dict) and value.get("__type__") == "update" for value in out[:-1])
    assert out.message == ""


def test_two_sessions_do_not_share_state(per_head_export: Path, averaged_export: Path) -> None:
    first = load(per_head_export)
    second = load(averaged_export)
    first_click = select(first.session, 10, 10, "layer_03")
    second_click = select(second.session, 400, 300, "layer_02")
    assert first_click.session.export_key != second_click.session.export_key
    assert first_click.session.query == (0, 0) and second_click.session.query == (3, 5)
    again = handlers.on_settings_change(first_click.session, "layer_01", "Head 1", 0.6, False, False)
    assert again.session.query == (0, 0) and again.query_image.shape == first.query_image.shape
    assert second_click.query_image.shape == (4 * 14 * 5, 6 * 14 * 5, 3)


def test_viewer_and_reader_never_import_torch() -> None:
    code = (
        "import sys; import visualize_attn_gradio, vggt.viewer.app, vggt.viewer.handlers, vggt.attn_format; "
        "visualize_attn_gradio.build_app(None); "
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
def test_any_corrupt_manifest_field_gives_gr_error_or_loads(per_head_export: Path, bad_value: object) -> None:
    manifest_path = per_head_export / "attn_maps/layers_manifest.json"
    original = json.loads(manifest_path.read_text())
    for key in original:
        manifest_path.write_text(json.dumps(original | {key: bad_value}))
        loaded = load(per_head_export)
        if loaded.message:
            reported(loaded, ".")
        else:
            out = select(loaded.session, 5, 5, loaded.layer.value)
            assert len(out.gallery) == 3


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
            table = select(loaded.session, x0 + 1, y0 + 1, "layer_02", head=f"Head {head + 1}").shares_table
            qi = row * geometry.W_ds + col
            np.testing.assert_allclose(table["camera"][:3].astype(float), special[qi, head, :, 0], atol=1e-3)
            registers = special[qi, head, :, 1:].sum(-1)
            np.testing.assert_allclose(table["registers"][:3].astype(float), registers, atol=2e-3)
            expected_patches = np.minimum(pooled[qi, head], clip).sum(axis=(-2, -1))
            cells = geometry.H_ds * geometry.W_ds
            np.testing.assert_allclose(
                table["patches"][:3].astype(float), expected_patches, atol=cells * step / 2
            )
            if precision == "float16":
                assert abs(float(table["total"].iloc[-1]) - 1.0) < 3e-3  # all of the query's attention

    # reverse view: the column of the exported maps is the model's attention into that key cell
    out = handlers.on_reverse_select(loaded.session, 1, "layer_02", f"Head {head + 1}", 0.6, click(1, 1))
    assert out.session.reverse_cell == (0, 0)
    column = export.key_maps("layer_02", 1, 0, 0, head=head)
    expected = np.minimum(pooled[:, head, 1, 0, 0], clip).reshape(column.shape)
    assert np.abs(column - expected).max() <= step / 2 + 1e-6
    assert out.reverse_result.shape == (geometry.display_height, geometry.display_width, 3)
