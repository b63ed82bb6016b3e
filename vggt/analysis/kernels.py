"""Order statistics and frame statistics of attention rows, one compiled pass per row (numba).

A *row* is one query's attention over ``K`` key frames of ``N / K`` cells each, in stored units: uint8
codes or float probabilities. :func:`row_stats` gives, for every row, what the analysis needs from its
values: each frame's sum, peak and number of cells at the peak, ``sum(v log v)``, and for each share of
the mass the fork's mask (its threshold and size), the fewest cells that hold the share and, against a
reference's masks, the cells the two have in common.

A row of codes is counted into a histogram (codes 255 down to 0), a float row is sorted (numpy's
sort); both are then read as *runs* of equal values in descending order, with their running cell counts
and masses, in which each share's crossing is found by binary search (:func:`_crossings`). Counting
replaces sorting: it is what makes the exact analysis of a per-head export about as fast as reading it
(``docs/analysis.md``, "Speed and memory"); numpy has no per-row counting pass of that speed.

The mask rule is the fork's (``analyze_attention.py``): sort the values in descending order, take the
first position where their running sum reaches ``share * total``; the mask holds every cell whose value
is at least the value there (ties included). An empty row (total 0) has an empty mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

CODES = 256
_CODE_VALUES = np.arange(CODES - 1, -1, -1).astype(np.float64)  # run i holds code 255 - i
_CODE_V_LOG_V = np.array([c * math.log(c) if c > 0 else 0.0 for c in _CODE_VALUES])


@njit(cache=True)
def _start() -> int:
    return 0


# numba builds its compiler's tables at its first call (about 0.3 s): here, when the module is imported,
# as numpy's own start-up is, rather than inside the first analysis.
_start()


@dataclass
class RowStats:
    """What :func:`row_stats` finds in ``n`` rows of ``K`` frames, in the rows' stored units.

    Attributes
    ----------
    frame_sums, peaks : np.ndarray
        ``[n, K]`` float64: each frame's sum and largest value.
    ties : np.ndarray
        ``[n, K]`` int64: the frame's cells holding its largest value.
    total : np.ndarray
        ``[n]`` float64: the row's sum (in the order of its descending values).
    v_log_v : np.ndarray
        ``[n]`` float64: ``sum(v log v)`` over the row's cells (``0 log 0 = 0``).
    threshold : np.ndarray
        ``[n, F]`` float64: for each share, the mask's threshold (cells at least this are in it); ``inf``
        for an empty row.
    in_mask : np.ndarray
        ``[n, F]`` int64: cells in that mask.
    smallest : np.ndarray
        ``[n, F]`` float64: the fewest cells whose values add up to the share (the cells of the crossing
        run counted one by one); NaN for an empty row.
    hits, reference : np.ndarray
        ``[n, M]`` int64, with reference levels: cells in both the row's mask of share ``mask_first + j``
        and the reference's mask ``j`` (cells of level at least ``M - j``), and cells in the reference's.
    """

    frame_sums: np.ndarray
    peaks: np.ndarray
    ties: np.ndarray
    total: np.ndarray
    v_log_v: np.ndarray
    threshold: np.ndarray
    in_mask: np.ndarray
    smallest: np.ndarray
    hits: np.ndarray
    reference: np.ndarray


def row_stats(
    rows: np.ndarray,
    num_frames: int,
    shares: np.ndarray,
    levels: np.ndarray | None = None,
    group: int = 1,
    mask_first: int = 0,
    average: tuple[np.ndarray, np.ndarray] | None = None,
) -> RowStats:
    """Frame and order statistics of every row.

    Parameters
    ----------
    rows : np.ndarray
        ``[n, N]`` uint8 codes or floats (non-negative), ``num_frames`` frames of ``N / num_frames`` cells.
    num_frames : int
        Frames per row.
    shares : np.ndarray
        ``[F]`` shares of the mass, in (0, 1).
    levels : np.ndarray, optional
        ``[n / group, N]`` uint8: in how many of the reference's ``M`` masks each cell lies (its mask ``j``,
        shares ascending, holds the cells of level at least ``M - j``); row ``i`` takes ``i // group``.
    group : int
        Consecutive rows that share one row of levels.
    mask_first : int
        Share index of the row's mask compared with the reference's first mask (the next ``M`` shares
        are compared with the next masks).
    average : tuple of np.ndarray, optional
        ``(out [n / group, N] float64, weights [group])``: each group's rows times their weights are added
        into ``out`` (rows in order, as :func:`head_average`), the heads' average read in the same pass.
    """
    rows = np.ascontiguousarray(rows)
    shares = np.ascontiguousarray(shares, dtype=np.float64)
    if average is None:
        average = (np.zeros((0, rows.shape[1])), np.zeros(group))
    out_average, weights = average[0], np.ascontiguousarray(average[1], dtype=np.float64)
    if levels is None:
        levels, num_masses = np.zeros((1, 0), dtype=np.uint8), 0
    else:
        levels, num_masses = np.ascontiguousarray(levels, dtype=np.uint8), shares.size - mask_first
    if rows.dtype == np.uint8:
        out = _code_rows(
            rows, num_frames, shares, levels, group, num_masses, mask_first, out_average, weights
        )
    else:
        rows = rows.astype(np.float64, copy=False)
        with np.errstate(divide="ignore"):
            logs = np.log(rows)  # numpy's log is vectorised, a compiled loop's is not
        ascending = np.sort(rows, axis=-1)
        out = _float_rows(
            rows,
            ascending,
            logs,
            num_frames,
            shares,
            levels,
            group,
            num_masses,
            mask_first,
            out_average,
            weights,
        )
    return RowStats(*out)


def x_log_x(values: np.ndarray) -> np.ndarray:
    """``sum(x log x)`` over the last axis of non-negative ``values`` (``0 log 0 = 0``)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logs = np.log(values)  # a plain log and a fix of the zeros: faster than a masked log
    logs[values == 0] = 0.0
    return np.einsum("...i,...i->...", values, logs)


@njit(cache=True)
def _outputs(n, num_frames, num_shares, num_masses):
    return (
        np.empty((n, num_frames)),
        np.empty((n, num_frames)),
        np.empty((n, num_frames), dtype=np.int64),
        np.empty(n),
        np.empty(n),
        np.empty((n, num_shares)),
        np.empty((n, num_shares), dtype=np.int64),
        np.empty((n, num_shares)),
        np.zeros((n, num_masses), dtype=np.int64),
        np.zeros((n, num_masses), dtype=np.int64),
    )


@njit(cache=True, nogil=True)
def _crossings(values, cum_mass, cum_cells, shares, threshold, in_mask, smallest):
    """Each share's crossing in one row's runs: ``values [R]`` descending, ``cum_mass [R]`` and
    ``cum_cells [R]`` the running mass and cells up to each run; written into the row's ``threshold``,
    ``in_mask`` and ``smallest`` (:class:`RowStats`)."""
    last = values.size - 1
    total = cum_mass[last]
    if total <= 0:
        threshold[:] = np.inf
        in_mask[:] = 0
        smallest[:] = np.nan
        return
    for j in range(shares.size):
        target = total * shares[j]
        low, high = 0, last  # the first run whose running mass reaches the target
        while low < high:
            middle = (low + high) // 2
            if cum_mass[middle] >= target:
                high = middle
            else:
                low = middle + 1
        value = values[low]
        mass_before = cum_mass[low - 1] if low else 0.0
        cells_before = cum_cells[low - 1] if low else 0
        needed = math.ceil((target - mass_before) / value)
        smallest[j] = cells_before + min(max(needed, 1), cum_cells[low] - cells_before)
        threshold[j] = value
        high = last  # the mask: the cells at least that value (a float row's later ties too)
        while low < high:
            middle = (low + high + 1) // 2
            if values[middle] >= value:
                low = middle
            else:
                high = middle - 1
        in_mask[j] = cum_cells[low]


@njit(cache=True, nogil=True)
def _code_frame_stats(frame):
    """Sum, largest code and cells at it of one frame's codes (two passes that vectorise)."""
    summed = 0
    peak = np.uint8(0)
    for c in frame:
        summed += np.uint32(c)
        peak = max(peak, c)
    at_peak = 0
    for c in frame:
        at_peak += c == peak
    return summed, peak, at_peak


@njit(cache=True, nogil=True)
def _float_frame_stats(frame, logs):
    """Sum, largest value, cells at it and ``sum(v log v)`` of one frame's floats (``logs``: ``log v``,
    ``-inf`` at 0), four partial sums and maxima at a time (a float loop does not vectorise otherwise)."""
    sums = np.zeros(4)
    peaks = np.full(4, -np.inf)
    v_log_v = np.zeros(4)
    whole = frame.size - frame.size % 4
    for i in range(0, whole, 4):
        for k in range(4):
            v = frame[i + k]
            sums[k] += v
            peaks[k] = max(peaks[k], v)
            v_log_v[k] += v * logs[i + k] if v > 0 else 0.0
    for i in range(whole, frame.size):
        v = frame[i]
        sums[0] += v
        peaks[0] = max(peaks[0], v)
        v_log_v[0] += v * logs[i] if v > 0 else 0.0
    peak = max(max(peaks[0], peaks[1]), max(peaks[2], peaks[3]))
    at_peak = 0
    for v in frame:
        at_peak += v == peak
    summed = (sums[0] + sums[1]) + (sums[2] + sums[3])
    return summed, peak, at_peak, (v_log_v[0] + v_log_v[1]) + (v_log_v[2] + v_log_v[3])


@njit(cache=True, nogil=True)
def _mask_hits(row, row_levels, lowest, empty, hits, reference):
    """Cells of a float ``row`` in each of its masks (values at least ``lowest [M]``, masses ascending;
    none when ``empty``) that are in the reference's mask ``j`` too (``row_levels`` at least ``M - j``),
    and cells in the reference's. (A row of codes counts them in its histogram.)"""
    num_masses = lowest.size
    for j in range(num_masses):
        needed = np.uint8(num_masses - j)
        in_reference = 0
        for level in row_levels:
            in_reference += level >= needed
        reference[j] = in_reference
        if empty:
            hits[j] = 0
            continue
        threshold = lowest[j]
        in_both = 0
        for i in range(row.size):
            in_both += (row_levels[i] >= needed) & (row[i] >= threshold)
        hits[j] = in_both


@njit(cache=True, nogil=True)
def _code_v_log_v(counts):
    """``sum(v log v)`` of a row of codes from its histogram (codes descending), four partial sums at a
    time."""
    partial = np.zeros(4)
    for i in range(0, CODES, 4):
        for k in range(4):
            partial[k] += counts[i + k] * _CODE_V_LOG_V[i + k]
    return (partial[0] + partial[1]) + (partial[2] + partial[3])


@njit(cache=True, nogil=True)
def _code_rows(rows, num_frames, shares, levels, group, num_masses, mask_first, average, weights):
    n, width = rows.shape
    cells = width // num_frames
    num_levels = num_masses + 1
    out = _outputs(n, num_frames, shares.size, num_masses)
    frame_sums, peaks, ties, total, v_log_v, threshold, in_mask, smallest, hits, reference = out
    histogram = np.zeros(num_levels * CODES, dtype=np.int32)
    by_level = histogram.reshape(num_levels, CODES)  # [level, 255 - code]
    counts = np.zeros(CODES, dtype=np.int32)
    cum_mass = np.zeros(CODES)
    cum_cells = np.zeros(CODES, dtype=np.int64)
    keys = np.zeros(width, dtype=np.uint16)  # level << 8 of each cell
    for r in range(n):
        row = rows[r]
        # The counting pass alone: a loop that also sums or compares runs at half its speed.
        histogram[:] = 0
        if num_masses == 0:
            for c in row:
                histogram[c ^ 255] += 1
        else:
            if r % group == 0:
                for i, level in enumerate(levels[r // group]):
                    keys[i] = np.uint16(level) << 8
            for i in range(width):
                histogram[keys[i] | (row[i] ^ 255)] += 1
        for f in range(num_frames):
            frame_sums[r, f], peaks[r, f], ties[r, f] = _code_frame_stats(row[f * cells : (f + 1) * cells])
        if average.size:
            _accumulate(average[r // group], row, weights[r % group])
        counts[:] = by_level[0]
        for level in range(1, num_levels):
            counts += by_level[level]
        row_cells = 0
        row_total = 0
        for i in range(CODES):
            row_cells += counts[i]
            row_total += counts[i] * (CODES - 1 - i)
            cum_cells[i] = row_cells
            cum_mass[i] = row_total
        total[r] = row_total
        v_log_v[r] = _code_v_log_v(counts)
        _crossings(_CODE_VALUES, cum_mass, cum_cells, shares, threshold[r], in_mask[r], smallest[r])
        for j in range(num_masses):
            # the row's mask: codes down to its threshold (none when empty); the reference's: level >= M - j
            last = -1 if row_total <= 0 else CODES - 1 - int(threshold[r, mask_first + j])
            in_reference = 0
            in_both = 0
            for level in range(num_masses - j, num_levels):
                level_counts = by_level[level]
                for i in range(last + 1):
                    in_both += level_counts[i]
                for i in range(CODES):
                    in_reference += level_counts[i]
            hits[r, j] = in_both
            reference[r, j] = in_reference
    return out


@njit(cache=True, nogil=True)
def _float_rows(
    rows, ascending, logs, num_frames, shares, levels, group, num_masses, mask_first, average, weights
):
    n, width = rows.shape
    cells = width // num_frames
    out = _outputs(n, num_frames, shares.size, num_masses)
    frame_sums, peaks, ties, total, v_log_v, threshold, in_mask, smallest, hits, reference = out
    cum_mass = np.zeros(width)
    cum_cells = np.arange(1, width + 1)
    for r in range(n):
        row = rows[r]
        row_v_log_v = 0.0
        for f in range(num_frames):
            part = slice(f * cells, (f + 1) * cells)
            frame_sums[r, f], peaks[r, f], ties[r, f], frame_v_log_v = _float_frame_stats(
                row[part], logs[r, part]
            )
            row_v_log_v += frame_v_log_v
        v_log_v[r] = row_v_log_v
        if average.size:
            _accumulate(average[r // group], row, weights[r % group])
        descending = ascending[r, ::-1]
        running = 0.0
        for i in range(width):
            running += descending[i]
            cum_mass[i] = running
        total[r] = running
        _crossings(descending, cum_mass, cum_cells, shares, threshold[r], in_mask[r], smallest[r])
        if num_masses:
            masks = threshold[r, mask_first : mask_first + num_masses]
            _mask_hits(row, levels[r // group], masks, running <= 0, hits[r], reference[r])
    return out


@njit(cache=True, nogil=True)
def _window_stats(rows, cells, positions, index, distance, group, peaks, radii, radius):
    n = rows.shape[0]
    num_positions, width = index.shape[1], index.shape[2]
    near = np.zeros((n, radii.size, num_positions), dtype=np.int64)
    near_mass = np.zeros((n, num_positions))
    for r in range(n):
        row = rows[r]
        for c in range(num_positions):
            base = positions[c] * cells
            peak = peaks[r, positions[c]]
            for k in range(width):
                value = row[base + index[r // group, c, k]]
                d = distance[r // group, c, k]
                if d <= radius:
                    near_mass[r, c] += value
                if value == peak:
                    for i in range(radii.size):
                        near[r, i, c] += d <= radii[i]
    return near, near_mass


def window_stats(
    rows: np.ndarray,
    num_frames: int,
    positions: np.ndarray,
    index: np.ndarray,
    distance: np.ndarray,
    peaks: np.ndarray,
    radii: tuple[int, ...],
    radius: int,
    group: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The cells around each row's targets: how many of them hold the frame's peak, and their mass.

    Parameters
    ----------
    rows : np.ndarray
        ``[n, N]`` values, ``num_frames`` frames of ``N / num_frames`` cells.
    positions : np.ndarray
        ``[C]`` frames (positions in the row) that have targets.
    index, distance : np.ndarray
        ``[n / group, C, w]`` each window cell's index in its frame and its Chebyshev distance to the
        target; row ``i`` takes ``i // group``.
    peaks : np.ndarray
        ``[n, num_frames]`` each frame's largest value (:attr:`RowStats.peaks`).
    radii : tuple of int
        Distances at which the peak cells are counted.
    radius : int
        Distance within which the mass is summed.

    Returns
    -------
    near : np.ndarray
        ``[n, len(radii), C]`` int64: window cells at the frame's peak within each radius.
    near_mass : np.ndarray
        ``[n, C]`` float64: the values of the window cells within ``radius``.
    """
    rows = np.ascontiguousarray(rows)
    if rows.dtype == np.float16:
        rows = rows.astype(np.float32)
    cells = rows.shape[1] // num_frames
    return _window_stats(
        rows,
        cells,
        np.ascontiguousarray(positions, dtype=np.int64),
        np.ascontiguousarray(index, dtype=np.int64),
        np.ascontiguousarray(distance, dtype=np.int64),
        group,
        np.ascontiguousarray(peaks, dtype=np.float64),
        np.asarray(radii, dtype=np.int64),
        radius,
    )


@njit(cache=True, nogil=True, fastmath={"contract"})
def _accumulate(total, row, weight):
    """``total += row * weight``, cell by cell (the heads of an average are added in order; a fused
    multiply-add where the processor has one)."""
    for i in range(row.size):
        total[i] += row[i] * weight


@njit(cache=True, nogil=True)
def _head_average(stored, weights):
    count, num_heads, width = stored.shape
    out = np.zeros((count, width))
    for q in range(count):
        for h in range(num_heads):
            _accumulate(out[q], stored[q, h], weights[h])
    return out


def head_average(stored: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_h stored[:, h] * weights[h]`` of ``stored [q, heads, ...]`` (uint8 or floats): ``[q, ...]``
    float64, the heads added in order."""
    stored = np.ascontiguousarray(stored)
    if stored.dtype == np.float16:
        stored = stored.astype(np.float32)  # exact; the compiled loop has no float16
    flat = stored.reshape(stored.shape[0], stored.shape[1], -1)
    average = _head_average(flat, np.ascontiguousarray(weights, dtype=np.float64))
    return average.reshape(stored.shape[:1] + stored.shape[2:])
