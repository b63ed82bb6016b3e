"""Capture of attention rows through the model's hook points, pooled onto the query grid.

For one forward pass, :class:`AttentionCapture` attaches to the ``hook_qk`` hook point of the chosen
attention layers (global, frame or DINOv2 blocks), recomputes the softmax rows of the query frame's
patch tokens and of its special-token queries (camera or class token) a tile of rows at a time from
the hooked ``q`` and ``k`` (never an N x N matrix), pools every key frame's patch probabilities onto
the query grid and hands each finished layer to a callback. Hooks are removed on exit, also on error.

Which tokens a layer sees depends on its kind:

======== ============================ ============ ================================
kind     hooked sequence              key frames   special-token queries
======== ============================ ============ ================================
global   all frames, one sequence     all S        every frame's camera token
frame    one frame per batch entry    frame 0      frame 0's camera token
dino     one frame per batch entry    frame 0      frame 0's DINOv2 class token
======== ============================ ============ ================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vggt.attn_format.grid import query_patches
from vggt.attn_format.schema import BLOCK_KINDS, query_grid_shape, special_token_names
from vggt.device import gpu_has_room
from vggt.models.hooks import HookSession

# Logits kept in flight per softmax chunk of the rollout.
_CHUNK_BYTES = 16 << 20
# One tile of a layer's logits (and its running head mean) fits in a core's L2 cache.
_TILE_BYTES = 3 << 19


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

    @property
    def H_ds(self) -> int:  # noqa: N802 - the format's name
        return query_grid_shape(self.grid_h, self.grid_w, self.stride_h, self.stride_w)[0]

    @property
    def W_ds(self) -> int:  # noqa: N802 - the format's name
        return query_grid_shape(self.grid_h, self.grid_w, self.stride_h, self.stride_w)[1]

    @property
    def num_queries(self) -> int:
        return self.H_ds * self.W_ds

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    def query_patch_indices(self) -> Tensor:
        """Row-major patch index (within a frame) of every query: ``[Q]`` int64."""
        rows, cols = query_patches(self.grid_h, self.grid_w, self.stride_h, self.stride_w)
        return torch.from_numpy(rows * self.grid_w + cols)

    def pool(self, patch_probs: Tensor) -> Tensor:
        """Sum ``[..., grid_h * grid_w]`` over each cell's patch block -> ``[..., H_ds * W_ds]``."""
        if self.stride_h == 1 and self.stride_w == 1:
            return patch_probs
        lead = patch_probs.shape[:-1]
        grid = patch_probs.unflatten(-1, (self.grid_h, self.grid_w))
        padded = F.pad(
            grid, (0, self.W_ds * self.stride_w - self.grid_w, 0, self.H_ds * self.stride_h - self.grid_h)
        )
        blocks = padded.reshape(*lead, self.H_ds, self.stride_h, self.W_ds, self.stride_w)
        return blocks.sum(dim=(-3, -1)).flatten(-2)


@dataclass(frozen=True)
class LayerRef:
    """One attention layer of the model: its kind and 0-based block index within that kind."""

    kind: str
    block_index: int

    @property
    def number(self) -> int:
        """1-based layer number within its kind."""
        return self.block_index + 1

    @property
    def forward_position(self) -> tuple[int, int]:
        """Sort key: the order in which the aggregator's forward pass reaches the layer (all DINOv2
        blocks first, then frame block 1, global block 1, frame block 2, ...)."""
        if self.kind == "dino":
            return (-1, self.block_index)
        return (self.block_index, 0 if self.kind == "frame" else 1)


@dataclass(frozen=True)
class SequenceLayout:
    """How the tokens of one layer kind lie in the hooked ``q`` / ``k``.

    Attributes
    ----------
    key_frames : int
        Frames in one hooked sequence (S for global layers, 1 otherwise); frame 0 comes first.
    patch_start : int
        Special tokens ahead of the patches in each frame (camera + registers, or class + registers).
    special_tokens : tuple of str
        Their names in model order.
    special_queries : tuple of int
        Frames whose first special token (camera or class) is also a query, besides the patches.
    """

    key_frames: int
    patch_start: int
    special_tokens: tuple[str, ...]
    special_queries: tuple[int, ...]

    def tokens_per_frame(self, grid: QueryGrid) -> int:
        return self.patch_start + grid.num_patches

    def query_rows(self, grid: QueryGrid) -> Tensor:
        """Sequence rows of the queries: the query grid's patches of frame 0, then the special queries."""
        per_frame = self.tokens_per_frame(grid)
        patches = grid.query_patch_indices() + self.patch_start
        special = torch.tensor([frame * per_frame for frame in self.special_queries], dtype=torch.int64)
        return torch.cat((patches, special))


def sequence_layout(aggregator: nn.Module, kind: str, num_frames: int) -> SequenceLayout:
    """The :class:`SequenceLayout` of ``kind`` layers of ``aggregator`` for ``num_frames`` frames."""
    if kind == "dino":
        start = 1 + aggregator.patch_embed.num_register_tokens
        return SequenceLayout(1, start, tuple(special_token_names(start, "cls")), (0,))
    start = aggregator.patch_start_idx
    names = tuple(special_token_names(start, "camera"))
    if kind == "global":
        return SequenceLayout(num_frames, start, names, tuple(range(num_frames)))
    if kind == "frame":
        return SequenceLayout(1, start, names, (0,))
    raise ValueError(f"unknown layer kind {kind!r}: use one of {', '.join(BLOCK_KINDS)}")


def attention_blocks(aggregator: nn.Module, kind: str) -> nn.ModuleList:
    """The blocks of one kind: ``global_blocks``, ``frame_blocks`` or the DINOv2 ``patch_embed.blocks``."""
    if kind == "dino":
        return aggregator.patch_embed.blocks
    if kind in ("global", "frame"):
        return getattr(aggregator, f"{kind}_blocks")
    raise ValueError(f"unknown layer kind {kind!r}: use one of {', '.join(BLOCK_KINDS)}")


def qk_hook_point(aggregator: nn.Module, ref: LayerRef) -> nn.Module:
    """The ``hook_qk`` hook point of layer ``ref``; a ``ValueError`` if the model has no such block."""
    blocks = attention_blocks(aggregator, ref.kind)
    if not 0 <= ref.block_index < len(blocks):
        raise ValueError(f"{ref.kind} block {ref.block_index} does not exist (the model has {len(blocks)})")
    return blocks[ref.block_index].attn.hook_qk


class Workspace:
    """Buffers reused from layer to layer.

    A layer's pooled maps are hundreds of MB per head at stride 1; touching freshly allocated memory
    for every layer costs more in page faults than the arithmetic done in it. For layers computed on a
    GPU the buffers stay on it while they fit beside the forward pass (:func:`vggt.device.gpu_has_room`),
    so that the maps are reduced to codes before they cross to the host; else, from then on, they are
    in host memory.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._host_only = False

    def place(self, device: torch.device, needed_bytes: int) -> torch.device:
        """Where buffers of ``needed_bytes`` in all for a layer computed on ``device`` go."""
        if device.type == "cpu" or self._host_only:
            return torch.device("cpu")
        held = sum(b.numel() * b.element_size() for b in self._buffers.values() if b.device == device)
        if gpu_has_room(device, needed_bytes, already_held=held):
            return device
        self._host_only = True
        return torch.device("cpu")

    def take(
        self,
        name: str,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        """A tensor of ``shape`` on ``device`` (the CPU by default) backed by the buffer ``name`` (made
        anew when too small or elsewhere); contents undefined."""
        count = math.prod(shape)
        device = torch.device("cpu") if device is None else torch.device(device)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.device != device or buffer.numel() < count:
            self._buffers.pop(name, None)  # freed before its successor is allocated
            buffer = torch.empty(count, dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:count].view(*shape)


@dataclass
class CapturedLayer:
    """One layer's pooled attention, float32, on the device the layer was computed on.

    Arrays with a heads axis (per head) are views of head-major storage, so ``maps[:, h]`` is
    contiguous. They may be views of a :class:`Workspace`: valid until the next layer is captured.

    Attributes
    ----------
    ref : LayerRef
    layout : SequenceLayout
    maps : Tensor
        ``[Q, heads, K, H_ds, W_ds]`` (per head) or ``[Q, K, H_ds, W_ds]`` (head average); K key frames.
    special_mass : Tensor
        ``[Q, heads, K, n_special]`` or ``[Q, K, n_special]``: mass on each key frame's special tokens.
    token_maps, token_special_mass : Tensor
        The same for the special-token queries (``layout.special_queries``) instead of the patches.
    head_mean : Tensor or None
        ``[Q, K, H_ds, W_ds]``: ``maps`` averaged over heads (per head only).
    """

    ref: LayerRef
    layout: SequenceLayout
    maps: Tensor
    special_mass: Tensor
    token_maps: Tensor
    token_special_mass: Tensor
    head_mean: Tensor | None = None


class AttentionCapture(HookSession):
    """Context manager capturing the chosen layers during one forward pass of batch size 1.

    Parameters
    ----------
    aggregator : nn.Module
        The model's aggregator (``model.aggregator``).
    grid : QueryGrid
        Patch grid of the frames and the strides.
    layers : Sequence[LayerRef]
        Layers to capture.
    num_frames : int
        Frames in the forward pass.
    per_head : bool
        Keep every head, or average over heads.
    on_layer : Callable[[CapturedLayer], None]
        Called as soon as each layer is captured, inside its hook, while the forward pass waits. The
        arrays it gets are reused for the next layer: it consumes (or copies) them before it returns.
    """

    def __init__(
        self,
        aggregator: nn.Module,
        grid: QueryGrid,
        layers: Sequence[LayerRef],
        num_frames: int,
        per_head: bool,
        on_layer: Callable[[CapturedLayer], None],
    ) -> None:
        self.aggregator = aggregator
        self.grid = grid
        self.layers = list(layers)
        self.num_frames = num_frames
        self.per_head = per_head
        self.on_layer = on_layer
        self.workspace = Workspace()

    def hooks(self) -> Iterator[tuple[nn.Module, Callable]]:
        for ref in self.layers:
            layout = sequence_layout(self.aggregator, ref.kind, self.num_frames)
            yield qk_hook_point(self.aggregator, ref), self._make_hook(ref, layout)

    def _make_hook(self, ref: LayerRef, layout: SequenceLayout) -> Callable:
        def hook(module: nn.Module, args: tuple[Tensor, Tensor], output) -> None:
            q, k = args
            # Frame and DINOv2 layers see one frame per batch entry: frame 0 is entry 0.
            self.on_layer(capture_layer(q[:1], k[:1], ref, layout, self.grid, self.per_head, self.workspace))

        return hook


def attention_chunks(q: Tensor, k: Tensor, rows: Tensor, chunk_bytes: int = _CHUNK_BYTES):
    """Yield ``(start, exps, totals)`` for softmax rows ``rows[start:start+c]`` of ``q`` over all of ``k``.

    ``q``, ``k`` are ``[heads, N, head_dim]``. ``exps`` ``[heads, c, N]`` holds ``exp(logit - row max)``
    and ``totals`` ``[heads, c, 1]`` their row sums, so that the probabilities are ``exps / totals``:
    the caller divides where the result is to go, saving a pass. Float32 whatever the inputs' dtype,
    with the model's scale ``head_dim ** -0.5``. ``exps`` lives in a buffer that the next chunk reuses.
    """
    heads, num_tokens, _ = q.shape
    queries, keys_t = _float_operands(q, k, rows)
    chunk = max(1, chunk_bytes // (4 * heads * num_tokens))
    buffer = torch.empty(heads, min(chunk, rows.numel()), num_tokens, device=q.device)
    for start in range(0, rows.numel(), chunk):
        count = min(chunk, rows.numel() - start)
        exps = torch.bmm(queries[:, start : start + count], keys_t, out=buffer[:, :count])
        exps.sub_(exps.amax(dim=-1, keepdim=True)).exp_()
        yield start, exps, exps.sum(dim=-1, keepdim=True)


def capture_layer(
    q: Tensor,
    k: Tensor,
    ref: LayerRef,
    layout: SequenceLayout,
    grid: QueryGrid,
    per_head: bool,
    workspace: Workspace | None = None,
) -> CapturedLayer:
    """Softmax attention of the layer's query rows over all tokens of the sequence, pooled per key frame.

    Parameters
    ----------
    q, k : Tensor
        ``[1, heads, K * tokens_per_frame, head_dim]`` as seen at the layer's hook point (any float
        dtype, any device).
    ref : LayerRef
    layout : SequenceLayout
    grid : QueryGrid
    per_head : bool
        Keep every head, or only their mean.
    workspace : Workspace, optional
        Buffers to reuse; fresh ones when ``None``.

    Returns
    -------
    CapturedLayer
    """
    if q.shape[0] != 1:
        raise ValueError(f"attention capture takes one sequence, got a batch of {q.shape[0]}")
    workspace = workspace or Workspace()
    heads, num_tokens = q.shape[1], q.shape[2]
    per_frame = layout.tokens_per_frame(grid)
    key_frames = layout.key_frames
    if num_tokens != key_frames * per_frame:
        raise ValueError(f"{num_tokens} tokens are not {key_frames} frame(s) of {per_frame}")
    rows = layout.query_rows(grid)
    num_rows, cells, start_patch = rows.numel(), grid.num_queries, layout.patch_start
    lead = (heads, num_rows) if per_head else (num_rows,)
    shapes = {"maps": (*lead, key_frames, cells), "special": (*lead, key_frames, start_patch)}
    if per_head:
        shapes["head_mean"] = (num_rows, key_frames, cells)
    device = workspace.place(q.device, 4 * sum(math.prod(shape) for shape in shapes.values()))
    buffers = {name: workspace.take(name, shape, device=device) for name, shape in shapes.items()}
    maps, special, head_mean = buffers["maps"], buffers["special"], buffers.get("head_mean")
    mean_maps = head_mean if per_head else maps
    # Probabilities are computed in float32 even inside the forward pass's autocast region.
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        queries, keys_t = _float_operands(q[0], k[0], rows)

    def capture_tile(first: int, last: int) -> None:
        """Rows ``[first, last)``, head by head: logits, softmax in place, then stored or averaged."""
        # Worker threads do not inherit the caller's grad mode; inference mode suits the workspace's
        # tensors whether or not they were made in it.
        with torch.inference_mode(), torch.autocast(q.device.type, enabled=False):
            probs = torch.empty(last - first, num_tokens, device=q.device)
            mean_tile = torch.zeros(last - first, key_frames, cells, device=q.device)
            special_shape = (last - first, key_frames, start_patch)
            special_sum = None if per_head else torch.zeros(special_shape, device=q.device)
            for head in range(heads):
                _softmax_in_place(torch.mm(queries[head, first:last], keys_t[head], out=probs))
                by_frame = probs.unflatten(-1, (key_frames, per_frame))
                patches = grid.pool(by_frame[..., start_patch:])
                if per_head:
                    maps[head, first:last].copy_(patches)
                    special[head, first:last].copy_(by_frame[..., :start_patch])
                else:
                    special_sum.add_(by_frame[..., :start_patch])
                mean_tile.add_(patches)
            mean_maps[first:last].copy_(mean_tile.mul_(1.0 / heads))
            if special_sum is not None:
                special[first:last].copy_(special_sum.mul_(1.0 / heads))

    _run_tiles(capture_tile, num_rows, num_tokens, q.device)
    maps = maps.unflatten(-1, (grid.H_ds, grid.W_ds))
    queries = grid.num_queries
    if per_head:  # [heads, rows, ...] -> [rows, heads, ...]
        maps, special = maps.transpose(0, 1), special.transpose(0, 1)
        head_mean = head_mean[:queries].unflatten(-1, (grid.H_ds, grid.W_ds))
    return CapturedLayer(
        ref,
        layout,
        maps[:queries],
        special[:queries],
        maps[queries:],
        special[queries:],
        head_mean,
    )


def _float_operands(q: Tensor, k: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The softmax rows' operands in float32: ``q[:, rows]`` times the model's scale ``head_dim ** -0.5``
    (``[heads, R, head_dim]``) and ``k`` transposed (``[heads, head_dim, N]``), from ``[heads, N,
    head_dim]`` inputs of any float dtype."""
    queries = q[:, rows.to(q.device)].float().mul_(q.shape[-1] ** -0.5)
    return queries, k.float().transpose(-2, -1)


def _softmax_in_place(logits: Tensor) -> Tensor:
    """Softmax over the last axis, written over ``logits`` (on the CPU without a new allocation, so that
    a tile never leaves the cache)."""
    if logits.device.type == "cpu":
        return torch.softmax(logits, dim=-1, out=logits)
    return logits.copy_(torch.softmax(logits, dim=-1))


def _run_tiles(capture_tile: Callable[[int, int], None], num_rows: int, num_tokens: int, device) -> None:
    """Call ``capture_tile(first, last)`` over ``num_rows`` rows.

    On the CPU, tiles of rows small enough for a core's own cache run in parallel, one per thread and
    each single-threaded: the same cores as torch's own parallelism, without the synchronisation of
    many small multi-threaded operations or the trips to main memory of large ones. Another device
    takes all rows at once.
    """
    if device.type != "cpu":
        capture_tile(0, num_rows)
        return
    rows_per_tile = max(1, _TILE_BYTES // (4 * num_tokens))
    tiles = [(first, min(first + rows_per_tile, num_rows)) for first in range(0, num_rows, rows_per_tile)]
    threads = min(torch.get_num_threads(), len(tiles))
    if threads <= 1:
        for first, last in tiles:
            capture_tile(first, last)
        return
    saved = torch.get_num_threads()
    try:
        # torch.set_num_threads also pins the calling thread's BLAS, so each worker sets it for itself;
        # with some builds the setting is process-wide, hence the caller's is put back after.
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for done in [pool.submit(capture_tile, first, last) for first, last in tiles]:
                done.result()
    finally:
        torch.set_num_threads(saved)
