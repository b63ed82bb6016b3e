"""The on-disk format: round trips through real files, portability, seed exports and every bad input."""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt.attn_format import (
    HEATMAPS_KEY,
    ExportWriter,
    FormatError,
    open_export,
    query_grid_shape,
)
from vggt.attn_format.npz import StoredNpzWriter, load_member, scan_npz
from vggt.attn_format.quantization import EncodedMaps, dequantize_uint8, percentile99, quantize_uint8
from vggt.attn_format.writer import UNKNOWN_MODEL
from vggt.testing.synthetic import pooled_probabilities, synthetic_frames, write_synthetic_export

REPO = Path(__file__).resolve().parents[1]
MANIFEST_KEYS = (
    "schema_version format image_set_name created tool model preprocess_mode first_image_idx query_frame "
    "frames grid per_head_data num_heads precision compressed layers"
).split()
LAYER_KEYS = (
    "schema_version layer_name layer_kind layer_index block_index npz_path dtype heatmaps_shape "
    "special_mass_shape special_tokens Q S H_p W_p H_ds W_ds stride_h stride_w patch_size image_size "
    "query_frame query_source per_head_data num_heads layer_vmax99 per_head_vmax99 normalized_by "
    "vmax_estimator image_paths source_images"
).split()


def _truth(H_p: int, W_p: int, stride_h: int, stride_w: int, S: int, heads: int, layer: int, n_special: int):
    """Exact pooled probabilities ``[Q, heads, S, H_ds, W_ds]`` and special mass ``[Q, heads, S, n]``."""
    H_ds, W_ds = query_grid_shape(H_p, W_p, stride_h, stride_w)
    rows = np.repeat(np.arange(0, H_p, stride_h), W_ds).astype(np.float32)
    cols = np.tile(np.arange(0, W_p, stride_w), H_ds).astype(np.float32)
    rng = np.random.default_rng(layer)
    return pooled_probabilities(H_p, W_p, stride_h, stride_w, S, heads, layer, n_special, rows, cols, rng)


def _write(
    root: Path,
    precision: str,
    per_head: bool,
    compress: bool,
    H_p: int = 4,
    W_p: int = 5,
    stride_h: int = 1,
    stride_w: int = 1,
) -> dict:
    """Write a 2-layer export with :class:`ExportWriter`; return the float truth of every layer."""
    S, heads, n_special = 3, 4, 5
    writer = ExportWriter(root, compress=compress)
    frames = synthetic_frames(S, H_p * 14, W_p * 14)
    paths = writer.write_frames(frames, [f"/data/set/img_{i}.jpg" for i in range(S)])
    assert paths == [f"../images/frame_{i:02d}.png" for i in range(S)]
    truth = {"frames": frames}
    for layer in range(2):
        pooled, special = _truth(H_p, W_p, stride_h, stride_w, S, heads, layer, n_special)
        if not per_head:
            pooled, special = pooled.mean(axis=1), special.mean(axis=1)
        meta = {
            "layer_index": layer + 1,
            "block_index": layer,
            "H_p": H_p,
            "W_p": W_p,
            "stride_h": stride_h,
            "stride_w": stride_w,
            "num_heads": heads,
            "layer_vmax99": percentile99(pooled),
        }
        if precision == "float16":
            stored = pooled.astype(np.float16)
        elif per_head:
            head_vmax = np.array([percentile99(pooled[:, h]) for h in range(heads)], dtype=np.float32)
            meta["per_head_vmax99"] = head_vmax.tolist()
            stored = quantize_uint8(pooled, head_vmax[:, None, None, None])
        else:
            stored = quantize_uint8(pooled, meta["layer_vmax99"])
        name = f"layer_{layer + 1:02d}"
        full = writer.write_layer(name, stored, special.astype(np.float16), meta)
        assert set(LAYER_KEYS) <= set(full)
        truth[name] = (pooled, special, stored, full)
    manifest_path = writer.write_manifest(
        {
            "image_set_name": "unit",
            "model": {"id": "tiny", "revision": None, "checkpoint_file": None, "checkpoint_sha256": None,
                      "random_weights": True, "random_seed": 0},
            "preprocess_mode": "crop",
            "first_image_idx": 0,
        }
    )  # fmt: skip
    assert manifest_path == root / "attn_maps" / "layers_manifest.json"
    return truth


def _assert_reads_back(path: Path, truth: dict, precision: str, per_head: bool) -> None:
    export = open_export(path)
    export.validate()
    assert export.layer_names == ["layer_01", "layer_02"]
    for name in export.layer_names:
        pooled, special, stored, full = truth[name]
        meta = export.layer_meta(name)
        assert meta == full
        np.testing.assert_array_equal(np.asarray(export.heatmaps(name)), stored)
        np.testing.assert_array_equal(np.asarray(export.special_mass(name)), special.astype(np.float16))
        for qi in (0, meta["Q"] - 1):
            maps = export.query_maps(name, qi)
            assert maps.dtype == np.float32 and maps.shape == pooled[qi].shape
            if precision == "float16":
                tolerance = np.abs(pooled[qi]) * 2**-10 + 1e-7
                assert np.all(np.abs(maps - pooled[qi]) <= tolerance)
            else:
                vmax = np.asarray(
                    meta["per_head_vmax99"] if per_head else meta["layer_vmax99"], dtype=np.float32
                )
                vmax = vmax[:, None, None, None] if per_head else vmax
                expected = np.minimum(pooled[qi], vmax)  # values above the 99th percentile clip to it
                assert np.all(np.abs(maps - expected) <= vmax / 255 / 2 + 1e-6)
            total = pooled[qi].sum(axis=(-3, -2, -1)) + special[qi].sum(axis=(-2, -1))
            np.testing.assert_allclose(total, 1.0, atol=1e-5)
            if per_head:
                np.testing.assert_array_equal(export.query_maps(name, qi, head=1), maps[1])
    frames = export.frames()
    np.testing.assert_array_equal(np.stack(frames), truth["frames"])
    assert export.frame_sources == ["img_0.jpg", "img_1.jpg", "img_2.jpg"]


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
@pytest.mark.parametrize("per_head", [False, True], ids=["averaged", "per_head"])
@pytest.mark.parametrize("precision", ["uint8", "float16"])
def test_round_trip(tmp_path: Path, precision: str, per_head: bool, compress: bool) -> None:
    root = tmp_path / "export"
    truth = _write(root, precision, per_head, compress)
    npz_name = "heatmaps_uint8.npz" if precision == "uint8" else "heatmaps_raw_float16.npz"
    assert (root / "attn_maps" / "layer_01" / npz_name).is_file()
    assert (root / "attn_maps" / "layer_02_metadata.json").is_file()
    for index in range(3):
        assert (root / "images" / f"frame_{index:02d}.png").is_file()
    _assert_reads_back(root, truth, precision, per_head)

    manifest = json.loads((root / "attn_maps" / "layers_manifest.json").read_text())
    assert set(MANIFEST_KEYS) <= set(manifest)
    assert manifest["format"] == "vggt-attn-maps" and manifest["schema_version"] == 1
    assert manifest["precision"] == precision and manifest["compressed"] is compress
    assert manifest["per_head_data"] is per_head
    assert manifest["created"].endswith("Z")
    assert [entry["metadata_path"] for entry in manifest["layers"]] == [
        "layer_01_metadata.json",
        "layer_02_metadata.json",
    ]
    meta = json.loads((root / "attn_maps" / "layer_01_metadata.json").read_text())
    assert meta["npz_path"] == f"layer_01/{npz_name}"
    assert meta["normalized_by"] == ("none" if precision == "float16" else "head" if per_head else "layer")
    assert meta["special_tokens"] == ["camera", "register_1", "register_2", "register_3", "register_4"]
    assert (meta["per_head_vmax99"] is not None) == (per_head and precision == "uint8")


def test_every_entry_point_opens_the_same_export(tmp_path: Path) -> None:
    root = tmp_path / "export"
    _write(root, "uint8", True, False)
    attn = root / "attn_maps"
    for entry in (root, attn, attn / "layers_manifest.json", str(root)):
        export = open_export(entry)
        assert export.layer_names == ["layer_01", "layer_02"]
        assert export.root == root.resolve()
        assert export.random_weights
    lone = open_export(attn / "layer_02_metadata.json")
    assert lone.layer_names == ["layer_02"]
    assert lone.manifest["image_set_name"] == "unit"


def test_ragged_strides(tmp_path: Path) -> None:
    """Strides that do not divide the grid: ragged last cells still hold their patches' full mass."""
    root = tmp_path / "export"
    truth = _write(root, "float16", False, False, H_p=5, W_p=7, stride_h=2, stride_w=3)
    export = open_export(root)
    meta = export.layer_meta("layer_01")
    assert (meta["H_ds"], meta["W_ds"], meta["Q"]) == (3, 3, 9)
    assert export.heatmaps("layer_01").shape == (9, 3, 3, 3)
    _assert_reads_back(root, truth, "float16", False)


def test_uncompressed_members_are_memory_mapped(tmp_path: Path) -> None:
    root = tmp_path / "export"
    _write(root, "uint8", True, compress=False)
    export = open_export(root)
    heatmaps = export.heatmaps("layer_01")
    assert isinstance(heatmaps, np.memmap)
    assert Path(heatmaps.filename) == (root / "attn_maps/layer_01/heatmaps_uint8.npz").resolve()
    assert heatmaps.offset > 0 and not heatmaps.flags.writeable
    assert isinstance(export.special_mass("layer_01"), np.memmap)
    assert export.heatmaps("layer_01") is heatmaps  # mapped once


def test_compressed_members_are_decompressed_once(tmp_path: Path) -> None:
    root = tmp_path / "export"
    _write(root, "uint8", False, compress=True)
    export = open_export(root)
    first = export.heatmaps("layer_02")
    assert not isinstance(first, np.memmap)
    assert export.heatmaps("layer_02") is first
    with zipfile.ZipFile(root / "attn_maps/layer_02/heatmaps_uint8.npz") as archive:
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())


def test_moved_and_zipped_export_still_opens(tmp_path: Path) -> None:
    root = tmp_path / "export"
    truth = _write(root, "uint8", True, False)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(root, moved)
    _assert_reads_back(moved, truth, "uint8", True)

    archive = shutil.make_archive(str(tmp_path / "shared"), "zip", root_dir=moved.parent, base_dir="renamed")
    shutil.rmtree(moved)  # nothing left on disk but the zip
    export = open_export(archive)
    assert export.attn_dir.name == "attn_maps" and export.root.name == "renamed"
    _assert_reads_back(Path(archive), truth, "uint8", True)


def test_zip_of_the_attn_maps_folder_contents(tmp_path: Path) -> None:
    root = tmp_path / "export"
    truth = _write(root, "uint8", False, True)
    archive = shutil.make_archive(str(tmp_path / "whole"), "zip", root_dir=root)
    _assert_reads_back(Path(archive), truth, "uint8", False)


# ---- seed fork exports --------------------------------------------------------------------------------


def _write_seed_export(
    tmp_path: Path, form: str, copy_images: bool = True, source_size: tuple[int, int] = (90, 60)
) -> tuple[Path, np.ndarray, dict]:
    """A seed-style export: compressed NPZ without special mass, cwd-relative manifest paths."""
    H_p, W_p, S, heads = 4, 5, 3, 4
    export = tmp_path / "attn_first2all_kitchen"
    attn = export / "attn_maps"
    attn.mkdir(parents=True)
    sources = tmp_path / "examples" / "kitchen" / "images"
    sources.mkdir(parents=True)
    image_paths = []
    for index in range(S):
        image = Image.fromarray(np.full((source_size[1], source_size[0], 3), 60 * index, dtype=np.uint8))
        image.save(sources / f"{index:03d}.jpg")
        if copy_images:
            (export / "images").mkdir(exist_ok=True)
            image.save(export / "images" / f"frame_{index:02d}.jpg")
            image_paths.append(f"../images/frame_{index:02d}.jpg")
        else:
            image_paths.append(os.path.relpath(sources / f"{index:03d}.jpg", attn))
    pooled, _ = _truth(H_p, W_p, 1, 1, S, heads, 3, 5)
    meta = {"S": S, "H_p": H_p, "W_p": W_p, "stride_h": 1, "stride_w": 1, "H_ds": H_p, "W_ds": W_p}
    if form == "raw":
        pooled = pooled.mean(axis=1)
        stored = pooled.astype(np.float16)
        npz_name = "heatmaps_raw_float16.npz"
        meta |= {"normalized_by": "none", "per_head_data": False, "layer_vmax99": percentile99(pooled)}
    elif form == "head":
        head_vmax = [percentile99(pooled[:, h]) for h in range(heads)]
        stored = quantize_uint8(pooled, np.asarray(head_vmax, dtype=np.float32)[:, None, None, None])
        npz_name = "heatmaps_uint8.npz"
        meta |= {"normalized_by": "per_head_vmax99", "per_head_data": True, "num_heads": heads}
        meta |= {"per_head_vmax99": head_vmax, "layer_vmax99": percentile99(pooled)}
    else:
        pooled = pooled.mean(axis=1)
        stored = quantize_uint8(pooled, percentile99(pooled))
        npz_name = "heatmaps_uint8.npz"
        meta |= {
            "normalized_by": "layer_vmax99",
            "per_head_data": False,
            "layer_vmax99": percentile99(pooled),
        }
    (attn / "layer_01").mkdir()
    np.savez_compressed(attn / "layer_01" / npz_name, heatmaps=stored)
    meta |= {"npz_path": f"layer_01/{npz_name}", "image_paths": image_paths}
    meta["image_sizes"] = [{"width": source_size[0], "height": source_size[1]}] * S
    (attn / "layer_01_metadata.json").write_text(json.dumps(meta, indent=2))
    manifest = {
        "image_set_name": "kitchen",
        "layers": [
            {
                "index": 0,
                "name": "layer_01",
                "metadata_path": "attn_first2all_kitchen/attn_maps/layer_01_metadata.json",
            }
        ],
    }
    (attn / "layers_manifest.json").write_text(json.dumps(manifest, indent=2))
    return export, pooled, meta


@pytest.mark.parametrize("form", ["layer", "head", "raw"])
def test_seed_exports_open(tmp_path: Path, form: str) -> None:
    export_dir, pooled, meta = _write_seed_export(tmp_path, form)
    export = open_export(export_dir / "attn_maps")
    export.validate()
    assert export.is_seed and export.manifest["format"] == "vggt-attn-maps-seed"
    layer = export.layer_meta("layer_01")
    assert layer["normalized_by"] == {"layer": "layer", "head": "head", "raw": "none"}[form]
    assert layer["dtype"] == ("float16" if form == "raw" else "uint8")
    assert export.special_mass("layer_01") is None
    maps = export.query_maps("layer_01", 7)
    if form == "raw":
        np.testing.assert_allclose(maps, pooled[7], rtol=2e-3, atol=1e-7)
    elif form == "head":
        vmax = np.asarray(meta["per_head_vmax99"], dtype=np.float32)[:, None, None, None]
        assert np.all(np.abs(maps - np.minimum(pooled[7], vmax)) <= vmax / 510 + 1e-6)
    else:
        vmax = meta["layer_vmax99"]
        assert np.all(np.abs(maps - np.minimum(pooled[7], vmax)) <= vmax / 510 + 1e-6)
    # The seed copied the original images: they are resized to the model's frame size for display.
    frames = export.frames()
    assert [f.shape for f in frames] == [(56, 70, 3)] * 3
    assert export.frame_sources == ["frame_00.jpg", "frame_01.jpg", "frame_02.jpg"]
    assert any("resized" in warning for warning in export.warnings)


def _fork_discover_layers(attn_dir: Path) -> list[tuple[int, Path]]:
    """The seed fork's analyze_attention.py layer discovery, minimally: ``int(entry["index"])`` of each
    manifest entry with its metadata file (relative to the manifest, else its base name), sorted."""
    manifest = json.loads((attn_dir / "layers_manifest.json").read_text())
    found = []
    for entry in manifest["layers"]:
        path = attn_dir / entry["metadata_path"]
        found.append((int(entry["index"]), path if path.exists() else attn_dir / Path(path).name))
    return sorted(found)


def _fork_load_layer(metadata_path: Path) -> np.ndarray:
    """The fork's layer loading: ``heatmaps`` as float32 beside the metadata, heads averaged."""
    meta = json.loads(metadata_path.read_text())
    stored = np.load(metadata_path.parent / meta["npz_path"], mmap_mode="r")["heatmaps"]
    maps = stored.astype(np.float32)
    return maps.mean(axis=1) if meta.get("per_head_data") and maps.ndim == 5 else maps


@pytest.mark.parametrize("per_head", [False, True])
def test_seed_fork_reads_layers_under_their_0_based_index(tmp_path: Path, per_head: bool) -> None:
    root = write_synthetic_export(tmp_path / "export", num_layers=3, per_head=per_head)
    export = open_export(root)
    layers = _fork_discover_layers(root / "attn_maps")
    # The fork's layer i (its --start_layer i) is global block i, named layer_{i+1:02d}.
    assert [index for index, _ in layers] == [0, 1, 2]
    for index, path in layers:
        (name,) = [n for n in export.layer_names if export.layer_meta(n)["block_index"] == index]
        assert name == f"layer_{index + 1:02d}" and path.name == f"{name}_metadata.json"
        stored = np.asarray(export.heatmaps(name), dtype=np.float32)
        expected = stored.mean(axis=1) if per_head else stored
        np.testing.assert_array_equal(_fork_load_layer(path), expected)
    assert [entry["index"] for entry in export.manifest["layers"]] == [0, 1, 2]


def test_reader_gives_manifest_entries_the_0_based_index(tmp_path: Path) -> None:
    root = write_synthetic_export(tmp_path / "export", num_layers=2, kinds=("global", "frame"), rollout=True)
    manifest_path = root / "attn_maps" / "layers_manifest.json"
    written = json.loads(manifest_path.read_text())
    expected = [("global", 0), ("global", 1), ("frame", 0), ("frame", 1), ("rollout", None)]
    assert [(entry["kind"], entry["index"]) for entry in written["layers"]] == expected
    # An export written while the index was 1-based reads with the 0-based one.
    for entry in written["layers"]:
        if entry["index"] is not None:
            entry["index"] += 1
    manifest_path.write_text(json.dumps(written))
    layers = open_export(root).manifest["layers"]
    assert [(entry["kind"], entry["index"], entry["block_index"]) for entry in layers] == [
        (kind, index, index) for kind, index in expected
    ]


def test_seed_layers_are_numbered_from_their_names(tmp_path: Path) -> None:
    export_dir, _, _ = _write_seed_export(tmp_path, "layer")
    export = open_export(export_dir / "attn_maps")
    meta = export.layer_meta("layer_01")
    assert (meta["layer_index"], meta["block_index"]) == (1, 0)
    assert export.manifest["layers"][0]["index"] == 0
    # A lone layer file, without the manifest, is numbered the same way.
    lone = open_export(export_dir / "attn_maps" / "layer_01_metadata.json")
    assert lone.manifest["layers"][0]["index"] == 0


def test_seed_export_without_images_folder_shows_placeholders(tmp_path: Path) -> None:
    export_dir, _, _ = _write_seed_export(tmp_path, "layer", copy_images=False)
    export = open_export(export_dir)
    assert export.frame_paths == [None, None, None]
    assert export.frame_sources == ["000.jpg", "001.jpg", "002.jpg"]
    assert all(np.all(frame == 128) and frame.shape == (56, 70, 3) for frame in export.frames())
    assert len(export.warnings) == 3


def test_seed_absolute_paths_are_matched_inside_the_export(tmp_path: Path) -> None:
    export_dir, _, _ = _write_seed_export(tmp_path, "layer")
    attn = export_dir / "attn_maps"
    manifest = json.loads((attn / "layers_manifest.json").read_text())
    manifest["layers"][0]["metadata_path"] = "/home/someone/runs/attn_maps/layer_01_metadata.json"
    (attn / "layers_manifest.json").write_text(json.dumps(manifest))
    meta = json.loads((attn / "layer_01_metadata.json").read_text())
    meta["npz_path"] = "/home/someone/runs/attn_maps/layer_01/heatmaps_uint8.npz"
    (attn / "layer_01_metadata.json").write_text(json.dumps(meta))
    export = open_export(attn)
    assert export.heatmaps("layer_01").shape == (20, 3, 4, 5)


# ---- bad input ----------------------------------------------------------------------------------------


def _one_line_error(path: Path | str, match: str) -> FormatError:
    with pytest.raises(FormatError, match=match) as caught:
        export = open_export(path)
        export.validate()
        for name in export.layer_names:
            export.query_maps(name, 0)
    assert "\n" not in str(caught.value)
    return caught.value


@pytest.fixture()
def export_root(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    _write(root, "uint8", True, False)
    return root


def test_missing_path(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nope", "no such file")
    _one_line_error(tmp_path, "holds no attn_maps")


def test_malformed_manifest(export_root: Path) -> None:
    (export_root / "attn_maps/layers_manifest.json").write_text('{"layers": [')
    _one_line_error(export_root, "malformed JSON in manifest")


def test_malformed_metadata(export_root: Path) -> None:
    (export_root / "attn_maps/layer_02_metadata.json").write_text("{not json}")
    _one_line_error(export_root, "malformed JSON in layer metadata")


def test_manifest_without_layers(export_root: Path) -> None:
    path = export_root / "attn_maps/layers_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["layers"] = []
    path.write_text(json.dumps(manifest))
    _one_line_error(export_root, "lists no layers")


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_metadata_path_outside_the_export(export_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside_metadata.json"
    shutil.copy(export_root / "attn_maps/layer_01_metadata.json", outside)
    path = export_root / "attn_maps/layers_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["layers"][0]["metadata_path"] = "../../outside_metadata.json"
    path.write_text(json.dumps(manifest))
    _one_line_error(export_root, "points outside the export")
    manifest["layers"][0]["metadata_path"] = str(outside)
    path.write_text(json.dumps(manifest))
    _one_line_error(export_root, "points outside the export")


def test_npz_and_image_paths_outside_the_export(export_root: Path, tmp_path: Path) -> None:
    shutil.copy(export_root / "attn_maps/layer_01/heatmaps_uint8.npz", tmp_path / "stolen.npz")
    metadata = export_root / "attn_maps/layer_01_metadata.json"
    original = metadata.read_text()
    _edit_json(metadata, npz_path="../../stolen.npz")
    _one_line_error(export_root, "points outside the export")
    metadata.write_text(original)
    shutil.copy(export_root / "images/frame_00.png", tmp_path / "x.png")
    _edit_json(metadata, image_paths=["../../x.png", "../images/frame_01.png", "../images/frame_02.png"])
    _one_line_error(export_root, "points outside the export")


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_symlink_leading_outside_is_refused(export_root: Path, tmp_path: Path) -> None:
    target = export_root / "attn_maps/layer_01/heatmaps_uint8.npz"
    shutil.move(target, tmp_path / "real.npz")
    target.symlink_to(tmp_path / "real.npz")
    _one_line_error(export_root, "points outside the export")


def test_missing_npz(export_root: Path) -> None:
    (export_root / "attn_maps/layer_02/heatmaps_uint8.npz").unlink()
    _one_line_error(export_root, "not found in the export")


def test_truncated_npz(export_root: Path) -> None:
    npz = export_root / "attn_maps/layer_01/heatmaps_uint8.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    _one_line_error(export_root, "truncated or corrupt")


def test_shape_disagreeing_with_metadata(export_root: Path) -> None:
    npz = export_root / "attn_maps/layer_01/heatmaps_uint8.npz"
    with np.load(npz) as data:
        heatmaps, special = data["heatmaps"], data["special_mass"]
    np.savez(npz, heatmaps=heatmaps[:-1], special_mass=special)
    _one_line_error(export_root, r"heatmaps has shape \[19, 4, 3, 4, 5\], metadata says \[20, 4, 3, 4, 5\]")


def test_dtype_disagreeing_with_metadata(export_root: Path) -> None:
    npz = export_root / "attn_maps/layer_02/heatmaps_uint8.npz"
    with np.load(npz) as data:
        heatmaps, special = data["heatmaps"], data["special_mass"]
    np.savez(npz, heatmaps=heatmaps.astype(np.float32), special_mass=special)
    _one_line_error(export_root, "heatmaps has dtype float32, metadata says uint8")


def test_metadata_inconsistent_with_itself(export_root: Path) -> None:
    metadata = export_root / "attn_maps/layer_01_metadata.json"
    _edit_json(metadata, Q=21)
    _one_line_error(export_root, "Q=21 but H_ds")
    _edit_json(metadata, Q=20, per_head_vmax99=[1.0, 2.0])
    _one_line_error(export_root, "per_head_vmax99 must list 4 values")


def test_object_arrays_are_never_unpickled(export_root: Path) -> None:
    npz = export_root / "attn_maps/layer_01/heatmaps_uint8.npz"
    payload = np.empty((20, 4, 3, 4, 5), dtype=object)
    np.savez(npz, heatmaps=payload, special_mass=np.zeros((20, 4, 3, 5), np.float16))
    _one_line_error(export_root, "holds Python objects")
    np.savez_compressed(npz, heatmaps=payload, special_mass=np.zeros((20, 4, 3, 5), np.float16))
    _one_line_error(export_root, "holds Python objects")


def _zip_with(tmp_path: Path, export_root: Path, name: str, entry: zipfile.ZipInfo, data: bytes) -> Path:
    archive_path = tmp_path / name
    with zipfile.ZipFile(archive_path, "w") as archive:
        for file in export_root.rglob("*"):
            if file.is_file():
                archive.write(file, file.relative_to(export_root.parent).as_posix())
        archive.writestr(entry, data)
    return archive_path


@pytest.mark.parametrize("bad_name", ["../evil.txt", "/etc/evil.txt", "export/../../evil.txt", "C:/evil.txt"])
def test_zip_entries_outside_the_root_are_refused(export_root: Path, tmp_path: Path, bad_name: str) -> None:
    archive = _zip_with(tmp_path, export_root, "bad.zip", zipfile.ZipInfo(bad_name), b"x")
    _one_line_error(archive, "points outside the archive root")
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_entries_are_refused(export_root: Path, tmp_path: Path) -> None:
    link = zipfile.ZipInfo("export/images/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = _zip_with(tmp_path, export_root, "link.zip", link, b"/etc/passwd")
    _one_line_error(archive, "is a symlink")


def test_not_a_zip(tmp_path: Path) -> None:
    fake = tmp_path / "export.zip"
    fake.write_bytes(b"PK\x03\x04 certainly not a zip")
    _one_line_error(fake, "not a readable zip")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    _one_line_error(other, "not an export")


def test_query_and_head_out_of_range(export_root: Path) -> None:
    export = open_export(export_root)
    with pytest.raises(FormatError, match="query index 20 out of range"):
        export.query_maps("layer_01", 20)
    with pytest.raises(FormatError, match="head index 4 out of range"):
        export.query_maps("layer_01", 0, head=4)
    with pytest.raises(FormatError, match="no layer 'layer_09'"):
        export.layer_meta("layer_09")


# ---- writer checks ------------------------------------------------------------------------------------


def test_writer_refuses_inconsistent_input(tmp_path: Path) -> None:
    writer = ExportWriter(tmp_path / "export")
    meta = {"layer_index": 1, "block_index": 0, "H_p": 4, "W_p": 5, "stride_h": 1, "stride_w": 1}
    heatmaps = np.zeros((20, 3, 4, 5), np.uint8)
    special = np.zeros((20, 3, 5), np.float16)
    with pytest.raises(FormatError, match="call write_frames before write_layer"):
        writer.write_layer("layer_01", heatmaps, special, meta | {"layer_vmax99": 0.1})
    with pytest.raises(FormatError, match="frames must be uint8"):
        writer.write_frames(np.zeros((3, 56, 70, 3), np.float32), ["a", "b", "c"])
    with pytest.raises(FormatError, match="3 frames but 2 source names"):
        writer.write_frames(np.zeros((3, 56, 70, 3), np.uint8), ["a", "b"])
    writer.write_frames(np.zeros((3, 56, 70, 3), np.uint8), ["a", "b", "c"])
    with pytest.raises(FormatError, match="write at least one layer"):
        writer.write_manifest({})
    with pytest.raises(FormatError, match="layer_vmax99 must be a positive number"):
        writer.write_layer("layer_01", heatmaps, special, meta)
    with pytest.raises(FormatError, match="heatmaps has shape"):
        writer.write_layer("layer_01", heatmaps[:, :, :3], special, meta | {"layer_vmax99": 0.1})
    with pytest.raises(FormatError, match="must be uint8 or float16"):
        writer.write_layer("layer_01", heatmaps.astype(np.float32), special, meta | {"layer_vmax99": 0.1})
    with pytest.raises(FormatError, match="special_mass has dtype float32"):
        writer.write_layer("layer_01", heatmaps, special.astype(np.float32), meta | {"layer_vmax99": 0.1})
    with pytest.raises(FormatError, match="lacks block_index"):
        writer.write_layer(
            "layer_01", heatmaps, special, {k: v for k, v in meta.items() if k != "block_index"}
        )
    with pytest.raises(FormatError, match="metadata says Q=21 but the arrays give 20"):
        writer.write_layer("layer_01", heatmaps, special, meta | {"layer_vmax99": 0.1, "Q": 21})
    with pytest.raises(FormatError, match="bad layer name"):
        writer.write_layer("../layer", heatmaps, special, meta | {"layer_vmax99": 0.1})
    with pytest.raises(FormatError, match="strides must be at least 1"):
        writer.write_layer("layer_01", heatmaps, special, meta | {"stride_h": 0})
    writer.write_layer("layer_01", heatmaps, special, meta | {"layer_vmax99": 0.1, "num_heads": 16})
    # What the caller does not say, the writer fills in: the folder's name, unknown weights, defaults.
    manifest = json.loads(writer.write_manifest({"preprocess_mode": "crop"}).read_text())
    assert manifest["image_set_name"] == "export" and manifest["first_image_idx"] == 0
    assert manifest["model"] == UNKNOWN_MODEL and manifest["model"]["random_weights"] is False
    assert manifest["blocks"] == ["global"] and manifest["rollout"] is None
    assert not list((tmp_path / "export").rglob("*.tmp"))


def test_quantization_round_trip() -> None:
    values = np.linspace(0.0, 0.02, 1001, dtype=np.float32)
    vmax = percentile99(values)
    codes = quantize_uint8(values, vmax)
    assert codes.dtype == np.uint8 and codes.max() == 255 and codes.min() == 0
    back = dequantize_uint8(codes, vmax)
    assert np.all(np.abs(back - np.minimum(values, vmax)) <= vmax / 510 * 1.001)


def _gapped(values: np.ndarray, gap: int) -> np.ndarray:
    """``values`` as a strided view that skips ``gap`` filler entries before each last-axis row, as
    the capture's maps skip the special tokens' mass."""
    store = np.full((*values.shape[:-1], gap + values.shape[-1]), 7.0, dtype=values.dtype)
    store[..., gap:] = values
    return store[..., gap:]


@pytest.mark.parametrize("layout", ["contiguous", "gapped", "transposed"])
@pytest.mark.parametrize("sample", ["fair", "misleading"])
def test_percentile99_is_exact_for_any_strides(layout: str, sample: str) -> None:
    """Large enough for the sampled threshold; a misleading sample (the strided positions it reads
    hold the largest values) lands the threshold too high and must fall back to a full selection."""
    rng = np.random.default_rng(11)
    values = (rng.standard_exponential((70, 6, 3, 500), dtype=np.float32) ** 3).round(2)  # ties
    if sample == "misleading":
        values.reshape(-1)[:: values.size // 65536] += 1000.0
    view = {
        "contiguous": values,
        "gapped": _gapped(values, 5),
        "transposed": np.ascontiguousarray(values.swapaxes(0, 1)).swapaxes(0, 1),
    }[layout]
    assert np.array_equal(view, values) and view.flags.c_contiguous == (layout == "contiguous")
    expected = np.percentile(values.astype(np.float64), 99)
    assert percentile99(view) == pytest.approx(expected, rel=1e-6)
    head = np.percentile(values[:, 2].astype(np.float64), 99)
    assert percentile99(view[:, 2]) == pytest.approx(head, rel=1e-6)


def test_layer_codes_encoded_on_several_threads_equal_the_rule(tmp_path: Path) -> None:
    """Codes encoded a block at a time on several threads (the exporter's way), written to an NPZ, read
    back with np.load and zipfile's CRC check, equal to the rule computed in float64."""
    rng = np.random.default_rng(3)
    maps = rng.random((301, 4, 3, 37, 37), dtype=np.float32) ** 6  # 5 MB of codes: 5 tasks
    head_vmax = np.asarray([percentile99(maps[:, h]) for h in range(4)], np.float32)[:, None, None, None]
    codes = EncodedMaps(maps, "uint8", head_vmax)
    path = tmp_path / "codes.npz"
    with StoredNpzWriter(path) as npz:
        npz.add("codes", codes.encode_into(np.empty(codes.shape, codes.dtype)))
        npz.add("raw", np.asarray(EncodedMaps(maps[:7], "float16")))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    with np.load(path) as loaded:
        stored, raw = loaded["codes"], loaded["raw"]
    expected = np.rint(np.clip(maps.astype(np.float64) / head_vmax * 255, 0, 255))
    assert stored.dtype == np.uint8 and stored.shape == maps.shape
    assert np.abs(stored - expected).max() <= 1 and np.mean(stored == expected) > 0.999
    assert np.array_equal(raw, maps[:7].astype(np.float16))


def _write_large_members(path: Path, direct_io: bool) -> None:
    rng = np.random.default_rng(5)
    maps = rng.random((300, 4, 3, 37, 37), dtype=np.float32)  # 4.9 MB of codes
    raw = rng.integers(0, 256, (20 << 20) + 8, dtype=np.uint8)  # two and a half direct-write buffers
    aligned = np.frombuffer(mmap.mmap(-1, raw.size), np.uint8)  # page-aligned memory: written as it is
    aligned[:] = raw
    with StoredNpzWriter(path, direct_io=direct_io) as npz:
        npz.add("small", np.arange(5, dtype=np.float16))
        npz.add("codes", quantize_uint8(maps, 0.5))
        npz.add("raw", raw[1:])
        npz.add("aligned", aligned.view(np.uint16))
        npz.add("tail", np.arange(3, dtype=np.uint8))


@pytest.mark.parametrize("refused", [None, "at open", "at the second write"])
def test_large_members_page_aligned_and_the_same_written_directly_or_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str | None
) -> None:
    """Members of 4 MB or more start on a 4096-byte boundary. Written with direct I/O (where the file
    system takes it; also when it refuses it at open or midway) the file is byte for byte the one
    written through the page cache, and it reads back."""
    if refused and not hasattr(os, "O_DIRECT"):
        pytest.skip("no direct I/O on this platform")
    direct_flag = getattr(os, "O_DIRECT", 0)
    fcntl = pytest.importorskip("fcntl") if direct_flag else None
    _write_large_members(tmp_path / "cached.npz", direct_io=False)
    direct_opens, direct_writes = [], []
    real_open, real_pwrite = os.open, os.pwrite

    def spying_open(path, flags, *args, **kwargs):
        if flags & direct_flag:
            direct_opens.append(path)
            if refused == "at open":
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    def spying_pwrite(fd: int, data, offset: int) -> int:
        if direct_flag and fcntl.fcntl(fd, fcntl.F_GETFL) & direct_flag:
            direct_writes.append(offset)
            if refused == "at the second write" and len(direct_writes) == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", spying_open)
    monkeypatch.setattr(os, "pwrite", spying_pwrite)
    path = tmp_path / "direct.npz"
    _write_large_members(path, direct_io=True)
    monkeypatch.undo()
    if direct_flag:
        assert len(direct_opens) == 3  # the codes and the raw bytes; the small members go the usual way
    assert path.read_bytes() == (tmp_path / "cached.npz").read_bytes()
    members = scan_npz(path, "direct.npz")
    assert all(members[key].data_offset % 4096 == 0 for key in ("codes", "raw", "aligned"))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    with np.load(path) as loaded:
        assert loaded["raw"].size == (20 << 20) + 7 and np.array_equal(loaded["tail"], np.arange(3))
        assert np.array_equal(loaded["aligned"].view(np.uint8)[1:], loaded["raw"])
        assert np.array_equal(loaded["codes"], load_member(path, members["codes"], "direct.npz"))


def test_failing_write_leaves_no_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failing after a member is on disk: the error comes through, no layer is left."""
    real_add = StoredNpzWriter.add

    def add(self, key: str, data: np.ndarray) -> None:
        if key != HEATMAPS_KEY:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(self, key, data)

    monkeypatch.setattr(StoredNpzWriter, "add", add)
    writer = ExportWriter(tmp_path / "export")
    writer.write_frames(synthetic_frames(2, 28 * 14, 28 * 14), ["a.png", "b.png"])
    codes = np.full((28 * 28, 4, 2, 28, 28), 7, np.uint8)  # 25 MB
    meta = {"layer_index": 1, "block_index": 0, "H_p": 28, "W_p": 28, "stride_h": 1, "stride_w": 1}
    meta |= {"layer_vmax99": 0.1, "per_head_vmax99": [0.1] * 4, "num_heads": 4, "patch_size": 14}
    special = np.zeros((28 * 28, 4, 2, 5), np.float16)
    with pytest.raises(OSError, match="No space left"):
        writer.write_layer("layer_01", codes, special, meta)
    assert not [p for p in (tmp_path / "export/attn_maps").rglob("*") if p.is_file()]


def test_schema_document_names_every_field(tmp_path: Path) -> None:
    """attn_maps_schema.md is the contract: it must mention every field the writer writes."""
    schema = (REPO / "attn_maps_schema.md").read_text()
    root = write_synthetic_export(tmp_path / "export", per_head=True)
    manifest = json.loads((root / "attn_maps/layers_manifest.json").read_text())
    meta = json.loads((root / "attn_maps/layer_01_metadata.json").read_text())
    fields = (
        set(manifest) | set(meta) | set(manifest["grid"]) | set(manifest["model"]) | set(manifest["tool"])
    )
    fields |= set(manifest["frames"][0]) | set(manifest["layers"][0])
    missing = sorted(field for field in fields if f"`{field}`" not in schema)
    assert not missing, f"attn_maps_schema.md does not document {missing}"


def test_schema_numpy_snippet_reads_one_query(tmp_path: Path) -> None:
    """The numpy-only snippet of attn_maps_schema.md runs and gives the reader's dequantized maps."""
    schema = (REPO / "attn_maps_schema.md").read_text()
    snippet = schema.split("## Reading with numpy alone", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    for per_head in (False, True):
        root = write_synthetic_export(tmp_path / f"export_{per_head}", H_p=12, W_p=22, per_head=per_head)
        namespace: dict = {}
        exec(snippet.replace("attn_first2all_kitchen", str(root)), namespace)
        expected = open_export(root).query_maps("layer_02", 10 * 22 + 20)
        np.testing.assert_allclose(namespace["maps"], expected, rtol=1e-6)
        assert namespace["share_to_frame"].shape == expected.shape[:-2]


@pytest.mark.parametrize("bad_value", ["x", -1, 0, None, [], {}, 1.5, True, "../../etc/passwd"])
def test_any_corrupt_metadata_field_gives_format_error(tmp_path: Path, bad_value: object) -> None:
    """Whatever one metadata field is replaced by, reading fails with FormatError or still works."""
    root = write_synthetic_export(tmp_path / "export", per_head=True, num_layers=1)
    metadata = root / "attn_maps/layer_01_metadata.json"
    original = json.loads(metadata.read_text())
    for key in original:
        metadata.write_text(json.dumps(original | {key: bad_value}))
        try:
            export = open_export(root)
            export.validate()
            export.query_maps("layer_01", 0)
            export.key_maps("layer_01", 0, 0, 0)
            export.frames()
        except FormatError as error:
            assert "\n" not in str(error)


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_damaged_npz_bytes_give_format_error(tmp_path: Path, compress: bool) -> None:
    """Flipping any byte of the zip structure or .npy headers never escapes as another exception."""
    root = write_synthetic_export(tmp_path / "export", per_head=True, num_layers=1, compress=compress)
    npz = root / "attn_maps/layer_01/heatmaps_uint8.npz"
    original = npz.read_bytes()
    rng = np.random.default_rng(0)
    offsets = [
        *range(0, 160),
        *range(len(original) - 160, len(original)),
        *rng.integers(0, len(original), 60),
    ]
    failures = 0
    for offset in offsets:
        damaged = bytearray(original)
        damaged[offset] ^= 0xFF
        npz.write_bytes(bytes(damaged))
        try:
            export = open_export(root)
            export.validate()
            export.query_maps("layer_01", 0)
            export.special_mass("layer_01")
        except FormatError as error:
            assert "\n" not in str(error)
            failures += 1
    assert failures > 0
