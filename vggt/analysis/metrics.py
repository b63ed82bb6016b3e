"""The metrics of a block of attention rows (numpy, over the compiled row pass of :mod:`kernels`).

A *row* is one query's attention in one layer, for one head or the head average: maps over the layer's
key frames ``[K, H_ds, W_ds]`` (uint8 codes or float probabilities, times a per-row ``scale``) and the
special-token mass ``[K, n_special]``. :func:`block_metrics` computes every column of the analysis for a
block of rows at once; the definitions are in ``docs/analysis.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vggt.analysis.kernels import RowStats, TargetWindows, row_stats, x_log_x

CELL_SHARES = (0.5, 0.9)  # cells_50, cells_90
PCK_RADII = (0, 1, 2)  # pck_0, pck_1, pck_2


@dataclass
class Windows:
    """The cells around each row's targets in the layer's cross-view key frames.

    Attributes
    ----------
    index : np.ndarray
        ``[n / group, C, w]`` flat cell index in the frame of cross-view key-frame position ``c``.
    distance : np.ndarray
        ``[n / group, C, w]`` Chebyshev distance in cells (beyond every radius where a cell does not count).
    valid : np.ndarray
        ``[n / group, C]`` bool: the (query, frame) pair counts.
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
        ascending: a cell in the mask of mass ``j`` has level at least ``M - j``), one row per query (the
        heads of a query share the query's).
    positions : np.ndarray
        Positions along the layer's K axis of the shared frames.
    masses : np.ndarray
        ``[M]`` mass shares, ascending.
    """

    levels: np.ndarray
    positions: np.ndarray
    masses: np.ndarray


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


def mask_agreement(rows: np.ndarray, stability: Stability, group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Recall and true-negative rate of each row's mass masks against the reference's.

    Parameters
    ----------
    rows : np.ndarray
        ``[n, N]`` values over the shared cells (uint8 codes or floats).
    stability : Stability
        The reference's levels for these rows' cells.
    group : int
        Consecutive rows that share one row of levels.

    Returns
    -------
    recall, tnr : np.ndarray
        ``[n, M]`` float64 each; 1 where the reference mask (or its complement) is empty, as the fork.
    """
    stats = row_stats(rows, 1, stability.masses, levels=stability.levels, group=group)
    return _agreement(stats, 0, rows.shape[-1])


def _agreement(stats: RowStats, mask_first: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall and true-negative rate from :func:`row_stats`' counts (the row's masks from share
    ``mask_first`` on) over ``cells`` cells: ``[n, M]`` float64 each."""
    hits, reference = stats.hits, stats.reference
    in_mask = stats.in_mask[:, mask_first:]
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(reference > 0, hits / reference, 1.0)
        negatives = cells - reference
        tnr = np.where(negatives > 0, (negatives - (in_mask - hits)) / negatives, 1.0)
    return recall, tnr


def normalized_entropy(x_log_x: np.ndarray, total: np.ndarray, count: int) -> np.ndarray:
    """Entropy of ``p = x / total`` over ``count`` entries, divided by ``log(count)``, from
    ``sum(x log x)``: ``-(sum(x log x) / total - log total) / log count``; NaN where ``total`` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.log(total) - x_log_x / total
    entropy = np.where(total > 0, entropy, np.nan)
    if count <= 1:
        return np.where(total > 0, 0.0, np.nan)
    return np.clip(entropy / np.log(count), 0.0, 1.0)  # in [0, 1] but for the last bit of rounding


def block_metrics(
    maps: np.ndarray,
    scale: np.ndarray,
    special: np.ndarray | None,
    query_position: int,
    windows: Windows | None,
    radius: int,
    stability: Stability | None,
    group: int = 1,
    average: tuple[np.ndarray, np.ndarray] | None = None,
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
    group : int
        Consecutive rows of one query (its heads), which share its windows and levels.
    average : tuple of np.ndarray, optional
        ``(out [n / heads, K, H_ds, W_ds] float64, weights [heads])``: the rows (the heads of each query)
        times their weights are added into ``out`` as they are read (:func:`row_stats`).
    """
    n, num_keys = maps.shape[:2]
    cells_per_frame = maps.shape[2] * maps.shape[3]
    frames = maps.reshape(n, num_keys, cells_per_frame)
    whole = frames.reshape(n, -1)
    scale = np.asarray(scale, dtype=np.float64)
    nan = np.full(n, np.nan)

    # Every statistic of the rows' values in one pass per row: the cell shares', then (when the masks cover
    # the same cells as the reference's) the masks'.
    same_cells = stability is not None and stability.positions.size == num_keys
    shares = np.concatenate([CELL_SHARES, stability.masses if same_cells else []])
    positions = windows.positions if windows is not None else np.zeros(0, dtype=np.int64)
    stats = row_stats(
        whole,
        num_keys,
        shares,
        levels=stability.levels if same_cells else None,
        mask_first=len(CELL_SHARES),
        group=group,
        average=None if average is None else (average[0].reshape(average[0].shape[0], -1), average[1]),
        windows=None
        if windows is None or not positions.size
        else TargetWindows(positions, windows.index, windows.distance, PCK_RADII, radius),
    )
    frame_mass = stats.frame_sums * scale[:, None]  # [n, K]
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

    # sum of x log x for x = scale * v: scale * sum(v log v) + scale log(scale) * sum(v)
    log_scale = np.log(np.where(scale > 0, scale, 1.0))
    sum_x_log_x = scale * (stats.v_log_v + log_scale * stats.total) + x_log_x(special_flat)
    entropy = normalized_entropy(sum_x_log_x, total, whole.shape[-1] + special_flat.shape[-1])
    cells = stats.smallest[:, : len(CELL_SHARES)] / whole.shape[-1]
    num_masses = stability.masses.size if stability is not None else 0
    recall, tnr = np.empty((n, num_masses)), np.empty((n, num_masses))
    if same_cells:
        recall, tnr = _agreement(stats, len(CELL_SHARES), whole.shape[-1])
    elif stability is not None:
        shared = frames[:, stability.positions].reshape(n, -1)
        recall, tnr = mask_agreement(shared, stability, group)

    pck = np.full((n, len(PCK_RADII), positions.size), np.nan)
    corr_mass = np.full((n, positions.size), np.nan)
    if windows is not None and positions.size:
        valid = np.repeat(windows.valid, group, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            pck[:] = np.where(valid[:, None], stats.near / stats.ties[:, None, positions], np.nan)
            cross_sums = stats.frame_sums[:, positions]
            corr_mass[:] = np.where(valid & (cross_sums > 0), stats.near_mass / cross_sums, np.nan)

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
