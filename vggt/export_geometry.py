"""The geometry of an export (``--geometry``): VGGT's heads on the tokens of the export's own forward pass.

The exporter's forward pass keeps the aggregator outputs the heads read (:meth:`VGGT.head_layers`, four
block pairs for VGGT-1B), then :func:`predict_geometry` runs the camera, depth, point and track heads on
them once, the track head with the query points (each query patch's centre in frame 0) as its queries.
What it returns is what :meth:`vggt.attn_format.ExportWriter.write_geometry` stores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from vggt.attn_format.geometry import ARRAY_SPECS, TRACK_VISIBILITY_THRESHOLD
from vggt.attn_format.grid import cell_centres, in_frame
from vggt.capture import QueryGrid
from vggt.device import autocast_context
from vggt.geometry.correspondence import (
    PREDICTED_OCCLUSION_REL_TOL,
    predicted_correspondences,
    true_correspondences,
)
from vggt.geometry.pose_encoding import pose_encoding_to_extri_intri

HEAD_NAMES = ("camera_head", "depth_head", "point_head", "track_head")
# The heads' time as a share of the aggregator's pass, for the plan printout. The heads' arithmetic is
# 26% of the aggregator's for VGGT-1B on 3 frames of 518x392 (1.9 against 7.2 TFLOP: the heads counted
# by torch's FlopCounterMode, 1.4 for camera, depth and point, 0.5 for the track head with 266 query
# points); both grow with the frames and pixels, so the share holds roughly at other sizes.
# bench/export_bench.py --geometry measures the time itself.
GEOMETRY_TIME_SHARE = 0.26


def check_heads(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` has all four heads (``--geometry`` needs every one)."""
    missing = [name for name in HEAD_NAMES if getattr(model, name, None) is None]
    if missing:
        raise ValueError(f"--geometry needs the model's heads; it has no {', '.join(missing)}")


def query_points_of(grid: QueryGrid, patch_size: int) -> np.ndarray:
    """The track head's query points: each query patch's centre in frame 0, ``[Q, 2]`` float32."""
    return cell_centres(grid.grid_h, grid.grid_w, grid.stride_h, grid.stride_w, patch_size)


def geometry_bytes(num_frames: int, image_size: tuple[int, int], num_queries: int, truth: bool) -> int:
    """Bytes of an export's ``geometry/`` part (uncompressed)."""
    sizes = {"S": num_frames, "H": image_size[0], "W": image_size[1], "Q": num_queries}
    total = 4096
    for key, (dtype, shape) in ARRAY_SPECS.items():
        if key.startswith("truth_") and not truth:
            continue
        count = int(np.prod([sizes[n] if isinstance(n, str) else n for n in shape]))
        total += count * np.dtype(dtype).itemsize + 256
    return total


def head_outputs_bytes(model: nn.Module, num_frames: int, image_size: tuple[int, int]) -> int:
    """Memory the kept aggregator outputs take during the pass (float32 on the CPU)."""
    config = model.config.aggregator
    tokens = config.patch_start_idx + (image_size[0] // config.patch_size) * (
        image_size[1] // config.patch_size
    )
    return len(model.head_layers()) * num_frames * tokens * 2 * config.embed_dim * 4


def predict_geometry(
    model: nn.Module,
    tokens: list[Tensor | None],
    patch_start_idx: int,
    images: Tensor,
    query_points: np.ndarray,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, np.ndarray]:
    """Run the heads on the aggregator's outputs and derive the depth-and-camera correspondences.

    Parameters
    ----------
    model : nn.Module
        A :class:`vggt.models.vggt.VGGT` with its four heads.
    tokens : list of Tensor or None
        The aggregator's outputs of the export's pass (``None`` where no head reads them).
    patch_start_idx : int
    images : Tensor
        ``[1, S, 3, H, W]``, the pass's input (on the model's device).
    query_points : np.ndarray
        ``[Q, 2]`` pixel ``(x, y)`` in frame 0.
    autocast_dtype : torch.dtype, optional
        The pass's autocast dtype; the heads follow :meth:`VGGT.run_heads` (camera, depth and point heads
        in float32, the track head under autocast).

    Returns
    -------
    dict
        The predicted members of :data:`vggt.attn_format.geometry.ARRAY_SPECS` (all but ``truth_*``),
        as numpy arrays.
    """
    device = images.device
    height, width = images.shape[-2:]
    queries = torch.from_numpy(np.ascontiguousarray(query_points, np.float32)).to(device)
    with torch.inference_mode(), autocast_context(device, autocast_dtype):
        predictions = model.run_heads(tokens, images, patch_start_idx, queries)
        extrinsic, intrinsic = pose_encoding_to_extri_intri(predictions["pose_enc"].float(), (height, width))

    def host(tensor: Tensor) -> np.ndarray:
        return tensor[0].detach().to("cpu", torch.float32).numpy()

    depth = host(predictions["depth"])[..., 0]
    extrinsic, intrinsic = host(extrinsic), host(intrinsic)
    track_xy = host(predictions["track"])
    visibility, confidence = host(predictions["vis"]), host(predictions["conf"])
    depth_xy, depth_visible = predicted_correspondences(
        query_points, depth, extrinsic, intrinsic, PREDICTED_OCCLUSION_REL_TOL
    )
    return {
        "extrinsic": extrinsic,
        "intrinsic": intrinsic,
        "depth": depth,
        "depth_conf": host(predictions["depth_conf"]),
        "world_points": host(predictions["world_points"]),
        "world_points_conf": host(predictions["world_points_conf"]),
        "query_points": np.asarray(query_points, np.float32),
        "track_xy": track_xy,
        "track_visible": (visibility >= TRACK_VISIBILITY_THRESHOLD) & in_frame(track_xy, (height, width)),
        "track_visibility": visibility,
        "track_confidence": confidence,
        "depth_xy": depth_xy,
        "depth_visible": depth_visible,
    }


def truth_arrays(
    scene: str | os.PathLike[str],
    sources: Sequence[str],
    preprocess_mode: str,
    image_size: tuple[int, int],
    grid: QueryGrid,
    patch_size: int,
) -> dict[str, np.ndarray]:
    """The ``truth_*`` members for frames that come from ``scene``
    (:func:`vggt.geometry.correspondence.true_correspondences`)."""
    grid_fields = {
        "H_p": grid.grid_h,
        "W_p": grid.grid_w,
        "stride_h": grid.stride_h,
        "stride_w": grid.stride_w,
        "patch_size": patch_size,
    }
    xy, visible = true_correspondences(scene, sources, preprocess_mode, image_size, grid_fields)
    return {"truth_xy": xy, "truth_visible": visible}
