"""``--geometry``: the heads run on the export's own pass, the export holds what the schema says, the reader
returns it, and the attention maps do not change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vggt.attn_format import open_export
from vggt.attn_format.geometry import ARRAY_SPECS
from vggt.attn_format.grid import cell_centres
from vggt.export import ExportError, ExportOptions, export_attention
from vggt.export_cli import main
from vggt.geometry.correspondence import predicted_correspondences, true_correspondences
from vggt.geometry.pose_encoding import pose_encoding_to_extri_intri
from vggt.models.vggt import VGGT
from vggt.preprocess import list_images

from .conftest import EXAMPLE_IMAGES, FIXTURES

SOURCES = ["a.png", "b.png", "c.png"]


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """The tiny heads reference's 3 input frames, ``[3, 3, 56, 70]``."""
    return load_file(FIXTURES / "tiny_vggt_heads_reference.safetensors")["input.images"][0]


OPTIONS = {"stride_w": 2, "per_head": True, "blocks": ("global", "frame"), "layers": (1, 3)}


@pytest.fixture(scope="module")
def heads_model(tiny_heads_config, tiny_heads_state_dict) -> VGGT:
    model = VGGT(config=tiny_heads_config).eval()
    model.load_state_dict(tiny_heads_state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory, heads_model, frames) -> tuple[Path, Path]:
    """The same export of the tiny full VGGT without and with ``geometry``."""
    root = tmp_path_factory.mktemp("exports")
    kwargs = {"sources": SOURCES, "progress": False}
    plain = export_attention(heads_model, frames, root / "plain", options=ExportOptions(**OPTIONS), **kwargs)
    geometry = export_attention(heads_model, frames, root / "geometry",
                                options=ExportOptions(**OPTIONS, geometry=True), **kwargs)  # fmt: skip
    return plain, geometry


def test_attention_maps_do_not_change_with_geometry(exports):
    plain, with_geometry = exports
    a, b = open_export(plain), open_export(with_geometry)
    assert a.layer_names == b.layer_names and len(a.layer_names) == 4
    for name in a.layer_names:
        meta_a, meta_b = dict(a.layer_meta(name)), dict(b.layer_meta(name))
        assert meta_a == meta_b
        for member in ("heatmaps", "special_mass", "token_heatmaps", "token_special_mass"):
            npz = f"{name}/{Path(meta_a['npz_path']).name}"
            with np.load(plain / "attn_maps" / npz) as x, np.load(with_geometry / "attn_maps" / npz) as y:
                np.testing.assert_array_equal(x[member], y[member])
    assert a.geometry() is None and b.geometry() is not None


def test_geometry_is_what_the_model_predicts_for_the_query_points(exports, heads_model, frames):
    export = open_export(exports[1])
    geometry = export.geometry()
    height, width = export.image_size
    points = cell_centres(height // 14, width // 14, 1, 2)
    np.testing.assert_array_equal(geometry.query_points, points)
    assert geometry.sources == ("track", "depth")  # no scene given

    with torch.no_grad():  # the same model's plain forward pass with the query points
        expected = heads_model(frames, torch.from_numpy(points))
    extrinsic, intrinsic = pose_encoding_to_extri_intri(expected["pose_enc"], (height, width))
    np.testing.assert_allclose(geometry.extrinsic, extrinsic[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(geometry.intrinsic, intrinsic[0], rtol=1e-5)
    for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
        stored = getattr(geometry, key)
        value = expected[key][0, ..., 0] if key == "depth" else expected[key][0]
        assert stored.dtype == np.float16 and stored.shape == value.shape
        np.testing.assert_array_equal(stored, value.numpy().astype(np.float16))
    track_xy, track_visible = geometry.correspondence("track")
    visibility, confidence = geometry.track_scores()
    np.testing.assert_allclose(track_xy, expected["track"][0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(visibility, expected["vis"][0], atol=1e-6)
    np.testing.assert_allclose(confidence, expected["conf"][0], atol=1e-6)
    inside = (track_xy[..., 0] >= -0.5) & (track_xy[..., 0] < width - 0.5)
    inside &= (track_xy[..., 1] >= -0.5) & (track_xy[..., 1] < height - 0.5)
    np.testing.assert_array_equal(track_visible, (visibility >= 0.5) & inside)
    depth_xy, depth_visible = geometry.correspondence("depth")
    want_xy, want_visible = predicted_correspondences(
        points, expected["depth"][0, ..., 0].numpy(), extrinsic[0].numpy(), intrinsic[0].numpy()
    )
    np.testing.assert_allclose(depth_xy, want_xy, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(depth_visible, want_visible)
    meta = geometry.meta
    assert meta["depth_occlusion_rel_tol"] == 0.05 and meta["scene"] is None


def test_geometry_needs_the_heads_and_a_scene_needs_geometry(tmp_path, tiny_model, heads_model, frames):
    with pytest.raises(ExportError, match="needs the model's heads"):
        export_attention(tiny_model, frames, tmp_path / "a", sources=SOURCES,
                         options=ExportOptions(geometry=True), progress=False)  # fmt: skip
    with pytest.raises(ExportError, match="only with geometry"):
        export_attention(heads_model, frames, tmp_path / "b", sources=SOURCES,
                         scene=EXAMPLE_IMAGES.parent, progress=False)  # fmt: skip
    assert not any(tmp_path.iterdir())


@pytest.fixture()
def heads_cli(tmp_path, tiny_heads_config, tiny_heads_state_dict):
    """``heads_cli(*args)``: the exporter's CLI with the tiny full VGGT saved as a checkpoint."""
    checkpoint = tmp_path / "tiny_heads.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_heads_state_dict.items()}, checkpoint)
    config = tmp_path / "tiny_heads_config.json"
    config.write_text(json.dumps(tiny_heads_config.to_dict()))

    def run(*args: str) -> int:
        return main(["--checkpoint", str(checkpoint), "--model_config", str(config), *args])

    return run


def test_cli_geometry_on_the_bundled_scene_stores_the_truth(tmp_path, heads_cli, capsys):
    mode = "pad"  # the frames are padded: true positions move by the padding
    out = tmp_path / "room"
    code = heads_cli("--num_images", "3", "--first_image_idx", "1", "--stride", "4", "--preprocess", mode,
                     "--geometry", "--output_dir", str(out))  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "geometry: camera, depth, point and track heads" in printed
    assert "true positions from scene" in printed and "of the forward's time" in printed
    export = open_export(out)
    geometry = export.geometry()
    assert geometry.sources == ("truth", "track", "depth")
    sources = [frame["source"] for frame in export.manifest["frames"]]
    assert sources == ["view_04.png", "view_00.png", "view_07.png"]  # 3 of 8, evenly spaced; frame 0 moved
    xy, visible = true_correspondences(
        EXAMPLE_IMAGES.parent, sources, mode, export.image_size, export.manifest["grid"]
    )
    stored_xy, stored_visible = geometry.correspondence("truth")
    np.testing.assert_array_equal(stored_xy, xy)
    np.testing.assert_array_equal(stored_visible, visible)
    assert visible[1:].any() and geometry.meta["scene"] == "synthetic_room"
    # the files as the schema describes them, read with numpy alone
    meta = json.loads((out / "geometry" / "geometry_metadata.json").read_text())
    assert json.loads((out / "attn_maps" / "layers_manifest.json").read_text())["geometry"] == {
        "metadata_path": "../geometry/geometry_metadata.json"
    }
    height, width = export.image_size
    assert meta["npz_path"] == "../geometry/geometry.npz" and meta["sources"] == ["truth", "track", "depth"]
    assert (meta["S"], meta["H"], meta["W"], meta["Q"]) == (3, height, width, len(geometry.query_points))
    assert meta["truth_occlusion_rel_tol"] == 0.02 and meta["depth_occlusion_rel_tol"] == 0.05
    with np.load(out / "geometry" / "geometry.npz", allow_pickle=False) as npz:
        assert set(npz.files) == set(ARRAY_SPECS)
        for key, (dtype, _) in ARRAY_SPECS.items():
            assert npz[key].dtype == np.dtype(dtype), key
        assert npz["world_points"].shape == (3, height, width, 3)


def test_cli_scene_flags(tmp_path, heads_cli, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    for path in list_images(EXAMPLE_IMAGES)[:2]:
        shutil.copy(path, images / path.name)
    args = ("--image_dir", str(images), "--quiet")
    assert heads_cli(*args, "--scene", str(EXAMPLE_IMAGES.parent), "--output_dir", str(tmp_path / "a")) == 2
    assert "use it with --geometry" in capsys.readouterr().err
    assert heads_cli(*args, "--geometry", "--scene", str(images), "--output_dir", str(tmp_path / "b")) == 2
    assert "is not a scene folder" in capsys.readouterr().err
    renamed = tmp_path / "renamed"
    images.rename(renamed)
    (renamed / "view_00.png").rename(renamed / "kitchen.png")
    args = ("--image_dir", str(renamed), "--quiet", "--geometry", "--scene", str(EXAMPLE_IMAGES.parent))
    assert heads_cli(*args, "--output_dir", str(tmp_path / "c")) == 2
    assert "'kitchen.png' is not one of its views" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["renamed"]
