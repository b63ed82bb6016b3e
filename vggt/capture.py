"""Capture of global attention from the query frame's patches, through the model's hook points.

For one forward pass, :class:`GlobalAttentionCapture` attaches to ``aggregator.global_blocks[i].attn.hook_qk``
of the chosen layers, recomputes the softmax rows of the query frame's patch tokens in chunks from
the hooked ``q`` and ``k`` (never the full N x N matrix), pools every frame's patch probabilities onto
the query grid and hands each finished layer to a callback. Hooks are removed on exit, also on error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class QueryGrid:
    """Query grid on the ``grid_h x grid_w`` patch grid: every ``stride_h``-th row and ``stride_w``-th column.

    Query ``qi = qr * W_ds + qc`` is the patch at row ``qr * stride_h``, column ``qc * stride_w``. Key
    cell ``(r, c)`` covers patch rows ``[r * stride_h, min((r + 1) * stride_h, grid_h))`` and the
    columns likewise, so the last row/column of cells is ragged when a stride does not divide the grid.
    """

    grid_h: int
    grid_w: int
    stride_h: int = 1
    stride_w: int = 1

    def __post_init__(self) -> None:
        if self.stride_h < 1 or self.stride_w < 1:
            raise ValueError(f"strides must be at least 1, got {self.stride_h}x{self.stride_w}")

    @property
    def H_ds(self) -> int:  # noqa: N802 - the format's name
        return math.ceil(self.grid_h / self.stride_h)

    @property
    def W_ds(self) -> int:  # noqa: N802 - the format's name
        return math.ceil(self.grid_w / self.stride_w)

    @property
    def num_queries(self) -> int:
        return self.H_ds * self.W_ds

    def query_patch_indices(self) -> Tensor:
        """Row-major patch index (within a frame) of every query: ``[Q]`` int64."""
        rows = torch.arange(0, self.grid_h, self.stride_h)
        cols = torch.arange(0, self.grid_w, self.stride_w)
        return (rows[:, None] * self.grid_w + cols[None, :]).reshape(-1)

    def pool(self, patch_probs: Tensor) -> Tensor:
        """Sum ``[..., grid_h, grid_w]`` over each cell's patch block -> ``[..., H_ds, W_ds]``."""
        if self.stride_h == 1 and self.stride_w == 1:
            return patch_probs
        pad_h = self.H_ds * self.stride_h - self.grid_h
        pad_w = self.W_ds * self.stride_w - self.grid_w
        padded = F.pad(patch_probs, (0, pad_w, 0, pad_h))
        lead = padded.shape[:-2]
        blocks = padded.reshape(*lead, self.H_ds, self.stride_h, self.W_ds, self.stride_w)
        return blocks.sum(dim=(-3, -1))


@dataclass
class CapturedLayer:
    """One layer's pooled attention of the query-frame patches (float32, CPU).

    Attributes
    ----------
    block_index : int
        0-based index into ``aggregator.global_blocks``.
    maps : Tensor
        ``[Q, heads, S, H_ds, W_ds]`` (per head) or ``[Q, S, H_ds, W_ds]`` (head average). Per head it
        is a view of head-major storage, so ``maps[:, h]`` is contiguous.
    special_mass : Tensor
        ``[Q, heads, S, n_special]`` or ``[Q, S, n_special]``: mass on each frame's camera and register
        tokens, a view like ``maps``.
    head_mean : Tensor
        ``[Q, S, H_ds, W_ds]``: the maps averaged over heads (``maps`` itself when averaged).
    """

    block_index: int
    maps: Tensor
    special_mass: Tensor
    head_mean: Tensor


class GlobalAttentionCapture:
    """Context manager capturing the chosen global layers during one forward pass of batch size 1.

    Parameters
    ----------
    aggregator : nn.Module
        The model's aggregator (``model.aggregator``).
    grid : QueryGrid
        Patch grid of the frames and the strides.
    block_indices : Sequence[int]
        0-based global blocks to capture.
    per_head : bool
        Keep every head, or average over heads.
    on_layer : Callable[[CapturedLayer], None]
        Called as soon as each layer is captured, while the forward pass goes on; what it does not
        keep is freed at once.
    query_chunk : int | None
        Queries per softmax chunk; by default sized for about 64 MB of scratch.
    """

    def __init__(
        self,
        aggregator: nn.Module,
        grid: QueryGrid,
        block_indices: Sequence[int],
        per_head: bool,
        on_layer: Callable[[CapturedLayer], None],
        query_chunk: int | None = None,
    ) -> None:
        self.aggregator = aggregator
        self.grid = grid
        self.block_indices = list(block_indices)
        self.per_head = per_head
        self.on_layer = on_layer
        self.query_chunk = query_chunk
        self.patch_start_idx: int = aggregator.patch_start_idx
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> GlobalAttentionCapture:
        blocks = self.aggregator.global_blocks
        for index in self.block_indices:
            if not 0 <= index < len(blocks):
                raise ValueError(f"global block {index} does not exist (the model has {len(blocks)})")
        try:
            for index in self.block_indices:
                hook = self._make_hook(index)
                self._handles.append(blocks[index].attn.hook_qk.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, block_index: int) -> Callable:
        def hook(module: nn.Module, args: tuple[Tensor, Tensor], output) -> None:
            q, k = args
            self.on_layer(
                pooled_query_attention(
                    q, k, self.grid, self.patch_start_idx, self.per_head, block_index, self.query_chunk
                )
            )

        return hook


def pooled_query_attention(
    q: Tensor,
    k: Tensor,
    grid: QueryGrid,
    patch_start_idx: int,
    per_head: bool,
    block_index: int = 0,
    query_chunk: int | None = None,
) -> CapturedLayer:
    """Softmax attention of frame 0's query-grid patches over all tokens, pooled per frame.

    Each chunk of queries goes through logits, softmax and pooling while it is in memory and lands in
    its final place; the result is written once.

    Parameters
    ----------
    q, k : Tensor
        ``[1, heads, S * tokens_per_frame, head_dim]`` as seen at a global block's hook point (any float
        dtype, any device).
    grid : QueryGrid
    patch_start_idx : int
        Special tokens per frame (camera + registers) ahead of the patches.
    per_head : bool
        Keep every head, or only their mean.
    block_index : int
        Recorded in the result.
    query_chunk : int | None
        Queries per softmax chunk; by default sized for about 32 MB of logits.

    Returns
    -------
    CapturedLayer
    """
    if q.shape[0] != 1:
        raise ValueError(f"attention capture takes batch size 1, got {q.shape[0]}")
    # Probabilities are computed in float32 even inside the forward pass's autocast region.
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        return _pooled_query_attention(q, k, grid, patch_start_idx, per_head, block_index, query_chunk)


def _pooled_query_attention(
    q: Tensor,
    k: Tensor,
    grid: QueryGrid,
    patch_start_idx: int,
    per_head: bool,
    block_index: int,
    query_chunk: int | None,
) -> CapturedLayer:
    heads, num_tokens, head_dim = q.shape[1:]
    tokens_per_frame = patch_start_idx + grid.grid_h * grid.grid_w
    if num_tokens % tokens_per_frame:
        raise ValueError(f"{num_tokens} tokens are not a whole number of frames of {tokens_per_frame}")
    frames = num_tokens // tokens_per_frame
    num_queries = grid.num_queries
    on_cpu = q.device.type == "cpu"

    query_rows = grid.query_patch_indices().to(q.device) + patch_start_idx  # frame 0 comes first
    keys_t = k[0].float().transpose(-2, -1).contiguous()  # [heads, head_dim, N]
    if query_chunk is None:
        query_chunk = max(1, (32 << 20) // (4 * heads * num_tokens))

    lead = (heads, num_queries) if per_head else (num_queries,)
    maps = torch.empty(*lead, frames, grid.H_ds, grid.W_ds, dtype=torch.float32)
    special = torch.empty(*lead, frames, patch_start_idx, dtype=torch.float32)
    head_mean = torch.empty(num_queries, frames, grid.H_ds, grid.W_ds) if per_head else maps

    def store(dest: Tensor, numerator: Tensor, denominator: Tensor) -> None:
        if on_cpu:
            torch.div(numerator, denominator, out=dest)
        else:
            dest.copy_(numerator / denominator)

    for start in range(0, num_queries, query_chunk):
        rows = query_rows[start : start + query_chunk]
        stop = start + rows.numel()
        queries = q[0][:, rows].float().mul_(head_dim**-0.5)  # [heads, c, head_dim]
        exps = torch.bmm(queries, keys_t)  # logits, then exp in place: [heads, c, N]
        exps.sub_(exps.amax(dim=-1, keepdim=True)).exp_()
        denominator = exps.sum(dim=-1, keepdim=True)
        if per_head:
            exps = exps.view(heads, -1, frames, tokens_per_frame)
            patch = grid.pool(exps[..., patch_start_idx:].unflatten(-1, (grid.grid_h, grid.grid_w)))
            store(maps[:, start:stop], patch, denominator[..., None, None])
            store(special[:, start:stop], exps[..., :patch_start_idx], denominator[..., None])
            torch.mean(maps[:, start:stop], dim=0, out=head_mean[start:stop])
        else:
            probs = exps.div_(denominator).mean(dim=0).view(-1, frames, tokens_per_frame)
            patch = grid.pool(probs[..., patch_start_idx:].unflatten(-1, (grid.grid_h, grid.grid_w)))
            maps[start:stop] = patch
            special[start:stop] = probs[..., :patch_start_idx]
    if per_head:
        return CapturedLayer(block_index, maps.transpose(0, 1), special.transpose(0, 1), head_mean)
    return CapturedLayer(block_index, maps, special, head_mean)
