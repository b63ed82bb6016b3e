"""Cost of a head-ablation sweep with prefix reuse against full forward passes, in one run.

    python bench/intervention_bench.py                     # VGGT-1B, 2 frames of 518x392, global layer 12
    python bench/intervention_bench.py --forwards 5        # five measured full forwards instead of three
    python bench/intervention_bench.py --repeats 3         # median and spread of three sweeps
    python bench/intervention_bench.py --naive             # also the ablations run from scratch
    python bench/intervention_bench.py --model_config examples/vggt_small_config.json --layer 6   # quick

The model is random-weight VGGT-1B (or ``--model_config``'s architecture) with its camera, depth, point
and track heads (building it is not timed); the frames are two of the bundled ``examples/synthetic_room``
images (518x392); the track head follows the query cells of ``intervene_attention.py``'s default stride.
One untimed forward pass warms the allocator first.

A sweep is what ``intervene_attention.py --ablate_heads global:12`` runs: the unmodified model once
(recording the tokens entering global layer 12 and the aggregator outputs the heads read), then one
single-head ablation per head (16 on VGGT-1B), each from global layer 12 on
(:class:`vggt.intervention_sweep.InterventionRunner`). It is compared with as many full forward passes
``VGGT(images, query_points)``: on a CPU one takes minutes, so ``--forwards N`` of them (default 3) are
measured, interleaved with the sweeps (F S F S F ..., so that drift of the machine's speed reaches both),
and the cost of 16 is taken as 16 times their median; the printout says so. With ``--naive`` the
ablations are also run from scratch (:func:`vggt.interventions.run_with_interventions`).
Peak memory is the process's peak resident set size (or peak GPU allocation) during each phase; see
``bench/export_bench.py``, whose measuring helpers this uses.
Target (CPU, VGGT-1B): sweep <= 0.65x of 16 full forward passes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export_bench import measure  # noqa: E402  (bench/ is on the path: this script's folder)

from vggt.arguments import UsageError  # noqa: E402
from vggt.attn_format.grid import cell_centres  # noqa: E402
from vggt.capture import LayerRef  # noqa: E402
from vggt.cli_common import model_config  # noqa: E402
from vggt.device import autocast_context, select_device_and_dtype  # noqa: E402
from vggt.intervention_sweep import InterventionRunner  # noqa: E402
from vggt.interventions import HeadAblation, run_with_interventions  # noqa: E402
from vggt.models.vggt import VGGT  # noqa: E402
from vggt.preprocess import load_and_preprocess_images  # noqa: E402
from vggt.weights import init_random_weights  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / "examples" / "synthetic_room" / "images"
TARGET = 0.65


def interleaved(forwards: int, sweeps: int) -> list[str]:
    """The order of the measured runs: ``"F"`` (a full forward) and ``"S"`` (a sweep) alternating from a
    forward on, the rest of the more numerous after."""
    order = []
    while forwards or sweeps:
        if forwards:
            order.append("F")
            forwards -= 1
        if sweeps:
            order.append("S")
            sweeps -= 1
    return order


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=2, help="bundled images used (default 2)")
    parser.add_argument(
        "--layer", type=int, default=12, help="global layer whose heads are ablated (1-based, default 12)"
    )
    parser.add_argument(
        "--stride", type=int, default=4, help="query cells tracked: every Nth patch (default 4)"
    )
    parser.add_argument("--forwards", type=int, default=3, help="full forwards measured (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="sweeps measured (default 1)")
    parser.add_argument("--naive", action="store_true", help="also time the ablations run from scratch")
    parser.add_argument(
        "--model_config", help="JSON architecture instead of VGGT-1B's (as the CLIs' --model_config)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="autocast dtype (auto: bf16/fp16 on CUDA)")
    args = parser.parse_args()
    if args.forwards < 1 or args.repeats < 1 or args.frames < 2:
        parser.error("--forwards and --repeats must be at least 1, --frames at least 2")
    torch.set_num_threads(args.threads)
    try:
        device, autocast_dtype = select_device_and_dtype(args.device, args.dtype)
        config = model_config(args)
    except (ValueError, UsageError) as error:
        parser.error(str(error))
    if not 1 <= args.layer <= config.aggregator.depth:
        parser.error(f"--layer {args.layer}: the model has global layers 1 to {config.aggregator.depth}")

    started = time.perf_counter()
    with torch.device("meta"):
        model = VGGT.from_config(config, heads=True)
    init_random_weights(model, seed=0)
    model.eval().requires_grad_(False).to(device)
    paths = sorted(IMAGES.glob("*.png"))
    chosen = [paths[round(i * (len(paths) - 1) / (args.frames - 1))] for i in range(args.frames)]
    images = load_and_preprocess_images(chosen, mode="crop").to(device)
    height, width = images.shape[-2:]
    patch = model.config.aggregator.patch_size
    points = torch.from_numpy(cell_centres(height // patch, width // patch, args.stride, args.stride, patch))
    points = points.to(device)
    layer = LayerRef("global", args.layer - 1)
    heads = model.aggregator.global_blocks[layer.block_index].attn.num_heads
    ablations = [HeadAblation(layer, (head,)) for head in range(heads)]
    dtype_name = "float32" if autocast_dtype is None else str(autocast_dtype).removeprefix("torch.")
    name = "VGGT-1B" if args.model_config is None else f"VGGT of {args.model_config}"
    print(
        f"random-weight {name} with heads built in {time.perf_counter() - started:.1f} s (not timed below); "
        f"{args.frames} frames of {width}x{height}, {len(points)} tracked query points, on {device} "
        f"({dtype_name}), {args.threads} CPU threads; sweep: the {heads} heads of global layer {args.layer}"
    )

    def full() -> None:
        with torch.inference_mode(), autocast_context(device, autocast_dtype):
            model(images, points)

    def sweep() -> None:
        runner = InterventionRunner(model, images, points, autocast_dtype)
        runner.run_unmodified(resume_at=[layer])
        for _ in runner.sweep(ablations):
            pass

    def naive() -> None:
        with torch.inference_mode(), autocast_context(device, autocast_dtype):
            for ablation in ablations:
                run_with_interventions(model, images, [ablation], query_points=points)

    measure("warm-up forward (untimed)", full, device)
    timed = {"F": [], "S": []}
    for run in interleaved(args.forwards, args.repeats):
        label = "full forward" if run == "F" else f"sweep ({heads} heads)"
        timed[run].append(measure(label, full if run == "F" else sweep, device))
    forward = statistics.median(seconds for seconds, _ in timed["F"])
    forwards = f"{heads} x the median of {args.forwards} measured full forwards ({heads * forward:.1f} s)"
    ratios = [seconds / (heads * forward) for seconds, _ in timed["S"]]
    if args.naive:
        taken, _ = measure(f"{heads} ablations from scratch", naive, device)
        print(f"{'':<24} from scratch / ({forwards}): {taken / (heads * forward):.3f}")

    ratio = statistics.median(ratios)
    verdict = "ok" if ratio <= TARGET else "MISSED"
    spread = f", spread {min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else ""
    target = (
        f" (target <= {TARGET:.2f}x, {verdict})" if device.type == "cpu" and not args.model_config else ""
    )
    print(
        f"\nsweep / {heads} full forward passes: {ratio:.3f}x median of {len(ratios)} sweeps{spread}{target}"
    )
    print(f"  {heads} full forward passes estimated as {forwards}, not run {heads} times")
    full_seconds = [seconds for seconds, _ in timed["F"]]
    sweep_peak, full_peak = (max(peak for _, peak in timed[run]) / 1e9 for run in ("S", "F"))
    print(
        f"full forward {forward:.2f} s (median, spread {min(full_seconds):.2f}-{max(full_seconds):.2f} s); "
        f"peak memory: sweep {sweep_peak:.2f} GB, full forward {full_peak:.2f} GB"
    )


if __name__ == "__main__":
    main()
