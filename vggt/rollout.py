"""Attention rollout through the aggregator's 48 attention layers, from the same single forward pass.

Every frame and global layer ``l`` (model order: frame 1, global 1, frame 2, ...) becomes a
row-stochastic transition matrix over the ``N = S * T`` aggregator tokens::

    A_l   = mean over heads of the layer's softmax probabilities   [N, N], block-diagonal for frame layers
    B_l   = (A_l + I) / rowsum(A_l + I)                                  the residual path
    D_l   = B_l with the floor(discard_ratio * N) smallest entries of each row set to 0
    B'_l  = D_l / rowsum(D_l)                                            rows stay distributions
    R     = B'_L @ ... @ B'_2 @ B'_1                                    rollout, rows: output tokens

Rows of ``R`` are kept for the query grid's patches of frame 0 and every frame's camera token, and
pooled onto each frame's grid like the layer maps. The matrices are formed while the forward pass runs
(:func:`rollout_memory_bytes` tells how much they take) and multiplied afterwards, starting from the
kept rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from vggt.attn_format.schema import ROLLOUT_KIND
from vggt.capture import CapturedLayer, LayerRef, QueryGrid, attention_chunks, sequence_layout
from vggt.device import gpu_has_room
from vggt.models.hooks import HookSession

DEFAULT_DISCARD_RATIO = 0.9


def rollout_memory_bytes(num_frames: int, tokens_per_frame: int, depth: int, num_rows: int) -> int:
    """Memory the rollout holds: ``depth`` global ``[N, N]`` and frame ``[S, T, T]`` float32 matrices,
    plus the ``[rows, N]`` product being combined."""
    tokens = num_frames * tokens_per_frame
    per_layer_pair = tokens * tokens + num_frames * tokens_per_frame * tokens_per_frame
    return 4 * (depth * per_layer_pair + 2 * num_rows * tokens)


def rollout_bytes(aggregator: nn.Module, grid: QueryGrid, num_frames: int) -> int:
    """:func:`rollout_memory_bytes` of an export of ``num_frames`` frames on ``grid``."""
    per_frame = aggregator.patch_start_idx + grid.num_patches
    rows = grid.num_queries + num_frames
    return rollout_memory_bytes(num_frames, per_frame, len(aggregator.global_blocks), rows)


def rollout_storage(device: torch.device, needed_bytes: int) -> torch.device:
    """Where the transition matrices are kept: on the GPU the model runs on when they take at most half
    of its free memory (the rest stays with the forward pass), else in host memory.

    On the GPU the matrices are formed and multiplied without crossing to the host: for 3 frames of
    VGGT-1B that is about 4 s less per export on an H100 with 16 CPU cores.
    """
    return device if gpu_has_room(device, needed_bytes) else torch.device("cpu")


def discard_count(num_tokens: int, discard_ratio: float) -> int:
    """Entries zeroed in each row of an ``[N, N]`` transition matrix: ``floor(discard_ratio * N)``."""
    return math.floor(discard_ratio * num_tokens)


def transition_rows(head_mean: Tensor, first_row: int, num_tokens: int, discard_ratio: float) -> Tensor:
    """Turn rows of a head-averaged attention matrix into rows of ``B'_l``, in place.

    Parameters
    ----------
    head_mean : Tensor
        ``[c, L]`` float32: rows ``first_row .. first_row + c`` of ``A_l`` restricted to ``L`` columns
        that hold every non-zero entry of those rows (``L = N`` for global layers, the frame's own
        ``T`` tokens for frame layers; row ``first_row + i`` has its diagonal at column ``first_row + i``).
    first_row : int
    num_tokens : int
        ``N``, the full row length that the discard ratio counts.
    discard_ratio : float
    """
    rows, length = head_mean.shape
    diagonal = torch.arange(rows, device=head_mean.device)
    head_mean[diagonal, first_row + diagonal] += 1.0
    head_mean.div_(head_mean.sum(dim=-1, keepdim=True))
    # Entries outside the L columns are zeros, the smallest of the full row: they go first.
    keep = num_tokens - discard_count(num_tokens, discard_ratio)
    if keep < length:
        values, indices = torch.topk(head_mean, keep, dim=-1)
        head_mean.zero_().scatter_(-1, indices, values)
        # Rows back to distributions: else every layer's discard loses mass, and after 48 layers the
        # rows hold ~1e-13 of it (below float16, in which the special-token mass is stored).
        head_mean.div_(head_mean.sum(dim=-1, keepdim=True))
    return head_mean


class RolloutCapture(HookSession):
    """Context manager: hooks every frame and global layer, forms its transition matrix on the fly.

    After the forward pass, :meth:`result` multiplies them and returns the pooled rollout rows.

    Parameters
    ----------
    aggregator : nn.Module
    grid : QueryGrid
    num_frames : int
    discard_ratio : float
        Share of each row's smallest entries set to zero, in ``[0, 1)``; 0 keeps everything.

    Attributes
    ----------
    storage : torch.device
        Where the matrices are formed and multiplied (:func:`rollout_storage`).
    """

    def __init__(self, aggregator: nn.Module, grid: QueryGrid, num_frames: int, discard_ratio: float) -> None:
        self.aggregator = aggregator
        self.grid = grid
        self.num_frames = num_frames
        self.discard_ratio = discard_ratio
        self.layout = sequence_layout(aggregator, "global", num_frames)
        self.tokens_per_frame = self.layout.tokens_per_frame(grid)
        self.num_tokens = num_frames * self.tokens_per_frame
        needed = rollout_bytes(aggregator, grid, num_frames)
        self.storage = rollout_storage(next(aggregator.parameters()).device, needed)
        self.matrices: list[tuple[str, Tensor]] = []  # model order, on ``storage``

    @property
    def num_layers(self) -> int:
        return 2 * len(self.aggregator.global_blocks)

    def __enter__(self) -> RolloutCapture:
        self.matrices.clear()
        return super().__enter__()

    def hooks(self) -> Iterator[tuple[nn.Module, Callable]]:
        for frame_block, global_block in zip(
            self.aggregator.frame_blocks, self.aggregator.global_blocks, strict=True
        ):
            yield frame_block.attn.hook_qk, self._make_hook("frame")
            yield global_block.attn.hook_qk, self._make_hook("global")

    def _make_hook(self, kind: str) -> Callable:
        def hook(module: nn.Module, args: tuple[Tensor, Tensor], output) -> None:
            q, k = args
            with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
                self.matrices.append((kind, self._transition(kind, q, k)))

        return hook

    def _transition(self, kind: str, q: Tensor, k: Tensor) -> Tensor:
        """``B'_l`` on :attr:`storage`: ``[N, N]`` (global layer) or ``[S, T, T]`` blocks (frame layer)."""
        if q.shape[0] != (1 if kind == "global" else self.num_frames):
            raise ValueError(f"rollout takes one sequence of {self.num_frames} frames, got {list(q.shape)}")
        sequences = q.shape[0]
        length = q.shape[2]
        matrix = torch.empty(sequences, length, length, device=self.storage)
        every_row = torch.arange(length)
        for index in range(sequences):
            for start, exps, totals in attention_chunks(q[index], k[index], every_row):
                head_mean = exps.div_(totals).mean(dim=0)
                rows = transition_rows(head_mean, start, self.num_tokens, self.discard_ratio)
                matrix[index, start : start + rows.shape[0]].copy_(rows)
        return matrix[0] if kind == "global" else matrix

    def result(self) -> CapturedLayer:
        """The pooled rollout rows of the query grid's patches and the camera tokens (head average).

        Returns
        -------
        CapturedLayer
            ``maps`` ``[Q, S, H_ds, W_ds]``, ``special_mass`` ``[Q, S, n_special]``, and the camera
            tokens' ``token_maps`` ``[S, S, H_ds, W_ds]`` and ``token_special_mass`` ``[S, S, n_special]``.
        """
        if len(self.matrices) != self.num_layers:
            raise RuntimeError(f"rollout saw {len(self.matrices)} of {self.num_layers} attention layers")
        frames, per_frame = self.num_frames, self.tokens_per_frame
        _, last = self.matrices[-1]
        flow = last[self.layout.query_rows(self.grid)]  # [R, N]
        for kind, matrix in reversed(self.matrices[:-1]):
            if kind == "global":
                flow = flow @ matrix
            else:  # block-diagonal: each frame's columns go through that frame's block
                by_frame = flow.view(-1, frames, per_frame).transpose(0, 1)
                flow = torch.bmm(by_frame, matrix).transpose(0, 1).reshape(flow.shape)
        by_frame = flow.view(-1, frames, per_frame)
        start = self.layout.patch_start
        maps = self.grid.pool(by_frame[..., start:]).unflatten(-1, (self.grid.H_ds, self.grid.W_ds))
        special = by_frame[..., :start]
        queries = self.grid.num_queries
        ref = LayerRef(ROLLOUT_KIND, 0)
        return CapturedLayer(
            ref, self.layout, maps[:queries], special[:queries], maps[queries:], special[queries:]
        )
