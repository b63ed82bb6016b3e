"""The analysis table's columns and what each means (``summary.json`` and ``docs/analysis.md`` say
the same)."""

from __future__ import annotations

COLUMNS: dict[str, str] = {
    "layer": "layer name as in the export (layer_13, global_05, frame_02, dino_03, rollout), or a "
    "baseline (same_uv, uniform, uniform_within_frame)",
    "head": "avg for the head average, else the head number 1..H as the viewer numbers them",
    "cross_view_mass": "mean over queries of the share of the query's attention on the patches of "
    "frames other than the query frame (empty for frame and DINOv2 layers)",
    "query_frame_mass": "mean over queries of the share on the patches of the query frame",
    "camera_mass": "mean over queries of the share on the camera tokens of all key frames (in DINOv2 "
    "layers the class token, which sits in that place)",
    "register_mass": "mean over queries of the share on the register tokens of all key frames",
    "entropy": "mean over queries of the entropy of the query's distribution over all pooled cells and "
    "special tokens of its key frames, divided by the log of their count (1 = uniform over the entries)",
    "cells_50": "mean over queries of the smallest share of the patch cells (all key frames) whose "
    "attention adds up to 50% of the query's patch mass",
    "cells_90": "the same for 90%",
    "pck_0": "share of (query, frame) pairs, over frames other than the query frame where the query's "
    "point is visible, whose attention peak cell in that frame is the cell holding the true position "
    "(tied peak cells share the pair)",
    "pck_1": "the same, peak within 1 cell (Chebyshev) of the true cell",
    "pck_2": "the same, peak within 2 cells",
    "corr_mass": "mean over the same pairs of the share of that frame's patch mass within --radius cells "
    "(Chebyshev) of the true cell",
    "corr_source": "where the true positions come from: truth (the export's true geometry), scene "
    "(--scene), track (the export's track head); empty when none or for layers without other frames",
    "mask_recall": "mean over queries and over --masses of the recall of this row's mass-preserving mask "
    "against the reference layer's (head-averaged) mask; with --stability_scope all, one mask over all "
    "queries, averaged over masses",
    "mask_tnr": "the same for the true-negative rate",
}

METRICS = [name for name in COLUMNS if name not in ("layer", "head", "corr_source")]
