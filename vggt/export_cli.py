"""Command line of the exporter (``compute_layerwise_attentions.py``): arguments, image choice, plan.

Every user error (no images, a bad flag value, weights not found, no room on disk, ...) ends the run
with one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vggt import __version__
from vggt.arguments import OneLineParser, UsageError
from vggt.attn_format import layer_name
from vggt.capture import LayerRef, QueryGrid
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
    shell_command,
    weights_description,
)
from vggt.export import (
    ExportError,
    ExportOptions,
    estimate_export_bytes,
    export_attention,
    layer_depths,
    parse_layers,
)
from vggt.export_geometry import GEOMETRY_TIME_SHARE, geometry_bytes, head_outputs_bytes, truth_arrays
from vggt.geometry.correspondence import SceneError
from vggt.models.config import VGGTConfig
from vggt.models.vggt import VGGT
from vggt.preprocess import load_and_preprocess_images
from vggt.rollout import DEFAULT_DISCARD_RATIO, rollout_bytes
from vggt.wording import plural

DEFAULT_PREFIX = "attn_first2all_"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        description="Export VGGT's attention from the query frame's patches to every frame, from one forward "
        "pass: every global layer by default; frame and DINOv2 layers (--blocks) and the attention rollout "
        "(--rollout) on request. Open the result with the viewer (vggt-attn-view).",
    )

    add = flag_adder(parser)
    add_image_flags(add)

    add("save_per_head", action="store_true", help="keep every head instead of their mean")
    add("stride", type=int, help="query stride and pooling block in patches, both directions")
    add("stride_h", type=int, help="query stride along rows (default 1, or --stride)")
    add("stride_w", type=int, help="query stride along columns (default 1, or --stride)")
    add("layers", help="layers to export within each kind of --blocks, 1-based, e.g. 1-4,12 (default: all)")
    add(
        "blocks",
        default="global",
        help="layer kinds to export, comma-separated: global (the aggregator's global attention), frame "
        "(its frame attention) and dino (the DINOv2 patch embedding) (default %(default)s)",
    )
    add("rollout", action="store_true", help="also export the attention rollout through all 48 layers")
    add(
        "rollout_discard",
        type=float,
        default=DEFAULT_DISCARD_RATIO,
        help="share of each row's smallest entries zeroed per layer in the rollout; 0 disables "
        "(default %(default)s)",
    )
    add(
        "geometry",
        action="store_true",
        help="also run VGGT's camera, depth, point and track heads on the same pass and store their "
        "predictions and where each query point lies in every frame (true positions too, when the images "
        "belong to a scene)",
    )
    add(
        "scene",
        help="with --geometry: a scene folder (cameras.json and depth/) whose views the images are, for true "
        "correspondences (default: the image folder's parent, when it is one)",
    )
    add(
        "precision",
        choices=("uint8", "float16"),
        default="uint8",
        help="uint8 codes or raw float16 (default %(default)s)",
    )
    add("compress", action="store_true", help="deflate NPZ files (smaller to share, not memory-mappable)")

    add_output_flags(add, DEFAULT_PREFIX)

    add_weights_flags(add)
    add("quiet", action="store_true", help="no plan printout and no progress bars")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now (Linux ``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class Plan:
    """What an export will do, worked out before the weights are loaded."""

    choice: ImageChoice
    images: torch.Tensor
    grid: QueryGrid
    options: ExportOptions
    layers: list[LayerRef]
    out_dir: Path
    disk_bytes: int
    rollout_bytes: int
    weights_bytes: int
    scene: Path | None = None
    geometry_bytes: int = 0
    head_outputs_bytes: int = 0

    def describe(self, args: argparse.Namespace, config: VGGTConfig) -> str:
        grid, options = self.grid, self.options
        lines = [f"Export of '{args.image_set_name}' -> {self.out_dir}"]
        lines.append(
            f"  frames: {len(self.choice.paths)} of {plural(self.choice.folder_size, 'image')}, "
            f"{args.preprocess} to "
            f"{self.images.shape[-1]} x {self.images.shape[-2]} px (W x H; frame 0 is the query frame)"
        )
        for index, path in enumerate(self.choice.paths):
            lines.append(f"    frame {index:2d}: {path.name}")
        lines.append(
            f"  grid: {grid.grid_w} x {grid.grid_h} patches, stride {grid.stride_w} x {grid.stride_h} -> "
            f"{grid.W_ds} x {grid.H_ds} cells (W x H), {grid.num_queries} queries"
        )
        names = [layer_name(ref.kind, ref.number, options.blocks) for ref in self.layers]
        shown = f"{names[0]} .. {names[-1]}" if len(names) > 3 else ", ".join(names)
        num_heads = config.aggregator.num_heads
        heads = f"{num_heads} heads each" if options.per_head else f"mean of {num_heads} heads"
        lines.append(f"  layers: {len(names)} ({shown}), {heads}, {options.precision}")
        if options.rollout:
            lines.append(
                f"  rollout: {2 * config.aggregator.depth} frame and global layers, "
                f"discard ratio {options.rollout_discard}, "
                f"extra memory {_format_bytes(self.rollout_bytes)}"
            )
        if options.geometry:
            truth = f"true positions from scene {self.scene}" if self.scene else "no scene: no true positions"
            lines.append(
                f"  geometry: camera, depth, point and track heads on this pass, {grid.num_queries} query "
                f"points tracked; {truth}"
            )
            size, kept = _format_bytes(self.geometry_bytes), _format_bytes(self.head_outputs_bytes)
            lines.append(
                f"    about +{GEOMETRY_TIME_SHARE:.0%} of the forward's time, {size} on disk, {kept} of "
                "aggregator outputs kept for the heads"
            )
        lines.append(f"  weights: {weights_description(args)}")
        lines.append(
            f"  estimated size on disk: {_format_bytes(self.disk_bytes)}"
            + (" before compression" if options.compress else "")
        )
        return "\n".join(lines)


def make_plan(args: argparse.Namespace, model: VGGT, device: torch.device) -> Plan:
    """Check every argument, choose and load the images, and work out sizes; raises :class:`UsageError`."""
    config = model.config
    aggregator = model.aggregator
    stride_h = args.stride_h if args.stride_h is not None else (args.stride if args.stride is not None else 1)
    stride_w = args.stride_w if args.stride_w is not None else (args.stride if args.stride is not None else 1)
    options = ExportOptions(
        args.save_per_head, stride_h, stride_w, None, args.precision, args.compress,
        blocks=args.blocks, rollout=args.rollout, rollout_discard=args.rollout_discard,
        geometry=args.geometry,
    )  # fmt: skip
    depths = layer_depths(aggregator)
    numbers = parse_layers(args.layers, max(depths[kind] for kind in options.blocks))
    options = dataclasses.replace(options, layers=numbers)
    layers = options.validate(depths)

    out_dir = output_folder(args)
    check_weights_flags(args)  # a missing local checkpoint is named before the plan
    # The inputs are checked before the output, so that a mistyped folder is named as such.
    choice = choose_images_from_flags(args)
    if args.scene is not None and not args.geometry:
        raise UsageError("--scene gives true geometry: use it with --geometry")
    scene = scene_folder(args) if args.geometry else None
    check_output_free(out_dir, args.overwrite)
    images = load_and_preprocess_images(choice.paths, mode=args.preprocess)
    grid = QueryGrid(images.shape[-2] // config.patch_size, images.shape[-1] // config.patch_size,
                     stride_h, stride_w)  # fmt: skip
    num_frames = len(choice.paths)
    image_size = tuple(images.shape[-2:])
    disk = estimate_export_bytes(aggregator, num_frames, image_size, grid, layers, options)
    extra = rollout_bytes(aggregator, grid, num_frames) if options.rollout else 0
    # Weights held in host memory: float32 on the CPU; on a GPU they live in its own memory.
    weights = 4 * sum(p.numel() for p in model.parameters()) if device.type == "cpu" else 0
    geometry = outputs = 0
    if options.geometry:
        if scene is not None:  # the scene is checked against the frames now, before the weights load
            try:
                truth_arrays(scene, [p.name for p in choice.paths], args.preprocess, image_size, grid,
                             config.patch_size)  # fmt: skip
            except SceneError as err:
                raise UsageError(str(err)) from None
        geometry = geometry_bytes(num_frames, image_size, grid.num_queries, scene is not None)
        outputs = head_outputs_bytes(model, num_frames, image_size)
    return Plan(choice, images, grid, options, layers, out_dir, disk + geometry, extra, weights, scene,
                geometry, outputs)  # fmt: skip


def run(args: argparse.Namespace) -> Path:
    """Carry out an export from parsed arguments; raises :class:`UsageError` for user errors."""
    progress = not args.quiet
    config = model_config(args)
    with torch.device("meta"):
        # Attention needs the aggregator alone; --geometry the heads too.
        model = VGGT.from_config(config, heads=args.geometry)
    device, autocast_dtype = device_and_dtype(args)
    plan = make_plan(args, model, device)
    if progress:
        print(plan.describe(args, config), flush=True)
    out_dir = plan.out_dir
    free = shutil.disk_usage(_existing_parent(out_dir.parent)).free
    if plan.disk_bytes > free:
        raise UsageError(
            f"not enough disk space for the export: about {_format_bytes(plan.disk_bytes)} needed, "
            f"{_format_bytes(free)} free at {_existing_parent(out_dir.parent)}"
        )
    available = available_memory_bytes()
    if plan.rollout_bytes and available is not None and plan.rollout_bytes + plan.weights_bytes > available:
        raise UsageError(
            f"not enough memory for --rollout: it holds about {_format_bytes(plan.rollout_bytes)} of "
            f"transition matrices besides {_format_bytes(plan.weights_bytes)} of weights, and "
            f"{_format_bytes(available)} is available; use fewer frames or a larger --stride, "
            "or drop --rollout"
        )
    choice, images = plan.choice, plan.images

    model_fields = load_weights(args, model, device, progress)
    manifest = {
        "image_set_name": args.image_set_name,
        "model": model_fields,
        "preprocess_mode": args.preprocess,
        "first_image_idx": choice.first_image_idx,
    }
    started = time.perf_counter()
    export_attention(
        model,
        images,
        out_dir,
        sources=[p.name for p in choice.paths],
        options=plan.options,
        manifest=manifest,
        overwrite=args.overwrite,
        autocast_dtype=autocast_dtype,
        progress=progress,
        scene=plan.scene,
    )
    if progress:
        print(f"Wrote {out_dir} in {time.perf_counter() - started:.1f} s. View it with:\n"
              f"  {shell_command('view', '--attn_dir', str(out_dir))}")  # fmt: skip
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit code."""
    return run_command(
        build_parser(), run, argv, errors=(ExportError,), renamed_flags={"per_head": "save_per_head"}
    )


if __name__ == "__main__":  # python -m vggt.export_cli
    raise SystemExit(main())
