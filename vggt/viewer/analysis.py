"""The Analysis panel's content (no Gradio here): an export's analysis (:mod:`vggt.analysis`), kept once
per opened export; a metric as a layers x heads table coloured as a heat map; the layer and head a cell
of it opens; the clicked query's own metrics for the readout.

The analysis is read from beside the export when it was saved there for that export, else computed on
first use and saved there when the export folder can be written (:func:`vggt.analysis.store.analysis_for`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pandas as pd

from vggt.analysis import METRICS, Analysis
from vggt.analysis.store import analysis_for, format_value, query_metrics
from vggt.analysis.table import fingerprint, layer_head_table
from vggt.viewer import render
from vggt.viewer.state import AVERAGE, LoadedExport, Settings, ViewerError

DEFAULT_METRIC = "cross_view_mass"
LAYER_COLUMN = "layer"
_KEPT = 4  # analyses kept, as many as opened exports
_MISSING_COLOR = "#d9d9d9"
ORIGINS = {
    "loaded": "read from {folder}",
    "saved": "computed now and saved in {folder}",
    "computed": "computed now (not saved: the export is a zip or its folder cannot be written)",
}


class _Analyses:
    """Each opened export's analysis and where it came from, by export key; thread-safe."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[Analysis, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._computing: dict[str, threading.Lock] = {}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, loaded: LoadedExport) -> tuple[Analysis, str] | None:
        """The analysis of this very export when one was computed or read (None before)."""
        with self._lock:
            entry = self._entries.get(loaded.key)
            if entry is None or entry[0].summary.get("fingerprint") != fingerprint(loaded.export):
                return None
            self._entries.move_to_end(loaded.key)
            return entry

    def compute(
        self, loaded: LoadedExport, progress: Callable[[int, int, str], None] | None
    ) -> tuple[Analysis, str]:
        """The export's analysis, read or computed once (a second session asking meanwhile waits)."""
        with self._lock:
            lock = self._computing.setdefault(loaded.key, threading.Lock())
        with lock:
            entry = self.get(loaded)
            if entry is None:
                analysis, origin = analysis_for(loaded.export, progress)
                # Kept for the page: float32 is the precision shown (and what is saved on disk).
                arrays = {
                    k: v.astype(np.float32) if v.dtype == np.float64 else v
                    for k, v in analysis.per_query.items()
                }
                entry = (Analysis(analysis.records, arrays, analysis.summary), origin)
                with self._lock:
                    self._entries[loaded.key] = entry
                    while len(self._entries) > _KEPT:
                        self._entries.popitem(last=False)
        return entry


ANALYSES = _Analyses()


def metric_choices() -> list[str]:
    return list(METRICS)


def check_metric(metric: str | None) -> str:
    if metric not in METRICS:
        raise ViewerError(f"unknown metric {metric!r}")
    return metric


def status_lines(loaded: LoadedExport, analysis: Analysis, origin: str) -> list[str]:
    """Where the analysis came from and with which options."""
    folder = loaded.export.root / "analysis"
    options = analysis.summary.get("options", {})
    source = (analysis.summary.get("correspondence") or {}).get("source")
    lines = [f"Analysis {ORIGINS.get(origin, origin).format(folder=folder.name + '/')}"]
    lines.append(
        f"Stability against {options.get('reference_layer')} (mass shares "
        f"{', '.join(f'{m:g}' for m in options.get('masses', []))}, scope {options.get('stability_scope')})"
        f" · true positions: {source or 'none (correspondence columns empty)'}"
    )
    lines.append("Click a cell to open its layer and head; definitions in docs/analysis.md")
    return lines


def _colour(value: float, vmax: float = 1.0) -> str:
    """CSS of a table cell: the viewer's jet colours over [0, vmax], dark text on the bright middle."""
    if not np.isfinite(value):
        return f"background-color: {_MISSING_COLOR}; color: #555"
    code = int(round(float(np.clip(value / vmax, 0.0, 1.0)) * 255))
    red, green, blue = (int(c) for c in render.JET_LUT[code])
    text = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "white"
    return f"background-color: rgb({red}, {green}, {blue}); color: {text}"


def layer_head_styler(
    row_labels: list[str],
    values: np.ndarray,
    heads: int,
    text: Callable[[float], str] = format_value,
    vmax: float = 1.0,
):
    """A layers x heads table for the page: the layer label first, then ``Average`` and ``Head 1..heads``
    (``values``: ``[layers, 1 + heads]``), each cell written with ``text`` and coloured by its value on
    [0, vmax] (gray where not finite).

    Returns
    -------
    pandas.io.formats.style.Styler
    """
    columns = [LAYER_COLUMN, AVERAGE, *(f"Head {h}" for h in range(1, heads + 1))]
    frame = pd.DataFrame(
        [[label, *(text(v) for v in row)] for label, row in zip(row_labels, values, strict=True)],
        columns=columns,
    )
    styles = pd.DataFrame(
        [["", *(_colour(v, vmax) for v in row)] for row in values], columns=columns, index=frame.index
    )
    return frame.style.apply(lambda _: styles, axis=None).hide(axis="index")


def heatmap(loaded: LoadedExport, analysis: Analysis, metric: str):
    """The metric as a table: one row per layer (its label first), one column per head (``Average``
    first), each cell coloured by its value on a fixed 0..1 scale (every metric is a share).

    Returns
    -------
    pandas.io.formats.style.Styler
    """
    values, layers, heads = layer_head_table(analysis.records, check_metric(metric))
    labels = [loaded.layer_labels.get(name, name) for name in layers]
    return layer_head_styler(labels, values, len(heads) - 1)


def cell_layer_head(analysis: Analysis, row: int, column: int) -> tuple[str, int | None]:
    """The layer and head (0-based, None = Average) of a cell of :func:`heatmap`'s table (the layer
    column opens the Average)."""
    _, layers, heads = layer_head_table(analysis.records, METRICS[0])
    if not 0 <= row < len(layers) or not 0 <= column <= len(heads):
        raise ViewerError(f"no cell at row {row}, column {column}")
    head = heads[column - 1] if column >= 1 else "avg"
    return layers[row], (None if head == "avg" else int(head) - 1)


def query_lines(
    loaded: LoadedExport, analysis: Analysis, settings: Settings, query: tuple[int, int] | None
) -> list[str]:
    """The clicked query's own metrics in the layer and head in view (one line), or what to do."""
    if query is None:
        return ["Click a patch of the query frame: its own metrics for this layer and head show here"]
    head = "avg" if settings.head is None else str(settings.head + 1)
    if head != "avg" and not any(
        r["layer"] == settings.layer and r["head"] == head for r in analysis.records
    ):
        head = "avg"  # a layer without per-head maps (the rollout): its average
    qi = query[0] * loaded.geometry.W_ds + query[1]
    metrics = query_metrics(analysis, settings.layer, head, qi)
    shown = " · ".join(
        f"{name} {format_value(value)}" for name, value in metrics.items() if np.isfinite(value)
    )
    head_text = AVERAGE if head == "avg" else f"Head {head}"
    where = f"{loaded.layer_labels.get(settings.layer, settings.layer)}, {head_text}"
    return [f"Analysis of this query ({where}): {shown}"]
