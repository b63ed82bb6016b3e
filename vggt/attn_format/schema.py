"""The format's names and rules: files, fields, array shapes and the checks that hold them to it.

Shared by the writer and the reader, so that what one writes is exactly what the other accepts.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vggt.attn_format import limits
from vggt.attn_format.errors import FormatError, printable

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

# Kinds of attention blocks a layer can come from, in the order an export lists them, and the rollout
# through them, listed last.
BLOCK_KINDS = ("global", "frame", "dino")
ROLLOUT_KIND = "rollout"
LAYER_KINDS = (*BLOCK_KINDS, ROLLOUT_KIND)
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
    if not (is_stride(stride_h) and is_stride(stride_w)):
        raise FormatError(f"strides must be at least 1, got stride_h={stride_h}, stride_w={stride_w}")
    return math.ceil(H_p / stride_h), math.ceil(W_p / stride_w)


def is_stride(value: Any) -> bool:
    """A query stride (and pooling block) in patches: an integer of at least 1."""
    return _is_count(value, 1, limits.MAX_IMAGE_SIDE)


def is_discard_ratio(value: Any) -> bool:
    """The rollout's discard ratio: the share of each row's smallest entries dropped, in ``[0, 1)``."""
    return (number := as_finite_float(value)) is not None and 0 <= number < 1


def special_token_names(n_special: int, first: str = "camera") -> list[str]:
    """Names of a frame's special tokens in model order: ``["camera", "register_1", ...]``."""
    return [first] + [f"register_{i}" for i in range(1, n_special)]


def layer_name(kind: str, number: int | None, kinds: Sequence[str]) -> str:
    """Name of a layer in an export that holds layer ``kinds``: ``layer_01`` while the only numbered kind
    is global (the seed's names), else ``global_01``, ``frame_01``, ``dino_01``; the rollout is
    ``rollout``."""
    if kind == ROLLOUT_KIND:
        return ROLLOUT_KIND
    prefix = "layer" if [k for k in kinds if k != ROLLOUT_KIND] == ["global"] else kind
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


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a new temporary file beside it, renamed into place.

    The temporary file is created exclusively under a fresh name, so that nothing already in the folder
    (a link left there by an export's author, leading outside the export) is followed or overwritten; the
    rename replaces a link at ``path`` itself, never the file it leads to.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON through a temporary file renamed into place."""
    text = json.dumps(data, indent=2, default=_json_default)
    write_file_atomic(path, (text + "\n").encode("utf-8"))


class JsonBudget:
    """Values that the JSON files of one export may hold together (:data:`~.limits.MAX_EXPORT_JSON_VALUES`),
    so that many files, each within its own caps, cannot add up to more memory than one export needs."""

    def __init__(self, values: int = limits.MAX_EXPORT_JSON_VALUES) -> None:
        self.left = values

    def take(self, values: int, what: str) -> None:
        self.left -= values
        if self.left < 0:
            raise FormatError(
                f"{what}: the export's JSON files hold more than "
                f"{limits.MAX_EXPORT_JSON_VALUES} values together"
            )


# String literals of JSON text that parsed (so that every literal is closed: the match is linear).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # may match escaped backslashes too: then walked


def _json_number(text: str, what: str, convert: Callable[[str], Any]) -> Any:
    if len(text) > limits.MAX_JSON_NUMBER_CHARS:
        raise FormatError(
            f"{what}: a number of {len(text)} characters (at most {limits.MAX_JSON_NUMBER_CHARS})"
        )
    return convert(text)


def _json_extent(data: bytes) -> tuple[int, int, int]:
    """``(values, depth, longest)`` of valid JSON text: an upper bound on its values (every value but the
    first of a container follows a comma), the deepest nesting of arrays and objects, and the bytes of
    its longest string literal."""
    literals = _JSON_STRING.findall(data)
    longest = max(map(len, literals), default=0)
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    opens = (skeleton == ord("[")) | (skeleton == ord("{"))
    closes = (skeleton == ord("]")) | (skeleton == ord("}"))
    nesting = np.cumsum(opens.astype(np.int32) - closes.astype(np.int32))
    depth = int(nesting.max(initial=0))
    values = 1 + int(np.count_nonzero(skeleton == ord(","))) + int(np.count_nonzero(opens))
    return values, depth, longest


def _checked_strings(value: Any, what: str) -> Any:
    """``value`` with every string (object keys included) checked against
    :data:`~.limits.MAX_STRING_CHARS` and passed through :func:`printable`."""
    if isinstance(value, str):
        if len(value) > limits.MAX_STRING_CHARS:
            raise FormatError(
                f"{what}: a string of {len(value)} characters (at most {limits.MAX_STRING_CHARS})"
            )
        return printable(value)
    if isinstance(value, list):
        return [_checked_strings(item, what) for item in value]
    if isinstance(value, dict):
        return {_checked_strings(key, what): _checked_strings(item, what) for key, item in value.items()}
    return value


def parse_json(data: bytes, what: str, budget: JsonBudget | None = None) -> Any:
    """Parse JSON text from an export within the caps of :mod:`.limits`.

    Numbers of more than :data:`~.limits.MAX_JSON_NUMBER_CHARS` characters, nesting deeper than
    :data:`~.limits.MAX_JSON_DEPTH`, more than :data:`~.limits.MAX_JSON_VALUES` values, strings longer
    than :data:`~.limits.MAX_STRING_CHARS` and text that is not UTF-8 are refused; lone surrogates
    (``"\\ud800"``) are replaced by U+FFFD. Any problem is a one-line :class:`FormatError` naming ``what``.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not UTF-8 text (byte {exc.start})") from None
    try:
        value = json.loads(
            text,
            parse_int=lambda s: _json_number(s, what, int),
            parse_float=lambda s: _json_number(s, what, float),
        )
    except json.JSONDecodeError as exc:
        raise FormatError(
            f"malformed JSON in {what}: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise FormatError(f"{what}: JSON nested deeper than {limits.MAX_JSON_DEPTH} levels") from None
    values, depth, longest = _json_extent(data)
    if depth > limits.MAX_JSON_DEPTH:
        raise FormatError(f"{what}: JSON nested {depth} levels deep (at most {limits.MAX_JSON_DEPTH})")
    limits.check_count(values, limits.MAX_JSON_VALUES, f"the number of JSON values in {what}")
    if budget is not None:
        budget.take(values, what)
    if longest <= limits.MAX_STRING_CHARS + 2 and not _SURROGATE_ESCAPE.search(data):
        return value  # no string can be too long or hold a surrogate: no need to walk the values
    return _checked_strings(value, what)  # nesting is bounded now: the walk's recursion is too


def read_json(path: Path, what: str, budget: JsonBudget | None = None) -> dict:
    """A JSON object from the regular file ``path`` of an export, read and parsed within the caps of
    :mod:`.limits` (see :func:`parse_json`); any problem is a one-line :class:`FormatError`."""
    data = limits.read_capped(path, limits.MAX_JSON_BYTES, what)
    value = parse_json(data, what, budget)
    if not isinstance(value, dict):
        raise FormatError(f"{what} must hold a JSON object, found {type(value).__name__}")
    return value


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON would store it (tuples and lists alike, numpy scalars as Python numbers)."""
    return json.dumps(a, default=_json_default) == json.dumps(b, default=_json_default)


# ---- field checks -------------------------------------------------------------------------------------


def as_finite_float(value: Any) -> float | None:
    """``value`` as a finite float32-representable number, or ``None`` for anything else (bools, strings,
    NaN, infinities, integers too large for a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and abs(number) <= _FLOAT32_MAX else None


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_positive_number(value: Any) -> bool:
    number = as_finite_float(value)
    return number is not None and number > 0


def _is_count(value: Any, minimum: int, maximum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= limits.MAX_NAME_CHARS


def _is_list_of(value: Any, is_item: Callable[[Any], bool], max_items: int, min_items: int = 0) -> bool:
    return isinstance(value, list) and min_items <= len(value) <= max_items and all(map(is_item, value))


def _is_frame(value: Any) -> bool:
    return _is_count(value, 0, limits.MAX_FRAMES - 1)


def _is_token_query(item: Any) -> bool:
    return isinstance(item, dict) and _is_name(item.get("token")) and _is_frame(item.get("frame"))


def _is_shape(value: Any) -> bool:
    return _is_list_of(value, lambda n: _is_count(n, 0, _MAX_DIMENSION), 8)


_MAX_DIMENSION = 1 << 40  # a shape's sides are compared with the stored arrays; this only bounds the numbers
_MAX_LAYER_NUMBER = 100_000
_SIDE = limits.MAX_IMAGE_SIDE
_NAME = f"a name of at most {limits.MAX_NAME_CHARS} characters"
_HEAD_SCALES = (
    lambda v: _is_list_of(v, is_positive_number, limits.MAX_HEADS),
    f"a list of at most {limits.MAX_HEADS} positive numbers",
    True,
)

# What each known metadata field must hold when present: (check, description, null allowed). Counts are
# bounded by the caps of :mod:`.limits`, so that nothing is sized from an unchecked number.
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "npz_path": (lambda v: isinstance(v, str) and bool(v), "a relative path", False),
    "npy_path": (lambda v: isinstance(v, str) and bool(v), "a relative path", False),
    "image_paths": (
        lambda v: _is_list_of(v, lambda p: isinstance(p, str), limits.MAX_FRAMES, 1),
        f"a list of 1 to {limits.MAX_FRAMES} paths",
        False,
    ),
    "source_images": (
        lambda v: _is_list_of(v, _is_name, limits.MAX_FRAMES),
        f"a list of at most {limits.MAX_FRAMES} file names of at most {limits.MAX_NAME_CHARS} characters",
        False,
    ),
    "special_tokens": (
        lambda v: _is_list_of(v, _is_name, limits.MAX_SPECIAL_TOKENS),
        f"a list of at most {limits.MAX_SPECIAL_TOKENS} token names of at most "
        f"{limits.MAX_NAME_CHARS} characters",
        False,
    ),
    "layer_name": (_is_name, _NAME, False),
    "layer_kind": (_is_name, _NAME, False),
    "layer_index": (lambda v: _is_count(v, 1, _MAX_LAYER_NUMBER), "a positive integer", True),
    "block_index": (lambda v: _is_count(v, 0, _MAX_LAYER_NUMBER), "a block index", True),
    "query_source": (_is_name, _NAME, True),
    "vmax_estimator": (_is_name, _NAME, True),
    "dtype": (lambda v: isinstance(v, str) and v in NPZ_NAME_BY_DTYPE, "'uint8' or 'float16'", False),
    "normalized_by": (
        lambda v: isinstance(v, str) and (v in NORMALIZATIONS or v in SEED_NORMALIZED_BY),
        "'layer', 'head' or 'none'",
        True,
    ),
    "per_head_data": (lambda v: isinstance(v, bool), "true or false", False),
    "num_heads": (
        lambda v: _is_count(v, 1, limits.MAX_HEADS),
        f"a head count of 1 to {limits.MAX_HEADS}",
        True,
    ),
    "per_head_vmax99": _HEAD_SCALES,
    "layer_vmax99": (is_positive_number, "a positive number", True),
    "token_vmax99": (is_positive_number, "a positive number", True),
    "token_per_head_vmax99": _HEAD_SCALES,
    "query_frame": (_is_frame, "a frame index", False),
    "key_frames": (
        lambda v: _is_list_of(v, _is_frame, limits.MAX_FRAMES, 1),
        f"a list of 1 to {limits.MAX_FRAMES} frame indices",
        False,
    ),
    "token_queries": (
        lambda v: _is_list_of(v, _is_token_query, limits.MAX_TOKEN_QUERIES),
        f"a list of at most {limits.MAX_TOKEN_QUERIES} {{token, frame}} objects",
        False,
    ),
    "heatmaps_shape": (_is_shape, "a list of sizes", False),
    "special_mass_shape": (_is_shape, "a list of sizes", False),
    "token_heatmaps_shape": (_is_shape, "a list of sizes", True),
    "token_special_mass_shape": (_is_shape, "a list of sizes", True),
    "image_size": (
        lambda v: _is_list_of(v, lambda n: _is_count(n, 1, _SIDE), 2, 2),
        f"[H, W] in pixels, each 1 to {_SIDE}",
        False,
    ),
    "rollout_discard_ratio": (is_discard_ratio, "a number in [0, 1)", True),
    "rollout_layers": (lambda v: _is_count(v, 1, _MAX_LAYER_NUMBER), "a positive integer", True),
    "Q": (lambda v: _is_count(v, 1, _SIDE * _SIDE), f"a query count of 1 to {_SIDE * _SIDE}", False),
    "S": (lambda v: _is_count(v, 1, limits.MAX_FRAMES), f"a frame count of 1 to {limits.MAX_FRAMES}", False),
    "patch_size": (
        lambda v: _is_count(v, 1, limits.MAX_PATCH_SIZE),
        f"a patch size of 1 to {limits.MAX_PATCH_SIZE} pixels",
        False,
    ),
    **{
        key: (lambda v: _is_count(v, 1, _SIDE), f"an integer of 1 to {_SIDE}", False)
        for key in ("H_p", "W_p", "H_ds", "W_ds", "stride_h", "stride_w")
    },
}


def brief(value: Any) -> str:
    """A short description of a value from an export, for error messages."""
    if isinstance(value, list | dict) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, str) and len(value) > 60:
        return f"a string of {len(value)} characters"
    text = repr(value)
    return text if len(text) <= 100 else text[:99] + "…"


def _check_fields(
    data: dict, checks: dict[str, tuple[Callable[[Any], bool], str, bool]], where: str, kind: str
) -> None:
    for key, (is_valid, expected, nullable) in checks.items():
        if key not in data or (nullable and data[key] is None):
            continue
        if not is_valid(data[key]):
            raise FormatError(f"{where}: {kind} field {key} must be {expected}, got {brief(data[key])}")


def check_field_types(meta: dict, where: str) -> None:
    """Each known field of a layer's metadata holds what the schema says, within the caps of
    :mod:`.limits`; raises :class:`FormatError`."""
    _check_fields(meta, _FIELD_CHECKS, where, "metadata")


def _is_model(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    names_ok = all(value.get(key) is None or _is_name(value[key]) for key in _MODEL_NAMES)
    seed = value.get("random_seed")
    seed_ok = seed is None or _is_count(seed, -(2**63), 2**64) or _is_name(seed)
    flag = value.get("random_weights")
    return names_ok and seed_ok and (flag is None or isinstance(flag, bool))


_MODEL_NAMES = ("id", "revision", "checkpoint_file", "checkpoint_sha256")


def _is_frame_entry(item: Any) -> bool:
    return isinstance(item, dict) and (item.get("source") is None or _is_name(item["source"]))


def _is_layer_entry(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and all(item.get(key) is None or _is_name(item[key]) for key in ("name", "kind"))
        and isinstance(item.get("metadata_path"), str)
    )


# What the manifest's fields that the reader or the viewer use must hold when present.
_MANIFEST_CHECKS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "image_set_name": (_is_name, _NAME, True),
    "model": (
        _is_model,
        f"an object of names of at most {limits.MAX_NAME_CHARS} characters, random_weights and random_seed",
        True,
    ),
    "frames": (
        lambda v: _is_list_of(v, _is_frame_entry, limits.MAX_FRAMES),
        f"a list of at most {limits.MAX_FRAMES} frames with source names of at most "
        f"{limits.MAX_NAME_CHARS} characters",
        False,
    ),
    "layers": (
        lambda v: _is_list_of(v, _is_layer_entry, limits.MAX_LAYERS, 1),
        f"a list of 1 to {limits.MAX_LAYERS} layers, each with a metadata_path and a name of at most "
        f"{limits.MAX_NAME_CHARS} characters",
        False,
    ),
    "query_frame": (_is_frame, "a frame index", False),
    "per_head_data": (lambda v: isinstance(v, bool), "true or false", False),
    "num_heads": (
        lambda v: _is_count(v, 1, limits.MAX_HEADS),
        f"a head count of 1 to {limits.MAX_HEADS}",
        True,
    ),
    "precision": (_is_name, _NAME, True),
    "grid": (lambda v: isinstance(v, dict), "an object", False),
    "tool": (lambda v: isinstance(v, dict), "an object", True),
    "created": (_is_name, _NAME, True),
    "preprocess_mode": (_is_name, _NAME, True),
}


def check_manifest_fields(manifest: dict, where: str = MANIFEST_NAME) -> None:
    """Each known field of a manifest holds what the schema says, within the caps of :mod:`.limits`."""
    _check_fields(manifest, _MANIFEST_CHECKS, where, "manifest")


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
            raise FormatError(
                f"{where}: {head_key} must list {meta['num_heads']} values, got {brief(scales)}"
            )
        if not all(is_positive_number(v) for v in scales):
            raise FormatError(f"{where}: {head_key} values must be positive numbers")
    if meta["normalized_by"] == "layer" and not is_positive_number(meta.get(layer_key)):
        raise FormatError(f"{where}: {layer_key} must be a positive number, got {brief(meta.get(layer_key))}")


def check_layer_meta(meta: dict, where: str) -> None:
    """Consistency of one layer's (normalized) metadata with itself, within the caps of :mod:`.limits`;
    raises :class:`FormatError`."""
    for key in ("Q", "S", "H_ds", "W_ds", "stride_h", "stride_w", "H_p", "W_p", "patch_size", "image_size"):
        if key not in meta:
            raise FormatError(f"{where}: metadata lacks {key}")
    check_field_types(meta, where)  # again: normalizing derived some fields
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
    if meta.get("schema_version", 0) and list(meta["image_size"]) != [
        meta["H_p"] * meta["patch_size"],
        meta["W_p"] * meta["patch_size"],
    ]:
        raise FormatError(
            f"{where}: image_size {brief(meta['image_size'])} is not the patch grid "
            f"{meta['H_p']}x{meta['W_p']} times patch_size {meta['patch_size']}"
        )
    frames = meta["key_frames"]
    if len(set(frames)) != len(frames) or not all(0 <= f < meta["S"] for f in frames):
        raise FormatError(
            f"{where}: key_frames {brief(frames)} must be distinct frames of 0..{meta['S'] - 1}"
        )
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
    if meta["per_head_data"] and meta.get("num_heads") is None:
        raise FormatError(f"{where}: per-head data needs num_heads")
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
