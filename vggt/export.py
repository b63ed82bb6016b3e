"""Export the attention of the query frame's patches from ONE forward pass of the aggregator.

The Python API behind ``compute_layerwise_attentions.py``::

    from vggt.export import ExportOptions, export_attention

    export_attention(model, images, "attn_first2all_kitchen", sources=names,
                     options=ExportOptions(per_head=True, stride_h=2, stride_w=2))

Each chosen layer (global by default; frame and DINOv2 layers on request) is captured at its hook
point while the forward pass runs and encoded there (uint8 or float16): with numpy where the maps are
in host memory (:mod:`vggt.attn_format.quantization`), with torch on the GPU where they are on one
(:mod:`vggt.device_quantize`, the same bytes). A background thread writes it (:mod:`vggt.layer_queue`)
while the pass goes on. So one layer's float maps and at most two layers' codes are in memory at a
time. The attention rollout, when asked for, is formed during the same pass and written after it. The
export is written to a hidden temporary folder beside the target and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vggt.arguments import SpelledError, argument
from vggt.attn_format import ExportWriter
from vggt.attn_format.quantization import PRECISIONS, EncodedMaps, encode_layer
from vggt.attn_format.schema import BLOCK_KINDS, ROLLOUT_KIND, is_discard_ratio, is_stride, layer_name
from vggt.attn_format.writer import layer_fields
from vggt.capture import (
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
from vggt.export_geometry import check_heads, predict_geometry, query_points_of, truth_arrays
from vggt.geometry.correspondence import SceneError, geometry_meta
from vggt.layer_queue import LayerWriteQueue
from vggt.models.hooks import StopAfter
from vggt.preprocess import to_uint8_frames
from vggt.rollout import DEFAULT_DISCARD_RATIO, RolloutCapture


class ExportError(SpelledError, ValueError):
    """An export that cannot be made as asked (one-line message for the user, naming arguments as the
    caller spells them: see :mod:`vggt.arguments`)."""


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
        Layer kinds to export, from ``"global"``, ``"frame"`` and ``"dino"`` (or one comma-separated
        string); kept in that order.
    rollout : bool
        Also export the attention rollout through all frame and global layers (kind ``rollout``).
    rollout_discard : float
        Share of each transition-matrix row's smallest entries zeroed in the rollout, in ``[0, 1)``.
    geometry : bool
        Also run VGGT's camera, depth, point and track heads on the pass's tokens and store what they
        predict, and the true correspondences where a scene is given (``geometry/``,
        :mod:`vggt.export_geometry`). The pass then runs the whole aggregator.
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
    geometry: bool = False

    def __post_init__(self) -> None:
        """Every option is checked here, where options are made; ``blocks`` is put in export order."""
        if not (is_stride(self.stride_h) and is_stride(self.stride_w)):
            raise ExportError(
                f"strides must be whole numbers of at least 1, got {argument('stride_h', self.stride_h)}, "
                f"{argument('stride_w', self.stride_w)}"
            )
        if self.precision not in PRECISIONS:
            raise ExportError(
                f"{argument('precision')} must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if not is_discard_ratio(self.rollout_discard):
            discard = argument("rollout_discard", self.rollout_discard)
            raise ExportError(f"the rollout discard ratio must be in [0, 1), got {discard}")
        given = parse_blocks(self.blocks) if isinstance(self.blocks, str) else tuple(self.blocks)
        kinds = tuple(dict.fromkeys(str(kind).strip().lower() for kind in given))
        if not kinds or any(kind not in BLOCK_KINDS for kind in kinds):
            raise ExportError(
                f"bad {argument('blocks', repr(self.blocks))}: use one or more of {', '.join(BLOCK_KINDS)}"
            )
        object.__setattr__(self, "blocks", tuple(kind for kind in BLOCK_KINDS if kind in kinds))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))

    def validate(self, depths: dict[str, int]) -> list[LayerRef]:
        """The layers to export from a model with ``depths[kind]`` layers of each kind.

        Returns
        -------
        list of LayerRef
            Kind by kind in the order exports list them (global, frame, dino).
        """
        refs: list[LayerRef] = []
        for kind in self.blocks:
            depth = depths[kind]
            numbers = tuple(range(1, depth + 1)) if self.layers is None else self.layers
            if not numbers:
                raise ExportError(f"no layers to export: {argument('layers')} is empty")
            outside = [n for n in numbers if not 1 <= n <= depth]
            if outside:
                raise ExportError(
                    f"layer {outside[0]} does not exist: the model has {kind} layers 1-{depth} "
                    f"({argument('layers')})"
                )
            refs.extend(LayerRef(kind, n - 1) for n in numbers)
        return refs


def parse_blocks(spec: str) -> tuple[str, ...]:
    """Split ``"global,frame,dino"`` into kinds; :class:`ExportOptions` checks them."""
    return tuple(part.strip().lower() for part in spec.split(",") if part.strip())


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
        bad = f"bad {argument('layers', repr(spec))}"
        if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
            raise ExportError(f"{bad}: use numbers and ranges such as 1-4,12")
        start, stop = int(first), int(last) if sep else int(first)
        if start > stop:
            raise ExportError(f"{bad}: range {text} runs backwards")
        for number in (start, stop):
            if not 1 <= number <= depth:
                raise ExportError(f"{bad}: layer {number} is not in 1-{depth}")
        layers.extend(range(start, stop + 1))
    return tuple(sorted(set(layers)))


def layer_depths(aggregator: nn.Module) -> dict[str, int]:
    """Number of layers of each kind: ``{"global": 24, "frame": 24, "dino": 24}`` for VGGT-1B."""
    return {kind: len(attention_blocks(aggregator, kind)) for kind in BLOCK_KINDS}


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
        layout = sequence_layout(aggregator, "global" if kind == ROLLOUT_KIND else kind, num_frames)
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
        total += layer_bytes(ROLLOUT_KIND, 1)
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
    scene: str | os.PathLike[str] | None = None,
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
    scene : path, optional
        With ``options.geometry``: the scene folder the frames come from (``cameras.json``, ``depth/``),
        matched through ``sources``; the export then also holds the true correspondences. Needs
        ``manifest["preprocess_mode"]``.

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
    if options.geometry:
        try:
            check_heads(model)
        except ValueError as err:
            raise ExportError(str(err)) from None
    elif scene is not None:
        raise ExportError("a scene is used only with geometry (ExportOptions(geometry=True))")

    grid = QueryGrid(height // patch_size, width // patch_size, options.stride_h, options.stride_w)
    truth = None
    if scene is not None:  # before the pass: a scene that does not fit fails at once
        mode = (manifest or {}).get("preprocess_mode")
        if mode is None:
            raise ExportError("true geometry needs the preprocessing mode (manifest preprocess_mode)")
        try:
            truth = truth_arrays(scene, sources, mode, (height, width), grid, patch_size)
        except SceneError as err:
            raise ExportError(str(err)) from None
    # Heads of each kind; the rollout averages the heads of the aggregator's layers.
    heads = {kind: attention_blocks(aggregator, kind)[0].attn.num_heads for kind in BLOCK_KINDS}
    heads[ROLLOUT_KIND] = heads["global"]
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
        with bar, LayerWriteQueue(writer.write_layer, on_written=lambda: bar.update(1)) as queue:

            def write(captured: CapturedLayer, extra: dict | None = None) -> None:
                name = layer_name(captured.ref.kind, captured.ref.number, options.blocks)
                meta = base_meta | {"num_heads": heads[captured.ref.kind]} | (extra or {})
                _queue_layer(queue, name, captured, meta, options.precision)

            rollout, head_inputs = _forward_with_capture(
                model, images, grid, layers, options, write, autocast_dtype, progress
            )
            geometry = None
            if head_inputs is not None:
                # The heads run while the layers are written.
                with tqdm(total=1, desc="geometry heads", unit="pass", disable=not progress) as heads_bar:
                    geometry = predict_geometry(
                        model, *head_inputs, query_points_of(grid, patch_size), autocast_dtype
                    )
                    heads_bar.update(1)
                del head_inputs
                geometry |= truth or {}
            if rollout is not None:
                rollout_meta = {
                    "rollout_discard_ratio": options.rollout_discard,
                    "rollout_layers": rollout.num_layers,
                }
                write(rollout.result(), rollout_meta)
            queue.finish()
        if geometry is not None:
            writer.write_geometry(geometry, geometry_meta(scene))
        fields = {"image_set_name": out_dir.name, "model": getattr(model, "weights_source", None)}
        writer.write_manifest(fields | dict(manifest or {}))
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
    meta = meta | layer_fields(
        ref.kind, ref.number, layout.key_frames, layout.special_tokens, layout.special_queries,
        fields, token_fields,
    )  # fmt: skip
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
    on_layer: Callable[[CapturedLayer], None],
    autocast_dtype: torch.dtype | None,
    progress: bool,
) -> tuple[RolloutCapture | None, tuple[list[Tensor | None], int, Tensor] | None]:
    """The export's one forward pass: the rollout (when asked for) and, with geometry, what the heads
    need (the kept aggregator outputs, ``patch_start_idx`` and the batched images)."""
    aggregator = model.aggregator
    device = next(aggregator.parameters()).device
    num_frames = images.shape[0]
    model.eval()
    blocks = aggregator.global_blocks
    # Nothing after the last captured layer's attention probabilities is needed: the pass stops there.
    last = _last_layer(layers, options.rollout or options.geometry, len(blocks))
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
        batch = images.to(device)[None]
        if options.geometry:  # the whole pass, keeping the outputs the heads read
            tokens, patch_start_idx = aggregator(batch, keep_outputs=model.head_layers())
            return rollout, (tokens, patch_start_idx, batch)
        # Entered last: its hook runs after the captures' hooks on the same hook point.
        with StopAfter(qk_hook_point(aggregator, last)):
            aggregator(batch, keep_outputs=False)
        bar.update(bar.total - bar.n)  # the block the pass stopped in
    return rollout, None


def _last_layer(layers: Sequence[LayerRef], whole_pass: bool, depth: int) -> LayerRef:
    """The captured layer the forward pass reaches last (the rollout and the heads need every global
    layer)."""
    if whole_pass:
        return LayerRef("global", depth - 1)
    return max(layers, key=lambda ref: ref.forward_position)


def _global_blocks_reached(last: LayerRef) -> int:
    """Global blocks that a forward pass ending at ``last`` enters, the one it ends in included."""
    if last.kind == "dino":
        return 0
    return last.block_index + (1 if last.kind == "global" else 0)


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
