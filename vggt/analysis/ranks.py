"""Order statistics of attention rows: how many cells hold a share of the mass, and the seed fork's
mass-preserving masks.

A row's cells are described as *runs*: values in descending order, each with the number of cells that
hold it. A float row is its sorted values, one cell each (:func:`sorted_runs`); a row of uint8 codes is
its histogram, codes 255 down to 0 (:func:`code_histograms`), which costs one counting pass instead of
a sort. Everything else is computed once, on runs (:func:`crossings`, :func:`entropy_terms`).

The mask rule is the fork's (``analyze_attention.py``): sort the values in descending order, take the
first position where their running sum reaches ``fraction * total``; the mask holds every cell whose
value is at least the value there (ties included). An empty row (total 0) has an empty mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CODES = 256


@dataclass
class Runs:
    """The cells of ``n`` rows as runs of equal values, in descending order of value.

    Attributes
    ----------
    values : np.ndarray
        ``[n, R]`` float64 values (sorted rows), or ``[R]`` shared by every row (codes 255 down to 0).
    counts : np.ndarray or None
        ``[n, R]`` int64 cells per run; None when every run is one cell (sorted rows).
    """

    values: np.ndarray
    counts: np.ndarray | None

    @property
    def rows(self) -> int:
        return self.counts.shape[0] if self.counts is not None else self.values.shape[0]

    def mass(self) -> np.ndarray:
        """``[n, R]`` mass of each run (exact integers for codes)."""
        if self.counts is None:
            return self.values
        return self.counts * self.values.astype(np.int64)


def sorted_runs(values: np.ndarray) -> Runs:
    """Runs of float rows ``[n, N]``: their values in descending order, one cell each (a contiguous array:
    the negated rows sorted, negated back; every later step reads it in order)."""
    descending = np.negative(values, dtype=np.float64)
    descending.sort(axis=-1)
    return Runs(np.negative(descending, out=descending), None)


_CODE_VALUES = np.arange(CODES - 1, -1, -1)
_CODE_X_LOG_X = np.where(_CODE_VALUES > 0, _CODE_VALUES * np.log(np.maximum(_CODE_VALUES, 1)), 0.0)
_CODE_TABLE = np.stack([_CODE_X_LOG_X, _CODE_VALUES.astype(np.float64)], axis=-1)  # [256, 2]


def code_runs(histograms: np.ndarray) -> Runs:
    """Runs of uint8 rows from their histograms ``[n, 256]`` (:func:`code_histograms`, codes descending)."""
    return Runs(_CODE_VALUES, histograms)


def code_rows_per_call(num_levels: int = 1, group: int = 1) -> int:
    """Rows :func:`code_histograms` counts in one pass: whole groups, as many as a 16-bit key holds."""
    return max(1, CODES // (num_levels * group)) * group


def code_histograms(
    codes: np.ndarray, levels: np.ndarray | None = None, num_levels: int = 1, group: int = 1
) -> np.ndarray:
    """Histogram of each row's codes, split by a small label per cell.

    Parameters
    ----------
    codes : np.ndarray
        ``[n, N]`` uint8 rows.
    levels : np.ndarray, optional
        ``[n / group, N]`` uint8 labels in ``[0, num_levels)``, row ``i`` taking those of ``i // group``
        (the heads of one query share its labels); all 0 when not given.
    num_levels : int
        Number of labels.
    group : int
        Consecutive rows that share one row of labels.

    Returns
    -------
    np.ndarray
        ``[n, num_levels, 256]`` int64: at ``[r, l, i]`` the cells of row ``r`` with label ``l`` and code
        ``255 - i`` (codes descending, the order every later step reads them in).
    """
    n, cells = codes.shape
    # A 16-bit key per cell: 255 - code in its low byte, (row in the call, label) in its high byte, built
    # with two integer operations (writing the bytes one at a time is three times slower), counted in place
    # by ``np.add.at`` (``np.bincount`` first copies the keys to 64 bits: a third slower).
    rows_per_call = min(n, code_rows_per_call(num_levels, group))
    out = np.zeros((n, num_levels, CODES), dtype=np.int64)
    keys = np.empty((rows_per_call, cells), dtype=np.uint16)
    row_high = np.arange(rows_per_call, dtype=np.uint16)[:, None] * np.uint16(num_levels * CODES)
    row_high += np.uint16(CODES - 1)
    label_high = None if levels is None else np.multiply(levels, np.uint16(CODES), dtype=np.uint16)
    for start in range(0, n, rows_per_call):
        stop = min(start + rows_per_call, n)
        count = stop - start
        block = keys[:count]
        np.subtract(row_high[:count], codes[start:stop], out=block)
        if label_high is not None:
            grouped = block.reshape(-1, group, cells)
            grouped += label_high[start // group : -(-stop // group), None, :]
        np.add.at(out[start:stop].reshape(-1), block.reshape(-1), 1)
    return out


def crossings(runs: Runs, fractions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each row's descending running mass reaches each fraction of its total.

    Parameters
    ----------
    runs : Runs
        The rows' cells (non-negative values).
    fractions : np.ndarray
        ``[F]`` shares of the mass, in (0, 1).

    Returns
    -------
    threshold : np.ndarray
        ``[n, F]`` float64: the fork's mask threshold (cells with a value at least this are in the mask);
        ``inf`` for an empty row (empty mask).
    in_mask : np.ndarray
        ``[n, F]`` int64: cells in that mask.
    smallest : np.ndarray
        ``[n, F]`` float64: the smallest number of cells whose values add up to the fraction (the cells of
        the crossing run counted one by one); NaN for an empty row.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if runs.counts is None:
        total, run_value, in_mask, smallest = _sorted_crossings(runs.values, fractions)
    else:
        total, run_value, in_mask, smallest = _code_crossings(runs, fractions)
    empty = (total <= 0)[:, None]
    threshold = np.where(empty, np.inf, run_value)
    return threshold, np.where(empty, 0, in_mask), np.where(empty, np.nan, smallest)


def _sorted_crossings(values: np.ndarray, fractions: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`crossings` of sorted rows ``[n, N]`` (descending): total, run value, cells in the mask, fewest
    cells."""
    running = np.cumsum(values, axis=-1)
    total = running[:, -1]
    target = total[:, None] * fractions[None, :]  # [n, F]
    # First cell whose running mass reaches the target (the fork's searchsorted 'left').
    run = np.minimum(count_prefix(running, target), values.shape[1] - 1)
    run_value = take_rows(values, run)
    # Later cells tied with the threshold value are in the mask too: the cells at least that value.
    in_mask = count_prefix(values, run_value, np.greater_equal)
    return total, run_value, in_mask, run + 1.0


def _code_crossings(runs: Runs, fractions: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`crossings` of code histograms (codes descending): total, run value, cells in the mask, fewest
    cells."""
    counts = runs.counts
    running = np.cumsum(counts * runs.values, axis=-1)  # exact integers
    total = running[:, -1]
    target = total[:, None] * fractions[None, :]  # [n, F]
    # First run whose running mass reaches the target; the running masses are integers, so they are below
    # the target exactly when they are below its ceiling.
    run = np.minimum(count_prefix(running, np.ceil(target).astype(np.int64)), CODES - 1)
    run_value = runs.values[run].astype(np.float64)
    run_count = take_rows(counts, run)
    mass_before = take_rows(running, run) - run_value * run_count
    in_mask = take_rows(np.cumsum(counts, axis=-1), run)
    with np.errstate(divide="ignore", invalid="ignore"):
        needed = np.clip(np.ceil((target - mass_before) / run_value), 1, run_count)
    return total, run_value, in_mask, in_mask - run_count + needed


def count_prefix(rows: np.ndarray, bound: np.ndarray, test: np.ufunc = np.less) -> np.ndarray:
    """How many leading entries of each row of ``rows [n, W]`` pass ``test(entry, bound)`` for each of the
    row's ``bound [n, F]``, for a test that holds on a prefix of every row (``np.less`` on non-decreasing
    rows: ``np.searchsorted(row, bound)``): one binary search of every row and bound at once, ``[n, F]``
    int64."""
    n, width = rows.shape
    flat = rows.reshape(-1)
    base = (np.arange(n) * width)[:, None]
    count = np.zeros(bound.shape, dtype=np.int64)
    step = 1 << (width.bit_length() - 1)
    while step:
        candidate = count + step  # ``step`` more entries, when the last of them passes
        fits = candidate <= width
        last = flat[base + np.minimum(candidate, width) - 1]
        count = np.where(fits & test(last, bound), candidate, count)
        step >>= 1
    return count


def take_rows(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[r, index[r, j]]`` of a contiguous ``[n, W]`` array for ``index [n, F]``."""
    return values.reshape(-1)[index + (np.arange(values.shape[0]) * values.shape[1])[:, None]]


def entropy_terms(runs: Runs, scale: np.ndarray) -> np.ndarray:
    """``sum(x log x)`` over each row's cells, ``x = value * scale`` (``0 log 0 = 0``): ``[n]`` float64."""
    scale = np.asarray(scale, dtype=np.float64)
    if runs.counts is not None:
        # x log x = s c log c + s log(s) c for code c: one product of the histogram with both columns.
        sums = runs.counts @ _CODE_TABLE  # [n, 2]: sum of c log c, sum of c
        log_scale = np.log(np.where(scale > 0, scale, 1.0))
        return scale * (sums[:, 0] + log_scale * sums[:, 1])
    return x_log_x(runs.values * scale[:, None])


def x_log_x(values: np.ndarray) -> np.ndarray:
    """``sum(x log x)`` over the last axis of non-negative ``values`` (``0 log 0 = 0``)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logs = np.log(values)  # a plain log and a fix of the zeros: faster than a masked log
    logs[values == 0] = 0.0
    return np.einsum("...i,...i->...", values, logs)


def normalized_entropy(x_log_x: np.ndarray, total: np.ndarray, count: int) -> np.ndarray:
    """Entropy of ``p = x / total`` over ``count`` entries, divided by ``log(count)``, from
    ``sum(x log x)``: ``-(sum(x log x) / total - log total) / log count``; NaN where ``total`` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.log(total) - x_log_x / total
    entropy = np.where(total > 0, entropy, np.nan)
    if count <= 1:
        return np.where(total > 0, 0.0, np.nan)
    return np.clip(entropy / np.log(count), 0.0, 1.0)  # in [0, 1] but for the last bit of rounding
