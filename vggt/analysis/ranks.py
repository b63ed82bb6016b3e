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
    """Runs of float rows ``[n, N]``: their values in descending order, one cell each."""
    return Runs(np.sort(np.asarray(values, dtype=np.float64), axis=-1)[:, ::-1], None)


_CODE_VALUES = np.arange(CODES - 1, -1, -1)
_CODE_X_LOG_X = np.where(_CODE_VALUES > 0, _CODE_VALUES * np.log(np.maximum(_CODE_VALUES, 1)), 0.0)
_CODE_TABLE = np.stack([_CODE_X_LOG_X, _CODE_VALUES.astype(np.float64)], axis=-1)  # [256, 2]


def code_runs(histograms: np.ndarray) -> Runs:
    """Runs of uint8 rows from their histograms ``[n, 256]``: codes 255 down to 0 and the cells of each."""
    return Runs(_CODE_VALUES, np.ascontiguousarray(histograms[..., ::-1]))


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
        ``[n, num_levels, 256]`` int64: cells of row ``r`` with label ``l`` and code ``c``.
    """
    n, cells = codes.shape
    # A 16-bit key per cell: the code in its low byte, (row in the call, label) in its high byte.
    rows_per_call = min(n, code_rows_per_call(num_levels, group))
    out = np.empty((n, num_levels, CODES), dtype=np.int64)
    keys = np.empty((rows_per_call, cells), dtype=np.uint16)
    key_bytes = keys.view(np.uint8).reshape(rows_per_call, cells, 2)
    low, high = (0, 1) if np.little_endian else (1, 0)
    row_ids = (np.arange(rows_per_call, dtype=np.uint8) * np.uint8(num_levels))[:, None]
    if levels is None:
        key_bytes[:, :, high] = row_ids
    for start in range(0, n, rows_per_call):
        stop = min(start + rows_per_call, n)
        count = stop - start
        key_bytes[:count, :, low] = codes[start:stop]
        if levels is not None:
            labels = levels[start // group : -(-stop // group)]
            np.add(
                row_ids[:count].reshape(-1, group, 1),
                labels[:, None, :],
                out=key_bytes[:count, :, high].reshape(-1, group, cells),
            )
        counted = np.bincount(keys[:count].reshape(-1), minlength=count * num_levels * CODES)
        out[start:stop] = counted.reshape(count, num_levels, CODES)
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
    running = np.cumsum(runs.mass(), axis=-1)
    n, width = running.shape
    total = running[:, -1].astype(np.float64)
    target = total[:, None] * fractions[None, :]  # [n, F]
    # First run whose running mass reaches the target (the fork's searchsorted 'left').
    run = np.empty((n, fractions.size), dtype=np.int64)
    if runs.counts is None:
        for row in range(n):  # one row's runs at a time: a binary search, not a pass over the row
            run[row] = np.searchsorted(running[row], target[row], side="left")
    else:
        for f in range(fractions.size):
            run[:, f] = np.count_nonzero(running < target[:, f : f + 1], axis=-1)
    np.minimum(run, width - 1, out=run)
    values = np.broadcast_to(runs.values, running.shape)
    run_value = np.take_along_axis(values, run, axis=-1).astype(np.float64)
    mass_before = np.take_along_axis(running, run, axis=-1) - run_value * (
        1 if runs.counts is None else np.take_along_axis(runs.counts, run, axis=-1)
    )
    if runs.counts is None:
        # One cell per run: later cells tied with the threshold value are in the mask too.
        ascending = runs.values[:, ::-1]
        in_mask = np.stack([width - np.searchsorted(ascending[row], run_value[row]) for row in range(n)])
        smallest = run + 1.0
    else:
        run_count = np.take_along_axis(runs.counts, run, axis=-1)
        in_mask = np.take_along_axis(np.cumsum(runs.counts, axis=-1), run, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            needed = np.clip(np.ceil((target - mass_before) / run_value), 1, run_count)
        smallest = in_mask - run_count + needed
    empty = (total <= 0)[:, None]
    threshold = np.where(empty, np.inf, run_value)
    return threshold, np.where(empty, 0, in_mask), np.where(empty, np.nan, smallest)


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
    positive = values > 0
    logs = np.log(np.where(positive, values, 1.0))
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
