"""Errors of an intervened run: hand-made geometry with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vggt.geometry.pose_encoding import extri_intri_to_pose_encoding
from vggt.geometry.rotation import quat_to_mat
from vggt.intervention_metrics import (
    ERROR_COLUMNS,
    RunGeometry,
    camera_errors,
    compare,
    depth_to_world_points,
    fields_of_view,
    umeyama,
)

HEIGHT, WIDTH = 12, 16


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    half = math.radians(degrees) / 2
    quaternion = torch.tensor([*(axis * math.sin(half)), math.cos(half)])  # x, y, z, w as upstream
    return quat_to_mat(quaternion[None]).double().numpy()[0]


def scene(frames: int = 3, seed: int = 0) -> RunGeometry:
    """Cameras looking at a bumpy wall, with its depth maps and the world points they see."""
    generator = np.random.default_rng(seed)
    extrinsic = np.stack([
        np.concatenate((rotation([0.1, 1.0, 0.05 * i], 8.0 * i), np.array([[0.3 * i], [0.05], [0.1 * i]])), 1)
        for i in range(frames)
    ])  # fmt: skip
    intrinsic = np.tile(np.array([[20.0, 0, WIDTH / 2], [0, 21.0, HEIGHT / 2], [0, 0, 1]]), (frames, 1, 1))
    depth = 3.0 + generator.random((frames, HEIGHT, WIDTH))
    track = generator.random((frames, 6, 2)) * [WIDTH, HEIGHT]
    return RunGeometry(extrinsic, intrinsic, depth, depth_to_world_points(depth, extrinsic, intrinsic), track)


def moved_world(run: RunGeometry, scale: float, world_rotation: np.ndarray, shift: np.ndarray) -> RunGeometry:
    """The same cameras and surfaces in another world frame ``X' = scale R X + shift``."""
    camera_rotation = run.extrinsic[:, :, :3] @ world_rotation.T
    translation = scale * run.extrinsic[:, :, 3] - np.einsum("sij,j->si", camera_rotation, shift)
    extrinsic = np.concatenate((camera_rotation, translation[..., None]), axis=-1)
    points = scale * run.world_points @ world_rotation.T + shift
    return RunGeometry(extrinsic, run.intrinsic, scale * run.depth, points, run.track)


def test_errors_of_a_run_against_itself_are_zero():
    run = scene()
    errors = compare(run, run)
    assert list(errors) == list(ERROR_COLUMNS)
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in errors.values())


def test_camera_errors_are_the_angles_between_relative_poses():
    reference = scene(frames=2)
    run_extrinsic = reference.extrinsic.copy()
    # Turn the second camera by 5 degrees about its own optical axis: relative rotation error 5 degrees;
    # its centre stays, so the relative translation turns by the angle that moves t_1 about that axis.
    turn = rotation([0, 0, 1], 5.0)
    run_extrinsic[1, :, :3] = turn @ reference.extrinsic[1, :, :3]
    run_extrinsic[1, :, 3] = turn @ reference.extrinsic[1, :, 3]
    rotation_error, translation_error = camera_errors(run_extrinsic, reference.extrinsic)
    assert rotation_error == pytest.approx(5.0, abs=1e-6)
    relative = reference.extrinsic[1, :, :3] @ reference.extrinsic[0, :, :3].T
    t_ref = reference.extrinsic[1, :, 3] - relative @ reference.extrinsic[0, :, 3]
    t_run = turn @ t_ref
    expected = math.degrees(math.acos(t_ref @ t_run / np.linalg.norm(t_ref) / np.linalg.norm(t_run)))
    assert translation_error == pytest.approx(expected, abs=1e-6)
    assert all(math.isnan(value) for value in camera_errors(reference.extrinsic[:1], reference.extrinsic[:1]))


def test_fields_of_view_are_those_of_vggts_pose_encoding():
    run = scene()
    encoding = extri_intri_to_pose_encoding(
        torch.from_numpy(run.extrinsic)[None], torch.from_numpy(run.intrinsic)[None], (HEIGHT, WIDTH)
    )
    expected = encoding[0, :, 7:9].double().numpy()
    np.testing.assert_allclose(fields_of_view(run.intrinsic, (HEIGHT, WIDTH)), expected, rtol=1e-6)


def test_umeyama_recovers_a_similarity():
    points = np.random.default_rng(1).normal(size=(50, 3))
    world_rotation, shift = rotation([1, 2, 3], 40.0), np.array([0.5, -2.0, 3.0])
    scale, found_rotation, found_shift = umeyama(points, 2.5 * points @ world_rotation.T + shift)
    assert scale == pytest.approx(2.5)
    np.testing.assert_allclose(found_rotation, world_rotation, atol=1e-9)
    np.testing.assert_allclose(found_shift, shift, atol=1e-9)


def test_against_the_truth_a_run_in_another_similar_world_has_no_error():
    truth = scene()
    truth = RunGeometry(
        truth.extrinsic, truth.intrinsic, truth.depth, None, truth.track,
        valid=np.ones(truth.depth.shape, bool), track_visible=np.ones(truth.track.shape[:2], bool),
    )  # fmt: skip
    run = moved_world(scene(), 0.4, rotation([0.3, 1, 0], 70.0), np.array([1.0, 2.0, -1.0]))
    errors = compare(run, truth, align=True)
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in errors.values()), errors
    # Unaligned, its depth is off by the scale: |0.4 d - d| / d = 0.6.
    assert compare(run, truth)["depth_abs_rel"] == pytest.approx(0.6)


def test_depth_points_and_tracks_against_a_reference():
    reference = scene()
    depth = reference.depth.copy()
    depth[0, 0, 0] += 0.5
    points = reference.world_points.copy()
    points[1, 2, 3] += [0.0, 3.0, 4.0]
    track = reference.track.copy()
    track[0] += 100.0  # frame 0 is the query frame: not counted
    track[2, 1] += [6.0, 8.0]
    run = RunGeometry(reference.extrinsic, reference.intrinsic, depth, points, track)
    errors = compare(run, reference)
    pixels = depth.size
    assert errors["depth_mae"] == pytest.approx(0.5 / pixels)
    assert errors["depth_abs_rel"] == pytest.approx(0.5 / reference.depth[0, 0, 0] / pixels)
    assert errors["points_mean"] == pytest.approx(5.0 / pixels)
    assert errors["track_px"] == pytest.approx(10.0 / (2 * 6))
    # Only visible true positions count.
    visible = np.zeros((3, 6), bool)
    visible[2, 1] = True
    truth = RunGeometry(
        reference.extrinsic, reference.intrinsic, track=reference.track, track_visible=visible
    )
    assert compare(run, truth)["track_px"] == pytest.approx(10.0)


def test_rotation_angles_are_exact_near_zero_and_right_at_large_angles():
    turn = rotation([1, 2, 3], 37.0).astype(np.float32).astype(np.float64)  # rounded, not quite orthonormal
    assert camera_errors(
        np.stack([np.eye(3, 4), np.c_[turn, [1, 0, 0]]]), np.stack([np.eye(3, 4), np.c_[turn, [1, 0, 0]]])
    ) == (0.0, 0.0)
    for degrees in (0.5, 90.0, 120.0, 179.0):
        extrinsic = np.stack([np.eye(3, 4), np.c_[rotation([0, 1, 1], degrees), [1.0, 0.0, 0.0]]])
        assert camera_errors(extrinsic, np.stack([np.eye(3, 4)] * 2))[0] == pytest.approx(degrees)


def test_a_reference_without_a_field_of_view_has_no_relative_fov_error(recwarn):
    run = scene()
    intrinsic = run.intrinsic.copy()
    intrinsic[1:, 0, 0] = intrinsic[1:, 1, 1] = np.inf  # a focal length of a random-weight camera head
    reference = RunGeometry(run.extrinsic, intrinsic, run.depth, run.world_points, run.track)
    errors = compare(run, reference)
    assert math.isnan(errors["fov_rel"]) and errors["depth_abs_rel"] == 0.0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
