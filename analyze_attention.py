#!/usr/bin/env python
"""Analyse an attention export: per layer and head, how much attention finds the true correspondence,
where the rest goes, how concentrated and how stable it is.

Example (after exporting the bundled example)::

    python analyze_attention.py --attn_dir attn_first2all_synthetic_room

Writes ``layer_head_metrics.csv``, ``per_query.npz``, ``summary.json`` and figures into
``EXPORT/analysis/``; run with ``--help`` for every option, definitions in ``docs/analysis.md``.
"""

import sys

from vggt.analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
