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
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
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
from vggt.device import autocast_context, select_device_and_dtype
from vggt.device_quantize import DeviceEncodedMaps, encode_layer_on_device
from vggt.export_geometry import (
    GEOMETRY_TIME_SHARE,
    check_heads,
    predict_geometry,
    query_points_of,
    truth_arrays,
)
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


@dataclass(frozen=True)
class CapturePlan:
    """One capture's inputs, checked: the layers to capture, the query grid and the frames' names.

    Made by :func:`plan_capture`; shared by :func:`export_attention` and
    :func:`vggt.captured.capture_attention`, so that both capture and describe layers alike.
    """

    options: ExportOptions
    layers: list[LayerRef]
    grid: QueryGrid
    sources: list[str]
    image_size: tuple[int, int]
    patch_size: int
    heads: dict[str, int]  # heads of each layer kind (the rollout averages the global layers' heads)
    truth: dict[str, np.ndarray] | None  # true correspondences, where a scene was given

    def layer_name(self, ref: LayerRef) -> str:
        return layer_name(ref.kind, ref.number, self.options.blocks)

    def layer_meta(self, ref: LayerRef, extra: dict | None = None) -> dict:
        """What the grid and the model say about a layer, before its maps are encoded."""
        grid = self.grid
        return {
            "H_p": grid.grid_h,
            "W_p": grid.grid_w,
            "stride_h": grid.stride_h,
            "stride_w": grid.stride_w,
            "patch_size": self.patch_size,
            "image_size": list(self.image_size),
            "query_frame": 0,
            "query_source": Path(self.sources[0]).name,
            "num_heads": self.heads[ref.kind],
        } | (extra or {})


def plan_capture(
    model: nn.Module,
    images: Tensor,
    options: ExportOptions,
    sources: Sequence[str] | None = None,
    scene: str | os.PathLike[str] | None = None,
    preprocess_mode: str | None = None,
) -> CapturePlan:
    """Check a capture's inputs against the model; raises :class:`ExportError` (see
    :func:`export_attention` for the arguments)."""
    aggregator = model.aggregator
    layers = options.validate(layer_depths(aggregator))
    if images.dim() != 4 or images.shape[1] != 3:
        raise ExportError(f"{argument('images')} must be [S, 3, H, W], got {list(images.shape)}")
    num_frames, _, height, width = images.shape
    patch_size = aggregator.patch_size
    if height % patch_size or width % patch_size:
        raise ExportError(
            f"image size {width} x {height} (W x H) is not a multiple of the patch size {patch_size}"
        )
    sources = [f"frame_{i:02d}" for i in range(num_frames)] if sources is None else list(sources)
    if len(sources) != num_frames:
        raise ExportError(f"{num_frames} frames but {len(sources)} names in {argument('sources')}")
    if options.geometry:
        try:
            check_heads(model)
        except ValueError as err:
            raise ExportError(str(err)) from None
    elif scene is not None:
        raise ExportError(f"a {argument('scene')} is used only with {argument('geometry', True)}")
    grid = QueryGrid(height // patch_size, width // patch_size, options.stride_h, options.stride_w)
    truth = None
    if scene is not None:  # before the pass: a scene that does not fit fails at once
        if preprocess_mode is None:
            raise ExportError("true geometry needs the preprocessing mode (manifest preprocess_mode)")
        try:
            truth = truth_arrays(scene, sources, preprocess_mode, (height, width), grid, patch_size)
        except SceneError as err:
            raise ExportError(str(err)) from None
    heads = {kind: attention_blocks(aggregator, kind)[0].attn.num_heads for kind in BLOCK_KINDS}
    heads[ROLLOUT_KIND] = heads["global"]
    return CapturePlan(options, layers, grid, sources, (height, width), patch_size, heads, truth)


def export_attention(
    model: nn.Module,
    images: Tensor,
    out_dir: str | os.PathLike[str],
    *,
    sources: Sequence[str] | None = None,
    options: ExportOptions | None = None,
    manifest: dict | None = None,
    overwrite: bool = False,
    autocast_dtype: torch.dtype | str | None = "auto",
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
        :func:`vggt.load_model` sets), ``preprocess_mode``, ``first_image_idx``. Missing ones are filled
        with neutral values.
    overwrite : bool
        Replace an existing ``out_dir`` (only once the new export is complete).
    autocast_dtype : torch.dtype, "auto" or None
        Run the forward pass under autocast to this dtype; ``"auto"`` (default): the dtype
        :func:`vggt.load_model` chose for the model (bf16 or fp16 on CUDA, as the command line), else
        none. Attention probabilities are always computed in float32 from the hooked queries and keys.
    progress : bool
        Show a progress bar.
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
    out_dir = Path(out_dir)
    plan = plan_capture(model, images, options, sources, scene, (manifest or {}).get("preprocess_mode"))
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists (pass {argument('overwrite', True)} to replace it)")
    autocast_dtype = resolve_autocast(model, autocast_dtype)
    fields = {"model": getattr(model, "weights_source", None)} | run_fields(model, autocast_dtype)
    with staged_export(out_dir, overwrite, options.compress, images, plan.sources) as writer:
        with (
            PassProgress(model, plan, progress) as bar,
            LayerWriteQueue(writer.write_layer, 2, bar.written) as queue,
        ):

            def write(captured: CapturedLayer, extra: dict | None = None) -> None:
                meta = plan.layer_meta(captured.ref, extra)
                args, tokens = encode_captured(captured, meta, options.precision, queue.buffer)
                queue.submit(plan.layer_name(captured.ref), *args, **tokens)

            rollout, geometry = run_capture(model, images, plan, write, autocast_dtype, bar)
            if rollout is not None:
                write(*rollout)
            bar.phase("writing")
            queue.finish()
        if geometry is not None:
            writer.write_geometry(geometry, geometry_meta(scene))
        writer.write_manifest(fields | dict(manifest or {}))
    return out_dir


def resolve_autocast(model: nn.Module, autocast_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The autocast dtype to run ``model`` with: ``"auto"`` is the one :func:`vggt.load_model` chose
    for it (``model.autocast_dtype``), else the command line's default for its device."""
    if autocast_dtype != "auto":
        return autocast_dtype
    if hasattr(model, "autocast_dtype"):
        return model.autocast_dtype
    return select_device_and_dtype(str(next(model.parameters()).device), "auto")[1]


def run_fields(model: nn.Module, autocast_dtype: torch.dtype | None) -> dict:
    """The manifest's record of how the pass ran: ``device`` and ``autocast_dtype``."""
    device = next(model.parameters()).device
    dtype = None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch.")
    return {"device": str(device), "autocast_dtype": dtype}


@contextmanager
def staged_export(
    out_dir: Path, overwrite: bool, compress: bool, frames: Tensor | np.ndarray, sources: Sequence[str]
) -> Iterator[ExportWriter]:
    """An :class:`ExportWriter` on a hidden folder beside ``out_dir``, its frames (``[S, 3, H, W]`` in
    [0, 1], or ``[S, H, W, 3]`` uint8) written, renamed into place when the block ends cleanly and removed
    when it does not."""
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = ExportWriter(staging, compress=compress)
        writer.write_frames(to_uint8_frames(frames) if isinstance(frames, Tensor) else frames, sources)
        yield writer
        _move_into_place(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def encode_captured(
    captured: CapturedLayer,
    meta: dict,
    precision: str,
    buffer: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray, dict], dict[str, np.ndarray]]:
    """A captured layer (patch and token queries) encoded as :meth:`ExportWriter.write_layer` takes it,
    after the layer's name: ``(heatmaps, special_mass, meta)`` and ``{token_heatmaps, token_special_mass}``.

    The heatmaps are encoded into ``buffer(shape, dtype)`` when given (the write queue's), else into a
    new array. All of it is a copy: the captured arrays may be reused for the next layer."""
    ref, layout = captured.ref, captured.layout
    heatmaps, fields = _encode(captured.maps, precision, captured.head_mean)
    token_heatmaps, token_fields = _encode(captured.token_maps, precision)
    meta = meta | layer_fields(
        ref.kind, ref.number, layout.key_frames, layout.special_tokens, layout.special_queries,
        fields, token_fields,
    )  # fmt: skip
    codes = heatmaps.encode_into(buffer(heatmaps.shape, heatmaps.dtype)) if buffer else np.asarray(heatmaps)
    tokens = {
        "token_heatmaps": np.asarray(token_heatmaps),
        "token_special_mass": _float16(captured.token_special_mass),
    }
    return (codes, _float16(captured.special_mass), meta), tokens


def _encode(
    maps: Tensor, precision: str, head_mean: Tensor | None = None
) -> tuple[EncodedMaps | DeviceEncodedMaps, dict]:
    """Scales and codes of captured maps: with numpy on the CPU, where the maps are on a GPU."""
    if maps.device.type != "cpu":
        return encode_layer_on_device(maps, precision, head_mean)
    return encode_layer(maps.numpy(), precision, None if head_mean is None else head_mean.numpy())


def _float16(tensor: Tensor) -> np.ndarray:
    return tensor.cpu().numpy().astype(np.float16, order="C")


class PassProgress:
    """The one progress bar of a capture: a step per attention block the forward pass runs (its estimate
    so follows the pass from its first block on), then the heads' share when geometry is asked for; the
    layers written so far as its postfix (unless not ``writing``).

    Use as a context manager; :meth:`attach` ticks it from the model's blocks during the pass.
    """

    def __init__(
        self, model: nn.Module, plan: CapturePlan, enabled: bool = True, writing: bool = True
    ) -> None:
        options = plan.options
        depth = len(model.aggregator.global_blocks)
        self.last = _last_layer(plan.layers, options.rollout or options.geometry, depth)
        self.blocks = _blocks_entered(model.aggregator, self.last)
        self.head_steps = round(GEOMETRY_TIME_SHARE * len(self.blocks)) if options.geometry else 0
        self.layers = len(plan.layers) + int(options.rollout) if writing else 0
        self._written = 0
        self._bar = tqdm(total=len(self.blocks) + self.head_steps, desc="forward pass", unit="block",
                         postfix=self._writes(), disable=not enabled, dynamic_ncols=True)  # fmt: skip

    def __enter__(self) -> PassProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.close()

    @contextmanager
    def attach(self) -> Iterator[None]:
        """Tick once per block while the pass runs; the block the pass stops in counts on leaving."""
        handles = [block.register_forward_hook(self._tick) for block in self.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self._bar.update(len(self.blocks) - self._bar.n)

    def _tick(self, *_) -> None:  # a forward hook must return None, or it replaces the block's output
        self._bar.update(1)

    def phase(self, name: str) -> None:
        """Name what runs now (``"geometry heads"``, ``"rollout"``, ``"writing"``)."""
        self._bar.set_description_str(name)

    def heads_done(self) -> None:
        self._bar.update(self.head_steps)

    def written(self) -> None:
        """One more layer on disk (called from the writer's thread)."""
        self._written += 1
        self._bar.set_postfix_str(self._writes())

    def _writes(self) -> str | None:
        return f"{self._written}/{self.layers} layers written" if self.layers else None


def run_capture(
    model: nn.Module,
    images: Tensor,
    plan: CapturePlan,
    on_layer: Callable[[CapturedLayer], None],
    autocast_dtype: torch.dtype | None,
    bar: PassProgress,
) -> tuple[tuple[CapturedLayer, dict] | None, dict[str, np.ndarray] | None]:
    """The capture's one forward pass: ``on_layer`` gets each layer in its hook.

    Returns
    -------
    rollout : (CapturedLayer, dict) or None
        The rollout and its metadata fields, when asked for.
    geometry : dict or None
        What the heads predict (and the truth, where a scene was given), when geometry is asked for.
    """
    options, grid = plan.options, plan.grid
    rollout, head_inputs = _forward_with_capture(model, images, plan, on_layer, autocast_dtype, bar)
    geometry = None
    if head_inputs is not None:
        bar.phase("geometry heads")  # the layers are written meanwhile
        points = query_points_of(grid, plan.patch_size)
        geometry = predict_geometry(model, *head_inputs, points, autocast_dtype) | (plan.truth or {})
        del head_inputs
        bar.heads_done()
    if rollout is None:
        return None, geometry
    bar.phase("rollout")
    extra = {"rollout_discard_ratio": options.rollout_discard, "rollout_layers": rollout.num_layers}
    return (rollout.result(), extra), geometry


def _forward_with_capture(
    model: nn.Module,
    images: Tensor,
    plan: CapturePlan,
    on_layer: Callable[[CapturedLayer], None],
    autocast_dtype: torch.dtype | None,
    bar: PassProgress,
) -> tuple[RolloutCapture | None, tuple[list[Tensor | None], int, Tensor] | None]:
    """The forward pass: the rollout (when asked for) and, with geometry, what the heads need (the kept
    aggregator outputs, ``patch_start_idx`` and the batched images)."""
    aggregator, options, grid = model.aggregator, plan.options, plan.grid
    device = next(aggregator.parameters()).device
    num_frames = images.shape[0]
    model.eval()
    rollout = None
    with ExitStack() as stack:
        stack.enter_context(bar.attach())
        capture = AttentionCapture(aggregator, grid, plan.layers, num_frames, options.per_head, on_layer)
        stack.enter_context(capture)
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
        # Nothing after the last captured layer's attention probabilities is needed: the pass stops there.
        # Entered last: its hook runs after the captures' hooks on the same hook point.
        with StopAfter(qk_hook_point(aggregator, bar.last)):
            aggregator(batch, keep_outputs=False)
    return rollout, None


def _last_layer(layers: Sequence[LayerRef], whole_pass: bool, depth: int) -> LayerRef:
    """The captured layer the forward pass reaches last (the rollout and the heads need every global
    layer)."""
    if whole_pass:
        return LayerRef("global", depth - 1)
    return max(layers, key=lambda ref: ref.forward_position)


def _blocks_entered(aggregator: nn.Module, last: LayerRef) -> list[nn.Module]:
    """The attention blocks a forward pass ending at ``last`` enters (every DINOv2 block, then frame and
    global blocks in turn), the one it ends in included."""
    return [
        block
        for kind in BLOCK_KINDS
        for index, block in enumerate(attention_blocks(aggregator, kind))
        if LayerRef(kind, index).forward_position <= last.forward_position
    ]


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists (pass {argument('overwrite', True)} to replace it)")
    # Swap: the old export is set aside first so that a failure never leaves neither in place.
    retired = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, retired)
    os.replace(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)
