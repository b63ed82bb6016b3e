"""Figures for papers: a view of the viewer drawn with matplotlib, saved as PNG and SVG at print
resolution (the SVG keeps its text as text).

A figure shows the query frame with the query cell marked, the maps of each row over the frames, the
row labels (layer and head) and column labels (frames), a colour bar with its scale in probability
units, and a title naming the export. The viewer's *Save figure* draws its current view; from Python::

    from vggt.viewer.figures import Panel, make_figure
    panels = [Panel("global_24", 2, (10, 12)), Panel("global_12", None, (10, 12))]  # head 0-based
    make_figure("attn_room", panels, "fig/room")

and from the command line, one row per ``LAYER:HEAD:ROW,COL`` (head 1-based, or ``avg``)::

    python attention_figure.py --attn_dir attn_room --panel global_24:3:10,12 --panel global_12:avg:10,12 \\
        --out fig/room

matplotlib is imported here only (``pip install "vggt-attn[figures]"``), so the viewer starts without it.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vggt.viewer import render, state, views
from vggt.viewer.state import LoadedExport, Settings, ViewerError
from vggt.viewer.views import Grid, Row

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PRINT_DPI = 300
CELL_INCHES = 2.0
MAX_WIDTH_INCHES = 16.0
IMAGE_PIXELS = 600  # small frames are upscaled (by an integer) to about this many pixels


@dataclass(frozen=True)
class Panel:
    """One row of a figure: a layer, a head (0-based, ``None`` = Average) and a query cell ``(row, col)``."""

    layer: str
    head: int | None
    query: tuple[int, int]


def panels_grid(loaded: LoadedExport, panels: list[Panel]) -> Grid:
    """A view with one row per panel: the panel's maps over the frames, each row on its own scale."""
    rows: list[Row] = []
    for panel in panels:
        layer = state.check_layer(loaded, panel.layer)
        head = panel.head
        if head is not None and not 0 <= head < state.layer_heads(loaded, layer):
            raise ViewerError(f"{loaded.layer_labels[layer]} has no head {head + 1}")
        row, col = panel.query
        if not (0 <= row < loaded.geometry.H_ds and 0 <= col < loaded.geometry.W_ds):
            raise ViewerError(
                f"query cell ({row}, {col}) outside the {loaded.geometry.W_ds} x {loaded.geometry.H_ds} grid "
                "(W x H)"
            )
        single = views.frames_view(loaded, Settings(layer=layer, head=head), panel.query).rows[0]
        cells: list[views.Cell | None] = [None] * loaded.num_frames
        for cell in single.cells:
            cells[cell.frame] = cell
        rows.append(replace(single, cells=cells, note=f"full colour = {single.scale:.4g}"))
    return Grid(rows, list(loaded.labels), None, "each row: 0 to its full colour", mode="panels")


def _image_scale(loaded: LoadedExport) -> int:
    return render.display_scale(loaded.geometry.height, loaded.geometry.width, IMAGE_PIXELS)


def _overlay(loaded: LoadedExport, cell: views.Cell, opacity: float, scale: int) -> np.ndarray:
    """The cell's map over its frame, ``[H * scale, W * scale, 3] uint8`` (exactly as the viewer draws)."""
    geometry = replace(loaded.geometry, scale=scale)
    frame = render.upscale(loaded.frames[cell.frame], scale)
    if cell.codes is None:
        return frame
    image = render.overlay(render.base_indices(frame[None], geometry), cell.codes[None], geometry, opacity)[0]
    if cell.outline is not None:
        render.outline_cell(image, geometry, *cell.outline, color=(255, 255, 255))
    return image


def _query_frame(loaded: LoadedExport, query: tuple[int, int], scale: int) -> np.ndarray:
    geometry = replace(loaded.geometry, scale=scale)
    grid = render.draw_grid(render.upscale(loaded.frames[0], scale), geometry)
    return render.highlight_cell(grid, geometry, *query)


def _colormap():
    from matplotlib.colors import ListedColormap

    return ListedColormap(render.JET_LUT / 255.0, name="vggt-jet")


def view_figure(loaded: LoadedExport, grid: Grid, opacity: float = 0.6, title: str = "") -> Figure:
    """Draw a view (:mod:`vggt.viewer.views`) as a matplotlib figure.

    Columns: the query frame (in a row whose query differs from the row above), then ``grid.columns``;
    rows: ``grid.rows``, labelled on the left with their layer and head and, when each row has its own
    scale, that scale. Names from the export are drawn as written (``$`` starts no mathematics).
    """
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        return _draw_view(loaded, grid, opacity, title)


def _draw_view(loaded: LoadedExport, grid: Grid, opacity: float, title: str) -> Figure:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    scale = _image_scale(loaded)
    columns = len(grid.columns) + 1
    cell = min(CELL_INCHES, max(0.6, MAX_WIDTH_INCHES / columns))
    aspect = loaded.geometry.height / loaded.geometry.width
    height = len(grid.rows) * (cell * aspect + 0.35) + 0.9
    figure = Figure(figsize=(columns * cell + 1.6, height), layout="constrained")
    axes = figure.subplots(len(grid.rows), columns, squeeze=False)
    fontsize = 7 if cell < 1.5 else 8
    previous = None
    for index, row in enumerate(grid.rows):
        for column in range(columns):
            ax = axes[index, column]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        if row.query is not None and row.query != previous:
            ax = axes[index, 0]
            ax.imshow(_query_frame(loaded, row.query, scale), interpolation="none")
            ax.set_title(f"query frame · cell ({row.query[0]}, {row.query[1]})", fontsize=fontsize)
        previous = row.query
        label = row.label + (f"\n{row.note}" if row.note and grid.scale is None else "")
        axes[index, 1].set_ylabel(label, fontsize=fontsize)
        for column, item in enumerate(row.cells[: columns - 1], start=1):
            if item is None:
                continue
            ax = axes[index, column]
            ax.imshow(_overlay(loaded, item, opacity, scale), interpolation="none")
            for marker in item.markers:
                shape = {"circle": "o", "square": "s"}.get(marker.shape, "x")
                x, y = (marker.x + 0.5) * scale - 0.5, (marker.y + 0.5) * scale - 0.5
                ax.plot(x, y, color=marker.color, marker=shape, fillstyle="none")
            if index == 0 or len(grid.rows) == 1:
                ax.set_title(grid.columns[column - 1], fontsize=fontsize)
    shared = grid.scale is not None
    mappable = ScalarMappable(Normalize(0.0, grid.scale if shared else 1.0), _colormap())
    bar = figure.colorbar(mappable, ax=axes, shrink=min(1.0, 2.5 / height), fraction=0.04)
    bar.set_label("probability" if shared else "fraction of the row's full colour", fontsize=fontsize)
    bar.ax.tick_params(labelsize=fontsize)
    if title:
        figure.suptitle(title, fontsize=fontsize + 2)
    return figure


def figure_title(loaded: LoadedExport, grid: Grid, query: tuple[int, int] | None = None) -> str:
    """``"kitchen · Global 24 · Head 3 · query cell (10, 12)"``: the export's name, the layer and head
    of a single-row view or the kind of composite, and the query cell."""
    export = loaded.export
    name = export.name
    parts = [name]
    if grid.mode in ("frames",) and len(grid.rows) == 1:
        parts.append(grid.rows[0].label)
    elif grid.mode in views.MODES:
        parts.append(views.MODES[grid.mode])
    if query is not None:
        parts.append(f"query cell ({query[0]}, {query[1]})")
    return " · ".join(parts)


def save(figure: Figure, stem: Path | str, dpi: int = PRINT_DPI) -> list[Path]:
    """Write ``figure`` as ``stem.png`` (at ``dpi``) and ``stem.svg`` (text kept as text); their paths."""
    import matplotlib

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(paths[0], dpi=dpi)
        figure.savefig(paths[1])
    return paths


def file_stem(loaded: LoadedExport, grid: Grid, query: tuple[int, int] | None) -> str:
    """A file name for a figure: the title's words, safe for any file system."""
    text = figure_title(loaded, grid, query)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120] or "attention"


def make_figure(
    export: str | Path, panels: list[Panel], out: str | Path, opacity: float = 0.6, dpi: int = PRINT_DPI
) -> list[Path]:
    """Remake a paper's figure with one call: one row per :class:`Panel`, written as ``out.png`` and
    ``out.svg``; returns their paths. Raises ``FormatError`` or ``ViewerError`` on bad input."""
    loaded = state.load_export(str(Path(export).expanduser()))
    grid = panels_grid(loaded, panels)
    name = loaded.export.name
    return save(view_figure(loaded, grid, opacity, title=name), out, dpi)


def parse_panel(text: str) -> Panel:
    """``"global_24:3:10,12"`` (layer, 1-based head or ``avg``, query row and column) as a :class:`Panel`."""
    match = re.fullmatch(r"([^:]+):(avg|average|\d+):(\d+),(\d+)", text.strip(), flags=re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"panel {text!r}: expected LAYER:HEAD:ROW,COL, e.g. global_24:3:10,12 (HEAD 1-based or avg)"
        )
    layer, head, row, col = match.groups()
    if head.isdigit() and int(head) < 1:
        raise argparse.ArgumentTypeError(f"panel {text!r}: heads are numbered from 1")
    return Panel(layer, None if not head.isdigit() else int(head) - 1, (int(row), int(col)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Remake a figure of attention maps (PNG and SVG) from an export, one row per panel."
    )
    parser.add_argument(
        "--attn_dir", "--attn-dir", required=True, help="the export (folder, manifest or .zip)"
    )
    parser.add_argument(
        "--panel", action="append", type=parse_panel, required=True, metavar="LAYER:HEAD:ROW,COL",
        help="a row of the figure: layer name, head (1-based, or avg), query cell; repeat for more rows",
    )  # fmt: skip
    parser.add_argument(
        "--out", required=True, help="output path without extension (.png and .svg are written)"
    )
    parser.add_argument("--opacity", type=float, default=0.6, help="overlay opacity (default 0.6)")
    parser.add_argument("--dpi", type=int, default=PRINT_DPI, help=f"PNG resolution (default {PRINT_DPI})")
    args = parser.parse_args(argv)
    if not 0.0 <= args.opacity <= 1.0 or not 50 <= args.dpi <= 1200:
        parser.error("--opacity must lie in [0, 1] and --dpi in [50, 1200]")
    try:
        paths = make_figure(args.attn_dir, args.panel, args.out, args.opacity, args.dpi)
    except ImportError:
        print("error: figures need matplotlib: pip install 'vggt-attn[figures]'", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - every failure is one line
        from vggt.viewer.messages import error_text

        print(f"error: {error_text(exc)}", file=sys.stderr)
        return 2
    print("wrote " + " and ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
