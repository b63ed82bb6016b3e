"""The values the browser's attention views receive: views (:mod:`vggt.viewer.views`) as JSON.

Each attention view on the page (the query frame, the overlays, the camera-token and reverse views) is
a ``gr.HTML`` whose value is one of these dicts; ``static/attention_view.js`` draws it on canvases and
shows every string with ``textContent`` (never as markup). Colour codes travel as base64 bytes, so a
click sends a few kilobytes, not images; the frames themselves are sent once per Load
(:func:`frames_payload`) and kept by the page.

The keys (all optional but ``seq``)::

    seq        int, new for every value (the page marks a drawn value with it: data-drawn)
    export     str, the export the frames belong to
    frames     list of PNG data URLs (only when the page does not have them yet)
    size       [W, H] of a frame in pixels
    grid       {"rows": H_ds, "cols": W_ds, "cell": [cell_w, cell_h]} in frame pixels
    lut        base64 of the [256, 3] uint8 colour map
    opacity    float in [0, 1]
    picker     {"frame", "cell": [r, c] or null, "caption"}: a frame to click on
    view       {"columns", "rows": [{"label", "note", "cells": [cell or null]}], "mode"}; a cell is
               {"frame", "codes", "caption", "outline": [r, c] or null, "opens": {"layer", "head"} or null,
                "markers": [{"x", "y", "label", "shape", "color"}]}
    colorbar   {"max": probability or null, "text"}
    readout    list of str, shown as lines of text (beside the picker, else above the grid)
    notes      list of str, shown under the readout in a quieter style
    empty      str, shown instead of a view (before the first click)
"""

from __future__ import annotations

import base64
import itertools
from dataclasses import asdict

import numpy as np

from vggt.viewer import render
from vggt.viewer.state import LoadedExport
from vggt.viewer.views import Cell, Grid, Picker

_SEQUENCE = itertools.count(1)
_LUT = base64.b64encode(render.JET_LUT.tobytes()).decode("ascii")


def _codes(codes: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(codes, dtype=np.uint8).tobytes()).decode("ascii")


def _cell(cell: Cell | None) -> dict | None:
    if cell is None:
        return None
    opens = None
    if cell.opens is not None:
        opens = {"layer": cell.opens[0], "head": cell.opens[1]}
    return {
        "frame": cell.frame,
        "codes": None if cell.codes is None else _codes(cell.codes),
        "caption": cell.caption,
        "outline": None if cell.outline is None else list(cell.outline),
        "opens": opens,
        "markers": [asdict(marker) for marker in cell.markers],
    }


def view_value(
    loaded: LoadedExport | None,
    opacity: float = 0.6,
    *,
    picker: Picker | None = None,
    grid: Grid | None = None,
    readout: list[str] | None = None,
    notes: list[str] | None = None,
    empty: str | None = None,
    frames: bool = False,
) -> dict:
    """The value of an attention view.

    Parameters
    ----------
    loaded : LoadedExport or None
        The export the view belongs to (``None``: nothing loaded; only ``empty`` is shown).
    picker : Picker, optional
        A frame to click on.
    grid : Grid, optional
        The maps to draw, with their colour bar.
    readout : list of str, optional
        Lines of text saying what is in view.
    notes : list of str, optional
        Lines of text in a quieter style (what the export is).
    empty : str, optional
        Text shown in place of a grid.
    frames : bool
        Send the frames (the first value after a Load).
    """
    value: dict = {"seq": next(_SEQUENCE)}
    if empty is not None:
        value["empty"] = empty
    if readout is not None:
        value["readout"] = list(readout)
    if notes is not None:
        value["notes"] = list(notes)
    if loaded is None:
        return value
    geometry = loaded.geometry
    value |= {
        "export": loaded.token,
        "size": [geometry.width, geometry.height],
        "grid": {
            "rows": geometry.H_ds,
            "cols": geometry.W_ds,
            "cell": [geometry.cell_width, geometry.cell_height],
        },
        "lut": _LUT,
        "opacity": float(opacity),
    }
    if frames:
        value["frames"] = loaded.frame_images()
    if picker is not None:
        cell = None if picker.cell is None else list(picker.cell)
        value["picker"] = {"frame": picker.frame, "cell": cell, "caption": picker.caption}
    if grid is not None:
        rows = [
            {"label": row.label, "note": row.note, "cells": [_cell(cell) for cell in row.cells]}
            for row in grid.rows
        ]
        value["view"] = {"columns": list(grid.columns), "rows": rows, "mode": grid.mode}
        value["colorbar"] = {"max": grid.scale, "text": grid.scale_text}
    return value
