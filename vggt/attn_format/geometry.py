"""The ``geometry/`` part of an export: predicted cameras, depth and points, and where each query point lies
in every frame (true, by the track head, by the predicted depth and cameras).

Files (paths in JSON relative to ``attn_maps/``, like every path of the format)::

    <out>/geometry/geometry_metadata.json    sizes, sources, conventions, tolerances, the NPZ's path
    <out>/geometry/geometry.npz              the arrays of :data:`ARRAY_SPECS`

The manifest's ``geometry`` field holds ``{"metadata_path": "../geometry/geometry_metadata.json"}``, or
is absent / null for an export without geometry. numpy only; the reader treats every byte as hostile:
each member's dtype and shape are checked against the export's own sizes before it is read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from vggt.attn_format.grid import in_frame
from vggt.attn_format.limits import MAX_INFLATED_CACHE_BYTES
from vggt.attn_format.npz import NpyMember, load_member, scan_npz, write_npz
from vggt.attn_format.schema import (
    SCHEMA_VERSION,
    FormatError,
    JsonBudget,
    brief,
    read_json,
    write_json_atomic,
)

GEOMETRY_DIR_NAME = "geometry"
GEOMETRY_METADATA_NAME = "geometry_metadata.json"
GEOMETRY_NPZ_NAME = "geometry.npz"
# Correspondence sources in the order an export lists them.
SOURCES = ("truth", "track", "depth")
# The track head's visibility score from which a tracked point counts as visible.
TRACK_VISIBILITY_THRESHOLD = 0.5

# Member name -> (dtype, shape in symbols). S frames, H x W pixels, Q query points.
ARRAY_SPECS: dict[str, tuple[str, tuple[str, ...]]] = {
    "extrinsic": ("float32", ("S", 3, 4)),
    "intrinsic": ("float32", ("S", 3, 3)),
    "depth": ("float16", ("S", "H", "W")),
    "depth_conf": ("float16", ("S", "H", "W")),
    "world_points": ("float16", ("S", "H", "W", 3)),
    "world_points_conf": ("float16", ("S", "H", "W")),
    "query_points": ("float32", ("Q", 2)),
    "track_visibility": ("float32", ("S", "Q")),
    "track_confidence": ("float32", ("S", "Q")),
    **{f"{source}_xy": ("float32", ("S", "Q", 2)) for source in SOURCES},
    **{f"{source}_visible": ("bool", ("S", "Q")) for source in SOURCES},
}
FRAME_KEYS = ("extrinsic", "intrinsic", "depth", "depth_conf", "world_points", "world_points_conf")
# Members every geometry part holds; the others come with their source.
REQUIRED_KEYS = (*FRAME_KEYS, "query_points")
SOURCE_KEYS = {
    "truth": ("truth_xy", "truth_visible"),
    "track": ("track_xy", "track_visible", "track_visibility", "track_confidence"),
    "depth": ("depth_xy", "depth_visible"),
}


def expected_shape(key: str, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Shape of member ``key`` for ``sizes`` ``{"S", "H", "W", "Q"}``."""
    return tuple(sizes[n] if isinstance(n, str) else n for n in ARRAY_SPECS[key][1])


def _check_array(
    key: str, dtype: np.dtype, shape: tuple[int, ...], sizes: Mapping[str, int], where: str
) -> None:
    if dtype.hasobject:
        raise FormatError(f"{where}: NPZ member {key!r} holds Python objects (refused, never unpickled)")
    expected_dtype, _ = ARRAY_SPECS[key]
    if dtype.name != expected_dtype:
        raise FormatError(f"{where}: {key} has dtype {dtype.name}, the format says {expected_dtype}")
    expected = expected_shape(key, sizes)
    if tuple(shape) != expected:
        raise FormatError(f"{where}: {key} has shape {list(shape)}, expected {list(expected)}")


# ---- writing ------------------------------------------------------------------------------------------


def write_geometry(
    root: Path, arrays: Mapping[str, np.ndarray], meta: Mapping, compress: bool = False
) -> dict:
    """Write ``<root>/geometry/`` and return the manifest's ``geometry`` entry.

    Parameters
    ----------
    root : Path
        The export folder.
    arrays : Mapping
        The members of :data:`ARRAY_SPECS`: all of :data:`REQUIRED_KEYS`, and for each correspondence
        source present all of its :data:`SOURCE_KEYS`; cast to the format's dtypes here.
    meta : Mapping
        Extra metadata fields (e.g. tolerances, the scene's name); sizes and sources are filled in.
    compress : bool
        Deflate the NPZ (like the export's layers).

    Returns
    -------
    dict
        ``{"metadata_path": "../geometry/geometry_metadata.json"}``.
    """
    unknown = sorted(set(arrays) - set(ARRAY_SPECS))
    if unknown:
        raise FormatError(f"geometry: unknown arrays {unknown}")
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise FormatError(f"geometry: missing arrays {missing}")
    sources = [source for source in SOURCES if f"{source}_xy" in arrays]
    for source in sources:
        absent = [key for key in SOURCE_KEYS[source] if key not in arrays]
        if absent:
            raise FormatError(f"geometry: {source} correspondences lack {absent}")
    typed = {key: np.ascontiguousarray(arrays[key], dtype=ARRAY_SPECS[key][0]) for key in arrays}
    S, H, W = typed["depth"].shape
    sizes = {"S": int(S), "H": int(H), "W": int(W), "Q": int(typed["query_points"].shape[0])}
    for key, array in typed.items():
        _check_array(key, array.dtype, array.shape, sizes, "geometry")

    folder = Path(root) / GEOMETRY_DIR_NAME
    folder.mkdir(parents=True, exist_ok=True)
    write_npz(folder / GEOMETRY_NPZ_NAME, typed, compress)
    full = {
        "schema_version": SCHEMA_VERSION,
        "npz_path": f"../{GEOMETRY_DIR_NAME}/{GEOMETRY_NPZ_NAME}",
        **sizes,
        "image_size": [sizes["H"], sizes["W"]],
        "sources": sources,
        "track_visibility_threshold": TRACK_VISIBILITY_THRESHOLD,
        **dict(meta),
    }
    write_json_atomic(folder / GEOMETRY_METADATA_NAME, full)
    return {"metadata_path": f"../{GEOMETRY_DIR_NAME}/{GEOMETRY_METADATA_NAME}"}


# ---- reading ------------------------------------------------------------------------------------------


class ExportGeometry:
    """The geometry of an opened export (see :meth:`vggt.attn_format.AttnExport.geometry`); arrays are
    read on first use, memory-mapped where the NPZ is stored.

    Attributes
    ----------
    meta : dict
        The geometry metadata (sizes, ``sources``, tolerances, conventions).
    sources : tuple of str
        The correspondence sources present, from ``"truth"``, ``"track"``, ``"depth"`` (in that order).
    num_frames, image_size, num_queries
        ``S``, ``(H, W)`` and ``Q``, the export's own sizes.

    Coordinates: pixel ``(x, y)`` = (column, row) of the frames the model saw, the centre of the
    top-left pixel at ``(0, 0)``. Cameras: OpenCV (x right, y down, z forward), ``extrinsic`` maps
    world to camera, the first camera at the origin.
    """

    def __init__(self, meta: dict, open_npz: Callable[[], Path], sizes: dict[str, int]) -> None:
        self.meta = meta
        self._open_npz = open_npz  # the NPZ's local path; for a zip, extracted on first use
        self._npz_path: Path | None = None
        self._sizes = sizes
        self._members: dict[str, NpyMember] | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._inflated: OrderedDict[str, int] = OrderedDict()  # decompressed arrays held, bytes
        self._lock = threading.Lock()
        self.sources: tuple[str, ...] = tuple(meta["sources"])
        self.num_frames = sizes["S"]
        self.image_size = (sizes["H"], sizes["W"])
        self.num_queries = sizes["Q"]

    def _table(self) -> dict[str, NpyMember]:
        if self._members is None:
            self._npz_path = self._open_npz()
            table = scan_npz(self._npz_path, "geometry")
            needed = [*REQUIRED_KEYS, *(key for source in self.sources for key in SOURCE_KEYS[source])]
            absent = [key for key in needed if key not in table]
            if absent:
                raise FormatError(f"geometry: NPZ {self._npz_path.name} lacks {', '.join(absent)}")
            for key, member in table.items():
                if key in ARRAY_SPECS:
                    _check_array(key, member.dtype, member.shape, self._sizes, "geometry")
            self._members = table
        return self._members

    def array(self, key: str) -> np.ndarray:
        """Member ``key`` of :data:`ARRAY_SPECS`, checked; memory-mapped where stored, else decompressed
        (at most :data:`~vggt.attn_format.limits.MAX_INFLATED_CACHE_BYTES` of them kept)."""
        if key not in ARRAY_SPECS:
            raise FormatError(f"geometry has no array {key!r}")
        with self._lock:
            array = self._arrays.get(key)
            if array is not None:
                if key in self._inflated:
                    self._inflated.move_to_end(key)
                return array
            member = self._table().get(key)
            if member is None:
                raise FormatError(f"geometry: this export has no {key}")
            if not member.stored:
                while (
                    self._inflated and sum(self._inflated.values()) + member.nbytes > MAX_INFLATED_CACHE_BYTES
                ):
                    self._arrays.pop(self._inflated.popitem(last=False)[0], None)
            array = load_member(self._npz_path, member, "geometry")
            self._arrays[key] = array
            if not member.stored:
                self._inflated[key] = member.nbytes
        return array

    @property
    def query_points(self) -> np.ndarray:
        """``[Q, 2]`` float32 pixel ``(x, y)`` in frame 0: each query cell's point (its query patch's
        centre, :func:`vggt.attn_format.grid.cell_centres`)."""
        return self.array("query_points")

    def correspondence(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """Where each query point lies in every frame according to ``source``.

        Returns
        -------
        xy : np.ndarray
            ``[S, Q, 2]`` float32 pixel ``(x, y)`` in model-frame coordinates (NaN where unknown).
        visible : np.ndarray
            ``[S, Q]`` bool; only where ``xy`` is finite and inside the frame, whatever the file says.
        """
        if source not in self.sources:
            have = ", ".join(self.sources) or "none"
            raise FormatError(f"geometry has no {source!r} correspondences (it has {have})")
        xy = np.asarray(self.array(f"{source}_xy"), dtype=np.float32)
        return xy, np.asarray(self.array(f"{source}_visible")) & in_frame(xy, self.image_size)

    def track_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """The track head's visibility and confidence scores, ``[S, Q]`` float32 each, in ``[0, 1]``."""
        if "track" not in self.sources:
            raise FormatError("geometry has no track head correspondences")
        return self.array("track_visibility"), self.array("track_confidence")

    @property
    def extrinsic(self) -> np.ndarray:
        """``[S, 3, 4]`` float32 predicted world-to-camera ``[R | t]``."""
        return self.array("extrinsic")

    @property
    def intrinsic(self) -> np.ndarray:
        """``[S, 3, 3]`` float32 predicted intrinsics in model-frame pixels."""
        return self.array("intrinsic")

    @property
    def depth(self) -> np.ndarray:
        """``[S, H, W]`` float16 predicted depth (camera z) per pixel."""
        return self.array("depth")

    @property
    def depth_conf(self) -> np.ndarray:
        """``[S, H, W]`` float16 confidence of :attr:`depth`."""
        return self.array("depth_conf")

    @property
    def world_points(self) -> np.ndarray:
        """``[S, H, W, 3]`` float16 predicted world point per pixel (the point head)."""
        return self.array("world_points")

    @property
    def world_points_conf(self) -> np.ndarray:
        """``[S, H, W]`` float16 confidence of :attr:`world_points`."""
        return self.array("world_points_conf")


def open_geometry(
    entry: object,
    attn_dir: Path,
    resolve: Callable[[str, Path, str], Path],
    sizes: dict[str, int],
    budget: JsonBudget | None = None,
) -> ExportGeometry | None:
    """The geometry named by the manifest's ``geometry`` field ``entry``, or ``None`` when there is none.

    Parameters
    ----------
    entry
        The manifest's ``geometry`` value (``None`` or absent for an export without geometry).
    attn_dir
        The folder the export's paths are relative to.
    resolve
        ``resolve(raw, base, what)``: the export's path rule (a file inside the export, ready to be
        opened; refuses anything else).
    sizes
        The export's own ``{"S", "H", "W", "Q"}``: the geometry must agree with them.
    budget
        The export's JSON budget (all of its JSON files together).
    """
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("metadata_path"), str):
        raise FormatError("manifest field geometry must be an object with a metadata_path")
    meta_path = resolve(entry["metadata_path"], attn_dir, "geometry metadata")
    meta = read_json(meta_path, "geometry metadata", budget)
    for key in ("S", "H", "W", "Q"):
        value = meta.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise FormatError(f"geometry metadata field {key} must be a positive integer, got {brief(value)}")
        if value != sizes[key]:
            raise FormatError(f"geometry metadata says {key}={value}, the export has {sizes[key]}")
    sources = meta.get("sources")
    if not isinstance(sources, list) or not all(isinstance(s, str) and s in SOURCES for s in sources):
        raise FormatError(f"geometry metadata field sources must list some of {', '.join(SOURCES)}")
    if len(set(sources)) != len(sources):
        raise FormatError("geometry metadata lists a source twice")
    raw_npz = meta.get("npz_path")
    if not isinstance(raw_npz, str):
        raise FormatError("geometry metadata lacks npz_path")
    return ExportGeometry(meta, lambda: resolve(raw_npz, attn_dir, "geometry npz_path"), dict(sizes))
