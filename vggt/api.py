"""The Python API, at the top of the package: load VGGT, capture its attention, export it, open exports.

::

    import vggt

    model = vggt.load_model()                      # facebook/VGGT-1B; device and precision as the CLI
    attention = vggt.capture_attention(model, "examples/synthetic_room/images", stride=2, per_head=True)
    attention.query_maps("layer_24", qi=10)        # [heads, S, H_ds, W_ds] float32 probabilities
    attention.save("attn_room")                    # an export, as vggt.export_attention writes it
    export = vggt.open_export("attn_room")         # the one reader (numpy only)

This module imports nothing heavy: torch is imported by the functions that need it, when they are
called, so that ``import vggt`` and :func:`open_export` work where torch is not installed. Errors name
arguments as a Python caller writes them (``checkpoint=PATH``, ``random_weights=True``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vggt.attn_format.reader import open_export

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from vggt.captured import CapturedAttention
    from vggt.export import ExportOptions


def load_model(
    model_id: str | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
    seed: int = 0,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    heads: bool = False,
    config: Any = None,
) -> nn.Module:
    """Build VGGT with its weights, on the device and with the precision the command line would use.

    Parameters
    ----------
    model_id : str, optional
        Hugging Face Hub repository of the weights (default ``facebook/VGGT-1B``), downloaded once into
        the hub's cache (``HF_HOME``, ``HF_HUB_OFFLINE`` and tokens behave as usual).
    checkpoint : path, optional
        A local ``.safetensors`` / ``.pt`` file, or a folder holding ``model.safetensors`` or ``model.pt``,
        instead of the hub.
    random_weights : bool
        Seeded random weights (``seed``), nothing downloaded: to try things out.
    revision, cache_dir, local_files_only
        Hub branch, tag or commit; cache folder; use the cache only.
    device : str
        ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype : str
        The autocast dtype of the forward pass: ``"auto"`` (bfloat16 on GPUs of compute capability 8 or
        more, float16 on older ones, float32 on the CPU), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        Kept as ``model.autocast_dtype``; :func:`capture_attention` and :func:`export_attention` run
        under it. Attention probabilities are computed in float32 whatever it is.
    heads : bool
        Also build and load the camera, depth, point and track heads (needed for ``geometry=True``);
        by default the aggregator alone, all that attention needs.
    config : VGGTConfig, optional
        Another architecture than VGGT-1B's.

    Returns
    -------
    VGGT
        In eval mode, gradients off, on ``device``; ``weights_source`` says where the weights came from.

    Raises
    ------
    vggt.weights.WeightsError
        When the weights cannot be found or do not fit (offline with nothing cached, a missing file, ...).
    vggt.device.DeviceError
        For a device or dtype this machine does not have.
    """
    import torch

    from vggt.device import select_device_and_dtype
    from vggt.models.config import VGGTConfig
    from vggt.models.vggt import VGGT
    from vggt.weights import DEFAULT_MODEL_ID, assign_weights, exclusive_sources

    exclusive_sources(checkpoint, random_weights)
    torch_device, autocast_dtype = select_device_and_dtype(device, dtype)
    with torch.device("meta"):
        model = VGGT.from_config(config if config is not None else VGGTConfig(), heads=heads)
    assign_weights(
        model, model_id or DEFAULT_MODEL_ID, revision, checkpoint, cache_dir, random_weights, seed,
        torch_device, local_files_only,
    )  # fmt: skip
    model.autocast_dtype = autocast_dtype
    return model


def capture_attention(
    model: nn.Module,
    images: Tensor | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    layers: Sequence[int] | str | None = None,
    blocks: Sequence[str] | str = ("global",),
    per_head: bool = False,
    stride: int | tuple[int, int] = 1,
    rollout: bool = False,
    rollout_discard: float | None = None,
    geometry: bool = False,
    sources: Sequence[str] | None = None,
    preprocess: str = "crop",
    scene: str | os.PathLike[str] | None = None,
    autocast_dtype: torch.dtype | str | None = "auto",
    progress: bool = False,
) -> CapturedAttention:
    """Run VGGT once over ``images`` and keep the attention of the chosen layers in memory.

    Parameters
    ----------
    model : VGGT
        From :func:`load_model`.
    images : Tensor, path or list of paths
        ``[S, 3, H, W]`` in [0, 1] (frame 0 is the query frame), or image files, or a folder of images
        (natural sort order), preprocessed as upstream VGGT does (``preprocess``: ``"crop"`` or ``"pad"``).
    layers : list of int or str, optional
        1-based layers within each kind, e.g. ``[1, 2, 12]`` or ``"1-4,12"``; all by default.
    blocks : str or list of str
        Layer kinds: ``"global"`` (default), ``"frame"``, ``"dino"``.
    per_head : bool
        Keep every head, or (default) their mean.
    stride : int or (int, int)
        Query every n-th patch row and column; keys are pooled (summed) over the same blocks.
    rollout, rollout_discard : bool, float
        Also the attention rollout through all frame and global layers, dropping this share of each
        row's smallest entries per layer (default 0.9).
    geometry : bool
        Also run the camera, depth, point and track heads on the same pass (a model loaded with
        ``heads=True``); the result's ``geometry`` holds what they predict, and the true correspondences
        when ``scene`` (or the folder the images are in) has cameras and depth.
    sources : list of str, optional
        Names of the frames (by default the image files' names, or ``frame_00`` ...).
    scene : path, optional
        With ``geometry``: the scene folder (``cameras.json``, ``depth/``) the images come from.
    autocast_dtype : torch.dtype, "auto" or None
        ``"auto"``: the one :func:`load_model` chose.
    progress : bool
        Show a progress bar.

    Returns
    -------
    CapturedAttention
        ``query_maps(layer, qi, head=None)``, ``token_maps``, ``key_maps``, ``layer_names``,
        ``layer_meta``, ``frames()``, ``manifest``, ``geometry``: the accessors of an opened export, on
        exact float32 probabilities; ``save(path, precision="uint8")`` writes an export.
    """
    from vggt.captured import capture_attention as capture

    options = _options(model, layers, blocks, per_head, stride, rollout, rollout_discard, geometry)
    tensor, names, mode, scene = _images(images, sources, preprocess, scene, geometry)
    return capture(model, tensor, options, sources=names, preprocess_mode=mode, scene=scene,
                   autocast_dtype=autocast_dtype, progress=progress)  # fmt: skip


def export_attention(
    model: nn.Module,
    images: Tensor | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    layers: Sequence[int] | str | None = None,
    blocks: Sequence[str] | str = ("global",),
    per_head: bool = False,
    stride: int | tuple[int, int] = 1,
    rollout: bool = False,
    rollout_discard: float | None = None,
    geometry: bool = False,
    precision: str = "uint8",
    compress: bool = False,
    overwrite: bool = False,
    sources: Sequence[str] | None = None,
    preprocess: str = "crop",
    scene: str | os.PathLike[str] | None = None,
    autocast_dtype: torch.dtype | str | None = "auto",
    progress: bool = True,
) -> Path:
    """Run VGGT once over ``images`` and write the attention export to ``out_dir``, one layer at a time
    (so only one layer's maps are in memory: the way for large exports).

    The arguments are those of :func:`capture_attention`, plus ``precision`` (``"uint8"``: codes of the
    99th percentile; ``"float16"``: the probabilities), ``compress`` (deflated NPZ files) and
    ``overwrite`` (replace ``out_dir`` once the new export is complete). Returns ``out_dir``.
    """
    from vggt.export import export_attention as export

    options = _options(model, layers, blocks, per_head, stride, rollout, rollout_discard, geometry,
                       precision=precision, compress=compress)  # fmt: skip
    tensor, names, mode, scene = _images(images, sources, preprocess, scene, geometry)
    manifest = {"preprocess_mode": mode}
    return export(
        model, tensor, out_dir, sources=names, options=options, manifest=manifest, overwrite=overwrite,
        autocast_dtype=autocast_dtype, progress=progress, scene=scene,
    )  # fmt: skip


def _options(
    model: nn.Module,
    layers: Sequence[int] | str | None,
    blocks: Sequence[str] | str,
    per_head: bool,
    stride: int | tuple[int, int],
    rollout: bool,
    rollout_discard: float | None,
    geometry: bool,
    **storage: Any,
) -> ExportOptions:
    """The options of the keyword arguments, checked where they are made (:class:`ExportOptions`)."""
    from vggt.arguments import argument
    from vggt.export import ExportError, ExportOptions, layer_depths, parse_layers
    from vggt.rollout import DEFAULT_DISCARD_RATIO

    pair = (stride, stride) if isinstance(stride, int) and not isinstance(stride, bool) else stride
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        raise ExportError(f"{argument('stride', repr(stride))} must be an integer or a pair of integers")
    discard = DEFAULT_DISCARD_RATIO if rollout_discard is None else rollout_discard
    options = ExportOptions(per_head, *pair, blocks=blocks, rollout=rollout, rollout_discard=discard,
                            geometry=geometry, **storage)  # fmt: skip
    if isinstance(layers, str):
        depths = layer_depths(model.aggregator)
        layers = parse_layers(layers, max(depths[kind] for kind in options.blocks))
    return options if layers is None else replace(options, layers=tuple(layers))


def _images(
    images: Any,
    sources: Sequence[str] | None,
    preprocess: str,
    scene: str | os.PathLike[str] | None,
    geometry: bool,
) -> tuple[Tensor, list[str] | None, str | None, Path | None]:
    """``(images [S, 3, H, W], their names, the preprocessing mode, the scene)`` from a tensor, a list
    of image files or a folder (whose scene, if it belongs to one, gives true geometry)."""
    import torch

    from vggt.arguments import argument
    from vggt.export import ExportError
    from vggt.geometry.correspondence import scene_of_image_dir
    from vggt.preprocess import list_images, load_and_preprocess_images

    if isinstance(images, torch.Tensor):
        names = None if sources is None else list(sources)
        return images, names, None, None if scene is None else Path(scene)
    if isinstance(images, str | os.PathLike):
        folder = Path(images)
        if not folder.is_dir():
            raise ExportError(f"{argument('images')}: no such folder {folder}")
        paths = list_images(folder)
        if not paths:
            raise ExportError(f"{argument('images')}: no image files in {folder}")
        if scene is None and geometry:
            scene = scene_of_image_dir(folder)
    else:
        paths = [Path(path) for path in images]
    tensor = load_and_preprocess_images(paths, mode=preprocess)
    names = [path.name for path in paths] if sources is None else list(sources)
    return tensor, names, preprocess, None if scene is None else Path(scene)


__all__ = ["capture_attention", "export_attention", "load_model", "open_export"]
