"""The analysis of a whole export: every layer (and head) and the baselines, per query and aggregated.

:func:`run_analysis` reads the export through the one reader, a block of queries at a time (memory stays
bounded whatever the export's size), and returns an :class:`Analysis`: the table (one record per layer and
head), the same metrics per query, and what ``summary.json`` says about them.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from vggt.analysis.columns import COLUMNS, METRICS
from vggt.analysis.correspondence import (
    Correspondence,
    CorrespondenceError,
    Grid,
    Targets,
    export_correspondence,
    scene_correspondence,
)
from vggt.analysis.kernels import head_average, row_stats
from vggt.analysis.metrics import (
    CELL_SHARES,
    PCK_RADII,
    BlockMetrics,
    Stability,
    Windows,
    block_metrics,
    mask_agreement,
)
from vggt.attn_format import AttnExport, FormatError, open_export
from vggt.attn_format.grid import cell_centres
from vggt.attn_format.paths import FolderFiles
from vggt.attn_format.schema import ROLLOUT_KIND

DEFAULT_MASSES = (0.3, 0.5, 0.7)
SCOPES = ("query", "all")
_BLOCK_BYTES = 32 << 20  # stored bytes of a layer read and analysed at a time
BASELINES = ("same_uv", "uniform", "uniform_within_frame")
Progress = Callable[[int, int, str], None]


class AnalysisError(ValueError):
    """An option that does not fit the export (one-line message)."""


@dataclass
class Analysis:
    """The result of :func:`run_analysis`.

    Attributes
    ----------
    records : list of dict
        One per layer and head, then the baselines: the columns of ``layer_head_metrics.csv`` (NaN where
        a metric does not apply).
    per_query : dict of np.ndarray
        The metrics per query (and per frame or mass where they are per frame or mass), as
        ``per_query.npz`` holds them (floats as float32); row ``i`` of every array is record ``i``.
    summary : dict
        Options, the export read, the baselines and what each column means.
    """

    records: list[dict]
    per_query: dict[str, np.ndarray]
    summary: dict

    def dataframe(self):
        """The table as a pandas DataFrame (pandas is imported here, on demand)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.records, columns=list(COLUMNS))


# a job's table records and its per-query arrays (``per_query.npz``'s, float32)
_JobResult = tuple[list[dict], dict[str, np.ndarray]]


@dataclass
class _Rows:
    """Per-query results of a set of table rows (a layer's average and heads, or a baseline)."""

    layer: str
    heads: list[str]
    num_queries: int
    num_frames: int
    num_masses: int
    scalars: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (len(self.heads), self.num_queries)
        for name in ("cross_view_mass", "query_frame_mass", "camera_mass", "register_mass", "entropy"):
            self.scalars[name] = np.full(shape, np.nan)
        for share in CELL_SHARES:
            self.scalars[f"cells_{round(share * 100)}"] = np.full(shape, np.nan)
        per_frame = (len(self.heads), self.num_frames, self.num_queries)
        self.pck = np.full((len(self.heads), len(PCK_RADII), self.num_frames, self.num_queries), np.nan)
        self.corr_mass = np.full(per_frame, np.nan)
        per_mass = (len(self.heads), self.num_masses, self.num_queries)
        self.recall = np.full(per_mass, np.nan)
        self.tnr = np.full(per_mass, np.nan)
        self.overall_recall = np.full((len(self.heads), self.num_masses), np.nan)  # scope "all"
        self.overall_tnr = np.full((len(self.heads), self.num_masses), np.nan)

    def arrays(self) -> dict[str, np.ndarray]:
        """These rows' arrays of ``per_query.npz`` (float64), without the export-wide ones."""
        arrays: dict[str, np.ndarray] = {
            "layer": np.array([self.layer] * len(self.heads), dtype=str),
            "head": np.array(self.heads, dtype=str),
            **self.scalars,
        }
        for i, radius in enumerate(PCK_RADII):
            arrays[f"pck_{radius}"] = _nanmean(self.pck[:, i], axis=1)
            arrays[f"pck_{radius}_per_frame"] = self.pck[:, i]
        arrays["corr_mass"] = _nanmean(self.corr_mass, axis=1)
        arrays["corr_mass_per_frame"] = self.corr_mass
        arrays["mask_recall"] = self.recall.mean(axis=1)
        arrays["mask_tnr"] = self.tnr.mean(axis=1)
        arrays["mask_recall_per_mass"] = self.recall
        arrays["mask_tnr_per_mass"] = self.tnr
        arrays["mask_recall_overall"] = self.overall_recall
        arrays["mask_tnr_overall"] = self.overall_tnr
        return arrays

    def store(self, rows: slice, queries: slice, metrics: BlockMetrics, frames: np.ndarray) -> None:
        """Put a block's metrics in place: for each query of ``queries`` in turn, its ``rows`` (the heads,
        or the average); ``frames`` are the frames of the block's cross-view windows."""
        count, per_query = queries.stop - queries.start, rows.stop - rows.start

        def by_row(values: np.ndarray) -> np.ndarray:  # [count * per_query, ...] -> [per_query, ..., count]
            return np.moveaxis(values.reshape(count, per_query, *values.shape[1:]), 0, -1)

        s = self.scalars
        s["cross_view_mass"][rows, queries] = by_row(metrics.cross_view_mass)
        s["query_frame_mass"][rows, queries] = by_row(metrics.query_frame_mass)
        s["camera_mass"][rows, queries] = by_row(metrics.camera_mass)
        s["register_mass"][rows, queries] = by_row(metrics.register_mass)
        s["entropy"][rows, queries] = by_row(metrics.entropy)
        for i, share in enumerate(CELL_SHARES):
            s[f"cells_{round(share * 100)}"][rows, queries] = by_row(metrics.cells[:, i])
        for i, frame in enumerate(frames):
            self.pck[rows, :, frame, queries] = by_row(metrics.pck[:, :, i])
            self.corr_mass[rows, frame, queries] = by_row(metrics.corr_mass[:, i])
        if metrics.recall.shape[1]:
            self.recall[rows, :, queries] = by_row(metrics.recall)
            self.tnr[rows, :, queries] = by_row(metrics.tnr)


@dataclass
class _Options:
    """What every layer's analysis needs besides the export (sent to worker processes as it is)."""

    reference: str
    reference_frames: list[int]
    masses: np.ndarray
    radius: int
    scope: str
    correspondence: Correspondence | None
    levels: dict[tuple[int, ...], np.ndarray]  # the reference's levels by the frames a layer shares


def resolve_reference(export: AttnExport, spec: str | int | None) -> str:
    """The reference layer's name: a layer name, or a 0-based global layer number (the manifest's
    ``index``, as the seed fork's ``--start_layer``); by default the middle global layer."""
    globals_ = [n for n in export.layer_names if export.layer_meta(n)["layer_kind"] == "global"]
    numbered = {export.layer_meta(n)["block_index"]: n for n in globals_}
    if spec is None or str(spec).strip() == "":
        pool = globals_ or [
            n for n in export.layer_names if export.layer_meta(n)["layer_kind"] != ROLLOUT_KIND
        ]
        pool = pool or export.layer_names
        return pool[len(pool) // 2]
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        number = int(text)
        if number in numbered:
            return numbered[number]
        known = sorted(k for k in numbered if k is not None)
        span = f"{known[0]}..{known[-1]}" if known else "none"
        raise AnalysisError(f"no global layer {number} in this export (0-based global layers: {span})")
    if text in export.layer_names:
        return text
    raise AnalysisError(f"no layer {text!r} in this export (has {', '.join(export.layer_names)})")


def _check_masses(masses: Sequence[float]) -> np.ndarray:
    values = np.asarray([float(m) for m in masses], dtype=np.float64)
    if values.size == 0:
        raise AnalysisError("--masses needs at least one mass share")
    if not np.all((values > 0) & (values < 1)):
        raise AnalysisError(f"mass shares must lie in (0, 1), got {', '.join(f'{m:g}' for m in values)}")
    if np.unique(values).size != values.size:
        raise AnalysisError("mass shares must be distinct")
    return np.sort(values)


def _query_blocks(num_queries: int, bytes_per_query: int) -> list[slice]:
    step = max(1, _BLOCK_BYTES // max(1, bytes_per_query))
    return [slice(start, min(start + step, num_queries)) for start in range(0, num_queries, step)]


class _Layer:
    """One layer's stored arrays, read a block of queries at a time as rows: heads then the average."""

    def __init__(self, export: AttnExport, name: str) -> None:
        self.name = name
        self.meta = export.layer_meta(name)
        self.key_frames = export.key_frames(name)
        self.stored = export.heatmaps(name)
        self.special = export.special_mass(name)
        self.scales = export.head_scales(name).astype(np.float64)
        self.per_head = bool(self.meta["per_head_data"])
        self.num_heads = int(self.meta["num_heads"] or 1) if self.per_head else 1

    @property
    def bytes_per_query(self) -> int:
        return int(np.prod(self.stored.shape[1:])) * self.stored.dtype.itemsize

    def head_rows(self, block: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Heads of a block of queries: maps ``[q * heads, K, H_ds, W_ds]`` as stored, scale, special."""
        stored = np.asarray(self.stored[block])
        count = stored.shape[0]
        maps = stored.reshape(count * self.num_heads, *stored.shape[2:])
        scale = np.tile(self.scales, count)
        special = (
            None
            if self.special is None
            else np.asarray(self.special[block]).reshape(count * self.num_heads, *self.special.shape[2:])
        )
        return maps, scale, special

    @property
    def head_weights(self) -> np.ndarray:
        """``[heads]`` each head's stored unit in the head average."""
        return self.scales / self.num_heads

    def average_rows(
        self, block: slice, summed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Head average of a block of queries: maps (stored units when the layer is averaged), scale and
        special mass; ``summed``: the average when already added up (``block_metrics(average=...)``)."""
        if not self.per_head:
            maps = np.asarray(self.stored[block])
            special = None if self.special is None else np.asarray(self.special[block])
            return maps, np.full(maps.shape[0], self.scales[0]), special
        maps = (
            summed if summed is not None else head_average(np.asarray(self.stored[block]), self.head_weights)
        )
        special = None
        if self.special is not None:
            special = np.asarray(self.special[block]).astype(np.float64).mean(axis=1)
        return maps, np.ones(maps.shape[0]), special


def reference_levels(values: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """In how many of the fork's mass masks each cell lies: ``values [n, N]`` (uint8 codes or floats)
    -> ``[n, N]`` uint8."""
    thresholds = row_stats(values, 1, masses).threshold
    levels = np.zeros(values.shape, dtype=np.uint8)
    for j in range(masses.size):
        levels += values >= thresholds[:, j : j + 1]
    return levels


def _in_threads(function: Callable, parts: Sequence, workers: int) -> list:
    """``function(part)`` of every part, in up to ``workers`` threads (the kernels, numpy's sort and its
    logarithm let go of the interpreter's lock)."""
    if workers <= 1 or len(parts) <= 1:
        return [function(part) for part in parts]
    with ThreadPoolExecutor(min(workers, len(parts))) as pool:
        return list(pool.map(function, parts))


def _reference_levels(
    export: AttnExport,
    name: str,
    frame_sets: set[tuple[int, ...]],
    masses: np.ndarray,
    scope: str,
    workers: int = 1,
) -> dict[tuple[int, ...], np.ndarray]:
    """The reference layer's levels (:func:`reference_levels` of its head average) over each set of
    shared frames: ``{frames: [Q, len(frames) * cells] uint8}``; one mask per query or, with scope
    ``all``, one over all queries. An averaged layer's stored values are used as they are (a mask does
    not see the scale). ``workers`` threads share the work."""
    layer = _Layer(export, name)
    cells = layer.meta["H_ds"] * layer.meta["W_ds"]
    num_queries = layer.meta["Q"]
    stored = not layer.per_head
    dtype = layer.stored.dtype if stored else np.float64
    maps = np.empty((num_queries, len(layer.key_frames), cells), dtype=dtype)

    def fill(block: slice) -> None:
        average, _, _ = layer.average_rows(block)
        maps[block] = average.reshape(average.shape[0], average.shape[1], -1)

    _in_threads(fill, _query_blocks(num_queries, layer.bytes_per_query), workers)
    export.release(name)
    levels = {}
    parts = [slice(p[0], p[-1] + 1) for p in np.array_split(np.arange(num_queries), workers) if p.size]
    for frames in frame_sets:
        positions = [layer.key_frames.index(f) for f in frames]
        chosen = maps if positions == list(range(len(layer.key_frames))) else maps[:, positions]  # no copy
        values = chosen.reshape(num_queries, -1)
        if scope == "all":
            levels[frames] = reference_levels(values.reshape(1, -1), masses).reshape(values.shape)
        else:
            levels[frames] = np.concatenate(
                _in_threads(
                    lambda part, values=values: reference_levels(values[part], masses), parts, workers
                )
            )
    return levels


class _Analyzer:
    """The analysis of one layer (or baseline) at a time, in this process or a worker process."""

    def __init__(self, export: AttnExport, options: _Options) -> None:
        self.export = export
        self.options = options
        self.masses = options.masses
        self.radius = options.radius
        self.scope = options.scope
        first = export.layer_meta(export.layer_names[0])
        self.grid = Grid.of(first)
        self.num_frames = int(first["S"])
        self.query_frame = int(first["query_frame"])
        self.num_queries = self.grid.cells
        self.correspondence = options.correspondence
        self.targets = (
            Targets.of(self.correspondence, self.grid, self.query_frame) if self.correspondence else None
        )
        self.window_radius = max(max(PCK_RADII), self.radius)
        self.windows = self.targets.windows(self.window_radius) if self.targets is not None else None

    def shared_frames(self, key_frames: Sequence[int]) -> list[int]:
        """The key frames a layer shares with the reference layer, in the layer's order."""
        return [f for f in key_frames if f in self.options.reference_frames]

    def levels_for(self, frames: Sequence[int]) -> np.ndarray:
        """The reference's levels over ``frames`` (shared with it, in that order): ``[Q, len * cells]``."""
        return self.options.levels[tuple(frames)]

    # ---- one layer (or baseline) -----------------------------------------------------------------------

    def _windows(self, key_frames: list[int], queries: slice) -> tuple[Windows | None, np.ndarray]:
        """The target windows of ``queries``."""
        positions = np.array([p for p, f in enumerate(key_frames) if f != self.query_frame], dtype=np.int64)
        if self.windows is None or positions.size == 0:
            return None, np.zeros(0, dtype=np.int64)
        frames = np.asarray(key_frames)[positions]
        index, distance = self.windows
        windows = Windows(
            index=np.swapaxes(index[frames, queries], 0, 1),
            distance=np.swapaxes(distance[frames, queries], 0, 1),
            valid=self.targets.valid[frames, queries].T,
            positions=positions,
        )
        return windows, frames

    def _stability(self, key_frames: list[int], queries: slice) -> Stability | None:
        shared = self.shared_frames(key_frames)
        if self.scope != "query" or not shared:
            return None
        positions = np.array([key_frames.index(f) for f in shared], dtype=np.int64)
        return Stability(self.levels_for(shared)[queries], positions, self.masses)

    def _block(
        self,
        rows: _Rows,
        row_ids: slice,
        queries: slice,
        key_frames: list[int],
        maps,
        scale,
        special,
        average: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Analyse a block of rows: for each query of ``queries`` in turn, its table rows ``row_ids`` (the
        heads, or the average); ``average``: see :func:`block_metrics`."""
        windows, frames = self._windows(key_frames, queries)
        metrics = block_metrics(
            maps, scale, special, key_frames.index(self.query_frame), windows, self.radius,
            self._stability(key_frames, queries), row_ids.stop - row_ids.start, average,
        )  # fmt: skip
        rows.store(row_ids, queries, metrics, frames)

    def _overall_stability(
        self, rows: _Rows, index: int, key_frames: list[int], shared_values: np.ndarray
    ) -> None:
        """Scope ``all``: one mask over every query's shared cells of row ``index``."""
        shared = self.shared_frames(key_frames)
        levels = self.levels_for(shared).reshape(1, -1)
        stability = Stability(levels, np.arange(len(shared)), self.masses)
        recall, tnr = mask_agreement(shared_values.reshape(1, -1), stability)
        rows.overall_recall[index], rows.overall_tnr[index] = recall[0], tnr[0]

    def run(self, job: tuple) -> _JobResult:
        """One job: ``("layer", name)``, ``("same_uv",)`` or ``("uniform", name, key_frames, n_special)``:
        its records (from the float64 metrics) and its per-query arrays as ``per_query.npz`` keeps them."""
        kind, *args = job
        if kind == "layer":
            rows = self.layer(*args)
        elif kind == "same_uv":
            rows = self.same_uv()
        else:
            rows = self.uniform(*args)
        arrays = rows.arrays()
        records = records_from_arrays(arrays, self.correspondence.source if self.correspondence else None)
        return records, {key: _stored_floats(values) for key, values in arrays.items()}

    def layer(self, name: str) -> _Rows:
        layer = _Layer(self.export, name)
        heads = ["avg"] + ([str(h + 1) for h in range(layer.num_heads)] if layer.per_head else [])
        rows = _Rows(name, heads, self.num_queries, self.num_frames, self.masses.size)
        shared = self.shared_frames(layer.key_frames)
        shared_positions = [layer.key_frames.index(f) for f in shared]
        keep_all = self.scope == "all" and bool(shared)
        kept: list[list[np.ndarray]] = [[] for _ in heads]
        for block in _query_blocks(self.num_queries, layer.bytes_per_query):
            count = block.stop - block.start
            summed = None
            if layer.per_head:
                # the heads first: their average is added up while each query's heads are in cache
                maps, scale, special = layer.head_rows(block)
                summed = np.empty((count, *maps.shape[1:]))
                self._block(
                    rows, slice(1, layer.num_heads + 1), block, layer.key_frames, maps, scale, special,
                    (summed, layer.head_weights),
                )  # fmt: skip
                if keep_all:
                    by_head = maps.reshape(count, layer.num_heads, *maps.shape[1:])[:, :, shared_positions]
                    for h in range(layer.num_heads):
                        kept[h + 1].append(by_head[:, h])
            average, scale, special = layer.average_rows(block, summed)
            self._block(rows, slice(0, 1), block, layer.key_frames, average, scale, special)
            if keep_all:
                kept[0].append(average[:, shared_positions])  # stored units: a mask does not see the scale
        self.export.release(name)
        if keep_all:
            for index, parts in enumerate(kept):
                self._overall_stability(rows, index, layer.key_frames, np.concatenate(parts))
        return rows

    # ---- baselines -------------------------------------------------------------------------------------

    def uniform(self, name: str, key_frames: list[int], n_special: int) -> _Rows:
        """Attention spread evenly over every token of ``key_frames`` (patches and special tokens)."""
        rows = _Rows(name, ["avg"], self.num_queries, self.num_frames, self.masses.size)
        grid = self.grid
        tokens = len(key_frames) * (grid.H_p * grid.W_p + n_special)
        pooled = grid.patches_per_cell().astype(np.float64) / tokens
        shared = self.shared_frames(key_frames)
        for block in _query_blocks(self.num_queries, len(key_frames) * grid.cells * 8):
            count = block.stop - block.start
            maps = np.broadcast_to(pooled, (count, len(key_frames), *pooled.shape))
            special = np.full((count, len(key_frames), n_special), 1.0 / tokens) if n_special else None
            self._block(rows, slice(0, 1), block, key_frames, maps, np.ones(count), special)
        if self.scope == "all" and shared:
            values = np.broadcast_to(pooled.reshape(-1), (self.num_queries, len(shared), grid.cells))
            self._overall_stability(rows, 0, key_frames, np.ascontiguousarray(values))
        return rows

    def same_uv(self) -> _Rows:
        """Predicting each query's own cell in every frame: the pairs whose true cell is within r of it."""
        rows = _Rows("same_uv", ["avg"], self.num_queries, self.num_frames, self.masses.size)
        if self.targets is None:
            return rows
        own = Targets.same_uv(self.grid, self.num_frames, self.query_frame)
        distance = np.maximum(np.abs(own.rows - self.targets.rows), np.abs(own.cols - self.targets.cols))
        valid = self.targets.valid
        for i, radius in enumerate(PCK_RADII):
            rows.pck[0, i] = np.where(valid, (distance <= radius).astype(np.float64), np.nan)
        rows.corr_mass[0] = np.where(valid, (distance <= self.radius).astype(np.float64), np.nan)
        return rows


def run_analysis(
    export: AttnExport | str | os.PathLike[str],
    *,
    reference_layer: str | int | None = None,
    masses: Sequence[float] = DEFAULT_MASSES,
    radius: int = 1,
    stability_scope: str = "query",
    scene: str | os.PathLike[str] | None = None,
    correspondence: Correspondence | None = None,
    workers: int = 1,
    progress: Progress | None = None,
) -> Analysis:
    """Analyse every layer (and head) of an export; see ``docs/analysis.md`` for the definitions.

    Parameters
    ----------
    export : AttnExport or path
        An opened export, or anything :func:`vggt.attn_format.open_export` opens.
    reference_layer : str or int, optional
        The stability reference: a layer name or a 0-based global layer number; the middle global layer
        by default.
    masses : sequence of float
        Mass shares in (0, 1) of the stability masks.
    radius : int
        ``corr_mass`` window radius in cells (Chebyshev), at least 0.
    stability_scope : str
        ``"query"``: a mask per query (default); ``"all"``: one mask over all queries, as the seed fork.
    scene : path, optional
        A scene folder with the true geometry of the export's frames (``cameras.json`` and ``depth/``
        beside ``images/``).
    correspondence : Correspondence, optional
        True positions of the queries' points, given directly (instead of ``scene``). Without either, the
        export's own: its true geometry, else its track head's predictions; without those, the
        correspondence columns are empty.
    workers : int
        Processes that analyse layers side by side (1: all in this process). Each holds one layer's
        working memory (a few hundred MB for a per-head VGGT-1B export at stride 1).
    progress : callable, optional
        Called as ``progress(done, total, what)`` after each layer.

    Raises
    ------
    AnalysisError
        An option that does not fit the export.
    FormatError
        An export that cannot be read.
    """
    started = time.perf_counter()
    if not isinstance(export, AttnExport):
        export = open_export(export)
    export.validate()
    masses_sorted = _check_masses(masses)
    if isinstance(radius, bool) or not isinstance(radius, int | np.integer) or radius < 0:
        raise AnalysisError(f"radius must be a whole number of cells >= 0, got {radius!r}")
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 1:
        raise AnalysisError(f"workers must be a whole number >= 1, got {workers!r}")
    if stability_scope not in SCOPES:
        raise AnalysisError(f"stability scope must be one of {', '.join(SCOPES)}, got {stability_scope!r}")
    first = export.layer_meta(export.layer_names[0])
    if correspondence is None and scene is not None:
        try:
            correspondence = scene_correspondence(export, scene)
        except CorrespondenceError as exc:
            raise AnalysisError(str(exc)) from None
    elif correspondence is None:
        correspondence = export_correspondence(export)
    if correspondence is not None:
        expected = (int(first["S"]), int(first["Q"]))
        if tuple(np.asarray(correspondence.visible).shape) != expected:
            raise AnalysisError(
                f"positions for {list(np.asarray(correspondence.visible).shape)} (frames, queries) do not "
                f"fit the export's {list(expected)}"
            )
    reference = resolve_reference(export, reference_layer)
    reference_frames = export.key_frames(reference)
    all_frames = list(range(int(first["S"])))
    query_frame = int(first["query_frame"])
    # The baselines' key frames and special tokens: every frame (as global layers) and, when the export
    # has layers of one frame (frame, DINOv2), frame 0 alone.
    specials: dict[str, int] = {}
    for name in export.layer_names:
        meta = export.layer_meta(name)
        specials.setdefault(
            "all" if len(meta["key_frames"]) == len(all_frames) else "one", len(meta["special_tokens"])
        )
    baselines = [("uniform", all_frames, specials.get("all", specials.get("one", 0)))]
    if "one" in specials:
        baselines.append(("uniform_within_frame", [query_frame], specials["one"]))
    frame_sets = {
        tuple(f for f in frames if f in reference_frames)
        for frames in [export.key_frames(n) for n in export.layer_names] + [b[1] for b in baselines]
    }
    frame_sets.discard(())
    options = _Options(
        reference, reference_frames, masses_sorted, int(radius), stability_scope, correspondence,
        _reference_levels(export, reference, frame_sets, masses_sorted, stability_scope, workers),
    )  # fmt: skip
    analyzer = _Analyzer(export, options)
    jobs = [("layer", name) for name in export.layer_names] + [("same_uv",)]
    jobs += [("uniform", name, frames, n_special) for name, frames, n_special in baselines]
    results = _run_jobs(export, options, analyzer, jobs, workers, progress)

    records = [record for job_records, _ in results for record in job_records]
    per_query = _per_query_arrays([arrays for _, arrays in results], analyzer, masses_sorted)
    summary = _summary(
        export, analyzer, records, masses_sorted, stability_scope, radius, time.perf_counter() - started
    )
    return Analysis(records, per_query, summary)


_WORKER: _Analyzer | None = None  # the analyzer of a worker process


def _start_worker(export: AttnExport | str, names: list[str], options: _Options) -> None:
    """A worker's analyzer: of the export itself in a forked worker, else of the folder opened again."""
    global _WORKER
    if not isinstance(export, AttnExport):
        export = open_export(export)
        if export.layer_names != names:  # changed on disk since the analysis began
            raise FormatError(f"the export in {export.root} changed while it was being analysed")
    _WORKER = _Analyzer(export, options)


def _analyse_in_worker(job: tuple) -> _JobResult:
    assert _WORKER is not None
    return _WORKER.run(job)


def can_fork() -> bool:
    """Whether worker processes may be forked from this one: fork starts at once and runs from any script,
    but with other threads about (a web server) it could copy a held lock."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


def _run_jobs(
    export: AttnExport,
    options: _Options,
    analyzer: _Analyzer,
    jobs: list[tuple],
    workers: int,
    progress: Progress | None,
) -> list[_JobResult]:
    """The results of every job (:meth:`_Analyzer.run`), in order: here, or in ``workers`` processes (forked
    ones share this export, others open it again). ``progress`` hears of the layers."""
    names = [job[1] for job in jobs if job[0] == "layer"]
    total = len(names)
    # Workers open the export folder themselves; a zip's members are extracted as they are read, by the
    # one reader that opened it, so a zipped export is analysed here.
    if workers == 1 or total == 1 or not isinstance(export.files, FolderFiles):
        results = []
        for job in jobs:
            results.append(analyzer.run(job))
            if progress is not None and job[0] == "layer":
                progress(names.index(job[1]) + 1, total, job[1])
        return results
    methods = multiprocessing.get_all_start_methods()
    if can_fork():
        context = multiprocessing.get_context("fork")
    else:
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    by_job: dict[int, _JobResult] = {}
    done = 0
    with ProcessPoolExecutor(
        min(workers, total),
        mp_context=context,
        initializer=_start_worker,
        initargs=(export if context.get_start_method() == "fork" else str(export.root), names, options),
    ) as pool:
        # the baselines last: small jobs fill the gap while the last layers finish
        futures = {pool.submit(_analyse_in_worker, job): index for index, job in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                index = futures[future]
                by_job[index] = future.result()
                if progress is not None and jobs[index][0] == "layer":
                    done += 1
                    progress(done, total, jobs[index][1])
        except BrokenProcessPool:
            raise AnalysisError(
                f"a worker process stopped abruptly (out of memory?); try fewer workers than {workers}"
            ) from None
    return [by_job[index] for index in range(len(jobs))]


def analyze(export: AttnExport | str | os.PathLike[str], *, dataframe: bool = False, **options):
    """The analysis table of an export: a list of records (one per layer and head, then the baselines), or
    a pandas DataFrame with ``dataframe=True``. Options as :func:`run_analysis`."""
    result = run_analysis(export, **options)
    return result.dataframe() if dataframe else result.records


def _per_query_arrays(
    results: list[dict[str, np.ndarray]], analyzer: _Analyzer, masses: np.ndarray
) -> dict[str, np.ndarray]:
    """The jobs' per-query arrays as the arrays of ``per_query.npz``, with the export-wide ones."""
    arrays: dict[str, np.ndarray] = {
        "masses": _stored_floats(masses.astype(np.float64)),
        "query_points": _stored_floats(cell_centres(*analyzer.grid.shape, analyzer.grid.patch_size)),
    }
    for key in results[0]:
        arrays[key] = np.concatenate([result[key] for result in results])
    if analyzer.targets is not None:
        arrays["target_rows"] = analyzer.targets.rows.astype(np.int32)
        arrays["target_cols"] = analyzer.targets.cols.astype(np.int32)
        arrays["target_valid"] = analyzer.targets.valid
    return arrays


def _stored_floats(values: np.ndarray) -> np.ndarray:
    """Per-query floats as ``per_query.npz`` keeps them: float32 (the metrics' precision is that of the
    stored maps); other arrays as they are."""
    return values.astype(np.float32) if values.dtype == np.float64 else values


def records_from_arrays(arrays: dict[str, np.ndarray], corr_source: str | None) -> list[dict]:
    """The table (one record per row, the columns of :data:`COLUMNS`) from the per-query arrays: every
    column is the mean of its per-query values, except ``pck_r`` and ``corr_mass`` (means over the row's
    (query, frame) pairs) and the stability columns with scope ``all`` (means over the masses)."""

    def row_means(name: str) -> list[float]:
        values = np.asarray(arrays[name], dtype=np.float64)
        return _nanmean(values.reshape(values.shape[0], -1), axis=1).tolist()

    columns: dict[str, list] = {"layer": arrays["layer"].tolist(), "head": arrays["head"].tolist()}
    for name in ("cross_view_mass", "query_frame_mass", "camera_mass", "register_mass", "entropy"):
        columns[name] = row_means(name)
    for share in CELL_SHARES:
        columns[f"cells_{round(share * 100)}"] = row_means(f"cells_{round(share * 100)}")
    for radius in PCK_RADII:
        columns[f"pck_{radius}"] = row_means(f"pck_{radius}_per_frame")
    columns["corr_mass"] = row_means("corr_mass_per_frame")
    pairs = (
        np.isfinite(arrays[f"pck_{PCK_RADII[0]}_per_frame"]).reshape(len(columns["layer"]), -1).any(axis=1)
    )
    columns["corr_source"] = [corr_source if (corr_source and has) else "" for has in pairs.tolist()]
    # scope "all": the mean over the masses of one mask over all queries; else over the queries
    overall = np.isfinite(arrays["mask_recall_overall"]).any(axis=1)
    for name in ("mask_recall", "mask_tnr"):
        whole = np.mean(arrays[f"{name}_overall"], axis=1)
        columns[name] = np.where(overall, whole, row_means(name)).tolist()
    return [{name: columns[name][i] for name in COLUMNS} for i in range(len(columns["layer"]))]


def layer_head_table(records: Sequence[dict], metric: str) -> tuple[np.ndarray, list[str], list[str]]:
    """A metric as a layers x heads table from analysis records (baselines left out).

    Returns
    -------
    values : np.ndarray
        ``[layers, heads]`` float64, NaN where a layer lacks a head (the rollout has only its average).
    layers : list of str
        Layer names, in the records' order.
    heads : list of str
        ``"avg"`` then the head numbers found.
    """
    layers: list[str] = []
    heads: list[str] = ["avg"]
    for record in records:
        if record["layer"] in BASELINES:
            continue
        if record["layer"] not in layers:
            layers.append(record["layer"])
        if record["head"] not in heads:
            heads.append(record["head"])
    values = np.full((len(layers), len(heads)), np.nan)
    for record in records:
        if record["layer"] in BASELINES:
            continue
        values[layers.index(record["layer"]), heads.index(record["head"])] = record[metric]
    return values, layers, heads


def fingerprint(export: AttnExport) -> dict:
    """What ties an analysis to its export: the export's creation time, layers, grid, heads, precision."""
    first = export.layer_meta(export.layer_names[0])
    return {
        "created": export.manifest.get("created"),
        "layers": list(export.layer_names),
        "grid": {k: int(first[k]) for k in ("H_p", "W_p", "stride_h", "stride_w", "H_ds", "W_ds")},
        "frames": int(first["S"]),
        "per_head_data": bool(first["per_head_data"]),
        "num_heads": first["num_heads"],
        "precision": first["dtype"],
    }


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    finite = np.isfinite(values)
    count = finite.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(finite, values, 0.0).sum(axis=axis) / count, np.nan)


def _summary(
    export: AttnExport,
    analyzer: _Analyzer,
    records: list[dict],
    masses: np.ndarray,
    scope: str,
    radius: int,
    seconds: float,
) -> dict:
    first = export.layer_meta(export.layer_names[0])
    uint8 = first["dtype"] == "uint8"
    baselines = {
        r["layer"]: {k: _json_number(r[k]) for k in METRICS} for r in records if r["layer"] in BASELINES
    }
    valid_pairs = int(analyzer.targets.valid.sum()) if analyzer.targets is not None else 0
    return {
        "export": str(export.root),
        "fingerprint": fingerprint(export),
        "random_weights": export.random_weights,
        "layers": list(export.layer_names),
        "per_head_data": bool(first["per_head_data"]),
        "num_heads": first["num_heads"],
        "precision": first["dtype"],
        "grid": {
            k: int(first[k]) for k in ("H_p", "W_p", "stride_h", "stride_w", "H_ds", "W_ds", "patch_size")
        },
        "num_frames": analyzer.num_frames,
        "options": {
            "reference_layer": analyzer.options.reference,
            "masses": [float(m) for m in masses],
            "radius": radius,
            "stability_scope": scope,
            "pck_radii": list(PCK_RADII),
        },
        "correspondence": {
            "source": analyzer.correspondence.source if analyzer.correspondence else None,
            "pairs": valid_pairs,
        },
        "baselines": baselines,
        "columns": dict(COLUMNS),
        "exactness": _exactness_text(uint8),
        "seconds": round(seconds, 3),
    }


def _exactness_text(uint8: bool) -> str:
    if not uint8:
        return "float16 maps: the metrics are exact for the stored probabilities (float16, relative 5e-4)."
    return (
        "uint8 maps: every cell is known to within half a code (vmax99 / 510 of probability) except the "
        "cells at code 255, clipped at vmax99 (at most 1% of a layer's or head's cells), which may hold "
        "more; masses are sums of the dequantized cells, so a query's patch masses may be short by the "
        "clipped excess, and peaks, masks and cell counts are those of the stored codes (tied clipped "
        "cells share a peak)."
    )


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


__all__ = ["Analysis", "AnalysisError", "FormatError", "analyze", "resolve_reference", "run_analysis"]
