"""``analyze_attention.py``: the analysis of an export, written beside it (or where ``--out`` says).

Bad input (not an export, a layer that does not exist, masses outside (0, 1), a folder that cannot be
written) is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vggt.analysis.output import check_writable, remove_if_empty, write_outputs
from vggt.analysis.store import ANALYSIS_DIR, analysis_folder
from vggt.analysis.table import DEFAULT_MASSES, SCOPES, AnalysisError, run_analysis
from vggt.arguments import EXIT_USAGE, OneLineParser, UsageError
from vggt.attn_format import AttnExport, FormatError, open_export
from vggt.attn_format.hub import hub_url, is_hub_path, parse_hub_path
from vggt.attn_format.quantization import worker_threads
from vggt.wording import plural

MAX_WORKERS = 4


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        description="Per layer and head: where attention goes, whether it finds the true correspondence, "
        "how concentrated and how stable it is. Writes layer_head_metrics.csv, per_query.npz, summary.json "
        "and figures (definitions: docs/analysis.md).",
    )
    export = parser.add_mutually_exclusive_group(required=True)
    export.add_argument(
        "--attn_dir",
        help="the export: folder, its attn_maps/, manifest, .zip, or hf://datasets/<owner>/<name>",
    )
    export.add_argument(
        "--repo",
        help="the export as a Hugging Face dataset: <owner>/<name>[@<revision>] (read into its cache)",
    )
    parser.add_argument("--out", help="output folder (default: EXPORT/analysis)")
    parser.add_argument(
        "--reference_layer",
        help="stability reference: a layer name (layer_13) or a 0-based global layer number, as the "
        "manifest's index and the seed fork's --start_layer (12 = layer_13); default: the middle global "
        "layer",
    )
    parser.add_argument(
        "--masses",
        default=",".join(f"{m:g}" for m in DEFAULT_MASSES),
        help="mass shares of the stability masks, comma-separated, each in (0, 1) (default: %(default)s)",
    )
    parser.add_argument("--radius", type=int, default=1, help="corr_mass window radius in cells (default: 1)")
    parser.add_argument(
        "--scene",
        help="a scene folder with the frames' true geometry (cameras.json and depth/ beside images/, as "
        "examples/synthetic_room); default: the export's own true geometry, else its track head's",
    )
    parser.add_argument(
        "--stability_scope",
        choices=SCOPES,
        default="query",
        help="a mask per query (default) or one mask over all queries, as the seed fork computes it",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="processes analysing layers side by side (default: %(default)s, the cores available, at most "
        f"{MAX_WORKERS})",
    )
    parser.add_argument("--no_figures", action="store_true", help="write the tables only")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def default_workers() -> int:
    """The cores this process may use, at most :data:`MAX_WORKERS` (each worker holds a layer's working
    memory)."""
    return min(worker_threads(), MAX_WORKERS)


def _masses(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise AnalysisError(f"--masses must be numbers separated by commas, got {text!r}") from None


def default_output(attn_dir: str, export: AttnExport) -> Path:
    """``EXPORT/analysis`` for a folder; ``NAME_analysis`` beside a zip (its extracted copy is temporary),
    in the working folder for a dataset of the hub (its copy is the hub's cache). An ``analysis`` that is
    a link leading outside the export is refused (nothing is written there)."""
    if is_hub_path(attn_dir):
        return Path(f"{parse_hub_path(attn_dir)[0].split('/')[1]}_{ANALYSIS_DIR}")
    given = Path(attn_dir).expanduser()
    if given.suffix.lower() == ".zip":
        return given.with_name(given.stem + "_" + ANALYSIS_DIR)
    folder = analysis_folder(export)
    if folder is None:
        raise AnalysisError(f"{ANALYSIS_DIR}/ of the export is a link leading outside it; give --out DIR")
    return folder


def main(argv: list[str] | None = None) -> int:
    created: list[Path] = []  # the output folders made here: removed again if the analysis stops empty
    try:
        args = build_parser().parse_args(argv)
        if args.radius < 0:
            raise AnalysisError(f"--radius must be 0 or more cells, got {args.radius}")
        if args.workers < 1:
            raise AnalysisError(f"--workers must be 1 or more, got {args.workers}")
        masses = _masses(args.masses)
        if args.repo is not None:
            args.attn_dir = hub_url(args.repo)
        export = open_export(args.attn_dir)
        out = Path(args.out).expanduser() if args.out else default_output(args.attn_dir, export)
        created = check_writable(out)
        started = time.perf_counter()

        def progress(done: int, total: int, name: str) -> None:
            if not args.quiet:
                print(f"\r  layer {done}/{total} ({name})", end="", flush=True)

        result = run_analysis(
            export,
            reference_layer=args.reference_layer,
            masses=masses,
            radius=args.radius,
            stability_scope=args.stability_scope,
            scene=args.scene,
            workers=args.workers,
            progress=progress,
        )
        if not args.quiet:
            took = time.perf_counter() - started
            print(f"\r  analysed {plural(len(export.layer_names), 'layer')} in {took:.1f} s")
        written = write_outputs(result, out, figures=not args.no_figures, workers=args.workers)
    except (UsageError, AnalysisError, FormatError, ModuleNotFoundError) as exc:
        remove_if_empty(created)
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        remove_if_empty(created)
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    if not args.quiet:
        options = result.summary["options"]
        source = result.summary["correspondence"]["source"] or "none (correspondence columns empty)"
        print(f"  stability reference: {options['reference_layer']}; true positions: {source}")
        print(f"wrote {len(written)} files into {out}")
    return 0


if __name__ == "__main__":  # python -m vggt.analysis.cli
    raise SystemExit(main())
