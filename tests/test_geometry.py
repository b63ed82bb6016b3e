"""Geometry: where original pixels land in the model's frames, and the true correspondences of a scene's
query cells."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt.geometry.correspondence import (
    OCCLUSION_REL_TOL,
    SceneError,
    predicted_correspondences,
    query_points,
    scene_of_image_dir,
    true_correspondences,
)
from vggt.geometry.placement import place_frame, place_frames
from vggt.geometry.scene import load_scene, project_pixel
from vggt.preprocess import load_and_preprocess_images, to_uint8_frames

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "synthetic_room"


def _grid(H_p: int, W_p: int, stride_h: int = 1, stride_w: int = 1) -> dict:
    return {"H_p": H_p, "W_p": W_p, "stride_h": stride_h, "stride_w": stride_w, "patch_size": 14}


# ---- placement ----------------------------------------------------------------------------------------


def _ramp(path: Path, width: int, height: int) -> None:
    """An image whose red channel is 7 * column and green channel 4 * row (so positions can be read
    back from the pixels after resizing: bicubic resampling reproduces a linear ramp)."""
    assert width <= 37 and height <= 64
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([7 * x, 4 * y, np.zeros_like(x)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


@pytest.mark.parametrize(
    "mode, sizes",
    [
        ("crop", [(37, 60)]),  # tall: resized to 518 x 840, 161 rows cut from the top
        ("pad", [(28, 37)]),  # portrait: resized to 392 x 518, padded left and right
        ("crop", [(37, 14), (37, 36)]),  # a batch of two heights: the lower frame is padded, centred
        ("pad", [(36, 20), (20, 36)]),
    ],
)
def test_placement_maps_original_pixels_to_where_the_preprocessing_puts_them(tmp_path, mode, sizes):
    paths = []
    for index, (width, height) in enumerate(sizes):
        paths.append(tmp_path / f"ramp_{index}.png")
        _ramp(paths[-1], width, height)
    frames = to_uint8_frames(load_and_preprocess_images(paths, mode=mode)).astype(np.float64)
    placements = place_frames(sizes, mode)
    for frame, placement, (width, height) in zip(frames, placements, sizes, strict=True):
        assert (placement.frame_height, placement.frame_width) == frame.shape[:2]
        y, x = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]]
        source_x, source_y = placement.to_source(x, y)
        # away from the image's border (where bicubic resampling clamps), a pixel holds its position
        interior = (source_x > 1.5) & (source_x < width - 2.5) & (source_y > 1.5) & (source_y < height - 2.5)
        assert interior.sum() > 1000
        assert np.abs(frame[..., 0] - 7 * source_x)[interior].max() <= 0.51
        assert np.abs(frame[..., 1] - 4 * source_y)[interior].max() <= 0.51
        # what is not image content is white padding, and only that
        content = placement.shows(x, y)
        assert np.all(frame[~content] == 255)
        assert not np.all(frame[content] == 255, axis=-1).any()
        back_x, back_y = placement.to_frame(source_x, source_y)
        np.testing.assert_allclose(back_x, x, atol=1e-9)
        np.testing.assert_allclose(back_y, y, atol=1e-9)


def test_place_frame_in_a_batch_equals_the_batch_placement():
    sizes = [(640, 480), (300, 500), (1000, 250)]
    for mode in ("crop", "pad"):
        batch = place_frames(sizes, mode)
        frame_size = (batch[0].frame_height, batch[0].frame_width)
        assert [place_frame(w, h, mode, frame_size) for w, h in sizes] == batch
    with pytest.raises(ValueError, match="larger than the batch"):
        place_frame(640, 480, "crop", (300, 518))
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        place_frames([(10, 10)], "stretch")


# ---- true correspondences -------------------------------------------------------------------------------


def _expected(scene: Path, sources, frame_size, grid, to_source, to_frame, on_content):
    """project_pixel on the original images, mapped through the preprocessing written out by hand."""
    cameras, depth = load_scene(scene)
    views = [int(name[5:7]) for name in sources]
    centres = query_points(grid).astype(np.float64)
    u, v = to_source(centres[:, 0], centres[:, 1])
    xy, visible = [], []
    for view in views:
        u2, v2, seen = project_pixel(u, v, views[0], view, cameras, depth)
        if view == views[0]:
            seen = np.isfinite(u2)  # a frame sees its own points (no occlusion test against itself)
        x, y = to_frame(u2, v2)
        xy.append(np.stack([x, y], axis=-1))
        inside = (x >= -0.5) & (x < frame_size[1] - 0.5) & (y >= -0.5) & (y < frame_size[0] - 0.5)
        visible.append(seen & on_content(x, y) & inside & on_content(centres[:, 0], centres[:, 1]))
    return np.stack(xy), np.stack(visible)


def _check(scene, sources, mode, frame_size, grid, expected):
    xy, visible = true_correspondences(scene, sources, mode, frame_size, grid)
    exp_xy, exp_visible = expected
    assert xy.dtype == np.float32 and xy.shape == (len(sources), len(query_points(grid)), 2)
    assert visible.dtype == bool and visible.shape == xy.shape[:2]
    np.testing.assert_array_equal(visible, exp_visible)
    np.testing.assert_allclose(xy[visible], exp_xy[visible], atol=1e-3)
    assert visible[0].any() and visible[1:].any() and not visible[1:].all()
    return xy, visible


def test_true_correspondences_after_crop_and_pad_equal_project_pixel():
    sources = ["view_02.png", "view_00.png", "view_05.png"]
    # 518 x 392 images: crop keeps them as they are (16 x 37 patches, stride 2)
    grid = _grid(28, 37, 2, 2)
    identity = (lambda x, y: (x, y),) * 2
    _check(SCENE, sources, "crop", (392, 518), grid,
           _expected(SCENE, sources, (392, 518), grid, *identity,
                     lambda x, y: np.ones(np.shape(x), bool)))  # fmt: skip
    # pad: 63 white rows above and below
    grid = _grid(37, 37, 2, 2)

    def on_content(x, y):
        return (y >= 62.5) & (y < 454.5)

    xy, visible = _check(SCENE, sources, "pad", (518, 518), grid,
                         _expected(SCENE, sources, (518, 518), grid, lambda x, y: (x, y - 63),
                                   lambda x, y: (x, y + 63), on_content))  # fmt: skip
    # the cells on frame 0's padding have no scene point
    padding = ~on_content(*query_points(grid).T)
    assert padding.any() and np.isnan(xy[:, padding]).all() and not visible[:, padding].any()


@pytest.fixture(scope="module")
def tall_scene(tmp_path_factory) -> Path:
    """A scene of 64 x 96 portrait images: crop resizes them to 518 x 784 and cuts 133 rows on top."""
    out = tmp_path_factory.mktemp("tall") / "scene"
    script = ROOT / "examples" / "make_synthetic_scene.py"
    args = ["--out", str(out), "--num_views", "3", "--width", "64", "--height", "96", "--supersample", "1"]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    return out


def test_true_correspondences_through_a_crop_that_cuts_rows(tall_scene):
    sources = ["view_00.png", "view_01.png", "view_02.png"]
    grid = _grid(37, 37, 3, 3)
    scale_x, scale_y = 518 / 64, 784 / 96  # the height is rounded to 56 patches: not quite 518 / 64

    def to_source(x, y):
        return (x + 0.5) / scale_x - 0.5, (y + 133 + 0.5) / scale_y - 0.5

    def to_frame(x, y):
        return (x + 0.5) * scale_x - 0.5, (y + 0.5) * scale_y - 0.5 - 133

    expected = _expected(tall_scene, sources, (518, 518), grid, to_source, to_frame,
                         lambda x, y: np.ones(np.shape(x), bool))  # fmt: skip
    _, visible = _check(tall_scene, sources, "crop", (518, 518), grid, expected)
    # some points fall in the rows the crop cut off: inside the original image, outside the frame
    _, _, seen = project_pixel(
        *to_source(*query_points(grid).T.astype(np.float64)), 0, 2, *load_scene(tall_scene)
    )
    assert (seen & ~visible[2]).any()


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_true_correspondences_land_on_the_same_colour_in_the_model_frames(tall_scene, mode):
    paths = [tall_scene / "images" / f"view_{i:02d}.png" for i in range(3)]
    frames = to_uint8_frames(load_and_preprocess_images(paths, mode=mode)).astype(int)
    height, width = frames.shape[1:3]
    grid = _grid(height // 14, width // 14)
    xy, visible = true_correspondences(tall_scene, [p.name for p in paths], mode, (height, width), grid)
    centres = np.rint(query_points(grid)).astype(int)
    for frame in (1, 2):
        seen = visible[frame]
        at = np.rint(xy[frame, seen]).astype(int)
        source = frames[0][centres[seen, 1], centres[seen, 0]]
        diff = np.abs(frames[frame][at[:, 1], at[:, 0]] - source).max(axis=1)
        shuffled = np.abs(frames[frame][at[:, 1], at[:, 0]] - np.roll(source, 97, axis=0)).max(axis=1)
        assert np.median(diff) < 0.4 * np.median(shuffled)


def test_scene_errors_are_one_line(tmp_path):
    grid = _grid(28, 37)
    with pytest.raises(SceneError, match="not a scene folder"):
        true_correspondences(tmp_path, ["a.png"], "crop", (392, 518), grid)
    with pytest.raises(SceneError, match="'kitchen.png' is not one of its views"):
        true_correspondences(SCENE, ["view_00.png", "kitchen.png"], "crop", (392, 518), grid)
    broken = tmp_path / "scene"
    shutil.copytree(SCENE, broken)
    (broken / "cameras.json").write_text("{")
    with pytest.raises(SceneError, match="cannot read cameras.json"):
        true_correspondences(broken, ["view_00.png"], "crop", (392, 518), grid)
    assert scene_of_image_dir(SCENE / "images") == SCENE
    assert scene_of_image_dir(tmp_path) is None


# ---- correspondences by predicted depth and cameras -------------------------------------------------------


def test_predicted_correspondences_with_exact_depth_and_cameras_are_the_truth():
    cameras, depth = load_scene(SCENE)
    views = [2, 0, 5]
    grid = _grid(28, 37, 2, 2)
    points = query_points(grid)
    xy, visible = predicted_correspondences(
        points,
        depth[views],
        np.stack([cameras[v].extrinsic for v in views]),
        np.stack([cameras[v].K for v in views]),
        rel_tol=OCCLUSION_REL_TOL,  # the truth's tolerance: the same depth samples
    )
    truth_xy, truth_visible = true_correspondences(
        SCENE, [f"view_{v:02d}.png" for v in views], "crop", (392, 518), grid
    )
    np.testing.assert_array_equal(xy[0], points)
    located = np.isfinite(truth_xy[..., 0])
    np.testing.assert_array_equal(np.isfinite(xy[..., 0]), located)
    np.testing.assert_allclose(xy[located], truth_xy[located], atol=1e-3)
    # what the truth sees, the prediction sees; it also sees points a little in front of a surface
    assert not (truth_visible & ~visible).any()
    assert (visible == truth_visible).mean() > 0.97


def test_predicted_visibility_fails_only_behind_a_nearer_surface():
    # two cameras 1 m apart looking down z at a plane 4 m away; the query point is the image centre
    K = np.array([[100.0, 0, 49.5], [0, 100.0, 49.5], [0, 0, 1]])
    extrinsic = np.stack(
        [np.hstack([np.eye(3), [[0.0], [0], [0]]]), np.hstack([np.eye(3), [[-1.0], [0], [0]]])]
    )
    points = np.array([[49.5, 49.5]], np.float32)

    def second_frame_sees(depth_there: float) -> bool:
        depth = np.stack([np.full((100, 100), 4.0), np.full((100, 100), depth_there)])
        xy, visible = predicted_correspondences(points, depth, extrinsic, np.stack([K, K]))
        np.testing.assert_allclose(xy[1, 0], [24.5, 49.5])  # 100 px * 1 m / 4 m to the left
        return bool(visible[1, 0])

    assert second_frame_sees(4.0) and second_frame_sees(4.15)  # within 5%
    assert second_frame_sees(9.0)  # the predicted surface lies behind the point: nothing hides it
    assert not second_frame_sees(3.7)  # a surface 7.5% nearer hides it
