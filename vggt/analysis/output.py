"""The analysis on disk: ``layer_head_metrics.csv``, ``per_query.npz``, ``summary.json`` and the figures.

Each file is written to a temporary name and renamed into place, so an interrupted run leaves whole files.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from vggt.analysis.columns import COLUMNS
from vggt.analysis.table import Analysis, AnalysisError
from vggt.attn_format.paths import is_inside
from vggt.attn_format.schema import write_file_atomic, write_json_atomic

CSV_NAME = "layer_head_metrics.csv"
NPZ_NAME = "per_query.npz"
SUMMARY_NAME = "summary.json"
FIGURES_DIR = "figures"


def check_writable(folder: Path) -> list[Path]:
    """Create ``folder`` if needed and make sure files can be written in it; :class:`AnalysisError` if not.
    Returns the folders it created, innermost first (for :func:`remove_if_empty`)."""
    created = []
    missing = Path(folder).absolute()
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)  # a fresh name: no link followed
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise AnalysisError(f"cannot write the analysis into {folder}: {exc.strerror or exc}") from None
    return created


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders :func:`check_writable` created, innermost first, those that are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): left as it is
            return


def csv_text(records: list[dict]) -> str:
    """The table as CSV: the columns of :data:`COLUMNS`, numbers with 6 significant digits, empty where
    a metric does not apply."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for record in records:
        row = []
        for name in COLUMNS:
            value = record[name]
            if isinstance(value, float):
                row.append("" if math.isnan(value) else f"{value:.6g}")
            else:
                row.append(value)
        writer.writerow(row)
    return buffer.getvalue()


def write_outputs(result: Analysis, folder: Path, figures: bool = True, workers: int = 1) -> list[Path]:
    """Write the analysis into ``folder``; returns the files written. ``workers``: processes that draw the
    figures (two at most)."""
    folder = Path(folder)
    check_writable(folder)
    written = []
    path = folder / CSV_NAME
    write_file_atomic(path, csv_text(result.records).encode())
    written.append(path)
    path = folder / NPZ_NAME
    buffer = io.BytesIO()
    np.savez(buffer, **result.per_query)  # floats already float32, as the analysis keeps them
    write_file_atomic(path, buffer.getvalue())
    written.append(path)
    if figures:
        from vggt.analysis.figures import write_figures

        figures_folder = folder / FIGURES_DIR
        if not is_inside(figures_folder.resolve(), folder.resolve()):
            raise AnalysisError(f"{figures_folder} is a link to another folder (refused)")
        written += write_figures(result, figures_folder, workers)
    summary = dict(result.summary, files=[p.relative_to(folder).as_posix() for p in written])
    path = folder / SUMMARY_NAME
    write_json_atomic(path, summary)
    written.append(path)
    return written
