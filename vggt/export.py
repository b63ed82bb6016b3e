"""Export the global attention of the query frame's patches from ONE forward pass of the aggregator.

The Python API behind ``compute_layerwise_attentions.py``::

    from vggt.export import ExportOptions, export_attention

    export_attention(model, images, "attn_first2all_kitchen", sources=names,
                     options=ExportOptions(per_head=True, stride_h=2, stride_w=2))

Each global layer is captured at its hook point while the forward pass runs, encoded (uint8 or
float16) and written at once, so only one layer's maps are in memory at a time. The export is
written to a hidden temporary folder beside the target and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vggt.attn_format import ExportWriter, special_token_names
from vggt.capture import CapturedLayer, GlobalAttentionCapture, QueryGrid
from vggt.device import autocast_context
from vggt.preprocess import to_uint8_frames
from vggt.quantize import encode_layer

PRECISIONS = ("uint8", "float16")


class ExportError(ValueError):
    """An export that cannot be made as asked (one-line message for the user)."""


@dataclass(frozen=True)
class ExportOptions:
    """What to capture and how to store it.

    Attributes
    ----------
    per_head : bool
        Keep every head (``[Q, heads, S, H_ds, W_ds]``) or their mean (``[Q, S, H_ds, W_ds]``).
    stride_h, stride_w : int
        Query stride, which is also the key pooling block, in patches.
    layers : tuple of int, optional
        1-based global layers to export; all of them when ``None``.
    precision : str
        ``"uint8"`` (quantized by vmax99) or ``"float16"`` (raw probabilities).
    compress : bool
        Deflate the NPZ files (smaller to share; readers can then not memory-map them).
    """

    per_head: bool = False
    stride_h: int = 1
    stride_w: int = 1
    layers: tuple[int, ...] | None = None
    precision: str = "uint8"
    compress: bool = False

    def validate(self, depth: int) -> tuple[int, ...]:
        """Check the options against a model of ``depth`` global layers; return the layers to export."""
        if self.stride_h < 1 or self.stride_w < 1:
            raise ExportError(
                f"strides must be at least 1, got stride_h={self.stride_h}, stride_w={self.stride_w}"
            )
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        layers = tuple(range(1, depth + 1)) if self.layers is None else tuple(self.layers)
        if not layers:
            raise ExportError("no layers to export")
        outside = [n for n in layers if not 1 <= n <= depth]
        if outside:
            raise ExportError(f"layer {outside[0]} does not exist: the model has global layers 1-{depth}")
        return tuple(sorted(set(layers)))


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


def layer_name(number: int) -> str:
    """Name of 1-based global layer ``number`` in an export: ``layer_01``, ..."""
    return f"layer_{number:02d}"


def estimate_export_bytes(
    num_frames: int,
    image_size: tuple[int, int],
    grid: QueryGrid,
    num_heads: int,
    num_layers: int,
    n_special: int,
    options: ExportOptions,
) -> int:
    """Bytes an export will take on disk (uncompressed NPZ; PNG frames counted as raw RGB)."""
    heads = num_heads if options.per_head else 1
    per_query = heads * num_frames
    value_bytes = 1 if options.precision == "uint8" else 2
    layer = grid.num_queries * per_query * (grid.H_ds * grid.W_ds * value_bytes + n_special * 2)
    frames = num_frames * image_size[0] * image_size[1] * 3
    return num_layers * (layer + 4096) + frames + 65536


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
    query_chunk: int | None = None,
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
        checkpoint_sha256, random_weights, random_seed), ``preprocess_mode``, ``first_image_idx``.
        Missing ones are filled with neutral values (``model`` fields ``None``).
    overwrite : bool
        Replace an existing ``out_dir`` (only once the new export is complete).
    autocast_dtype : torch.dtype, optional
        Run the forward pass under autocast to this dtype (bf16/fp16 on CUDA). Attention
        probabilities are always computed in float32 from the hooked queries and keys.
    progress : bool
        Show tqdm bars.
    query_chunk : int, optional
        Queries per softmax chunk in the capture.

    Returns
    -------
    Path
        ``out_dir``.
    """
    options = options or ExportOptions()
    aggregator = model.aggregator
    layers = options.validate(len(aggregator.global_blocks))
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
    base_meta = {
        "layer_kind": "global",
        "H_p": grid.grid_h,
        "W_p": grid.grid_w,
        "stride_h": grid.stride_h,
        "stride_w": grid.stride_w,
        "patch_size": patch_size,
        "image_size": [height, width],
        "query_frame": 0,
        "query_source": Path(sources[0]).name,
        "num_heads": aggregator.global_blocks[0].attn.num_heads,
        "special_tokens": special_token_names(aggregator.patch_start_idx),
    }
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = ExportWriter(staging, compress=options.compress)
        writer.write_frames(to_uint8_frames(images), sources)
        with tqdm(total=len(layers), desc="writing layers", unit="layer", disable=not progress) as bar:

            def write(captured: CapturedLayer) -> None:
                number = captured.block_index + 1
                heatmaps, fields = encode_layer(
                    captured.maps.numpy(), options.precision, captured.head_mean.numpy()
                )
                meta = base_meta | fields | {"layer_index": number, "block_index": captured.block_index}
                special = captured.special_mass.numpy().astype("float16", order="C")
                writer.write_layer(layer_name(number), heatmaps, special, meta)
                bar.update(1)

            _forward_with_capture(
                model, images, grid, layers, options.per_head, write, autocast_dtype, progress, query_chunk
            )
        writer.write_manifest(_manifest_fields(manifest, out_dir, options))
        _move_into_place(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _forward_with_capture(
    model: nn.Module,
    images: Tensor,
    grid: QueryGrid,
    layers: tuple[int, ...],
    per_head: bool,
    on_layer: Callable[[CapturedLayer], None],
    autocast_dtype: torch.dtype | None,
    progress: bool,
    query_chunk: int | None,
) -> None:
    aggregator = model.aggregator
    device = next(aggregator.parameters()).device
    model.eval()
    blocks = aggregator.global_blocks
    with ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(total=len(blocks), desc="forward pass", unit="block", disable=not progress)
        )

        def tick(*_) -> None:  # a forward hook must return None, or it replaces the block's output
            bar.update(1)

        for block in blocks:
            stack.callback(block.register_forward_hook(tick).remove)
        stack.enter_context(
            GlobalAttentionCapture(
                aggregator, grid, [n - 1 for n in layers], per_head, on_layer, query_chunk=query_chunk
            )
        )
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast_context(device, autocast_dtype))
        aggregator(images.to(device)[None], keep_outputs=False)


def _manifest_fields(manifest: dict | None, out_dir: Path, options: ExportOptions) -> dict:
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
    fields["model"] = model_fields | dict(fields.get("model") or {})
    fields.setdefault("preprocess_mode", None)
    fields.setdefault("first_image_idx", 0)
    fields["precision"] = options.precision
    fields["compressed"] = options.compress
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
