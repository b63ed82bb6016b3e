"""Output activations of the heads, by the names upstream's configurations use."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def inverse_log_transform(y: Tensor) -> Tensor:
    """``sign(y) * (exp(|y|) - 1)``: the inverse of ``sign(x) * log(1 + |x|)``."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


def _norm_exp(xyz: Tensor) -> Tensor:
    norm = xyz.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return xyz / norm * torch.expm1(norm)


def _xy_inv_log(xyz: Tensor) -> Tensor:
    xy, z = xyz.split([2, 1], dim=-1)
    z = inverse_log_transform(z)
    return torch.cat([xy * z, z], dim=-1)


BASE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda x: x,
    "inv_log": inverse_log_transform,
    "exp": torch.exp,
    "relu": F.relu,
}

DENSE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = BASE_ACTIVATIONS | {
    "norm_exp": _norm_exp,
    "norm": lambda x: x / x.norm(dim=-1, keepdim=True),
    "xy_inv_log": _xy_inv_log,
    "sigmoid": torch.sigmoid,
}

CONF_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "expp1": lambda c: 1 + c.exp(),
    "expp0": torch.exp,
    "sigmoid": torch.sigmoid,
}


def _lookup(table: dict[str, Callable], name: str, what: str) -> Callable[[Tensor], Tensor]:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} activation {name!r}; known: {', '.join(table)}") from None


def activate_pose(
    pose_enc: Tensor, trans_act: str = "linear", quat_act: str = "linear", fl_act: str = "linear"
) -> Tensor:
    """Activate each part of a pose encoding ``[..., 9]``: translation, quaternion, fields of view."""
    translation, quaternion, fov = pose_enc[..., :3], pose_enc[..., 3:7], pose_enc[..., 7:]
    return torch.cat(
        [
            _lookup(BASE_ACTIVATIONS, trans_act, "translation")(translation),
            _lookup(BASE_ACTIVATIONS, quat_act, "quaternion")(quaternion),
            _lookup(BASE_ACTIVATIONS, fl_act, "field of view")(fov),
        ],
        dim=-1,
    )


def activate_head(
    out: Tensor, activation: str = "norm_exp", conf_activation: str = "expp1"
) -> tuple[Tensor, Tensor]:
    """Split a dense head's output ``[N, D + 1, H, W]``: values ``[N, H, W, D]``, confidence ``[N, H, W]``.

    The last channel is the confidence; the others are activated together (depth: ``D = 1``, points:
    ``D = 3``).
    """
    out = out.permute(0, 2, 3, 1)
    values = _lookup(DENSE_ACTIVATIONS, activation, "output")(out[..., :-1])
    confidence = _lookup(CONF_ACTIVATIONS, conf_activation, "confidence")(out[..., -1])
    return values, confidence
