"""2D rotary position embedding applied to queries and keys of the aggregator's attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def patch_positions(batch: int, grid_h: int, grid_w: int, device: torch.device | str) -> Tensor:
    """Row/column index of every patch, row-major.

    Returns
    -------
    Tensor
        ``[batch, grid_h * grid_w, 2]`` int64, last axis ``(row, col)``.
    """
    rows = torch.arange(grid_h, device=device)
    cols = torch.arange(grid_w, device=device)
    grid = torch.cartesian_prod(rows, cols)
    return grid.view(1, grid_h * grid_w, 2).expand(batch, -1, -1).clone()


class RotaryPositionEmbedding2D(nn.Module):
    """Rotary embedding over two axes: the first half of each head's features encodes the row,
    the second half the column. Holds no parameters.
    """

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.frequency = frequency
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _cos_sin(
        self, dim: int, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        key = (dim, length, device, dtype)
        if key not in self._tables:
            inv_freq = 1.0 / (self.frequency ** (torch.arange(0, dim, 2, device=device).float() / dim))
            steps = torch.arange(length, device=device, dtype=inv_freq.dtype)
            angles = torch.outer(steps, inv_freq).to(dtype)
            angles = torch.cat((angles, angles), dim=-1)
            self._tables[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._tables[key]

    @staticmethod
    def _rotate_half(x: Tensor) -> Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def _rotate_1d(self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cos_at = nn.functional.embedding(positions, cos)[:, None]
        sin_at = nn.functional.embedding(positions, sin)[:, None]
        return x * cos_at + self._rotate_half(x) * sin_at

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` ``[B, heads, N, head_dim]`` by ``positions`` ``[B, N, 2]`` (row, col)."""
        half = x.shape[-1] // 2
        cos, sin = self._cos_sin(half, int(positions.max()) + 1, x.device, x.dtype)
        rows, cols = x.chunk(2, dim=-1)
        rows = self._rotate_1d(rows, positions[..., 0], cos, sin)
        cols = self._rotate_1d(cols, positions[..., 1], cos, sin)
        return torch.cat((rows, cols), dim=-1)
