"""Prefix reuse: an intervention's forward pass starts where it first changes the model.

Everything an intervention computes before the first layer it edits equals the unmodified run. So the
unmodified run records, with :class:`PrefixCache`, the tokens entering each layer where some
intervention of a sweep starts (and the aggregator outputs before it that the model's heads read), and
:func:`resume_aggregator` runs the aggregator from there: the DINOv2 blocks from a DINOv2 layer on, or
the frame and global blocks from a frame or global layer on. A sweep that edits global layer 12 thus
skips the whole DINOv2 patch embedding and the first 23 of the 48 aggregator blocks.

Memory: a recorded layer holds one ``[B, S, P, C]`` tensor; :meth:`PrefixCache.release` drops it once
the interventions starting there have run.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator

from torch import Tensor, nn

from vggt.capture import LayerRef, attention_blocks
from vggt.models.hooks import HookSession


def resume_key(ref: LayerRef) -> tuple[int, int]:
    """Order of resume points: the order in which the forward pass reaches the layers."""
    return ref.forward_position


class PrefixCache(HookSession):
    """Record, during one unmodified forward pass, what resuming at each layer of ``resume_at`` needs.

    Parameters
    ----------
    model : nn.Module
        VGGT (with ``.aggregator``) or the aggregator itself.
    resume_at : Iterable[LayerRef]
        Layers where interventions start (their block's input is recorded).
    kept_outputs : Collection[int], optional
        Indices of the aggregator outputs (block pairs) that the model's heads read; those before a
        frame or global resume point are kept. All of them when ``None``.
    """

    def __init__(
        self, model: nn.Module, resume_at: Iterable[LayerRef], kept_outputs: Collection[int] | None = None
    ) -> None:
        self.aggregator = getattr(model, "aggregator", model)
        self.resume_at = sorted(set(resume_at), key=resume_key)
        self.kept_outputs = kept_outputs
        self.tokens: dict[LayerRef, Tensor] = {}
        self.outputs: dict[int, Tensor] = {}
        self.positions: Tensor | None = None
        self.frames: tuple[int, int] | None = None  # (B, S)

    def pre_hooks(self) -> Iterator[tuple[nn.Module, Callable]]:
        for ref in self.resume_at:
            yield attention_blocks(self.aggregator, ref.kind)[ref.block_index], self._recorder(ref)

    def hooks(self) -> Iterator[tuple[nn.Module, Callable]]:
        yield self.aggregator, self._read_outputs

    def _recorder(self, ref: LayerRef) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            self.tokens[ref] = args[0]

        return record

    def _read_outputs(self, module: nn.Module, args: tuple, output: tuple[list[Tensor], int]) -> None:
        images = args[0]
        self.frames = tuple(images.shape[:2])
        self.positions = self.aggregator.token_positions(images)
        outputs, _ = output
        if len(outputs) != self.aggregator.depth:
            raise ValueError("prefix reuse needs the aggregator's output of every block pair")
        last_resume = max((ref.block_index for ref in self.resume_at if ref.kind != "dino"), default=-1)
        for index, tensor in enumerate(outputs[: max(0, last_resume)]):
            if self.kept_outputs is None or index in self.kept_outputs:
                self.outputs[index] = tensor
        for ref, tokens in self.tokens.items():  # every block input as [B, S, P, C] (DINOv2: [B*S, P, C])
            if ref.kind != "dino":
                self.tokens[ref] = tokens.reshape(*self.frames, -1, tokens.shape[-1])

    def release(self, ref: LayerRef) -> None:
        """Forget the tokens recorded at ``ref`` (no intervention will start there any more)."""
        self.tokens.pop(ref, None)

    def resume_point(self, first: LayerRef) -> LayerRef | None:
        """The latest recorded layer at or before ``first`` in forward order, or ``None``."""
        reached = [ref for ref in self.tokens if resume_key(ref) <= resume_key(first)]
        return max(reached, key=resume_key, default=None)


def resume_aggregator(
    aggregator: nn.Module, images: Tensor, cache: PrefixCache, start: LayerRef
) -> tuple[list[Tensor | None], int]:
    """The aggregator's outputs on ``images`` ``[B, S, 3, H, W]``, computed from layer ``start`` on.

    The blocks before ``start`` are not run: their result is the unmodified run's, from ``cache``.
    Returns what the aggregator returns, except that outputs before ``start`` that the cache did not
    keep are ``None``.
    """
    tokens = cache.tokens[start]
    if start.kind == "dino":
        batch, frames = images.shape[:2]
        embedded, pos = aggregator.embed(images, dino_tokens=tokens, dino_first_block=start.block_index)
        return aggregator.run_blocks(embedded.unflatten(0, (batch, frames)), pos), aggregator.patch_start_idx
    index = start.block_index
    tail = aggregator.run_blocks(
        tokens, cache.positions, first_block=index, from_global=start.kind == "global"
    )
    head = [cache.outputs.get(i) for i in range(index)]
    return head + tail, aggregator.patch_start_idx
