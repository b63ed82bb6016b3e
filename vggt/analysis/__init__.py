"""Attention analysis: per layer and head, how much attention finds the true correspondence, where the rest
goes, how concentrated and how stable it is (numpy, and numba for the one pass over each row; no torch;
reads exports through :mod:`vggt.attn_format`).

``analyze(export)`` gives the table; :func:`run_analysis` also the per-query metrics and the summary;
``analyze_attention.py`` writes them with figures. Definitions: ``docs/analysis.md``.
"""

from vggt.analysis.columns import COLUMNS, METRICS
from vggt.analysis.correspondence import Correspondence
from vggt.analysis.table import (
    DEFAULT_MASSES,
    Analysis,
    AnalysisError,
    analyze,
    resolve_reference,
    run_analysis,
)

__all__ = [
    "COLUMNS",
    "DEFAULT_MASSES",
    "METRICS",
    "Analysis",
    "AnalysisError",
    "Correspondence",
    "analyze",
    "resolve_reference",
    "run_analysis",
]
