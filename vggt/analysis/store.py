"""An export's analysis kept beside it (``EXPORT/analysis/``): read back when it is that export's, else
computed and saved there when the folder can be written. The viewer's Analysis panel uses this.

What is read back comes from an export folder someone sent: it is checked like the export itself (sizes
capped, no pickles, every array's shape and kind against the export) and recomputed when anything is off.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vggt.analysis.columns import METRICS
from vggt.analysis.metrics import PCK_RADII
from vggt.analysis.output import NPZ_NAME, SUMMARY_NAME, check_writable, write_outputs
from vggt.analysis.table import (
    BASELINES,
    Analysis,
    AnalysisError,
    Progress,
    fingerprint,
    records_from_arrays,
    run_analysis,
)
from vggt.attn_format import AttnExport
from vggt.attn_format.paths import FolderFiles

ANALYSIS_DIR = "analysis"
_MAX_SUMMARY_BYTES = 1 << 20
_MAX_ARRAYS_BYTES = 1 << 31
# Arrays read back and their axes: R rows, Q queries, S frames, M masses.
_AXES = {
    "mask_recall_per_mass": "RMQ",
    "mask_tnr_per_mass": "RMQ",
    "mask_recall_overall": "RM",
    "mask_tnr_overall": "RM",
    "corr_mass_per_frame": "RSQ",
    **{f"pck_{r}_per_frame": "RSQ" for r in PCK_RADII},
    **{name: "RQ" for name in METRICS},
}


def analysis_folder(export: AttnExport) -> Path | None:
    """``EXPORT/analysis`` for an export opened from a folder; None for a zip (nothing is written into
    its temporary extraction)."""
    return export.root / ANALYSIS_DIR if isinstance(export.files, FolderFiles) else None


def load_analysis(folder: Path, export: AttnExport) -> Analysis | None:
    """The analysis saved in ``folder`` when it is whole and of this export, else None."""
    try:
        summary_path, arrays_path = folder / SUMMARY_NAME, folder / NPZ_NAME
        if not summary_path.is_file() or not arrays_path.is_file():
            return None
        if summary_path.stat().st_size > _MAX_SUMMARY_BYTES or arrays_path.stat().st_size > _MAX_ARRAYS_BYTES:
            return None
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict) or summary.get("fingerprint") != fingerprint(export):
            return None
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not _arrays_fit(arrays, export, summary):
        return None
    source = (summary.get("correspondence") or {}).get("source")
    return Analysis(records_from_arrays(arrays, source if isinstance(source, str) else None), arrays, summary)


def _arrays_fit(arrays: dict[str, np.ndarray], export: AttnExport, summary: dict) -> bool:
    """Every array the table needs is there, of the right kind and shape for this export."""
    first = export.layer_meta(export.layer_names[0])
    layer, head, masses = arrays.get("layer"), arrays.get("head"), arrays.get("masses")
    if layer is None or head is None or masses is None:
        return False
    if layer.dtype.kind != "U" or head.dtype.kind != "U" or layer.ndim != 1 or head.shape != layer.shape:
        return False
    if masses.dtype.kind != "f" or masses.ndim != 1 or not masses.size:
        return False
    if not set(layer.tolist()) <= set(export.layer_names) | set(BASELINES):
        return False
    sizes = {"R": layer.size, "Q": int(first["Q"]), "S": int(first["S"]), "M": masses.size}
    for key, axes in _AXES.items():
        values = arrays.get(key)
        if values is None or values.dtype.kind != "f" or values.shape != tuple(sizes[a] for a in axes):
            return False
    options = summary.get("options")
    return isinstance(options, dict)


def analysis_for(
    export: AttnExport, progress: Progress | None = None, save: bool = True
) -> tuple[Analysis, str]:
    """The export's analysis, and where it came from.

    Returns
    -------
    analysis : Analysis
    origin : str
        ``"loaded"`` (saved beside the export), ``"saved"`` (computed now and saved there) or
        ``"computed"`` (computed now; the export is a zip or its folder cannot be written).
    """
    folder = analysis_folder(export)
    if folder is not None:
        loaded = load_analysis(folder, export)
        if loaded is not None:
            return loaded, "loaded"
    result = run_analysis(export, progress=progress)
    if save and folder is not None:
        try:
            check_writable(folder)
            write_outputs(result, folder, figures=False)
            return result, "saved"
        except (AnalysisError, OSError):
            pass
    return result, "computed"


def query_metrics(analysis: Analysis, layer: str, head: str, query: int) -> dict[str, float]:
    """One query's own metrics in one row (``head`` is ``"avg"`` or ``"1"``..): every metric column, the
    correspondence ones over that query's pairs, NaN where a metric does not apply."""
    arrays = analysis.per_query
    rows = np.flatnonzero((arrays["layer"] == layer) & (arrays["head"] == head))
    if rows.size != 1:
        raise AnalysisError(f"the analysis has no row for layer {layer}, head {head}")
    row = int(rows[0])
    if not 0 <= query < arrays["entropy"].shape[1]:
        raise AnalysisError(f"query {query} out of range 0..{arrays['entropy'].shape[1] - 1}")
    return {name: float(arrays[name][row, query]) for name in METRICS}


def format_value(value: float) -> str:
    """A metric for a readout: three decimals, an en dash where it does not apply."""
    return "–" if not math.isfinite(value) else f"{value:.3f}"
