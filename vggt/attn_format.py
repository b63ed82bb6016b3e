"""On-disk format of an attention export: the one writer and the one reader.

An export is a folder::

    <out>/images/frame_00.png ...                   frames as the model saw them, model order
    <out>/attn_maps/layers_manifest.json            what the export holds (see ``attn_maps_schema.md``)
    <out>/attn_maps/layer_01/heatmaps_uint8.npz     keys "heatmaps" and "special_mass"
    <out>/attn_maps/layer_01_metadata.json          everything needed to read that layer

Every path written inside a JSON file is relative to the ``attn_maps/`` folder, so a moved or zipped
export opens as is. The reader also opens exports written by the seed fork's exporter (no special-token
mass, absolute or cwd-relative paths, possibly no ``images/`` folder).

This module depends on numpy and Pillow only: it must never import torch, so that a shared export opens
fast on a machine without it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import shutil
import stat
import struct
import tempfile
import threading
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vggt import __version__
from vggt.quantize import UINT8_MAX, VMAX_ESTIMATOR

SCHEMA_VERSION = 1
FORMAT_NAME = "vggt-attn-maps"
SEED_FORMAT_NAME = "vggt-attn-maps-seed"
MANIFEST_NAME = "layers_manifest.json"
ATTN_DIR_NAME = "attn_maps"
IMAGES_DIR_NAME = "images"
HEATMAPS_KEY = "heatmaps"
SPECIAL_MASS_KEY = "special_mass"
NPZ_NAME_BY_DTYPE = {"uint8": "heatmaps_uint8.npz", "float16": "heatmaps_raw_float16.npz"}
PATCH_SIZE = 14
_GRID_KEYS = ("H_p", "W_p", "stride_h", "stride_w", "H_ds", "W_ds", "Q", "patch_size")

# Seed exports spell the normalization after the metadata key that holds the scale.
_SEED_NORMALIZED_BY = {"per_head_vmax99": "head", "layer_vmax99": "layer"}
_NORMALIZATIONS = ("layer", "head", "none")
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"


class FormatError(ValueError):
    """An export, or a file in it, that cannot be read as the format says (one-line message)."""

    def __init__(self, message: str) -> None:
        # Messages quote foreign text (zip, numpy, JSON errors); keep them on one line.
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------------------
# Grid and quantization helpers shared by the exporter, the reader and the tests.
# --------------------------------------------------------------------------------------------------------


def query_grid_shape(H_p: int, W_p: int, stride_h: int, stride_w: int) -> tuple[int, int]:
    """Size of the strided query grid, which is also the pooled key grid of every frame.

    Parameters
    ----------
    H_p, W_p : int
        Patch grid of a frame (image height and width divided by the patch size).
    stride_h, stride_w : int
        Query stride along rows and columns, at least 1.

    Returns
    -------
    tuple of int
        ``(H_ds, W_ds) = (ceil(H_p / stride_h), ceil(W_p / stride_w))``.
    """
    if stride_h < 1 or stride_w < 1:
        raise FormatError(f"strides must be at least 1, got stride_h={stride_h}, stride_w={stride_w}")
    return math.ceil(H_p / stride_h), math.ceil(W_p / stride_w)


def special_token_names(n_special: int) -> list[str]:
    """Names of a frame's special tokens in model order: ``["camera", "register_1", ...]``."""
    return ["camera"] + [f"register_{i}" for i in range(1, n_special)]


# --------------------------------------------------------------------------------------------------------
# Small JSON and path utilities.
# --------------------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def _write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, default=_json_default)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot read {what} {path.name}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(
            f"malformed JSON in {what} {path.name}: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise FormatError(f"{what} {path.name} must hold a JSON object, found {type(data).__name__}")
    return data


def _is_inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------
# Writer.
# --------------------------------------------------------------------------------------------------------


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
        self._layers: list[dict] = []
        self._layer_metas: list[dict] = []

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

    def write_layer(self, name: str, heatmaps: np.ndarray, special_mass: np.ndarray, meta: dict) -> dict:
        """Write one layer's NPZ and metadata JSON.

        Parameters
        ----------
        name : str
            Layer name, ``"layer_01"`` (1-based) for global layers.
        heatmaps : np.ndarray
            ``[Q, S, H_ds, W_ds]`` (averaged) or ``[Q, heads, S, H_ds, W_ds]`` (per head), uint8 codes or
            float16 raw probabilities.
        special_mass : np.ndarray
            ``[Q, S, n_special]`` or ``[Q, heads, S, n_special]`` float16: probability mass sent to each
            frame's special tokens (camera, registers).
        meta : dict
            At least ``layer_index``, ``block_index``, ``H_p``, ``W_p``, ``stride_h``, ``stride_w`` and, for
            uint8, ``layer_vmax99`` (plus ``per_head_vmax99`` when head-normalized). Other fields of
            the schema may be given; derivable ones (shapes, dtype, paths, grid) are filled in.

        Returns
        -------
        dict
            The full metadata as written to ``<name>_metadata.json``.
        """
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise FormatError(f"bad layer name {name!r}")
        heatmaps = np.asarray(heatmaps)
        special_mass = np.asarray(special_mass)
        full = self._complete_layer_meta(name, heatmaps, special_mass, meta)
        _check_layer_meta(full, where=f"layer {name}")
        _check_array(heatmaps, full, HEATMAPS_KEY, where=f"layer {name}")
        _check_array(special_mass, full, SPECIAL_MASS_KEY, where=f"layer {name}")

        layer_dir = self.attn_dir / name
        layer_dir.mkdir(parents=True, exist_ok=True)
        npz_file = layer_dir / NPZ_NAME_BY_DTYPE[full["dtype"]]
        tmp = npz_file.with_name(npz_file.name + ".tmp")
        save = np.savez_compressed if self.compress else np.savez
        with open(tmp, "wb") as handle:
            save(handle, **{HEATMAPS_KEY: heatmaps, SPECIAL_MASS_KEY: special_mass})
        os.replace(tmp, npz_file)

        metadata_name = f"{name}_metadata.json"
        _write_json_atomic(self.attn_dir / metadata_name, full)
        entry = {
            "name": name,
            "kind": full["layer_kind"],
            "index": full["layer_index"],
            "block_index": full["block_index"],
            "metadata_path": metadata_name,
        }
        self._layers = [layer for layer in self._layers if layer["name"] != name] + [entry]
        summary_keys = ("per_head_data", "num_heads", "dtype", *_GRID_KEYS)
        summary = {key: full[key] for key in summary_keys} | {"layer_name": name}
        self._layer_metas = [m for m in self._layer_metas if m["layer_name"] != name] + [summary]
        return full

    def _complete_layer_meta(
        self, name: str, heatmaps: np.ndarray, special_mass: np.ndarray, meta: dict
    ) -> dict:
        missing = [
            key
            for key in ("layer_index", "block_index", "H_p", "W_p", "stride_h", "stride_w")
            if key not in meta
        ]
        if missing:
            raise FormatError(f"layer {name}: metadata lacks {', '.join(missing)}")
        dtype_name = heatmaps.dtype.name
        if dtype_name not in NPZ_NAME_BY_DTYPE:
            raise FormatError(f"layer {name}: heatmaps must be uint8 or float16, got {heatmaps.dtype}")
        per_head = heatmaps.ndim == 5
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
        full: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "layer_name": name,
            "layer_kind": meta.get("layer_kind", "global"),
            "layer_index": int(meta["layer_index"]),
            "block_index": int(meta["block_index"]),
            "npz_path": f"{name}/{NPZ_NAME_BY_DTYPE[dtype_name]}",
            "dtype": dtype_name,
            "heatmaps_shape": [int(n) for n in heatmaps.shape],
            "special_mass_shape": [int(n) for n in special_mass.shape],
            "special_tokens": meta.get("special_tokens") or special_token_names(n_special),
            "Q": H_ds * W_ds,
            "S": len(image_paths),
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
            "per_head_data": per_head,
            "num_heads": meta.get("num_heads", int(heatmaps.shape[1]) if per_head else None),
            "layer_vmax99": meta.get("layer_vmax99"),
            "per_head_vmax99": meta.get("per_head_vmax99"),
            "normalized_by": meta.get("normalized_by", _default_normalization(dtype_name, per_head, meta)),
            "vmax_estimator": meta.get("vmax_estimator", VMAX_ESTIMATOR),
            "image_paths": list(image_paths),
            "source_images": list(sources),
        }
        for key, value in meta.items():
            if key in _DERIVED_LAYER_KEYS and key in full and not _json_equal(full[key], value):
                raise FormatError(
                    f"layer {name}: metadata says {key}={value!r} but the arrays give {full[key]!r}"
                )
            full.setdefault(key, value)
        if full["layer_vmax99"] is not None:
            full["layer_vmax99"] = float(full["layer_vmax99"])
        if full["per_head_vmax99"] is not None:
            full["per_head_vmax99"] = [float(v) for v in full["per_head_vmax99"]]
        if full["num_heads"] is not None:
            full["num_heads"] = int(full["num_heads"])
        return full

    def write_manifest(self, manifest: dict) -> Path:
        """Write ``attn_maps/layers_manifest.json``.

        Parameters
        ----------
        manifest : dict
            Export-wide fields (``image_set_name``, ``model``, ``preprocess_mode``, ``first_image_idx``,
            ...). ``schema_version``, ``format`` and ``layers`` (the layers written, in order) are set here;
            ``created``, ``tool``, ``query_frame``, ``frames``, ``grid``, ``per_head_data``,
            ``num_heads``, ``precision`` and ``compressed`` are filled in when absent.

        Returns
        -------
        Path
            The manifest file.
        """
        if not self._layers:
            raise FormatError("write at least one layer before the manifest")
        first = self._layer_metas[0]
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
        full.setdefault(
            "grid",
            {key: first[key] for key in _GRID_KEYS},
        )
        full.setdefault("per_head_data", first["per_head_data"])
        full.setdefault("num_heads", first["num_heads"])
        full.setdefault("precision", first["dtype"])
        full.setdefault("compressed", self.compress)
        missing = [
            k for k in ("image_set_name", "model", "preprocess_mode", "first_image_idx") if k not in full
        ]
        if missing:
            raise FormatError(f"manifest lacks {', '.join(missing)}")
        full["layers"] = [dict(layer) for layer in self._layers]
        path = self.attn_dir / MANIFEST_NAME
        _write_json_atomic(path, full)
        return path


_DERIVED_LAYER_KEYS = (
    "dtype",
    "heatmaps_shape",
    "special_mass_shape",
    "Q",
    "S",
    "H_ds",
    "W_ds",
    "per_head_data",
)


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON would store it (tuples and lists alike, numpy scalars as Python numbers)."""
    return json.dumps(a, default=_json_default) == json.dumps(b, default=_json_default)


def _default_normalization(dtype_name: str, per_head: bool, meta: dict) -> str:
    if dtype_name == "float16":
        return "none"
    return "head" if per_head and meta.get("per_head_vmax99") is not None else "layer"


# --------------------------------------------------------------------------------------------------------
# Metadata and array checks shared by writer and reader.
# --------------------------------------------------------------------------------------------------------


def _expected_shape(meta: dict, key: str) -> tuple[int, ...] | None:
    Q, S = meta["Q"], meta["S"]
    heads = (meta["num_heads"],) if meta["per_head_data"] else ()
    if key == HEATMAPS_KEY:
        return (Q, *heads, S, meta["H_ds"], meta["W_ds"])
    n_special = len(meta.get("special_tokens") or [])
    if not n_special:
        return None
    return (Q, *heads, S, n_special)


def _check_layer_meta(meta: dict, where: str) -> None:
    """Consistency of one layer's (normalized) metadata with itself; raises FormatError."""
    for key in ("Q", "S", "H_ds", "W_ds", "stride_h", "stride_w"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FormatError(f"{where}: metadata field {key} must be a positive integer, got {value!r}")
    if meta["Q"] != meta["H_ds"] * meta["W_ds"]:
        raise FormatError(f"{where}: Q={meta['Q']} but H_ds*W_ds={meta['H_ds'] * meta['W_ds']}")
    if meta.get("H_p") is not None and meta.get("W_p") is not None:
        grid = query_grid_shape(meta["H_p"], meta["W_p"], meta["stride_h"], meta["stride_w"])
        if grid != (meta["H_ds"], meta["W_ds"]):
            raise FormatError(
                f"{where}: H_ds x W_ds = {meta['H_ds']}x{meta['W_ds']} disagrees with the patch grid "
                f"{meta['H_p']}x{meta['W_p']} and strides {meta['stride_h']},{meta['stride_w']} "
                f"(expected {grid[0]}x{grid[1]})"
            )
    if meta["dtype"] not in NPZ_NAME_BY_DTYPE:
        raise FormatError(f"{where}: dtype must be uint8 or float16, got {meta['dtype']!r}")
    if meta["normalized_by"] not in _NORMALIZATIONS:
        raise FormatError(
            f"{where}: normalized_by must be one of {_NORMALIZATIONS}, got {meta['normalized_by']!r}"
        )
    if meta["dtype"] == "float16" and meta["normalized_by"] != "none":
        raise FormatError(f"{where}: float16 maps are raw probabilities, normalized_by must be 'none'")
    if meta["dtype"] == "uint8" and meta["normalized_by"] == "none":
        raise FormatError(f"{where}: uint8 maps need a scale, normalized_by cannot be 'none'")
    if meta["per_head_data"]:
        heads = meta.get("num_heads")
        if not isinstance(heads, int) or heads < 1:
            raise FormatError(f"{where}: per-head data needs a positive num_heads, got {heads!r}")
    if meta["normalized_by"] == "head":
        scales = meta.get("per_head_vmax99")
        if not meta["per_head_data"]:
            raise FormatError(f"{where}: normalized_by 'head' needs per-head data")
        if not isinstance(scales, list) or len(scales) != meta["num_heads"]:
            raise FormatError(
                f"{where}: per_head_vmax99 must list {meta['num_heads']} values, got {scales!r}"
            )
        if not all(_is_positive_number(v) for v in scales):
            raise FormatError(f"{where}: per_head_vmax99 values must be positive numbers")
    if meta["normalized_by"] == "layer" and not _is_positive_number(meta.get("layer_vmax99")):
        raise FormatError(
            f"{where}: layer_vmax99 must be a positive number, got {meta.get('layer_vmax99')!r}"
        )


def _is_positive_number(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _check_dtype_shape(dtype: np.dtype, shape: tuple[int, ...], meta: dict, key: str, where: str) -> None:
    if dtype.hasobject:
        raise FormatError(f"{where}: NPZ member {key!r} holds Python objects (refused, never unpickled)")
    expected_dtype = meta["dtype"] if key == HEATMAPS_KEY else "float16"
    if dtype.name != expected_dtype:
        raise FormatError(f"{where}: {key} has dtype {dtype.name}, metadata says {expected_dtype}")
    expected = _expected_shape(meta, key)
    recorded = meta.get(f"{key}_shape")
    if recorded is not None and list(shape) != list(recorded):
        raise FormatError(f"{where}: {key} has shape {list(shape)}, metadata says {list(recorded)}")
    if expected is not None and tuple(shape) != expected:
        raise FormatError(f"{where}: {key} has shape {list(shape)}, metadata says {list(expected)}")
    if expected is None and key == SPECIAL_MASS_KEY and len(shape) != (5 if meta["per_head_data"] else 4) - 1:
        raise FormatError(f"{where}: {key} has shape {list(shape)}, not [Q, (heads,) S, n_special]")


def _check_array(array: np.ndarray, meta: dict, key: str, where: str) -> None:
    _check_dtype_shape(array.dtype, array.shape, meta, key, where)


# --------------------------------------------------------------------------------------------------------
# NPZ members: memory-mapped when stored, decompressed once when deflated.
# --------------------------------------------------------------------------------------------------------


# What zipfile, zlib and numpy's header parser raise on damaged bytes (the header is parsed as a
# Python literal, hence the tokenizer and syntax errors).
_DAMAGED_DATA_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    ValueError,
    EOFError,
    OSError,
    SyntaxError,
    tokenize.TokenError,
    struct.error,
)


@dataclass(frozen=True)
class _NpyMember:
    """Where one ``.npy`` member of an NPZ lives and what its header says."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    stored: bool
    data_offset: int  # absolute file offset of the array bytes; only meaningful when stored


def _read_npy_header(handle: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(handle)
    except _DAMAGED_DATA_ERRORS as exc:
        raise FormatError(f"{where}: bad .npy header ({type(exc).__name__}: {exc})"[:300]) from None
    raise FormatError(f"{where}: unsupported .npy format version {version}")


def _scan_npz(path: Path, where: str) -> dict[str, _NpyMember]:
    """Read the zip directory and every member's ``.npy`` header, without reading array data."""
    members: dict[str, _NpyMember] = {}
    file_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[: -len(".npy")]
                stored = info.compress_type == zipfile.ZIP_STORED
                if stored:
                    raw.seek(info.header_offset)
                    header = raw.read(_ZIP_LOCAL_HEADER.size)
                    if len(header) < _ZIP_LOCAL_HEADER.size:
                        raise FormatError(f"{where}: truncated NPZ {path.name}")
                    fields = _ZIP_LOCAL_HEADER.unpack(header)
                    if fields[0] != _ZIP_LOCAL_SIGNATURE:
                        raise FormatError(f"{where}: NPZ {path.name} has a corrupt member header")
                    name_length, extra_length = fields[-2], fields[-1]
                    member_start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length
                    raw.seek(member_start)
                    shape, fortran_order, dtype = _read_npy_header(raw, where)
                    data_offset = raw.tell()
                else:
                    with archive.open(info) as stream:
                        shape, fortran_order, dtype = _read_npy_header(stream, where)
                    data_offset = -1
                if dtype.hasobject:
                    raise FormatError(
                        f"{where}: NPZ member {key!r} holds Python objects (refused, never unpickled)"
                    )
                if stored:
                    needed = data_offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    if needed > file_size:
                        raise FormatError(
                            f"{where}: truncated NPZ {path.name} ({file_size} of {needed} bytes)"
                        )
                members[key] = _NpyMember(key, dtype, tuple(shape), fortran_order, stored, data_offset)
    except FormatError:
        raise
    except zipfile.BadZipFile as exc:
        raise FormatError(
            f"{where}: {path.name} is not a readable NPZ ({exc}); truncated or corrupt?"
        ) from None
    except _DAMAGED_DATA_ERRORS as exc:
        raise FormatError(
            f"{where}: cannot read NPZ {path.name} ({type(exc).__name__}: {exc})"[:300]
        ) from None
    return members


def _load_member(path: Path, member: _NpyMember, where: str) -> np.ndarray:
    if member.stored:
        order = "F" if member.fortran_order else "C"
        if int(np.prod(member.shape, dtype=np.int64)) == 0:
            return np.zeros(member.shape, dtype=member.dtype)
        return np.memmap(
            path, dtype=member.dtype, mode="r", offset=member.data_offset, shape=member.shape, order=order
        )
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{member.key}.npy") as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)
    except _DAMAGED_DATA_ERRORS as exc:
        message = f"{where}: cannot decompress {member.key} from {path.name} ({type(exc).__name__}: {exc})"
        raise FormatError(message[:300]) from None


# --------------------------------------------------------------------------------------------------------
# Zip archives of whole exports.
# --------------------------------------------------------------------------------------------------------

_zip_cache: dict[tuple[str, int, int], Path] = {}
_zip_lock = threading.Lock()


def _cleanup_zip_cache() -> None:
    for folder in _zip_cache.values():
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(_cleanup_zip_cache)


def _extract_zip_safely(zip_path: Path) -> Path:
    """Extract an export's zip once per (path, size, mtime) into a private temporary folder.

    Entries with absolute paths, ``..`` components, drive letters or symlink modes are refused.
    """
    status = zip_path.stat()
    cache_key = (str(zip_path.resolve()), status.st_size, status.st_mtime_ns)
    with _zip_lock:
        cached = _zip_cache.get(cache_key)
        if cached is not None and cached.is_dir():
            return cached
        digest = hashlib.sha1(repr(cache_key).encode()).hexdigest()[:12]
        target = Path(tempfile.mkdtemp(prefix=f"vggt-attn-zip-{digest}-"))
        try:
            with zipfile.ZipFile(zip_path) as archive:
                for info in archive.infolist():
                    _check_zip_entry(info, zip_path.name)
                for info in archive.infolist():
                    destination = target.joinpath(*Path(info.filename.replace("\\", "/")).parts)
                    if info.is_dir():
                        destination.mkdir(parents=True, exist_ok=True)
                        continue
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as source, open(destination, "wb") as sink:
                        shutil.copyfileobj(source, sink, length=1 << 20)
        except zipfile.BadZipFile as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise FormatError(f"{zip_path.name} is not a readable zip ({exc})") from None
        except FormatError:
            shutil.rmtree(target, ignore_errors=True)
            raise
        except _DAMAGED_DATA_ERRORS as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise FormatError(f"cannot extract {zip_path.name} ({exc})") from None
        _zip_cache[cache_key] = target
        return target


def _check_zip_entry(info: zipfile.ZipInfo, archive_name: str) -> None:
    name = info.filename.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts or not parts:
        raise FormatError(
            f"{archive_name}: entry {info.filename!r} points outside the archive root (refused)"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise FormatError(f"{archive_name}: entry {info.filename!r} is a symlink (refused)")


def _find_attn_dir_in(folder: Path) -> Path:
    """The shallowest folder under ``folder`` holding a manifest (or, failing that, layer metadata)."""
    for pattern in (MANIFEST_NAME, "*_metadata.json"):
        hits = sorted(folder.rglob(pattern), key=lambda p: (len(p.parts), str(p)))
        if hits:
            return hits[0].parent
    raise FormatError(f"no {MANIFEST_NAME} or layer metadata found in {folder.name}")


# --------------------------------------------------------------------------------------------------------
# Reader.
# --------------------------------------------------------------------------------------------------------


def _existing_inside(candidate: Path, root: Path) -> Path | None:
    resolved = candidate.resolve()
    return resolved if _is_inside(resolved, root) and resolved.is_file() else None


def resolve_in_export(raw: str, base: Path, root: Path, lenient: bool, what: str) -> Path:
    """Resolve a path written in an export to an existing file inside the export.

    Parameters
    ----------
    raw : str
        The path as written, relative to ``base``.
    base : Path
        Folder the path is relative to (``attn_maps/``).
    root : Path
        The export folder (already resolved); a path that resolves outside it is refused, symlinks
        included.
    lenient : bool
        Seed exports: absolute and cwd-relative paths are matched by their trailing components under
        ``base``, ``root`` and ``root/images``. Current exports must hold exact relative paths.
    what : str
        Description used in error messages.

    Returns
    -------
    Path
        The resolved file.
    """
    if not isinstance(raw, str) or not raw:
        raise FormatError(f"{what}: path must be a non-empty string, got {raw!r}")
    written = Path(raw.replace("\\", "/"))
    direct = None if written.is_absolute() else base / written
    if direct is not None:
        found = _existing_inside(direct, root)
        if found is not None:
            return found
    points_outside = direct is None or not _is_inside(direct.resolve(), root)
    if lenient:
        parts = [p for p in written.parts if p not in ("/", "..", ".") and not p.endswith((":", ":/", ":\\"))]
        for start in range(len(parts)):
            tail = Path(*parts[start:])
            for folder in (base, root, root / IMAGES_DIR_NAME):
                found = _existing_inside(folder / tail, root)
                if found is not None:
                    return found
    if points_outside:
        raise FormatError(f"{what}: path {raw!r} points outside the export (refused)")
    raise FormatError(f"{what}: file {raw!r} not found in the export")


class AttnExport:
    """An opened export (see :func:`open_export`); reads lazily and caches what it has read.

    Attributes
    ----------
    root : Path
        The export folder; nothing outside it is ever read.
    attn_dir : Path
        The folder holding the manifest and layer metadata.
    manifest : dict
        The manifest, synthesized for a lone layer metadata file or a seed export.
    layer_names : list of str
        Layers in manifest order.
    frame_paths : list of Path or None
        Resolved frame image files, model order; ``None`` where a seed export's image lies outside it.
    frame_sources : list of str
        Original file name of each frame.
    is_seed : bool
        Written by the seed fork's exporter (no schema version).
    warnings : list of str
        Things the reader worked around (seed images not found, resized frames).
    """

    def __init__(
        self, root: Path, attn_dir: Path, manifest: dict, layer_files: dict[str, Path], is_seed: bool
    ):
        self.root = root
        self.attn_dir = attn_dir
        self.manifest = manifest
        self.is_seed = is_seed
        self.layer_names = list(layer_files)
        self.warnings: list[str] = []
        self._layer_files = layer_files
        self._meta: dict[str, dict] = {}
        self._npz_path: dict[str, Path] = {}
        self._members: dict[str, dict[str, _NpyMember]] = {}
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._frames: list[np.ndarray] | None = None
        self._lock = threading.Lock()
        for name in self.layer_names:
            self._meta[name] = self._load_layer_meta(name)
        first = self._meta[self.layer_names[0]]
        self.frame_sources: list[str] = list(first["source_images"])
        self.frame_paths: list[Path | None] = [
            self._resolve_image(p, i) for i, p in enumerate(first["image_paths"])
        ]
        self._fill_synthesized_manifest()

    # ---- paths ---------------------------------------------------------------------------------------

    def resolve(self, raw: str, base: Path, what: str) -> Path:
        """Resolve a path written in the export to a file inside it; see :func:`resolve_in_export`."""
        return resolve_in_export(raw, base, self.root, self.is_seed, what)

    def _resolve_image(self, raw: str, index: int) -> Path | None:
        try:
            return self.resolve(raw, self.attn_dir, f"frame {index} image")
        except FormatError:
            if not self.is_seed:
                raise
            self.warnings.append(
                f"frame {index}: image {raw!r} is not inside the export; showing a gray frame"
            )
            return None

    # ---- metadata ------------------------------------------------------------------------------------

    def _load_layer_meta(self, name: str) -> dict:
        path = self._layer_files[name]
        raw = _read_json(path, f"layer metadata of {name}")
        meta = _normalize_layer_meta(raw, name, self.is_seed)
        where = f"layer {name}"
        _check_layer_meta(meta, where)
        if len(meta["image_paths"]) != meta["S"]:
            raise FormatError(f"{where}: {len(meta['image_paths'])} image paths for S={meta['S']} frames")
        self._npz_path[name] = self.resolve(meta["npz_path"], self.attn_dir, f"{where} npz_path")
        return meta

    def _fill_synthesized_manifest(self) -> None:
        first = self._meta[self.layer_names[0]]
        manifest = self.manifest
        manifest.setdefault("query_frame", first["query_frame"])
        manifest.setdefault(
            "frames",
            [
                {"frame": i, "image_path": p, "source": s}
                for i, (p, s) in enumerate(zip(first["image_paths"], first["source_images"], strict=True))
            ],
        )
        manifest.setdefault(
            "grid",
            {key: first[key] for key in _GRID_KEYS},
        )
        manifest.setdefault("per_head_data", first["per_head_data"])
        manifest.setdefault("num_heads", first["num_heads"])
        manifest.setdefault("precision", first["dtype"])
        manifest.setdefault("model", {})

    def layer_meta(self, name: str) -> dict:
        """Metadata of one layer, normalized to the current schema (seed fields mapped)."""
        try:
            return self._meta[name]
        except KeyError:
            raise FormatError(
                f"no layer {name!r} in this export (has {', '.join(self.layer_names)})"
            ) from None

    @property
    def random_weights(self) -> bool:
        """Whether the manifest says the model had seeded random weights."""
        model = self.manifest.get("model") or {}
        return bool(isinstance(model, dict) and model.get("random_weights"))

    # ---- arrays --------------------------------------------------------------------------------------

    def _member_table(self, name: str) -> dict[str, _NpyMember]:
        table = self._members.get(name)
        if table is None:
            meta = self.layer_meta(name)
            where = f"layer {name}"
            table = _scan_npz(self._npz_path[name], where)
            if HEATMAPS_KEY not in table:
                raise FormatError(f"{where}: NPZ {self._npz_path[name].name} has no {HEATMAPS_KEY!r} array")
            for key, member in table.items():
                if key in (HEATMAPS_KEY, SPECIAL_MASS_KEY):
                    _check_dtype_shape(member.dtype, member.shape, meta, key, where)
            self._members[name] = table
        return table

    def _array(self, name: str, key: str) -> np.ndarray | None:
        cache_key = (name, key)
        array = self._arrays.get(cache_key)
        if array is not None:
            return array
        with self._lock:
            array = self._arrays.get(cache_key)
            if array is None:
                member = self._member_table(name).get(key)
                if member is None:
                    return None
                array = _load_member(self._npz_path[name], member, f"layer {name}")
                self._arrays[cache_key] = array
        return array

    def heatmaps(self, name: str) -> np.ndarray:
        """Stored maps of one layer: ``[Q, S, H_ds, W_ds]`` or ``[Q, heads, S, H_ds, W_ds]``.

        uint8 codes or float16 probabilities as stored; a ``np.memmap`` when the NPZ is uncompressed.
        """
        array = self._array(name, HEATMAPS_KEY)
        assert array is not None  # _member_table guarantees the member
        return array

    def special_mass(self, name: str) -> np.ndarray | None:
        """``[Q, S, n_special]`` or ``[Q, heads, S, n_special]`` float16, or ``None`` (seed exports)."""
        return self._array(name, SPECIAL_MASS_KEY)

    def head_scales(self, name: str) -> np.ndarray:
        """Dequantization factor per head, ``[heads]`` float32 (``[1]`` for averaged data).

        ``x = stored * factor``: ``vmax99 / 255`` for uint8 maps, 1 for raw float16 maps.
        """
        meta = self.layer_meta(name)
        heads = meta["num_heads"] if meta["per_head_data"] else 1
        if meta["normalized_by"] == "none":
            return np.ones(heads, dtype=np.float32)
        if meta["normalized_by"] == "head":
            return np.asarray(meta["per_head_vmax99"], dtype=np.float32) / np.float32(UINT8_MAX)
        return np.full(heads, meta["layer_vmax99"] / UINT8_MAX, dtype=np.float32)

    def _check_query(self, name: str, qi: int) -> dict:
        meta = self.layer_meta(name)
        if not 0 <= int(qi) < meta["Q"]:
            raise FormatError(f"query index {qi} out of range 0..{meta['Q'] - 1}")
        return meta

    def _check_head(self, meta: dict, head: int | None) -> None:
        if head is None:
            return
        if not meta["per_head_data"]:
            raise FormatError("this export has head-averaged maps only; no per-head data")
        if not 0 <= int(head) < meta["num_heads"]:
            raise FormatError(f"head index {head} out of range 0..{meta['num_heads'] - 1}")

    def query_maps(self, name: str, qi: int, head: int | None = None) -> np.ndarray:
        """Dequantized maps of one query as float32 probabilities.

        Parameters
        ----------
        name : str
            Layer name.
        qi : int
            Query index ``qr * W_ds + qc``.
        head : int, optional
            0-based head; only for per-head exports.

        Returns
        -------
        np.ndarray
            ``[S, H_ds, W_ds]`` float32 for averaged data or a chosen head, else
            ``[heads, S, H_ds, W_ds]`` float32 for per-head data.
        """
        meta = self._check_query(name, qi)
        self._check_head(meta, head)
        stored = self.heatmaps(name)
        scales = self.head_scales(name)
        if not meta["per_head_data"]:
            return np.multiply(stored[qi], scales[0], dtype=np.float32)
        if head is not None:
            return np.multiply(stored[qi, head], scales[head], dtype=np.float32)
        return np.multiply(stored[qi], scales[:, None, None, None], dtype=np.float32)

    def key_maps(self, name: str, frame: int, row: int, col: int, head: int | None = None) -> np.ndarray:
        """Reverse view: how much each query sends to key cell ``(row, col)`` of ``frame``.

        Returns
        -------
        np.ndarray
            ``[H_ds, W_ds]`` float32 over the query grid for averaged data or a chosen head, else
            ``[heads, H_ds, W_ds]`` float32.
        """
        meta = self.layer_meta(name)
        self._check_head(meta, head)
        if not 0 <= frame < meta["S"] or not 0 <= row < meta["H_ds"] or not 0 <= col < meta["W_ds"]:
            raise FormatError(f"key cell (frame {frame}, row {row}, col {col}) outside the export's grid")
        stored = self.heatmaps(name)
        scales = self.head_scales(name)
        grid = (meta["H_ds"], meta["W_ds"])
        if not meta["per_head_data"]:
            return np.multiply(stored[:, frame, row, col], scales[0], dtype=np.float32).reshape(grid)
        if head is not None:
            return np.multiply(stored[:, head, frame, row, col], scales[head], dtype=np.float32).reshape(grid)
        column = np.multiply(stored[:, :, frame, row, col], scales[None, :], dtype=np.float32)
        return np.ascontiguousarray(column.T).reshape(meta["num_heads"], *grid)

    def validate(self) -> None:
        """Check every layer's NPZ headers (dtype, shape) against its metadata; raises FormatError."""
        for name in self.layer_names:
            self._member_table(name)
        sizes = {tuple(self.layer_meta(n)["image_size"]) for n in self.layer_names}
        if len(sizes) != 1:
            raise FormatError(f"layers disagree on the image size: {sorted(sizes)}")

    # ---- frames --------------------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the frames as the model saw them."""
        height, width = self.layer_meta(self.layer_names[0])["image_size"]
        return int(height), int(width)

    def frames(self) -> list[np.ndarray]:
        """All frames as ``[H, W, 3] uint8`` arrays at :attr:`image_size`, decoded once and cached.

        A seed export's copied source images are resized to the model's frame size; a frame whose file
        lies outside the export is a flat gray placeholder.
        """
        if self._frames is not None:
            return self._frames
        with self._lock:
            if self._frames is None:
                self._frames = [self._decode_frame(i, path) for i, path in enumerate(self.frame_paths)]
        return self._frames

    def _decode_frame(self, index: int, path: Path | None) -> np.ndarray:
        height, width = self.image_size
        if path is None:
            return np.full((height, width, 3), 128, dtype=np.uint8)
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise FormatError(f"frame {index}: cannot read image {path.name} ({exc})") from None
        if rgb.size != (width, height):
            if not self.is_seed:
                raise FormatError(
                    f"frame {index}: image {path.name} is {rgb.size[1]}x{rgb.size[0]}, "
                    f"metadata says {height}x{width}"
                )
            self.warnings.append(
                f"frame {index}: {path.name} resized from {rgb.size[0]}x{rgb.size[1]} "
                f"to the model's {width}x{height}"
            )
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_positive_int(item) for item in value)


# What each known metadata field must hold when present (``None`` allowed where the schema allows it).
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "npz_path": (lambda v: isinstance(v, str) and bool(v), "a relative path", False),
    "npy_path": (lambda v: isinstance(v, str) and bool(v), "a relative path", False),
    "image_paths": (lambda v: _is_str_list(v) and bool(v), "a non-empty list of paths", False),
    "source_images": (_is_str_list, "a list of file names", False),
    "special_tokens": (_is_str_list, "a list of token names", False),
    "layer_name": (lambda v: isinstance(v, str), "a string", False),
    "layer_kind": (lambda v: isinstance(v, str), "a string", False),
    "query_source": (lambda v: isinstance(v, str), "a string", True),
    "dtype": (lambda v: isinstance(v, str) and v in NPZ_NAME_BY_DTYPE, "'uint8' or 'float16'", False),
    "normalized_by": (
        lambda v: isinstance(v, str) and (v in _NORMALIZATIONS or v in _SEED_NORMALIZED_BY),
        "'layer', 'head' or 'none'",
        True,
    ),
    "per_head_data": (lambda v: isinstance(v, bool), "true or false", False),
    "num_heads": (_is_positive_int, "a positive integer", True),
    "per_head_vmax99": (lambda v: isinstance(v, list), "a list of numbers", True),
    "layer_vmax99": (_is_positive_number, "a positive number", True),
    "query_frame": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "a frame index",
        False,
    ),
    "heatmaps_shape": (_is_int_list, "a list of positive integers", False),
    "special_mass_shape": (_is_int_list, "a list of positive integers", False),
    "image_size": (lambda v: _is_int_list(v) and len(v) == 2, "[H, W] in pixels", False),
    **{
        key: (_is_positive_int, "a positive integer", False)
        for key in ("Q", "S", "H_p", "W_p", "H_ds", "W_ds", "stride_h", "stride_w", "patch_size")
    },
}


def _check_field_types(meta: dict, where: str) -> None:
    for key, (is_valid, expected, nullable) in _FIELD_CHECKS.items():
        if key not in meta or (nullable and meta[key] is None):
            continue
        if not is_valid(meta[key]):
            raise FormatError(f"{where}: metadata field {key} must be {expected}, got {meta[key]!r}"[:200])


def _normalize_layer_meta(raw: dict, name: str, is_seed: bool) -> dict:
    """Map a layer's metadata (current schema or seed) onto the current schema's fields."""
    meta = dict(raw)
    where = f"layer {name}"
    _check_field_types(meta, where)
    for key in ("npz_path", "image_paths"):
        if key not in meta:
            if key == "npz_path" and "npy_path" in meta:
                meta["npz_path"] = meta["npy_path"]
                continue
            raise FormatError(f"{where}: metadata lacks {key}")
    if not isinstance(meta["image_paths"], list) or not meta["image_paths"]:
        raise FormatError(f"{where}: image_paths must be a non-empty list")
    meta.setdefault("layer_name", name)
    meta.setdefault("layer_kind", "global")
    meta["per_head_data"] = bool(meta.get("per_head_data", False))
    meta.setdefault("num_heads", None)
    meta.setdefault("per_head_vmax99", None)
    meta.setdefault("layer_vmax99", None)
    meta["S"] = meta.get("S", len(meta["image_paths"]))
    if "dtype" not in meta:
        meta["dtype"] = "float16" if str(meta["npz_path"]).endswith("float16.npz") else "uint8"
    normalized_by = meta.get("normalized_by")
    if normalized_by in _SEED_NORMALIZED_BY:
        normalized_by = _SEED_NORMALIZED_BY[normalized_by]
    if normalized_by is None:
        normalized_by = _default_normalization(meta["dtype"], meta["per_head_data"], meta)
    meta["normalized_by"] = normalized_by
    for key in ("stride_h", "stride_w"):
        meta.setdefault(key, 1)
    meta.setdefault("patch_size", PATCH_SIZE)
    for key in ("H_ds", "W_ds"):
        if key not in meta:
            raise FormatError(f"{where}: metadata lacks {key}")
    if meta.get("H_p") is None:
        meta["H_p"] = meta["H_ds"] * meta["stride_h"]
    if meta.get("W_p") is None:
        meta["W_p"] = meta["W_ds"] * meta["stride_w"]
    meta.setdefault("Q", meta["H_ds"] * meta["W_ds"])
    if "image_size" not in meta:
        meta["image_size"] = [meta["H_p"] * meta["patch_size"], meta["W_p"] * meta["patch_size"]]
    if "source_images" not in meta:
        meta["source_images"] = [Path(str(p).replace("\\", "/")).name for p in meta["image_paths"]]
    if len(meta["source_images"]) != len(meta["image_paths"]):
        raise FormatError(
            f"{where}: {len(meta['source_images'])} source names for {len(meta['image_paths'])} images"
        )
    meta.setdefault("query_frame", 0)
    meta.setdefault("query_source", meta["source_images"][0])
    meta.setdefault("special_tokens", [])
    if meta["per_head_data"] and meta["num_heads"] is None and isinstance(meta["per_head_vmax99"], list):
        meta["num_heads"] = len(meta["per_head_vmax99"])
    if is_seed:
        meta.setdefault("schema_version", 0)
    return meta


def _layer_name_from_metadata_file(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_metadata")] if stem.endswith("_metadata") else stem


def open_export(path: str | os.PathLike[str]) -> AttnExport:
    """Open an export for reading.

    Parameters
    ----------
    path : str or PathLike
        The export folder, its ``attn_maps/`` folder, ``layers_manifest.json``, one layer's
        ``*_metadata.json`` (that layer alone), or a ``.zip`` of an export folder (extracted once to a
        private temporary folder, refusing entries outside its root and symlinks).

    Returns
    -------
    AttnExport
        The opened export; every layer's metadata is read and checked, arrays are read on demand.

    Raises
    ------
    FormatError
        For anything that cannot be read as the format says.
    """
    given = Path(os.fspath(path)).expanduser()
    if not given.exists():
        raise FormatError(f"no such file or folder: {given}")
    given = given.resolve()
    lone_layer: Path | None = None
    if given.is_file() and given.suffix.lower() == ".zip":
        container = _extract_zip_safely(given)
        attn_dir = _find_attn_dir_in(container)
        root_limit: Path | None = container
    elif given.is_dir():
        root_limit = None
        if (given / ATTN_DIR_NAME).is_dir():
            attn_dir = given / ATTN_DIR_NAME
        elif (given / MANIFEST_NAME).is_file() or any(given.glob("*_metadata.json")):
            attn_dir = given
        else:
            raise FormatError(f"{given} holds no {ATTN_DIR_NAME}/, {MANIFEST_NAME} or layer metadata")
    elif given.is_file() and given.suffix.lower() == ".json":
        root_limit = None
        attn_dir = given.parent
        if given.name != MANIFEST_NAME:
            lone_layer = given
    else:
        raise FormatError(f"not an export: {given.name} (expected a folder, a .json file or a .zip)")

    root = attn_dir.parent if attn_dir.name == ATTN_DIR_NAME else attn_dir
    if root_limit is not None and not _is_inside(root, root_limit):
        root = root_limit

    manifest_file = attn_dir / MANIFEST_NAME
    if lone_layer is not None:
        raw_layer = _read_json(lone_layer, "layer metadata")
        is_seed = "schema_version" not in raw_layer
        layer_files = {raw_layer.get("layer_name") or _layer_name_from_metadata_file(lone_layer): lone_layer}
        manifest = {"schema_version": SCHEMA_VERSION, "format": SEED_FORMAT_NAME if is_seed else FORMAT_NAME}
        if manifest_file.is_file():
            try:
                full_manifest = _read_json(manifest_file, "manifest")
                manifest.update({k: v for k, v in full_manifest.items() if k != "layers"})
            except FormatError:
                pass  # a lone layer opens without the manifest beside it
        manifest["layers"] = [{"name": n, "metadata_path": p.name} for n, p in layer_files.items()]
        return AttnExport(root, attn_dir, manifest, layer_files, is_seed)

    if manifest_file.is_file():
        manifest = _read_json(manifest_file, "manifest")
        is_seed = "schema_version" not in manifest
        if not is_seed and manifest.get("schema_version") != SCHEMA_VERSION:
            raise FormatError(
                f"unsupported schema_version {manifest.get('schema_version')!r} "
                f"(this reader knows {SCHEMA_VERSION})"
            )
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not layers:
            raise FormatError(f"{MANIFEST_NAME} lists no layers")
        layer_files = {}
        for position, entry in enumerate(layers):
            if not isinstance(entry, dict) or "metadata_path" not in entry:
                raise FormatError(f"{MANIFEST_NAME}: layer entry {position} has no metadata_path")
            name = str(entry.get("name") or _layer_name_from_metadata_file(Path(str(entry["metadata_path"]))))
            if name in layer_files:
                raise FormatError(f"{MANIFEST_NAME}: layer {name} listed twice")
            layer_files[name] = resolve_in_export(
                entry["metadata_path"], attn_dir, root, is_seed, f"manifest entry {name}"
            )
        if is_seed:
            manifest = dict(manifest, schema_version=0, format=SEED_FORMAT_NAME)
    else:
        files = sorted(attn_dir.glob("*_metadata.json"))
        layer_files = {_layer_name_from_metadata_file(p): p for p in files}
        if not layer_files:
            raise FormatError(f"no layer metadata in {attn_dir}")
        is_seed = "schema_version" not in _read_json(files[0], "layer metadata")
        manifest = {
            "schema_version": SCHEMA_VERSION if not is_seed else 0,
            "format": SEED_FORMAT_NAME if is_seed else FORMAT_NAME,
            "layers": [{"name": n, "metadata_path": p.name} for n, p in layer_files.items()],
        }
    export = AttnExport(root, attn_dir, manifest, layer_files, is_seed)
    return export
