"""The analysis's compiled row pass (vggt.analysis.kernels) against plain numpy, row by row.

The end-to-end tests (test_analysis.py) check every column against float64 brute force; these check the
kernel's own outputs on rows built to hit its edges (ties, empty rows, clipped codes, frames of odd
sizes, heads sharing a query's levels and windows), its refusal of inputs that do not fit (a compiled
loop checks no index), and the analysis without numba installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vggt.analysis.kernels import TargetWindows, head_average, row_stats

REPO = Path(__file__).resolve().parents[1]
SHARES = np.array([0.5, 0.9, 0.3, 0.5, 0.7])  # two cell shares, then three mask masses


def _reference(row: np.ndarray, share: float) -> tuple[float, int, float]:
    """The fork's mask rule on one row, in float64: threshold, cells at least it, fewest cells."""
    values = np.sort(row.astype(np.float64))[::-1]
    running = np.cumsum(values)
    total = running[-1]
    if total <= 0:
        return np.inf, 0, np.nan
    first = int(np.searchsorted(running, total * share))
    threshold = values[first]
    return threshold, int(np.count_nonzero(row >= threshold)), float(first + 1)


def _rows(dtype: type, n: int, frames: int, cells: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        rows = rng.integers(0, 40, size=(n, frames * cells)).astype(np.uint8)
        rows[0] = 0  # an empty row
        rows[1] = 7  # every cell tied
        rows[2, ::5] = 255  # clipped codes
    else:
        rows = rng.random((n, frames * cells)) ** 4
        rows[0] = 0.0
        rows[1] = 0.25
        rows[2, ::3] = rows[2, 0]  # ties across frames
    return rows


@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_row_statistics_equal_numpy(dtype: type) -> None:
    frames, cells, heads, queries = 3, 37, 4, 5
    n = heads * queries
    rows = _rows(dtype, n, frames, cells, seed=1)
    rng = np.random.default_rng(2)
    levels = rng.integers(0, 4, size=(queries, frames * cells)).astype(np.uint8)
    index = rng.integers(0, cells, size=(queries, 2, 9))
    distance = rng.integers(0, 4, size=(queries, 2, 9))
    weights = rng.random(heads)
    average = np.zeros((queries, frames * cells))
    windows = TargetWindows(np.array([0, 2]), index, distance, (0, 1, 2), 1)
    stats = row_stats(
        rows,
        frames,
        SHARES,
        levels=levels,
        mask_first=2,
        group=heads,
        average=(average, weights),
        windows=windows,
    )
    values = rows.astype(np.float64)
    by_frame = values.reshape(n, frames, cells)
    np.testing.assert_allclose(stats.frame_sums, by_frame.sum(axis=-1), rtol=1e-12)
    np.testing.assert_array_equal(stats.peaks, by_frame.max(axis=-1))
    np.testing.assert_array_equal(stats.ties, (by_frame == by_frame.max(axis=-1, keepdims=True)).sum(axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        v_log_v = np.where(values > 0, values * np.log(values), 0.0).sum(axis=-1)
    np.testing.assert_allclose(stats.v_log_v, v_log_v, rtol=1e-12, atol=1e-12)
    for r in range(n):
        for j, share in enumerate(SHARES):
            threshold, in_mask, smallest = _reference(rows[r], share)
            assert stats.threshold[r, j] == threshold
            assert stats.in_mask[r, j] == in_mask
            assert stats.smallest[r, j] == smallest or (np.isnan(smallest) and np.isnan(stats.smallest[r, j]))
        query = r // heads
        for j in range(3):  # the reference's mask j: level >= 3 - j; the row's: share 2 + j
            in_reference = levels[query] >= 3 - j
            in_row = rows[r] >= stats.threshold[r, 2 + j]
            assert stats.reference[r, j] == np.count_nonzero(in_reference)
            assert stats.hits[r, j] == np.count_nonzero(in_reference & in_row)
        for c, frame in enumerate((0, 2)):
            window = by_frame[r, frame, index[query, c]]
            at_peak = window == by_frame[r, frame].max()
            for i, radius in enumerate((0, 1, 2)):
                assert stats.near[r, i, c] == np.count_nonzero(at_peak & (distance[query, c] <= radius))
            assert stats.near_mass[r, c] == pytest.approx(window[distance[query, c] <= 1].sum(), rel=1e-12)
    expected_average = np.einsum("qhn,h->qn", values.reshape(queries, heads, -1), weights)
    np.testing.assert_allclose(average, expected_average, rtol=1e-12)
    np.testing.assert_allclose(head_average(rows.reshape(queries, heads, -1), weights), average, rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.uint8, np.float16])
def test_the_head_average_keeps_exact_ties(dtype) -> None:
    """Two cells whose heads of one weight hold the same values in another order have the same head
    average (as all heads of a float16 or a layer-normalised export share their weight)."""
    values = np.array(
        [
            [0.37, 0.11, 0.93, 0.5],
            [0.11, 0.93, 0.37, 0.5],  # cell 0's values of heads 1-3 in another order
            [0.5, 0.37, 0.11, 0.93],
            [0.5, 0.93, 0.37, 0.11],  # cell 2's values of heads 2-4 in another order
        ]
    ).T
    stored = (values * 200).astype(dtype)[None]  # [1 query, 4 heads, 4 cells]
    for weights, ties in (([3, 3, 3, 3], (0, 2)), ([1, 1, 1, 7], (0,)), ([7, 1, 1, 1], (2,))):
        weights = np.array(weights) / 30
        average = head_average(stored, weights)[0]
        in_pass = np.zeros((1, 4))
        row_stats(stored[0], 1, SHARES, group=4, average=(in_pass, weights))
        np.testing.assert_array_equal(in_pass[0], average)
        for cell in ties:
            assert average[cell] == average[cell + 1], (weights, cell)
        exact = (stored[0].astype(np.float64) * weights[:, None]).sum(axis=0)
        np.testing.assert_allclose(average, exact, rtol=1e-15)


def test_codes_and_floats_agree() -> None:
    """The histogram of a row of codes and the sort of the same values as floats give the same numbers."""
    codes = _rows(np.uint8, 12, 2, 50, seed=3)
    levels = np.random.default_rng(4).integers(0, 4, size=(12, 100)).astype(np.uint8)
    by_codes = row_stats(codes, 2, SHARES, levels=levels, mask_first=2)
    by_floats = row_stats(codes.astype(np.float64), 2, SHARES, levels=levels, mask_first=2)
    for name in (
        "frame_sums",
        "peaks",
        "ties",
        "total",
        "threshold",
        "in_mask",
        "smallest",
        "hits",
        "reference",
    ):
        np.testing.assert_array_equal(getattr(by_codes, name), getattr(by_floats, name), err_msg=name)
    np.testing.assert_allclose(by_codes.v_log_v, by_floats.v_log_v, rtol=1e-13)


def test_float_rows_of_any_range() -> None:
    """A float row is bucketed by its values' leading bits, 32 octaves below its peak: crossings in the
    last bucket (values far below the peak, zeros), in a bucket two shares share, among ties and
    subnormal values, a running sum equal to a share's mass give the sorted row's answers."""
    rng = np.random.default_rng(5)
    rows = np.zeros((8, 64))
    rows[0, 0], rows[0, 1:40] = 1.0, 1e-12  # a share near 1 crosses among values 40 octaves down
    rows[7, 0], rows[7, 1:60] = 1.0, 1e-12 * (1.0 + rng.random(59))  # ... and among distinct ones
    rows[1] = rng.random(64) * 1e-300  # subnormal and tiny values
    rows[1, ::7] = 0.0
    rows[2] = 3.0 ** -rng.integers(0, 60, size=64)  # spread over 95 octaves, with ties
    rows[3, :60] = 1.0 + rng.random(60) * 1e-3  # one bucket holds every crossing
    rows[4] = np.repeat(rng.random(8), 8)  # runs of ties
    rows[5, 5] = 2.0  # a single cell
    rows[6, 10:18] = 0.125  # running sums that reach a share exactly
    shares = np.array([1e-9, 0.3, 0.5, 0.5, 0.9, 1 - 1e-9, 1 - 1e-13])
    stats = row_stats(rows, 2, shares)
    for r in range(rows.shape[0]):
        np.testing.assert_allclose(stats.total[r], rows[r].sum(), rtol=1e-12)
        for j, share in enumerate(shares):
            assert (stats.threshold[r, j], stats.in_mask[r, j], stats.smallest[r, j]) == _reference(
                rows[r], share
            ), (r, share)


def test_frames_whose_sum_outgrows_32_bits() -> None:
    """A frame's codes are added in 32-bit lanes while their sum fits: a frame of 16843010 codes of 255
    (a sum of 2**32 + 254) is added in 64 bits."""
    cells = (2**32 - 1) // 255 + 1
    rows = np.full((1, 2 * cells), 255, dtype=np.uint8)
    rows[0, cells:] = np.arange(cells) % 3  # a second frame that fits
    stats = row_stats(rows, 2, np.array([0.5]))
    assert stats.frame_sums[0].tolist() == [255 * cells, float((np.arange(cells) % 3).sum())]
    assert stats.peaks[0].tolist() == [255, 2] and stats.ties[0].tolist() == [cells, cells // 3]
    assert stats.total[0] == 255 * cells + (np.arange(cells) % 3).sum()


@pytest.mark.parametrize(
    "change",
    [
        {"group": 3},  # 8 rows do not make groups of 3
        {"levels": np.zeros((8, 99), dtype=np.uint8)},  # levels of another width
        {"levels": np.full((8, 100), 9, dtype=np.uint8)},  # a level above the number of masks
        {"average": (np.zeros((7, 100)), np.ones(1))},  # an average of other rows
        {"windows": TargetWindows(np.array([0]), np.full((8, 1, 4), 50), np.zeros((8, 1, 4)), (0,), 0)},
        {"windows": TargetWindows(np.array([5]), np.zeros((8, 1, 4)), np.zeros((8, 1, 4)), (0,), 0)},
    ],
)
def test_inputs_that_do_not_fit_are_refused(change: dict) -> None:
    rows = np.ones((8, 100), dtype=np.uint8)
    options = {"mask_first": 2, **change}
    with pytest.raises(ValueError, match="do not fit|does not fit|do not split"):
        row_stats(rows, 2, SHARES, **options)


def test_without_numba_the_analysis_is_a_one_line_error(tmp_path: Path) -> None:
    """Exports and saved analyses open with numpy, Pillow and Gradio alone; computing one says what is
    missing, in one line, with exit 2."""
    script = (
        "import sys; sys.modules['numba'] = None\n"
        "from vggt.testing.synthetic import write_synthetic_export\n"
        "from vggt.analysis.cli import main\n"
        f"root = write_synthetic_export({str(tmp_path / 'export')!r}, num_layers=2)\n"
        "sys.exit(main(['--attn_dir', str(root), '--quiet', '--no_figures']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: computing an analysis needs numba (pip install numba)"
