"""Command line of ``intervene_attention.py``: a sweep of interventions on VGGT and what each one costs.

The unmodified model runs once; then each intervention of the sweep runs from the first layer it
changes (:mod:`vggt.intervention_sweep`), and its cameras, depth, world points and tracks are compared
with the unmodified run's and, for a scene with known geometry, with the truth
(:mod:`vggt.intervention_metrics`). The output folder holds ``results.csv``
(:mod:`vggt.intervention_results`), ``sweep.json`` (what was run) and figures. Every user error ends
the run with one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vggt import __version__
from vggt.arguments import OneLineParser, UsageError
from vggt.attn_format.grid import cell_centres
from vggt.attn_format.schema import BLOCK_KINDS, is_stride
from vggt.capture import LayerRef, attention_blocks
from vggt.cli_common import (
    ImageChoice,
    add_image_flags,
    add_output_flags,
    add_weights_flags,
    check_output_free,
    check_weights_flags,
    choose_images_from_flags,
    device_and_dtype,
    flag_adder,
    load_weights,
    model_config,
    output_folder,
    run_command,
    scene_folder,
    weights_description,
)
from vggt.geometry.correspondence import SceneError, true_correspondences
from vggt.geometry.frames import true_frame_geometry
from vggt.intervention_figures import write_figures
from vggt.intervention_metrics import TRUTH_PREFIX, RunGeometry, compare
from vggt.intervention_results import COLUMNS, RESULTS_NAME, ResultRow, write_results
from vggt.intervention_sweep import InterventionRunner, run_geometry
from vggt.interventions import (
    ABLATION_MODES,
    IMPORTANCE_QUERIES,
    SPARSITY_RULES,
    BlockSparsity,
    GlobalToFrame,
    HeadAblation,
    Intervention,
    InterventionError,
    KeyImportanceCapture,
    KeyMask,
    check_fraction,
    keep_by_mass,
)
from vggt.models.vggt import VGGT
from vggt.preprocess import load_and_preprocess_images
from vggt.wording import plural

DEFAULT_PREFIX = "interventions_"
KINDS = BLOCK_KINDS
SWEEP_NAME = "sweep.json"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        description="Ablate heads, mask keys, turn global layers into frame layers or sparsify attention, "
        "one intervention at a time, and measure what VGGT's cameras, depth, world points and tracks lose "
        "against the unmodified run (and the true geometry of a scene). Writes results.csv and figures.",
    )
    add = flag_adder(parser)
    add_image_flags(add)
    add(
        "ablate_heads",
        metavar="SPEC",
        help="ablate one head at a time: 'all' (every head of every global layer) or comma-separated "
        "[KIND:]LAYERS[:HEADS], e.g. global:12, frame:1-4:1-8, dino:all (1-based; KIND global by default)",
    )
    add(
        "ablation", choices=ABLATION_MODES, default="zero", help="replace a head's output by zero or its mean"
    )
    add("mask_keys", action="store_true", help="mask keys by their attention mass at --reference_layer")
    add(
        "reference_layer",
        default="global:12",
        metavar="[KIND:]N",
        help="layer whose attention ranks the keys",
    )
    add("masses", default="0.3,0.5,0.7", help="kept attention masses of the key masks, each in (0, 1]")
    add(
        "importance",
        choices=IMPORTANCE_QUERIES,
        default="camera",
        help="queries whose attention ranks the keys: every frame's camera token (camera), or the query "
        "frame's patches (query_frame)",
    )
    add(
        "mask_layers",
        metavar="SPEC",
        help="layers whose keys are masked (default: global layers after the reference)",
    )
    add(
        "global_to_frame",
        action="append",
        metavar="LAYERS",
        help="global layers that attend within each frame only, e.g. 1-9 (repeat for more interventions)",
    )
    add("block_sparse", metavar="THRESHOLDS", help="block-sparse attention at each threshold, e.g. 0.5,0.7")
    add(
        "block_rule",
        choices=SPARSITY_RULES,
        default="share",
        help="keep key blocks until their score share reaches the threshold, or a fixed ratio of them",
    )
    add(
        "block_layers",
        metavar="SPEC",
        default="global:all",
        help="layers made block-sparse (default global:all)",
    )
    add("block_size", type=int, default=64, help="tokens per block (default %(default)s)")
    add(
        "stride",
        type=int,
        default=4,
        help="query cells for the tracks: every Nth patch of frame 0 (default 4)",
    )
    add(
        "scene", help="scene folder with the true geometry (default: the image folder's parent, if it is one)"
    )
    add_output_flags(add, DEFAULT_PREFIX)
    add_weights_flags(add)
    add("quiet", action="store_true", help="no plan printout and no progress bars")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# ---- the sweep's specification ---------------------------------------------------------------------


def _numbers(text: str, maximum: int, what: str, flag: str) -> list[int]:
    """``N``, ``A-B`` or ``all`` (1-based, within 1..maximum) -> the numbers."""
    if text.strip().lower() == "all":
        return list(range(1, maximum + 1))
    first, dash, last = text.strip().partition("-")
    if not first.isdigit() or (dash and not last.isdigit()):
        raise UsageError(f"{flag}: bad {what} {text!r}: use N, A-B or all")
    start, stop = int(first), int(last) if dash else int(first)
    if start > stop:
        raise UsageError(f"{flag}: {what} range {text} runs backwards")
    return list(range(start, stop + 1))


def _layer_refs(aggregator, kind: str, numbers: Sequence[int], flag: str) -> list[LayerRef]:
    if kind not in KINDS:
        raise UsageError(f"{flag}: unknown layer kind {kind!r}: use {', '.join(KINDS)}")
    depth = len(attention_blocks(aggregator, kind))
    for number in numbers:
        if not 1 <= number <= depth:
            raise UsageError(
                f"{flag}: {kind} layer {number} does not exist: the model has {kind} layers 1-{depth}"
            )
    return [LayerRef(kind, number - 1) for number in numbers]


def parse_layer_spec(aggregator, spec: str, flag: str) -> list[LayerRef]:
    """Comma-separated ``[KIND:]LAYERS`` items -> layers, in order, without repeats."""
    refs: list[LayerRef] = []
    for item in spec.split(","):
        if not item.strip():
            raise UsageError(f"{flag}: empty item in {spec!r}")
        kind, _, layers = item.strip().rpartition(":")
        kind = kind.lower() or "global"
        depth = len(attention_blocks(aggregator, kind)) if kind in KINDS else 0
        refs += _layer_refs(aggregator, kind, _numbers(layers, depth, "layers", flag), flag)
    return list(dict.fromkeys(refs))


def parse_head_spec(aggregator, spec: str) -> list[tuple[LayerRef, int]]:
    """``--ablate_heads``: ``all`` or comma-separated ``[KIND:]LAYERS[:HEADS]`` -> (layer, 0-based head)."""
    flag = "--ablate_heads"
    if spec.strip().lower() == "all":
        spec = "global:all"
    pairs: list[tuple[LayerRef, int]] = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if not item.strip() or len(parts) > 3:
            raise UsageError(f"{flag}: bad item {item.strip()!r}: use [KIND:]LAYERS[:HEADS]")
        named_kind = parts[0].isalpha() and parts[0].lower() != "all"
        if not named_kind:
            parts = ["global", *parts]
        kind, layers, heads = (parts + ["all"])[:3]
        kind = kind.lower()
        if kind not in KINDS:
            raise UsageError(f"{flag}: unknown layer kind {kind!r}: use {', '.join(KINDS)}")
        blocks = attention_blocks(aggregator, kind)
        for ref in _layer_refs(aggregator, kind, _numbers(layers, len(blocks), "layers", flag), flag):
            num_heads = blocks[ref.block_index].attn.num_heads
            for head in _numbers(heads, num_heads, "heads", flag):
                if not 1 <= head <= num_heads:
                    raise UsageError(
                        f"{flag}: head {head} does not exist: {kind} layer {ref.number} has heads "
                        f"1-{num_heads}"
                    )
                pairs.append((ref, head - 1))
    return list(dict.fromkeys(pairs))


def parse_fractions(text: str, flag: str) -> list[float]:
    """Comma-separated numbers in (0, 1]."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"{flag}: {part.strip()!r} is not a number") from None
        try:
            values.append(check_fraction(value, f"{flag} value"))
        except InterventionError as err:
            raise UsageError(str(err)) from None
    return list(dict.fromkeys(values))


def layers_text(refs: Sequence[LayerRef]) -> str:
    """``global:1-9``, ``global:12,frame:3``: layers as kind:ranges of 1-based numbers."""
    parts = []
    for kind in KINDS:
        numbers = sorted(ref.number for ref in refs if ref.kind == kind)
        ranges: list[list[int]] = []
        for number in numbers:
            if ranges and number == ranges[-1][1] + 1:
                ranges[-1][1] = number
            else:
                ranges.append([number, number])
        if ranges:
            parts.append(kind + ":" + "+".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges))
    return ",".join(parts)


@dataclass
class Planned:
    """One intervention of the sweep, as planned before the model runs."""

    kind: str
    label: str
    layers: tuple[LayerRef, ...]
    head: int | None = None  # 0-based
    value: float | None = None
    intervention: Intervention | None = None  # key masks are made from the unmodified run

    @property
    def first_layer(self) -> LayerRef:
        return min(self.layers, key=lambda ref: ref.forward_position)


@dataclass
class SweepPlan:
    items: list[Planned]
    reference_layer: LayerRef | None = None
    settings: dict = field(default_factory=dict)


def plan_sweep(args: argparse.Namespace, model: VGGT) -> SweepPlan:
    """The interventions the flags ask for, each checked against the model; raises :class:`UsageError`."""
    aggregator = model.aggregator
    items: list[Planned] = []
    settings: dict = {}
    if args.ablate_heads is not None:
        for ref, head in parse_head_spec(aggregator, args.ablate_heads):
            label = f"ablate {ref.kind} {ref.number} head {head + 1} ({args.ablation})"
            intervention = HeadAblation(ref, (head,), args.ablation)
            items.append(Planned("ablate_heads", label, (ref,), head=head, intervention=intervention))
        settings["ablation"] = args.ablation
    reference = None
    if args.mask_keys:
        references = parse_layer_spec(aggregator, args.reference_layer, "--reference_layer")
        if len(references) != 1:
            raise UsageError(f"--reference_layer: give one layer, not {args.reference_layer!r}")
        reference = references[0]
        if args.mask_layers is not None:
            masked = parse_layer_spec(aggregator, args.mask_layers, "--mask_layers")
        else:  # as the seed fork: the global layers after the reference
            masked = [LayerRef("global", i) for i in range(len(aggregator.global_blocks))]
            masked = [ref for ref in masked if ref.forward_position > reference.forward_position]
        if not masked:
            raise UsageError(
                f"--mask_keys: no global layer after {reference.kind} layer {reference.number} to mask "
                "(choose --mask_layers)"
            )
        for mass in parse_fractions(args.masses, "--masses"):
            label = (
                f"mask keys of {layers_text(masked)} to mass {mass:g} at {reference.kind} {reference.number}"
            )
            items.append(Planned("mask_keys", label, tuple(masked), value=mass))
        settings |= {"reference_layer": layers_text([reference]), "importance": args.importance}
    for spec in args.global_to_frame or ():
        refs = parse_layer_spec(aggregator, spec, "--global_to_frame")
        if any(ref.kind != "global" for ref in refs):
            raise UsageError("--global_to_frame: only global layers can attend within frames")
        items.append(Planned("global_to_frame", f"{layers_text(refs)} attend within frames", tuple(refs),
                             intervention=GlobalToFrame(tuple(refs))))  # fmt: skip
    if args.block_sparse is not None:
        refs = parse_layer_spec(aggregator, args.block_layers, "--block_layers")
        if args.block_size < 1:
            raise UsageError(f"--block_size must be at least 1, got {args.block_size}")
        for threshold in parse_fractions(args.block_sparse, "--block_sparse"):
            label = f"block-sparse {layers_text(refs)}, {args.block_rule} {threshold:g}"
            sparsity = BlockSparsity(tuple(refs), threshold, args.block_rule, args.block_size)
            items.append(Planned("block_sparse", label, tuple(refs), value=threshold, intervention=sparsity))
        settings |= {"block_rule": args.block_rule, "block_size": args.block_size}
    if not items:
        raise UsageError(
            "nothing to run: give --ablate_heads, --mask_keys, --global_to_frame or --block_sparse"
        )
    for item in items:
        if item.intervention is not None:
            try:
                item.intervention.validate(aggregator)
            except InterventionError as err:
                raise UsageError(str(err)) from None
    return SweepPlan(items, reference, settings)


# ---- truth ------------------------------------------------------------------------------------------


def true_geometry(scene: Path, choice: ImageChoice, mode: str, image_size, grid: dict) -> RunGeometry:
    """The truth of the frames, in their pixels: cameras, depth and the query cells' positions."""
    sources = [path.name for path in choice.paths]
    try:
        frames = true_frame_geometry(scene, sources, mode, image_size)
        track, visible = true_correspondences(scene, sources, mode, image_size, grid)
    except SceneError as err:
        raise UsageError(str(err)) from None
    return RunGeometry(
        frames.extrinsic, frames.intrinsic, frames.depth.astype(np.float64), track=track.astype(np.float64),
        valid=np.isfinite(frames.depth), track_visible=visible,
    )  # fmt: skip


# ---- running ----------------------------------------------------------------------------------------


def result_row(
    item: Planned | None, kept: float, run: RunGeometry, reference: RunGeometry, truth
) -> ResultRow:
    numbers = {"value": math.nan if item is None or item.value is None else item.value, "kept_pairs": kept}
    numbers |= compare(run, reference)
    if truth is not None:
        numbers |= {TRUTH_PREFIX + k: v for k, v in compare(run, truth, align=True).items()}
    if item is None:
        return ResultRow("unmodified", "none", "", None, numbers)
    head = None if item.head is None else item.head + 1
    return ResultRow(item.label, item.kind, layers_text(item.layers), head, numbers)


def run_sweep(
    model: VGGT,
    images: torch.Tensor,
    query_points: torch.Tensor,
    plan: SweepPlan,
    args: argparse.Namespace,
    truth: RunGeometry | None,
    autocast_dtype,
    progress: bool,
) -> list[ResultRow]:
    """The unmodified run, then every planned intervention; one row each."""
    runner = InterventionRunner(model, images, query_points, autocast_dtype)
    sessions = []
    if plan.reference_layer is not None:
        sessions.append(KeyImportanceCapture(model, plan.reference_layer, images.shape[0], args.importance))
    resume_at = {item.first_layer for item in plan.items}
    with tqdm(total=len(plan.items) + 1, desc="unmodified run", unit="run", disable=not progress) as bar:
        reference = run_geometry(runner.run_unmodified(resume_at, sessions))  # its tensors are not kept
        bar.update(1)
        rows = [result_row(None, 1.0, reference, reference, truth)]
        if sessions:
            importance = sessions[0].importance
            for item in plan.items:
                if item.kind == "mask_keys":
                    keep = keep_by_mass(importance, item.value, model.aggregator.patch_start_idx)
                    item.intervention = KeyMask(item.layers, keep.to(images.device))
        position = {id(item.intervention): index for index, item in enumerate(plan.items)}
        results: dict[int, ResultRow] = {}
        bar.set_description("interventions")
        for intervention, predictions, kept in runner.sweep(item.intervention for item in plan.items):
            index = position[id(intervention)]
            results[index] = result_row(plan.items[index], kept, run_geometry(predictions), reference, truth)
            bar.update(1)
    # Rows in the order asked for (the runs went in the order the forward pass reaches their layers).
    return rows + [results[index] for index in sorted(results)]


def write_output(out_dir: Path, rows: list[ResultRow], sweep: dict, overwrite: bool, title: str) -> None:
    """Write everything to a hidden folder beside ``out_dir``, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        write_results(staging / RESULTS_NAME, rows)
        (staging / SWEEP_NAME).write_text(json.dumps(sweep, indent=2) + "\n", encoding="utf-8")
        write_figures(rows, staging, title)
        if out_dir.exists() and overwrite:
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run(args: argparse.Namespace) -> Path:
    """Carry out a sweep from parsed arguments; raises :class:`UsageError` for user errors."""
    progress = not args.quiet
    config = model_config(args)
    with torch.device("meta"):
        model = VGGT.from_config(config, heads=True)
    device, autocast_dtype = device_and_dtype(args)
    plan = plan_sweep(args, model)
    if not is_stride(args.stride):
        raise UsageError(f"--stride must be at least 1, got {args.stride}")
    check_weights_flags(args)
    choice = choose_images_from_flags(args)
    out_dir = output_folder(args)
    check_output_free(out_dir, args.overwrite)
    scene = scene_folder(args)
    images = load_and_preprocess_images(choice.paths, mode=args.preprocess)
    height, width = images.shape[-2:]
    patch = config.aggregator.patch_size
    grid = {"H_p": height // patch, "W_p": width // patch, "stride_h": args.stride, "stride_w": args.stride,
            "patch_size": patch}  # fmt: skip
    points = cell_centres(grid["H_p"], grid["W_p"], args.stride, args.stride, patch)
    truth = None if scene is None else true_geometry(scene, choice, args.preprocess, (height, width), grid)
    if progress:
        kinds = [item.kind for item in plan.items]
        counts = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
        print(f"Interventions on '{args.image_set_name}' -> {out_dir}\n"
              f"  frames: {len(choice.paths)}, {args.preprocess} to {width} x {height} px (W x H); "
              f"{len(points)} query cells (stride {args.stride}) for the tracks\n"
              f"  sweep: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + "\n"
              f"  truth: {scene if scene is not None else 'none (no scene folder)'}\n"
              f"  weights: {weights_description(args)}", flush=True)  # fmt: skip

    model_fields = load_weights(args, model, device, progress)
    started = time.perf_counter()
    rows = run_sweep(model, images.to(device), torch.from_numpy(points).to(device), plan, args, truth,
                     autocast_dtype, progress)  # fmt: skip
    sweep = {
        "tool": "intervene_attention.py",
        "version": __version__,
        "image_set_name": args.image_set_name,
        "frame_sources": [path.name for path in choice.paths],
        "first_image_idx": choice.first_image_idx,
        "preprocess_mode": args.preprocess,
        "image_size": [height, width],
        "query_grid": grid,
        "model": model_fields,
        "device": str(device),
        "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
        "scene": None if scene is None else scene.resolve().name,
        "settings": plan.settings,
        "seconds": round(time.perf_counter() - started, 2),
        "columns": dict(COLUMNS),
    }
    weights = "random weights" if args.random_weights else Path(weights_description(args)).name
    title = f"{args.image_set_name}, {plural(len(choice.paths), 'frame')}, {weights}"
    write_output(out_dir, rows, sweep, args.overwrite, title)
    if progress:
        print(f"Wrote {out_dir / RESULTS_NAME} ({len(rows) - 1} interventions) in {sweep['seconds']:.1f} s")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit code."""
    return run_command(build_parser(), run, argv, errors=(InterventionError,))


if __name__ == "__main__":  # python -m vggt.intervene_cli
    raise SystemExit(main())
