"""The one writer of the format: frames, then one layer at a time, then the manifest."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vggt import __version__
from vggt.attn_format.geometry import write_geometry
from vggt.attn_format.npz import write_npz
from vggt.attn_format.quantization import VMAX_ESTIMATOR
from vggt.attn_format.schema import (
    ATTN_DIR_NAME,
    BLOCK_KINDS,
    DERIVED_LAYER_KEYS,
    FORMAT_NAME,
    GRID_KEYS,
    HEATMAPS_KEY,
    IMAGES_DIR_NAME,
    LAYER_KINDS,
    MANIFEST_NAME,
    NPZ_NAME_BY_DTYPE,
    PATCH_SIZE,
    ROLLOUT_KIND,
    SCHEMA_VERSION,
    SPECIAL_MASS_KEY,
    TOKEN_HEATMAPS_KEY,
    TOKEN_SPECIAL_MASS_KEY,
    FormatError,
    check_dtype_shape,
    check_layer_meta,
    default_normalization,
    json_equal,
    layer_sort_key,
    query_grid_shape,
    special_token_names,
    write_json_atomic,
)

# The manifest's ``model`` object where nothing is known about the weights.
UNKNOWN_MODEL = {
    "id": None,
    "revision": None,
    "checkpoint_file": None,
    "checkpoint_sha256": None,
    "random_weights": False,
    "random_seed": None,
}


def layer_fields(
    kind: str,
    number: int | None,
    key_frames: int,
    special_tokens: Sequence[str],
    token_frames: Sequence[int],
    scales: dict,
    token_scales: dict | None = None,
) -> dict:
    """The metadata that says what a layer is; :meth:`ExportWriter.write_layer` derives the rest.

    Parameters
    ----------
    kind : str
        One of :data:`~vggt.attn_format.schema.LAYER_KINDS`.
    number : int or None
        1-based layer number within its kind; ``None`` for the rollout.
    key_frames : int
        Frames the layer attends to: frames ``0 .. key_frames - 1``.
    special_tokens : sequence of str
        Names of a frame's special tokens in model order; the first (camera or class token) is the
        token that the token queries are.
    token_frames : sequence of int
        Frames whose first special token is a query too (the rows of the token maps); empty for none.
    scales, token_scales : dict
        The maps' and the token maps' scale fields (:func:`~vggt.attn_format.quantization.scale_fields`).
    """
    if kind not in LAYER_KINDS:
        raise FormatError(f"unknown layer kind {kind!r}: use one of {', '.join(LAYER_KINDS)}")
    numbered = kind != ROLLOUT_KIND
    token_scales = token_scales or {}
    return scales | {
        "layer_kind": kind,
        "layer_index": number if numbered else None,
        "block_index": number - 1 if numbered else None,
        "key_frames": list(range(key_frames)),
        "special_tokens": list(special_tokens),
        "token_queries": [{"token": special_tokens[0], "frame": int(frame)} for frame in token_frames],
        "token_vmax99": token_scales.get("layer_vmax99"),
        "token_per_head_vmax99": token_scales.get("per_head_vmax99"),
    }


class ExportWriter:
    """Writes an export folder one layer at a time, as a forward pass produces the layers.

    Parameters
    ----------
    root : Path
        The export folder (``<out>``); ``images/`` and ``attn_maps/`` are created inside it.
    compress : bool
        Write deflated NPZ files (smaller to share). The default writes them stored, so that a reader
        can memory-map one query's maps.

    Notes
    -----
    The writer keeps only small dictionaries between calls: frame paths, the sources and one manifest
    entry per layer. Call :meth:`write_frames` first, then :meth:`write_layer` per layer, then
    :meth:`write_manifest`.
    """

    def __init__(self, root: Path, compress: bool = False) -> None:
        self.root = Path(root)
        self.attn_dir = self.root / ATTN_DIR_NAME
        self.images_dir = self.root / IMAGES_DIR_NAME
        self.compress = compress
        self.attn_dir.mkdir(parents=True, exist_ok=True)
        self._image_paths: list[str] | None = None
        self._sources: list[str] | None = None
        self._image_size: list[int] | None = None
        self._layers: dict[str, dict] = {}  # name -> manifest entry
        self._summaries: dict[str, dict] = {}  # name -> fields the manifest repeats
        self._geometry: dict | None = None  # the manifest's geometry entry, once written
        self._geometry_queries = 0

    def write_frames(self, frames: np.ndarray, sources: Sequence[str]) -> list[str]:
        """Save the frames exactly as the model saw them, as ``images/frame_XX.png``.

        Parameters
        ----------
        frames : np.ndarray
            ``[S, H, W, 3] uint8`` RGB frames in model order (frame 0 is the query frame).
        sources : sequence of str
            Original file name of each frame, model order.

        Returns
        -------
        list of str
            Image paths relative to ``attn_maps/`` (``"../images/frame_00.png"``, ...).
        """
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise FormatError(f"frames must be uint8 [S, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        if len(sources) != frames.shape[0]:
            raise FormatError(f"{frames.shape[0]} frames but {len(sources)} source names")
        self.images_dir.mkdir(parents=True, exist_ok=True)
        relative_paths = []
        for index, frame in enumerate(frames):
            file_name = f"frame_{index:02d}.png"
            Image.fromarray(np.ascontiguousarray(frame), mode="RGB").save(self.images_dir / file_name)
            relative_paths.append(f"../{IMAGES_DIR_NAME}/{file_name}")
        self._image_paths = relative_paths
        self._sources = [str(Path(s).name) for s in sources]
        self._image_size = [int(frames.shape[1]), int(frames.shape[2])]
        return list(relative_paths)

    def write_layer(
        self,
        name: str,
        heatmaps: np.ndarray,
        special_mass: np.ndarray,
        meta: dict,
        token_heatmaps: np.ndarray | None = None,
        token_special_mass: np.ndarray | None = None,
    ) -> dict:
        """Write one layer's NPZ and metadata JSON.

        Parameters
        ----------
        name : str
            Layer name: ``"layer_01"`` (global layers of a global-only export), ``"global_01"``,
            ``"frame_01"``, ``"dino_01"`` or ``"rollout"``.
        heatmaps : np.ndarray
            ``[Q, K, H_ds, W_ds]`` (averaged) or ``[Q, heads, K, H_ds, W_ds]`` (per head), uint8 codes or
            float16 raw probabilities; K key frames (``meta["key_frames"]``, all S frames by default).
        special_mass : np.ndarray
            ``[Q, K, n_special]`` or ``[Q, heads, K, n_special]`` float16: probability mass sent to each
            key frame's special tokens (camera or class token, registers).
        meta : dict
            At least ``layer_index``, ``block_index`` (``None`` for the rollout), ``H_p``, ``W_p``,
            ``stride_h``, ``stride_w`` and, for uint8, ``layer_vmax99`` (plus ``per_head_vmax99`` when
            head-normalized). Other fields of the schema may be given; derivable ones (shapes, dtype,
            paths, grid) are filled in.
        token_heatmaps, token_special_mass : np.ndarray, optional
            The same for the special-token queries listed in ``meta["token_queries"]``, with their own
            scales ``token_vmax99`` / ``token_per_head_vmax99``.

        Returns
        -------
        dict
            The full metadata as written to ``<name>_metadata.json``.
        """
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise FormatError(f"bad layer name {name!r}")
        if (token_heatmaps is None) != (token_special_mass is None):
            raise FormatError(f"layer {name}: token maps and token special mass go together")
        arrays = {HEATMAPS_KEY: np.asarray(heatmaps), SPECIAL_MASS_KEY: np.asarray(special_mass)}
        if token_heatmaps is not None:
            arrays[TOKEN_HEATMAPS_KEY] = np.asarray(token_heatmaps)
            arrays[TOKEN_SPECIAL_MASS_KEY] = np.asarray(token_special_mass)
        full = self._complete_layer_meta(name, arrays, meta)
        where = f"layer {name}"
        if bool(full["token_queries"]) != (token_heatmaps is not None):
            raise FormatError(f"{where}: token_queries must list exactly the rows of the token maps")
        check_layer_meta(full, where)
        for key, array in arrays.items():
            check_dtype_shape(array.dtype, array.shape, full, key, where)

        layer_dir = self.attn_dir / name
        layer_dir.mkdir(parents=True, exist_ok=True)
        npz_file = layer_dir / NPZ_NAME_BY_DTYPE[full["dtype"]]
        write_npz(npz_file, arrays, self.compress)

        metadata_name = f"{name}_metadata.json"
        write_json_atomic(self.attn_dir / metadata_name, full)
        self._layers[name] = {
            "name": name,
            "kind": full["layer_kind"],
            "index": full["block_index"],  # 0-based: the seed fork's meaning of its field
            "block_index": full["block_index"],
            "metadata_path": metadata_name,
        }
        summary_keys = ("per_head_data", "num_heads", "dtype", "layer_kind", *GRID_KEYS)
        self._summaries[name] = {key: full[key] for key in summary_keys}
        self._summaries[name]["rollout_discard_ratio"] = full.get("rollout_discard_ratio")
        return full

    def _complete_layer_meta(self, name: str, arrays: dict[str, np.ndarray], meta: dict) -> dict:
        missing = [
            key
            for key in ("layer_index", "block_index", "H_p", "W_p", "stride_h", "stride_w")
            if key not in meta
        ]
        if missing:
            raise FormatError(f"layer {name}: metadata lacks {', '.join(missing)}")
        heatmaps, special_mass = arrays[HEATMAPS_KEY], arrays[SPECIAL_MASS_KEY]
        dtype_name = heatmaps.dtype.name
        if dtype_name not in NPZ_NAME_BY_DTYPE:
            raise FormatError(f"layer {name}: heatmaps must be uint8 or float16, got {heatmaps.dtype}")
        per_head = len(heatmaps.shape) == 5
        H_ds, W_ds = query_grid_shape(
            int(meta["H_p"]), int(meta["W_p"]), int(meta["stride_h"]), int(meta["stride_w"])
        )
        patch_size = int(meta.get("patch_size", PATCH_SIZE))
        image_size = (
            meta.get("image_size")
            or self._image_size
            or [int(meta["H_p"]) * patch_size, int(meta["W_p"]) * patch_size]
        )
        image_paths = meta.get("image_paths") or self._image_paths
        sources = meta.get("source_images") or self._sources
        if image_paths is None or sources is None:
            raise FormatError(f"layer {name}: call write_frames before write_layer (no image paths)")
        n_special = int(special_mass.shape[-1]) if special_mass.ndim >= 1 else 0

        def index_or_none(key: str) -> int | None:
            return None if meta[key] is None else int(meta[key])

        full: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "layer_name": name,
            "layer_kind": meta.get("layer_kind", "global"),
            "layer_index": index_or_none("layer_index"),
            "block_index": index_or_none("block_index"),
            "npz_path": f"{name}/{NPZ_NAME_BY_DTYPE[dtype_name]}",
            "dtype": dtype_name,
            **{f"{key}_shape": [int(n) for n in array.shape] for key, array in arrays.items()},
            "special_tokens": meta.get("special_tokens") or special_token_names(n_special),
            "Q": H_ds * W_ds,
            "S": len(image_paths),
            "key_frames": [int(f) for f in meta.get("key_frames", range(len(image_paths)))],
            "H_p": int(meta["H_p"]),
            "W_p": int(meta["W_p"]),
            "H_ds": H_ds,
            "W_ds": W_ds,
            "stride_h": int(meta["stride_h"]),
            "stride_w": int(meta["stride_w"]),
            "patch_size": patch_size,
            "image_size": [int(n) for n in image_size],
            "query_frame": int(meta.get("query_frame", 0)),
            "query_source": meta.get("query_source", sources[0] if sources else None),
            "token_queries": list(meta.get("token_queries", [])),
            "per_head_data": per_head,
            "num_heads": meta.get("num_heads", int(heatmaps.shape[1]) if per_head else None),
            "layer_vmax99": meta.get("layer_vmax99"),
            "per_head_vmax99": meta.get("per_head_vmax99"),
            "token_vmax99": meta.get("token_vmax99"),
            "token_per_head_vmax99": meta.get("token_per_head_vmax99"),
            "normalized_by": meta.get("normalized_by", default_normalization(dtype_name, per_head, meta)),
            "vmax_estimator": meta.get("vmax_estimator", VMAX_ESTIMATOR),
            "image_paths": list(image_paths),
            "source_images": list(sources),
        }
        for key, value in meta.items():
            if key in DERIVED_LAYER_KEYS and key in full and not json_equal(full[key], value):
                raise FormatError(
                    f"layer {name}: metadata says {key}={value!r} but the arrays give {full[key]!r}"
                )
            full.setdefault(key, value)
        for key in ("layer_vmax99", "token_vmax99"):  # scales as plain JSON numbers
            if full[key] is not None:
                full[key] = float(full[key])
        for key in ("per_head_vmax99", "token_per_head_vmax99"):
            if full[key] is not None:
                full[key] = [float(v) for v in full[key]]
        if full["num_heads"] is not None:
            full["num_heads"] = int(full["num_heads"])
        return full

    def write_geometry(self, arrays: dict[str, np.ndarray], meta: dict) -> dict:
        """Write the export's ``geometry/`` part and list it in the manifest to come.

        See :func:`vggt.attn_format.geometry.write_geometry` for ``arrays`` and ``meta``; the arrays'
        frame count and size must be those of :meth:`write_frames`. Returns the manifest entry.
        """
        if self._image_size is None or self._sources is None:
            raise FormatError("call write_frames before write_geometry")
        depth_shape = list(np.shape(arrays.get("depth")))
        if depth_shape != [len(self._sources), *self._image_size]:
            raise FormatError(
                f"geometry depth is {depth_shape}, the frames are {[len(self._sources), *self._image_size]}"
            )
        self._geometry = write_geometry(self.root, arrays, meta, self.compress)
        self._geometry_queries = len(arrays["query_points"])
        return dict(self._geometry)

    def write_manifest(self, manifest: dict) -> Path:
        """Write ``attn_maps/layers_manifest.json``.

        Parameters
        ----------
        manifest : dict
            Export-wide fields (``image_set_name``, ``model``, ``preprocess_mode``, ``first_image_idx``,
            ...). ``schema_version``, ``format`` and ``layers`` (the layers written, by kind then
            number) are set here. Filled in when absent: ``image_set_name`` (the folder's name),
            ``model`` (each of its fields: :data:`UNKNOWN_MODEL`), ``preprocess_mode`` (null),
            ``first_image_idx`` (0), ``created``, ``tool``, ``query_frame``, ``frames``, ``grid``,
            ``per_head_data``, ``num_heads``, ``precision``, ``compressed``, ``blocks`` and ``rollout``
            (from the layers written).

        Returns
        -------
        Path
            The manifest file.
        """
        if not self._layers:
            raise FormatError("write at least one layer before the manifest")
        layers = sorted(self._layers.values(), key=lambda e: layer_sort_key(e["kind"], e["index"]))
        first = self._summaries[layers[0]["name"]]
        if self._geometry is not None and self._geometry_queries != first["Q"]:
            raise FormatError(
                f"geometry holds {self._geometry_queries} query points, the layers {first['Q']}"
            )
        full: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "format": FORMAT_NAME}
        full.update({k: v for k, v in manifest.items() if k not in ("schema_version", "format", "layers")})
        full.setdefault(
            "created", datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        )
        full.setdefault("tool", {"name": "vggt-attn", "version": __version__})
        full.setdefault("query_frame", 0)
        if "frames" not in full and self._image_paths is not None:
            full["frames"] = [
                {"frame": i, "image_path": path, "source": source}
                for i, (path, source) in enumerate(zip(self._image_paths, self._sources or [], strict=True))
            ]
        full.setdefault("grid", {key: first[key] for key in GRID_KEYS})
        full.setdefault("per_head_data", first["per_head_data"])
        full.setdefault("num_heads", first["num_heads"])
        full.setdefault("precision", first["dtype"])
        full.setdefault("compressed", self.compress)
        full.setdefault("image_set_name", self.root.name)
        full["model"] = UNKNOWN_MODEL | dict(full.get("model") or {})
        full.setdefault("preprocess_mode", None)
        full.setdefault("first_image_idx", 0)
        kinds = {summary["layer_kind"] for summary in self._summaries.values()}
        full.setdefault("blocks", [kind for kind in BLOCK_KINDS if kind in kinds])
        rollout = [layer for layer in self._summaries.values() if layer["layer_kind"] == ROLLOUT_KIND]
        full.setdefault(
            "rollout", {"discard_ratio": rollout[0]["rollout_discard_ratio"]} if rollout else None
        )
        full.setdefault("geometry", self._geometry)
        full["layers"] = [dict(layer) for layer in layers]
        path = self.attn_dir / MANIFEST_NAME
        write_json_atomic(path, full)
        return path
