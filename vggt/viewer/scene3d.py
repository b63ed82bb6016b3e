"""Attention in 3D: every frame's predicted points coloured by the clicked query's attention, the query's
own point marked and the cameras drawn, written as a binary glTF (GLB) for Gradio's ``Model3D``.

A point takes the colour its pixel has in the overlays (the frame's colour under the jet colour of its
cell, alpha = value x opacity), so a surface lights up where the query's attention lands. Points come
from the export's geometry (``AttnExport.geometry()``: the point head's ``world_points`` and their
confidence, the predicted cameras); an export without geometry has no 3D view.

Coordinates: the export's (OpenCV: x right, y down, z forward; VGGT's world is the first camera's). The
GLB is written y up (glTF's convention): ``(x, -y, -z)``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggt.attn_format.grid import cell_index
from vggt.geometry.scene import Camera, unproject
from vggt.viewer import render, views
from vggt.viewer.state import LoadedExport, Settings, ViewerError, key_frames
from vggt.wording import plural

MAX_POINTS = 150_000  # points drawn over all frames (each frame's pixels are subsampled evenly)
CONFIDENCE_DROPPED = 0.1  # the least confident tenth of each frame's points is left out
QUERY_COLOUR = (255, 0, 255)
CAMERA_COLOUR = (200, 200, 200)
QUERY_CAMERA_COLOUR = (255, 80, 80)


@dataclass(frozen=True)
class PointCloud:
    """What the 3D view draws.

    Attributes
    ----------
    points : np.ndarray
        ``[N, 3]`` float32 world points (the export's coordinates).
    colours : np.ndarray
        ``[N, 3]`` uint8.
    segments : np.ndarray
        ``[M, 2, 3]`` float32 line segments: the query's marker and the camera frustums.
    segment_colours : np.ndarray
        ``[M, 3]`` uint8.
    readout : list of str
        What is shown, as text.
    """

    points: np.ndarray
    colours: np.ndarray
    segments: np.ndarray
    segment_colours: np.ndarray
    readout: list[str]


def _frame_points(
    loaded: LoadedExport, frame: int, codes: np.ndarray | None, step: int, opacity: float
) -> tuple[np.ndarray, np.ndarray]:
    """One frame's sampled points and their overlay colours (``codes`` ``[H_ds, W_ds]`` or ``None``)."""
    geometry = loaded.export.geometry()
    grid = loaded.geometry
    rows = np.arange(step // 2, grid.height, step)
    cols = np.arange(step // 2, grid.width, step)
    points = np.asarray(geometry.world_points[frame][np.ix_(rows, cols)], dtype=np.float32).reshape(-1, 3)
    confidence = np.asarray(geometry.world_points_conf[frame][np.ix_(rows, cols)], dtype=np.float32).ravel()
    base = loaded.frames[frame][np.ix_(rows, cols)].reshape(-1, 3).astype(np.int64)
    if codes is None:
        colours = base.astype(np.uint8)
    else:
        cell_rows = cell_index(rows, grid.stride_h, grid.patch_size, grid.H_ds)
        cell_cols = cell_index(cols, grid.stride_w, grid.patch_size, grid.W_ds)
        code = codes[np.ix_(cell_rows, cell_cols)].reshape(-1, 1).astype(np.int64)
        table = render.blend_table(round(float(np.clip(opacity, 0.0, 1.0)), 3))
        colours = table[code * 768 + base * 3 + np.arange(3)]  # the overlays' blending, exactly
    keep = np.isfinite(points).all(axis=1) & np.isfinite(confidence)
    if keep.any():
        keep &= confidence >= np.quantile(confidence[keep], CONFIDENCE_DROPPED)
    return points[keep], colours[keep]


def _cross(centre: np.ndarray, size: float) -> np.ndarray:
    """Three segments through ``centre`` along the axes: ``[3, 2, 3]``."""
    offsets = np.eye(3, dtype=np.float32) * size
    return np.stack([centre - offsets, centre + offsets], axis=1)


def _frustum(loaded: LoadedExport, frame: int, depth: float) -> np.ndarray:
    """A camera as 8 segments: its centre to the image corners at ``depth``, and the image rectangle."""
    geometry = loaded.export.geometry()
    width, height = loaded.geometry.width, loaded.geometry.height
    camera = Camera(
        np.asarray(geometry.intrinsic[frame], np.float64),
        np.asarray(geometry.extrinsic[frame], np.float64),
        width,
        height,
    )
    centre = unproject(np.float64(0), np.float64(0), np.float64(0), camera)  # z = 0: the camera centre
    u = np.array([-0.5, width - 0.5, width - 0.5, -0.5])
    v = np.array([-0.5, -0.5, height - 0.5, height - 0.5])
    corners = unproject(u, v, np.full(4, depth), camera)
    rays = [(centre, corner) for corner in corners]
    rim = [(corners[i], corners[(i + 1) % 4]) for i in range(4)]
    return np.asarray(rays + rim, dtype=np.float32)


def attention_cloud(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> PointCloud:
    """The points of every frame coloured by the attention of query cell ``query`` (layer, head and
    opacity of ``settings``), the query's point marked, the cameras drawn.

    Raises
    ------
    ViewerError
        When the export holds no geometry.
    """
    geometry = loaded.export.geometry()
    if geometry is None:
        raise ViewerError("this export holds no geometry (export with --geometry for the 3D view)")
    grid = loaded.geometry
    qi = views.query_index(loaded, query)
    normalized, scale = views.display_maps(loaded, settings.layer, qi, settings.head)
    codes = render.to_codes(normalized)
    frames = key_frames(loaded, settings.layer)
    step = max(1, math.ceil(math.sqrt(loaded.num_frames * grid.height * grid.width / MAX_POINTS)))
    parts = [
        _frame_points(loaded, frame, codes[frames.index(frame)] if frame in frames else None, step,
                      settings.opacity)
        for frame in range(loaded.num_frames)
    ]  # fmt: skip
    points = np.concatenate([p for p, _ in parts]) if parts else np.zeros((0, 3), np.float32)
    colours = np.concatenate([c for _, c in parts]) if parts else np.zeros((0, 3), np.uint8)
    if len(points) == 0:
        raise ViewerError("the export's predicted points are all unknown (not finite)")
    extent = float(np.linalg.norm(np.percentile(points, 95, axis=0) - np.percentile(points, 5, axis=0)))
    extent = extent if extent > 0 else 1.0
    x, y = geometry.query_points[qi]
    row = int(np.clip(round(float(y)), 0, grid.height - 1))
    col = int(np.clip(round(float(x)), 0, grid.width - 1))
    own = np.asarray(geometry.world_points[0][row, col], dtype=np.float32)
    segments = [_frustum(loaded, frame, 0.08 * extent) for frame in range(loaded.num_frames)]
    segment_colours = [
        np.tile(np.uint8(QUERY_CAMERA_COLOUR if frame == 0 else CAMERA_COLOUR), (8, 1))
        for frame in range(loaded.num_frames)
    ]
    sampled = "every pixel" if step == 1 else f"one pixel in {step} along each axis"
    readout = [
        f"{len(points)} predicted points of {plural(loaded.num_frames, 'frame')} ({sampled}; the least "
        f"confident {CONFIDENCE_DROPPED:.0%} of each frame left out), coloured as the overlays (full "
        f"colour = probability {scale:.4g})",
        "Cameras: the query frame's in red, the others in grey",
    ]
    if np.isfinite(own).all():
        segments.append(_cross(own, 0.03 * extent))
        segment_colours.append(np.tile(np.uint8(QUERY_COLOUR), (3, 1)))
        readout.append(f"The query's own point (cell row {query[0]}, col {query[1]}): the magenta cross")
    else:
        readout.append("The query's own point is unknown in the predicted points: no cross")
    return PointCloud(
        points.astype(np.float32),
        colours.astype(np.uint8),
        np.concatenate(segments).astype(np.float32),
        np.concatenate(segment_colours).astype(np.uint8),
        readout,
    )


# ---- GLB ----------------------------------------------------------------------------------------------

_FLOAT, _UNSIGNED_BYTE = 5126, 5121
_POINTS, _LINES = 0, 1


def write_glb(cloud: PointCloud, path: Path | str) -> Path:
    """Write ``cloud`` as a binary glTF 2.0 file: a point primitive and a line primitive, each vertex
    with an RGBA colour; y up (``(x, -y, -z)`` of the export's coordinates)."""
    flip = np.float32([1, -1, -1])
    line_vertices = cloud.segments.reshape(-1, 3)
    line_colours = np.repeat(cloud.segment_colours, 2, axis=0)
    blobs: list[bytes] = []
    views_json: list[dict] = []
    accessors: list[dict] = []

    def add(array: np.ndarray, accessor: dict) -> int:
        offset = sum(len(blob) for blob in blobs)
        data = np.ascontiguousarray(array).tobytes()
        blobs.append(data + b"\0" * (-len(data) % 4))
        views_json.append({"buffer": 0, "byteOffset": offset, "byteLength": len(data), "target": 34962})
        accessors.append(accessor | {"bufferView": len(views_json) - 1, "count": len(array)})
        return len(accessors) - 1

    def positions(vertices: np.ndarray) -> int:
        vertices = (vertices * flip).astype(np.float32)
        bounds = {"min": vertices.min(axis=0).tolist(), "max": vertices.max(axis=0).tolist()}
        return add(vertices, {"componentType": _FLOAT, "type": "VEC3"} | bounds)

    def colours(rgb: np.ndarray) -> int:
        rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
        return add(rgba, {"componentType": _UNSIGNED_BYTE, "type": "VEC4", "normalized": True})

    primitives = []
    for vertices, rgb, mode in (
        (cloud.points, cloud.colours, _POINTS),
        (line_vertices, line_colours, _LINES),
    ):
        if len(vertices):
            primitives.append({"attributes": {"POSITION": positions(vertices), "COLOR_0": colours(rgb)},
                               "mode": mode})  # fmt: skip
    binary = b"".join(blobs)
    document = {
        "asset": {"version": "2.0", "generator": "vggt-attn viewer"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": primitives}],
        "accessors": accessors,
        "bufferViews": views_json,
        "buffers": [{"byteLength": len(binary)}],
    }
    text = json.dumps(document, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(binary)
    path = Path(path)
    with path.open("wb") as out:
        out.write(struct.pack("<4sII", b"glTF", 2, total))
        out.write(struct.pack("<I4s", len(text), b"JSON") + text)
        out.write(struct.pack("<I4s", len(binary), b"BIN\0") + binary)
    return path
