"""What a viewer user waits for, measured in Chromium: from the user's action to the page showing every
updated image.

The script writes two exports with the format's writer into a temporary folder (synthetic maps, exact
probabilities; deleted afterwards), starts the viewer, drives Debian's chromium with Playwright at
1400 x 900 and times, in the page, from the mouse press (or key press) to the animation frame after the
last canvas of the view was drawn (``performance.now()`` at both ends, so Playwright's own overhead is
not counted):

- per head, stride 1, 3 frames of 518 x 518, 24 layers of 16 heads (the size of a real VGGT-1B
  export per head, about 2.2 GB): Load, click, layer change, head change, all layers;
- averaged, stride 2, 32 frames of 518 x 518, 24 layers: the same actions but the head change.

Load opens an export the server has not opened before (its cache is emptied first). Each action is
repeated ``--repeats`` times (each click on another cell, each layer change to another layer); the
script prints the median, the spread (min-max) and the target of the viewer issue.

Usage: ``python bench/viewer_browser_bench.py [--repeats 10] [--layers 24 --heads 16]``. Run it alone
(``flock /work/bench.lock ...`` on a shared machine) and say the machine's load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from playwright.sync_api import sync_playwright  # noqa: E402

from vggt.testing.synthetic import write_synthetic_export  # noqa: E402
from vggt.viewer.app import build_app, launch  # noqa: E402
from vggt.viewer.state import CACHE, layer_label  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
TARGETS_MS = {
    "Load": 1000.0,
    "click": 250.0,
    "layer change": 300.0,
    "head change": 300.0,
    "all layers": 1000.0,
}
SIZE = 518
PATCHES = SIZE // 14

# The page's clock: the press that starts an action, and the frame after a view drew (attention_view.js).
CLOCK = """() => {
  const start = () => { window.vggtActionAt = performance.now(); };
  window.addEventListener('mousedown', start, true);
  window.addEventListener('keydown', start, true);
}"""
DRAWN = """([id, old]) => {
  const view = document.querySelector(`#${id} .av`);
  return view && view.dataset.drawn !== undefined && view.dataset.drawn !== old;
}"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Page:
    """The viewer in a browser page, with the actions a user takes, each returning its time in ms."""

    def __init__(self, page) -> None:
        self.page = page
        page.evaluate(CLOCK)

    def _drawn(self, view: str) -> str:
        views = self.page.locator(f"#{view} .av")
        return (views.first.get_attribute("data-drawn") or "") if views.count() else ""

    def _timed(self, view: str, act) -> float:
        before = self._drawn(view)
        act()
        self.page.wait_for_function(DRAWN, arg=[view, before], polling="raf", timeout=60_000)
        return self.page.evaluate(
            f"() => Number(document.querySelector('#{view} .av').dataset.drawnAt) - window.vggtActionAt"
        )

    def load(self, path: Path) -> float:
        box = self.page.locator("#export-path textarea, #export-path input").first
        box.fill(str(path))
        return self._timed("query-view", lambda: box.press("Enter"))

    def click(self, x: float, y: float) -> float:
        """Click frame pixel (x, y) of the query frame."""
        canvas = self.page.locator("#query-view .av-picker-canvas").first
        box = canvas.bounding_box()
        position = {"x": (x + 0.5) * box["width"] / SIZE, "y": (y + 0.5) * box["height"] / SIZE}
        return self._timed("overlays", lambda: canvas.click(position=position))

    def choose(self, control: str, label: str) -> float:
        """Pick ``label`` in a dropdown (the time counts from the press on the option)."""
        self.page.locator(f"#{control} input").click()
        option = self.page.get_by_role("option", name=label, exact=True)
        option.wait_for()
        return self._timed("overlays", option.click)

    def press(self, button: str) -> float:
        return self._timed("overlays", lambda: self.page.locator(f"#{button}").click())


def cells(repeats: int, step: int = 7) -> list[tuple[int, int]]:
    """Pixels of different query cells, spread over the frame."""
    return [((37 + 53 * i * step) % (SIZE - 20) + 10, (91 + 71 * i * step) % (SIZE - 20) + 10)
            for i in range(repeats + 1)]  # fmt: skip


def measure(page: Page, root: Path, repeats: int, layers: int, heads: int) -> dict[str, list[float]]:
    """Time every action on the export at ``root`` (``heads`` > 0: per head, the head change too)."""
    results: dict[str, list[float]] = {name: [] for name in TARGETS_MS}
    for _ in range(max(3, repeats // 3)):
        CACHE.clear()  # every Load opens, validates and decodes from scratch
        results["Load"].append(page.load(root))
    names = [f"layer_{index:02d}" for index in range(1, layers + 1)]
    labels = [layer_label(name, {"layer_kind": "global", "layer_index": int(name[-2:])}) for name in names]
    points = cells(repeats)
    page.click(*points[0])  # a first click, not timed (the page draws its first overlays)
    results["click"] = [page.click(*point) for point in points[1:]]
    results["layer change"] = [page.choose("layer-select", labels[(layers - 2 - i) % layers])
                               for i in range(repeats)]  # fmt: skip
    if heads:
        choices = ["Head 3", f"Head {max(1, heads // 2)}", "Average", f"Head {heads}"]
        results["head change"] = [page.choose("head-select", choices[i % 4]) for i in range(repeats)]
    else:
        del results["head change"]
    for _ in range(max(3, repeats // 3)):
        results["all layers"].append(page.press("mode-layers"))
        page.press("mode-frames")
    return results


def report(title: str, results: dict[str, list[float]]) -> bool:
    print(f"\n{title}")
    print(f"{'action':<14}{'median ms':>11}{'min-max ms':>16}{'target ms':>11}  verdict")
    met = True
    for name, times in results.items():
        median = statistics.median(times)
        target = TARGETS_MS[name]
        verdict = "ok" if median <= target else "MISSED"
        met &= verdict == "ok"
        spread = f"{min(times):.0f}-{max(times):.0f}"
        print(f"{name:<14}{median:>11.0f}{spread:>16}{target:>11.0f}  {verdict}  (n={len(times)})")
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--frames", type=int, default=32, help="frames of the averaged export (default 32)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="viewer-browser-bench-"))
    demo = None
    try:
        start = time.perf_counter()
        grid = {"H_p": PATCHES, "W_p": PATCHES, "num_layers": args.layers}
        per_head = write_synthetic_export(
            workdir / "per_head", num_frames=3, num_heads=args.heads, per_head=True, **grid
        )
        averaged = write_synthetic_export(
            workdir / "averaged", num_frames=args.frames, stride_h=2, stride_w=2, **grid
        )
        size = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file()) / 1e9
        print(f"exports written in {time.perf_counter() - start:.0f} s ({size:.2f} GB)")
        port = free_port()
        demo = build_app(None)
        launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/")
                viewer = Page(page)
                first = measure(viewer, per_head, args.repeats, args.layers, args.heads)
                second = measure(viewer, averaged, args.repeats, args.layers, 0)
            finally:
                browser.close()
    finally:
        if demo is not None:
            demo.close()
        CACHE.clear()
        shutil.rmtree(workdir, ignore_errors=True)
    met = report(
        f"per head, stride 1, 3 frames of {SIZE} x {SIZE}, {args.layers} layers x {args.heads} heads", first
    )
    met &= report(
        f"averaged, stride 2, {args.frames} frames of {SIZE} x {SIZE}, {args.layers} layers", second
    )
    print(f"\nload average after the run: {os.getloadavg()[0]:.1f} (1 min)")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
