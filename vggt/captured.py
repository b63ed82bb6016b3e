"""Attention captured in memory: the reader's accessors on exact float32 probabilities, and a save.

:func:`capture_attention` runs the same single forward pass as the exporter (:func:`vggt.export.run_capture`)
and keeps every captured layer, so that a notebook reads maps without a round trip through disk::

    captured = capture_attention(model, images, stride=2, per_head=True)
    captured.query_maps("layer_24", qi=10)        # [heads, S, H_ds, W_ds] float32, not quantized
    captured.save("attn_room")                    # an export, as export_attention writes it

Memory: every captured layer's maps stay in host memory, ``Q * heads * K * H_ds * W_ds`` float32 values
each (360 MB per layer of a per-head capture of 3 frames of 518x518 at stride 1; a stride of 2 takes a
sixteenth of that). Ask for the layers you need (``layers=``) or a stride for large captures, or use
:func:`vggt.export_attention`, which holds one layer at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from vggt.arguments import argument
from vggt.attn_format.maps import AttentionMaps
from vggt.attn_format.schema import (
    HEATMAPS_KEY,
    SPECIAL_MASS_KEY,
    TOKEN_HEATMAPS_KEY,
    TOKEN_SPECIAL_MASS_KEY,
    FormatError,
    layer_sort_key,
)
from vggt.attn_format.writer import layer_fields
from vggt.capture import CapturedLayer, LayerRef
from vggt.export import (
    CapturePlan,
    ExportError,
    ExportOptions,
    PassProgress,
    encode_captured,
    plan_capture,
    resolve_autocast,
    run_capture,
    run_fields,
    staged_export,
)
from vggt.geometry.correspondence import geometry_meta
from vggt.preprocess import to_uint8_frames


@dataclass
class _Layer:
    """One captured layer, copied out of the capture's reused buffers (numpy, float32)."""

    ref: LayerRef
    layout: object  # vggt.capture.SequenceLayout
    arrays: dict[str, np.ndarray]  # heatmaps, special_mass, token_heatmaps, token_special_mass
    head_mean: np.ndarray | None
    extra: dict

    @classmethod
    def copy_of(cls, captured: CapturedLayer, extra: dict | None = None) -> _Layer:
        def host(tensor: Tensor) -> np.ndarray:  # a copy: the capture reuses its buffers
            return np.array(tensor.detach().to("cpu", torch.float32).numpy(), order="C", copy=True)

        arrays = {
            HEATMAPS_KEY: host(captured.maps),
            SPECIAL_MASS_KEY: host(captured.special_mass),
            TOKEN_HEATMAPS_KEY: host(captured.token_maps),
            TOKEN_SPECIAL_MASS_KEY: host(captured.token_special_mass),
        }
        head_mean = None if captured.head_mean is None else host(captured.head_mean)
        return cls(captured.ref, captured.layout, arrays, head_mean, dict(extra or {}))

    def as_captured(self) -> CapturedLayer:
        tensors = {key: torch.from_numpy(array) for key, array in self.arrays.items()}
        head_mean = None if self.head_mean is None else torch.from_numpy(self.head_mean)
        return CapturedLayer(
            self.ref,
            self.layout,  # type: ignore[arg-type]
            tensors[HEATMAPS_KEY],
            tensors[SPECIAL_MASS_KEY],
            tensors[TOKEN_HEATMAPS_KEY],
            tensors[TOKEN_SPECIAL_MASS_KEY],
            head_mean,
        )


class CapturedAttention(AttentionMaps):
    """The attention of one forward pass, in memory (see :func:`capture_attention`).

    The accessors are those of an opened export (:class:`vggt.attn_format.AttnExport`):
    :meth:`query_maps`, :meth:`token_maps`, :meth:`key_maps`, :meth:`layer_meta`, :meth:`frames`, with
    the same shapes, but exact float32 probabilities rather than stored codes.

    Attributes
    ----------
    layer_names : list of str
        Captured layers, in the order an export lists them (``layer_01`` ... or ``global_01``,
        ``frame_01``, ``dino_01`` ..., then ``rollout``).
    manifest : dict
        What an export's manifest would say of the capture: model, device, autocast dtype,
        preprocessing, frames, grid, heads, layers.
    frame_sources : list of str
        The frames' names (``sources``), model order.
    geometry : dict of np.ndarray or None
        With ``geometry=True``: the heads' predictions and correspondences, named as in an export's
        ``geometry/`` part (``extrinsic``, ``intrinsic``, ``depth``, ``world_points``, ``track_xy``, ...).
    """

    def __init__(
        self,
        plan: CapturePlan,
        layers: list[_Layer],
        frames: np.ndarray,
        manifest: dict,
        geometry: dict[str, np.ndarray] | None,
        scene: str | os.PathLike[str] | None = None,
    ) -> None:
        self._plan = plan
        self._frames = frames
        self._scene = scene
        order = sorted(layers, key=lambda layer: layer_sort_key(layer.ref.kind, layer.ref.number))
        self._layers = {plan.layer_name(layer.ref): layer for layer in order}
        self.layer_names = list(self._layers)
        self.frame_sources = list(plan.sources)
        self.geometry = geometry
        self._meta = {name: self._describe(name, layer) for name, layer in self._layers.items()}
        first = self._meta[self.layer_names[0]]
        grid_keys = ("H_p", "W_p", "stride_h", "stride_w", "H_ds", "W_ds", "Q", "patch_size")
        self.manifest = manifest | {
            "frames": [{"frame": i, "source": source} for i, source in enumerate(self.frame_sources)],
            "grid": {key: first[key] for key in grid_keys},
            "per_head_data": plan.options.per_head,
            "num_heads": plan.heads["global"],
            "precision": "float32",
            "layers": [{"name": name, "kind": self._meta[name]["layer_kind"]} for name in self.layer_names],
        }

    def _describe(self, name: str, layer: _Layer) -> dict:
        grid, maps = self._plan.grid, layer.arrays[HEATMAPS_KEY]
        per_head = maps.ndim == 5
        unscaled = {"layer_vmax99": None, "per_head_vmax99": None, "normalized_by": "none"}
        layout = layer.layout
        fields = layer_fields(
            layer.ref.kind, layer.ref.number, layout.key_frames, layout.special_tokens,
            layout.special_queries, unscaled,
        )  # fmt: skip
        return (
            self._plan.layer_meta(layer.ref, layer.extra)
            | fields
            | {
                "layer_name": name,
                "dtype": "float32",
                "Q": grid.num_queries,
                "S": len(self._plan.sources),
                "H_ds": grid.H_ds,
                "W_ds": grid.W_ds,
                "per_head_data": per_head,
                "num_heads": self._plan.heads[layer.ref.kind],
                "source_images": list(self.frame_sources),
                **{f"{key}_shape": list(array.shape) for key, array in layer.arrays.items()},
            }
        )

    # ---- what the accessors of AttentionMaps read ------------------------------------------------------

    def layer_meta(self, name: str) -> dict:
        """What a layer is, with the fields of an export's layer metadata that describe it."""
        try:
            return self._meta[name]
        except (KeyError, TypeError):
            raise FormatError(f"no layer {name!r} captured (has {', '.join(self.layer_names)})") from None

    def _array(self, name: str, key: str) -> np.ndarray | None:
        self.layer_meta(name)
        return self._layers[name].arrays.get(key)

    def heatmaps(self, name: str) -> np.ndarray:
        """All of a layer's maps: ``[Q, K, H_ds, W_ds]`` or ``[Q, heads, K, H_ds, W_ds]`` float32."""
        return self._array(name, HEATMAPS_KEY)  # type: ignore[return-value]

    def special_mass(self, name: str) -> np.ndarray:
        """``[Q, (heads,) K, n_special]`` float32: the mass on each key frame's special tokens."""
        return self._array(name, SPECIAL_MASS_KEY)  # type: ignore[return-value]

    def token_special_mass(self, name: str) -> np.ndarray:
        """``[T, (heads,) K, n_special]`` float32, for the token queries."""
        return self._array(name, TOKEN_SPECIAL_MASS_KEY)  # type: ignore[return-value]

    def head_scales(self, name: str, token: bool = False) -> np.ndarray:
        """Ones: the maps are probabilities already (the reader's factor for stored codes)."""
        meta = self.layer_meta(name)
        return np.ones(meta["num_heads"] if meta["per_head_data"] else 1, dtype=np.float32)

    # ---- frames ----------------------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the frames as the model saw them."""
        return self._plan.image_size

    def frames(self) -> list[np.ndarray]:
        """The frames as the model saw them, ``[H, W, 3] uint8`` each, model order."""
        return list(self._frames)

    def frame(self, index: int) -> np.ndarray:
        return self._frames[index]

    # ---- saving ----------------------------------------------------------------------------------------

    def save(
        self,
        path: str | os.PathLike[str],
        precision: str = "uint8",
        compress: bool = False,
        overwrite: bool = False,
    ) -> Path:
        """Write these layers as an export (what :func:`vggt.export_attention` would have written).

        Parameters
        ----------
        path : path
            The export folder to create.
        precision : str
            ``"uint8"`` (codes of each layer's or head's 99th percentile) or ``"float16"``.
        compress, overwrite : bool
            As :func:`vggt.export_attention`.

        Returns
        -------
        Path
            ``path``; open it with :func:`vggt.open_export`.
        """
        out_dir = Path(path)
        ExportOptions(precision=precision)  # checks the precision
        if out_dir.exists() and not overwrite:
            raise ExportError(f"{out_dir} already exists (pass {argument('overwrite', True)} to replace it)")
        fields = {key: self.manifest[key] for key in ("model", "device", "autocast_dtype", "preprocess_mode")}
        with staged_export(out_dir, overwrite, compress, self._frames, self.frame_sources) as writer:
            for name, layer in self._layers.items():
                args, tokens = encode_captured(
                    layer.as_captured(), self._plan.layer_meta(layer.ref, layer.extra), precision
                )
                writer.write_layer(name, *args, **tokens)
            if self.geometry is not None:
                writer.write_geometry(self.geometry, geometry_meta(self._scene))
            writer.write_manifest({"image_set_name": out_dir.name} | fields)
        return out_dir


def capture_attention(
    model: nn.Module,
    images: Tensor,
    options: ExportOptions,
    *,
    sources: list[str] | None = None,
    preprocess_mode: str | None = None,
    scene: str | os.PathLike[str] | None = None,
    autocast_dtype: torch.dtype | str | None = "auto",
    progress: bool = False,
) -> CapturedAttention:
    """Run the aggregator once over ``images`` and keep every captured layer in memory.

    The arguments are those of :func:`vggt.export.export_attention`, without the output folder; see
    :func:`vggt.capture_attention` for the friendlier form.
    """
    plan = plan_capture(model, images, options, sources, scene, preprocess_mode)
    autocast_dtype = resolve_autocast(model, autocast_dtype)
    layers: list[_Layer] = []
    with PassProgress(model, plan, progress, writing=False) as bar:
        rollout, geometry = run_capture(
            model, images, plan, lambda captured: layers.append(_Layer.copy_of(captured)), autocast_dtype, bar
        )
    if rollout is not None:
        layers.append(_Layer.copy_of(*rollout))
    manifest = {
        "model": getattr(model, "weights_source", None),
        "preprocess_mode": preprocess_mode,
        **run_fields(model, autocast_dtype),
    }
    return CapturedAttention(plan, layers, to_uint8_frames(images), manifest, geometry, scene)


__all__ = ["CapturedAttention", "capture_attention", "ExportError"]
