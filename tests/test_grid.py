"""The query grid in pixels (vggt.attn_format.grid) against brute force over every pixel and patch."""

from __future__ import annotations

import numpy as np
import pytest

from vggt.attn_format import query_grid_shape
from vggt.attn_format.grid import cell_box, cell_centres, cell_of_pixel, query_patches
from vggt.viewer.render import Geometry

# (H_p, W_p, stride_h, stride_w): strides that divide the grid and strides that leave ragged cells.
GRIDS = [(4, 5, 1, 1), (6, 5, 2, 2), (7, 9, 3, 2), (5, 4, 4, 3), (3, 3, 5, 5)]


@pytest.mark.parametrize("grid", GRIDS)
def test_query_patches_and_centres(grid):
    H_p, W_p, stride_h, stride_w = grid
    H_ds, W_ds = query_grid_shape(*grid)
    rows, cols = query_patches(*grid)
    centres = cell_centres(*grid, patch_size=14)
    assert centres.dtype == np.float32 and centres.shape == (H_ds * W_ds, 2)
    for qr in range(H_ds):
        for qc in range(W_ds):
            qi = qr * W_ds + qc
            assert (rows[qi], cols[qi]) == (qr * stride_h, qc * stride_w)
            # The query patch's 14 pixels have centres x0 .. x0 + 13: their mean is the patch centre.
            x_pixels = np.arange(qc * stride_w * 14, qc * stride_w * 14 + 14)
            y_pixels = np.arange(qr * stride_h * 14, qr * stride_h * 14 + 14)
            assert centres[qi].tolist() == [x_pixels.mean(), y_pixels.mean()]
            # and the query's own point lies in its own cell
            assert [int(a) for a in cell_of_pixel(centres[qi], *grid)] == [qr, qc]


@pytest.mark.parametrize("grid", GRIDS)
def test_cell_of_pixel_is_the_exporters_pooling(grid):
    H_p, W_p, stride_h, stride_w = grid
    H_ds, W_ds = query_grid_shape(*grid)
    height, width = H_p * 14, W_p * 14
    ys, xs = np.mgrid[0:height, 0:width]
    # Brute force: the patch holding each pixel, then the pooled cell holding that patch.
    expected_rows, expected_cols = (ys // 14) // stride_h, (xs // 14) // stride_w
    rows, cols = cell_of_pixel(np.stack([xs, ys], axis=-1), *grid)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(cols, expected_cols)
    # Sub-pixel positions go to the pixel whose area holds them: [j - 0.5, j + 0.5).
    offsets = np.stack([xs + 0.49, ys - 0.5], axis=-1)
    rows, cols = cell_of_pixel(offsets, *grid)
    np.testing.assert_array_equal(cols, expected_cols)
    np.testing.assert_array_equal(rows, expected_rows)
    # Every cell's box holds exactly the pixels assigned to it.
    for r in range(H_ds):
        for c in range(W_ds):
            y0, y1, x0, x1 = cell_box(r, c, *grid)
            inside = (expected_rows == r) & (expected_cols == c)
            assert inside[y0:y1, x0:x1].all() and inside.sum() == (y1 - y0) * (x1 - x0)


def test_cell_of_pixel_outside_and_not_finite():
    grid = (4, 5, 2, 2)
    points = np.array([[-30.0, -7.0], [1e9, 1e9], [np.nan, 3.0], [3.0, np.inf]])
    rows, cols = cell_of_pixel(points, *grid)
    assert rows.tolist() == [0, 1, -1, -1] and cols.tolist() == [0, 2, -1, -1]


@pytest.mark.parametrize("scale", [1, 3])
def test_viewer_geometry_uses_the_same_cells(scale):
    H_p, W_p, stride_h, stride_w = 7, 9, 3, 2
    H_ds, W_ds = query_grid_shape(H_p, W_p, stride_h, stride_w)
    geometry = Geometry(H_p * 14, W_p * 14, H_ds, W_ds, stride_h, stride_w, 14, scale)
    display_rows = np.arange(geometry.display_height)
    display_cols = np.arange(geometry.display_width)
    np.testing.assert_array_equal(geometry.row_cells, (display_rows // scale // 14) // stride_h)
    np.testing.assert_array_equal(geometry.col_cells, (display_cols // scale // 14) // stride_w)
    assert geometry.cell_at(geometry.display_width - 1, geometry.display_height - 1) == (H_ds - 1, W_ds - 1)
    y0, y1, x0, x1 = geometry.cell_box(H_ds - 1, W_ds - 1)
    assert (y1, x1) == (geometry.display_height, geometry.display_width)
    assert (y0, x0) == ((H_ds - 1) * stride_h * 14 * scale, (W_ds - 1) * stride_w * 14 * scale)
