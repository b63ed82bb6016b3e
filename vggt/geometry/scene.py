"""Pinhole geometry for scenes with known cameras and depth (e.g. ``examples/synthetic_room``).

Conventions (OpenCV): camera x right, y down, z forward; ``extrinsic = [R | t]`` maps world to
camera; pixel ``(u, v)`` is (column, row) with the centre of the top-left pixel at ``(0, 0)``;
depth maps hold camera z per pixel centre.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Camera:
    """One pinhole view: ``K`` [3, 3] intrinsics, ``extrinsic`` [3, 4] world-to-camera."""

    K: np.ndarray
    extrinsic: np.ndarray
    width: int
    height: int


def cameras_from_meta(meta: Mapping) -> list[Camera]:
    """Cameras from the parsed ``cameras.json`` of a scene directory."""
    return [
        Camera(
            K=np.asarray(view["K"], dtype=np.float64),
            extrinsic=np.asarray(view["extrinsic"], dtype=np.float64),
            width=int(meta["width"]),
            height=int(meta["height"]),
        )
        for view in meta["views"]
    ]


def load_scene(scene_dir: str | Path) -> tuple[list[Camera], np.ndarray]:
    """Read ``cameras.json`` and the depth maps of a scene directory.

    Returns
    -------
    tuple[list[Camera], np.ndarray]
        V cameras and depth ``[V, H, W]`` float32.
    """
    scene_dir = Path(scene_dir)
    meta = json.loads((scene_dir / "cameras.json").read_text())
    depth = np.stack([np.load(scene_dir / view["depth"]).astype(np.float32) for view in meta["views"]])
    return cameras_from_meta(meta), depth


def unproject(u: np.ndarray, v: np.ndarray, z: np.ndarray, cam: Camera) -> np.ndarray:
    """Pixels ``(u, v)`` at camera depth ``z`` (each [...]) -> world points [..., 3]."""
    K, R, t = cam.K, cam.extrinsic[:, :3], cam.extrinsic[:, 3]
    x = (np.asarray(u, np.float64) - K[0, 2]) / K[0, 0]
    y = (np.asarray(v, np.float64) - K[1, 2]) / K[1, 1]
    z = np.asarray(z, np.float64)
    cam_pts = np.stack([x * z, y * z, z], axis=-1)
    return (cam_pts - t) @ R  # R^T (X_cam - t), written for row vectors


def project(points: np.ndarray, cam: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points [..., 3] -> pixel ``u``, ``v`` and camera depth ``z``, each [...]."""
    R, t = cam.extrinsic[:, :3], cam.extrinsic[:, 3]
    pc = np.asarray(points, np.float64) @ R.T + t
    z = pc[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = cam.K[0, 0] * pc[..., 0] / z + cam.K[0, 2]
        v = cam.K[1, 1] * pc[..., 1] / z + cam.K[1, 2]
    return u, v, z


def sample_depth(depth: np.ndarray, u: np.ndarray, v: np.ndarray, rel_tol: float = 0.02) -> np.ndarray:
    """Depth ``[H, W]`` at sub-pixel ``(u, v)`` (each [...]); NaN outside the image.

    Bilinear where the four neighbouring pixels lie on one surface (within ``rel_tol``),
    nearest pixel across depth edges so values from two surfaces are never blended.
    """
    h, w = depth.shape
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    inside = (u > -0.5) & (u < w - 0.5) & (v > -0.5) & (v < h - 0.5)
    # NaN/inf coordinates would become garbage indices, so park them at pixel 0 first
    uc = np.where(inside, np.clip(u, 0, w - 1), 0.0)
    vc = np.where(inside, np.clip(v, 0, h - 1), 0.0)
    u0 = np.minimum(np.floor(uc).astype(np.int64), w - 2) if w > 1 else np.zeros(uc.shape, np.int64)
    v0 = np.minimum(np.floor(vc).astype(np.int64), h - 2) if h > 1 else np.zeros(vc.shape, np.int64)
    u1, v1 = np.minimum(u0 + 1, w - 1), np.minimum(v0 + 1, h - 1)
    fu, fv = uc - u0, vc - v0
    d = depth.astype(np.float64)
    corners = np.stack([d[v0, u0], d[v0, u1], d[v1, u0], d[v1, u1]])
    top = corners[0] * (1 - fu) + corners[1] * fu
    bottom = corners[2] * (1 - fu) + corners[3] * fu
    bilinear = top * (1 - fv) + bottom * fv
    nearest = d[np.rint(vc).astype(np.int64), np.rint(uc).astype(np.int64)]
    smooth = corners.max(axis=0) - corners.min(axis=0) <= rel_tol * corners.min(axis=0)
    return np.where(inside, np.where(smooth, bilinear, nearest), np.nan)


def project_pixel(
    u: np.ndarray | float,
    v: np.ndarray | float,
    src_view: int,
    dst_view: int,
    cameras: Sequence[Camera] | Mapping,
    depth: np.ndarray | Sequence[np.ndarray],
    rel_tol: float = 0.02,
    return_depth: bool = False,
    hidden_only: bool = False,
) -> tuple[np.ndarray, ...]:
    """Map pixels of one view to where the same scene points appear in another view.

    Parameters
    ----------
    u, v
        Pixel coordinates in ``src_view``, scalars or arrays of one shape [...].
    src_view, dst_view
        View indices.
    cameras
        Cameras (or the parsed ``cameras.json``).
    depth
        Depth maps ``[V, H, W]`` (or a list of ``[H, W]``), camera z.
    rel_tol
        Relative depth tolerance of the occlusion test.
    return_depth
        Also return the points' depth ``z2`` in the destination camera (negative behind it).
    hidden_only
        Count a point as unseen only where a surface more than ``rel_tol`` nearer hides it; by
        default also where it lies more than ``rel_tol`` in front of the depth map (exact depth
        has no such points; predicted depth does).

    Returns
    -------
    tuple[np.ndarray, ...]
        ``u2``, ``v2`` (float, [...]) in ``dst_view`` and ``visible`` (bool, [...]): the point
        has valid source depth, lies in front of the destination camera, inside its image,
        and its depth there agrees with the destination depth map within ``rel_tol``; with
        ``return_depth``, ``z2`` (float, [...]) after ``u2`` and ``v2``.
    """
    cams = cameras_from_meta(cameras) if isinstance(cameras, Mapping) else list(cameras)
    src, dst = cams[src_view], cams[dst_view]
    z = sample_depth(np.asarray(depth[src_view]), u, v, rel_tol)
    u2, v2, z2 = project(unproject(u, v, z, src), dst)
    seen = sample_depth(np.asarray(depth[dst_view]), u2, v2, rel_tol)
    with np.errstate(invalid="ignore"):
        behind = z2 - seen
        visible = (z > 0) & (z2 > 0) & ((behind if hidden_only else np.abs(behind)) <= rel_tol * seen)
    if return_depth:
        return u2, v2, z2, np.asarray(visible)
    return u2, v2, np.asarray(visible)
