"""The Analysis tab's intervention heat map (no Gradio here): a sweep's ``results.csv``
(``intervene_attention.py``) opened beside the export, its single-head ablations drawn on the analysis
heat map's axes (the export's layers as rows; ``Average`` and ``Head 1..H`` as columns), and the layer and
head a cell of it opens.

The file comes from someone else: it is found through the path box's rule (``--root``), read by the one
reader of ``results.csv`` (:func:`vggt.intervention_results.read_results`: a size cap, known columns,
numbers checked), and its strings reach the page only as escaped text.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggt.attn_format.schema import BLOCK_KINDS
from vggt.intervention_metrics import ERROR_COLUMNS, TRUTH_PREFIX
from vggt.intervention_results import RESULTS_NAME, ResultRow, ResultsError, ablated_layer, read_results
from vggt.viewer.analysis import layer_head_styler
from vggt.viewer.serving import PathRefused
from vggt.viewer.state import CACHE, LoadedExport, ViewerError, layer_heads, layer_kind
from vggt.wording import plural

DEFAULT_COLUMN = "depth_abs_rel"
COLUMNS = (*ERROR_COLUMNS, *(TRUTH_PREFIX + name for name in ERROR_COLUMNS))
PROMPT = (
    "Intervention results: the results.csv of an intervene_attention.py sweep (or its folder), to see what "
    "ablating each head costs beside this heat map"
)
WHAT = "intervention results file"
_SHOWN_NAMES = 6  # cells named in the note when the sweep ablated layers or heads the export lacks
_MAX_HEADS = 256  # columns drawn for an export without per-head maps (the sweep's heads)


@dataclass(frozen=True)
class SweepHeatmap:
    """An opened sweep drawn on an export's axes.

    Attributes
    ----------
    columns : list of str
        The error columns measured for at least one head ablation (the column choices).
    column : str
        The column drawn.
    table : pandas.io.formats.style.Styler
        The layers x heads table, coloured.
    lines : list of str
        What the table shows (scale, cells, layers of the sweep the export lacks), as plain text.
    """

    columns: list[str]
    column: str
    table: object
    lines: list[str]


def open_results(typed: str) -> list[ResultRow]:
    """The rows of the ``results.csv`` typed into the tab's path box (the file or its folder), found
    through the viewer's path rule; raises :class:`ViewerError` with a one-line message quoting the path
    as typed."""
    rule = CACHE.rule
    if not isinstance(typed, str) or not typed.strip():
        raise ViewerError("enter the path of an intervention sweep's results.csv (or its folder)")
    try:
        located = rule.locate(typed, WHAT)
        path = Path(located.path).expanduser()
        if path.is_dir():  # the file inside is located again: a link in the folder must obey the rule too
            located = rule.locate(os.path.join(located.typed.strip(), RESULTS_NAME), WHAT)
            path = Path(located.path).expanduser()
        return read_results(path)
    except PathRefused as exc:
        raise ViewerError(str(exc)) from None
    except ResultsError as exc:
        raise ViewerError(rule.quote_typed(str(exc), located)) from None


def _number(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.3g}"


def sweep_heatmap(loaded: LoadedExport, rows: list[ResultRow], column: str | None) -> SweepHeatmap:
    """The head ablations of ``rows`` as a layers x heads table on ``loaded``'s axes: the column
    ``column`` (the default one, or the first measured, when ``None`` or not measured), coloured on
    [0, its largest value]; ``Average`` and heads not ablated in gray."""
    ablations = [(layer, row) for row in rows if (layer := ablated_layer(row)) is not None]
    if not ablations:
        raise ViewerError("these intervention results hold no single-head ablation (--ablate_heads)")
    measured = [c for c in COLUMNS if any(math.isfinite(row[c]) for _, row in ablations)]
    if not measured:
        raise ViewerError("these intervention results measured no error of a head ablation")
    if column is not None and column not in COLUMNS:
        raise ViewerError(f"unknown column {str(column)[:40]!r}")
    if column not in measured:
        column = DEFAULT_COLUMN if DEFAULT_COLUMN in measured else measured[0]

    names = loaded.export.layer_names
    position = {}
    for index, name in enumerate(names):
        meta = loaded.export.layer_meta(name)
        if layer_kind(meta) in BLOCK_KINDS and isinstance(meta.get("layer_index"), int):
            position[layer_kind(meta), meta["layer_index"]] = index
    # The export's heads; an export without per-head maps shows the sweep's (its table has Average only).
    heads = max(layer_heads(loaded, name) for name in names)
    heads = heads or min(_MAX_HEADS, max(row.head for _, row in ablations))
    values = np.full((len(names), 1 + heads), np.nan)
    missing: dict[str, None] = {}
    for (kind, number), row in ablations:
        index = position.get((kind, number))
        if index is None or row.head > heads:
            missing[f"{kind}:{number} head {row.head}"] = None
        else:
            values[index, row.head] = row[column]
    shown = int(np.isfinite(values).sum())
    vmax = float(np.nanmax(values)) if shown else 0.0
    lines = [
        f"{plural(len(ablations), 'head ablation')} in the file; {shown} on this export's layers, coloured "
        f"from 0 to {_number(vmax)} ({column}: {_meaning(column)}); gray: not ablated"
    ]
    if missing:
        listed = ", ".join(list(missing)[:_SHOWN_NAMES]) + (", ..." if len(missing) > _SHOWN_NAMES else "")
        lines.append(f"{plural(len(missing), 'ablation')} not on this export's layers and heads: {listed}")
    others = sorted({row.kind for row in rows if row.kind not in ("none", "ablate_heads")})
    if others:
        count = sum(row.kind in others for row in rows)
        lines.append(f"{plural(count, 'other intervention')} ({', '.join(others)}): not per head, not shown")
    lines.append("Click a cell to open its layer and head")
    labels = [loaded.layer_labels.get(name, name) for name in names]
    table = layer_head_styler(labels, values, heads, _number, vmax if vmax > 0 else 1.0)
    return SweepHeatmap(measured, column, table, lines)


def _meaning(column: str) -> str:
    name = column.removeprefix(TRUTH_PREFIX)
    against = "against the truth" if column.startswith(TRUTH_PREFIX) else "against the unmodified run"
    return f"{ERROR_COLUMNS[name]}, {against}"


def cell_layer_head(loaded: LoadedExport, row: int, column: int) -> tuple[str, int | None]:
    """The layer and head (0-based, None = Average) of a cell of :func:`sweep_heatmap`'s table: the
    export's layer of that row; the layer column and ``Average`` open the Average."""
    names = loaded.export.layer_names
    if not 0 <= row < len(names) or not 0 <= column <= 4096:
        raise ViewerError(f"no cell at row {row}, column {column}")
    return names[row], (column - 2 if column >= 2 else None)
