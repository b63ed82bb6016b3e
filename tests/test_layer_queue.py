"""The background queue of layer writes: order, buffer reuse only after a write, errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vggt.layer_queue import LayerWriteQueue


def test_buffers_are_reused_only_after_their_write() -> None:
    """Slow writes: each sees the values its layer was encoded with, none overwritten by a later layer."""
    written, threads = [], set()

    def slow_write(index: int, codes: np.ndarray, *, note: str) -> None:
        time.sleep(0.02)
        threads.add(threading.get_ident())
        written.append((index, note, codes.copy()))

    done = []
    with LayerWriteQueue(slow_write, depth=2, on_written=lambda: done.append(1)) as queue:
        for index in range(7):
            codes = queue.buffer((3, 5), np.uint8)
            codes[...] = index
            queue.submit(index, codes, note=f"layer {index}")
        queue.finish()
        assert len(done) == 7
    assert [(index, note) for index, note, _ in written] == [(i, f"layer {i}") for i in range(7)]
    assert all(np.all(codes == index) for index, _, codes in written)
    assert threads and threading.get_ident() not in threads


def test_buffer_views_fit_any_shape_and_dtype() -> None:
    with LayerWriteQueue(lambda *args: None, depth=1) as queue:
        small = queue.buffer((2, 3), np.float16)
        assert small.shape == (2, 3) and small.dtype == np.float16 and small.flags.c_contiguous
        queue.submit(small)
        large = queue.buffer((4, 1000), np.uint8)
        assert large.shape == (4, 1000) and large.flags.c_contiguous


def test_failed_write_raises_from_a_later_call_and_exit_waits() -> None:
    finished = []

    def write(index: int) -> None:
        if index == 1:
            raise OSError(28, "No space left on device")
        time.sleep(0.05)
        finished.append(index)

    with pytest.raises(OSError, match="No space left"):
        with LayerWriteQueue(write, depth=3) as queue:
            for index in range(6):
                queue.submit(index)
                time.sleep(0.01)
            queue.finish()
    # Leaving the queue waited for every write already under way.
    assert 0 in finished and all(index != 1 for index in finished)
    assert finished == sorted(finished)


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth must be at least 1"):
        LayerWriteQueue(lambda: None, depth=0)
