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

from collections.abc import Callable, Iterable, Iterator

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class HookPoint(nn.Module):
    """Identity module marking a place where forward hooks can read activations."""

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tensors


def iter_hook_points(model: nn.Module, suffix: str = "") -> Iterator[tuple[str, HookPoint]]:
    """Yield ``(qualified_name, hook_point)`` for every hook point whose name ends with ``suffix``."""
    for name, module in model.named_modules():
        if isinstance(module, HookPoint) and name.endswith(suffix):
            yield name, module


class HookSession:
    """Forward hooks on hook points for the duration of a ``with`` block.

    Subclasses say which hooks to attach in :meth:`hooks`; they are attached on entry and removed on
    exit, also when the block (or attaching itself) raises, so a model never keeps a stray hook.
    """

    def hooks(self) -> Iterable[tuple[nn.Module, Callable]]:
        """``(module, hook)`` pairs to attach with ``module.register_forward_hook(hook)``."""
        raise NotImplementedError

    def __enter__(self):
        self._handles: list[RemovableHandle] = []
        try:
            for module, hook in self.hooks():
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach every hook this session attached."""
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []
