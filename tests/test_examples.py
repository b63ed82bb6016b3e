"""The bundled synthetic scene: files, reproducibility and geometric consistency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt.geometry.scene import load_scene, project, project_pixel, unproject

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "synthetic_room"
SCRIPT = ROOT / "examples" / "make_synthetic_scene.py"
NUM_VIEWS, WIDTH, HEIGHT = 8, 518, 392


@pytest.fixture(scope="module")
def scene():
    cameras, depth = load_scene(SCENE)
    images = np.stack(
        [np.asarray(Image.open(SCENE / "images" / f"view_{i:02d}.png")) for i in range(NUM_VIEWS)]
    )
    return cameras, depth, images


def _grid(step: int = 3) -> tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:HEIGHT:step, 0:WIDTH:step].astype(np.float64)
    return u, v


def test_bundled_scene_files():
    meta = json.loads((SCENE / "cameras.json").read_text())
    assert (meta["width"], meta["height"], len(meta["views"])) == (WIDTH, HEIGHT, NUM_VIEWS)
    assert (SCENE / "README.md").is_file()
    for i, view in enumerate(meta["views"]):
        assert view["image"] == f"images/view_{i:02d}.png"
        with Image.open(SCENE / view["image"]) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (WIDTH, HEIGHT))
        depth = np.load(SCENE / view["depth"])
        assert depth.dtype == np.float16 and depth.shape == (HEIGHT, WIDTH)
        assert np.all(np.isfinite(depth)) and depth.min() > 0.5
        K, E = np.array(view["K"]), np.array(view["extrinsic"])
        assert K.shape == (3, 3) and E.shape == (3, 4)
        assert K[0, 0] > 0 and K[1, 1] > 0 and K[2].tolist() == [0, 0, 1]
        R = E[:, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-7)
        assert np.linalg.det(R) > 0


def _generate(out: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], check=True, capture_output=True)


def test_script_reproduces_bundled_scene(tmp_path: Path):
    out = tmp_path / "room"
    _generate(out, "--num_views", "8", "--width", str(WIDTH), "--height", str(HEIGHT), "--seed", "0")
    assert json.loads((out / "cameras.json").read_text()) == json.loads((SCENE / "cameras.json").read_text())
    for i in range(NUM_VIEWS):
        name = f"view_{i:02d}"
        new = np.asarray(Image.open(out / "images" / f"{name}.png"))
        old = np.asarray(Image.open(SCENE / "images" / f"{name}.png"))
        np.testing.assert_array_equal(new, old, err_msg=name)
        np.testing.assert_array_equal(
            np.load(out / "depth" / f"{name}.npy"), np.load(SCENE / "depth" / f"{name}.npy")
        )


def test_seed_changes_textures_not_geometry(tmp_path: Path):
    small = ("--num_views", "1", "--width", "64", "--height", "48", "--supersample", "1")
    _generate(tmp_path / "a", *small, "--seed", "1")
    _generate(tmp_path / "b", *small, "--seed", "2")
    a, b = (np.asarray(Image.open(tmp_path / d / "images" / "view_00.png")) for d in "ab")
    assert a.shape == (48, 64, 3) and not np.array_equal(a, b)
    da, db = (np.load(tmp_path / d / "depth" / "view_00.npy") for d in "ab")
    np.testing.assert_array_equal(da, db)


def test_depth_and_poses_agree_with_the_room(scene):
    cameras, depth, _ = scene
    u, v = _grid(5)
    pts = np.concatenate(
        [unproject(u, v, depth[i, ::5, ::5], cam).reshape(-1, 3) for i, cam in enumerate(cameras)]
    )
    # everything seen is inside the 8 x 3 x 8 m room, and the floor and walls are seen
    assert np.all(pts.min(axis=0) > [-4.01, -0.01, -4.01]) and np.all(pts.max(axis=0) < [4.01, 3.01, 4.01])
    assert np.isclose(pts[:, 1].min(), 0.0, atol=0.005)
    assert np.isclose(pts[:, 2].min(), -4.0, atol=0.01)


def test_project_pixel_into_own_view_is_identity(scene):
    cameras, depth, _ = scene
    u, v = _grid()
    u = u + 0.3  # sub-pixel positions too
    for view in (0, 5):
        u2, v2, visible = project_pixel(u, v, view, view, cameras, depth)
        np.testing.assert_allclose(u2, u, atol=1e-4)
        np.testing.assert_allclose(v2, v, atol=1e-4)
        assert visible.all()
    u2, v2, visible = project_pixel(10.0, 20.0, 3, 3, cameras, depth)
    assert np.isclose(u2, 10.0) and np.isclose(v2, 20.0) and bool(visible)


@pytest.mark.parametrize("src, dst", [(0, 1), (2, 3), (4, 5), (6, 7)])
def test_round_trip_between_views(scene, src: int, dst: int):
    cameras, depth, _ = scene
    u, v = _grid()
    u2, v2, vis = project_pixel(u, v, src, dst, cameras, depth)
    ub, vb, vis_back = project_pixel(u2, v2, dst, src, cameras, depth)
    both = vis & vis_back
    assert both.mean() > 0.5
    err = np.hypot(ub - u, vb - v)[both]
    # float16 depth and depth edges cost a few outliers; almost all points come back exactly
    assert np.median(err) < 0.05
    assert np.mean(err < 0.5) > 0.99


def test_scene_point_seen_in_two_views(scene):
    cameras, depth, _ = scene
    u, v = _grid()
    points = unproject(u, v, depth[3, ::3, ::3], cameras[3])
    ua, va, vis_a = project_pixel(u, v, 3, 2, cameras, depth)
    ub, vb, vis_b = project_pixel(u, v, 3, 4, cameras, depth)
    pa, pb = project(points, cameras[2]), project(points, cameras[4])
    np.testing.assert_allclose(ua, pa[0], atol=1e-6)
    np.testing.assert_allclose(vb, pb[1], atol=1e-6)
    # view 2 -> view 4 directly lands where the point projects into view 4
    u24, v24, vis24 = project_pixel(ua, va, 2, 4, cameras, depth)
    ok = vis_a & vis_b & vis24
    assert ok.mean() > 0.5
    assert np.mean(np.hypot(u24 - ub, v24 - vb)[ok] < 0.5) > 0.99


def test_corresponding_pixels_have_the_same_colour(scene):
    cameras, depth, images = scene
    u, v = _grid()
    u2, v2, vis = project_pixel(u, v, 1, 2, cameras, depth)
    src = images[1][v[vis].astype(int), u[vis].astype(int)].astype(int)
    dst = images[2][np.rint(v2[vis]).astype(int), np.rint(u2[vis]).astype(int)].astype(int)
    diff = np.abs(src - dst).max(axis=1)
    shuffled = np.abs(src - np.roll(dst, 997, axis=0)).max(axis=1)
    assert np.median(diff) < 12 and np.median(shuffled) > 4 * np.median(diff)


def test_points_outside_or_hidden_are_not_visible(scene):
    cameras, depth, _ = scene
    u, v = _grid()
    u2, v2, vis = project_pixel(u, v, 0, 7, cameras, depth)
    outside = (u2 < -0.5) | (u2 > WIDTH - 0.5) | (v2 < -0.5) | (v2 > HEIGHT - 0.5) | ~np.isfinite(u2)
    assert outside.any() and not vis[outside].any()
    assert (~vis & ~outside).any()  # some points land inside the image but are occluded there


def test_bundled_images_pass_through_preprocessing_unchanged(scene):
    from vggt.preprocess import list_images, load_and_preprocess_images, to_uint8_frames

    _, _, images = scene
    paths = list_images(SCENE / "images")
    assert [p.name for p in paths] == [f"view_{i:02d}.png" for i in range(NUM_VIEWS)]
    # 518 x 392 is already a crop-mode size (392 = 28 * 14), so the model sees the files as they are
    np.testing.assert_array_equal(to_uint8_frames(load_and_preprocess_images(paths)), images)
