"""Export the attention of the query frame's patches from ONE forward pass of the aggregator.

The Python API behind ``compute_layerwise_attentions.py``::

    from vggt.export import ExportOptions, export_attention

    export_attention(model, images, "attn_first2all_kitchen", sources=names,
                     options=ExportOptions(per_head=True, stride_h=2, stride_w=2))

Each chosen layer (global by default; frame and DINOv2 layers on request) is captured at its hook
point while the forward pass runs, then encoded (uint8 or float16): with numpy in a thread of its own
while the pass goes on, where the maps are in host memory (:mod:`vggt.quantize`); on the GPU, at once,
where they are on one (:mod:`vggt.device_quantize`, the same bytes). Another background thread writes
it (:mod:`vggt.layer_queue`). So one layer's float maps and at most two layers' codes are in memory at
a time. The attention rollout, when asked for,
is formed during the same pass and written after it. The export is written to a hidden temporary folder
beside the target and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vggt.attn_format import ExportWriter
from vggt.attn_format import layer_name as format_layer_name
from vggt.capture import (
    KINDS,
    AttentionCapture,
    CapturedLayer,
    LayerRef,
    QueryGrid,
    attention_blocks,
    qk_hook_point,
    sequence_layout,
)
from vggt.device import autocast_context
from vggt.device_quantize import DeviceEncodedMaps, encode_layer_on_device
from vggt.layer_queue import LayerWriteQueue
from vggt.models.hooks import StopAfter
from vggt.preprocess import to_uint8_frames
from vggt.quantize import EncodedMaps, encode_layer
from vggt.rollout import DEFAULT_DISCARD_RATIO, RolloutCapture

PRECISIONS = ("uint8", "float16")
ROLLOUT_NAME = "rollout"


class ExportError(ValueError):
    """An export that cannot be made as asked (one-line message for the user)."""


@dataclass(frozen=True)
class ExportOptions:
    """What to capture and how to store it.

    Attributes
    ----------
    per_head : bool
        Keep every head (``[Q, heads, K, H_ds, W_ds]``) or their mean (``[Q, K, H_ds, W_ds]``).
    stride_h, stride_w : int
        Query stride, which is also the key pooling block, in patches.
    layers : tuple of int, optional
        1-based layer numbers to export within each kind of ``blocks``; all of them when ``None``.
    precision : str
        ``"uint8"`` (quantized by vmax99) or ``"float16"`` (raw probabilities).
    compress : bool
        Deflate the NPZ files (smaller to share; readers can then not memory-map them).
    blocks : tuple of str
        Layer kinds to export, from ``"global"``, ``"frame"`` and ``"dino"``.
    rollout : bool
        Also export the attention rollout through all frame and global layers (kind ``rollout``).
    rollout_discard : float
        Share of each transition-matrix row's smallest entries zeroed in the rollout, in ``[0, 1)``.
    """

    per_head: bool = False
    stride_h: int = 1
    stride_w: int = 1
    layers: tuple[int, ...] | None = None
    precision: str = "uint8"
    compress: bool = False
    blocks: tuple[str, ...] = ("global",)
    rollout: bool = False
    rollout_discard: float = DEFAULT_DISCARD_RATIO

    def validate(self, depths: dict[str, int]) -> list[LayerRef]:
        """Check the options against a model with ``depths[kind]`` layers of each kind.

        Returns
        -------
        list of LayerRef
            The layers to export, kind by kind in the order exports list them (global, frame, dino).
        """
        if self.stride_h < 1 or self.stride_w < 1:
            raise ExportError(
                f"strides must be at least 1, got stride_h={self.stride_h}, stride_w={self.stride_w}"
            )
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.rollout_discard < 1.0:
            raise ExportError(f"the rollout discard ratio must be in [0, 1), got {self.rollout_discard}")
        kinds = parse_blocks(",".join(self.blocks))
        refs: list[LayerRef] = []
        for kind in sorted(kinds, key=KINDS.index):
            depth = depths[kind]
            numbers = tuple(range(1, depth + 1)) if self.layers is None else tuple(sorted(set(self.layers)))
            if not numbers:
                raise ExportError("no layers to export")
            outside = [n for n in numbers if not 1 <= n <= depth]
            if outside:
                raise ExportError(f"layer {outside[0]} does not exist: the model has {kind} layers 1-{depth}")
            refs.extend(LayerRef(kind, n - 1) for n in numbers)
        return refs


def parse_blocks(spec: str) -> tuple[str, ...]:
    """Parse ``--blocks`` such as ``"global,frame,dino"`` into kinds, in the order given."""
    kinds = tuple(dict.fromkeys(part.strip().lower() for part in spec.split(",") if part.strip()))
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ExportError(f"bad --blocks {spec!r}: use a comma-separated list of {', '.join(KINDS)}")
    return kinds


def parse_layers(spec: str | None, depth: int) -> tuple[int, ...] | None:
    """Parse a layer list such as ``"1-4,12"`` (1-based, inclusive ranges); ``None``/``"all"`` is all.

    Raises
    ------
    ExportError
        For anything that is not comma-separated numbers and ranges within ``1..depth``.
    """
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    layers: list[int] = []
    for part in spec.split(","):
        text = part.strip()
        first, sep, last = text.partition("-")
        if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
            raise ExportError(f"bad --layers {spec!r}: use numbers and ranges such as 1-4,12")
        start, stop = int(first), int(last) if sep else int(first)
        if start > stop:
            raise ExportError(f"bad --layers {spec!r}: range {text} runs backwards")
        for number in (start, stop):
            if not 1 <= number <= depth:
                raise ExportError(f"bad --layers {spec!r}: layer {number} is not in 1-{depth}")
        layers.extend(range(start, stop + 1))
    return tuple(sorted(set(layers)))


def layer_name(ref: LayerRef, blocks: Sequence[str]) -> str:
    """Name of a layer in an export of the kinds ``blocks`` (see :func:`vggt.attn_format.layer_name`)."""
    return format_layer_name(ref.kind, ref.number, blocks)


def layer_depths(aggregator: nn.Module) -> dict[str, int]:
    """Number of layers of each kind: ``{"global": 24, "frame": 24, "dino": 24}`` for VGGT-1B."""
    return {kind: len(attention_blocks(aggregator, kind)) for kind in KINDS}


def estimate_export_bytes(
    aggregator: nn.Module,
    num_frames: int,
    image_size: tuple[int, int],
    grid: QueryGrid,
    layers: Sequence[LayerRef],
    options: ExportOptions,
) -> int:
    """Bytes an export will take on disk (uncompressed NPZ; PNG frames counted as raw RGB)."""
    value_bytes = 1 if options.precision == "uint8" else 2

    def layer_bytes(kind: str, heads: int) -> int:
        layout = sequence_layout(aggregator, "global" if kind == ROLLOUT_NAME else kind, num_frames)
        rows = grid.num_queries + len(layout.special_queries)
        per_key_frame = grid.num_queries * value_bytes + layout.patch_start * 2
        return rows * heads * layout.key_frames * per_key_frame + 4096

    total = sum(
        layer_bytes(
            ref.kind, attention_blocks(aggregator, ref.kind)[0].attn.num_heads if options.per_head else 1
        )
        for ref in layers
    )
    if options.rollout:
        total += layer_bytes(ROLLOUT_NAME, 1)
    frames = num_frames * image_size[0] * image_size[1] * 3
    return total + frames + 65536


def export_attention(
    model: nn.Module,
    images: Tensor,
    out_dir: str | os.PathLike[str],
    *,
    sources: Sequence[str] | None = None,
    options: ExportOptions | None = None,
    manifest: dict | None = None,
    overwrite: bool = False,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Run the aggregator once over ``images`` and write the attention export to ``out_dir``.

    Parameters
    ----------
    model : nn.Module
        A :class:`vggt.models.vggt.VGGT` (or anything with ``.aggregator``); left in eval mode.
    images : Tensor
        ``[S, 3, H, W]`` in [0, 1], model order: frame 0 is the query frame. Moved to the model's device.
    out_dir : path
        The export folder to create.
    sources : sequence of str, optional
        Original file name of each frame (default ``frame_00``, ...), recorded in the metadata.
    options : ExportOptions, optional
    manifest : dict, optional
        Export-wide manifest fields: ``image_set_name``, ``model`` (id, revision, checkpoint_file,
        checkpoint_sha256, random_weights, random_seed; by default ``model.weights_source``, which
        :func:`vggt.weights.load_model` sets), ``preprocess_mode``, ``first_image_idx``. Missing ones
        are filled with neutral values.
    overwrite : bool
        Replace an existing ``out_dir`` (only once the new export is complete).
    autocast_dtype : torch.dtype, optional
        Run the forward pass under autocast to this dtype (bf16/fp16 on CUDA). Attention
        probabilities are always computed in float32 from the hooked queries and keys.
    progress : bool
        Show tqdm bars.

    Returns
    -------
    Path
        ``out_dir``.
    """
    options = options or ExportOptions()
    aggregator = model.aggregator
    layers = options.validate(layer_depths(aggregator))
    out_dir = Path(out_dir)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ExportError(f"images must be [S, 3, H, W], got {list(images.shape)}")
    num_frames, _, height, width = images.shape
    patch_size = aggregator.patch_size
    if height % patch_size or width % patch_size:
        raise ExportError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    sources = [f"frame_{i:02d}" for i in range(num_frames)] if sources is None else list(sources)
    if len(sources) != num_frames:
        raise ExportError(f"{num_frames} frames but {len(sources)} source names")
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists (use --overwrite to replace it)")

    grid = QueryGrid(height // patch_size, width // patch_size, options.stride_h, options.stride_w)
    blocks = parse_blocks(",".join(options.blocks))
    # Heads of each kind; the rollout averages the heads of the aggregator's layers.
    heads = {kind: attention_blocks(aggregator, kind)[0].attn.num_heads for kind in KINDS}
    heads[ROLLOUT_NAME] = heads["global"]
    base_meta = {
        "H_p": grid.grid_h,
        "W_p": grid.grid_w,
        "stride_h": grid.stride_h,
        "stride_w": grid.stride_w,
        "patch_size": patch_size,
        "image_size": [height, width],
        "query_frame": 0,
        "query_source": Path(sources[0]).name,
    }
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = ExportWriter(staging, compress=options.compress)
        writer.write_frames(to_uint8_frames(images), sources)
        total = len(layers) + int(options.rollout)
        bar = tqdm(total=total, desc="writing layers", unit="layer", disable=not progress)
        with (
            bar,
            LayerWriteQueue(writer.write_layer, on_written=lambda: bar.update(1)) as queue,
            ThreadPoolExecutor(1, thread_name_prefix="layer-encoder") as encoder,
        ):

            def write(captured: CapturedLayer, extra: dict | None = None) -> None:
                name = layer_name(captured.ref, blocks)
                meta = base_meta | {"num_heads": heads[captured.ref.kind]} | (extra or {})
                _queue_layer(queue, name, captured, meta, options.precision)

            def on_layer(captured: CapturedLayer) -> Future | None:
                # Host-memory maps are encoded beside the forward pass: the percentile and encoding
                # passes are bound by memory bandwidth here, the forward by arithmetic, so they share
                # the cores well. The capture waits for the encoder before it reuses the maps.
                if captured.maps.device.type == "cpu":
                    return encoder.submit(write, captured)
                write(captured)
                return None

            rollout = _forward_with_capture(
                model, images, grid, layers, options, on_layer, autocast_dtype, progress
            )
            if rollout is not None:
                rollout_meta = {
                    "rollout_discard_ratio": options.rollout_discard,
                    "rollout_layers": rollout.num_layers,
                }
                write(rollout.result(), rollout_meta)
            queue.finish()
        weights_source = getattr(model, "weights_source", None)
        writer.write_manifest(_manifest_fields(manifest, out_dir, options, blocks, weights_source))
        _move_into_place(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _queue_layer(
    queue: LayerWriteQueue, name: str, captured: CapturedLayer, meta: dict, precision: str
) -> None:
    """Encode a captured layer (patch queries and token queries) and queue it for writing.

    Everything queued is a copy: the captured arrays are reused for the next layer."""
    ref, layout = captured.ref, captured.layout
    heatmaps, fields = _encode(captured.maps, precision, captured.head_mean)
    token_heatmaps, token_fields = _encode(captured.token_maps, precision)
    is_rollout = ref.kind == ROLLOUT_NAME
    token_name = layout.special_tokens[0]
    meta = (
        meta
        | fields
        | {
            "layer_kind": ref.kind,
            "layer_index": None if is_rollout else ref.number,
            "block_index": None if is_rollout else ref.block_index,
            "key_frames": list(range(layout.key_frames)),
            "special_tokens": list(layout.special_tokens),
            "token_queries": [{"token": token_name, "frame": frame} for frame in layout.special_queries],
            "token_vmax99": token_fields["layer_vmax99"],
            "token_per_head_vmax99": token_fields["per_head_vmax99"],
        }
    )
    queue.submit(
        name,
        heatmaps.encode_into(queue.buffer(heatmaps.shape, heatmaps.dtype)),
        _float16(captured.special_mass),
        meta,
        token_heatmaps=np.asarray(token_heatmaps),
        token_special_mass=_float16(captured.token_special_mass),
    )


def _encode(
    maps: Tensor, precision: str, head_mean: Tensor | None = None
) -> tuple[EncodedMaps | DeviceEncodedMaps, dict]:
    """Scales and codes of captured maps: with numpy on the CPU, where the maps are on a GPU."""
    if maps.device.type != "cpu":
        return encode_layer_on_device(maps, precision, head_mean)
    return encode_layer(maps.numpy(), precision, None if head_mean is None else head_mean.numpy())


def _float16(tensor: Tensor) -> np.ndarray:
    return tensor.cpu().numpy().astype(np.float16, order="C")


def _forward_with_capture(
    model: nn.Module,
    images: Tensor,
    grid: QueryGrid,
    layers: list[LayerRef],
    options: ExportOptions,
    on_layer: Callable[[CapturedLayer], Future | None],
    autocast_dtype: torch.dtype | None,
    progress: bool,
) -> RolloutCapture | None:
    aggregator = model.aggregator
    device = next(aggregator.parameters()).device
    num_frames = images.shape[0]
    model.eval()
    blocks = aggregator.global_blocks
    # Nothing after the last captured layer's attention probabilities is needed: the pass stops there.
    last = _last_layer(layers, options.rollout, len(blocks))
    rollout = None
    with ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(total=_global_blocks_reached(last), desc="forward pass", unit="block", disable=not progress)
        )

        def tick(*_) -> None:  # a forward hook must return None, or it replaces the block's output
            bar.update(1)

        for block in blocks:
            stack.callback(block.register_forward_hook(tick).remove)
        stack.enter_context(
            AttentionCapture(
                aggregator,
                grid,
                layers,
                num_frames,
                options.per_head,
                on_layer,
            )
        )
        if options.rollout:
            rollout = stack.enter_context(
                RolloutCapture(aggregator, grid, num_frames, options.rollout_discard)
            )
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast_context(device, autocast_dtype))
        # Entered last: its hook runs after the captures' hooks on the same hook point.
        with StopAfter(qk_hook_point(aggregator, last)):
            aggregator(images.to(device)[None], keep_outputs=False)
        bar.update(bar.total - bar.n)  # the block the pass stopped in
    return rollout


def _last_layer(layers: Sequence[LayerRef], rollout: bool, depth: int) -> LayerRef:
    """The captured layer the forward pass reaches last (the rollout needs every global layer)."""
    if rollout:
        return LayerRef("global", depth - 1)
    return max(layers, key=lambda ref: ref.forward_position)


def _global_blocks_reached(last: LayerRef) -> int:
    """Global blocks that a forward pass ending at ``last`` enters, the one it ends in included."""
    if last.kind == "dino":
        return 0
    return last.block_index + (1 if last.kind == "global" else 0)


def _manifest_fields(
    manifest: dict | None,
    out_dir: Path,
    options: ExportOptions,
    blocks: tuple[str, ...],
    weights_source: dict | None,
) -> dict:
    fields = dict(manifest or {})
    fields.setdefault("image_set_name", out_dir.name)
    model_fields = {
        "id": None,
        "revision": None,
        "checkpoint_file": None,
        "checkpoint_sha256": None,
        "random_weights": False,
        "random_seed": None,
    }
    fields["model"] = model_fields | dict(fields.get("model") or weights_source or {})
    fields.setdefault("preprocess_mode", None)
    fields.setdefault("first_image_idx", 0)
    fields["precision"] = options.precision
    fields["compressed"] = options.compress
    fields["blocks"] = list(blocks)
    fields["rollout"] = {"discard_ratio": options.rollout_discard} if options.rollout else None
    return fields


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists (use --overwrite to replace it)")
    # Swap: the old export is set aside first so that a failure never leaves neither in place.
    retired = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, retired)
    os.replace(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)
