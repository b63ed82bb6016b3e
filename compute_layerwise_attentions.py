#!/usr/bin/env python
"""Export VGGT's global attention from the query frame's patches to every frame, layer by layer.

Example (bundled scene, random weights, no download)::

    python compute_layerwise_attentions.py --image_set_name synthetic_room --num_images 3 --random_weights

Run with ``--help`` for every option; the format is described in ``attn_maps_schema.md``.
"""

import sys

from vggt.export_cli import main

if __name__ == "__main__":
    sys.exit(main())
