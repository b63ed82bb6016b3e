"""Hook points: named places in the forward pass where activations can be read.

A :class:`HookPoint` is an identity module. Calling it costs one ``nn.Module.__call__`` and
nothing else, so the forward pass is unchanged while no hook is attached. Attach ordinary PyTorch
forward hooks to read what flows through it::

    def read_qk(module, args, output):
        q, k = args  # each [B, heads, N, head_dim]

    handle = model.aggregator.global_blocks[3].attn.hook_qk.register_forward_hook(read_qk)
    ...
    handle.remove()

A caller that needs nothing after some point of the forward pass ends it there with
:class:`StopAfter`, as TransformerLens's ``stop_at_layer`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class HookPoint(nn.Module):
    """Identity module marking a place where forward hooks can read activations."""

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tensors


class MaskHookPoint(nn.Module):
    """Hook point that yields an attention mask: ``None`` (attend everywhere) unless a hook gives one.

    Forward hooks see ``(q, k)`` as ``args`` and the mask so far as ``output``; one that returns a
    boolean tensor replaces it, and the next hook sees that one, so several hooks can combine masks.
    """

    def forward(self, q: Tensor, k: Tensor) -> Tensor | None:
        return None


def iter_hook_points(model: nn.Module, suffix: str = "") -> Iterator[tuple[str, HookPoint | MaskHookPoint]]:
    """Yield ``(qualified_name, hook_point)`` for every hook point whose name ends with ``suffix``."""
    for name, module in model.named_modules():
        if isinstance(module, (HookPoint, MaskHookPoint)) and name.endswith(suffix):
            yield name, module


class HookSession:
    """Forward hooks on hook points for the duration of a ``with`` block.

    Subclasses say which hooks to attach in :meth:`hooks`; they are attached on entry and removed on
    exit, also when the block (or attaching itself) raises, so a model never keeps a stray hook.
    """

    def hooks(self) -> Iterable[tuple[nn.Module, Callable]]:
        """``(module, hook)`` pairs to attach with ``module.register_forward_hook(hook)``."""
        raise NotImplementedError

    def pre_hooks(self) -> Iterable[tuple[nn.Module, Callable]]:
        """``(module, hook)`` pairs to attach with ``module.register_forward_pre_hook(hook)``: hooks that
        see a module's inputs before it runs. None by default."""
        return ()

    def __enter__(self):
        self._handles: list[RemovableHandle] = []
        try:
            for module, hook in self.pre_hooks():
                self._handles.append(module.register_forward_pre_hook(hook))
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


class StopForward(Exception):
    """Raised by the hook of a :class:`StopAfter` session to end the forward pass early."""

    def __init__(self, session: StopAfter) -> None:
        super().__init__("forward pass stopped early")
        self.session = session


class StopAfter(HookSession):
    """Ends the forward pass as soon as ``module`` has run: for callers that need nothing after it.

    Enter it after the sessions whose hooks on ``module`` must still run (hooks run in the order they
    were attached). The ``with`` block swallows the :class:`StopForward` its hook raised, so
    ``with StopAfter(module): model(x)`` simply returns early; :attr:`stopped` tells whether it did.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.stopped = False

    def hooks(self) -> Iterable[tuple[nn.Module, Callable]]:
        yield self.module, self._stop

    def _stop(self, module: nn.Module, args, output) -> None:
        self.stopped = True
        raise StopForward(self)

    def __exit__(self, exc_type, exc, traceback) -> bool:
        super().__exit__(exc_type, exc, traceback)
        return isinstance(exc, StopForward) and exc.session is self
