"""The format's names and rules: files, fields, array shapes and the checks that hold them to it.

Shared by the writer and the reader, so that what one writes is exactly what the other accepts.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
FORMAT_NAME = "vggt-attn-maps"
SEED_FORMAT_NAME = "vggt-attn-maps-seed"
MANIFEST_NAME = "layers_manifest.json"
ATTN_DIR_NAME = "attn_maps"
IMAGES_DIR_NAME = "images"
PATCH_SIZE = 14

HEATMAPS_KEY = "heatmaps"
SPECIAL_MASS_KEY = "special_mass"
TOKEN_HEATMAPS_KEY = "token_heatmaps"
TOKEN_SPECIAL_MASS_KEY = "token_special_mass"
MAP_KEYS = (HEATMAPS_KEY, TOKEN_HEATMAPS_KEY)
ARRAY_KEYS = (HEATMAPS_KEY, SPECIAL_MASS_KEY, TOKEN_HEATMAPS_KEY, TOKEN_SPECIAL_MASS_KEY)
NPZ_NAME_BY_DTYPE = {"uint8": "heatmaps_uint8.npz", "float16": "heatmaps_raw_float16.npz"}

# Layer kinds in the order an export lists them.
LAYER_KINDS = ("global", "frame", "dino", "rollout")
GRID_KEYS = ("H_p", "W_p", "stride_h", "stride_w", "H_ds", "W_ds", "Q", "patch_size")
NORMALIZATIONS = ("layer", "head", "none")
# Seed exports spell the normalization after the metadata key that holds the scale.
SEED_NORMALIZED_BY = {"per_head_vmax99": "head", "layer_vmax99": "layer"}
# Fields the writer derives from the arrays; a caller's value must agree.
DERIVED_LAYER_KEYS = (
    "dtype",
    "heatmaps_shape",
    "special_mass_shape",
    "Q",
    "S",
    "H_ds",
    "W_ds",
    "per_head_data",
)


class FormatError(ValueError):
    """An export, or a file in it, that cannot be read as the format says (one-line message)."""

    def __init__(self, message: str) -> None:
        # Messages quote foreign text (zip, numpy, JSON errors); keep them on one line.
        super().__init__(" ".join(str(message).split()))


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


def special_token_names(n_special: int, first: str = "camera") -> list[str]:
    """Names of a frame's special tokens in model order: ``["camera", "register_1", ...]``."""
    return [first] + [f"register_{i}" for i in range(1, n_special)]


def layer_name(kind: str, number: int | None, kinds: Sequence[str]) -> str:
    """Name of a layer in an export that holds layer ``kinds``: ``layer_01`` while the only numbered kind
    is global (the seed's names), else ``global_01``, ``frame_01``, ``dino_01``; the rollout is
    ``rollout``."""
    if kind == "rollout":
        return "rollout"
    prefix = "layer" if [k for k in kinds if k != "rollout"] == ["global"] else kind
    return f"{prefix}_{number:02d}"


def layer_sort_key(kind: str, index: int | None) -> tuple[int, int]:
    """Order of layers in a manifest: by kind (:data:`LAYER_KINDS`), then by number."""
    rank = LAYER_KINDS.index(kind) if kind in LAYER_KINDS else len(LAYER_KINDS)
    return rank, index or 0


# ---- JSON ---------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON through a temporary file renamed into place."""
    text = json.dumps(data, indent=2, default=_json_default)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; any problem is a one-line :class:`FormatError` naming ``what``."""
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


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON would store it (tuples and lists alike, numpy scalars as Python numbers)."""
    return json.dumps(a, default=_json_default) == json.dumps(b, default=_json_default)


# ---- field checks -------------------------------------------------------------------------------------


def is_positive_number(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_int_list(value: Any, minimum: int = 1) -> bool:
    return isinstance(value, list) and all(_is_count(item, minimum) for item in value)


def _is_token_queries(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, dict) and isinstance(item.get("token"), str) and _is_count(item.get("frame"), 0)
        for item in value
    )


# What each known metadata field must hold when present: (check, description, null allowed).
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "npz_path": (lambda v: isinstance(v, str) and bool(v), "a relative path", False),
    "npy_path": (lambda v: isinstance(v, str) and bool(v), "a relative path", False),
    "image_paths": (lambda v: _is_str_list(v) and bool(v), "a non-empty list of paths", False),
    "source_images": (_is_str_list, "a list of file names", False),
    "special_tokens": (_is_str_list, "a list of token names", False),
    "layer_name": (lambda v: isinstance(v, str), "a string", False),
    "layer_kind": (lambda v: isinstance(v, str), "a string", False),
    "layer_index": (lambda v: _is_count(v, 1), "a positive integer", True),
    "block_index": (lambda v: _is_count(v, 0), "a block index", True),
    "query_source": (lambda v: isinstance(v, str), "a string", True),
    "dtype": (lambda v: isinstance(v, str) and v in NPZ_NAME_BY_DTYPE, "'uint8' or 'float16'", False),
    "normalized_by": (
        lambda v: isinstance(v, str) and (v in NORMALIZATIONS or v in SEED_NORMALIZED_BY),
        "'layer', 'head' or 'none'",
        True,
    ),
    "per_head_data": (lambda v: isinstance(v, bool), "true or false", False),
    "num_heads": (lambda v: _is_count(v, 1), "a positive integer", True),
    "per_head_vmax99": (lambda v: isinstance(v, list), "a list of numbers", True),
    "layer_vmax99": (is_positive_number, "a positive number", True),
    "token_vmax99": (is_positive_number, "a positive number", True),
    "token_per_head_vmax99": (lambda v: isinstance(v, list), "a list of numbers", True),
    "query_frame": (lambda v: _is_count(v, 0), "a frame index", False),
    "key_frames": (lambda v: _is_int_list(v, 0) and bool(v), "a non-empty list of frame indices", False),
    "token_queries": (_is_token_queries, "a list of {token, frame} objects", False),
    "heatmaps_shape": (_is_int_list, "a list of positive integers", False),
    "special_mass_shape": (_is_int_list, "a list of positive integers", False),
    "token_heatmaps_shape": (_is_int_list, "a list of positive integers", True),
    "token_special_mass_shape": (_is_int_list, "a list of positive integers", True),
    "image_size": (lambda v: _is_int_list(v) and len(v) == 2, "[H, W] in pixels", False),
    "rollout_discard_ratio": (
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1,
        "a number in [0, 1)",
        True,
    ),
    **{
        key: (lambda v: _is_count(v, 1), "a positive integer", False)
        for key in ("Q", "S", "H_p", "W_p", "H_ds", "W_ds", "stride_h", "stride_w", "patch_size")
    },
}


def check_field_types(meta: dict, where: str) -> None:
    """Each known field of ``meta`` holds what the schema says; raises :class:`FormatError`."""
    for key, (is_valid, expected, nullable) in _FIELD_CHECKS.items():
        if key not in meta or (nullable and meta[key] is None):
            continue
        if not is_valid(meta[key]):
            raise FormatError(f"{where}: metadata field {key} must be {expected}, got {meta[key]!r}"[:200])


def default_normalization(dtype_name: str, per_head: bool, meta: dict) -> str:
    if dtype_name == "float16":
        return "none"
    return "head" if per_head and meta.get("per_head_vmax99") is not None else "layer"


def normalize_layer_meta(raw: dict, name: str, is_seed: bool) -> dict:
    """Map a layer's metadata (current schema or seed) onto the current schema's fields."""
    meta = dict(raw)
    where = f"layer {name}"
    check_field_types(meta, where)
    if "npz_path" not in meta and "npy_path" in meta:
        meta["npz_path"] = meta["npy_path"]
    for key in ("npz_path", "image_paths", "H_ds", "W_ds"):
        if key not in meta:
            raise FormatError(f"{where}: metadata lacks {key}")
    meta.setdefault("layer_name", name)
    meta.setdefault("layer_kind", "global")
    if "block_index" not in meta:
        # Seed layers carry no numbers; their names are layer_01, layer_02, ... for global block 0, 1, ...
        number = int(name[len("layer_") :]) if re.fullmatch(r"layer_\d+", name) else None
        meta.setdefault("layer_index", number)
        meta["block_index"] = None if not number else number - 1
    meta["per_head_data"] = bool(meta.get("per_head_data", False))
    for key in ("num_heads", "per_head_vmax99", "layer_vmax99", "token_vmax99", "token_per_head_vmax99"):
        meta.setdefault(key, None)
    meta["S"] = meta.get("S", len(meta["image_paths"]))
    if "dtype" not in meta:
        meta["dtype"] = "float16" if str(meta["npz_path"]).endswith("float16.npz") else "uint8"
    normalized_by = SEED_NORMALIZED_BY.get(meta.get("normalized_by"), meta.get("normalized_by"))
    meta["normalized_by"] = normalized_by or default_normalization(meta["dtype"], meta["per_head_data"], meta)
    meta.setdefault("stride_h", 1)
    meta.setdefault("stride_w", 1)
    meta.setdefault("patch_size", PATCH_SIZE)
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
    meta.setdefault("key_frames", list(range(meta["S"])))
    meta.setdefault("token_queries", [])
    if meta["per_head_data"] and meta["num_heads"] is None and isinstance(meta["per_head_vmax99"], list):
        meta["num_heads"] = len(meta["per_head_vmax99"])
    if is_seed:
        meta.setdefault("schema_version", 0)
    return meta


def _check_scales(meta: dict, where: str, layer_key: str, head_key: str) -> None:
    if meta["normalized_by"] == "head":
        scales = meta.get(head_key)
        if not isinstance(scales, list) or len(scales) != meta["num_heads"]:
            raise FormatError(f"{where}: {head_key} must list {meta['num_heads']} values, got {scales!r}")
        if not all(is_positive_number(v) for v in scales):
            raise FormatError(f"{where}: {head_key} values must be positive numbers")
    if meta["normalized_by"] == "layer" and not is_positive_number(meta.get(layer_key)):
        raise FormatError(f"{where}: {layer_key} must be a positive number, got {meta.get(layer_key)!r}")


def check_layer_meta(meta: dict, where: str) -> None:
    """Consistency of one layer's (normalized) metadata with itself; raises :class:`FormatError`."""
    for key in ("Q", "S", "H_ds", "W_ds", "stride_h", "stride_w"):
        if not _is_count(meta.get(key), 1):
            raise FormatError(
                f"{where}: metadata field {key} must be a positive integer, got {meta.get(key)!r}"
            )
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
    frames = meta["key_frames"]
    if len(set(frames)) != len(frames) or not all(0 <= f < meta["S"] for f in frames):
        raise FormatError(f"{where}: key_frames {frames} must be distinct frames of 0..{meta['S'] - 1}")
    if not all(0 <= token["frame"] < meta["S"] for token in meta["token_queries"]):
        raise FormatError(f"{where}: a token query names a frame outside 0..{meta['S'] - 1}")
    if meta["dtype"] not in NPZ_NAME_BY_DTYPE:
        raise FormatError(f"{where}: dtype must be uint8 or float16, got {meta['dtype']!r}")
    if meta["normalized_by"] not in NORMALIZATIONS:
        raise FormatError(
            f"{where}: normalized_by must be one of {NORMALIZATIONS}, got {meta['normalized_by']!r}"
        )
    if meta["dtype"] == "float16" and meta["normalized_by"] != "none":
        raise FormatError(f"{where}: float16 maps are raw probabilities, normalized_by must be 'none'")
    if meta["dtype"] == "uint8" and meta["normalized_by"] == "none":
        raise FormatError(f"{where}: uint8 maps need a scale, normalized_by cannot be 'none'")
    if meta["per_head_data"] and not _is_count(meta.get("num_heads"), 1):
        raise FormatError(f"{where}: per-head data needs a positive num_heads, got {meta.get('num_heads')!r}")
    if meta["normalized_by"] == "head" and not meta["per_head_data"]:
        raise FormatError(f"{where}: normalized_by 'head' needs per-head data")
    _check_scales(meta, where, "layer_vmax99", "per_head_vmax99")
    if meta["token_queries"]:
        _check_scales(meta, where, "token_vmax99", "token_per_head_vmax99")


def expected_shape(meta: dict, key: str) -> tuple[int, ...] | None:
    """Shape of array ``key`` that the metadata implies; ``None`` where it does not pin one down
    (special-token mass of a seed layer, which names no special tokens)."""
    rows = meta["Q"] if key in (HEATMAPS_KEY, SPECIAL_MASS_KEY) else len(meta["token_queries"])
    heads = (meta["num_heads"],) if meta["per_head_data"] else ()
    lead = (rows, *heads, len(meta["key_frames"]))
    if key in MAP_KEYS:
        return (*lead, meta["H_ds"], meta["W_ds"])
    n_special = len(meta.get("special_tokens") or [])
    return (*lead, n_special) if n_special else None


def check_dtype_shape(dtype: np.dtype, shape: tuple[int, ...], meta: dict, key: str, where: str) -> None:
    """An array's dtype and shape (from an NPZ header or in memory) against the layer's metadata."""
    if dtype.hasobject:
        raise FormatError(f"{where}: NPZ member {key!r} holds Python objects (refused, never unpickled)")
    expected_dtype = meta["dtype"] if key in MAP_KEYS else "float16"
    if dtype.name != expected_dtype:
        raise FormatError(f"{where}: {key} has dtype {dtype.name}, metadata says {expected_dtype}")
    recorded = meta.get(f"{key}_shape")
    if recorded is not None and list(shape) != list(recorded):
        raise FormatError(f"{where}: {key} has shape {list(shape)}, metadata says {list(recorded)}")
    expected = expected_shape(meta, key)
    if expected is not None and tuple(shape) != expected:
        raise FormatError(f"{where}: {key} has shape {list(shape)}, metadata says {list(expected)}")
    if expected is None and len(shape) != (4 if meta["per_head_data"] else 3):
        raise FormatError(f"{where}: {key} has shape {list(shape)}, not [Q, (heads,) K, n_special]")
