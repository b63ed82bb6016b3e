"""Fixed sine-cosine embeddings of positions, used by the DPT heads and the tracker."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_embed(pos: Tensor, dim: int, omega_0: float) -> Tensor:
    """Embed scalar positions ``[...]`` as ``[M, dim]`` float32 (``M`` positions, flattened).

    The first ``dim / 2`` channels are ``sin(pos * w_i)``, the others ``cos(pos * w_i)``, with
    frequencies ``w_i = omega_0 ** (-2i / dim)``. Computed in float64 (float32 on MPS, which has no
    float64) and returned as float32.
    """
    if dim % 2:
        raise ValueError(f"a sine-cosine embedding needs an even size, not {dim}")
    dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = torch.arange(dim // 2, dtype=dtype, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0**omega
    angles = pos.reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def embed_position_grid(pos_grid: Tensor, dim: int, omega_0: float = 100) -> Tensor:
    """Embed a grid of 2D positions ``[H, W, 2]`` (x, y) as ``[H, W, dim]``: x in the first half."""
    height, width, _ = pos_grid.shape
    flat = pos_grid.reshape(-1, 2)
    embedding = torch.cat(
        [sincos_embed(flat[:, 0], dim // 2, omega_0), sincos_embed(flat[:, 1], dim // 2, omega_0)], dim=-1
    )
    return embedding.view(height, width, dim)


def uv_grid(
    width: int, height: int, aspect_ratio: float, dtype: torch.dtype | None = None, device=None
) -> Tensor:
    """Pixel-centre coordinates ``[height, width, 2]`` (u, v), centred on 0, spanning a box of
    ``aspect_ratio : 1`` whose diagonal is 2 (the pixel centres stop half a pixel inside it)."""
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    x_end = span_x * (width - 1) / width
    y_end = span_y * (height - 1) / height
    xs = torch.linspace(-x_end, x_end, steps=width, dtype=dtype, device=device)
    ys = torch.linspace(-y_end, y_end, steps=height, dtype=dtype, device=device)
    u, v = torch.meshgrid(xs, ys, indexing="xy")
    return torch.stack((u, v), dim=-1)


def pixel_grid_embedding(dim: int, height: int, width: int, device=None) -> Tensor:
    """Embedding ``[1, dim, height, width]`` of every pixel's integer (x, y) index (``omega_0`` 10000)."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    grid = torch.stack((xs, ys), dim=-1)
    return embed_position_grid(grid, dim, omega_0=10000).permute(2, 0, 1)[None].to(device)


def flow_embedding(xy: Tensor, dim: int) -> Tensor:
    """Embed 2D displacements ``[B, N, 2]`` as ``[B, N, 2 * dim]``: x then y, each with interleaved
    ``sin`` / ``cos`` at frequencies ``k * 1000 / dim`` for even ``k < dim``."""
    freqs = torch.arange(0, dim, 2, device=xy.device, dtype=torch.float32) * (1000.0 / dim)
    parts = []
    for coord in (xy[..., 0:1], xy[..., 1:2]):
        angles = coord * freqs
        parts.append(torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)
