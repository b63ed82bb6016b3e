"""What the analysis reads from attention rows, one compiled pass per row (numba).

A *row* is one query's attention over ``K`` key frames of ``N / K`` cells each, in stored units: uint8
codes or float probabilities. :func:`row_stats` gives, for every row, all that the analysis needs from
its values: each frame's sum, peak and cells at the peak, ``sum(v log v)``, for each share of the mass
the fork's mask (threshold and size) and the fewest cells that hold the share, the cells the row's masks
share with a reference's, the peak cells and mass around target cells, and (for the heads of a query)
their weighted average. Each row is read from memory once; every step after the first works on it while
it is in the processor's cache.

A row of codes is counted into a histogram (codes 255 down to 0), read as *runs* of equal values in
descending order with their running cell counts and masses, in which each share's crossing is found by
binary search (:func:`_crossings`). A float row is counted into buckets by its values' leading bits, and
only the bucket where a share's running mass crosses is searched further (:func:`_float_crossings`,
:func:`_select`). Counting instead of sorting, and one pass instead of one numpy call per statistic, is
what makes the exact analysis of a per-head export about as fast as reading it (``docs/analysis.md``,
"Speed and memory").

The mask rule is the fork's (``analyze_attention.py``): sort the values in descending order, take the
first position where their running sum reaches ``share * total``; the mask holds every cell whose value
is at least the value there (ties included). An empty row (total 0) has an empty mask.

Nothing here checks an index: :func:`row_stats` checks every shape before a kernel runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

try:
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # numpy, Pillow and Gradio alone: exports and saved analyses open, none is computed
    HAVE_NUMBA = False

    def njit(*_, **__):
        def decorate(function):
            def missing(*_, **__):
                raise ModuleNotFoundError("computing an analysis needs numba (pip install numba)")

            return missing

        return decorate


CODES = 256
_SMALLEST_NORMAL = np.finfo(np.float64).tiny
_CELLS_IN_32_BITS = (2**32 - 1) // (CODES - 1)  # a frame of codes whose sum fits 32 bits
_CODE_VALUES = np.arange(CODES - 1, -1, -1).astype(np.float64)  # run i holds code 255 - i
_CODE_V_LOG_V = np.array([c * math.log(c) if c > 0 else 0.0 for c in _CODE_VALUES])


@njit(cache=True)
def _start() -> int:
    return 0


# numba builds its compiler's tables at its first call (about 0.3 s): here, when the module is imported,
# as numpy's own start-up is, rather than inside the first analysis.
if HAVE_NUMBA:
    _start()


@dataclass
class TargetWindows:
    """The cells around each query's targets in some of the row's frames.

    Attributes
    ----------
    positions : np.ndarray
        ``[C]`` the frames (positions in the row) that have targets.
    index, distance : np.ndarray
        ``[n / group, C, w]`` int64: each window cell's index in its frame and its Chebyshev distance to
        the target (beyond every radius where the cell does not count).
    radii : tuple of int
        Distances at which the cells at a frame's peak are counted.
    radius : int
        Distance within which the mass is summed.
    """

    positions: np.ndarray
    index: np.ndarray
    distance: np.ndarray
    radii: tuple[int, ...]
    radius: int


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
        ``[n]`` float64: the row's sum (codes: exact; floats: added bucket by bucket, largest first).
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
    near : np.ndarray
        ``[n, len(radii), C]`` int64, with target windows: window cells at the frame's peak within each
        radius.
    near_mass : np.ndarray
        ``[n, C]`` float64, with target windows: the values of the window cells within ``radius``.
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
    near: np.ndarray
    near_mass: np.ndarray


def row_stats(
    rows: np.ndarray,
    num_frames: int,
    shares: np.ndarray,
    *,
    levels: np.ndarray | None = None,
    mask_first: int = 0,
    group: int = 1,
    average: tuple[np.ndarray, np.ndarray] | None = None,
    windows: TargetWindows | None = None,
) -> RowStats:
    """Frame, order and window statistics of every row.

    Parameters
    ----------
    rows : np.ndarray
        ``[n, N]`` uint8 codes or floats (non-negative), ``num_frames`` frames of ``N / num_frames`` cells.
    num_frames : int
        Frames per row.
    shares : np.ndarray
        ``[F]`` shares of the mass, in (0, 1).
    levels : np.ndarray, optional
        ``[n / group, N]`` uint8: in how many of the reference's ``M = F - mask_first`` masks each cell
        lies (its mask ``j``, shares ascending, holds the cells of level at least ``M - j``).
    mask_first : int
        Share index of the row's mask compared with the reference's first mask (the next ``M - 1``
        shares are compared with the next masks).
    group : int
        Consecutive rows of one query (its heads): they share a row of ``levels`` and of windows.
    average : tuple of np.ndarray, optional
        ``(out [n / group, N] float64, weights [group])``: each group's rows times their weights, added up
        (as :func:`head_average`) into ``out`` while they are in the processor's cache.
    windows : TargetWindows, optional
        The cells around the targets, for :attr:`RowStats.near` and :attr:`RowStats.near_mass`.
    """
    rows = np.ascontiguousarray(rows)
    n, width = rows.shape
    shares = np.ascontiguousarray(shares, dtype=np.float64).reshape(-1)
    if group < 1 or n % group or num_frames < 1 or width % num_frames:
        raise ValueError(f"rows {rows.shape} do not split into groups of {group} and {num_frames} frames")
    queries = n // group
    if levels is None:
        levels, num_masses = np.zeros((1, 0), dtype=np.uint8), 0
    else:
        levels, num_masses = np.ascontiguousarray(levels, dtype=np.uint8), shares.size - mask_first
        if levels.shape != (queries, width) or not 0 < num_masses <= shares.size or levels.max() > num_masses:
            raise ValueError(f"levels {levels.shape} do not fit rows {rows.shape} and {num_masses} masks")
    if average is None:
        out_average, weights = np.zeros((0, width)), np.zeros(group)
    else:
        out_average, weights = average[0], np.ascontiguousarray(average[1], dtype=np.float64)
        if (
            out_average.shape != (queries, width)
            or out_average.dtype != np.float64
            or weights.shape != (group,)
        ):
            raise ValueError(
                f"average {out_average.shape} does not fit rows {rows.shape} in groups of {group}"
            )
    if windows is None:
        positions = np.zeros(0, dtype=np.int64)
        index = distance = np.zeros((queries, 0, 0), dtype=np.int64)
        radii, radius = np.zeros(0, dtype=np.int64), 0
    else:
        positions = np.ascontiguousarray(windows.positions, dtype=np.int64)
        index = np.ascontiguousarray(windows.index, dtype=np.int64)
        distance = np.ascontiguousarray(windows.distance, dtype=np.int64)
        radii, radius = np.asarray(windows.radii, dtype=np.int64), int(windows.radius)
        cells = width // num_frames
        if (
            index.shape != distance.shape
            or index.shape[:2] != (queries, positions.size)
            or (positions.size and (positions.min() < 0 or positions.max() >= num_frames))
            or (index.size and (index.min() < 0 or index.max() >= cells))
        ):
            raise ValueError(f"target windows {index.shape} do not fit rows {rows.shape}")
    common = (num_frames, shares, levels, num_masses, mask_first, group, out_average, weights)
    common += (positions, index, distance, radii, radius)
    if rows.dtype == np.uint8:
        return RowStats(*_code_rows(rows, *common))
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    # numpy's log is vectorised, a compiled loop's is not. Only positive values' logs are read: the others
    # (zeros, which numpy's log takes four times as long over, and a hostile negative value or NaN) are
    # raised to the smallest normal float first.
    logs = np.fmax(rows, _SMALLEST_NORMAL)
    np.log(logs, out=logs)
    return RowStats(*_float_rows(rows, logs, *common))


def x_log_x(values: np.ndarray) -> np.ndarray:
    """``sum(x log x)`` over the last axis of non-negative ``values`` (``0 log 0 = 0``), numpy."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logs = np.log(values)  # a plain log and a fix of the zeros: faster than a masked log
    logs[values == 0] = 0.0
    return np.einsum("...i,...i->...", values, logs)


@njit(cache=True)
def _outputs(n, num_frames, num_shares, num_masses, num_radii, num_positions):
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
        np.zeros((n, num_radii, num_positions), dtype=np.int64),
        np.zeros((n, num_positions)),
    )


@njit(cache=True, nogil=True)
def _first_reaching(cum_mass, target):
    """The first index where the running mass ``cum_mass`` (non-decreasing) reaches ``target``, else the
    last (binary search; each step a select rather than a branch, which the processor could not
    predict)."""
    low = 0
    size = cum_mass.size
    while size > 1:
        half = size // 2
        low = low + half if cum_mass[low + half - 1] < target else low
        size -= half
    return low


@njit(cache=True, nogil=True)
def _run_cells(missing, value, size):
    """The cells of a run of ``size`` cells of ``value`` that add up to the ``missing`` mass: at least one,
    at most the run."""
    needed = math.ceil(missing / value) if value > 0 else size
    return min(max(needed, 1), size)


@njit(cache=True, nogil=True)
def _crossings(values, cum_mass, cum_cells, shares, threshold, in_mask, smallest):
    """Each share's crossing in one row's runs: ``values [R]`` distinct and descending (codes), ``cum_mass
    [R]`` and ``cum_cells [R]`` the running mass and cells up to each run; written into the row's
    ``threshold``, ``in_mask`` and ``smallest`` (:class:`RowStats`). The mask, the cells at least the
    crossing's value, ends with the crossing's run."""
    last = values.size - 1
    total = cum_mass[last]
    if total <= 0:
        threshold[:] = np.inf
        in_mask[:] = 0
        smallest[:] = np.nan
        return
    for j in range(shares.size):
        target = total * shares[j]
        low = _first_reaching(cum_mass, target)
        value = values[low]
        mass_before = cum_mass[low - 1] if low else 0.0
        cells_before = cum_cells[low - 1] if low else 0
        smallest[j] = cells_before + _run_cells(target - mass_before, value, cum_cells[low] - cells_before)
        threshold[j] = value
        in_mask[j] = cum_cells[low]


# A non-negative float's leading bits order it as its value does: its exponent and its first 6 mantissa
# bits make buckets 1/64 of an octave wide; the 32 octaves below a row's peak have a bucket each, and
# smaller values (zeros too) share the last one.
_BUCKET_SHIFT = 46
_BUCKETS = 32 * 64


@njit(cache=True, nogil=True)
def _select(source, scratch, target, mass_before, cells_before, counts, masses):
    """The crossing of a running mass among the values of ``source`` (in any order): the value at which
    ``mass_before`` plus the values taken in descending order first reaches ``target``, the cells up to it
    (``cells_before`` and those values, one by one) and the cells at least that value.

    The values are split by their bits into at most 256 ranges, keeping the range where the mass
    crosses, until few are left or all are equal (the rounds of a radix sort, on one range each time);
    the few left are sorted. ``scratch`` (as long as ``source``), ``counts``, ``masses`` (at least 256):
    work arrays; ``source`` is left as it is."""
    values = source
    n = source.size
    bits = source.view(np.int64)
    equal = False
    while n > 32:
        # keys: the values' bits, which order non-negative floats (a negative or NaN value, which no
        # export should hold, is kept in bounds as 0)
        low = high = max(bits[0], 0)
        for i in range(1, n):
            key = max(bits[i], 0)
            low = min(low, key)
            high = max(high, key)
        if low == high:
            equal = True
            break
        shift = 0
        while (high - low) >> shift > 255:  # 256 ranges at most
            shift += 1
        counts[:256] = 0
        masses[:256] = 0.0
        for i in range(n):
            digit = (high - max(bits[i], 0)) >> shift  # 0 for the largest values
            counts[digit] += 1
            masses[digit] += values[i]
        chosen = 0
        for digit in range(256):  # the first range whose running mass reaches the target, else the last
            if counts[digit] == 0:
                continue
            chosen = digit
            if mass_before + masses[digit] >= target:
                break
            mass_before += masses[digit]
            cells_before += counts[digit]
        kept = 0
        for i in range(n):
            if (high - max(bits[i], 0)) >> shift == chosen:
                scratch[kept] = values[i]
                kept += 1
        values = scratch
        bits = scratch.view(np.int64)
        n = kept
    few = values[:n]
    if equal:  # a run of equal values, counted as a run of codes is (:func:`_crossings`)
        return few[0], cells_before + _run_cells(target - mass_before, few[0], n), cells_before + n
    if n > 1:
        few = scratch[:n]
        if values is not scratch:
            few[:] = values[:n]
        few.sort()  # ascending, read from its end
    running = mass_before
    at = n - 1
    for k in range(n):
        running += few[n - 1 - k]
        if running >= target:
            at = k
            break
    value = few[n - 1 - at]
    ties = at + 1
    while ties < n and few[n - 1 - ties] >= value:
        ties += 1
    return value, cells_before + at + 1, cells_before + ties


@njit(cache=True, nogil=True)
def _float_crossings(
    row, peak, shares, counts, masses, cum_cells, cum_mass, crossing, gathered, candidates,
    threshold, in_mask, smallest,
):  # fmt: skip
    """Each share's crossing in one row of non-negative floats (as :func:`_crossings` finds it in the sorted
    row) without sorting the row: its values are counted into buckets by their leading bits, the crossing
    bucket is found from the buckets' running masses, and the share's crossing among that bucket's values
    by :func:`_select`. ``counts`` to ``candidates`` are work arrays (``crossing``: -1 everywhere, and
    left so). Returns the row's sum."""
    if not peak > 0:
        threshold[:] = np.inf
        in_mask[:] = 0
        smallest[:] = np.nan
        return 0.0
    bits = row.view(np.int64)
    top = np.array([peak]).view(np.int64)[0] >> _BUCKET_SHIFT
    last = _BUCKETS - 1
    counts[:] = 0
    masses[:] = 0.0
    for i in range(row.size):
        bucket = min(max(top - (bits[i] >> _BUCKET_SHIFT), 0), last)  # within bounds even for a NaN
        counts[bucket] += 1
        masses[bucket] += row[i]
    cells = 0
    running = 0.0
    for bucket in range(_BUCKETS):
        cells += counts[bucket]
        running += masses[bucket]
        cum_cells[bucket] = cells
        cum_mass[bucket] = running
    total = running
    # the crossing bucket of each share (the first whose running mass reaches it); each such bucket gets a
    # slot in ``gathered`` for its values
    buckets = np.empty(shares.size, dtype=np.int64)
    starts = np.zeros(shares.size + 1, dtype=np.int64)
    used = 0
    for j in range(shares.size):
        low = _first_reaching(cum_mass, total * shares[j])
        buckets[j] = low
        if crossing[low] < 0:
            crossing[low] = used
            starts[used + 1] = starts[used] + counts[low]
            used += 1
    ends = starts[:used].copy()
    for i in range(row.size):
        slot = crossing[min(max(top - (bits[i] >> _BUCKET_SHIFT), 0), last)]
        if slot >= 0:
            gathered[ends[slot]] = row[i]
            ends[slot] += 1
    for j in range(shares.size):
        bucket = buckets[j]
        slot = crossing[bucket]
        threshold[j], at, in_mask[j] = _select(
            gathered[starts[slot] : starts[slot + 1]],
            candidates,
            total * shares[j],
            cum_mass[bucket - 1] if bucket else 0.0,
            cum_cells[bucket - 1] if bucket else 0,
            counts,
            masses,
        )
        smallest[j] = at
    for j in range(shares.size):
        crossing[buckets[j]] = -1
    return total


@njit(cache=True, nogil=True)
def _count_codes(row, keys, histogram, odd):
    """Count a row of codes into ``histogram`` at ``keys[i] | (255 - code)`` (``odd``: a work histogram).
    Even and odd cells are counted apart and added up at the end, so that the increments of a run of one
    code (zeros, in most attention rows) do not wait on each other; with one counter per code such rows
    take twice as long. Nothing else is done in this loop: one that also sums or compares runs at half
    its speed."""
    histogram[:] = 0
    odd[:] = 0
    whole = row.size - row.size % 2
    for i in range(0, whole, 2):
        histogram[keys[i] | (row[i] ^ 255)] += 1
        odd[keys[i + 1] | (row[i + 1] ^ 255)] += 1
    if whole < row.size:
        histogram[keys[whole] | (row[whole] ^ 255)] += 1
    histogram += odd


@njit(cache=True, nogil=True)
def _code_frame_stats(frame):
    """Sum, largest code and cells at it of one frame's codes: two passes that vectorise, the second in
    32-bit lanes (numba would add in 64 bits) while the frame's sum fits them."""
    peak = np.uint8(0)
    for c in frame:
        peak = max(peak, c)
    if frame.size > _CELLS_IN_32_BITS:
        summed = 0
        at_peak = 0
        for c in frame:
            summed += c
            at_peak += c == peak
        return summed, peak, at_peak
    summed32 = np.uint32(0)
    at_peak32 = np.uint32(0)
    for c in frame:
        summed32 = np.uint32(summed32 + c)
        at_peak32 = np.uint32(at_peak32 + (c == peak))
    return np.int64(summed32), peak, np.int64(at_peak32)


@njit(cache=True, nogil=True)
def _float_frame_stats(frame, logs):
    """Sum, largest value, cells at it and ``sum(v log v)`` of one frame's floats (``logs``: ``log v``,
    ``-inf`` at 0), two partial sums and maxima at a time, in registers (a float loop does not vectorise)."""
    sum_a = sum_b = 0.0
    peak_a = peak_b = -np.inf
    v_log_v_a = v_log_v_b = 0.0
    whole = frame.size - frame.size % 2
    for i in range(0, whole, 2):
        a, b = frame[i], frame[i + 1]
        sum_a += a
        sum_b += b
        peak_a = max(peak_a, a)
        peak_b = max(peak_b, b)
        v_log_v_a += a * logs[i] if a > 0 else 0.0
        v_log_v_b += b * logs[i + 1] if b > 0 else 0.0
    if whole < frame.size:
        a = frame[whole]
        sum_a += a
        peak_a = max(peak_a, a)
        v_log_v_a += a * logs[whole] if a > 0 else 0.0
    peak = max(peak_a, peak_b)
    at_peak = 0
    for v in frame:
        at_peak += v == peak
    return sum_a + sum_b, peak, at_peak, v_log_v_a + v_log_v_b


@njit(cache=True, nogil=True)
def _weight_groups(weights):
    """``[len(weights)]`` int64: for each weight, the index of the first equal one (its group)."""
    first = np.arange(weights.size)
    for h in range(weights.size):
        for k in range(h):
            if weights[k] == weights[h]:
                first[h] = k
                break
    return first


@njit(cache=True, nogil=True, fastmath={"contract"})
def _weighted_sum(out, rows, weights, first, partial):
    """``out = sum_h rows[h] * weights[h]``, cell by cell. Rows that share a weight (``first``:
    :func:`_weight_groups`) are added up first (exact for codes and float16 values) and scaled once, so
    that cells whose heads hold the same values in another order are equal, as they are in exact
    arithmetic; the scaled sums are added to 0 in the order of their first rows, a fused multiply-add each
    where the processor has one. ``partial``: a work row as long as ``out``."""
    count = rows.shape[0]
    out[:] = 0.0
    shared = False
    for h in range(count):
        shared = shared or first[h] != h
    if shared:
        members = np.empty(count, dtype=np.int64)
        for h in range(count):
            if first[h] != h:
                continue
            size = 0
            for k in range(h, count):
                if first[k] == h:
                    members[size] = k
                    size += 1
            partial[:] = 0.0
            whole = size - size % 4
            for k in range(0, whole, 4):  # four rows per pass
                a, b = rows[members[k]], rows[members[k + 1]]
                c, d = rows[members[k + 2]], rows[members[k + 3]]
                for i in range(out.size):
                    partial[i] += (np.float64(a[i]) + b[i]) + (np.float64(c[i]) + d[i])
            for k in range(whole, size):
                row = rows[members[k]]
                for i in range(out.size):
                    partial[i] += row[i]
            weight = weights[h]
            for i in range(out.size):
                out[i] += partial[i] * weight
        return
    h = 0
    while h + 4 <= count:  # four rows per pass over ``out``
        a, b, c, d = rows[h], rows[h + 1], rows[h + 2], rows[h + 3]
        wa, wb, wc, wd = weights[h], weights[h + 1], weights[h + 2], weights[h + 3]
        for i in range(out.size):
            out[i] = (((out[i] + a[i] * wa) + b[i] * wb) + c[i] * wc) + d[i] * wd
        h += 4
    for k in range(h, count):
        row, weight = rows[k], weights[k]
        for i in range(out.size):
            out[i] += row[i] * weight


@njit(cache=True, nogil=True)
def _window_row(row, cells, peaks, positions, index, distance, radii, radius, near, near_mass):
    """The window cells of one row (``index``, ``distance``: ``[C, w]``) that hold their frame's peak,
    counted within each radius (``near [R, C]``), and their mass within ``radius`` (``near_mass [C]``)."""
    for c in range(positions.size):
        frame = row[positions[c] * cells : (positions[c] + 1) * cells]
        peak = peaks[positions[c]]
        frame_index, frame_distance = index[c], distance[c]
        mass = 0.0  # sums and counts in registers, stored once per frame
        for k in range(frame_index.size):
            value = frame[frame_index[k]]
            if frame_distance[k] <= radius:
                mass += value
        near_mass[c] = mass
        for i in range(radii.size):
            at_peak = 0
            for k in range(frame_index.size):
                at_peak += (frame[frame_index[k]] == peak) & (frame_distance[k] <= radii[i])
            near[i, c] = at_peak


@njit(cache=True, nogil=True)
def _average_and_windows(
    rows, r, group, average, weights, first, partial, cells, peaks, positions, index, distance, radii, radius,
    near, near_mass,
):  # fmt: skip
    """The steps row ``r`` takes after its frame statistics: read around its targets (when there are any)
    and, when it is its query's last, its query's rows averaged (when an average is asked for)."""
    query = r // group
    if positions.size:
        _window_row(
            rows[r], cells, peaks[r], positions, index[query], distance[query], radii, radius, near[r],
            near_mass[r],
        )  # fmt: skip
    if average.size and r % group == group - 1:
        _weighted_sum(average[query], rows[r + 1 - group : r + 1], weights, first, partial)


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
def _code_rows(
    rows, num_frames, shares, levels, num_masses, mask_first, group, average, weights,
    positions, index, distance, radii, radius,
):  # fmt: skip
    n, width = rows.shape
    cells = width // num_frames
    num_levels = num_masses + 1
    out = _outputs(n, num_frames, shares.size, num_masses, radii.size, positions.size)
    frame_sums, peaks, ties, total, v_log_v, threshold, in_mask, smallest = out[:8]
    hits, reference, near, near_mass = out[8:]
    histogram = np.zeros(num_levels * CODES, dtype=np.int32)
    by_level = histogram.reshape(num_levels, CODES)  # [level, 255 - code]
    counts = np.zeros(CODES, dtype=np.int32)
    cum_mass = np.zeros(CODES)
    cum_cells = np.zeros(CODES, dtype=np.int64)
    odd = np.zeros_like(histogram)
    above = np.zeros(CODES, dtype=np.int32)  # cells of the reference's mask j, code by code
    in_reference = np.zeros(num_masses, dtype=np.int64)
    keys = np.zeros(width, dtype=np.uint16)  # level << 8 of each cell
    first, partial = _weight_groups(weights), np.empty(width)  # for the average
    for r in range(n):
        row = rows[r]
        query = r // group
        if num_masses and r % group == 0:
            for i, level in enumerate(levels[query]):
                keys[i] = np.uint16(level) << 8
        _count_codes(row, keys, histogram, odd)
        for f in range(num_frames):
            frame_sums[r, f], peaks[r, f], ties[r, f] = _code_frame_stats(row[f * cells : (f + 1) * cells])
        _average_and_windows(
            rows, r, group, average, weights, first, partial, cells, peaks, positions, index, distance, radii,
            radius, near, near_mass,
        )  # fmt: skip
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
        above[:] = 0
        for j in range(num_masses):
            # the reference's mask j: cells of level >= M - j (the same for a query's rows); the row's: its
            # codes down to its threshold (none when empty)
            above += by_level[num_masses - j]
            if r % group == 0:
                in_reference[j] = above.sum()
            last = -1 if row_total <= 0 else CODES - 1 - int(threshold[r, mask_first + j])
            in_both = 0
            for i in range(last + 1):
                in_both += above[i]
            hits[r, j] = in_both
            reference[r, j] = in_reference[j]
    return out


@njit(cache=True, nogil=True)
def _float_rows(
    rows, logs, num_frames, shares, levels, num_masses, mask_first, group, average, weights,
    positions, index, distance, radii, radius,
):  # fmt: skip
    n, width = rows.shape
    cells = width // num_frames
    out = _outputs(n, num_frames, shares.size, num_masses, radii.size, positions.size)
    frame_sums, peaks, ties, total, v_log_v, threshold, in_mask, smallest = out[:8]
    hits, reference, near, near_mass = out[8:]
    counts = np.zeros(_BUCKETS, dtype=np.int64)
    masses = np.zeros(_BUCKETS)
    cum_cells = np.zeros(_BUCKETS, dtype=np.int64)
    cum_mass = np.zeros(_BUCKETS)
    crossing = np.full(_BUCKETS, -1, dtype=np.int64)  # each bucket's place in ``gathered``, -1: none
    gathered = np.empty(width)
    candidates = np.empty(width)
    first, partial = _weight_groups(weights), np.empty(width)  # for the average
    for r in range(n):
        row = rows[r]
        query = r // group
        row_v_log_v = 0.0
        for f in range(num_frames):
            part = slice(f * cells, (f + 1) * cells)
            frame_sums[r, f], peaks[r, f], ties[r, f], frame_v_log_v = _float_frame_stats(
                row[part], logs[r, part]
            )
            row_v_log_v += frame_v_log_v
        v_log_v[r] = row_v_log_v
        _average_and_windows(
            rows, r, group, average, weights, first, partial, cells, peaks, positions, index, distance, radii,
            radius, near, near_mass,
        )  # fmt: skip
        total[r] = _float_crossings(
            row, peaks[r].max(), shares, counts, masses, cum_cells, cum_mass, crossing, gathered, candidates,
            threshold[r], in_mask[r], smallest[r],
        )  # fmt: skip
        for j in range(num_masses):
            # cells of the row's mask j (none when empty) in the reference's (level >= M - j)
            needed = np.uint8(num_masses - j)
            lowest = threshold[r, mask_first + j]
            in_reference = 0
            in_both = 0
            row_levels = levels[query]
            for i in range(width):
                counted = row_levels[i] >= needed
                in_reference += counted
                in_both += counted & (row[i] >= lowest)
            hits[r, j] = in_both
            reference[r, j] = in_reference
    return out


@njit(cache=True, nogil=True)
def _head_average(stored, weights):
    count, _, width = stored.shape
    out = np.empty((count, width))
    first, partial = _weight_groups(weights), np.empty(width)
    for q in range(count):
        _weighted_sum(out[q], stored[q], weights, first, partial)
    return out


def head_average(stored: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_h stored[:, h] * weights[h]`` of ``stored [q, heads, ...]`` (uint8 or floats): ``[q, ...]``
    float64; heads that share a weight are added up before they are scaled (:func:`_weighted_sum`)."""
    stored = np.ascontiguousarray(stored)
    if stored.dtype == np.float16:
        stored = stored.astype(np.float32)  # exact; the compiled loop has no float16
    flat = stored.reshape(stored.shape[0], stored.shape[1], -1)
    average = _head_average(flat, np.ascontiguousarray(weights, dtype=np.float64))
    return average.reshape(stored.shape[:1] + stored.shape[2:])
