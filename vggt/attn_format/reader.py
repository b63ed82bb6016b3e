"""The one reader of the format: open an export (folder, JSON file or zip), read what is asked, lazily.

numpy and Pillow only: it never imports torch, so that a shared export opens fast on any machine.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from vggt.attn_format.npz import NpyMember, load_member, scan_npz
from vggt.attn_format.paths import extract_zip_safely, find_attn_dir_in, is_inside, resolve_in_export
from vggt.attn_format.schema import (
    ARRAY_KEYS,
    ATTN_DIR_NAME,
    FORMAT_NAME,
    GRID_KEYS,
    HEATMAPS_KEY,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SEED_FORMAT_NAME,
    SPECIAL_MASS_KEY,
    TOKEN_HEATMAPS_KEY,
    TOKEN_SPECIAL_MASS_KEY,
    FormatError,
    check_dtype_shape,
    check_layer_meta,
    normalize_layer_meta,
    read_json,
)
from vggt.quantize import UINT8_MAX


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
        self._members: dict[str, dict[str, NpyMember]] = {}
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
        raw = read_json(path, f"layer metadata of {name}")
        meta = normalize_layer_meta(raw, name, self.is_seed)
        where = f"layer {name}"
        check_layer_meta(meta, where)
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
            {key: first[key] for key in GRID_KEYS},
        )
        manifest.setdefault("per_head_data", first["per_head_data"])
        manifest.setdefault("num_heads", first["num_heads"])
        manifest.setdefault("precision", first["dtype"])
        manifest.setdefault("model", {})
        # Each layer entry in the current meanings, whatever wrote it: ``index`` is 0-based as in the
        # seed fork (earlier exports of this project wrote it 1-based), ``kind`` and ``block_index`` as
        # the layer's metadata says.
        layers = []
        for name, entry in zip(self.layer_names, manifest["layers"], strict=True):
            block_index = self._meta[name]["block_index"]
            if block_index is None and self.is_seed and type(entry.get("index")) is int:
                block_index = entry["index"]
            kind = self._meta[name]["layer_kind"]
            layers.append(
                {**entry, "name": name, "kind": kind, "index": block_index, "block_index": block_index}
            )
        manifest["layers"] = layers

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

    def _member_table(self, name: str) -> dict[str, NpyMember]:
        table = self._members.get(name)
        if table is None:
            meta = self.layer_meta(name)
            where = f"layer {name}"
            table = scan_npz(self._npz_path[name], where)
            if HEATMAPS_KEY not in table:
                raise FormatError(f"{where}: NPZ {self._npz_path[name].name} has no {HEATMAPS_KEY!r} array")
            if meta["token_queries"] and TOKEN_HEATMAPS_KEY not in table:
                raise FormatError(
                    f"{where}: NPZ {self._npz_path[name].name} has no {TOKEN_HEATMAPS_KEY!r} array"
                )
            for key, member in table.items():
                if key in ARRAY_KEYS:
                    check_dtype_shape(member.dtype, member.shape, meta, key, where)
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
                array = load_member(self._npz_path[name], member, f"layer {name}")
                self._arrays[cache_key] = array
        return array

    def heatmaps(self, name: str) -> np.ndarray:
        """Stored maps of one layer: ``[Q, K, H_ds, W_ds]`` or ``[Q, heads, K, H_ds, W_ds]``.

        uint8 codes or float16 probabilities as stored; a ``np.memmap`` when the NPZ is uncompressed.
        """
        array = self._array(name, HEATMAPS_KEY)
        assert array is not None  # _member_table guarantees the member
        return array

    def special_mass(self, name: str) -> np.ndarray | None:
        """``[Q, K, n_special]`` or ``[Q, heads, K, n_special]`` float16, or ``None`` (seed exports)."""
        return self._array(name, SPECIAL_MASS_KEY)

    def token_special_mass(self, name: str) -> np.ndarray | None:
        """Special-token mass of the token queries, ``[T, (heads,) K, n_special]`` float16, or ``None``."""
        return self._array(name, TOKEN_SPECIAL_MASS_KEY) if self.layer_meta(name)["token_queries"] else None

    def key_frames(self, name: str) -> list[int]:
        """The frames along a layer's K axis (all frames for global layers and the rollout, ``[0]``
        for frame and DINOv2 layers)."""
        return list(self.layer_meta(name)["key_frames"])

    def head_scales(self, name: str, token: bool = False) -> np.ndarray:
        """Dequantization factor per head, ``[heads]`` float32 (``[1]`` for averaged data).

        ``x = stored * factor``: ``vmax99 / 255`` for uint8 maps, 1 for raw float16 maps. ``token``
        picks the scales of the token queries' maps.
        """
        meta = self.layer_meta(name)
        heads = meta["num_heads"] if meta["per_head_data"] else 1
        prefix = "token_" if token else ""
        if meta["normalized_by"] == "none":
            return np.ones(heads, dtype=np.float32)
        if meta["normalized_by"] == "head":
            head_key = f"{prefix}per_head_vmax99"
            return np.asarray(meta[head_key], dtype=np.float32) / np.float32(UINT8_MAX)
        layer_key = "token_vmax99" if token else "layer_vmax99"
        return np.full(heads, meta[layer_key] / UINT8_MAX, dtype=np.float32)

    def _check_head(self, meta: dict, head: int | None) -> None:
        if head is None:
            return
        if not meta["per_head_data"]:
            raise FormatError(f"layer {meta['layer_name']} has head-averaged maps only; no per-head data")
        if not 0 <= int(head) < meta["num_heads"]:
            raise FormatError(f"head index {head} out of range 0..{meta['num_heads'] - 1}")

    def _dequantized_row(self, name: str, key: str, row: int, head: int | None) -> np.ndarray:
        meta = self.layer_meta(name)
        self._check_head(meta, head)
        token = key == TOKEN_HEATMAPS_KEY
        rows = len(meta["token_queries"]) if token else meta["Q"]
        if not 0 <= int(row) < rows:
            what = "token query" if token else "query index"
            raise FormatError(f"{what} {row} out of range 0..{rows - 1} in layer {name}")
        stored = self._array(name, key)
        scales = self.head_scales(name, token)
        if not meta["per_head_data"]:
            return np.multiply(stored[row], scales[0], dtype=np.float32)
        if head is not None:
            return np.multiply(stored[row, head], scales[head], dtype=np.float32)
        return np.multiply(stored[row], scales[:, None, None, None], dtype=np.float32)

    def query_maps(self, name: str, qi: int, head: int | None = None) -> np.ndarray:
        """Dequantized maps of one query as float32 probabilities.

        Parameters
        ----------
        name : str
            Layer name.
        qi : int
            Query index ``qr * W_ds + qc``.
        head : int, optional
            0-based head; only for per-head layers.

        Returns
        -------
        np.ndarray
            ``[K, H_ds, W_ds]`` float32 for averaged data or a chosen head, else
            ``[heads, K, H_ds, W_ds]`` float32; K = the layer's :meth:`key_frames`.
        """
        return self._dequantized_row(name, HEATMAPS_KEY, qi, head)

    def token_maps(self, name: str, row: int, head: int | None = None) -> np.ndarray:
        """Dequantized maps of token query ``row`` (``layer_meta(name)["token_queries"][row]``, e.g.
        a frame's camera token), shaped like :meth:`query_maps`."""
        return self._dequantized_row(name, TOKEN_HEATMAPS_KEY, row, head)

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
        if frame not in meta["key_frames"]:
            raise FormatError(
                f"layer {name} holds no attention to frame {frame} (key frames {meta['key_frames']})"
            )
        if not 0 <= row < meta["H_ds"] or not 0 <= col < meta["W_ds"]:
            raise FormatError(f"key cell (row {row}, col {col}) outside the export's grid")
        position = meta["key_frames"].index(frame)
        stored = self.heatmaps(name)
        scales = self.head_scales(name)
        grid = (meta["H_ds"], meta["W_ds"])
        if not meta["per_head_data"]:
            return np.multiply(stored[:, position, row, col], scales[0], dtype=np.float32).reshape(grid)
        if head is not None:
            return np.multiply(stored[:, head, position, row, col], scales[head], dtype=np.float32).reshape(
                grid
            )
        column = np.multiply(stored[:, :, position, row, col], scales[None, :], dtype=np.float32)
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
        container = extract_zip_safely(given)
        attn_dir = find_attn_dir_in(container)
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
    if root_limit is not None and not is_inside(root, root_limit):
        root = root_limit

    manifest_file = attn_dir / MANIFEST_NAME
    if lone_layer is not None:
        raw_layer = read_json(lone_layer, "layer metadata")
        is_seed = "schema_version" not in raw_layer
        layer_files = {raw_layer.get("layer_name") or _layer_name_from_metadata_file(lone_layer): lone_layer}
        manifest = {"schema_version": SCHEMA_VERSION, "format": SEED_FORMAT_NAME if is_seed else FORMAT_NAME}
        if manifest_file.is_file():
            try:
                full_manifest = read_json(manifest_file, "manifest")
                manifest.update({k: v for k, v in full_manifest.items() if k != "layers"})
            except FormatError:
                pass  # a lone layer opens without the manifest beside it
        manifest["layers"] = [{"name": n, "metadata_path": p.name} for n, p in layer_files.items()]
        return AttnExport(root, attn_dir, manifest, layer_files, is_seed)

    if manifest_file.is_file():
        manifest = read_json(manifest_file, "manifest")
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
        is_seed = "schema_version" not in read_json(files[0], "layer metadata")
        manifest = {
            "schema_version": SCHEMA_VERSION if not is_seed else 0,
            "format": SEED_FORMAT_NAME if is_seed else FORMAT_NAME,
            "layers": [{"name": n, "metadata_path": p.name} for n, p in layer_files.items()],
        }
    export = AttnExport(root, attn_dir, manifest, layer_files, is_seed)
    return export
