"""The true cameras and depth of a scene in the frames the model saw.

The preprocessing resizes, crops and pads each image (:mod:`vggt.geometry.placement`): a frame pixel
sees the same ray as the original pixel it comes from. So a camera keeps its extrinsic, its intrinsics
become ``A K`` with ``A`` the affine map from original to frame pixels, and a frame pixel's depth is the
original depth map sampled where that pixel comes from. numpy only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggt.geometry.correspondence import SceneError, _scene_views, is_scene_dir
from vggt.geometry.placement import FramePlacement, place_frame
from vggt.geometry.scene import sample_depth


@dataclass(frozen=True)
class FrameGeometry:
    """True geometry of ``S`` frames of ``H x W`` pixels.

    Attributes
    ----------
    extrinsic : np.ndarray
        ``[S, 3, 4]`` float64 world-to-camera ``[R | t]`` in the scene's world.
    intrinsic : np.ndarray
        ``[S, 3, 3]`` float64 in frame pixels.
    depth : np.ndarray
        ``[S, H, W]`` float32 camera z at each frame pixel centre; NaN on padding.
    """

    extrinsic: np.ndarray
    intrinsic: np.ndarray
    depth: np.ndarray


def frame_intrinsic(K: np.ndarray, placement: FramePlacement) -> np.ndarray:
    """Intrinsics ``[3, 3]`` of an original camera ``K`` in the pixels of its frame."""
    offset_x, offset_y = placement.to_frame(0.0, 0.0)
    to_frame = np.array([[placement.scale_x, 0.0, offset_x], [0.0, placement.scale_y, offset_y], [0, 0, 1]])
    return to_frame @ np.asarray(K, np.float64)


def frame_depth(depth: np.ndarray, placement: FramePlacement) -> np.ndarray:
    """Depth ``[H, W]`` of the frame's pixels from the original depth map (bilinear on a surface,
    nearest across depth edges, as :func:`vggt.geometry.scene.sample_depth`); NaN on padding."""
    rows, cols = np.mgrid[0 : placement.frame_height, 0 : placement.frame_width].astype(np.float64)
    source_x, source_y = placement.to_source(cols, rows)
    sampled = sample_depth(depth, source_x, source_y)
    return np.where(placement.shows(cols, rows), sampled, np.nan).astype(np.float32)


def true_frame_geometry(
    scene_dir: str | os.PathLike[str], sources: Sequence[str], preprocess_mode: str, image_size: Sequence[int]
) -> FrameGeometry:
    """The true cameras and depth of frames made from a scene's views.

    Parameters
    ----------
    scene_dir : path
        A scene folder (``cameras.json``, ``depth/``, ``images/``).
    sources : sequence of str
        Source file name of each frame, model order.
    preprocess_mode : str
        ``"crop"`` or ``"pad"``.
    image_size : (H, W)
        The frames' size.

    Raises
    ------
    SceneError
        As :func:`vggt.geometry.correspondence.true_correspondences`.
    """
    scene = Path(scene_dir)
    if not is_scene_dir(scene):
        raise SceneError(f"{scene} is not a scene folder (it needs cameras.json and depth/)")
    cameras, depths = _scene_views(scene, sources)
    try:
        placements = [place_frame(c.width, c.height, preprocess_mode, tuple(image_size)) for c in cameras]
    except ValueError as exc:
        raise SceneError(f"scene {scene}: {exc}") from None
    return FrameGeometry(
        extrinsic=np.stack([camera.extrinsic for camera in cameras]).astype(np.float64),
        intrinsic=np.stack(
            [frame_intrinsic(camera.K, p) for camera, p in zip(cameras, placements, strict=True)]
        ),
        depth=np.stack([frame_depth(depth, p) for depth, p in zip(depths, placements, strict=True)]),
    )
