"""True cameras and depth in the frames the model saw: a frame pixel sees what its original pixel saw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vggt.geometry.frames import frame_intrinsic, true_frame_geometry
from vggt.geometry.placement import place_frame, place_frames
from vggt.geometry.scene import Camera, load_scene, project, unproject

SCENE = Path(__file__).parents[1] / "examples" / "synthetic_room"
SOURCES = ["view_03.png", "view_00.png", "view_06.png"]


@pytest.mark.parametrize(("size", "mode"), [((1036, 1200), "crop"), ((700, 300), "pad"), ((300, 700), "pad")])
def test_frame_intrinsics_project_where_the_preprocessing_puts_the_original_pixel(size, mode):
    width, height = size
    placement = place_frames([size], mode)[0]
    K = np.array([[500.0, 0.0, 0.45 * width], [0.0, 520.0, 0.55 * height], [0.0, 0.0, 1.0]])
    extrinsic = np.concatenate((np.eye(3), np.array([[0.1], [-0.2], [0.3]])), axis=1)
    points = np.random.default_rng(0).uniform([-1, -1, 2], [1, 1, 5], size=(20, 3))
    u, v, _ = project(points, Camera(K, extrinsic, width, height))
    frame_u, frame_v, _ = project(points, Camera(frame_intrinsic(K, placement), extrinsic, 0, 0))
    expected_u, expected_v = placement.to_frame(u, v)
    np.testing.assert_allclose(frame_u, expected_u, atol=1e-9)
    np.testing.assert_allclose(frame_v, expected_v, atol=1e-9)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_true_depth_of_the_bundled_scene_in_its_frames(mode):
    cameras, depths = load_scene(SCENE)
    width, height = cameras[0].width, cameras[0].height
    placement = place_frames([(width, height)], mode)[0]
    image_size = (placement.frame_height, placement.frame_width)
    truth = true_frame_geometry(SCENE, SOURCES, mode, image_size)
    assert truth.depth.shape == (3, *image_size) and truth.intrinsic.shape == (3, 3, 3)
    views = [int(name[5:7]) for name in SOURCES]
    np.testing.assert_array_equal(truth.extrinsic, np.stack([cameras[i].extrinsic for i in views]))
    if mode == "crop":  # 518 x 392 frames of 518 x 392 images: nothing moves
        np.testing.assert_allclose(truth.intrinsic[0], cameras[views[0]].K, atol=1e-9)
        np.testing.assert_allclose(truth.depth, depths[views], rtol=1e-6)
        return
    # Padded to 518 x 518: the padding has no depth, and every frame pixel on the image unprojects to
    # the scene point its original pixel sees.
    placement = place_frame(width, height, mode, image_size)
    shown = ~np.isnan(truth.depth[0])
    assert shown.sum() == width * height and not shown[: placement.top].any()
    rows, cols = np.nonzero(shown)
    frame_camera = Camera(truth.intrinsic[0], truth.extrinsic[0], *image_size[::-1])
    seen = unproject(cols, rows, truth.depth[0][rows, cols], frame_camera)
    source_x, source_y = placement.to_source(cols, rows)
    original = unproject(source_x, source_y, depths[views[0]][rows - placement.top, cols], cameras[views[0]])
    np.testing.assert_allclose(seen, original, atol=1e-5)
