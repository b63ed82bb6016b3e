"""Interventions on VGGT's attention, attached through the model's hook points for one call.

Each kind edits chosen attention layers of the aggregator (``global``, ``frame`` or ``dino`` blocks,
:class:`vggt.capture.LayerRef`) while a forward pass runs, and nothing else::

    from vggt.interventions import HeadAblation, Intervene

    with Intervene(model, [HeadAblation(LayerRef("global", 11), heads=(4,))], num_frames=S) as session:
        predictions = model(images)
    session.kept_share  # share of the edited layers' (head, query, key) entries kept

On exit every hook is removed, so the model is exactly as before; with no intervention attached its
attention is one fused ``scaled_dot_product_attention`` call per layer.

======================= ===================================================== =====================
kind                    what it does                                          layers
======================= ===================================================== =====================
:class:`HeadAblation`   a head's output replaced by zero or its token mean    global, frame, dino
:class:`KeyMask`        only chosen patch keys (and every special token) are  global, frame, dino
                        attended to
:class:`GlobalToFrame`  each token attends only to tokens of its own frame    global
:class:`BlockSparsity`  blocks of 64 queries attend only to the key blocks    global, frame, dino
                        with the highest block-pooled q.k scores
======================= ===================================================== =====================

Masks are exact: they are handed to the attention's softmax (``hook_attn_mask``), so a masked key
gets probability 0 and the kept keys' probabilities are renormalized by the softmax itself. A mask
that keeps everything is not applied at all, so that the output is bit-identical to no intervention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vggt.attn_format.schema import BLOCK_KINDS
from vggt.capture import LayerRef, attention_blocks, attention_chunks, sequence_layout
from vggt.models.hooks import HookSession

ABLATION_MODES = ("zero", "mean")
SPARSITY_RULES = ("share", "ratio")
IMPORTANCE_QUERIES = ("camera", "query_frame")
DEFAULT_BLOCK_SIZE = 64


class InterventionError(ValueError):
    """An intervention that cannot be applied as asked (a one-line message for the user)."""


def check_layer(aggregator: nn.Module, ref: LayerRef, kinds: Sequence[str] = BLOCK_KINDS) -> None:
    """Raise :class:`InterventionError` unless ``aggregator`` has layer ``ref`` of one of ``kinds``."""
    if ref.kind not in kinds:
        raise InterventionError(
            f"{ref.kind} layers cannot be edited this way (use {', '.join(kinds)} layers)"
        )
    depth = len(attention_blocks(aggregator, ref.kind))
    if not 0 <= ref.block_index < depth:
        raise InterventionError(f"{ref.kind} layer {ref.number} does not exist: the model has 1-{depth}")


def check_fraction(value: float, what: str) -> float:
    """``value`` as a float in (0, 1], else :class:`InterventionError`."""
    if not (isinstance(value, int | float) and 0.0 < value <= 1.0):
        raise InterventionError(f"{what} must be in (0, 1], got {value}")
    return float(value)


@dataclass(frozen=True)
class LayerTokens:
    """How the tokens of one hooked attention call are laid out.

    Attributes
    ----------
    frames_per_sequence : int
        Frames in one attention sequence: S for global layers, 1 for frame and DINOv2 layers.
    tokens_per_frame : int
        ``T = patch_start + patches``.
    patch_start : int
        Special tokens (camera or class token, then registers) at the start of each frame.
    """

    frames_per_sequence: int
    tokens_per_frame: int
    patch_start: int

    def special_tokens(self, device: torch.device | None = None) -> Tensor:
        """``[N]`` bool: which positions of a sequence hold special tokens."""
        position = torch.arange(self.frames_per_sequence * self.tokens_per_frame, device=device)
        return position % self.tokens_per_frame < self.patch_start

    def frame_of_token(self, device: torch.device | None = None) -> Tensor:
        """``[N]`` int64: the frame (within the sequence) of every position."""
        position = torch.arange(self.frames_per_sequence * self.tokens_per_frame, device=device)
        return position // self.tokens_per_frame


def layer_tokens(aggregator: nn.Module, ref: LayerRef, num_frames: int, sequence_length: int) -> LayerTokens:
    """The :class:`LayerTokens` of layer ``ref`` in a forward pass of ``num_frames`` frames."""
    layout = sequence_layout(aggregator, ref.kind, num_frames)
    return LayerTokens(layout.key_frames, sequence_length // layout.key_frames, layout.patch_start)


class Intervention:
    """One edit of the attention of some layers. Subclasses override what they change."""

    def edited_layers(self) -> tuple[LayerRef, ...]:
        """The layers this intervention changes."""
        raise NotImplementedError

    def validate(self, aggregator: nn.Module) -> None:
        """Raise :class:`InterventionError` if this does not fit ``aggregator``."""
        for ref in self.edited_layers():
            check_layer(aggregator, ref)

    def first_layer(self) -> LayerRef:
        """The edited layer that the forward pass reaches first."""
        return min(self.edited_layers(), key=lambda ref: ref.forward_position)

    def keep_mask(self, ref: LayerRef, q: Tensor, k: Tensor, tokens: LayerTokens) -> Tensor | None:
        """Boolean keep-mask for layer ``ref``, broadcastable to ``[B, heads, N, N]`` (4 dims), or
        ``None`` when every query keeps every key."""
        return None

    def ablated_heads(self, ref: LayerRef) -> tuple[int, ...]:
        """Heads (0-based) of layer ``ref`` whose output this replaces."""
        return ()

    def edit_head_outputs(self, ref: LayerRef, heads_out: Tensor) -> Tensor:
        """``heads_out`` ``[B, heads, N, head_dim]`` of layer ``ref`` as edited (a new tensor)."""
        return heads_out


@dataclass(frozen=True)
class HeadAblation(Intervention):
    """Replace the output of ``heads`` (0-based) of ``layer`` by zero or by its mean over the tokens of
    each attention sequence (all frames for a global layer, each frame for a frame or DINOv2 layer),
    before the heads are merged and projected."""

    layer: LayerRef
    heads: tuple[int, ...]
    mode: str = "zero"

    def edited_layers(self) -> tuple[LayerRef, ...]:
        return (self.layer,)

    def validate(self, aggregator: nn.Module) -> None:
        super().validate(aggregator)
        if self.mode not in ABLATION_MODES:
            raise InterventionError(
                f"ablation mode must be one of {', '.join(ABLATION_MODES)}, got {self.mode!r}"
            )
        num_heads = attention_blocks(aggregator, self.layer.kind)[self.layer.block_index].attn.num_heads
        if not self.heads:
            raise InterventionError("no head to ablate")
        for head in self.heads:
            if not 0 <= head < num_heads:
                raise InterventionError(
                    f"head {head + 1} does not exist: {self.layer.kind} layer {self.layer.number} has "
                    f"heads 1-{num_heads}"
                )

    def ablated_heads(self, ref: LayerRef) -> tuple[int, ...]:
        return self.heads if ref == self.layer else ()

    def edit_head_outputs(self, ref: LayerRef, heads_out: Tensor) -> Tensor:
        if ref != self.layer:
            return heads_out
        edited = heads_out.clone()
        heads = list(self.heads)
        if self.mode == "zero":
            edited[:, heads] = 0
        else:
            edited[:, heads] = heads_out[:, heads].mean(dim=-2, keepdim=True).expand_as(edited[:, heads])
        return edited


@dataclass(frozen=True, eq=False)
class KeyMask(Intervention):
    """Attend only to the patch keys in ``keep`` (and to every camera, class and register token) in
    ``layers``.

    ``keep`` is ``[B, S, patches]`` bool over the patches of every frame (row-major, as the model orders
    them); DINOv2 layers use it for their own patch tokens, which are the same patches.
    """

    layers: tuple[LayerRef, ...]
    keep: Tensor

    def edited_layers(self) -> tuple[LayerRef, ...]:
        return self.layers

    def validate(self, aggregator: nn.Module) -> None:
        if not self.layers:
            raise InterventionError("no layer to mask keys in")
        super().validate(aggregator)
        if self.keep.dtype != torch.bool or self.keep.dim() != 3:
            raise InterventionError(f"a key mask is [B, S, patches] bool, got {tuple(self.keep.shape)}")

    def keep_mask(self, ref: LayerRef, q: Tensor, k: Tensor, tokens: LayerTokens) -> Tensor | None:
        if ref not in self.layers or bool(self.keep.all()):
            return None
        batch, frames, patches = self.keep.shape
        if tokens.tokens_per_frame - tokens.patch_start != patches:
            raise InterventionError(
                f"the key mask has {patches} patches per frame, {ref.kind} layer {ref.number} sees "
                f"{tokens.tokens_per_frame - tokens.patch_start}"
            )
        special = torch.ones(batch, frames, tokens.patch_start, dtype=torch.bool, device=self.keep.device)
        keep = torch.cat((special, self.keep), dim=-1).to(k.device)  # [B, S, T]
        # One attention sequence per batch entry (global) or per frame (frame, DINOv2).
        return keep.reshape(k.shape[0], 1, 1, k.shape[-2])


@dataclass(frozen=True)
class GlobalToFrame(Intervention):
    """Global ``layers`` attend only within each frame, as frame layers do (with their own weights)."""

    layers: tuple[LayerRef, ...]

    def edited_layers(self) -> tuple[LayerRef, ...]:
        return self.layers

    def validate(self, aggregator: nn.Module) -> None:
        if not self.layers:
            raise InterventionError("no global layer to turn into frame attention")
        for ref in self.layers:
            check_layer(aggregator, ref, kinds=("global",))

    def keep_mask(self, ref: LayerRef, q: Tensor, k: Tensor, tokens: LayerTokens) -> Tensor | None:
        if ref not in self.layers or tokens.frames_per_sequence == 1:
            return None
        frame = tokens.frame_of_token(k.device)
        return (frame[:, None] == frame[None, :])[None, None]


@dataclass(frozen=True)
class BlockSparsity(Intervention):
    """Block-sparse attention in ``layers``.

    Queries and keys are cut into blocks of ``block_size`` tokens (in sequence order; the last block may
    be shorter). Per head, each query block scores the key blocks by the softmax of its mean query
    times their mean keys (scaled as the model scales its logits), and keeps the highest-scoring key
    blocks until their scores add up to ``threshold`` (``rule="share"``) or until it holds
    ``ceil(threshold * blocks)`` of them (``rule="ratio"``). A block pair whose query block or key block
    holds a special token (camera, class, register) is always kept.
    """

    layers: tuple[LayerRef, ...]
    threshold: float
    rule: str = "share"
    block_size: int = DEFAULT_BLOCK_SIZE

    def edited_layers(self) -> tuple[LayerRef, ...]:
        return self.layers

    def validate(self, aggregator: nn.Module) -> None:
        if not self.layers:
            raise InterventionError("no layer to sparsify")
        super().validate(aggregator)
        check_fraction(self.threshold, "a block-sparsity threshold")
        if self.rule not in SPARSITY_RULES:
            raise InterventionError(
                f"sparsity rule must be one of {', '.join(SPARSITY_RULES)}, got {self.rule!r}"
            )
        if self.block_size < 1:
            raise InterventionError(f"block size must be at least 1, got {self.block_size}")

    def keep_mask(self, ref: LayerRef, q: Tensor, k: Tensor, tokens: LayerTokens) -> Tensor | None:
        if ref not in self.layers:
            return None
        kept_blocks = block_keep_mask(q, k, tokens.special_tokens(q.device), self.threshold, self.rule,
                                      self.block_size)  # fmt: skip
        if bool(kept_blocks.all()):
            return None
        block_of_token = torch.arange(q.shape[-2], device=q.device) // self.block_size
        return kept_blocks[:, :, block_of_token][:, :, :, block_of_token]


def block_keep_mask(
    q: Tensor, k: Tensor, special: Tensor, threshold: float, rule: str, block_size: int
) -> Tensor:
    """Which block pairs :class:`BlockSparsity` keeps.

    Parameters
    ----------
    q, k : Tensor
        ``[B, heads, N, head_dim]`` as the attention sees them.
    special : Tensor
        ``[N]`` bool: positions of special tokens.
    threshold, rule, block_size
        As in :class:`BlockSparsity`.

    Returns
    -------
    Tensor
        ``[B, heads, nb, nb]`` bool, ``nb = ceil(N / block_size)``; rows are query blocks.
    """
    num_tokens = q.shape[-2]
    num_blocks = math.ceil(num_tokens / block_size)
    if threshold >= 1.0:  # rounding must not drop the last blocks of a keep-everything threshold
        return torch.ones(q.shape[0], q.shape[1], num_blocks, num_blocks, dtype=torch.bool, device=q.device)
    pooled_q, pooled_k = (_block_means(x.float(), block_size, num_blocks) for x in (q, k))
    scores = torch.softmax((pooled_q * q.shape[-1] ** -0.5) @ pooled_k.transpose(-2, -1), dim=-1)
    ranked, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    if rule == "share":
        # Fewest blocks whose scores reach the threshold: those before the first cumulative sum >= it.
        count = (ranked.cumsum(dim=-1) < threshold).sum(dim=-1, keepdim=True) + 1
    else:
        count = torch.full_like(ranked[..., :1], math.ceil(threshold * num_blocks), dtype=torch.int64)
    kept_ranks = torch.arange(num_blocks, device=q.device) < count.clamp(max=num_blocks)
    kept = torch.zeros_like(kept_ranks).scatter_(-1, order, kept_ranks)
    special_block = torch.zeros(num_blocks, dtype=torch.bool, device=q.device)
    special_block.index_fill_(0, torch.nonzero(special.to(q.device)).flatten() // block_size, True)
    return kept | special_block[None, None, None, :] | special_block[None, None, :, None]


def _block_means(x: Tensor, block_size: int, num_blocks: int) -> Tensor:
    """``[B, heads, N, d]`` -> ``[B, heads, nb, d]``: the mean over each block's tokens."""
    num_tokens = x.shape[-2]
    padded = torch.nn.functional.pad(x, (0, 0, 0, num_blocks * block_size - num_tokens))
    sums = padded.unflatten(-2, (num_blocks, block_size)).sum(dim=-2)
    counts = torch.full((num_blocks,), float(block_size), device=x.device)
    counts[-1] = num_tokens - (num_blocks - 1) * block_size
    return sums / counts[:, None]


# ---- key importance at a reference layer ---------------------------------------------------------


def key_importance(q: Tensor, k: Tensor, tokens: LayerTokens, num_frames: int, queries: str) -> Tensor:
    """Attention mass each key receives at one layer, averaged over heads and the chosen queries.

    Parameters
    ----------
    q, k : Tensor
        ``[B * S / frames_per_sequence, heads, N, head_dim]`` as hooked at the layer.
    tokens : LayerTokens
    num_frames : int
        S, the frames of the forward pass.
    queries : str
        ``"camera"``: the first special token (camera or class) of every frame, as the seed fork's
        key masking does; ``"query_frame"``: the patches of frame 0.

    Returns
    -------
    Tensor
        ``[B, S, T]`` float32, summing to 1 over each batch entry's keys.
    """
    if queries not in IMPORTANCE_QUERIES:
        raise InterventionError(f"key importance queries must be one of {', '.join(IMPORTANCE_QUERIES)}")
    per_frame = tokens.tokens_per_frame
    sequences = q.shape[0]
    mass = torch.zeros(sequences, q.shape[-2], device=q.device)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        for index in range(sequences):
            first_frame = index * tokens.frames_per_sequence % num_frames
            if queries == "camera":
                rows = torch.arange(tokens.frames_per_sequence) * per_frame
            elif first_frame == 0:
                rows = torch.arange(tokens.patch_start, per_frame)
            else:
                continue  # a frame layer's other frames hold no query of frame 0
            for _, exps, totals in attention_chunks(q[index], k[index], rows):
                mass[index] += (exps / totals).sum(dim=(0, 1))
    mass = mass.reshape(-1, num_frames, per_frame)
    return mass / mass.sum(dim=(1, 2), keepdim=True)


def keep_by_mass(importance: Tensor, mass: float, patch_start: int) -> Tensor:
    """Patch keys to keep so that the kept keys hold at least ``mass`` of the importance.

    The special tokens are always kept and their importance counts; the patches are then taken in
    decreasing importance (ties in token order) until the kept share reaches ``mass``.

    Parameters
    ----------
    importance : Tensor
        ``[B, S, T]`` (:func:`key_importance`).
    mass : float
        In (0, 1]; 1 keeps every key.
    patch_start : int

    Returns
    -------
    Tensor
        ``[B, S, patches]`` bool, for :class:`KeyMask`.
    """
    mass = check_fraction(mass, "a kept mass")
    batch, frames, _ = importance.shape
    patches = importance[..., patch_start:].reshape(batch, -1).double()
    if mass == 1.0:
        return torch.ones(batch, frames, importance.shape[-1] - patch_start, dtype=torch.bool)
    total = importance.reshape(batch, -1).double().sum(dim=-1, keepdim=True)
    needed = mass * total - importance[..., :patch_start].reshape(batch, -1).double().sum(
        dim=-1, keepdim=True
    )
    ranked, order = torch.sort(patches, dim=-1, descending=True, stable=True)
    count = (ranked.cumsum(dim=-1) < needed).sum(dim=-1, keepdim=True) + (needed > 0).long()
    kept_ranks = torch.arange(patches.shape[-1], device=patches.device) < count.clamp(max=patches.shape[-1])
    keep = torch.zeros_like(kept_ranks).scatter_(-1, order, kept_ranks)
    return keep.reshape(batch, frames, -1).cpu()


class KeyImportanceCapture(HookSession):
    """Record :func:`key_importance` at layer ``ref`` during one forward pass (read-only).

    After the pass, :attr:`importance` is ``[B, S, T]``.
    """

    def __init__(self, model: nn.Module, ref: LayerRef, num_frames: int, queries: str = "camera") -> None:
        self.aggregator = _aggregator(model)
        check_layer(self.aggregator, ref)
        if queries not in IMPORTANCE_QUERIES:
            raise InterventionError(f"key importance queries must be one of {', '.join(IMPORTANCE_QUERIES)}")
        self.ref, self.num_frames, self.queries = ref, num_frames, queries
        self.importance: Tensor | None = None

    def hooks(self) -> Iterator[tuple[nn.Module, Callable]]:
        def read(module: nn.Module, args: tuple[Tensor, Tensor], output) -> None:
            q, k = args
            tokens = layer_tokens(self.aggregator, self.ref, self.num_frames, q.shape[-2])
            self.importance = key_importance(q, k, tokens, self.num_frames, self.queries).cpu()

        yield attention_blocks(self.aggregator, self.ref.kind)[self.ref.block_index].attn.hook_qk, read


# ---- attaching interventions -----------------------------------------------------------------------


class Intervene(HookSession):
    """Apply ``interventions`` to the forward passes run inside the ``with`` block.

    Interventions on the same layer combine: their masks are intersected, their head edits applied in
    turn. Afterwards :attr:`kept_entries` and :attr:`total_entries` count the (head, query, key) entries
    of the edited layers (an ablated head keeps none of its entries), and :attr:`kept_share` is their
    ratio (1.0 when nothing was edited).

    Parameters
    ----------
    model : nn.Module
        VGGT (or its aggregator).
    interventions : Iterable[Intervention]
    num_frames : int
        S, the frames of the forward passes.
    """

    def __init__(self, model: nn.Module, interventions: Iterable[Intervention], num_frames: int) -> None:
        self.aggregator = _aggregator(model)
        self.interventions = list(interventions)
        self.num_frames = num_frames
        for intervention in self.interventions:
            intervention.validate(self.aggregator)
        self.kept_entries = 0
        self.total_entries = 0

    @property
    def kept_share(self) -> float:
        return self.kept_entries / self.total_entries if self.total_entries else 1.0

    def hooks(self) -> Iterator[tuple[nn.Module, Callable]]:
        by_layer: dict[LayerRef, list[Intervention]] = {}
        for intervention in self.interventions:
            for ref in intervention.edited_layers():
                by_layer.setdefault(ref, []).append(intervention)
        for ref, edits in sorted(by_layer.items(), key=lambda item: item[0].forward_position):
            attention = attention_blocks(self.aggregator, ref.kind)[ref.block_index].attn
            ablated = sorted({head for edit in edits for head in edit.ablated_heads(ref)})
            yield attention.hook_attn_mask, self._mask_hook(ref, edits, ablated, attention.num_heads)
            if ablated:
                yield attention.hook_head_outputs, self._head_hook(ref, edits)

    def _mask_hook(self, ref: LayerRef, edits: list[Intervention], ablated: list[int], num_heads: int):
        live_heads = [head for head in range(num_heads) if head not in ablated]

        def hook(module: nn.Module, args: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor | None:
            q, k = args
            tokens = layer_tokens(self.aggregator, ref, self.num_frames, k.shape[-2])
            for edit in edits:
                keep = edit.keep_mask(ref, q, k, tokens)
                if keep is not None:
                    mask = keep if mask is None else mask & keep
            shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
            self.kept_entries += count_kept(mask, shape, live_heads)
            self.total_entries += math.prod(shape)
            return mask

        return hook

    def _head_hook(self, ref: LayerRef, edits: list[Intervention]):
        def hook(module: nn.Module, args: tuple[Tensor], output: tuple[Tensor]) -> tuple[Tensor]:
            (heads_out,) = output
            for edit in edits:
                heads_out = edit.edit_head_outputs(ref, heads_out)
            return (heads_out,)

        return hook


def count_kept(mask: Tensor | None, shape: tuple[int, int, int, int], live_heads: Sequence[int]) -> int:
    """Entries of an attention of ``shape`` ``[B, heads, Nq, Nk]`` that ``mask`` (broadcastable, 4 dims,
    or ``None``) keeps within ``live_heads``."""
    batch, heads, queries, keys = shape
    if mask is None:
        return batch * len(live_heads) * queries * keys
    broadcast = math.prod(size // max(1, mask.shape[axis]) for axis, size in enumerate(shape) if axis != 1)
    if mask.shape[1] == 1:
        return int(mask.sum()) * broadcast * len(live_heads)
    return int(mask[:, list(live_heads)].sum()) * broadcast


def run_with_interventions(
    model: nn.Module, images: Tensor, interventions: Iterable[Intervention], **forward_kwargs
) -> tuple[object, float]:
    """``model(images, **forward_kwargs)`` with ``interventions`` applied for this call only.

    Returns the model's output and the share of the edited layers' attention entries kept.
    """
    with Intervene(model, interventions, num_frames=images.shape[-4]) as session:
        output = model(images, **forward_kwargs)
    return output, session.kept_share


def _aggregator(model: nn.Module) -> nn.Module:
    return getattr(model, "aggregator", model)
