"""The tests' one reference for pooling attention rows onto the query grid, written from the schema
(attn_maps_schema.md) in float64 numpy, cell by cell, independently of the package's capture code."""

from __future__ import annotations

import math

import numpy as np

PATCH = 14
SPECIAL = 5  # camera token and four registers of the tiny reference model


def query_rows(grid_h: int, grid_w: int, stride_h: int, stride_w: int, special: int = SPECIAL) -> list[int]:
    """Rows (within a frame's tokens) of the query grid's patches, row-major: every ``stride_h``-th row
    and ``stride_w``-th column of the patch grid, after the frame's ``special`` tokens."""
    return [special + r * grid_w + c for r in range(0, grid_h, stride_h) for c in range(0, grid_w, stride_w)]


def pool(
    rows: np.ndarray,
    frames: int,
    grid_h: int,
    grid_w: int,
    stride_h: int,
    stride_w: int,
    special: int = SPECIAL,
) -> tuple[np.ndarray, np.ndarray]:
    """``[..., frames * (special + grid_h * grid_w)]`` probabilities -> the pooled maps
    ``[..., frames, H_ds, W_ds]`` (each cell the sum of its block of patches; the last row and column of
    cells narrower where a stride does not divide the grid) and the special tokens' mass
    ``[..., frames, special]``."""
    by_frame = rows.reshape(*rows.shape[:-1], frames, special + grid_h * grid_w)
    patches = by_frame[..., special:].reshape(*by_frame.shape[:-1], grid_h, grid_w)
    H_ds, W_ds = math.ceil(grid_h / stride_h), math.ceil(grid_w / stride_w)
    pooled = np.zeros((*by_frame.shape[:-1], H_ds, W_ds))
    for r in range(H_ds):
        for c in range(W_ds):
            block = patches[..., r * stride_h : (r + 1) * stride_h, c * stride_w : (c + 1) * stride_w]
            pooled[..., r, c] = block.sum(axis=(-2, -1))
    return pooled, by_frame[..., :special]


def expected_pooled(reference, layer: int, stride_h: int, stride_w: int, per_head: bool):
    """Upstream's global attention of frame 0's query-grid patches (the tiny reference's fixture), pooled.

    Returns float64 maps ``[Q, (heads,) S, H_ds, W_ds]`` and special mass ``[Q, (heads,) S, 5]``.
    """
    probs = reference[f"expected.attn.global.{layer}"][0].double().numpy()  # [heads, N, N]
    _, frames, _, height, width = reference["input.images"].shape
    grid_h, grid_w = height // PATCH, width // PATCH
    rows = query_rows(grid_h, grid_w, stride_h, stride_w)
    maps, special_mass = pool(probs[:, rows], frames, grid_h, grid_w, stride_h, stride_w)  # [heads, Q, ...]
    maps, special_mass = maps.swapaxes(0, 1), special_mass.swapaxes(0, 1)
    if not per_head:
        return maps.mean(axis=1), special_mass.mean(axis=1)
    return maps, special_mass
