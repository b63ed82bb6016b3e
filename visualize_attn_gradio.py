"""Open attention exports in the browser (also installed as the ``vggt-attn-view`` command).

Example: ``python visualize_attn_gradio.py --attn_dir attn_first2all_kitchen``; ``--help`` for the options.
"""

from vggt.viewer.cli import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    raise SystemExit(main())
