"""Hook points: named places in the forward pass where activations can be read.

A :class:`HookPoint` is an identity module. Calling it costs one ``nn.Module.__call__`` and
nothing else, so the forward pass is unchanged while no hook is attached. Attach ordinary PyTorch
forward hooks to read what flows through it::

    def read_qk(module, args, output):
        q, k = args  # each [B, heads, N, head_dim]

    handle = model.aggregator.global_blocks[3].attn.hook_qk.register_forward_hook(read_qk)
    ...
    handle.remove()
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn


class HookPoint(nn.Module):
    """Identity module marking a place where forward hooks can read activations."""

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tensors


def iter_hook_points(model: nn.Module, suffix: str = "") -> Iterator[tuple[str, HookPoint]]:
    """Yield ``(qualified_name, hook_point)`` for every hook point whose name ends with ``suffix``."""
    for name, module in model.named_modules():
        if isinstance(module, HookPoint) and name.endswith(suffix):
            yield name, module
