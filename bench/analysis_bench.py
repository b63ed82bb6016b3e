"""Time and memory of the full attention analysis against one numpy pass that sums every map.

The export has the size of a real VGGT-1B export per head at stride 1: 24 layers, 16 heads, 3 frames of
518x518 (37x37 patches, Q = 1369), about 2.2 GB of uint8, written with the format's writer (synthetic maps,
exact probabilities, positions of every query's point in every frame given to the analysis). The averaged
export of the same images (about 0.14 GB) is measured too.

Each measurement runs in a fresh Python process, so that its peak memory is its own, and its clock
starts after the imports, which are the same in every mode (numba starts on importing
``vggt.analysis``): the *sum pass* opens the export and sums every stored map
(``heatmaps.sum(axis=(-2, -1))``, numpy's default accumulator, one layer at a time: the target's
reference); the *dequantized sum pass* sums the maps as probabilities (stored values times their scale,
float32, as the reader hands them out), for context; the *analysis* is ``vggt.analysis.run_analysis``
(every column, every head, the baselines, per query and aggregated, with the default workers).
They alternate, ``--repeats`` times, after one warm-up of each that also brings the export into the
page cache (and compiles the analysis's kernels if this checkout has not yet); the ratios of each repeat
are reported, with their median and spread. Memory: the peak resident size of the analysis process
above its size after imports.
Writing the outputs (CSV, NPZ, summary, figures) is timed once, apart.

The exports take minutes to write; they are kept in ``--cache`` (default: a folder in the temporary
directory) and reused while their parameters match. Usage::

    flock /work/bench.lock python bench/analysis_bench.py [--repeats 5] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_RATIO = 3.0
TARGET_EXTRA_GB = 1.5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _positions(export):
    """Where each query's point lies in every frame: the synthetic blob's own shift (a patch per frame
    and a tenth of a patch per layer; the middle layer's), all visible."""
    import numpy as np

    from vggt.analysis import Correspondence
    from vggt.attn_format.grid import cell_centres

    meta = export.layer_meta(export.layer_names[0])
    points = cell_centres(meta["H_p"], meta["W_p"], meta["stride_h"], meta["stride_w"], meta["patch_size"])
    shift = 1.0 + 0.1 * (len(export.layer_names) // 2)
    xy = np.stack([points + [f * shift * meta["patch_size"], 0.0] for f in range(meta["S"])]).astype(
        np.float32
    )
    return Correspondence("truth", xy, np.ones(xy.shape[:2], dtype=bool))


def child(mode: str, root: str, out: str | None) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import numpy as np

    from vggt.analysis import run_analysis
    from vggt.analysis.cli import default_workers
    from vggt.analysis.output import write_outputs
    from vggt.attn_format import open_export

    start_rss = _rss_bytes()
    export = open_export(root)
    correspondence = _positions(export)
    started = time.perf_counter()
    write_seconds = None
    if mode == "sum":
        for name in export.layer_names:
            np.asarray(export.heatmaps(name)).sum(axis=(-2, -1))
            export.release(name)
    elif mode == "sum_dequantized":
        for name in export.layer_names:
            stored, scales = export.heatmaps(name), export.head_scales(name)
            scale = scales[:, None, None, None] if stored.ndim == 5 else scales[0]
            for start in range(0, stored.shape[0], 64):
                np.multiply(stored[start : start + 64], scale, dtype=np.float32).sum(axis=(-2, -1))
            export.release(name)
    else:
        result = run_analysis(export, correspondence=correspondence, workers=default_workers())
        if out:
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            write_outputs(result, Path(out), workers=default_workers())
            write_seconds = time.perf_counter() - started
            started -= seconds
    seconds = time.perf_counter() - started - (write_seconds or 0.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Worker processes count whole, each as large as the largest one (an upper bound).
    workers = default_workers() if mode == "analysis" else 0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 * workers
    extra = peak - start_rss + children
    print(
        json.dumps(
            {"seconds": seconds, "extra_bytes": extra, "write_seconds": write_seconds, "workers": workers}
        )
    )


def _measure(mode: str, root: Path, out: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(root)] + ([str(out)] if out else [])
    environment = os.environ | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _export(cache: Path, per_head: bool, layers: int, heads: int, frames: int, size: int) -> Path:
    from vggt.testing.synthetic import write_synthetic_export

    params = {
        "per_head": per_head,
        "layers": layers,
        "heads": heads,
        "frames": frames,
        "size": size,
        "version": 1,
    }
    root = cache / f"{'per_head' if per_head else 'averaged'}_{layers}x{heads}_{frames}x{size}"
    marker = root / "bench_params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    patches = size // 14
    started = time.perf_counter()
    write_synthetic_export(
        root,
        num_frames=frames,
        H_p=patches,
        W_p=patches,
        num_layers=layers,
        num_heads=heads,
        per_head=per_head,
    )
    marker.write_text(json.dumps(params))
    print(f"  wrote {root} in {time.perf_counter() - started:.0f} s")
    return root


def _size_gb(root: Path) -> float:
    return sum(p.stat().st_size for p in (root / "attn_maps").rglob("*.npz")) / 1e9


def _load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (spread {min(values):.2f}..{max(values):.2f})"


def run(root: Path, repeats: int, label: str, out: Path, targeted: bool = True) -> None:
    """Measure one export; ``targeted``: its time has a target (the per-head export's), else it is shown."""
    print(f"\n{label}: {_size_gb(root):.2f} GB of maps ({_load()})")
    _measure("sum", root)
    first = _measure("analysis", root, out)
    print(
        f"  warm-up: analysis {first['seconds']:.2f} s with {first['workers']} worker process(es) "
        f"({os.cpu_count()} cores); writing the CSV, NPZ, summary and figures {first['write_seconds']:.2f} s"
    )
    ratios, dequantized_ratios, sums, analyses, extras = [], [], [], [], []
    for index in range(repeats):
        summed = _measure("sum", root)
        analysed = _measure("analysis", root)
        dequantized = _measure("sum_dequantized", root)
        ratios.append(analysed["seconds"] / summed["seconds"])
        dequantized_ratios.append(analysed["seconds"] / dequantized["seconds"])
        sums.append(summed["seconds"])
        analyses.append(analysed["seconds"])
        extras.append(analysed["extra_bytes"] / 1e9)
        print(
            f"  repeat {index + 1}: sum pass {summed['seconds']:.2f} s, analysis {analysed['seconds']:.2f} s "
            f"(ratio {ratios[-1]:.2f}x), dequantized sum pass {dequantized['seconds']:.2f} s "
            f"(ratio {dequantized_ratios[-1]:.2f}x), analysis memory +{extras[-1]:.2f} GB"
        )
    ratio, extra = statistics.median(ratios), max(extras)
    print(f"  over {repeats} repeats: sum pass {_spread(sums)} s, analysis {_spread(analyses)} s")
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    target = f" (target <= {TARGET_RATIO:g}x: {verdict})" if targeted else " (reported)"
    print(f"  analysis / sum pass: {_spread(ratios)}x{target}")
    print(f"  analysis / dequantized sum pass: {_spread(dequantized_ratios)}x")
    verdict = "met" if extra <= TARGET_EXTRA_GB else "MISSED"
    print(
        f"  analysis memory above its start: {_spread(extras)} GB (target <= {TARGET_EXTRA_GB:g}: {verdict})"
    )
    print(f"  ({_load()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "vggt-analysis-bench")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=518, help="frame side in pixels (multiple of 14)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.child[2] if len(args.child) > 2 else None)
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"exports in {args.cache} ({_load()})")
    shape = (args.layers, args.heads, args.frames, args.size)
    per_head = _export(args.cache, True, *shape)
    averaged = _export(args.cache, False, *shape)
    with tempfile.TemporaryDirectory(prefix="analysis-bench-out-") as out:
        run(
            per_head,
            args.repeats,
            f"per head, {args.layers} layers x {args.heads} heads",
            Path(out) / "per_head",
        )
        run(averaged, args.repeats, f"averaged, {args.layers} layers", Path(out) / "averaged", targeted=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
