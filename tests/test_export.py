"""The exporter on the tiny reference model: values against upstream's attention, files, CLI, errors."""

from __future__ import annotations

import errno
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.reference import expected_pooled
from vggt import export as export_module
from vggt.attn_format import ExportWriter, open_export
from vggt.export import ExportError, ExportOptions, export_attention, parse_layers
from vggt.export_cli import main
from vggt.preprocess import load_and_preprocess_images, to_uint8_frames

EXAMPLE_IMAGES = Path(__file__).parents[1] / "examples" / "synthetic_room" / "images"
PATCH = 14


def dequantized(export, name: str) -> np.ndarray:
    """All queries' maps of one layer as probabilities, through the format's one reader."""
    meta = export.layer_meta(name)
    return np.stack([export.query_maps(name, qi) for qi in range(meta["Q"])])


@pytest.mark.parametrize(
    ("per_head", "stride_h", "stride_w"),
    [(False, 1, 1), (True, 1, 1), (True, 3, 2), (False, 2, 3), (True, 4, 5)],
)
def test_dequantized_maps_equal_upstream_attention_pooled(
    export_tiny, tiny_reference, tmp_path, per_head, stride_h, stride_w
):
    out = export_tiny(tmp_path / "export", per_head=per_head,
                     stride_h=stride_h, stride_w=stride_w)  # fmt: skip
    export = open_export(out)
    export.validate()
    assert export.layer_names == ["layer_01", "layer_02"]
    for layer, name in enumerate(export.layer_names):
        meta = export.layer_meta(name)
        want, want_special = expected_pooled(tiny_reference, layer, stride_h, stride_w, per_head)
        assert meta["H_ds"] == math.ceil(4 / stride_h) and meta["W_ds"] == math.ceil(5 / stride_w)
        assert meta["Q"] == meta["H_ds"] * meta["W_ds"] == want.shape[0]
        got = dequantized(export, name)
        assert got.shape == want.shape
        if per_head:
            scale = np.asarray(meta["per_head_vmax99"])[None, :, None, None, None]
            assert meta["normalized_by"] == "head"
            for head in range(4):
                assert meta["per_head_vmax99"][head] == pytest.approx(
                    np.percentile(want[:, head], 99), rel=1e-5
                )
            assert meta["layer_vmax99"] == pytest.approx(np.percentile(want.mean(axis=1), 99), rel=1e-5)
        else:
            scale = meta["layer_vmax99"]
            assert meta["normalized_by"] == "layer"
            assert scale == pytest.approx(np.percentile(want, 99), rel=1e-5)
        # Within half a code of the exact value, clipped at vmax99 as the schema says.
        error = np.abs(got - np.minimum(want, scale))
        assert np.all(error <= scale / 255 * 0.5 + 1e-6), error.max()
        special = export.special_mass(name)
        np.testing.assert_allclose(special.astype(np.float64), want_special, rtol=1e-3, atol=1e-6)


def test_float16_maps_plus_special_mass_sum_to_one(export_tiny, tiny_reference, tmp_path):
    out = export_tiny(tmp_path / "raw", per_head=True, stride_h=3, stride_w=2,
                     precision="float16")  # fmt: skip
    export = open_export(out)
    for layer, name in enumerate(export.layer_names):
        meta = export.layer_meta(name)
        assert meta["dtype"] == "float16" and meta["normalized_by"] == "none"
        assert meta["npz_path"] == f"{name}/heatmaps_raw_float16.npz"
        maps = dequantized(export, name).astype(np.float64)  # [Q, heads, S, H_ds, W_ds]
        total = maps.sum(axis=(-3, -2, -1)) + export.special_mass(name).astype(np.float64).sum(axis=(-2, -1))
        np.testing.assert_allclose(total, 1.0, atol=2e-3)
        want, _ = expected_pooled(tiny_reference, layer, 3, 2, True)
        np.testing.assert_allclose(maps, want, rtol=1e-3, atol=1e-5)


def test_uint8_special_mass_plus_exact_patch_mass_sums_to_one(export_tiny, tiny_reference, tmp_path):
    export = open_export(export_tiny(tmp_path / "e", per_head=False))
    for layer, name in enumerate(export.layer_names):
        want, _ = expected_pooled(tiny_reference, layer, 1, 1, False)
        total = want.sum(axis=(-3, -2, -1)) + export.special_mass(name).astype(np.float64).sum(axis=(-2, -1))
        np.testing.assert_allclose(total, 1.0, atol=2e-3)
        # Dequantized cells are a lower bound of the patch mass (the top 1% is clipped).
        assert np.all(dequantized(export, name).sum(axis=(-3, -2, -1)) <= want.sum(axis=(-3, -2, -1)) + 1e-3)


def test_per_head_export_averaged_over_heads_matches_averaged_export(export_tiny, tmp_path):
    per_head = open_export(export_tiny(tmp_path / "heads", per_head=True))
    averaged = open_export(export_tiny(tmp_path / "mean", per_head=False))
    for name in averaged.layer_names:
        heads_meta, mean_meta = per_head.layer_meta(name), averaged.layer_meta(name)
        assert heads_meta["layer_vmax99"] == pytest.approx(mean_meta["layer_vmax99"], rel=1e-6)
        from_heads = dequantized(per_head, name).mean(axis=1)
        mean = dequantized(averaged, name)
        # Each side is within half a code (or clipped); compare where neither is clipped.
        tolerance = max(heads_meta["per_head_vmax99"]) / 255 * 0.5 + mean_meta["layer_vmax99"] / 255 * 0.5
        unclipped = (mean < mean_meta["layer_vmax99"] * 0.999) & np.all(
            dequantized(per_head, name)
            < np.asarray(heads_meta["per_head_vmax99"])[None, :, None, None, None] * 0.999,
            axis=1,
        )
        np.testing.assert_array_less(np.abs(from_heads - mean)[unclipped], tolerance + 1e-6)
        np.testing.assert_allclose(
            per_head.special_mass(name).astype(np.float64).mean(axis=1),
            averaged.special_mass(name).astype(np.float64), rtol=2e-3, atol=1e-6,
        )  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [{}, {"per_head": True, "rollout": True, "blocks": ("global", "frame", "dino")}],
    ids=["global", "every kind and rollout"],
)
def test_hooks_are_removed_on_success_and_error(export_tiny, tiny_model, tmp_path, monkeypatch, options):
    def no_hooks() -> bool:
        modules = list(tiny_model.modules())
        return all(not module._forward_hooks for module in modules)

    export_tiny(tmp_path / "ok", **options)
    assert no_hooks()

    calls = []

    def failing_encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return export_module_encode(*args, **kwargs)

    export_module_encode = export_module.encode_layer
    monkeypatch.setattr(export_module, "encode_layer", failing_encode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_tiny(tmp_path / "broken", **options)
    assert no_hooks()
    # Nothing that looks like an export, and no staging folder, is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_failed_layer_write_aborts_the_export(export_tiny, tiny_model, tmp_path, monkeypatch):
    """A write failing in the background (a full disk at the second layer) ends the export with that
    error, hooks removed and nothing left on disk."""
    real_write = ExportWriter.write_layer
    names = []

    def write_until_full(self, name, *args, **kwargs):
        names.append(name)
        if len(names) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, *args, **kwargs)

    monkeypatch.setattr(ExportWriter, "write_layer", write_until_full)
    with pytest.raises(OSError, match="No space left"):
        export_tiny(tmp_path / "full", per_head=True)
    assert all(not module._forward_hooks for module in tiny_model.modules())
    assert not list(tmp_path.iterdir())
    assert names == ["layer_01", "layer_02"]


def test_existing_folder_refused_unless_overwrite(export_tiny, tiny_model, tiny_reference, tmp_path):
    out = export_tiny(tmp_path / "e", per_head=False)
    with pytest.raises(ExportError, match="already exists"):
        export_tiny(out)
    images = tiny_reference["input.images"][0]
    export_attention(tiny_model, images, out, options=ExportOptions(per_head=True), overwrite=True,
                     progress=False)  # fmt: skip
    assert open_export(out).manifest["per_head_data"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_moved_and_zipped_export_still_reads(export_tiny, tmp_path):
    out = export_tiny(tmp_path / "original", per_head=True, stride_h=2, stride_w=2)
    before = open_export(out).query_maps("layer_02", 3, head=1)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(out, moved)
    export = open_export(moved)
    export.validate()
    np.testing.assert_array_equal(export.query_maps("layer_02", 3, head=1), before)
    assert len(export.frames()) == 3
    archive = tmp_path / "sent.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in moved.rglob("*"):
            zf.write(path, Path("renamed") / path.relative_to(moved))
    np.testing.assert_array_equal(open_export(archive).query_maps("layer_02", 3, head=1), before)
    for text in (moved / "attn_maps").glob("*.json"):
        assert str(tmp_path) not in text.read_text()


def test_metadata_fields(export_tiny, tmp_path):
    export = open_export(export_tiny(tmp_path / "e", per_head=True, stride_h=3,
                                    stride_w=2))  # fmt: skip
    meta = export.layer_meta("layer_02")
    assert meta["npz_path"] == "layer_02/heatmaps_uint8.npz"
    assert meta["heatmaps_shape"] == [6, 4, 3, 2, 3] and meta["special_mass_shape"] == [6, 4, 3, 5]
    assert (meta["S"], meta["H_p"], meta["W_p"], meta["image_size"]) == (3, 4, 5, [56, 70])
    assert (meta["layer_index"], meta["block_index"], meta["layer_kind"]) == (2, 1, "global")
    assert meta["per_head_data"] is True and meta["num_heads"] == 4 and len(meta["per_head_vmax99"]) == 4
    assert meta["image_paths"] == [f"../images/frame_{i:02d}.png" for i in range(3)]
    assert meta["query_frame"] == 0 and meta["query_source"] == "a.png"
    assert meta["special_tokens"] == ["camera", "register_1", "register_2", "register_3", "register_4"]
    manifest = export.manifest
    assert [layer["metadata_path"] for layer in manifest["layers"]] == [
        "layer_01_metadata.json", "layer_02_metadata.json"]  # fmt: skip
    assert manifest["compressed"] is False and manifest["precision"] == "uint8"
    with zipfile.ZipFile(export.attn_dir / meta["npz_path"]) as zf:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())


def test_compressed_export(export_tiny, tmp_path):
    plain = open_export(export_tiny(tmp_path / "plain", per_head=True))
    packed = open_export(export_tiny(tmp_path / "packed", per_head=True,
                                    compress=True))  # fmt: skip
    assert packed.manifest["compressed"] is True
    with zipfile.ZipFile(packed.attn_dir / "layer_01" / "heatmaps_uint8.npz") as zf:
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in zf.infolist())
    np.testing.assert_array_equal(packed.heatmaps("layer_01"), plain.heatmaps("layer_01"))


def test_parse_layers():
    assert parse_layers("1-4,12", 24) == (1, 2, 3, 4, 12)
    assert parse_layers(" 3 , 1 ", 24) == (1, 3)
    assert parse_layers(None, 24) is None and parse_layers("all", 24) is None
    for bad in ("0", "25", "4-2", "a", "1-", "-3", "1,,2", "1.5"):
        with pytest.raises(ExportError):
            parse_layers(bad, 24)


def test_layer_subset(export_tiny, tmp_path):
    export = open_export(export_tiny(tmp_path / "e", layers=(2,)))
    assert export.layer_names == ["layer_02"]
    assert export.layer_meta("layer_02")["block_index"] == 1


def test_forward_pass_stops_after_the_last_chosen_layer(tiny_model, tiny_reference, tmp_path, capsys):
    aggregator = tiny_model.aggregator
    ran = []
    handles = [
        aggregator.frame_blocks[1].register_forward_hook(lambda *_: ran.append("frame 2")),
        aggregator.global_blocks[0].attn.proj.register_forward_hook(lambda *_: ran.append("global 1 output")),
    ]
    options = ExportOptions(per_head=True, layers=(1,))
    try:
        out = export_attention(tiny_model, tiny_reference["input.images"][0], tmp_path / "e", options=options)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == []  # neither global layer 1's attention output nor anything after it was computed
    # One progress bar: a step per block the pass entered (every DINOv2 block, frame block 1, global
    # block 1), full when the pass stops; then the writes, as its postfix.
    lines = [line.strip() for line in capsys.readouterr().err.split("\r") if line.strip()]
    entered = len(aggregator.patch_embed.blocks) + 2
    forward = [line for line in lines if line.startswith("forward pass")]
    # tqdm redraws at most every 0.1 s, so the full count may first be drawn under the next phase's name.
    assert "0/1 layers written" in forward[0]
    assert lines[-1].startswith("writing") and f"{entered}/{entered}" in lines[-1]
    assert "1/1 layers written" in lines[-1]
    assert all(line.startswith(("forward pass", "writing")) for line in lines)  # no other bar
    export = open_export(out)
    want, _ = expected_pooled(tiny_reference, 0, 1, 1, per_head=True)
    scale = np.asarray(export.layer_meta("layer_01")["per_head_vmax99"])[None, :, None, None, None]
    error = np.abs(dequantized(export, "layer_01") - np.minimum(want, scale))
    assert np.all(error <= scale / 255 * 0.5 + 1e-6)


# --------------------------------------------------------------------------------------------------
# The command line, on the tiny model saved as a checkpoint with its architecture in a JSON file
# (the ``tiny_cli`` fixture of conftest.py).


def test_cli_first_image_idx_puts_chosen_image_first(tiny_cli, tmp_path):
    out = tmp_path / "out"
    assert tiny_cli("--num_images", "3", "--first_image_idx", "2", "--save-per-head", "--stride", "2",
                    "--output_dir", str(out)) == 0  # fmt: skip
    export = open_export(out)
    # 3 evenly spaced of 5 sorted images: view_00, view_03, view_07; the third becomes frame 0.
    assert export.frame_sources == ["view_07.png", "view_00.png", "view_03.png"]
    manifest = export.manifest
    assert manifest["first_image_idx"] == 2 and manifest["image_set_name"] == "synthetic_room"
    assert manifest["model"]["checkpoint_file"] == "tiny.safetensors"
    assert len(manifest["model"]["checkpoint_sha256"]) == 64 and manifest["model"]["random_weights"] is False
    assert [f["source"] for f in manifest["frames"]] == ["view_07.png", "view_00.png", "view_03.png"]
    assert export.layer_meta("layer_01")["query_source"] == "view_07.png"
    frame_0 = np.asarray(Image.open(out / "images" / "frame_00.png"))
    expected = to_uint8_frames(load_and_preprocess_images([tiny_cli.images / "view_07.png"]))[0]
    np.testing.assert_array_equal(frame_0, expected)
    assert export.layer_meta("layer_01")["stride_h"] == 2 and export.layer_meta("layer_01")["W_ds"] == 19


def test_cli_default_output_folder_and_random_weights(tiny_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = (
        "--num_images",
        "2",
        "--image_set_name",
        "room",
        "--layers",
        "2",
        "--random_weights",
        "--seed",
        "7",
    )
    assert tiny_cli(*args, with_checkpoint=False) == 0
    export = open_export(tmp_path / "attn_first2all_room")
    assert export.layer_names == ["layer_02"] and export.random_weights
    model = export.manifest["model"]
    assert (model["random_weights"], model["random_seed"], model["checkpoint_file"]) == (True, 7, None)
    assert tiny_cli(*args, "--output_dir_prefix", "again_", with_checkpoint=False) == 0
    np.testing.assert_array_equal(open_export(tmp_path / "again_room").heatmaps("layer_02"),
                                  export.heatmaps("layer_02"))  # fmt: skip


@pytest.mark.parametrize(
    ("make_case", "message"),
    [
        (lambda d: ["--image_dir", str(d / "empty")], "no image files found"),
        (lambda d: ["--num_images", "6"], "holds only 5"),
        (lambda d: ["--num_images", "3", "--first_image_idx", "3"], "out of range"),
        (lambda d: ["--first_image_idx", "-1"], "out of range"),
        (lambda d: ["--image_dir", str(d / "broken")], "broken.png"),
        (lambda d: ["--stride", "0"], "at least 1"),
        (lambda d: ["--stride_w", "-2"], "at least 1"),
        (lambda d: ["--layers", "2-x"], "bad --layers '2-x'"),
        (lambda d: ["--blocks", "global,cross"], "bad --blocks 'global,cross'"),
        (lambda d: ["--rollout_discard", "1"], "got --rollout_discard 1.0"),
        (lambda d: ["--layers", "3"], "not in 1-2"),
        (lambda d: ["--checkpoint", str(d / "missing.safetensors")], "missing.safetensors"),
        (lambda d: ["--image_dir", str(d / "nowhere")], "not found"),
        (lambda d: ["--stride", "two"], "invalid int"),
        (lambda d: ["--random_weights"], "exclude each other"),
    ],
)
def test_cli_bad_input_exit_2_one_line_nothing_written(tiny_cli, tmp_path, capsys, make_case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.png").write_bytes(b"this is not a png")
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code = tiny_cli(*make_case(tmp_path), "--output_dir", str(out))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_names_a_bad_input_before_the_output_or_the_plan(tiny_cli, tmp_path, capsys):
    out = tmp_path / "out"
    assert tiny_cli("--num_images", "2", "--output_dir", str(out)) == 0
    capsys.readouterr()
    # A mistyped image folder is named as such, also where the output folder exists already.
    assert tiny_cli("--image_dir", str(tmp_path / "nowhere"), "--output_dir", str(out)) == 2
    assert "image folder not found" in capsys.readouterr().err
    # Without --quiet: a missing checkpoint file is the only thing printed, before any plan.
    missing = tmp_path / "missing.safetensors"
    args = ["--checkpoint", str(missing), "--model_config", str(tiny_cli.config),
            "--image_dir", str(tiny_cli.images), "--output_dir", str(tmp_path / "other")]  # fmt: skip
    assert main(args) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.strip() == f"error: checkpoint not found: {missing}"


def test_cli_existing_output_refused_then_overwritten(tiny_cli, tmp_path, capsys):
    out = tmp_path / "out"
    assert tiny_cli("--num_images", "2", "--output_dir", str(out)) == 0
    assert tiny_cli("--num_images", "2", "--output_dir", str(out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        tiny_cli("--num_images", "3", "--output_dir", str(out), "--overwrite", "--precision", "float16") == 0
    )
    export = open_export(out)
    assert len(export.frame_sources) == 3 and export.layer_meta("layer_01")["dtype"] == "float16"


def test_cli_not_enough_disk_space(tiny_cli, tmp_path, capsys, monkeypatch):
    import vggt.export_cli as cli

    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    assert tiny_cli("--num_images", "2", "--output_dir", str(tmp_path / "out")) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_runs_under_autocast_with_float32_probabilities(tiny_model, tiny_reference, tmp_path):
    images = tiny_reference["input.images"][0]
    out = export_attention(tiny_model, images, tmp_path / "bf16", options=ExportOptions(precision="float16"),
                           autocast_dtype=torch.bfloat16, progress=False)  # fmt: skip
    want, _ = expected_pooled(tiny_reference, 1, 1, 1, False)
    got = dequantized(open_export(out), "layer_02")
    # bf16 activations change the attention a little, but it stays a distribution close to float32's.
    np.testing.assert_allclose(got, want, atol=0.05)
