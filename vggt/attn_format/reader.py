"""The one reader of the format: open an export (folder, JSON file or zip), read what is asked, lazily.

numpy and Pillow only: it never imports torch, so that a shared export opens fast on any machine.
Every export is untrusted input: each file read lies inside the export (:mod:`.paths`), each number is
checked against the caps of :mod:`.limits` and against the sizes the files really have before anything
is allocated from it, and every problem is a one-line :class:`FormatError`.
"""

from __future__ import annotations

import math
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from vggt.attn_format import limits
from vggt.attn_format.errors import printable
from vggt.attn_format.geometry import ExportGeometry, open_geometry
from vggt.attn_format.hub import is_hub_path, open_hub_files
from vggt.attn_format.maps import AttentionMaps, checked_index
from vggt.attn_format.npz import NpyMember, load_member, scan_npz
from vggt.attn_format.paths import (
    ExportFiles,
    FolderFiles,
    ZipFiles,
    check_path_text,
    resolve_in_export,
)
from vggt.attn_format.quantization import dequantization_factor
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
    JsonBudget,
    check_dtype_shape,
    check_layer_meta,
    check_manifest_fields,
    normalize_layer_meta,
    read_json,
)

# Image formats a frame may be stored in (the exporter writes PNG; the seed copied its inputs).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
_GRAY = 128


class AttnExport(AttentionMaps):
    """An opened export (see :func:`open_export`); reads lazily and caches what it has read.

    Attributes
    ----------
    root : Path
        The export folder; nothing outside it is ever read. For a zip, a folder of its private
        extraction, where a file exists once it has been read (use :meth:`file` or :meth:`resolve`).
    attn_dir : Path
        The folder holding the manifest and layer metadata.
    files : ExportFiles
        The export's files and the rule that keeps every read inside it.
    manifest : dict
        The manifest, synthesized for a lone layer metadata file or a seed export.
    layer_names : list of str
        Layers in manifest order.
    frame_paths : list of Path or None
        Locations of the frame image files, model order; ``None`` where a seed export's image lies
        outside it.
    frame_sources : list of str
        Original file name of each frame.
    is_seed : bool
        Written by the seed fork's exporter (no schema version).
    warnings : list of str
        Things the reader worked around (seed images not found, resized frames).
    """

    def __init__(
        self,
        files: ExportFiles,
        root: Path,
        attn_dir: Path,
        manifest: dict,
        layer_files: dict[str, Path],
        is_seed: bool,
        budget: JsonBudget,
    ):
        self.files = files
        self.root = root
        self.attn_dir = attn_dir
        self.manifest = manifest
        self.is_seed = is_seed
        self.layer_names = list(layer_files)
        self.warnings: list[str] = []
        self._layer_files = layer_files
        self._budget = budget
        self._meta: dict[str, dict] = {}
        self._npz_path: dict[str, Path] = {}
        self._members: dict[str, dict[str, NpyMember]] = {}
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._inflated: OrderedDict[tuple[str, str], int] = OrderedDict()  # decompressed arrays, bytes
        self._frames: dict[int, np.ndarray] = {}
        self._geometry: ExportGeometry | None | bool = False  # False: not opened yet
        self._lock = threading.RLock()  # held briefly, around the caches
        self._load_locks: dict[object, threading.Lock] = {}
        for name in self.layer_names:
            self._meta[name] = self._load_layer_meta(name)
        first = self._meta[self.layer_names[0]]
        self.frame_sources: list[str] = first["source_images"]
        self.frame_paths: list[Path | None] = [
            self._resolve_image(p, i) for i, p in enumerate(first["image_paths"])
        ]
        self._share_frames()
        if not self.is_seed:
            self._check_distinct_frames()
        self._fill_synthesized_manifest()

    def close(self) -> None:
        """Let go of the export's files (a zip's extraction is removed when no reader holds it)."""
        self.files.close()

    def __enter__(self) -> AttnExport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- paths ---------------------------------------------------------------------------------------

    def _locate(self, raw: str, base: Path, what: str) -> Path:
        return resolve_in_export(raw, base, self.root, self.files, self.is_seed, what)

    def resolve(self, raw: str, base: Path, what: str) -> Path:
        """A path written in the export (relative to ``base``, usually :attr:`attn_dir`), resolved to a
        file inside it and ready to be opened (extracted first from a zip); see
        :func:`~vggt.attn_format.paths.resolve_in_export`. Raises :class:`FormatError`."""
        return self.files.local(self._locate(raw, base, what), what)

    def file(self, relative: str, what: str) -> Path:
        """The file at ``relative`` (``/``-separated, relative to :attr:`root`, e.g.
        ``"geometry/cameras.json"``), checked to lie inside the export and ready to be opened."""
        return self.resolve(relative, self.root, what)

    def has_file(self, relative: str) -> bool:
        """Whether the export holds a file at ``relative`` (relative to :attr:`root`) inside it."""
        location = self.files.inside(self.root / check_path_text(relative, "file"))
        return location is not None and self.files.is_file(location)

    def _resolve_image(self, raw: str, index: int) -> Path | None:
        try:
            return self._locate(raw, self.attn_dir, f"frame {index} image")
        except FormatError:
            if not self.is_seed:
                raise
            self.warnings.append(
                f"frame {index}: image {raw!r} is not inside the export; showing a gray frame"
            )
            return None

    def _check_distinct_frames(self) -> None:
        seen: dict[Path, int] = {}
        for index, location in enumerate(self.frame_paths):
            if location in seen:
                raise FormatError(
                    f"frames {seen[location]} and {index} name the same image "
                    f"{self.files.describe(location)}; each frame has its own file"
                )
            seen[location] = index

    # ---- metadata ------------------------------------------------------------------------------------

    def _load_layer_meta(self, name: str) -> dict:
        location = self._layer_files[name]
        what = f"layer metadata {self.files.describe(location)}"
        raw = read_json(self.files.local(location, what), what, self._budget)
        meta = normalize_layer_meta(raw, name, self.is_seed)
        where = f"layer {name}"
        check_layer_meta(meta, where)
        if len(meta["image_paths"]) != meta["S"]:
            raise FormatError(f"{where}: {len(meta['image_paths'])} image paths for S={meta['S']} frames")
        self._npz_path[name] = self._locate(meta["npz_path"], self.attn_dir, f"{where} npz_path")
        return meta

    def _share_frames(self) -> None:
        """Every layer shows the same frames: checked, then held once."""
        first = self._meta[self.layer_names[0]]
        for name in self.layer_names[1:]:
            meta = self._meta[name]
            for key in ("image_paths", "source_images"):
                if meta[key] != first[key]:
                    raise FormatError(
                        f"layers {self.layer_names[0]} and {name} disagree on the frames ({key})"
                    )
                meta[key] = first[key]

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
        except (KeyError, TypeError):
            raise FormatError(
                f"no layer {name!r} in this export (has {', '.join(self.layer_names)})"
            ) from None

    @property
    def name(self) -> str:
        """What to call the export: its ``image_set_name``, else the name its owner gave its folder (or
        zip), never a temporary folder's."""
        set_name = self.manifest.get("image_set_name")
        if isinstance(set_name, str) and set_name:
            return set_name
        if isinstance(self.files, ZipFiles) and self.root == self.files.root:
            return Path(self.files.archive_name).stem
        return self.root.name

    @property
    def random_weights(self) -> bool:
        """Whether the manifest says the model had seeded random weights."""
        model = self.manifest.get("model") or {}
        return bool(isinstance(model, dict) and model.get("random_weights"))

    # ---- arrays --------------------------------------------------------------------------------------

    def _npz_file(self, name: str) -> Path:
        return self.files.local(self._npz_path[name], f"layer {name} NPZ")

    def _member_table(self, name: str) -> dict[str, NpyMember]:
        table = self._members.get(name)
        if table is None:
            meta = self.layer_meta(name)
            where = f"layer {name}"
            path = self._npz_file(name)
            table = scan_npz(path, where)
            if HEATMAPS_KEY not in table:
                raise FormatError(f"{where}: NPZ {path.name} has no {HEATMAPS_KEY!r} array")
            if meta["token_queries"] and TOKEN_HEATMAPS_KEY not in table:
                raise FormatError(f"{where}: NPZ {path.name} has no {TOKEN_HEATMAPS_KEY!r} array")
            for key, member in table.items():
                if key in ARRAY_KEYS:
                    check_dtype_shape(member.dtype, member.shape, meta, key, where)
            self._members[name] = table
        return table

    def _loading(self, item: object) -> threading.Lock:
        """The lock held while ``item`` (an array or a frame) is read: one reader of each item at a time,
        while other items of the export are read meanwhile."""
        with self._lock:
            return self._load_locks.setdefault(item, threading.Lock())

    def _array(self, name: str, key: str) -> np.ndarray | None:
        cache_key = (name, key)
        array = self._arrays.get(cache_key)
        if array is not None:
            return array
        with self._loading(cache_key):
            array = self._arrays.get(cache_key)
            if array is not None:
                return array
            member = self._member_table(name).get(key)
            if member is None:
                return None
            if not member.stored:
                with self._lock:
                    self._make_room(member.nbytes)
            array = load_member(self._npz_file(name), member, f"layer {name}")
            with self._lock:
                self._arrays[cache_key] = array
                if not member.stored:
                    self._inflated[cache_key] = member.nbytes
        return array

    def _make_room(self, size: int) -> None:
        """Forget the least recently read decompressed arrays until ``size`` more bytes fit the cap."""
        while self._inflated and sum(self._inflated.values()) + size > limits.MAX_INFLATED_CACHE_BYTES:
            oldest, _ = self._inflated.popitem(last=False)
            self._arrays.pop(oldest, None)

    def release(self, name: str) -> None:
        """Forget the arrays read from layer ``name``. Their memory maps close once nothing else holds them,
        so a pass over every layer of a large export keeps one layer's pages mapped, not all of them."""
        with self._lock:
            for key in [key for key in self._arrays if key[0] == name]:
                del self._arrays[key]
                self._inflated.pop(key, None)

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
            return dequantization_factor(meta[f"{prefix}per_head_vmax99"])
        layer_key = "token_vmax99" if token else "layer_vmax99"
        return np.full(heads, dequantization_factor(meta[layer_key]), dtype=np.float32)

    def validate(self) -> None:
        """Check every layer's NPZ headers (dtype, shape) against its metadata; raises FormatError."""
        for name in self.layer_names:
            self._member_table(name)
        sizes = {tuple(self.layer_meta(n)["image_size"]) for n in self.layer_names}
        if len(sizes) != 1:
            raise FormatError(f"layers disagree on the image size: {sorted(sizes)}")

    # ---- geometry ------------------------------------------------------------------------------------

    def geometry(self) -> ExportGeometry | None:
        """The export's predicted and true geometry (``geometry/``), or ``None`` for an export without it.

        Opened once (metadata read and checked against the export's sizes); its arrays are read on use.
        See :class:`vggt.attn_format.geometry.ExportGeometry`.
        """
        with self._lock:
            if self._geometry is False:
                height, width = self.image_size
                sizes = {
                    "S": len(self.frame_sources),
                    "H": height,
                    "W": width,
                    "Q": self.layer_meta(self.layer_names[0])["Q"],
                }
                self._geometry = open_geometry(
                    self.manifest.get("geometry"), self.attn_dir, self.resolve, sizes, self._budget
                )
        return self._geometry

    # ---- frames --------------------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the frames as the model saw them."""
        height, width = self.layer_meta(self.layer_names[0])["image_size"]
        return int(height), int(width)

    def frames(self) -> list[np.ndarray]:
        """All frames as ``[H, W, 3] uint8`` arrays at :attr:`image_size` (see :meth:`frame`); refused
        when together they exceed :data:`~.limits.MAX_DECODED_FRAMES_BYTES` (read them one at a time)."""
        height, width = self.image_size
        limits.check_file_size(
            len(self.frame_paths) * height * width * 3,
            limits.MAX_DECODED_FRAMES_BYTES,
            "all frames decoded at once",
        )
        return [self.frame(index) for index in range(len(self.frame_paths))]

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as a read-only ``[H, W, 3] uint8`` array at :attr:`image_size`.

        Decoded once and cached (the least recently read frames are forgotten beyond
        :data:`~.limits.MAX_DECODED_FRAMES_BYTES`). A seed export's copied source images are resized to
        the model's frame size; a frame whose file lies outside the export is a flat gray placeholder.
        """
        index = checked_index(index, "frame index")
        if not 0 <= index < len(self.frame_paths):
            raise FormatError(f"frame {index} out of range 0..{len(self.frame_paths) - 1}")
        with self._loading(("frame", index)):
            with self._lock:
                frame = self._frames.pop(index, None)
            if frame is None:
                frame = self._decode_frame(index, self.frame_paths[index])
                frame.flags.writeable = False
            with self._lock:
                self._frames[index] = frame  # most recently read last
                while len(self._frames) > 1 and sum(f.nbytes for f in self._frames.values()) > (
                    limits.MAX_DECODED_FRAMES_BYTES
                ):
                    del self._frames[next(iter(self._frames))]
        return frame

    def _decode_frame(self, index: int, location: Path | None) -> np.ndarray:
        height, width = self.image_size
        if location is None:
            return np.full((height, width, 3), _GRAY, dtype=np.uint8)
        what = f"frame {index}: image {self.files.describe(location)}"
        path = self.files.local(location, what)
        try:
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                size = image.size
                self._check_image_size(size, what)
                if size != (width, height):
                    image.draft("RGB", (width, height))  # JPEG: decode at a reduced size where it can
                rgb = image.convert("RGB")
                if rgb.size != (width, height):
                    rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        except FormatError:
            raise
        except Image.DecompressionBombError:
            raise FormatError(
                f"{what} is above the limit of {limits.MAX_SOURCE_IMAGE_PIXELS} pixels"
            ) from None
        except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types on damaged files
            reason = str(exc).replace(str(path), self.files.describe(location))  # no absolute path
            raise FormatError(f"{what}: cannot read it ({type(exc).__name__}: {reason})") from None
        if size != (width, height):
            self.warnings.append(
                f"frame {index}: {self.files.describe(location)} resized from {size[0]}x{size[1]} "
                f"to the model's {width}x{height} (W x H)"
            )
        return np.asarray(rgb, dtype=np.uint8)

    def _check_image_size(self, size: tuple[int, int], what: str) -> None:
        """An image's size from its header, before it is decoded: the frame size for current exports,
        within the caps of :mod:`.limits` for a seed export's copied originals."""
        height, width = self.image_size
        if not self.is_seed and size != (width, height):
            raise FormatError(f"{what} is {size[0]}x{size[1]}, metadata says {width}x{height} (W x H)")
        if max(size) > limits.MAX_SOURCE_IMAGE_SIDE or math.prod(size) > limits.MAX_SOURCE_IMAGE_PIXELS:
            raise FormatError(
                f"{what} is {size[0]}x{size[1]}, above the limit of {limits.MAX_SOURCE_IMAGE_PIXELS} "
                f"pixels and {limits.MAX_SOURCE_IMAGE_SIDE} per side"
            )


def _layer_name_from_metadata_file(name: str) -> str:
    stem = printable(Path(name).stem)  # a file name's undecodable bytes come back as surrogates
    return stem[: -len("_metadata")] if stem.endswith("_metadata") else stem


def _find(files: ExportFiles, path: Path, what: str) -> Path | None:
    """The location of the file at ``path`` when there is one, ``None`` when nothing is there; a link
    leading outside the export, or something other than a regular file, is refused."""
    location = files.inside(path)
    if location is None:
        if isinstance(files, FolderFiles) and not os.path.lexists(path):
            return None
        raise FormatError(f"{what} points outside the export (refused)")
    if files.is_file(location):
        return location
    if isinstance(files, FolderFiles) and os.path.lexists(path):
        raise FormatError(f"{what} is not a regular file")
    return None


def _export_folder(files: ExportFiles, path: Path, what: str) -> Path:
    """The location of a folder of the export, refused when a link leads it outside."""
    location = files.inside(path)
    if location is None:
        raise FormatError(f"{what} points outside the export (refused)")
    return location


def _open_files(text: str) -> tuple[ExportFiles, Path, Path | None]:
    """The export's files, its ``attn_maps/`` folder and the lone layer metadata file, if one was given.

    Nothing outside the export is followed: the root is the folder the user named (or the folder
    above a named ``attn_maps/`` or JSON file), resolved once; every location below it must resolve
    inside it. Messages quote the path as typed, never a resolved one. ``hf://datasets/...`` is a
    dataset repository of the Hugging Face Hub (:mod:`.hub`).
    """
    if is_hub_path(text):
        return (*open_hub_files(text), None)
    try:
        given = Path(text).expanduser()
        status = os.stat(given)
    except FileNotFoundError:
        raise FormatError(f"no such file or folder: {text}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise FormatError(f"cannot open {text} ({reason})") from None
    absolute = Path(os.path.abspath(given))  # lexical: links below the root are checked, not followed
    if stat.S_ISREG(status.st_mode) and absolute.suffix.lower() == ".zip":
        files: ExportFiles = ZipFiles(absolute.resolve(), absolute.name)
        return files, files.find_attn_dir(), None
    if stat.S_ISDIR(status.st_mode):
        named = absolute
        inner = named / ATTN_DIR_NAME
        if os.path.lexists(inner) and named.name != ATTN_DIR_NAME:
            files = FolderFiles(named.resolve())
            attn_dir = _export_folder(files, inner, f"{ATTN_DIR_NAME}/")
            if not files.is_dir(attn_dir):
                raise FormatError(f"{ATTN_DIR_NAME} in {text} is not a folder")
            return files, attn_dir, None
        root = named.parent if named.name == ATTN_DIR_NAME else named
        files = FolderFiles(root.resolve())
        attn_dir = _export_folder(files, named, text)
        if _find(files, attn_dir / MANIFEST_NAME, MANIFEST_NAME) or files.names_in(
            attn_dir, "_metadata.json"
        ):
            return files, attn_dir, None
        raise FormatError(f"{text} holds no {ATTN_DIR_NAME}/, {MANIFEST_NAME} or layer metadata")
    if stat.S_ISREG(status.st_mode) and absolute.suffix.lower() == ".json":
        folder = absolute.parent
        files = FolderFiles((folder.parent if folder.name == ATTN_DIR_NAME else folder).resolve())
        attn_dir = _export_folder(files, folder, f"the folder of {absolute.name}")
        location = _find(files, absolute, absolute.name)
        if location is None:
            raise FormatError(f"no such file or folder: {text}")
        return files, attn_dir, None if absolute.name == MANIFEST_NAME else location
    raise FormatError(f"not an export: {absolute.name} (expected a folder, a .json file or a .zip)")


def open_export(path: str | os.PathLike[str]) -> AttnExport:
    """Open an export for reading.

    Parameters
    ----------
    path : str or PathLike
        The export folder, its ``attn_maps/`` folder, ``layers_manifest.json``, one layer's
        ``*_metadata.json`` (that layer alone), a ``.zip`` of an export folder (its members are
        checked first, then extracted as they are read into a private temporary folder shared by every
        reader of the same zip, removed when the last one is closed and at exit), or a dataset of the
        Hugging Face Hub, ``hf://datasets/<owner>/<name>[@<revision>][/<folder>]`` (its files fetched
        into the hub's cache as they are read).

    Returns
    -------
    AttnExport
        The opened export; every layer's metadata is read and checked, arrays are read on demand.
        Close it (or use it as a context manager) to let go of a zip's extraction at once.

    Raises
    ------
    FormatError
        For anything that cannot be read as the format says, or that exceeds the caps of
        :mod:`vggt.attn_format.limits`. No other exception escapes for any content of the export.
    """
    try:
        text = os.fspath(path)
    except TypeError:
        raise FormatError(f"an export path must be a string, got {type(path).__name__}") from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    text = check_path_text(text, "export path")
    files, attn_dir, lone_layer = _open_files(text)
    try:
        return _open(files, attn_dir, lone_layer)
    except BaseException:
        files.close()
        raise


def _open(files: ExportFiles, attn_dir: Path, lone_layer: Path | None) -> AttnExport:
    root = attn_dir.parent if attn_dir.name == ATTN_DIR_NAME and attn_dir != files.root else attn_dir
    budget = JsonBudget()
    manifest_file = _find(files, attn_dir / MANIFEST_NAME, MANIFEST_NAME)

    def read(location: Path, what: str) -> dict:
        what = f"{what} {files.describe(location)}"
        return read_json(files.local(location, what), what, budget)

    if lone_layer is not None:
        raw_layer = read(lone_layer, "layer metadata")
        is_seed = "schema_version" not in raw_layer
        name = raw_layer.get("layer_name")
        if not isinstance(name, str) or not name:
            name = _layer_name_from_metadata_file(lone_layer.name)
        layer_files = {name: lone_layer}
        manifest = {"schema_version": SCHEMA_VERSION, "format": SEED_FORMAT_NAME if is_seed else FORMAT_NAME}
        if manifest_file is not None:
            try:
                full_manifest = read(manifest_file, "manifest")
                check_manifest_fields(full_manifest)
                manifest.update({k: v for k, v in full_manifest.items() if k != "layers"})
            except FormatError:
                pass  # a lone layer opens without the manifest beside it
        manifest["layers"] = [{"name": n, "metadata_path": p.name} for n, p in layer_files.items()]
        return AttnExport(files, root, attn_dir, manifest, layer_files, is_seed, budget)

    if manifest_file is not None:
        manifest = read(manifest_file, "manifest")
        is_seed = "schema_version" not in manifest
        if not is_seed and manifest.get("schema_version") != SCHEMA_VERSION:
            raise FormatError(
                f"unsupported schema_version {manifest.get('schema_version')!r} "
                f"(this reader knows {SCHEMA_VERSION})"
            )
        if not manifest.get("layers"):
            raise FormatError(f"{MANIFEST_NAME} lists no layers")
        check_manifest_fields(manifest)
        layer_files: dict[str, Path] = {}
        for position, entry in enumerate(manifest["layers"]):
            name = entry.get("name") or _layer_name_from_metadata_file(entry["metadata_path"])
            if name in layer_files:
                raise FormatError(f"{MANIFEST_NAME}: layer {name} listed twice")
            layer_files[name] = resolve_in_export(
                entry["metadata_path"], attn_dir, root, files, is_seed, f"manifest entry {position} ({name})"
            )
        if len(set(layer_files.values())) != len(layer_files):
            raise FormatError(f"{MANIFEST_NAME}: two layers name the same metadata file")
        if is_seed:
            manifest = dict(manifest, schema_version=0, format=SEED_FORMAT_NAME)
    else:
        names = files.names_in(attn_dir, "_metadata.json")
        layer_files = {_layer_name_from_metadata_file(n): attn_dir / n for n in names}
        if not layer_files:
            raise FormatError(f"no layer metadata in {files.describe(attn_dir)}")
        first = next(iter(layer_files.values()))
        is_seed = "schema_version" not in read(first, "layer metadata")
        manifest = {
            "schema_version": SCHEMA_VERSION if not is_seed else 0,
            "format": SEED_FORMAT_NAME if is_seed else FORMAT_NAME,
            "layers": [{"name": n, "metadata_path": p.name} for n, p in layer_files.items()],
        }
    return AttnExport(files, root, attn_dir, manifest, layer_files, is_seed, budget)
