"""What an intervention costs VGGT: errors of its predictions against the unmodified run and the truth.

numpy only. A run's predictions (batch entry 0) are held in a :class:`RunGeometry`; :func:`compare`
gives one row of errors. Against the unmodified run the predictions share its coordinate frame (the
first camera's, at the model's scale), so they are compared as they are. Against the truth, every
point map is first brought into the true world frame by the similarity transform (scale, rotation,
translation; Umeyama's least squares) that best maps it onto the true points, as VGGT's evaluation does;
relative camera poses and fields of view need no alignment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Column -> meaning, in the order of results.csv. "reference" is the unmodified run, or the truth for
# the truth_* columns.
ERROR_COLUMNS: Mapping[str, str] = {
    "camera_rotation_deg": "mean over frame pairs of the angle of the relative rotation's error, degrees",
    "camera_translation_deg": "mean over frame pairs of the angle between relative translation directions, "
    "degrees",
    "fov_rel": "mean over frames and both axes of |FoV - reference FoV| / reference FoV",
    "depth_abs_rel": "mean over pixels of |depth - reference depth| / reference depth",
    "depth_mae": "mean over pixels of |depth - reference depth| (the reference's units)",
    "points_mean": "mean over pixels of the distance between world points and the reference's",
    "track_px": "mean over query cells and frames 1.. of the track's distance to the reference's, pixels",
}
TRUTH_PREFIX = "truth_"


@dataclass(frozen=True)
class RunGeometry:
    """Geometry of one run, or the truth, for the ``S`` frames of ``H x W`` pixels.

    Attributes
    ----------
    extrinsic : np.ndarray
        ``[S, 3, 4]`` world-to-camera ``[R | t]`` (OpenCV).
    intrinsic : np.ndarray
        ``[S, 3, 3]``.
    depth : np.ndarray or None
        ``[S, H, W]`` camera z.
    world_points : np.ndarray or None
        ``[S, H, W, 3]``.
    track : np.ndarray or None
        ``[S, Q, 2]`` pixel ``(x, y)`` of each query cell in every frame.
    valid : np.ndarray or None
        ``[S, H, W]`` bool: pixels with a true depth (truth only; all pixels otherwise).
    track_visible : np.ndarray or None
        ``[S, Q]`` bool: where a true track position is known and visible (truth only).
    """

    extrinsic: np.ndarray
    intrinsic: np.ndarray
    depth: np.ndarray | None = None
    world_points: np.ndarray | None = None
    track: np.ndarray | None = None
    valid: np.ndarray | None = None
    track_visible: np.ndarray | None = None

    @property
    def image_size(self) -> tuple[int, int] | None:
        source = self.depth if self.depth is not None else self.world_points
        return None if source is None else tuple(source.shape[1:3])


def rotation_angle_deg(rotation: np.ndarray) -> np.ndarray:
    """Angle of rotation matrices ``[..., 3, 3]``, degrees ``[...]``.

    From both its cosine (the trace) and its sine (the antisymmetric part): ``arccos`` of the trace
    alone would turn float32 rounding of a matrix into hundredths of a degree near 0.
    """
    cosine = (np.trace(rotation, axis1=-2, axis2=-1) - 1.0) / 2.0
    antisymmetric = rotation - np.swapaxes(rotation, -1, -2)
    sine = np.linalg.norm(antisymmetric[..., [2, 0, 1], [1, 2, 0]], axis=-1) / 2.0
    return np.degrees(np.arctan2(sine, cosine))


def direction_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle between vectors ``[..., 3]``, degrees; NaN where one of them is zero."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.sum(a * b, axis=-1) / norms
    return np.where(norms > 0, np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))), np.nan)


def relative_poses(extrinsic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pose of camera ``j`` relative to camera ``i`` for every pair ``i < j``.

    Returns rotations ``[pairs, 3, 3]`` (``R_j R_i^T``) and translations ``[pairs, 3]``
    (``t_j - R_j R_i^T t_i``): the map from camera ``i``'s coordinates to camera ``j``'s.
    """
    rotation, translation = extrinsic[:, :, :3], extrinsic[:, :, 3]
    first, second = np.triu_indices(len(extrinsic), k=1)
    relative = rotation[second] @ np.swapaxes(rotation[first], -1, -2)
    shift = translation[second] - np.einsum("pij,pj->pi", relative, translation[first])
    return relative, shift


def camera_errors(extrinsic: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean relative-rotation error and relative-translation direction error over frame pairs, degrees.

    Both are unchanged by a similarity transform of either world, so no alignment is needed. With one
    frame there is no pair: NaN.
    """
    if len(extrinsic) < 2:
        return float("nan"), float("nan")
    rotation, translation = relative_poses(extrinsic)
    rotation_ref, translation_ref = relative_poses(reference)
    rotation_error = rotation_angle_deg(rotation @ np.swapaxes(rotation_ref, -1, -2))
    direction_error = direction_angle_deg(translation, translation_ref)
    measured = direction_error[np.isfinite(direction_error)]  # a pair with no baseline has no direction
    return float(np.mean(rotation_error)), float(np.mean(measured)) if measured.size else float("nan")


def fields_of_view(intrinsic: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Vertical and horizontal field of view ``[S, 2]`` (radians) of ``H x W`` frames, as VGGT's pose
    encoding defines them: ``2 atan(H / (2 f_y))`` and ``2 atan(W / (2 f_x))``."""
    height, width = image_size
    return np.stack(
        (2 * np.arctan(height / (2 * intrinsic[:, 1, 1])), 2 * np.arctan(width / (2 * intrinsic[:, 0, 0]))),
        axis=-1,
    )


def umeyama(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity ``(scale, R, t)`` minimizing ``sum |scale R source_i + t - target_i|^2``.

    ``source``, ``target`` are ``[N, 3]`` (N >= 3, not all on a line).
    """
    source = source.astype(np.float64)
    target = target.astype(np.float64)
    mean_source, mean_target = source.mean(axis=0), target.mean(axis=0)
    centred_source, centred_target = source - mean_source, target - mean_target
    covariance = centred_target.T @ centred_source / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1.0
    rotation = u @ sign @ vt
    variance = np.mean(np.sum(centred_source**2, axis=1))
    scale = float(np.trace(np.diag(singular) @ sign) / variance)
    return scale, rotation, mean_target - scale * rotation @ mean_source


def depth_to_world_points(depth: np.ndarray, extrinsic: np.ndarray, intrinsic: np.ndarray) -> np.ndarray:
    """World points ``[S, H, W, 3]`` of depth maps ``[S, H, W]`` seen by the given cameras."""
    frames, height, width = depth.shape
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    points = np.empty((frames, height, width, 3))
    for frame in range(frames):
        k, rotation, translation = intrinsic[frame], extrinsic[frame, :, :3], extrinsic[frame, :, 3]
        z = depth[frame].astype(np.float64)
        camera = np.stack(((u - k[0, 2]) / k[0, 0] * z, (v - k[1, 2]) / k[1, 1] * z, z), axis=-1)
        points[frame] = (camera - translation) @ rotation
    return points


def compare(run: RunGeometry, reference: RunGeometry, align: bool = False) -> dict[str, float]:
    """The :data:`ERROR_COLUMNS` of ``run`` against ``reference``.

    With ``align`` (the reference is the truth), the world points and the points of the depth maps
    (unprojected with the run's own cameras) are each mapped onto the true points by their own best
    similarity before their errors are taken, and the depth by that similarity's scale. Pixels outside
    ``reference.valid`` and tracks outside ``reference.track_visible`` are left out. A quantity that
    either side lacks is NaN.
    """
    errors = dict.fromkeys(ERROR_COLUMNS, float("nan"))
    errors["camera_rotation_deg"], errors["camera_translation_deg"] = camera_errors(
        run.extrinsic, reference.extrinsic
    )
    size = reference.image_size or run.image_size
    if size is not None:
        fov, fov_ref = fields_of_view(run.intrinsic, size), fields_of_view(reference.intrinsic, size)
        if np.all(fov_ref > 0):  # a reference without a field of view (random weights) has no relative error
            errors["fov_rel"] = float(np.mean(np.abs(fov - fov_ref) / fov_ref))
    valid = reference.valid
    if run.depth is not None and reference.depth is not None:
        depth = run.depth.astype(np.float64)
        mask = np.ones(depth.shape, bool) if valid is None else valid
        if align:
            points = depth_to_world_points(depth, run.extrinsic, run.intrinsic)
            true_points = depth_to_world_points(reference.depth, reference.extrinsic, reference.intrinsic)
            scale, _, _ = umeyama(points[mask], true_points[mask])
            depth = depth * scale
        truth = reference.depth.astype(np.float64)[mask]
        difference = np.abs(depth[mask] - truth)
        errors["depth_abs_rel"] = float(np.mean(difference / truth))
        errors["depth_mae"] = float(np.mean(difference))
    if run.world_points is not None:
        true_points = reference.world_points
        if true_points is None and align and reference.depth is not None:
            true_points = depth_to_world_points(reference.depth, reference.extrinsic, reference.intrinsic)
        if true_points is not None:
            mask = np.ones(run.world_points.shape[:3], bool) if valid is None else valid
            points, true_points = run.world_points[mask].astype(np.float64), true_points[mask]
            if align:
                scale, rotation, shift = umeyama(points, true_points)
                points = scale * points @ rotation.T + shift
            errors["points_mean"] = float(np.mean(np.linalg.norm(points - true_points, axis=-1)))
    if run.track is not None and reference.track is not None and len(run.track) > 1:
        distance = np.linalg.norm(run.track[1:].astype(np.float64) - reference.track[1:], axis=-1)
        seen = (
            np.ones(distance.shape, bool) if reference.track_visible is None else reference.track_visible[1:]
        )
        errors["track_px"] = float(np.mean(distance[seen])) if seen.any() else float("nan")
    return errors
