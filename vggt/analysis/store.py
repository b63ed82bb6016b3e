"""An export's analysis kept beside it (``EXPORT/analysis/``): read back when it is that export's, else
computed and saved there when the folder can be written. The viewer's Analysis panel uses this.

What is read back comes from an export folder someone sent: it is checked like the export itself (sizes
capped, no pickles, every array's shape and kind against the export) and recomputed when anything is off.
"""

from __future__ import annotations

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
from vggt.attn_format import AttnExport, FormatError, limits
from vggt.attn_format.npz import NpyMember, load_member, scan_npz
from vggt.attn_format.paths import FolderFiles
from vggt.attn_format.schema import read_json

ANALYSIS_DIR = "analysis"
_MAX_ARRAYS_BYTES = 1 << 31
_MAX_MASSES = 64  # mass shares an analysis read back may hold
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
    its temporary extraction) and when ``analysis`` is a link leading outside the export."""
    if not isinstance(export.files, FolderFiles):
        return None
    return export.files.inside(export.root / ANALYSIS_DIR)


def load_analysis(folder: Path, export: AttnExport) -> Analysis | None:
    """The analysis saved in ``folder`` (inside the export) when it is whole and of this export, else
    None. Its files are read as the export's own are: inside the export, within the format's caps, every
    array's kind and shape checked on its header before it is read."""
    files, what = export.files, "the saved analysis"
    try:
        summary_path = files.check_readable(folder / SUMMARY_NAME, what)
        arrays_path = files.check_readable(folder / NPZ_NAME, what)
        limits.check_file_size(arrays_path.stat().st_size, _MAX_ARRAYS_BYTES, what)
        summary = read_json(summary_path, what)
        if summary.get("fingerprint") != fingerprint(export) or not isinstance(summary.get("options"), dict):
            return None
        members = scan_npz(arrays_path, what)
        if not _members_fit(members, export):
            return None
        arrays = {key: np.asarray(load_member(arrays_path, member, what)) for key, member in members.items()}
    except (FormatError, OSError):
        return None
    if not set(arrays["layer"].tolist()) <= set(export.layer_names) | set(BASELINES):
        return None
    source = (summary.get("correspondence") or {}).get("source")
    return Analysis(records_from_arrays(arrays, source if isinstance(source, str) else None), arrays, summary)


def _members_fit(members: dict[str, NpyMember], export: AttnExport) -> bool:
    """Every array the table needs is there, of the right kind and shape for this export (as its header
    says, before it is read): no more rows than the export's layers and heads make, names no longer than
    a name may be, and nothing else larger than the largest of them."""
    layer, head, masses = members.get("layer"), members.get("head"), members.get("masses")
    if layer is None or head is None or masses is None:
        return False
    if len(layer.shape) != 1 or head.shape != layer.shape:
        return False
    for names in (layer, head):
        if names.dtype.kind != "U" or names.dtype.itemsize > 4 * limits.MAX_NAME_CHARS:
            return False
    rows = sum(1 + int(export.layer_meta(name)["num_heads"]) for name in export.layer_names)
    if layer.shape[0] > rows + len(BASELINES):
        return False
    if masses.dtype.kind != "f" or len(masses.shape) != 1 or not 0 < masses.shape[0] <= _MAX_MASSES:
        return False
    first = export.layer_meta(export.layer_names[0])
    sizes = {"R": layer.shape[0], "Q": int(first["Q"]), "S": int(first["S"]), "M": masses.shape[0]}
    for key, axes in _AXES.items():
        values = members.get(key)
        if values is None or values.dtype.kind != "f" or values.shape != tuple(sizes[a] for a in axes):
            return False
    largest = max(members[key].nbytes for key in _AXES)
    return all(member.nbytes <= largest for member in members.values())


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
