"""Export cost against the plain forward pass, on the same random-weight model and inputs, in one run.

    python bench/export_bench.py                       # VGGT-1B, 3 frames of 518x518, stride 1
    python bench/export_bench.py --modes rollout,blocks
    python bench/export_bench.py --frames 2 --size 280 # quicker look

Modes: ``averaged`` and ``per_head`` (global layers, the exporter's default), ``rollout`` (averaged plus
``--rollout``) and ``blocks`` (averaged with ``--blocks global,frame,dino``); the last two are also
reported as what they add to ``averaged``.

Model building is excluded from every timing, and one untimed forward pass warms the allocator first.
The plain forward is timed before and after the exports and the ratios use the mean of the two, so that
drift of the machine's speed during the run does not favour either side. Peak memory is the process's
peak resident set size during each phase (Linux: reset through /proc/self/clear_refs before each phase).
Targets: export time <= 1.20x the plain forward per head and <= 1.10x averaged; peak <= plain + 1.5 GB.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vggt.export import ExportOptions, export_attention  # noqa: E402
from vggt.models.vggt import VGGT  # noqa: E402
from vggt.weights import init_random_weights  # noqa: E402

MODES = {
    "averaged": {},
    "per_head": {"per_head": True},
    "rollout": {"rollout": True},
    "blocks": {"blocks": ("global", "frame", "dino")},
}
TIME_TARGETS = {"averaged": 1.10, "per_head": 1.20}
MEMORY_TARGET_GB = 1.5


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(label: str, run) -> tuple[float, int]:
    gc.collect()
    reset_peak_rss()
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    print(f"{label:<22} {seconds:8.1f} s   peak RSS {peak / 1e9:6.2f} GB", flush=True)
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=518, help="frames are size x size pixels")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--modes", default="averaged,per_head", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--workdir", help="where the exports are written (default: a temporary folder)")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",")]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if ("rollout" in modes or "blocks" in modes) and "averaged" not in modes:
        modes.insert(0, "averaged")  # what they add is measured against it
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    with torch.device("meta"):
        model = VGGT()
    init_random_weights(model, seed=0)
    model.eval().requires_grad_(False)
    print(
        f"random-weight VGGT-1B built in {time.perf_counter() - started:.1f} s (not timed below); "
        f"{args.frames} frames of {args.size}x{args.size}, stride {args.stride}, {args.threads} threads"
    )
    images = torch.rand(args.frames, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))

    def plain() -> None:
        with torch.inference_mode():
            model.aggregator(images[None], keep_outputs=False)

    measure("warm-up forward", plain)
    first_s, first_peak = measure("plain forward", plain)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="export_bench_"))
    results = {}
    try:
        for mode in modes:
            options = ExportOptions(stride_h=args.stride, stride_w=args.stride, **MODES[mode])
            out = workdir / mode

            def export(options: ExportOptions = options, out: Path = out) -> None:
                export_attention(model, images, out, options=options, progress=False)

            results[mode] = measure(f"export ({mode})", export)
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            print(f"{'':<22} export size {size / 1e9:.2f} GB", flush=True)
            shutil.rmtree(out)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    last_s, last_peak = measure("plain forward again", plain)
    plain_s, plain_peak = (first_s + last_s) / 2, max(first_peak, last_peak)

    print(f"\nratios (export / plain forward, plain = mean of {first_s:.1f} s and {last_s:.1f} s):")
    for mode, (seconds, peak) in results.items():
        extra_gb = (peak - plain_peak) / 1e9
        target = TIME_TARGETS.get(mode)
        time_note = (
            ""
            if target is None
            else f" (target <= {target:.2f}x, {'ok' if seconds / plain_s <= target else 'MISSED'})"
        )
        memory_note = (
            ""
            if target is None
            else (
                f" (target <= +{MEMORY_TARGET_GB} GB, {'ok' if extra_gb <= MEMORY_TARGET_GB else 'MISSED'})"
            )
        )
        print(
            f"  {mode:<9} time {seconds / plain_s:.3f}x{time_note}   "
            f"peak memory {peak / plain_peak:.3f}x, +{extra_gb:.2f} GB{memory_note}"
        )
    if "averaged" in results:
        base_s, base_peak = results["averaged"]
        for mode in ("rollout", "blocks"):
            if mode in results:
                seconds, peak = results[mode]
                print(
                    f"  {mode} adds {seconds - base_s:+.1f} s ({(seconds - base_s) / plain_s:+.1%} of the "
                    f"plain forward) and {(peak - base_peak) / 1e9:+.2f} GB peak to the averaged export"
                )


if __name__ == "__main__":
    main()
