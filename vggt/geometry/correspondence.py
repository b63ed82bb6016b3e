"""Where the query points of frame 0 lie in every frame: truly, for frames that come from a scene with
known geometry, or by a prediction of depth and cameras.

A **scene folder** holds ``cameras.json`` and ``depth/`` beside ``images/`` (as ``examples/synthetic_room``
does; the file layout is described in its README). The frames of an export are matched to the scene's
views through their source file names, and every position is given in the pixels of the frames the
model saw, through the preprocessing's own rule (:mod:`vggt.geometry.placement`). numpy and Pillow only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vggt.attn_format.grid import cell_centres
from vggt.geometry.placement import place_frame
from vggt.geometry.scene import Camera, cameras_from_meta, project_pixel

CAMERAS_NAME = "cameras.json"
DEPTH_DIR_NAME = "depth"
# Relative depth tolerance of the occlusion test: a point is hidden in a view where that view's depth
# map holds a surface more than 2% nearer than the point.
OCCLUSION_REL_TOL = 0.02
# The same for predicted depth, which is less exact: hidden where more than 5% nearer.
PREDICTED_OCCLUSION_REL_TOL = 0.05
_ROTATING_EXIF_ORIENTATIONS = (5, 6, 7, 8)  # orientations that swap width and height


class SceneError(ValueError):
    """A scene folder that cannot be used (one-line message)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def is_scene_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a scene folder: it holds ``cameras.json`` and a ``depth/`` folder."""
    folder = Path(path)
    return (folder / CAMERAS_NAME).is_file() and (folder / DEPTH_DIR_NAME).is_dir()


def scene_of_image_dir(image_dir: str | os.PathLike[str]) -> Path | None:
    """The scene an image folder belongs to (its parent, when that is a scene folder), else ``None``."""
    parent = Path(image_dir).absolute().parent
    return parent if is_scene_dir(parent) else None


def _upright_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image as the preprocessing sees it (after its EXIF orientation)."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112)
    return (height, width) if orientation in _ROTATING_EXIF_ORIENTATIONS else (width, height)


def _scene_views(scene_dir: Path, sources: Sequence[str]) -> tuple[list[Camera], list[np.ndarray]]:
    """The camera and depth map of the scene view of each source file name, in the given order."""
    where = f"scene {scene_dir}"
    try:
        meta = json.loads((scene_dir / CAMERAS_NAME).read_text(encoding="utf-8"))
        views = meta["views"]
        cameras = cameras_from_meta(meta)
        by_name: dict[str, int] = {}
        for index, view in enumerate(views):
            by_name.setdefault(Path(str(view["image"])).name, index)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SceneError(f"{where}: cannot read {CAMERAS_NAME} ({type(exc).__name__}: {exc})") from None
    chosen_cameras, depths = [], []
    for source in sources:
        name = Path(str(source)).name
        if name not in by_name:
            raise SceneError(f"{where}: frame source {name!r} is not one of its views")
        view, camera = views[by_name[name]], cameras[by_name[name]]
        image_path = scene_dir / str(view["image"])
        try:
            size = _upright_size(image_path)
            depth = np.load(scene_dir / str(view["depth"]), allow_pickle=False)
        except (OSError, ValueError, KeyError) as exc:
            raise SceneError(f"{where}: view {name!r}: {type(exc).__name__}: {exc}") from None
        if size != (camera.width, camera.height):
            raise SceneError(
                f"{where}: image {name} is {size[0]}x{size[1]}, its camera {camera.width}x{camera.height}"
            )
        if depth.shape != (camera.height, camera.width):
            raise SceneError(
                f"{where}: depth map of {name} is {list(depth.shape)}, "
                f"expected [{camera.height}, {camera.width}]"
            )
        chosen_cameras.append(camera)
        depths.append(depth.astype(np.float32))
    return chosen_cameras, depths


def query_points(grid: Mapping) -> np.ndarray:
    """The point of every query cell of frame 0 (its query patch's centre), ``[Q, 2]`` float32 pixels
    ``(x, y)``, for a grid given as the manifest's ``grid`` mapping (see :func:`cell_centres`)."""
    try:
        fields = [int(grid[key]) for key in ("H_p", "W_p", "stride_h", "stride_w", "patch_size")]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"a grid needs H_p, W_p, stride_h, stride_w and patch_size ({exc})") from None
    return cell_centres(*fields)


def true_correspondences(
    scene_dir: str | os.PathLike[str],
    sources: Sequence[str],
    preprocess_mode: str,
    image_size: Sequence[int],
    grid: Mapping,
) -> tuple[np.ndarray, np.ndarray]:
    """Where the point of every query cell of frame 0 truly lies in every frame.

    Parameters
    ----------
    scene_dir : path
        The scene folder (``cameras.json``, ``depth/``, ``images/``).
    sources : sequence of str
        Source file name of each frame, model order (an export's ``frame_sources``); each must be the
        file name of one of the scene's views.
    preprocess_mode : str
        ``"crop"`` or ``"pad"``, as the frames were made.
    image_size : (H, W)
        Size of the frames the model saw (the batch's size).
    grid : Mapping
        The export's query grid (``H_p``, ``W_p``, ``stride_h``, ``stride_w``, ``patch_size``), as the
        manifest's ``grid``. Each query cell's point is its query patch's centre
        (:func:`vggt.attn_format.grid.cell_centres`).

    Returns
    -------
    xy : np.ndarray
        ``[S, Q, 2]`` float32 ``(x, y)`` in model-frame pixels: each query point's scene point projected
        into frame ``s`` (also where it is hidden or outside that frame). NaN where there is no scene
        point (the query point lies on frame 0's padding) or it is behind frame ``s``'s camera.
    visible : np.ndarray
        ``[S, Q]`` bool: the point is in front of the camera, on frame ``s``'s image content (not cut
        off by the crop, not on padding), and not occluded (the view's depth there is within
        :data:`OCCLUSION_REL_TOL` of the point's depth). Frame 0's row holds the query points
        themselves, visible wherever frame 0 has a scene point.

    Raises
    ------
    SceneError
        An unreadable scene, a source that is not one of its views, or image, camera and depth sizes
        that disagree.
    """
    scene = Path(scene_dir)
    if not is_scene_dir(scene):
        raise SceneError(f"{scene} is not a scene folder (it needs {CAMERAS_NAME} and {DEPTH_DIR_NAME}/)")
    cameras, depths = _scene_views(scene, sources)
    height, width = (int(n) for n in image_size)
    try:
        placements = [place_frame(c.width, c.height, preprocess_mode, (height, width)) for c in cameras]
    except ValueError as exc:
        raise SceneError(f"scene {scene}: {exc}") from None
    points = query_points(grid).astype(np.float64)
    on_content = placements[0].shows(points[:, 0], points[:, 1])
    source_x, source_y = placements[0].to_source(points[:, 0], points[:, 1])
    xy = np.full((len(cameras), len(points), 2), np.nan, dtype=np.float32)
    visible = np.zeros((len(cameras), len(points)), dtype=bool)
    views = _points_in_views(source_x, source_y, cameras, depths, OCCLUSION_REL_TOL, hidden_only=False)
    for frame, (x, y, located, seen) in enumerate(views):
        frame_x, frame_y = placements[frame].to_frame(x, y)
        located &= on_content
        xy[frame, located] = np.stack([frame_x, frame_y], axis=-1)[located]
        visible[frame] = located & seen & placements[frame].shows(frame_x, frame_y)
    return xy, visible


def predicted_correspondences(
    query_points: np.ndarray,
    depth: np.ndarray,
    extrinsic: np.ndarray,
    intrinsic: np.ndarray,
    rel_tol: float = PREDICTED_OCCLUSION_REL_TOL,
) -> tuple[np.ndarray, np.ndarray]:
    """Where each query point of frame 0 lies in every frame by a prediction of depth and cameras.

    The point is unprojected with frame 0's depth (sampled as :func:`vggt.geometry.scene.sample_depth`
    does: bilinear on a surface, nearest across depth edges) and camera, and projected into each frame.

    Parameters
    ----------
    query_points : np.ndarray
        ``[Q, 2]`` pixel ``(x, y)`` in frame 0.
    depth : np.ndarray
        ``[S, H, W]`` depth (camera z) per pixel of each frame.
    extrinsic, intrinsic : np.ndarray
        ``[S, 3, 4]`` world-to-camera ``[R | t]`` and ``[S, 3, 3]`` intrinsics in frame pixels.
    rel_tol : float
        Occlusion tolerance: a point is hidden in a frame where that frame's depth is more than
        ``rel_tol`` (relative) nearer than the point.

    Returns
    -------
    xy : np.ndarray
        ``[S, Q, 2]`` float32 frame pixels (NaN where frame 0's depth is not positive or the point is
        behind a frame's camera); frame 0's row holds the query points.
    visible : np.ndarray
        ``[S, Q]`` bool: in front of the camera, inside the frame and not hidden.
    """
    frames, height, width = depth.shape
    cameras = [
        Camera(np.asarray(intrinsic[s], np.float64), np.asarray(extrinsic[s], np.float64), width, height)
        for s in range(frames)
    ]
    depths = np.asarray(depth, np.float32)
    points = np.asarray(query_points, np.float64)
    xy = np.full((frames, len(points), 2), np.nan, dtype=np.float32)
    visible = np.zeros((frames, len(points)), dtype=bool)
    views = _points_in_views(points[:, 0], points[:, 1], cameras, depths, rel_tol, hidden_only=True)
    for frame, (x, y, located, seen) in enumerate(views):
        xy[frame, located] = np.stack([x, y], axis=-1)[located]
        visible[frame] = located & seen
    return xy, visible


def _points_in_views(
    x: np.ndarray,
    y: np.ndarray,
    cameras: Sequence[Camera],
    depths: Sequence[np.ndarray] | np.ndarray,
    rel_tol: float,
    hidden_only: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """For each view: pixels ``x, y`` of view 0 projected there through view 0's depth, whether they are
    located (a positive depth in view 0 and in front of this view's camera) and whether they are seen
    (:func:`vggt.geometry.scene.project_pixel`'s visibility). View 0 sees its own points: no occlusion
    test there, which would be ambiguous for a point exactly between pixels on a depth edge."""
    for view in range(len(cameras)):
        u, v, z, seen = project_pixel(
            x, y, 0, view, cameras, depths, rel_tol, return_depth=True, hidden_only=hidden_only
        )
        with np.errstate(invalid="ignore"):
            located = (z > 0) & np.isfinite(u) & np.isfinite(v)
        if view == 0:
            u, v, seen = x, y, located
        yield u, v, located, seen


def geometry_meta(scene: str | os.PathLike[str] | None) -> dict:
    """The geometry metadata's fields that say how the correspondences were made: the occlusion
    tolerances and the scene's folder name (``None`` without true geometry)."""
    return {
        "depth_occlusion_rel_tol": PREDICTED_OCCLUSION_REL_TOL,
        "truth_occlusion_rel_tol": OCCLUSION_REL_TOL if scene is not None else None,
        "scene": Path(scene).resolve().name if scene is not None else None,
    }
