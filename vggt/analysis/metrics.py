"""The metrics of a block of attention rows (numpy only).

A *row* is one query's attention in one layer, for one head or the head average: maps over the layer's
key frames ``[K, H_ds, W_ds]`` (uint8 codes or float probabilities, times a per-row ``scale``) and the
special-token mass ``[K, n_special]``. :func:`block_metrics` computes every column of the analysis for a
block of rows at once; the definitions are in ``docs/analysis.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vggt.analysis.ranks import (
    CODES,
    Runs,
    code_histograms,
    code_rows_per_call,
    code_runs,
    crossings,
    entropy_terms,
    normalized_entropy,
    sorted_runs,
    take_rows,
    x_log_x,
)

CELL_SHARES = (0.5, 0.9)  # cells_50, cells_90
_CODE_CALLS_PER_CHUNK = 8  # code histogram calls whose rows are ranked together
PCK_RADII = (0, 1, 2)  # pck_0, pck_1, pck_2


@dataclass
class Windows:
    """The cells around each row's targets in the layer's cross-view key frames.

    Attributes
    ----------
    index : np.ndarray
        ``[n, C, w]`` flat cell index in the frame of cross-view key-frame position ``c``.
    distance : np.ndarray
        ``[n, C, w]`` Chebyshev distance in cells (beyond every radius where a cell does not count).
    valid : np.ndarray
        ``[n, C]`` bool: the (query, frame) pair counts.
    positions : np.ndarray
        ``[C]`` positions along the layer's K axis of the cross-view key frames.
    """

    index: np.ndarray
    distance: np.ndarray
    valid: np.ndarray
    positions: np.ndarray


@dataclass
class Stability:
    """The reference layer's masks for a block of rows, over the key frames the layer shares with it.

    Attributes
    ----------
    levels : np.ndarray
        ``[n / group, N]`` uint8: in how many of the reference's masks each shared cell lies (masses
        ascending: a cell in the mask of mass ``j`` has level at least ``M - j``); row ``i`` of the block
        takes row ``i // group`` (the heads of a query share the query's).
    positions : np.ndarray
        Positions along the layer's K axis of the shared frames.
    masses : np.ndarray
        ``[M]`` mass shares, ascending.
    group : int
        Consecutive rows of the block that share one row of levels.
    """

    levels: np.ndarray
    positions: np.ndarray
    masses: np.ndarray
    group: int = 1

    def rows(self, rows: slice) -> Stability:
        """The levels of rows ``rows`` of the block (whole groups)."""
        return Stability(
            self.levels[rows.start // self.group : -(-rows.stop // self.group)],
            self.positions,
            self.masses,
            self.group,
        )


@dataclass
class BlockMetrics:
    """Every metric of a block of ``n`` rows (NaN where a metric does not apply)."""

    cross_view_mass: np.ndarray  # [n]
    query_frame_mass: np.ndarray  # [n]
    camera_mass: np.ndarray  # [n]
    register_mass: np.ndarray  # [n]
    entropy: np.ndarray  # [n]
    cells: np.ndarray  # [n, len(CELL_SHARES)]
    pck: np.ndarray  # [n, len(PCK_RADII), C] per cross-view key frame
    corr_mass: np.ndarray  # [n, C]
    recall: np.ndarray  # [n, M]
    tnr: np.ndarray  # [n, M]


def _runs(rows: np.ndarray, stability: Stability | None) -> tuple[Runs, np.ndarray | None]:
    """Runs of rows ``[n, N]``; for uint8 rows with the reference's levels also the histograms split by
    level ``[n, L, 256]`` (codes descending), which give the mask agreement without another pass."""
    if rows.dtype != np.uint8:
        return sorted_runs(rows), None
    if stability is None:
        return code_runs(code_histograms(rows)[:, 0]), None
    by_level = code_histograms(rows, stability.levels, stability.masses.size + 1, stability.group)
    counts = by_level[:, 0].copy()
    for level in range(1, by_level.shape[1]):
        counts += by_level[:, level]
    return code_runs(counts), by_level


def mask_agreement(
    rows: np.ndarray,
    stability: Stability,
    runs: tuple[Runs, np.ndarray | None] | None = None,
    crossed: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Recall and true-negative rate of each row's mass masks against the reference's.

    Parameters
    ----------
    rows : np.ndarray
        ``[n, N]`` values over the shared cells (uint8 codes or floats).
    stability : Stability
        The reference's levels for these rows' cells.
    runs : tuple, optional
        ``_runs(rows, stability)`` when already computed.
    crossed : tuple, optional
        The masks' thresholds and sizes (``crossings(runs, masses)[:2]``) when already computed.

    Returns
    -------
    recall, tnr : np.ndarray
        ``[n, M]`` float64 each; 1 where the reference mask (or its complement) is empty, as the fork.
    """
    masses = stability.masses
    num_masses = masses.size
    levels = stability.levels
    ranked, by_level = runs if runs is not None else _runs(rows, stability)
    threshold, in_mask = crossed if crossed is not None else crossings(ranked, masses)[:2]
    needed = num_masses - np.arange(num_masses)  # reference mask j: levels >= M - j
    if by_level is not None:
        # Codes descending: the mask of row r and mass j holds the codes down to its threshold (none when the
        # row is empty), the reference's the cells of level >= M - j.
        empty = ~np.isfinite(threshold)
        run = (CODES - 1 - np.where(empty, CODES - 1, threshold)).astype(np.int64)  # [n, M]
        hits, reference = _cells_at_levels(by_level, run)
        hits = np.where(empty, 0, hits)
    else:
        hits = np.empty((rows.shape[0], num_masses), dtype=np.int64)
        reference = np.empty_like(hits)
        group = stability.group
        values = rows.astype(np.float64, copy=False).reshape(-1, group, rows.shape[-1])
        for j in range(num_masses):
            in_reference = (levels >= needed[j])[:, None, :]
            taken = values >= threshold[:, j].reshape(-1, group, 1)
            hits[:, j] = np.count_nonzero(taken & in_reference, axis=-1).reshape(-1)
            reference[:, j] = np.repeat(np.count_nonzero(in_reference, axis=-1), group, axis=0).reshape(-1)
    cells = rows.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(reference > 0, hits / reference, 1.0)
        negatives = cells - reference
        tnr = np.where(negatives > 0, (negatives - (in_mask - hits)) / negatives, 1.0)
    return recall, tnr


def _cells_at_levels(by_level: np.ndarray, run: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells of level at least ``M - j`` among the first ``run[:, j] + 1`` codes (descending) and in all,
    for histograms split by level ``by_level [n, M + 1, 256]``: ``[n, M]`` int64 each.

    The counts of several levels share one 64-bit integer (a field of ``bits`` bits each, wide enough for
    a row's cells), so that one running sum over the codes serves them all."""
    n, num_levels, width = by_level.shape
    num_masses = num_levels - 1
    bits = max(1, int(by_level[0].sum()).bit_length() if n else 1)
    per_word = max(1, 62 // bits)
    hits, reference = np.empty((n, num_masses), np.int64), np.empty((n, num_masses), np.int64)
    field = np.int64((1 << bits) - 1)
    for first in range(0, num_masses, per_word):
        masses = range(first, min(first + per_word, num_masses))
        packed = np.zeros((n, width), dtype=np.int64)
        for level in range(1, num_levels):
            # level l counts for mass j when l >= M - j
            weight = sum(1 << (bits * (j - first)) for j in masses if level >= num_masses - j)
            if weight:
                packed += by_level[:, level] * np.int64(weight)
        np.cumsum(packed, axis=-1, out=packed)
        taken = take_rows(packed, run[:, first : masses.stop])
        for j in masses:
            shift = np.int64(bits * (j - first))
            hits[:, j] = (taken[:, j - first] >> shift) & field
            reference[:, j] = (packed[:, -1] >> shift) & field
    return hits, reference


def _ranked_metrics(
    frames: np.ndarray,
    scale: np.ndarray,
    special_flat: np.ndarray,
    total: np.ndarray,
    stability: Stability | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Entropy, cell shares and mask agreement of rows ``frames [n, K, cells]``: everything that needs a
    row's values in order. uint8 rows go a few at a time (:func:`code_rows_per_call`), so that their
    histograms stay in the cache between the steps that read them."""
    n, num_keys = frames.shape[:2]
    whole = frames.reshape(n, -1)
    same_cells = stability is not None and stability.positions.size == num_keys
    num_masses = stability.masses.size if stability is not None else 0
    entropy, cells = np.empty(n), np.empty((n, len(CELL_SHARES)))
    recall, tnr = np.empty((n, num_masses)), np.empty((n, num_masses))
    group = stability.group if stability is not None else 1
    if whole.dtype == np.uint8:
        # Histograms of a few hundred rows at a time: small enough for the cache, large enough that each
        # numpy call does real work.
        step = _CODE_CALLS_PER_CHUNK * code_rows_per_call(num_masses + 1 if same_cells else 1, group)
    else:
        step = n
    # One search for every share: the cell shares', then (when the masks cover the same cells) the masks'.
    fractions = np.concatenate([CELL_SHARES, stability.masses if same_cells else []])
    shares = len(CELL_SHARES)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        part = stability.rows(rows) if stability is not None else None
        # Ranks of the whole row (every key frame), split by the reference's levels when they cover the
        # same cells.
        runs = _runs(whole[rows], part if same_cells else None)
        sum_x_log_x = entropy_terms(runs[0], scale[rows]) + x_log_x(special_flat[rows])
        entropy[rows] = normalized_entropy(sum_x_log_x, total[rows], whole.shape[-1] + special_flat.shape[-1])
        threshold, in_mask, smallest = crossings(runs[0], fractions)
        cells[rows] = smallest[:, :shares] / whole.shape[-1]
        if part is None:
            continue
        if same_cells:
            crossed = (threshold[:, shares:], in_mask[:, shares:])
            recall[rows], tnr[rows] = mask_agreement(whole[rows], part, runs, crossed)
        else:
            shared = frames[rows][:, part.positions].reshape(rows.stop - rows.start, -1)
            recall[rows], tnr[rows] = mask_agreement(shared, part)
    return entropy, cells, recall, tnr


def block_metrics(
    maps: np.ndarray,
    scale: np.ndarray,
    special: np.ndarray | None,
    query_position: int,
    windows: Windows | None,
    radius: int,
    stability: Stability | None,
) -> BlockMetrics:
    """Every metric of ``n`` rows.

    Parameters
    ----------
    maps : np.ndarray
        ``[n, K, H_ds, W_ds]`` uint8 codes or float probabilities over the layer's key frames.
    scale : np.ndarray
        ``[n]`` probability per stored unit (``vmax99 / 255`` for codes, 1 for probabilities).
    special : np.ndarray or None
        ``[n, K, n_special]`` special-token probabilities (camera or class token first), or None.
    query_position : int
        Position of the query frame along K.
    windows : Windows or None
        Target windows, when the layer has cross-view frames and positions are known.
    radius : int
        ``corr_mass`` window radius in cells.
    stability : Stability or None
        The reference's masks, when stability is computed per row.
    """
    n, num_keys = maps.shape[:2]
    cells_per_frame = maps.shape[2] * maps.shape[3]
    frames = maps.reshape(n, num_keys, cells_per_frame)
    scale = np.asarray(scale, dtype=np.float64)
    if maps.dtype == np.uint8:
        stored_sums = frames.sum(axis=-1, dtype=np.uint32).astype(np.float64)
    else:
        stored_sums = frames.sum(axis=-1, dtype=np.float64)
    frame_mass = stored_sums * scale[:, None]  # [n, K]
    nan = np.full(n, np.nan)

    query_frame_mass = frame_mass[:, query_position]
    others = np.delete(np.arange(num_keys), query_position)
    cross_view_mass = frame_mass[:, others].sum(axis=-1) if others.size else nan
    if special is not None:
        special = np.asarray(special, dtype=np.float64)
        camera_mass = special[..., 0].sum(axis=-1)
        register_mass = special[..., 1:].sum(axis=(-2, -1))
        special_flat = special.reshape(n, -1)
    else:
        camera_mass = register_mass = nan
        special_flat = np.zeros((n, 0))

    total = frame_mass.sum(axis=-1) + special_flat.sum(axis=-1)
    entropy, cells, recall, tnr = _ranked_metrics(frames, scale, special_flat, total, stability)

    positions = windows.positions if windows is not None else np.zeros(0, dtype=np.int64)
    pck = np.full((n, len(PCK_RADII), positions.size), np.nan)
    corr_mass = np.full((n, positions.size), np.nan)
    if windows is not None and positions.size:
        contiguous = bool(np.all(np.diff(positions) == 1))
        # [n, C, cells]: a view when the cross-view frames follow each other (they do in exports)
        cross = frames[:, positions[0] : positions[-1] + 1] if contiguous else frames[:, positions]
        peak = cross.max(axis=-1)
        # a sum of the comparison's bytes: half the time of np.count_nonzero over an axis
        tie_type = np.uint16 if cells_per_frame < 1 << 16 else np.int64
        ties = (cross == peak[..., None]).view(np.uint8).sum(axis=-1, dtype=tie_type)
        window = np.take_along_axis(cross, windows.index, axis=-1)  # [n, C, w]
        at_peak = window == peak[..., None]
        for i, r in enumerate(PCK_RADII):
            near = np.count_nonzero(at_peak & (windows.distance <= r), axis=-1)
            pck[:, i] = np.where(windows.valid, near / ties, np.nan)
        near_mass = np.where(windows.distance <= radius, window, 0).sum(axis=-1, dtype=np.float64)
        cross_sums = stored_sums[:, positions]
        with np.errstate(divide="ignore", invalid="ignore"):
            corr_mass[:] = np.where(windows.valid & (cross_sums > 0), near_mass / cross_sums, np.nan)

    return BlockMetrics(
        cross_view_mass=cross_view_mass,
        query_frame_mass=query_frame_mass,
        camera_mass=camera_mass,
        register_mass=register_mass,
        entropy=entropy,
        cells=cells,
        pck=pck,
        corr_mass=corr_mass,
        recall=recall,
        tnr=tnr,
    )
