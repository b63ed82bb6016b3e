"""Where the clicked query lies in each frame, for exports with geometry: markers on the maps, their
legend, and per frame the attention's peak cell and its distance from each marker (in the frame's caption).

A query's point is its query patch's centre in frame 0 (``geometry.query_points``); the export gives its
position in every frame by up to three sources (``truth``, ``track``, ``depth``; ``attn_maps_schema.md``,
*Geometry*). A source's marker is drawn on a frame where that source sees the point; where it does not,
the frame's caption says so. Positions are frame pixels (the centre of the top-left pixel at 0, 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vggt.attn_format.geometry import ExportGeometry
from vggt.attn_format.grid import cell_of_pixel


@dataclass(frozen=True)
class Marker:
    """A point drawn on a cell: ``(x, y)`` in frame pixels (centre of the top-left pixel at 0, 0)."""

    x: float
    y: float
    label: str
    shape: str = "cross"  # "cross", "circle" or "square"
    color: str = "#ffffff"


@dataclass(frozen=True)
class Style:
    """How one correspondence source is drawn and named."""

    label: str
    shape: str
    color: str
    color_name: str


STYLES = {
    "truth": Style("truth", "circle", "#00ff00", "green circle"),
    "track": Style("track head", "cross", "#00ffff", "cyan cross"),
    "depth": Style("depth + cameras", "square", "#ff00ff", "magenta square"),
}


@dataclass(frozen=True)
class QueryPositions:
    """One query's position in every frame, by source (in the export's order of sources).

    Attributes
    ----------
    xy : dict of str to np.ndarray
        ``[S, 2]`` float32 frame pixels (NaN where unknown).
    visible : dict of str to np.ndarray
        ``[S]`` bool.
    """

    xy: dict[str, np.ndarray]
    visible: dict[str, np.ndarray]

    @property
    def sources(self) -> list[str]:
        return list(self.xy)


def query_positions(geometry: ExportGeometry, qi: int) -> QueryPositions:
    """Where query ``qi`` lies in every frame, by each source the export holds."""
    xy, visible = {}, {}
    for source in geometry.sources:
        positions, seen = geometry.correspondence(source)
        xy[source] = np.asarray(positions[:, qi], dtype=np.float32)
        visible[source] = np.asarray(seen[:, qi], dtype=bool)
    return QueryPositions(xy, visible)


def frame_markers(positions: QueryPositions | None, frame: int) -> tuple[Marker, ...]:
    """The markers of the sources that see the point in ``frame`` (none without positions)."""
    if positions is None:
        return ()
    markers = []
    for source in positions.sources:
        if positions.visible[source][frame]:
            x, y = (float(v) for v in positions.xy[source][frame])
            style = STYLES[source]
            markers.append(Marker(x, y, style.label, style.shape, style.color))
    return tuple(markers)


def hidden_note(positions: QueryPositions | None, frame: int) -> str:
    """``"not visible: truth, track head"``: the sources that do not see the point in ``frame``."""
    if positions is None:
        return ""
    hidden = [STYLES[s].label for s in positions.sources if not positions.visible[s][frame]]
    return f"not visible: {', '.join(hidden)}" if hidden else ""


def legend(sources: Sequence[str]) -> str:
    """One line naming each source's marker."""
    entries = [f"{STYLES[s].label} = {STYLES[s].color_name}" for s in sources]
    return "Markers, the clicked cell's point in each frame: " + " · ".join(entries)


def peak_cells(maps: np.ndarray) -> np.ndarray:
    """The cell with the most attention in each map: ``[K, H_ds, W_ds]`` -> ``[K, 2]`` int64
    ``(row, col)`` (the first in row-major order where several tie)."""
    flat = maps.reshape(maps.shape[0], -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, maps.shape[1:]), axis=-1).astype(np.int64)


def distances_in_cells(
    peaks: np.ndarray, frames: Sequence[int], positions: QueryPositions, grid: Mapping
) -> dict[str, np.ndarray]:
    """Distance from each frame's peak cell to the cell holding each source's point.

    Parameters
    ----------
    peaks : np.ndarray
        ``[K, 2]`` ``(row, col)`` per entry of ``frames``.
    grid : Mapping
        The manifest's ``grid`` (``H_p``, ``W_p``, ``stride_h``, ``stride_w``, ``patch_size``).

    Returns
    -------
    dict of str to np.ndarray
        ``[K]`` float64 per source: the Euclidean distance between the two cells' ``(row, col)``; NaN
        where the source does not see the point in that frame.
    """
    fields = [int(grid[key]) for key in ("H_p", "W_p", "stride_h", "stride_w", "patch_size")]
    chosen = list(frames)
    result = {}
    for source in positions.sources:
        rows, cols = cell_of_pixel(positions.xy[source][chosen], *fields)
        distance = np.hypot(rows - peaks[:, 0], cols - peaks[:, 1]).astype(np.float64)
        result[source] = np.where(positions.visible[source][chosen], distance, np.nan)
    return result


def peak_notes(
    maps: np.ndarray, frames: Sequence[int], positions: QueryPositions, grid: Mapping
) -> list[str]:
    """Per frame, the attention's peak cell and its distance in cells from each marker (a caption's text,
    e.g. ``"peak cell (12, 20) · truth 1.4 cells · track head not visible"``).

    Parameters
    ----------
    maps : np.ndarray
        ``[K, H_ds, W_ds]`` the maps in view, one per entry of ``frames``.
    """
    peaks = peak_cells(maps)
    distances = distances_in_cells(peaks, frames, positions, grid)
    notes = []
    for k in range(len(frames)):
        parts = [f"peak cell ({peaks[k, 0]}, {peaks[k, 1]})"]
        for source in positions.sources:
            value = distances[source][k]
            parts.append(
                f"{STYLES[source].label} {'not visible' if np.isnan(value) else f'{value:.1f} cells'}"
            )
        notes.append(" · ".join(parts))
    return notes
