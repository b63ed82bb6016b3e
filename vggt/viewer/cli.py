"""The viewer's command line: ``vggt-attn-view``, ``python visualize_attn_gradio.py`` or
``python -m vggt.viewer``, e.g. ``vggt-attn-view --attn_dir attn_first2all_kitchen``.
"""

from __future__ import annotations

import argparse
import os
import sys

from vggt.attn_format.hub import hub_url
from vggt.viewer.app import build_app, launch
from vggt.viewer.messages import error_text
from vggt.viewer.serving import (
    AUTH_VARIABLE,
    PathRule,
    ServingError,
    check_serving,
    exit_on_sigterm,
    parse_auth,
)
from vggt.viewer.state import CACHE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gradio viewer for VGGT attention exports.")
    parser.add_argument(
        "--attn_dir", "--attn-dir",
        help="export to open at start: folder, attn_maps/, layers_manifest.json, layer metadata, .zip or "
        "hf://datasets/<owner>/<name>",
    )  # fmt: skip
    parser.add_argument(
        "--repo", metavar="OWNER/NAME[@REVISION]",
        help="open at start the export published as this Hugging Face dataset (read into the hub's cache)",
    )  # fmt: skip
    parser.add_argument(
        "--server_name", "--server-name", default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)",
    )  # fmt: skip
    parser.add_argument(
        "--server_port", "--server-port", type=int, default=None, help="port (default: Gradio's, 7860)"
    )
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument(
        "--root",
        help="serve only exports under this folder: the path box opens paths relative to it, nothing outside",
    )
    parser.add_argument(
        "--allow_any_path", "--allow-any-path", action="store_true",
        help="when reachable from the network (--server_name other than 127.0.0.1, or --share), open any "
        "path typed into the page all the same, instead of requiring --root",
    )  # fmt: skip
    parser.add_argument(
        "--auth", metavar="USER:PASSWORD", default=os.environ.get(AUTH_VARIABLE),
        help="require this login (Gradio's authentication) before the page opens; for shared servers. "
        f"Other users of this machine can read a command line: set {AUTH_VARIABLE}=USER:PASSWORD in the "
        "environment instead",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repo is not None:
        if args.attn_dir is not None:
            print("error: give --attn_dir or --repo, not both", file=sys.stderr)
            return 2
        args.attn_dir = hub_url(args.repo)
    try:
        warnings = check_serving(args.server_name, args.share, args.root, args.allow_any_path)
        auth = parse_auth(args.auth) if args.auth else None
        if args.root is not None:
            CACHE.serve(PathRule(args.root))
    except ServingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.attn_dir:
        try:  # opened once here, so that a bad path is said in the terminal, not only in the page
            CACHE.open(args.attn_dir)
        except Exception as exc:  # noqa: BLE001 - any failure is the same one-line error
            print(f"error: cannot open --attn_dir: {error_text(exc)}", file=sys.stderr)
            return 2
    for warning in warnings:
        print(warning, file=sys.stderr)
    exit_on_sigterm()
    demo = build_app(args.attn_dir)
    try:
        launch(
            demo,
            server_name=args.server_name,
            server_port=args.server_port,
            share=args.share,
            auth=auth,
            quiet=True,  # Gradio's own start-up lines (its share=True hint) are replaced by ours
            prevent_thread_lock=True,
        )
        print(f"VGGT attention viewer: open {demo.local_url} in a browser (Ctrl+C stops it)")
        if demo.share_url:
            print(f"public link (anyone who has it can use the viewer): {demo.share_url}")
        else:
            print("to share it through a public gradio.live link, start it with --share")
        demo.block_thread()  # until Ctrl+C or SIGTERM
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM while starting
        demo.close(verbose=False)
    return 0
