"""The query grid in pixels: where each query lies in frame 0 and which pooled cell holds a pixel.

numpy only. One rule for the exporter (which pools), the viewer (which maps clicks to cells), the
geometry (which says where each query's point lies in every frame) and the analysis (which compares
attention peaks with those points).

Pixel coordinates are ``(x, y)`` = (column, row) with the centre of the top-left pixel at ``(0, 0)``
(as :mod:`vggt.geometry.scene`), so pixel ``(i, j)`` (row ``i``, column ``j``) covers
``[j - 0.5, j + 0.5) x [i - 0.5, i + 0.5)``.

The grid (see ``attn_maps_schema.md``): query ``qi = qr * W_ds + qc`` is the patch at row
``qr * stride_h``, column ``qc * stride_w`` of the ``H_p x W_p`` patch grid; key cell ``(r, c)`` covers
patch rows ``[r * stride_h, min((r + 1) * stride_h, H_p))`` and the columns likewise, so the last row or
column of cells is narrower when a stride does not divide the grid.
"""

from __future__ import annotations

import numpy as np

from vggt.attn_format.schema import PATCH_SIZE, query_grid_shape


def query_patches(H_p: int, W_p: int, stride_h: int, stride_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Patch row and column of every query, in query order.

    Returns
    -------
    rows, cols : np.ndarray
        ``[Q]`` int64 each: query ``qi = qr * W_ds + qc`` is patch ``(qr * stride_h, qc * stride_w)``.
    """
    H_ds, W_ds = query_grid_shape(H_p, W_p, stride_h, stride_w)
    rows = np.repeat(np.arange(H_ds, dtype=np.int64) * stride_h, W_ds)
    cols = np.tile(np.arange(W_ds, dtype=np.int64) * stride_w, H_ds)
    return rows, cols


def cell_centres(
    H_p: int, W_p: int, stride_h: int, stride_w: int, patch_size: int = PATCH_SIZE
) -> np.ndarray:
    """The point of each query cell of frame 0: the centre of its query patch, in pixels.

    A query cell's attention row belongs to one token, the patch at the cell's top-left corner
    (:func:`query_patches`); its point is that patch's centre. With stride 1 this is the cell's centre;
    with a larger stride the cell's own centre would lie up to half a cell away from the token.

    Returns
    -------
    np.ndarray
        ``[Q, 2]`` float32 pixel ``(x, y)``: ``(col * patch_size + (patch_size - 1) / 2, row * ...)``.
    """
    rows, cols = query_patches(H_p, W_p, stride_h, stride_w)
    half = (patch_size - 1) / 2.0
    return np.stack([cols * patch_size + half, rows * patch_size + half], axis=-1).astype(np.float32)


def cell_index(pixel: np.ndarray, stride: int, patch_size: int, cells: int) -> np.ndarray:
    """Cell along one axis holding integer pixel ``pixel`` (``[...]``), clamped to ``[0, cells)``.

    A cell spans ``stride * patch_size`` pixels; the last may be narrower (it ends with the frame).
    """
    return np.clip(np.asarray(pixel, dtype=np.int64) // (stride * patch_size), 0, cells - 1)


def cell_of_pixel(
    xy: np.ndarray, H_p: int, W_p: int, stride_h: int, stride_w: int, patch_size: int = PATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """The pooled cell ``(row, col)`` holding each pixel position.

    Parameters
    ----------
    xy : np.ndarray
        ``[..., 2]`` pixel ``(x, y)`` (centre convention, sub-pixel allowed).

    Returns
    -------
    rows, cols : np.ndarray
        ``[...]`` int64: the cell of the pixel ``(round-down(y + 0.5), round-down(x + 0.5))`` that holds
        the position; positions outside the frame get the nearest cell; non-finite positions get -1.
    """
    xy = np.asarray(xy, dtype=np.float64)
    H_ds, W_ds = query_grid_shape(H_p, W_p, stride_h, stride_w)
    finite = np.isfinite(xy).all(axis=-1)
    safe = np.where(finite[..., None], xy, 0.0)
    limit = float(max(H_p, W_p) * patch_size)  # far outside the frame is as good as just outside
    pixels = np.floor(np.clip(safe, -1.0, limit) + 0.5)
    rows = np.where(finite, cell_index(pixels[..., 1], stride_h, patch_size, H_ds), -1)
    cols = np.where(finite, cell_index(pixels[..., 0], stride_w, patch_size, W_ds), -1)
    return rows, cols


def cell_box(
    row: int, col: int, H_p: int, W_p: int, stride_h: int, stride_w: int, patch_size: int = PATCH_SIZE
) -> tuple[int, int, int, int]:
    """Pixels covered by cell ``(row, col)``: ``(y0, y1, x0, x1)``, end-exclusive pixel indices."""
    cell_h, cell_w = stride_h * patch_size, stride_w * patch_size
    y0, x0 = row * cell_h, col * cell_w
    return y0, min(y0 + cell_h, H_p * patch_size), x0, min(x0 + cell_w, W_p * patch_size)


def in_frame(xy: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Whether each pixel position ``xy`` (``[..., 2]`` ``(x, y)``) lies in a frame of ``image_size``
    ``(H, W)``, i.e. in ``[-0.5, W - 0.5) x [-0.5, H - 0.5)``: ``[...]`` bool, False for NaN."""
    xy = np.asarray(xy, dtype=np.float64)
    height, width = image_size
    with np.errstate(invalid="ignore"):
        return (
            (xy[..., 0] >= -0.5)
            & (xy[..., 0] < width - 0.5)
            & (xy[..., 1] >= -0.5)
            & (xy[..., 1] < height - 0.5)
        )
