"""Figures of an intervention sweep (PNG and SVG), drawn with matplotlib from ``results.csv`` rows.

- ``ablation_heatmap``: per ablated layer kind, a layers x heads heatmap of each error;
- ``mask_keys_curve`` and ``block_sparse_curve``: each error against the kept mass of the key mask or
  the threshold of block sparsity, one line per set of layers.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from vggt.analysis.figures import draw_heatmap
from vggt.attn_format.schema import BLOCK_KINDS
from vggt.intervention_metrics import TRUTH_PREFIX
from vggt.intervention_results import ResultRow, ablation_grid

# The errors drawn (columns of results.csv) and their axis labels.
FIGURE_ERRORS = {
    "camera_rotation_deg": "camera rotation error (deg)",
    "depth_abs_rel": "depth abs. rel. error",
    "points_mean": "world point error",
    "track_px": "track error (px)",
}
FORMATS = ("png", "svg")
log = logging.getLogger("vggt")
CURVE_VALUE = {"mask_keys": "kept mass of the key mask", "block_sparse": "block-sparsity threshold"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever the environment's display
    import matplotlib.pyplot as plt

    return plt


def _measured(rows: Sequence[ResultRow], columns: Sequence[str]) -> list[str]:
    return [c for c in columns if any(not math.isnan(row[c]) for row in rows)]


def _save(figure, out_dir: Path, name: str) -> list[Path]:
    paths = [out_dir / f"{name}.{fmt}" for fmt in FORMATS]
    for path in paths:
        figure.savefig(path, dpi=120)
    return paths


def ablation_heatmap(rows: Sequence[ResultRow], out_dir: Path, title: str) -> list[Path]:
    """Layers x heads heatmaps of the head-ablation rows, one row of panels per layer kind."""
    ablations = [row for row in rows if row.kind == "ablate_heads"]
    kinds = [k for k in BLOCK_KINDS if any(r.layers.startswith(f"{k}:") for r in ablations)]
    columns = _measured(ablations, list(FIGURE_ERRORS))
    if not kinds or not columns:
        return []
    plt = _pyplot()
    figure, axes = plt.subplots(len(kinds), len(columns), figsize=(4.2 * len(columns), 3.4 * len(kinds)),
                                squeeze=False, layout="constrained")  # fmt: skip
    for row_axes, kind in zip(axes, kinds, strict=True):
        for axis, column in zip(row_axes, columns, strict=True):
            layers, heads, grid = ablation_grid(ablations, column, kind)
            labels = [f"{kind} {number}" for number in layers]
            draw_heatmap(axis, grid, labels, [str(h + 1) for h in range(heads)], FIGURE_ERRORS[column],
                         vmin=0.0, cmap="magma", value_format=".2g")  # fmt: skip
    figure.suptitle(f"{title}: error after ablating one head", fontsize=10)
    paths = _save(figure, out_dir, "ablation_heatmap")
    plt.close(figure)
    return paths


def kept_mass_curves(rows: Sequence[ResultRow], kind: str, out_dir: Path, title: str) -> list[Path]:
    """Errors against the kept mass (key masks) or threshold (block sparsity) of the ``kind`` rows: a row
    of panels against the unmodified run and, where measured, one against the truth (with the unmodified
    run's own error as a dashed line)."""
    chosen = [row for row in rows if row.kind == kind and not math.isnan(row["value"])]
    names = _measured(chosen, list(FIGURE_ERRORS))
    if not chosen or not names:
        return []
    truth = _measured(chosen, [TRUTH_PREFIX + name for name in names])
    references = [("", "against the unmodified run")] + (
        [(TRUTH_PREFIX, "against the truth")] if truth else []
    )
    unmodified = next((row for row in rows if row.kind == "none"), None)
    plt = _pyplot()
    size = (3.8 * len(names), 3.2 * len(references))
    figure, axes = plt.subplots(
        len(references), len(names), figsize=size, squeeze=False, layout="constrained"
    )
    series = sorted({row.layers for row in chosen})
    for row_axes, (prefix, against) in zip(axes, references, strict=True):
        for axis, name in zip(row_axes, names, strict=True):
            column = prefix + name
            for layers in series:
                line = sorted((row["value"], row[column]) for row in chosen if row.layers == layers)
                axis.plot([x for x, _ in line], [y for _, y in line], "o-", markersize=4, label=layers)
            if prefix and unmodified is not None and math.isfinite(unmodified[column]):
                axis.axhline(
                    unmodified[column], color="gray", linestyle="--", linewidth=1, label="unmodified"
                )
            axis.set_xlabel(CURVE_VALUE[kind])
            axis.set_title(f"{FIGURE_ERRORS[name]}\n{against}", fontsize=9)
            axis.grid(True, linestyle=":", alpha=0.5)
        row_axes[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    paths = _save(figure, out_dir, f"{kind}_curve")
    plt.close(figure)
    return paths


def write_figures(rows: Sequence[ResultRow], out_dir: Path, title: str) -> list[Path]:
    """Every figure the rows allow; returns the files written (none, with a warning, without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed: no figures (pip install matplotlib, or the figures extra)")
        return []
    paths = ablation_heatmap(rows, out_dir, title)
    for kind in CURVE_VALUE:
        paths += kept_mass_curves(rows, kind, out_dir, title)
    return paths
