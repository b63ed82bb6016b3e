"""Export cost against the plain forward pass, on the same random-weight model and inputs, in one run.

    python bench/export_bench.py                          # VGGT-1B, 3 frames of 518x518, stride 1
    python bench/export_bench.py --modes rollout,blocks   # what those options add
    python bench/export_bench.py --frames 2 --size 280    # quicker look
    python bench/export_bench.py --device cuda            # on a GPU, under bf16 (fp16) autocast
    python bench/export_bench.py --geometry --height 392 --stride 2   # --geometry against VGGT.forward

Modes: ``averaged`` and ``per_head`` (global layers, the exporter's default), ``rollout`` (averaged plus
``--rollout``) and ``blocks`` (averaged with ``--blocks global,frame,dino``); the last two are also
reported as what they add to ``averaged``.

Model building is excluded from every timing, and one untimed forward pass warms the allocator first.
Each export is bracketed by plain forward passes (P, E1, P, E2, P, ...) and compared with the mean of
its two neighbours, so that drift of the machine's speed during the run cancels; ``--repeats`` repeats
the sequence and reports the median ratio. Interference from other work on the machine only ever
slows a run down, so the fastest export against the fastest plain forward is printed too. Each phase
also reports the CPU time the hypervisor took from this machine (steal), a sign of a disturbed
measurement. Peak memory is the process's peak resident set size during a phase (Linux: freed heap
returned with malloc_trim and the peak reset through /proc/self/clear_refs first), compared with the
plain forward's. On a GPU the times wait for the device to finish, and peak memory is the GPU's peak
allocation.
``--phases`` also prints, for every run, the time spent in the DINOv2 patch embedding, the frame blocks
and the global blocks (where the capture's hooks run): the first two take the same time in a plain
forward and an export unless the machine's speed drifts, or threads beside the pass slow it down (an
export's global phase leaves out the block its pass stops in).
``--geometry`` builds the whole VGGT (camera, depth, point and track heads), exports with geometry, and
compares with the plain ``VGGT.forward`` given the query cells' centres as query points (what the export
computes besides the attention).
Targets (CPU): export time <= 1.20x the plain forward per head and <= 1.10x averaged; peak <= plain + 1.5 GB.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vggt.attn_format.grid import cell_centres  # noqa: E402
from vggt.device import autocast_context, select_device_and_dtype  # noqa: E402
from vggt.export import ExportOptions, export_attention  # noqa: E402
from vggt.models.config import VGGTConfig  # noqa: E402
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


def release_and_reset_peak(device: torch.device) -> None:
    """Return freed heap to the OS, then restart the peak-RSS (or peak GPU allocation) count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_bytes(device: torch.device) -> int:
    """Peak resident set size since the last reset, or on a GPU its peak allocation."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def steal_seconds() -> float:
    """CPU time the hypervisor has taken from this machine since boot, all CPUs (Linux)."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()
    return int(fields[8]) / 100.0  # clock ticks: USER_HZ is 100 on Linux


class PhaseTimer:
    """Seconds spent in each phase of the aggregator's forward pass, through forward hooks on its parts.

    On a GPU the phases are not synchronized, so they only mean something on the CPU.
    """

    def __init__(self, aggregator: torch.nn.Module) -> None:
        self.seconds: dict[str, float] = {}
        parts = {"dino": [aggregator.patch_embed], "frame": aggregator.frame_blocks,
                 "global": aggregator.global_blocks}  # fmt: skip
        for phase, modules in parts.items():
            for module in modules:
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leave(phase))
        self._started = 0.0

    def _enter(self, module, args) -> None:
        self._started = time.perf_counter()

    def _leave(self, phase: str):
        def hook(module, args, output) -> None:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - self._started

        return hook

    def report(self) -> str:
        """The phases since the last report, e.g. ``dino 12.6 s, frame 14.1 s, global 26.4 s``."""
        text = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.seconds.items())
        self.seconds = {}
        return text


def measure(label: str, run, device: torch.device, phases: PhaseTimer | None = None) -> tuple[float, int]:
    release_and_reset_peak(device)
    steal = steal_seconds()
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = peak_bytes(device)
    stolen = steal_seconds() - steal
    memory = "peak GPU" if device.type == "cuda" else "peak RSS"
    line = f"{label:<24} {seconds:7.2f} s   {memory} {peak / 1e9:5.2f} GB   steal {stolen:4.1f} s"
    if phases is not None:
        line += f"   ({phases.report()})"
    print(line, flush=True)
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=518, help="frames are size pixels wide (and high)")
    parser.add_argument("--height", type=int, help="frames are this many pixels high (default --size)")
    parser.add_argument(
        "--geometry", action="store_true", help="the whole VGGT: exports with geometry vs VGGT.forward"
    )
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--modes", default="averaged,per_head", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=1, help="run the sequence this many times")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="autocast dtype (auto: bf16/fp16 on CUDA)")
    parser.add_argument("--workdir", help="where the exports are written (default: a temporary folder)")
    parser.add_argument("--phases", action="store_true", help="print the time of each forward-pass phase")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",")]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if ("rollout" in modes or "blocks" in modes) and "averaged" not in modes:
        modes.insert(0, "averaged")  # what they add is measured against it
    torch.set_num_threads(args.threads)
    try:
        device, autocast_dtype = select_device_and_dtype(args.device, args.dtype)
    except ValueError as error:
        parser.error(str(error))

    started = time.perf_counter()
    with torch.device("meta"):
        model = VGGT.from_config(VGGTConfig(), heads=args.geometry)
    init_random_weights(model, seed=0)
    model.eval().requires_grad_(False).to(device)
    dtype_name = "float32" if autocast_dtype is None else str(autocast_dtype).removeprefix("torch.")
    height = args.height or args.size
    what = "with its heads" if args.geometry else "(aggregator)"
    print(
        f"random-weight VGGT-1B {what} built in {time.perf_counter() - started:.1f} s (not timed below); "
        f"{args.frames} frames of {args.size}x{height}, stride {args.stride}, on {device} ({dtype_name}), "
        f"{args.threads} CPU threads"
    )
    images = torch.rand(args.frames, 3, height, args.size, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    patch = model.config.aggregator.patch_size
    query_points = torch.from_numpy(
        cell_centres(height // patch, args.size // patch, args.stride, args.stride, patch)
    ).to(device)

    def plain() -> None:
        with torch.inference_mode(), autocast_context(device, autocast_dtype):
            if args.geometry:
                model(images, query_points)
            else:
                model.aggregator(images[None], keep_outputs=False)

    phases = PhaseTimer(model.aggregator) if args.phases else None
    measure("warm-up forward", plain, device, phases)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="export_bench_"))
    ratios: dict[str, list[float]] = {mode: [] for mode in modes}
    extra_memory: dict[str, list[int]] = {mode: [] for mode in modes}
    export_seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    plain_seconds: list[float] = []
    try:
        before = measure("plain forward", plain, device, phases)
        for _ in range(args.repeats):
            for mode in modes:
                options = ExportOptions(
                    stride_h=args.stride, stride_w=args.stride, geometry=args.geometry, **MODES[mode]
                )
                out = workdir / mode

                def export(options: ExportOptions = options, out: Path = out) -> None:
                    export_attention(model, images, out, options=options, autocast_dtype=autocast_dtype,
                                     progress=False)  # fmt: skip

                taken, peak = measure(f"export ({mode})", export, device, phases)
                export_seconds[mode].append(taken)
                size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                shutil.rmtree(out)
                after = measure("plain forward", plain, device, phases)
                reference = (before[0] + after[0]) / 2
                ratios[mode].append(taken / reference)
                extra_memory[mode].append(peak - max(before[1], after[1]))
                plain_seconds.extend([before[0], after[0]])
                print(f"{'':<24} ratio {taken / reference:.3f}, export size {size / 1e9:.2f} GB", flush=True)
                before = after
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    plain_s = statistics.median(plain_seconds)
    print(f"\nmedian over {args.repeats} repeat(s); plain forward {plain_s:.1f} s (median)")
    for mode in modes:
        ratio, extra_gb = statistics.median(ratios[mode]), statistics.median(extra_memory[mode]) / 1e9
        target = TIME_TARGETS.get(mode) if device.type == "cpu" else None  # the targets are the CPU's
        notes = ""
        if target is not None:
            time_ok = "ok" if ratio <= target else "MISSED"
            memory_ok = "ok" if extra_gb <= MEMORY_TARGET_GB else "MISSED"
            notes = (
                f" (target <= {target:.2f}x, {time_ok})",
                f" (target <= +{MEMORY_TARGET_GB} GB, {memory_ok})",
            )
        time_note, memory_note = notes or ("", "")
        print(f"  {mode:<9} time {ratio:.3f}x{time_note}   peak memory {extra_gb:+.2f} GB{memory_note}")
        fastest = min(export_seconds[mode]) / min(plain_seconds)
        print(f"  {'':<9} fastest export / fastest plain forward: {fastest:.3f}x")
    if "averaged" in modes:
        for mode in ("rollout", "blocks"):
            if mode in modes:
                added = statistics.median(ratios[mode]) - statistics.median(ratios["averaged"])
                memory = (
                    statistics.median(extra_memory[mode]) - statistics.median(extra_memory["averaged"])
                ) / 1e9
                print(
                    f"  {mode} adds {added:+.1%} of the plain forward ({added * plain_s:+.1f} s) and "
                    f"{memory:+.2f} GB peak memory to the averaged export"
                )


if __name__ == "__main__":
    main()
