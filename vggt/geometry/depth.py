"""Depth maps to 3D points (numpy; upstream VGGT's name and conventions)."""

from __future__ import annotations

import numpy as np

from .scene import Camera, unproject


def _to_numpy(array) -> np.ndarray:
    """A numpy array from an array or a torch tensor (without importing torch)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def unproject_depth_map_to_point_map(depth_map, extrinsics_cam, intrinsics_cam) -> np.ndarray:
    """World points of every pixel of every frame.

    Parameters
    ----------
    depth_map : array or torch.Tensor
        ``[S, H, W, 1]`` or ``[S, H, W]``, camera z at each pixel centre.
    extrinsics_cam : array or torch.Tensor
        ``[S, 3, 4]`` world-to-camera ``[R | t]`` (OpenCV axes). With VGGT's predictions the world is
        the first camera's frame, so the first extrinsic is ``[I | 0]``.
    intrinsics_cam : array or torch.Tensor
        ``[S, 3, 3]`` in pixels, without skew.

    Returns
    -------
    np.ndarray
        ``[S, H, W, 3]`` float64 world coordinates; pixel ``(u, v)`` is (column, row), centre of the
        top-left pixel at ``(0, 0)``.
    """
    depth = _to_numpy(depth_map)
    extrinsics, intrinsics = _to_numpy(extrinsics_cam), _to_numpy(intrinsics_cam)
    if depth.ndim == 4 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 3 or extrinsics.shape != (len(depth), 3, 4) or intrinsics.shape != (len(depth), 3, 3):
        raise ValueError(
            f"expected depth [S, H, W(, 1)], extrinsics [S, 3, 4], intrinsics [S, 3, 3]; got "
            f"{list(_to_numpy(depth_map).shape)}, {list(extrinsics.shape)}, {list(intrinsics.shape)}"
        )
    if np.any(intrinsics[:, 0, 1]) or np.any(intrinsics[:, 1, 0]):
        raise ValueError("intrinsics with skew are not supported")
    height, width = depth.shape[1:]
    v, u = np.mgrid[0:height, 0:width]
    return np.stack(
        [
            unproject(u, v, frame_depth, Camera(K, extrinsic, width, height))
            for frame_depth, extrinsic, K in zip(depth, extrinsics, intrinsics, strict=True)
        ]
    )
