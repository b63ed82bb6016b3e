#!/usr/bin/env python
"""Ablate heads, mask keys, turn global layers into frame layers or sparsify attention, and measure what
VGGT's cameras, depth, world points and tracks lose.

Example (bundled scene, random weights, no download)::

    python intervene_attention.py --num_images 2 --random_weights --ablate_heads global:12

Run with ``--help`` for every option; ``results.csv``'s columns are described in the README.
"""

import sys

from vggt.intervene_cli import main

if __name__ == "__main__":
    sys.exit(main())
