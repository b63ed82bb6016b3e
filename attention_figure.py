"""Remake a figure of attention maps (PNG and SVG) from an export, one row per (layer, head, query).

Example: ``python attention_figure.py --attn_dir attn_room --panel global_24:3:10,12 --out fig/room``.
"""

from vggt.viewer.figures import main

if __name__ == "__main__":
    raise SystemExit(main())
