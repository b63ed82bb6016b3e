"""Layers written in a thread of their own while the forward pass computes the next ones.

Writing a layer is mostly waiting for the disk (stored NPZ members go out with direct I/O, past the
page cache). So the exporter encodes each layer into a reusable buffer while its maps are at hand and
leaves the writing to :class:`LayerWriteQueue`.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np


class LayerWriteQueue:
    """Runs ``write(*args, **kwargs)`` calls one after another in a background thread.

    The caller encodes each layer into :meth:`buffer` and queues its write with :meth:`submit`.
    Buffers are reused in turn, ``depth`` of them: one is handed out only once the write of the
    layer it last held has finished. A failed write raises from the next :meth:`buffer`,
    :meth:`submit` or :meth:`finish`. Use as a context manager: leaving it waits for the write under
    way (and, on a clean exit, the queued ones), so that nothing writes into a folder that an error
    handler is about to remove. Its methods may be called from any thread, one at a time.

    Parameters
    ----------
    write : Callable
        Writes one layer; called with the arguments given to :meth:`submit`.
    depth : int
        Buffers, and so layers encoded ahead of the disk.
    on_written : Callable[[], object], optional
        Called (in the background thread) after each successful write, e.g. to advance a progress bar.
    """

    def __init__(
        self, write: Callable[..., object], depth: int = 2, on_written: Callable[[], object] | None = None
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._write = write
        self._on_written = on_written
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="layer-writer")
        self._buffers: list[np.ndarray | None] = [None] * depth
        self._writes: list[Future | None] = [None] * depth
        self._slot = 0

    def __enter__(self) -> LayerWriteQueue:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # On an error, writes not yet started are dropped; the one under way is waited for.
        self._thread.shutdown(wait=True, cancel_futures=exc_type is not None)

    def buffer(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous, page-aligned ``shape`` array of ``dtype`` for the next layer (contents
        undefined)."""
        self._wait(self._slot)
        dtype = np.dtype(dtype)
        count = math.prod(shape) * dtype.itemsize
        storage = self._buffers[self._slot]
        if storage is None or storage.size < count:
            # Page-aligned (an anonymous map), so that direct I/O writes it without a copy.
            storage = self._buffers[self._slot] = np.frombuffer(mmap.mmap(-1, max(count, 1)), np.uint8)
        return storage[:count].view(dtype).reshape(shape)

    def submit(self, *args, **kwargs) -> None:
        """Queue ``write(*args, **kwargs)``; a buffer from :meth:`buffer` among the arguments must
        stay untouched until :meth:`buffer` hands it out again."""
        self._wait(self._slot)
        self._writes[self._slot] = self._thread.submit(self._run, args, kwargs)
        self._slot = (self._slot + 1) % len(self._writes)

    def finish(self) -> None:
        """Wait for every queued write; raise the first error."""
        for slot in range(len(self._writes)):
            self._wait((self._slot + slot) % len(self._writes))

    def _run(self, args: tuple, kwargs: dict) -> None:
        self._write(*args, **kwargs)
        if self._on_written is not None:
            self._on_written()

    def _wait(self, slot: int) -> None:
        for write in self._writes:  # any failure so far, not only this slot's
            if write is not None and write.done() and write.exception() is not None:
                raise write.exception()
        write = self._writes[slot]
        if write is not None:
            write.result()
            self._writes[slot] = None
