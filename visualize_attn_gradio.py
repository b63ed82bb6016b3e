"""Open attention exports in the browser.

Example: ``python visualize_attn_gradio.py --attn_dir attn_first2all_kitchen``.
"""

from __future__ import annotations

import argparse

from vggt.viewer.app import build_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gradio viewer for VGGT attention exports.")
    parser.add_argument(
        "--attn_dir", "--attn-dir",
        help="export to open at start: folder, attn_maps/, layers_manifest.json, layer metadata or .zip",
    )  # fmt: skip
    parser.add_argument(
        "--server_name", "--server-name", default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)",
    )  # fmt: skip
    parser.add_argument(
        "--server_port", "--server-port", type=int, default=None, help="port (default: Gradio's)"
    )
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    demo = build_app(args.attn_dir)
    demo.queue().launch(server_name=args.server_name, server_port=args.server_port, share=args.share)


if __name__ == "__main__":
    main()
