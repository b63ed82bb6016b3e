"""Where each query's point really is in every frame, as cells of the pooled grid.

Every source of positions (a scene folder, the export's true geometry, its track head) gives the same
thing: pixel positions ``[S, Q, 2]`` in the coordinates of the frames the model saw and a visibility
``[S, Q]``, for the point of each query cell of frame 0 (:func:`vggt.attn_format.grid.cell_centres`).
The metrics only see :class:`Correspondence` and the cells it gives (:class:`Targets`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vggt.attn_format import AttnExport
from vggt.attn_format.grid import cell_of_pixel
from vggt.geometry.correspondence import SceneError, true_correspondences

SOURCES = ("scene", "truth", "track")  # in the order they are preferred
EXPORT_SOURCES = ("truth", "track")  # the export's own positions, in the order they are preferred
PREPROCESS_MODES = ("crop", "pad")


class CorrespondenceError(ValueError):
    """Positions that cannot be had from what was given (one-line message)."""


@dataclass(frozen=True)
class Grid:
    """The export's grid: patch grid, strides, pooled grid and patch size."""

    H_p: int
    W_p: int
    stride_h: int
    stride_w: int
    H_ds: int
    W_ds: int
    patch_size: int

    @classmethod
    def of(cls, meta: dict) -> Grid:
        """The grid of a layer's metadata."""
        return cls(
            *(int(meta[k]) for k in ("H_p", "W_p", "stride_h", "stride_w", "H_ds", "W_ds", "patch_size"))
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(H_p, W_p, stride_h, stride_w)`` as :mod:`vggt.attn_format.grid` takes it."""
        return self.H_p, self.W_p, self.stride_h, self.stride_w

    @property
    def cells(self) -> int:
        return self.H_ds * self.W_ds

    def patches_per_cell(self) -> np.ndarray:
        """``[H_ds, W_ds]`` int64: patches pooled into each cell (fewer in a ragged last row or column)."""
        rows = np.minimum(self.stride_h, self.H_p - np.arange(self.H_ds) * self.stride_h)
        cols = np.minimum(self.stride_w, self.W_p - np.arange(self.W_ds) * self.stride_w)
        return rows[:, None] * cols[None, :]


@dataclass(frozen=True)
class Correspondence:
    """True (or predicted) positions of every query's point in every frame.

    Attributes
    ----------
    source : str
        Where they come from: ``"truth"`` (the export's true geometry), ``"scene"`` (a scene folder) or
        ``"track"`` (the export's track head).
    xy : np.ndarray
        ``[S, Q, 2]`` float pixel ``(x, y)`` in the frames as the model saw them.
    visible : np.ndarray
        ``[S, Q]`` bool: the point is seen in that frame.
    """

    source: str
    xy: np.ndarray
    visible: np.ndarray

    def __post_init__(self) -> None:
        xy, visible = np.asarray(self.xy), np.asarray(self.visible)
        if xy.ndim != 3 or xy.shape[-1] != 2 or visible.shape != xy.shape[:2]:
            raise ValueError(
                f"correspondence needs xy [S, Q, 2] and visible [S, Q], got {list(xy.shape)} and "
                f"{list(visible.shape)}"
            )


@dataclass(frozen=True)
class Targets:
    """The cells holding each query's point in each frame, and the (query, frame) pairs that count.

    Attributes
    ----------
    rows, cols : np.ndarray
        ``[S, Q]`` int64 cell of the point (-1 where unknown).
    valid : np.ndarray
        ``[S, Q]`` bool: a frame other than the query frame where the point is visible and known.
    """

    rows: np.ndarray
    cols: np.ndarray
    valid: np.ndarray
    grid: Grid

    @classmethod
    def of(cls, correspondence: Correspondence, grid: Grid, query_frame: int = 0) -> Targets:
        rows, cols = cell_of_pixel(correspondence.xy, *grid.shape, grid.patch_size)
        valid = np.asarray(correspondence.visible, dtype=bool) & (rows >= 0)
        valid[query_frame] = False
        return cls(rows, cols, valid, grid)

    @classmethod
    def same_uv(cls, grid: Grid, num_frames: int, query_frame: int = 0) -> Targets:
        """Each query's own cell in every frame (the ``same_uv`` prediction)."""
        rows = np.repeat(np.arange(grid.H_ds), grid.W_ds)
        cols = np.tile(np.arange(grid.W_ds), grid.H_ds)
        valid = np.ones((num_frames, grid.cells), dtype=bool)
        valid[query_frame] = False
        return cls(np.broadcast_to(rows, valid.shape), np.broadcast_to(cols, valid.shape), valid, grid)

    def windows(self, radius: int) -> tuple[np.ndarray, np.ndarray]:
        """The cells within ``radius`` cells (Chebyshev) of every target, clipped to the grid.

        Returns
        -------
        index : np.ndarray
            ``[S, Q, (2 radius + 1)^2]`` int64 flat cell index ``r * W_ds + c`` (0 where off the grid).
        distance : np.ndarray
            ``[S, Q, (2 radius + 1)^2]`` int64 Chebyshev distance to the target; ``radius + 1`` for cells
            off the grid or of pairs that do not count, so that no window test takes them.
        """
        offsets = np.arange(-radius, radius + 1)
        d_row, d_col = np.repeat(offsets, offsets.size), np.tile(offsets, offsets.size)
        rows = self.rows[..., None] + d_row
        cols = self.cols[..., None] + d_col
        inside = (rows >= 0) & (rows < self.grid.H_ds) & (cols >= 0) & (cols < self.grid.W_ds)
        inside &= self.valid[..., None]
        index = np.where(inside, rows * self.grid.W_ds + cols, 0)
        distance = np.where(inside, np.maximum(np.abs(d_row), np.abs(d_col)), radius + 1)
        return index.astype(np.int64), distance.astype(np.int64)


def scene_correspondence(export: AttnExport, scene_dir: str | os.PathLike[str]) -> Correspondence:
    """True positions from a scene folder (``cameras.json``, ``depth/`` beside ``images/``): the export's
    frames are matched to the scene's views by their source names and mapped through its preprocessing."""
    mode = export.manifest.get("preprocess_mode")
    if mode not in PREPROCESS_MODES:
        raise CorrespondenceError(
            f"the export does not say how its frames were preprocessed (preprocess_mode {mode!r}), so scene "
            "positions cannot be mapped into them"
        )
    try:
        xy, visible = true_correspondences(
            scene_dir, export.frame_sources, mode, export.image_size, export.manifest["grid"]
        )
    except (SceneError, ValueError) as exc:
        raise CorrespondenceError(str(exc)) from None
    return Correspondence("scene", xy, visible)


def export_correspondence(export: AttnExport) -> Correspondence | None:
    """The export's own positions: its true geometry, else its track head's predictions; None when it
    has neither (no ``geometry/`` part, or one without those sources)."""
    geometry = export.geometry()
    if geometry is None:
        return None
    for source in EXPORT_SOURCES:
        if source in geometry.sources:
            xy, visible = geometry.correspondence(source)
            return Correspondence(source, xy, visible)
    return None
