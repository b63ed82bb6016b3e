"""End to end in a real browser: Debian's chromium driven by Playwright against the running app.

Set ``VGGT_VIEWER_EXPORT=path`` to drive the app on a given export (for example the bundled example's),
and ``VGGT_SCREENSHOT=1`` to save the page as ``docs/viewer_screenshot.png``.
"""

from __future__ import annotations

import io
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt.attn_format import open_export
from vggt.testing.synthetic import write_synthetic_export
from vggt.viewer import render
from vggt.viewer.app import build_app
from vggt.viewer.state import CACHE, layer_label

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "viewer_screenshot.png"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_kinds_export(root: Path) -> Path:
    """Per-head export with global, frame and DINOv2 layers, token queries and the rollout."""
    return write_synthetic_export(
        root, H_p=8, W_p=11, stride_h=3, stride_w=2, num_layers=4, per_head=True,
        kinds=("global", "frame", "dino"), rollout=True, rollout_discard=0.9,
    )  # fmt: skip


@pytest.fixture(scope="module")
def export_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("VGGT_VIEWER_EXPORT")
    if given:
        return Path(given)
    return _write_kinds_export(tmp_path_factory.mktemp("browser") / "export")


@pytest.fixture(scope="module")
def rollout_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export with a rollout, whatever ``VGGT_VIEWER_EXPORT`` names."""
    return _write_kinds_export(tmp_path_factory.mktemp("browser") / "rollout")


@pytest.fixture(scope="module")
def app_url() -> Iterator[str]:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    port = _free_port()
    demo = build_app(None)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        CACHE.clear()


@pytest.fixture()
def page(app_url: str) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app_url)
            yield page
        finally:
            browser.close()


def _image_pixels(page, selector: str) -> np.ndarray:
    """Download the image an ``<img>`` shows, exactly as served: ``[H, W, 3] uint8``."""
    source = page.locator(f"{selector} img").first.get_attribute("src")
    response = page.request.get(source)
    assert response.ok, f"cannot fetch {source}"
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def _click_image_pixel(page, selector: str, x: float, y: float, natural: tuple[int, int]) -> None:
    """Click where image pixel (x, y) is drawn, whatever the <img> is scaled to (object-fit: contain)."""
    image = page.locator(f"{selector} img").first
    box = image.bounding_box()
    ratio = min(box["width"] / natural[1], box["height"] / natural[0])
    left = (box["width"] - natural[1] * ratio) / 2
    top = (box["height"] - natural[0] * ratio) / 2
    image.click(position={"x": left + x * ratio, "y": top + y * ratio})


def _pick_layer(page, label: str) -> None:
    """Choose a layer in the Layer dropdown by the label it shows."""
    page.locator("#layer-select input").click()
    page.get_by_role("option", name=label, exact=True).click()


def _load(page, path: Path) -> None:
    page.locator("#export-path textarea").fill(str(path))
    page.locator("#load-button").click()
    sync_api.expect(page.locator("#query-image img")).to_have_count(1)


def test_open_click_switch_layer_and_composites(page, export_path: Path) -> None:
    expect = sync_api.expect
    export = open_export(export_path)
    layers = export.layer_names
    num_frames = len(export.frame_paths)
    global_layers = [name for name in layers if export.layer_meta(name)["layer_kind"] == "global"]
    default = (global_layers or layers)[-1]  # the last global layer
    meta = export.layer_meta(default)
    labels = [layer_label(name, export.layer_meta(name)) for name in layers]

    _load(page, export_path)
    expect(page.locator("#value-readout")).to_contain_text(default)
    before = _image_pixels(page, "#query-image")

    height, width = export.image_size
    geometry = render.Geometry(
        height=height,
        width=width,
        H_ds=meta["H_ds"],
        W_ds=meta["W_ds"],
        stride_h=meta["stride_h"],
        stride_w=meta["stride_w"],
        patch_size=meta["patch_size"],
        scale=render.display_scale(height, width),
    )
    assert before.shape == (geometry.display_height, geometry.display_width, 3)
    row, col = geometry.H_ds // 2, geometry.W_ds // 3
    y0, y1, x0, x1 = geometry.cell_box(row, col)
    _click_image_pixel(page, "#query-image", (x0 + x1) / 2, (y0 + y1) / 2, before.shape[:2])

    # one overlay per frame, labelled with frame number and source file
    captions = page.locator("#overlays .caption-label")
    expect(captions).to_have_count(num_frames)
    expected_captions = [f"frame {i} · {source}" for i, source in enumerate(export.frame_sources)]
    assert captions.all_inner_texts() == expected_captions
    expect(page.locator("#value-readout")).to_contain_text(f"Query cell row {row}, col {col}")

    # the pixels under the clicked cell, and only those, are highlighted
    after = _image_pixels(page, "#query-image")
    changed = np.any(after != before, axis=-1)
    assert changed[y0:y1, x0:x1].all()
    changed[y0:y1, x0:x1] = False
    assert not changed.any()

    # switch layer (by its label in the dropdown): the view re-renders for the same query
    first_overlay = page.locator("#overlays img").first.get_attribute("src")
    _pick_layer(page, labels[0])
    expect(page.locator("#value-readout")).to_contain_text(f"{labels[0]} ({layers[0]})")
    expect(page.locator("#value-readout")).to_contain_text("layer vmax99")
    expect(page.locator("#value-readout")).to_contain_text(f"Query cell row {row}, col {col}")
    expect(page.locator("#overlays img").first).not_to_have_attribute("src", first_overlay)
    expect(captions).to_have_count(num_frames)
    page.locator("#shares-chart").scroll_into_view_if_needed()
    expect(page.locator("#shares-table")).to_contain_text("camera")
    if os.environ.get("VGGT_SCREENSHOT") == "1":
        page.wait_for_timeout(1500)  # let the bar chart finish drawing
        page.evaluate("window.scrollTo(0, 0)")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

    # all layers at once: one strip per layer of every kind, titled with the layer's label
    page.locator("#all-layers input[type=checkbox]").check()
    expect(captions.first).to_have_text(re.compile(rf"^{re.escape(labels[0])}\b"))
    expect(captions).to_have_count(len(layers))
    titles = captions.all_inner_texts()
    assert [title.startswith(label) for title, label in zip(titles, labels, strict=True)] == [True] * len(
        labels
    )


def test_pick_rollout_in_the_layer_choice(page, rollout_export: Path) -> None:
    expect = sync_api.expect
    export = open_export(rollout_export)
    num_frames = len(export.frame_paths)
    rollout = export.layer_meta("rollout")
    label = f"Rollout (discard {rollout['rollout_discard_ratio']:g})"
    readout = page.locator("#value-readout")
    captions = page.locator("#overlays .caption-label")

    _load(page, rollout_export)
    expect(readout).to_contain_text("global_04")
    shape = _image_pixels(page, "#query-image").shape
    _click_image_pixel(page, "#query-image", shape[1] / 2, shape[0] / 2, shape[:2])
    expect(captions).to_have_count(num_frames)
    page.locator("#head-select input").click()
    page.get_by_role("option", name="Head 2", exact=True).click()
    expect(readout).to_contain_text("Head 2 vmax99")
    global_overlay = page.locator("#overlays img").first.get_attribute("src")

    # the rollout: its discard ratio in the readout, the gallery re-rendered, the Head control on Average
    _pick_layer(page, label)
    expect(readout).to_contain_text("discard ratio 0.9")
    expect(readout).to_contain_text("attention rollout")
    expect(page.locator("#overlays img").first).not_to_have_attribute("src", global_overlay)
    expect(captions).to_have_count(num_frames)
    expect(page.locator("#head-select input")).to_have_value("Average")
    expect(page.locator("#head-select input")).to_be_disabled()

    # its camera-token view: one overlay per frame, the discard ratio in its readout too
    page.get_by_text("Camera-token view", exact=False).first.click()
    expect(page.locator("#token-readout")).to_contain_text("discard ratio 0.9")
    expect(page.locator("#token-overlays .caption-label")).to_have_count(num_frames)

    # a frame layer: frame 0 only, in both views
    _pick_layer(page, "Frame 01")
    expect(readout).to_contain_text("frame attention")
    expect(captions).to_have_count(1)
    expect(page.locator("#token-overlays .caption-label")).to_have_count(1)
    expect(page.locator("#head-select input")).to_be_enabled()


def test_attn_dir_at_start_and_two_sessions_keep_their_own_export(tmp_path: Path) -> None:
    expect = sync_api.expect
    two_frames = write_synthetic_export(tmp_path / "two", num_frames=2, H_p=4, W_p=4, num_layers=2, seed=1)
    four_frames = write_synthetic_export(tmp_path / "four", num_frames=4, H_p=5, W_p=3, num_layers=3, seed=2)
    port = _free_port()
    demo = build_app(str(two_frames))  # what --attn_dir does
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                first = browser.new_context().new_page()
                second = browser.new_context().new_page()
                for page in (first, second):
                    page.set_default_timeout(TIMEOUT_MS)
                    page.goto(f"http://127.0.0.1:{port}/")
                    expect(page.locator("#value-readout")).to_contain_text("layer_02")  # opened at start
                second.locator("#export-path textarea").fill(str(four_frames))
                second.locator("#load-button").click()
                expect(second.locator("#value-readout")).to_contain_text("layer_03")
                for page, frames in ((first, 2), (second, 4), (first, 2)):
                    shape = _image_pixels(page, "#query-image").shape
                    _click_image_pixel(page, "#query-image", 5, 5, shape[:2])
                    captions = page.locator("#overlays .caption-label")
                    expect(captions).to_have_count(frames)
                    assert captions.all_inner_texts()[-1].startswith(f"frame {frames - 1} ")
            finally:
                browser.close()
    finally:
        demo.close()
        CACHE.clear()


def test_a_bad_path_after_a_good_export_keeps_the_page(page, export_path: Path, tmp_path: Path) -> None:
    expect = sync_api.expect
    _load(page, export_path)
    shape = _image_pixels(page, "#query-image").shape
    _click_image_pixel(page, "#query-image", 5, 5, shape[:2])
    expect(page.locator("#value-readout")).to_contain_text("Query cell row 0, col 0")

    page.locator("#export-path textarea").fill(str(tmp_path / "no_such_export"))
    page.locator("#load-button").click()
    message = page.locator("#export-message")
    expect(message).to_contain_text("no such file")
    assert "\n" not in message.inner_text().strip()
    # no component in an error state, no toast: the old export is still open and clickable
    assert page.get_by_text("Error", exact=True).count() == 0
    assert page.locator(".toast-body").count() == 0
    _click_image_pixel(page, "#query-image", shape[1] - 5, shape[0] - 5, shape[:2])
    expect(page.locator("#value-readout")).not_to_contain_text("Query cell row 0, col 0")
    expect(message).to_have_text("")  # a successful action clears the message
