"""The background queue of layer writes: order, buffer reuse only after a write, errors.

Writes are held back by events, so that every test sees the queue in a known state."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from vggt.layer_queue import LayerWriteQueue


def test_a_buffer_is_handed_out_again_only_after_its_write() -> None:
    gates = [threading.Event() for _ in range(3)]
    written, threads = [], set()

    def write(index: int, codes: np.ndarray, *, note: str) -> None:
        gates[index].wait()
        threads.add(threading.get_ident())
        written.append((index, note, codes.copy()))

    done = []
    with LayerWriteQueue(write, depth=2, on_written=lambda: done.append(1)) as queue:
        for index in range(2):
            codes = queue.buffer((3, 5), np.uint8)
            codes[...] = index
            queue.submit(index, codes, note=f"layer {index}")
        handed = []
        third = threading.Thread(target=lambda: handed.append(queue.buffer((3, 5), np.uint8)))
        third.start()
        third.join(timeout=0.2)
        assert third.is_alive() and not handed  # layer 0's buffer is still being written
        gates[0].set()
        third.join()
        assert [index for index, _, _ in written] == [0]
        handed[0][...] = 2
        queue.submit(2, handed[0], note="layer 2")
        gates[1].set()
        gates[2].set()
        queue.finish()
        assert len(done) == 3
    assert [(index, note) for index, note, _ in written] == [(i, f"layer {i}") for i in range(3)]
    assert all(np.all(codes == index) for index, _, codes in written)
    assert threads and threading.get_ident() not in threads


def test_buffer_views_fit_any_shape_and_dtype() -> None:
    with LayerWriteQueue(lambda *args: None, depth=1) as queue:
        small = queue.buffer((2, 3), np.float16)
        assert small.shape == (2, 3) and small.dtype == np.float16 and small.flags.c_contiguous
        queue.submit(small)
        large = queue.buffer((4, 1000), np.uint8)
        assert large.shape == (4, 1000) and large.flags.c_contiguous


def test_failed_write_raises_from_a_later_call_and_leaving_waits_for_the_write_under_way() -> None:
    gates = {index: threading.Event() for index in (0, 2)}
    started, finished = threading.Event(), []

    def write(index: int) -> None:
        if index == 1:
            raise OSError(28, "No space left on device")
        if index == 2:
            started.set()
        gates[index].wait()
        finished.append(index)

    with pytest.raises(OSError, match="No space left"):
        with LayerWriteQueue(write, depth=4) as queue:
            leave = queue._thread.shutdown

            def open_gate_then_leave(*args, **kwargs) -> None:
                # Layer 2 is being written when the queue is left: leaving waits for it.
                started.wait()
                threading.Thread(target=gates[2].set).start()
                leave(*args, **kwargs)

            queue._thread.shutdown = open_gate_then_leave
            for index in range(4):
                queue.submit(index)
            gates[0].set()
            queue.finish()  # layer 0 is written, layer 1's error comes out here
    assert finished == [0, 2]  # layer 2, under way, was waited for; layer 3 never started


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth must be at least 1"):
        LayerWriteQueue(lambda: None, depth=0)
