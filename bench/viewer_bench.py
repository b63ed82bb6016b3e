"""Server-side timings of the viewer's handlers on a full-size export this script writes itself.

The export has the size of a real VGGT-1B export per head at stride 1: 24 layers, 16 heads, 3 frames
of 518x518 (37x37 patches, Q = 1369), about 2.2 GB of uint8, with every frame's camera-token maps. It is
written with the format's writer into a temporary folder (synthetic maps, exact probabilities) and
deleted afterwards. ``token view`` renders the camera-token view; ``layer change`` switches between two
layers (head control, query view and camera-token view together).

Usage: ``python bench/viewer_bench.py [--layers 24 --heads 16 --frames 3 --size 518 --repeats 9]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vggt.testing.synthetic import write_synthetic_export  # noqa: E402
from vggt.viewer import handlers  # noqa: E402
from vggt.viewer.state import CACHE, Session  # noqa: E402

# Targets of the viewer issue, milliseconds; the seed fork's viewer measured 131 / 3800 / 720 ms.
TARGETS_MS = {"Load": 200.0, "click": 30.0, "all layers": 400.0, "all heads": 300.0}


def median_ms(run: Callable[[int], object], repeats: int) -> float:
    """Median wall time of ``run(i)`` over ``repeats`` calls, after one warm-up call."""
    run(-1)
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        run(index)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def click_at(index: int, size: int) -> gr.SelectData:
    """A click at a different pixel each time, so each call reads another query's maps."""
    step = 37 * 7 + 3
    x = (index * step) % size
    y = (index * step * 3 + 11) % size
    return gr.SelectData(None, {"index": [x, y], "value": None, "selected": True})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=518, help="frame side in pixels (multiple of 14)")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    patches = args.size // 14

    workdir = Path(tempfile.mkdtemp(prefix="viewer-bench-"))
    try:
        start = time.perf_counter()
        root = write_synthetic_export(
            workdir / "export",
            num_frames=args.frames,
            H_p=patches,
            W_p=patches,
            num_layers=args.layers,
            num_heads=args.heads,
            per_head=True,
        )
        size_gb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e9
        elapsed = time.perf_counter() - start
        print(
            f"export: {args.layers} layers, {args.heads} heads, {args.frames} frames of "
            f"{args.size}x{args.size}, stride 1, Q={patches * patches}, {size_gb:.2f} GB uint8 "
            f"(written in {elapsed:.0f} s)"
        )

        def load(_: int) -> object:
            CACHE.clear()  # every Load opens, validates and decodes from scratch
            return handlers.on_load(str(root), Session())

        results = {"Load": median_ms(load, args.repeats)}
        session = handlers.on_load(str(root), Session()).session
        layer = f"layer_{args.layers:02d}"
        session = handlers.on_query_select(
            session, layer, "Average", 0.6, False, False, click_at(0, args.size)
        ).session

        def click(index: int, head: str = "Average") -> object:
            event = click_at(index, args.size)
            return handlers.on_query_select(session, layer, head, 0.6, False, False, event)

        results["click"] = median_ms(click, args.repeats)
        results["click (one head)"] = median_ms(lambda i: click(i, "Head 3"), args.repeats)
        results["all layers"] = median_ms(
            lambda i: handlers.on_settings_change(session, layer, "Average", 0.6, True, False), args.repeats
        )
        results["all heads"] = median_ms(
            lambda i: handlers.on_settings_change(session, layer, "Average", 0.6, False, True), args.repeats
        )
        results["reverse click"] = median_ms(
            lambda i: handlers.on_reverse_select(session, 1, layer, "Average", 0.6, click_at(i, args.size)),
            args.repeats,
        )
        results["token view"] = median_ms(
            lambda i: handlers.on_token_view(session, layer, "Average", 0.6, f"camera:{i % args.frames}"),
            args.repeats,
        )
        other = f"layer_{max(args.layers - 1, 1):02d}"
        results["layer change"] = median_ms(
            lambda i: handlers.on_layer_change(
                session, (layer, other)[i % 2], "Head 3", 0.6, False, False, "camera:0"
            ),
            args.repeats,
        )
    finally:
        CACHE.clear()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nmedian handler time over {args.repeats} calls (server side, images not yet encoded by Gradio)")
    print(f"{'handler':<18}{'median ms':>11}{'target ms':>11}  verdict")
    failed = False
    for name, value in results.items():
        target = TARGETS_MS.get(name)
        verdict = "" if target is None else ("ok" if value <= target else "MISSED")
        failed |= verdict == "MISSED"
        target_text = "-" if target is None else f"{target:.0f}"
        print(f"{name:<18}{value:>11.1f}{target_text:>11}  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
