"""VGGT's camera encoding ``absT_quaR_FoV`` and back, in torch (upstream's names and conventions).

A pose encoding ``[..., 9]`` holds the extrinsic's translation ``t`` (3), its rotation as a quaternion
``x, y, z, w`` (4), then the vertical and horizontal fields of view in radians (2). Extrinsics
``[..., 3, 4]`` are ``[R | t]``, world to camera, OpenCV axes; intrinsics ``[..., 3, 3]`` are in pixels
with the principal point at the image centre.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rotation import mat_to_quat, quat_to_mat

POSE_ENCODING_TYPES = ("absT_quaR_FoV",)


def _check_type(pose_encoding_type: str) -> None:
    if pose_encoding_type not in POSE_ENCODING_TYPES:
        raise NotImplementedError(
            f"pose encoding {pose_encoding_type!r} (known: {', '.join(POSE_ENCODING_TYPES)})"
        )


def extri_intri_to_pose_encoding(
    extrinsics: Tensor,
    intrinsics: Tensor,
    image_size_hw: tuple[int, int] | None = None,
    pose_encoding_type: str = "absT_quaR_FoV",
) -> Tensor:
    """Encode cameras: extrinsics ``[B, S, 3, 4]`` and intrinsics ``[B, S, 3, 3]`` -> ``[B, S, 9]`` float32.

    ``image_size_hw`` (height, width) in pixels turns the focal lengths into fields of view.
    """
    _check_type(pose_encoding_type)
    if image_size_hw is None:
        raise ValueError("image_size_hw (height, width) is needed to compute the fields of view")
    height, width = image_size_hw
    rotation, translation = extrinsics[..., :3, :3], extrinsics[..., :3, 3]
    fov_h = 2 * torch.atan((height / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((width / 2) / intrinsics[..., 0, 0])
    return torch.cat([translation, mat_to_quat(rotation), fov_h[..., None], fov_w[..., None]], dim=-1).float()


def pose_encoding_to_extri_intri(
    pose_encoding: Tensor,
    image_size_hw: tuple[int, int] | None = None,
    pose_encoding_type: str = "absT_quaR_FoV",
    build_intrinsics: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Decode ``[B, S, 9]`` -> extrinsics ``[B, S, 3, 4]`` and intrinsics ``[B, S, 3, 3]`` (or ``None``).

    The quaternion need not be normalized (the camera head's is not). ``image_size_hw`` (height,
    width) in pixels is needed for the intrinsics: focal lengths from the fields of view, principal
    point ``(W / 2, H / 2)``.
    """
    _check_type(pose_encoding_type)
    translation, quaternion = pose_encoding[..., :3], pose_encoding[..., 3:7]
    fov_h, fov_w = pose_encoding[..., 7], pose_encoding[..., 8]
    extrinsics = torch.cat([quat_to_mat(quaternion), translation[..., None]], dim=-1)
    if not build_intrinsics:
        return extrinsics, None
    if image_size_hw is None:
        raise ValueError("image_size_hw (height, width) is needed to build the intrinsics")
    height, width = image_size_hw
    intrinsics = torch.zeros(
        pose_encoding.shape[:-1] + (3, 3), dtype=pose_encoding.dtype, device=pose_encoding.device
    )
    intrinsics[..., 0, 0] = (width / 2.0) / torch.tan(fov_w / 2.0)
    intrinsics[..., 1, 1] = (height / 2.0) / torch.tan(fov_h / 2.0)
    intrinsics[..., 0, 2] = width / 2
    intrinsics[..., 1, 2] = height / 2
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics
