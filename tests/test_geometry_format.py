"""The geometry part of the format: what the writer writes is what the reader returns, and a damaged or
hostile geometry part is a one-line FormatError."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vggt.attn_format import ExportWriter, FormatError, open_export
from vggt.attn_format.geometry import ARRAY_SPECS, SOURCE_KEYS
from vggt.attn_format.grid import cell_centres
from vggt.testing.synthetic import synthetic_frames, synthetic_geometry, write_synthetic_export

GRID = {"H_p": 4, "W_p": 5, "stride_h": 2, "stride_w": 2}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("geometry") / "export"
    return write_synthetic_export(root, num_frames=3, **GRID, geometry=True)


def _copy(export_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export_dir, tmp_path / "copy"))


def _rewrite_npz(export: Path, change) -> None:
    """Rewrite geometry.npz with ``change(arrays)`` applied to its members."""
    path = export / "geometry" / "geometry.npz"
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    change(arrays)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_reader_returns_what_the_writer_wrote(export_dir: Path):
    expected = synthetic_geometry(3, GRID["H_p"], GRID["W_p"], GRID["stride_h"], GRID["stride_w"])
    export = open_export(export_dir)
    geometry = export.geometry()
    assert geometry is not None and geometry is export.geometry()  # opened once
    assert geometry.sources == ("truth", "track", "depth")
    assert (geometry.num_frames, geometry.image_size, geometry.num_queries) == (3, (56, 70), 6)
    np.testing.assert_array_equal(geometry.query_points, cell_centres(4, 5, 2, 2))
    for source in geometry.sources:
        xy, visible = geometry.correspondence(source)
        assert xy.dtype == np.float32 and xy.shape == (3, 6, 2)
        assert visible.dtype == bool and visible.shape == (3, 6)
        np.testing.assert_array_equal(xy, expected[f"{source}_xy"])
        np.testing.assert_array_equal(visible, expected[f"{source}_visible"])
        assert visible.any() and not visible.all()  # points leave the frame as the cameras move
    visibility, confidence = geometry.track_scores()
    np.testing.assert_array_equal(visibility, expected["track_visibility"])
    np.testing.assert_array_equal(confidence, expected["track_confidence"])
    for key in ("extrinsic", "intrinsic", "depth", "depth_conf", "world_points", "world_points_conf"):
        array = getattr(geometry, key)
        dtype, _ = ARRAY_SPECS[key]
        assert array.dtype == np.dtype(dtype)
        np.testing.assert_allclose(array, expected[key].astype(dtype))
    assert geometry.depth.shape == (3, 56, 70) and geometry.world_points.shape == (3, 56, 70, 3)
    assert isinstance(geometry.depth, np.memmap)  # stored NPZ: read lazily
    assert export.manifest["geometry"] == {"metadata_path": "../geometry/geometry_metadata.json"}


def test_export_without_geometry_says_none(tmp_path: Path):
    export = open_export(write_synthetic_export(tmp_path / "plain", num_frames=2, H_p=2, W_p=2))
    assert export.geometry() is None
    assert export.manifest["geometry"] is None


def test_compressed_and_zipped_exports_carry_geometry(tmp_path: Path):
    root = write_synthetic_export(
        tmp_path / "packed", num_frames=2, H_p=2, W_p=3, compress=True, geometry=True
    )
    archive = tmp_path / "packed.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in root.rglob("*"):
            handle.write(path, path.relative_to(tmp_path))
    for opened in (open_export(root), open_export(archive)):
        xy, visible = opened.geometry().correspondence("truth")
        assert xy.shape == (2, 6, 2) and visible[0].all()


def test_a_frame_without_a_source_is_refused(export_dir: Path):
    geometry = open_export(export_dir).geometry()
    with pytest.raises(FormatError, match="no 'sight' correspondences"):
        geometry.correspondence("sight")


def test_sources_may_be_missing(tmp_path: Path):
    writer = ExportWriter(tmp_path / "e")
    writer.write_frames(synthetic_frames(2, 28, 28), ["a.png", "b.png"])
    arrays = synthetic_geometry(2, 2, 2, 1, 1)
    for key in SOURCE_KEYS["truth"] + SOURCE_KEYS["track"]:
        del arrays[key]
    writer.write_geometry(arrays, {})
    heat = np.zeros((4, 2, 2, 2), np.float16)
    meta = {"layer_index": 1, "block_index": 0, "H_p": 2, "W_p": 2, "stride_h": 1, "stride_w": 1}
    writer.write_layer("layer_01", heat, np.zeros((4, 2, 5), np.float16), meta)
    manifest = {"image_set_name": "x", "model": {}, "preprocess_mode": "crop", "first_image_idx": 0}
    writer.write_manifest(manifest)
    geometry = open_export(tmp_path / "e").geometry()
    assert geometry.sources == ("depth",)
    with pytest.raises(FormatError, match="no track head"):
        geometry.track_scores()


def test_writer_refuses_incomplete_or_misshapen_geometry(tmp_path: Path):
    writer = ExportWriter(tmp_path / "e")
    with pytest.raises(FormatError, match="write_frames"):
        writer.write_geometry(synthetic_geometry(2, 2, 2, 1, 1), {})
    writer.write_frames(synthetic_frames(2, 28, 28), ["a.png", "b.png"])
    arrays = synthetic_geometry(2, 2, 2, 1, 1)
    with pytest.raises(FormatError, match="missing arrays"):
        writer.write_geometry({k: v for k, v in arrays.items() if k != "depth_conf"}, {})
    with pytest.raises(FormatError, match="track correspondences lack"):
        writer.write_geometry({k: v for k, v in arrays.items() if k != "track_confidence"}, {})
    with pytest.raises(FormatError, match="truth_xy has shape"):
        writer.write_geometry(arrays | {"truth_xy": arrays["truth_xy"][:, :3]}, {})
    with pytest.raises(FormatError, match="frames are"):
        writer.write_geometry(synthetic_geometry(3, 2, 2, 1, 1), {})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(depth=a["depth"][:, :-1]), "depth has shape"),
        (lambda a: a.update(truth_xy=a["truth_xy"].astype(np.float64)), "truth_xy has dtype float64"),
        (lambda a: a.update(query_points=a["query_points"][:-1]), "query_points has shape"),
        (lambda a: a.pop("track_visible"), "lacks track_visible"),
        (
            lambda a: a.update(extrinsic=np.array([None] * 36, dtype=object).reshape(3, 3, 4)),
            "Python objects",
        ),
    ],
)
def test_damaged_arrays_are_a_format_error(export_dir, tmp_path, change, message):
    copy = _copy(export_dir, tmp_path)
    _rewrite_npz(copy, change)
    geometry = open_export(copy).geometry()
    with pytest.raises(FormatError, match=message):
        geometry.depth  # noqa: B018 - the first read checks every member


def test_truncated_npz_is_a_format_error(export_dir, tmp_path):
    copy = _copy(export_dir, tmp_path)
    path = copy / "geometry" / "geometry.npz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(FormatError):
        open_export(copy).geometry().correspondence("truth")


@pytest.mark.parametrize(
    "where, change, message",
    [
        ("meta", lambda m: m.update(S=4), "says S=4, the export has 3"),
        ("meta", lambda m: m.update(Q="9"), "field Q must be a positive integer"),
        ("meta", lambda m: m.update(sources=["truth", "guess"]), "sources must list"),
        ("meta", lambda m: m.update(npz_path="../../../etc/passwd"), "outside the export"),
        ("meta", lambda m: m.pop("npz_path"), "lacks npz_path"),
        ("manifest", lambda m: m.update(geometry="geometry"), "must be an object"),
        ("manifest", lambda m: m.update(geometry={"metadata_path": "/etc/hosts"}), "outside the export"),
    ],
)
def test_hostile_metadata_is_a_format_error(export_dir, tmp_path, where, change, message):
    copy = _copy(export_dir, tmp_path)
    target = (
        copy / "geometry" / "geometry_metadata.json"
        if where == "meta"
        else copy / "attn_maps" / "layers_manifest.json"
    )
    _edit_json(target, change)
    with pytest.raises(FormatError, match=message):
        open_export(copy).geometry().depth  # noqa: B018 - the NPZ's path is followed on first read


def test_visible_never_where_the_position_is_unknown_or_outside(export_dir, tmp_path):
    copy = _copy(export_dir, tmp_path)

    def lie(arrays):
        arrays["truth_visible"][:] = True
        arrays["truth_xy"][1, 0] = np.nan
        arrays["truth_xy"][1, 1] = [1e9, 5.0]

    _rewrite_npz(copy, lie)
    xy, visible = open_export(copy).geometry().correspondence("truth")
    assert not visible[1, 0] and not visible[1, 1] and visible[1, 3]
