"""Rotation matrices and unit quaternions (scalar last: ``x, y, z, w``), in torch."""

from __future__ import annotations

import torch
from torch import Tensor


def quat_to_mat(quaternions: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` of quaternions ``[..., 4]`` (``x, y, z, w``; any non-zero norm)."""
    x, y, z, w = quaternions.unbind(-1)
    two_s = 2.0 / (quaternions * quaternions).sum(-1)
    matrix = torch.stack(
        (
            1 - two_s * (y * y + z * z),
            two_s * (x * y - z * w),
            two_s * (x * z + y * w),
            two_s * (x * y + z * w),
            1 - two_s * (x * x + z * z),
            two_s * (y * z - x * w),
            two_s * (x * z - y * w),
            two_s * (y * z + x * w),
            1 - two_s * (x * x + y * y),
        ),
        dim=-1,
    )
    return matrix.reshape(quaternions.shape[:-1] + (3, 3))


def mat_to_quat(matrix: Tensor) -> Tensor:
    """Unit quaternions ``[..., 4]`` (``x, y, z, w`` with ``w >= 0``) of rotation matrices ``[..., 3, 3]``.

    Each of ``4w^2, 4x^2, 4y^2, 4z^2`` follows from the diagonal; the quaternion is then read off the
    row of the largest one (the best-conditioned division).
    """
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices must be [..., 3, 3], not {list(matrix.shape)}")
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = matrix.reshape(matrix.shape[:-2] + (9,)).unbind(-1)
    squares = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )
    positive = squares > 0
    twice_abs = torch.where(positive, torch.sqrt(torch.where(positive, squares, 1.0)), 0.0)  # 2|w|, 2|x|, ...
    # Row i is the quaternion (w, x, y, z) times 4 * q_i, for q_i = w, x, y, z in turn.
    scaled = torch.stack(
        [
            torch.stack([twice_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, twice_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, twice_abs[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, twice_abs[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    )
    candidates = scaled / (2.0 * twice_abs[..., None].clamp(min=0.1))
    best = twice_abs.argmax(dim=-1)[..., None, None].expand(*matrix.shape[:-2], 1, 4)
    wxyz = candidates.gather(-2, best).squeeze(-2)
    return standardize_quaternion(wxyz[..., [1, 2, 3, 0]])


def standardize_quaternion(quaternions: Tensor) -> Tensor:
    """The same rotations with a non-negative real part ``w`` (``q`` and ``-q`` are one rotation)."""
    return torch.where(quaternions[..., 3:4] < 0, -quaternions, quaternions)
