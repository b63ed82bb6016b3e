"""Figures of the analysis (matplotlib, imported only here): a layer x head heatmap per metric, per-layer
curves with the baselines, and the stability bars as the seed fork draws them. PNG and SVG each.

:func:`draw_heatmap` takes any layers x heads table (:func:`vggt.analysis.table.layer_head_table` makes
one from analysis records), so that other tables (an intervention sweep's, say) are drawn on the same
axes.
"""

from __future__ import annotations

import io
import math
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from vggt.analysis.columns import METRICS
from vggt.analysis.table import BASELINES, Analysis, can_fork, layer_head_table
from vggt.attn_format.schema import ROLLOUT_KIND, write_file_atomic

_DPI = 120


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_heatmap(
    ax,
    values: np.ndarray,
    layers: Sequence[str],
    heads: Sequence[str],
    title: str,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    colorbar_label: str = "",
    value_format: str = ".2f",
):
    """Draw a layers (rows) x heads (columns) table on ``ax``, empty cells in gray, values written in the
    cells (with ``value_format``) when the table is small. Returns the image (for a colour bar)."""
    colormap = _pyplot().get_cmap(cmap).with_extremes(bad="#d9d9d9")
    image = ax.imshow(
        np.ma.masked_invalid(np.asarray(values, dtype=np.float64)), aspect="auto", cmap=colormap,
        vmin=vmin, vmax=vmax, interpolation="nearest",
    )  # fmt: skip
    ax.set_yticks(range(len(layers)), labels=list(layers), fontsize=7)
    ax.set_xticks(range(len(heads)), labels=list(heads), fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    redraw_heatmap(image, values, title, value_format)
    colorbar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    if colorbar_label:
        colorbar.set_label(colorbar_label)
    return image


def redraw_heatmap(image, values: np.ndarray, title: str, value_format: str = ".2f") -> None:
    """Show another table of the same shape (and colour scale) in a heatmap :func:`draw_heatmap` drew."""
    ax = image.axes
    values = np.asarray(values, dtype=np.float64)
    image.set_data(np.ma.masked_invalid(values))
    ax.set_title(title, fontsize=10)
    for text in list(ax.texts):
        text.remove()
    if values.size <= 60:
        for (row, col), value in np.ndenumerate(values):
            if math.isfinite(value):
                shade = image.norm(value)  # dark text on the bright end of the colour map
                color = "black" if np.ma.getdata(shade) > 0.6 else "white"
                ax.text(
                    col, row, format(value, value_format), ha="center", va="center", fontsize=6, color=color
                )


def _save(fig, folder: Path, stem: str, close: bool = True) -> list[Path]:
    """``fig`` as ``stem.png`` and ``stem.svg``: laid out for the first, the second and any later save
    keeping that layout."""
    paths = []
    for suffix in ("png", "svg"):
        path = folder / f"{stem}.{suffix}"
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=_DPI, format=suffix)
        fig.set_layout_engine("none")
        write_file_atomic(path, buffer.getvalue())
        paths.append(path)
    if close:
        _pyplot().close(fig)
    return paths


def _heatmap_figures(
    records: Sequence[dict], folder: Path, random_weights: bool, metrics: Sequence[str] = METRICS
) -> list[Path]:
    """One heatmap per metric of ``metrics``. Every metric is a share in [0, 1], drawn on that scale so
    that figures of different exports compare, and has the same layers and heads: one figure, laid out
    once, its image redrawn with each metric's table."""
    plt = _pyplot()
    written = []
    image = None
    suffix = " (random weights)" if random_weights else ""
    for metric in metrics:
        values, layers, heads = layer_head_table(records, metric)
        if not np.isfinite(values).any():
            continue
        if image is None:
            height = max(3.0, 0.22 * len(layers) + 1.5)
            width = max(4.0, 0.32 * len(heads) + 2.5)
            fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
            image = draw_heatmap(ax, values, layers, heads, metric + suffix, 0.0, 1.0)
        else:
            redraw_heatmap(image, values, metric + suffix)
        written += _save(image.figure, folder, f"heatmap_{metric}", close=False)
    if image is not None:
        plt.close(image.figure)
    return written


def _baseline(records: Sequence[dict], name: str, metric: str) -> float:
    for record in records:
        if record["layer"] == name:
            return record[metric]
    return math.nan


def _curves_figure(records: Sequence[dict], folder: Path, random_weights: bool) -> list[Path]:
    plt = _pyplot()
    averages = [r for r in records if r["head"] == "avg" and r["layer"] not in BASELINES]
    metrics = [m for m in METRICS if any(math.isfinite(r[m]) for r in averages)]
    if not metrics:
        return []
    columns = 4
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 2.8 * rows), layout="constrained", squeeze=False
    )
    names = [r["layer"] for r in averages]
    x = np.arange(len(names))
    kinds: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        kinds.setdefault(name.rsplit("_", 1)[0] if name != ROLLOUT_KIND else ROLLOUT_KIND, []).append(i)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        values = np.array([r[metric] for r in averages], dtype=np.float64)
        for kind, index in kinds.items():
            ax.plot(x[index], values[index], marker="o", markersize=3, label=kind)
        for baseline, style in (("uniform", "--"), ("uniform_within_frame", "-."), ("same_uv", ":")):
            value = _baseline(records, baseline, metric)
            if math.isfinite(value):
                ax.axhline(value, linestyle=style, color="gray", linewidth=1, label=baseline)
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(x, labels=names, rotation=90, fontsize=5)
        ax.grid(True, linestyle=":", alpha=0.5)
    for index, ax in enumerate(axes.flat):
        if index >= len(metrics):
            ax.axis("off")
        elif index + columns < len(metrics):  # the layers' names under a column's lowest curve only
            ax.tick_params(labelbottom=False)
    legend: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=len(legend), fontsize=8)
    suffix = " (random weights)" if random_weights else ""
    fig.suptitle(f"Per-layer head averages, with baselines{suffix}")
    return _save(fig, folder, "curves")


def _stability_figure(result: Analysis, folder: Path, random_weights: bool) -> list[Path]:
    plt = _pyplot()
    arrays = result.per_query
    masses = arrays["masses"]
    rows = [i for i, (layer, head) in enumerate(zip(arrays["layer"], arrays["head"], strict=True))
            if head == "avg" and layer not in BASELINES]  # fmt: skip
    if not rows:
        return []
    overall = np.isfinite(arrays["mask_recall_overall"][rows]).any()
    if overall:
        recall, tnr = arrays["mask_recall_overall"][rows], arrays["mask_tnr_overall"][rows]
    else:
        with np.errstate(invalid="ignore"):
            recall = np.nanmean(arrays["mask_recall_per_mass"][rows], axis=-1)
            tnr = np.nanmean(arrays["mask_tnr_per_mass"][rows], axis=-1)
    if not np.isfinite(recall).any():
        return []
    names = [str(arrays["layer"][i]) for i in rows]
    x = np.arange(len(names))
    fig, axes = plt.subplots(len(masses), 1, figsize=(max(8.0, 0.4 * len(names)), 2.4 * len(masses)),
                             sharex=True, squeeze=False, layout="constrained")  # fmt: skip
    for j, mass in enumerate(masses):
        ax = axes[j, 0]
        ax.bar(x - 0.2, recall[:, j], 0.4, label="recall", color="#1f77b4")
        ax.bar(x + 0.2, tnr[:, j], 0.4, label="true-negative rate", color="#ff7f0e")
        ax.set_ylim(0.0, 1.0)
        ax.set_title(f"mass preserved: {round(float(mass) * 100)}%", fontsize=9)
        ax.grid(True, axis="y", linestyle=":", alpha=0.5)
    axes[0, 0].legend(fontsize=7, ncols=2)
    axes[-1, 0].set_xticks(x, labels=names, rotation=90, fontsize=6)
    reference = result.summary["options"]["reference_layer"]
    scope = result.summary["options"]["stability_scope"]
    suffix = " (random weights)" if random_weights else ""
    fig.suptitle(f"Mask stability against {reference} (scope: {scope}){suffix}")
    return _save(fig, folder, "stability_bars")


_FORKED: Analysis | None = None  # the analysis whose figures forked workers draw


def _draw(job: tuple, result: Analysis | None = None) -> list[Path]:
    """The figures of one job: ``(kind, folder, random_weights)``, kind ``"curves"`` or ``"stability"``, or
    ``("heatmaps", folder, random_weights, metrics)``."""
    result = result if result is not None else _FORKED
    assert result is not None
    kind, folder, random_weights, *metrics = job
    if kind == "curves":
        return _curves_figure(result.records, folder, random_weights)
    if kind == "stability":
        return _stability_figure(result, folder, random_weights)
    return _heatmap_figures(result.records, folder, random_weights, metrics[0])


def write_figures(result: Analysis, folder: Path, workers: int = 1) -> list[Path]:
    """Every figure of the analysis into ``folder`` (PNG and SVG); returns the files written, by name. With
    ``workers`` > 1 (and no other thread about) two forked processes draw them side by side."""
    global _FORKED
    folder.mkdir(parents=True, exist_ok=True)
    random_weights = bool(result.summary.get("random_weights"))
    side_by_side = workers > 1 and can_fork()
    # the longest first: the curves, then the heatmaps (in three parts side by side, each laid out once),
    # then the bars
    parts = [list(METRICS[i::3]) for i in range(3)] if side_by_side else [list(METRICS)]
    jobs = [("curves", folder, random_weights)]
    jobs += [("heatmaps", folder, random_weights, part) for part in parts]
    jobs += [("stability", folder, random_weights)]
    drawn = None
    if side_by_side:
        _pyplot()  # imported once, before the fork
        _FORKED = result
        try:
            with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
                drawn = list(pool.map(_draw, jobs))
        except BrokenProcessPool:  # a process stopped abruptly (out of memory?): drawn here instead
            pass
        finally:
            _FORKED = None
    if drawn is None:
        drawn = [_draw(job, result) for job in jobs]
    return sorted((path for paths in drawn for path in paths), key=lambda path: (path.stem, path.suffix))
