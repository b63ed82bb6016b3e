"""End to end in a real browser: Debian's chromium driven by Playwright against the running app.

Set ``VGGT_VIEWER_EXPORT=path`` to drive the main test on a given export (for example the bundled
example's), and ``VGGT_SCREENSHOT=1`` to save the window, after a click on the default layer, as
``docs/viewer_screenshot.png`` (the README's screenshot; the command is in the README).
"""

from __future__ import annotations

import base64
import io
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_viewer import expected_overlay
from vggt.attn_format import open_export
from vggt.testing.synthetic import write_synthetic_export
from vggt.viewer import render
from vggt.viewer.app import build_app, launch
from vggt.viewer.state import CACHE, load_export

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
WINDOW = {"width": 1400, "height": 900}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python")
sync_api.expect.set_options(timeout=TIMEOUT_MS)  # a loaded machine answers slowly


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
def kinds_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export with every layer kind and the rollout, whatever ``VGGT_VIEWER_EXPORT`` names."""
    return _write_kinds_export(tmp_path_factory.mktemp("browser") / "kinds")


def start_viewer(initial_path: str | None = None) -> tuple[object, str]:
    """Start the viewer on a free port (as ``visualize_attn_gradio.py`` does); the app and its address."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    port = _free_port()
    demo = build_app(initial_path)
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app_url() -> Iterator[str]:
    demo, url = start_viewer()
    try:
        yield url
    finally:
        demo.close()
        CACHE.clear()


def chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@pytest.fixture()
def page(app_url: str) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        browser = chromium(playwright)
        try:
            page = browser.new_page(viewport=WINDOW)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app_url)
            yield page
        finally:
            browser.close()


# ---- driving the page -----------------------------------------------------------------------------------


def drawn(page, view: str) -> str:
    """The value an attention view last drew (its ``seq``), or ``""``."""
    views = page.locator(f"#{view} .av")
    return (views.first.get_attribute("data-drawn") or "") if views.count() else ""  # a closed tab has none


def wait_drawn(page, view: str, before: str) -> None:
    """Wait until attention view ``view`` has drawn a value other than ``before``."""
    script = (
        "([id, old]) => { const v = document.querySelector(`#${id} .av`); return v?.dataset.drawn !== old; }"
    )
    page.wait_for_function(script, arg=[view, before])


def load(page, path: Path) -> None:
    before = drawn(page, "query-view")
    page.locator("#export-path textarea, #export-path input").first.fill(str(path))
    page.locator("#load-button").click()
    wait_drawn(page, "query-view", before)


def visible_box(locator) -> dict:
    """The element's box once it is shown (a loaded machine may draw a tab's view a while after it opened)."""
    locator.wait_for(state="visible")
    sync_api.expect(locator).to_be_visible()
    box = locator.bounding_box()
    assert box is not None and box["width"] > 0, box
    return box


def click_frame_pixel(page, view: str, x: float, y: float, size: tuple[int, int]) -> None:
    """Click where frame pixel (x, y) is drawn on the picker of ``view`` (``size`` = frame W, H); wait
    for the answer."""
    canvas = page.locator(f"#{view} .av-picker-canvas").first
    box = visible_box(canvas)
    target = "overlays" if view == "query-view" else view
    before = drawn(page, target)
    canvas.click(position={"x": (x + 0.5) * box["width"] / size[0], "y": (y + 0.5) * box["height"] / size[1]})
    wait_drawn(page, target, before)


def pick(page, control: str, label: str, view: str = "overlays") -> None:
    """Choose ``label`` in dropdown ``control`` and wait for ``view`` to redraw."""
    before = drawn(page, view)
    page.locator(f"#{control} input").click()
    page.get_by_role("option", name=label, exact=True).click()
    wait_drawn(page, view, before)


def press(page, button: str, view: str = "overlays") -> None:
    before = drawn(page, view)
    page.locator(f"#{button}").click()
    wait_drawn(page, view, before)


def canvas_pixels(locator) -> np.ndarray:
    """What a canvas holds, exactly: ``[H, W, 3] uint8``."""
    url = locator.evaluate("canvas => canvas.toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def assert_readable_grid(page) -> None:
    """A composite as the issue asks: every cell at least 160 px wide, each row's label and scale and each
    column's title as text outside the images (the images carry no text)."""
    widths = [visible_box(c)["width"] for c in page.locator("#overlays canvas.av-canvas").all()]
    assert widths and min(widths) >= 160, widths
    rows = page.locator("#overlays .av-label").count()
    assert rows and len(texts(page, "#overlays .av-label-name")) == rows
    assert all(note.startswith("full colour = ") for note in texts(page, "#overlays .av-label-note"))
    assert all(texts(page, "#overlays .av-column"))
    assert page.locator("#overlays img").count() == 0  # no picture of text


def save_screenshot(page, path: Path) -> None:
    """The window as the user sees it (1400 x 900, scrolled to the top) as a PNG."""
    page.evaluate("window.scrollTo(0, 0)")
    page.mouse.move(0, 0)  # no hover outline
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    shot.save(path, optimize=True)  # full colour: a 256-colour palette bands the colour bar


def texts(page, selector: str) -> list[str]:
    return [text.strip() for text in page.locator(selector).all_inner_texts()]


def marker_centres(export, qi: int, frame: int, factor: int) -> list[tuple[int, int]]:
    """Canvas pixels where the page centres the markers of query ``qi`` on ``frame`` (none without
    geometry)."""
    geometry = export.geometry()
    if geometry is None:
        return []
    centres = []
    for source in geometry.sources:
        xy, visible = geometry.correspondence(source)
        if visible[frame, qi]:
            centres.append(tuple(int((v + 0.5) * factor) for v in xy[frame, qi]))
    return centres


# ---- the main view --------------------------------------------------------------------------------------


def test_open_click_switch_layer_and_composites(page, export_path: Path) -> None:
    expect = sync_api.expect
    loaded = load_export(str(export_path))
    export = loaded.export
    geometry = loaded.geometry
    layers = export.layer_names
    global_layers = [name for name in layers if export.layer_meta(name)["layer_kind"] == "global"]
    default = (global_layers or layers)[-1]  # the last global layer
    labels = list(loaded.layer_labels.values())
    size = (geometry.width, geometry.height)
    readout = page.locator("#query-view .av-readout")

    load(page, export_path)
    expect(readout).to_contain_text(f"{loaded.layer_labels[default]} ({default})")
    expect(page.locator("#overlays .av-empty")).to_have_text("Click a patch of the query frame.")

    row, col = geometry.H_ds // 2, geometry.W_ds // 3
    y0, y1, x0, x1 = geometry.cell_box(row, col)
    click_frame_pixel(page, "query-view", (x0 + x1) / 2, (y0 + y1) / 2, size)
    expect(readout).to_contain_text(f"Query cell row {row}, col {col}")
    # one overlay per frame, its caption as text under it
    captions = texts(page, "#overlays .av-caption")  # with geometry, each goes on with its peak cell
    assert len(captions) == loaded.num_frames
    assert all(
        caption.split(" · peak cell ")[0] == label
        for caption, label in zip(captions, loaded.labels, strict=True)
    )
    assert page.locator("#overlays canvas.av-canvas").count() == loaded.num_frames

    # a head: the page colours the stored codes exactly as the format says
    head = "Head 2" if export.layer_meta(default)["per_head_data"] else "Average"
    if head == "Average":  # an averaged export: the Head control does not apply
        expect(page.locator("#head-select input")).to_be_disabled()
        expect(page.locator("#head-select input")).to_have_value("Average")
    else:
        pick(page, "head-select", head)
    qi = row * geometry.W_ds + col
    maps = export.query_maps(default, qi, 1 if head != "Average" else None)
    if maps.ndim == 4:
        maps = maps.mean(0)
    meta = export.layer_meta(default)
    if head != "Average":
        scale = float(meta["per_head_vmax99"][1])  # the head's stored scale
    elif meta["per_head_data"]:
        scale = float(np.percentile(maps, 99))  # the heads' average on its own 99th percentile
    else:
        scale = float(meta["layer_vmax99"])  # averaged data: the layer's stored scale
    for frame in range(loaded.num_frames):
        canvas = page.locator("#overlays canvas.av-canvas").nth(frame)
        pixels = canvas_pixels(canvas)
        factor = int(float(canvas.get_attribute("data-scale")))
        scaled = replace(geometry, scale=factor)
        codes = np.rint(np.clip(maps[frame] / scale, 0, 1) * 255).astype(np.uint8)
        reference = expected_overlay(render.upscale(loaded.frames[frame], factor), codes, scaled, 0.6)
        if frame == 0:  # the query cell is outlined on frame 0
            qy0, qy1, qx0, qx1 = scaled.cell_box(row, col)
            pixels, reference = pixels.copy(), reference.copy()
            pixels[qy0:qy1, qx0:qx1] = reference[qy0:qy1, qx0:qx1] = 0
        pixels, reference = pixels.copy(), reference.copy()
        for x, y in marker_centres(export, qi, frame, factor):  # an export with geometry marks its points
            reach = max(4, 5 * factor) + 3  # the page's marker radius, and its line
            pixels[y - reach : y + reach + 1, x - reach : x + reach + 1] = 0
            reference[y - reach : y + reach + 1, x - reach : x + reach + 1] = 0
        difference = np.abs(pixels.astype(float) - reference)
        assert difference.max() <= 3, (frame, difference.max())  # canvas alpha blending rounds in 8 bits

    # switch layer (by its label in the dropdown): the view re-renders for the same query
    pick(page, "layer-select", labels[0])
    expect(readout).to_contain_text(f"{labels[0]} ({layers[0]})")
    expect(readout).to_contain_text(f"Query cell row {row}, col {col}")
    if os.environ.get("VGGT_SCREENSHOT") == "1":
        pick(page, "layer-select", loaded.layer_labels[default])
        save_screenshot(page, SCREENSHOT)

    # all layers at once: one row per layer of every kind, its label and scale as text outside the
    # images, one column per frame; each cell at least 160 px wide
    press(page, "mode-layers")
    names = texts(page, "#overlays .av-label-name")
    assert [name.removesuffix(" · average") for name in names] == labels  # the rollout has no head 2
    assert all(note.startswith("full colour = ") for note in texts(page, "#overlays .av-label-note"))
    assert (
        texts(page, "#overlays .av-column")[: loaded.num_frames] == list(loaded.labels)[: loaded.num_frames]
    )
    assert_readable_grid(page)

    # all heads of the layer: one row per head (its vmax99 as text), one column per frame
    if export.layer_meta(default)["per_head_data"]:
        press(page, "mode-heads")
        heads = export.layer_meta(default)["num_heads"]
        assert texts(page, "#overlays .av-label-name") == [f"Head {h}" for h in range(1, heads + 1)]
        assert_readable_grid(page)
        press(page, "mode-layers")

    # clicking a cell opens its layer and head in the frames view
    before = drawn(page, "overlays")
    page.locator("#overlays .av-opens").nth(loaded.num_frames).click()  # second row, first frame
    wait_drawn(page, "overlays", before)
    expect(page.locator("#layer-select input")).to_have_value(labels[1])
    assert page.locator("#overlays .av-label").count() == 0
    assert page.locator("#mode-frames").get_attribute("class").count("primary") == 1


def test_geometry_markers_in_the_page(page, tmp_path: Path) -> None:
    expect = sync_api.expect
    root = write_synthetic_export(
        tmp_path / "geometry", num_frames=3, H_p=8, W_p=10, num_layers=1, geometry=True
    )
    export = open_export(root)
    geometry = export.geometry()
    load(page, root)
    row, col = 4, 3
    click_frame_pixel(page, "query-view", col * 14 + 7, row * 14 + 7, (140, 112))
    readout = page.locator("#query-view .av-readout")
    expect(readout).to_contain_text("truth = green circle · track head = cyan cross")
    # each frame's caption: where the attention peaks and how far that is from each marker, as text
    expect(page.locator("#overlays .av-caption").nth(1)).to_contain_text(
        "frame 1 · view_001.png · peak cell ("
    )
    expect(page.locator("#overlays .av-caption").nth(1)).to_contain_text("truth ")
    qi = row * 10 + col
    wanted = {"truth": (0, 255, 0), "track": (0, 255, 255), "depth": (255, 0, 255)}
    for frame in range(3):
        canvas = page.locator("#overlays canvas.av-canvas").nth(frame)
        pixels = canvas_pixels(canvas).astype(int)
        factor = float(canvas.get_attribute("data-scale"))
        for source, color in wanted.items():
            xy, visible = geometry.correspondence(source)
            assert visible[frame, qi]
            x, y = (int((v + 0.5) * factor) for v in xy[frame, qi])
            reach = int(max(4, 5 * factor)) + 3  # the page's marker radius, and its line
            near = pixels[y - reach : y + reach + 1, x - reach : x + reach + 1]  # the marker around its point
            closest = np.abs(near - np.array(color)).sum(axis=-1).min()
            assert closest <= 60, (frame, source, closest)
    # the last query leaves the frame: its caption says so
    click_frame_pixel(page, "query-view", 9 * 14 + 7, 7 * 14 + 7, (140, 112))
    assert texts(page, "#overlays .av-caption")[2].endswith(
        "truth not visible · track head not visible · depth + cameras not visible"
    )


def test_rollout_and_the_heads_grid(page, kinds_export: Path) -> None:
    expect = sync_api.expect
    loaded = load_export(str(kinds_export))
    label = f"Rollout (discard {loaded.export.layer_meta('rollout')['rollout_discard_ratio']:g})"
    readout = page.locator("#query-view .av-readout")
    load(page, kinds_export)
    expect(readout).to_contain_text("global_04")
    click_frame_pixel(page, "query-view", 20, 20, (loaded.geometry.width, loaded.geometry.height))
    pick(page, "head-select", "Head 2")
    expect(readout).to_contain_text("Head 2 vmax99")

    # layers x heads on frame 0: rows = layers, columns = the average and every head
    press(page, "mode-layers-heads")
    assert texts(page, "#overlays .av-column") == ["Average", "Head 1", "Head 2", "Head 3", "Head 4"]
    assert texts(page, "#overlays .av-label-name") == list(loaded.layer_labels.values())
    assert_readable_grid(page)
    expect(page.locator("#grid-frame input")).to_be_enabled()

    # the rollout: its discard ratio in the readout, the Head control and the heads views disabled
    press(page, "mode-frames")
    pick(page, "layer-select", label)
    expect(readout).to_contain_text("discard ratio 0.9")
    expect(readout).to_contain_text("attention rollout")
    expect(page.locator("#head-select input")).to_have_value("Average")
    expect(page.locator("#head-select input")).to_be_disabled()
    expect(page.locator("#mode-heads")).to_be_disabled()
    expect(page.locator("#mode-layers-heads")).to_be_enabled()  # other layers have heads
    expect(page.locator("#grid-frame input")).to_be_disabled()

    # its camera-token view: one overlay per frame, the discard ratio in its readout too
    before = drawn(page, "token-view")
    page.get_by_role("tab", name="Camera-token view").click()
    wait_drawn(page, "token-view", before)
    expect(page.locator("#token-view .av-readout")).to_contain_text("discard ratio 0.9")
    expect(page.locator("#token-view .av-caption")).to_have_count(loaded.num_frames)

    # a frame layer: frame 0 only, in both views
    pick(page, "layer-select", "Frame 01")
    expect(readout).to_contain_text("frame attention")
    expect(page.locator("#overlays .av-caption")).to_have_count(1)
    expect(page.locator("#token-view .av-caption")).to_have_count(1)
    expect(page.locator("#head-select input")).to_be_enabled()


def test_an_averaged_export_disables_what_does_not_apply(page, tmp_path: Path) -> None:
    expect = sync_api.expect
    root = write_synthetic_export(tmp_path / "averaged", H_p=4, W_p=6, num_layers=2)
    load(page, root)
    for control in ("#mode-heads", "#mode-layers-heads", "#head-select input", "#grid-frame input"):
        expect(page.locator(control)).to_be_disabled()
    for control in ("#mode-frames", "#mode-layers", "#layer-select input"):
        expect(page.locator(control)).to_be_enabled()


def test_layout_fits_a_1400_by_900_window_and_many_frames_come_in_pages(page, tmp_path: Path) -> None:
    expect = sync_api.expect
    # square frames with geometry: the tallest frames, the longest readout and captions
    three = write_synthetic_export(tmp_path / "three", num_frames=3, H_p=37, W_p=37, stride_h=4, stride_w=4,
                                   num_layers=1, geometry=True)  # fmt: skip
    load(page, three)
    click_frame_pixel(page, "query-view", 200, 200, (518, 518))
    query = visible_box(page.locator("#query-view .av-picker-canvas"))
    boxes = [visible_box(c) for c in page.locator("#overlays canvas.av-canvas").all()]
    assert len(boxes) == 3
    assert query["y"] + query["height"] <= WINDOW["height"]  # all visible without scrolling
    assert all(box["width"] >= 400 and box["y"] + box["height"] <= WINDOW["height"] for box in boxes), boxes
    captions = [visible_box(c) for c in page.locator("#overlays .av-caption").all()]
    assert all(" · peak cell (" in text for text in texts(page, "#overlays .av-caption"))
    assert all(box["y"] + box["height"] <= WINDOW["height"] for box in captions), captions
    readout = visible_box(page.locator("#query-view .av-readout"))
    assert readout["y"] + readout["height"] <= query["y"] + query["height"] + 24  # no higher than the frame

    many = write_synthetic_export(tmp_path / "many", num_frames=32, H_p=4, W_p=5, num_layers=1)
    load(page, many)
    click_frame_pixel(page, "query-view", 20, 20, (70, 56))
    expect(page.locator("#overlays canvas.av-canvas")).to_have_count(8)
    expect(page.locator("#overlays .av-page-text")).to_have_text("frames 1–8 of 32")
    boxes = [visible_box(c) for c in page.locator("#overlays canvas.av-canvas").all()]
    assert all(box["y"] + box["height"] <= WINDOW["height"] for box in boxes)
    page.locator("#overlays .av-page-button").nth(1).click()
    expect(page.locator("#overlays .av-page-text")).to_have_text("frames 9–16 of 32")
    assert texts(page, "#overlays .av-caption")[0] == "frame 8 · view_008.png"


def test_a_bad_path_after_a_good_export_keeps_the_page(page, export_path: Path, tmp_path: Path) -> None:
    expect = sync_api.expect
    loaded = load_export(str(export_path))
    size = (loaded.geometry.width, loaded.geometry.height)
    load(page, export_path)
    click_frame_pixel(page, "query-view", 5, 5, size)
    readout = page.locator("#query-view .av-readout")
    expect(readout).to_contain_text("Query cell row 0, col 0")

    page.locator("#export-path textarea, #export-path input").first.fill(str(tmp_path / "no_such_export"))
    page.locator("#load-button").click()
    message = page.locator("#export-message .viewer-message")
    expect(message).to_contain_text("no such file")
    assert "\n" not in message.inner_text().strip()
    # no component in an error state, no toast: the old export is still open and clickable
    assert page.get_by_text("Error", exact=True).count() == 0
    assert page.locator(".toast-body").count() == 0
    click_frame_pixel(page, "query-view", size[0] - 2, size[1] - 2, size)
    expect(readout).not_to_contain_text("Query cell row 0, col 0")
    expect(message).to_have_count(0)  # a successful action clears the message


def test_save_figure_gives_png_and_svg(page, export_path: Path) -> None:
    pytest.importorskip("matplotlib")
    expect = sync_api.expect
    loaded = load_export(str(export_path))
    load(page, export_path)
    click_frame_pixel(page, "query-view", 5, 5, (loaded.geometry.width, loaded.geometry.height))
    page.locator("#save-figure").click()
    links = page.locator("#figure-files a")
    expect(links).to_have_count(2, timeout=60_000)
    addresses = {
        Path(link.get_attribute("href").split("?")[0]).suffix: link.get_attribute("href")
        for link in links.all()
    }
    assert sorted(addresses) == [".png", ".svg"]
    responses = {suffix: page.request.get(address) for suffix, address in addresses.items()}
    assert all(response.ok for response in responses.values())
    image = Image.open(io.BytesIO(responses[".png"].body()))
    assert image.width >= 1500 and round(image.info["dpi"][0]) == 300  # print resolution
    drawing = responses[".svg"].text()
    # the same figure: the SVG's size in points is the PNG's in pixels at 300 dpi
    width_pt, height_pt = (float(re.search(rf'<svg[^>]* {key}="([0-9.]+)pt"', drawing).group(1))
                           for key in ("width", "height"))  # fmt: skip
    assert abs(width_pt * 300 / 72 - image.width) <= 2 and abs(height_pt * 300 / 72 - image.height) <= 2
    # text kept as text: the query frame, the layer, the head and the export's name
    assert "<text" in drawing and "query frame" in drawing
    export = loaded.export
    default = [name for name in export.layer_names if export.layer_meta(name)["layer_kind"] == "global"][-1]
    for wanted in (
        loaded.layer_labels[default],
        "Average",
        str(loaded.export.manifest.get("image_set_name")),
    ):
        assert re.sub(r"\s+", " ", wanted) in drawing, wanted


def test_strings_of_the_export_are_shown_as_text(page, tmp_path: Path) -> None:
    root = write_synthetic_export(tmp_path / "hostile", num_layers=1)
    manifest = root / "attn_maps" / "layers_manifest.json"
    name = "<img src=x id=injected> **bold**"
    manifest.write_text(manifest.read_text().replace('"synthetic"', f'"{name.replace(chr(34), "")}"'))
    load(page, root)
    sync_api.expect(page.locator("#query-view .av-note").first).to_contain_text(name)
    assert page.locator("#injected").count() == 0


def test_attn_dir_at_start_and_two_sessions_keep_their_own_export(tmp_path: Path) -> None:
    expect = sync_api.expect
    two_frames = write_synthetic_export(tmp_path / "two", num_frames=2, H_p=4, W_p=4, num_layers=2, seed=1)
    four_frames = write_synthetic_export(tmp_path / "four", num_frames=4, H_p=5, W_p=3, num_layers=3, seed=2)
    demo, url = start_viewer(str(two_frames))  # what --attn_dir does
    try:
        with sync_api.sync_playwright() as playwright:
            browser = chromium(playwright)
            try:
                first = browser.new_context(viewport=WINDOW).new_page()
                second = browser.new_context(viewport=WINDOW).new_page()
                for page in (first, second):
                    page.set_default_timeout(TIMEOUT_MS)
                    page.goto(url)
                    expect(page.locator("#query-view .av-readout")).to_contain_text("layer_02")  # at start
                load(second, four_frames)
                expect(second.locator("#query-view .av-readout")).to_contain_text("layer_03")
                for page, frames, size in ((first, 2, (56, 56)), (second, 4, (42, 70)), (first, 2, (56, 56))):
                    page.bring_to_front()  # a page in the background draws at its next animation frame
                    click_frame_pixel(page, "query-view", 5, 5, size)
                    captions = page.locator("#overlays .av-caption")
                    expect(captions).to_have_count(frames)
                    assert captions.all_inner_texts()[-1].startswith(f"frame {frames - 1} ")
            finally:
                browser.close()
    finally:
        demo.close()
        CACHE.clear()


def test_the_reverse_view_in_the_page(page, kinds_export: Path) -> None:
    expect = sync_api.expect
    loaded = load_export(str(kinds_export))
    export = open_export(kinds_export)
    load(page, kinds_export)
    before = drawn(page, "reverse-view")
    page.get_by_role("tab", name="Reverse view").click()
    wait_drawn(page, "reverse-view", before)
    click_frame_pixel(page, "reverse-view", 3, 3, (loaded.geometry.width, loaded.geometry.height))
    expect(page.locator("#reverse-view .av-readout")).to_contain_text("Key cell row 0, col 0")
    assert page.locator("#reverse-view canvas.av-canvas").count() == 1
    assert export.layer_names  # the page showed the column of the default layer


def test_the_3d_panel_shows_the_predicted_points(page, tmp_path: Path) -> None:
    expect = sync_api.expect
    root = write_synthetic_export(tmp_path / "geo", num_frames=3, H_p=6, W_p=8, num_layers=2, geometry=True)
    load(page, root)
    page.get_by_role("tab", name="3D").click()
    expect(page.locator("#points-note")).to_contain_text("Click a patch")
    click_frame_pixel(page, "query-view", 50, 40, (112, 84))
    expect(page.locator("#points-note")).to_contain_text("magenta cross")
    expect(page.locator("#points-3d canvas")).to_have_count(1)
    link = page.locator("#points-3d a[download], #points-3d a[href*='.glb']").first
    response = page.request.get(link.get_attribute("href"))
    assert response.ok and response.body()[:4] == b"glTF"
    if os.environ.get("VGGT_SCREENSHOT") == "1":
        page.wait_for_timeout(2000)
        page.locator("#points-3d").screenshot(path=str(SCREENSHOT.with_name("viewer_3d.png")))


def test_the_analysis_tab_opens_a_layer_and_head_from_its_heat_map(page, kinds_export: Path) -> None:
    expect = sync_api.expect
    loaded = load_export(str(kinds_export))
    load(page, kinds_export)
    expect(page.locator("#layer-select input")).to_have_value("Global 04")  # the page holds the export
    page.get_by_role("tab", name="Analysis").click()
    table = page.locator("#analysis-table")
    expect(page.locator("#analysis-note")).to_contain_text("Analysis computed now", timeout=120_000)
    expect(table).to_contain_text("Global 02")
    # Cells are coloured by value (jet, as the overlays): the heat map is in the page, not only numbers.
    style = table.locator('[data-testid="cell-1-1"]').get_attribute("style") or ""
    assert "background-color: rgb(" in style
    assert (kinds_export / "analysis" / "per_query.npz").is_file()
    # The cell of Global 02, Head 2 (the layer label is the first column): the main view opens it.
    before = drawn(page, "overlays")
    table.locator('[data-testid="cell-1-3"]').click()
    wait_drawn(page, "overlays", before)
    expect(page.locator("#layer-select input")).to_have_value("Global 02")
    expect(page.locator("#head-select input")).to_have_value("Head 2")
    click_frame_pixel(page, "query-view", 3, 3, (loaded.geometry.width, loaded.geometry.height))
    expect(page.locator("#query-view .av-readout")).to_contain_text(
        "Analysis of this query (Global 02, Head 2)"
    )


def test_intervention_results_beside_the_analysis_heat_map(page, kinds_export: Path, tmp_path: Path) -> None:
    from vggt.intervention_results import NUMBER_COLUMNS, ResultRow, write_results

    expect = sync_api.expect
    numbers = dict.fromkeys(NUMBER_COLUMNS, float("nan"))
    rows = [ResultRow("unmodified", "none", "", None, numbers | {"depth_abs_rel": 0.0})] + [
        ResultRow(f"ablate head {head} of global 2", "ablate_heads", "global:2", head,
                  numbers | {"depth_abs_rel": 0.1 * head, "track_px": 3.0 - head})
        for head in (1, 2, 3, 4)
    ]  # fmt: skip
    write_results(tmp_path / "results.csv", rows)
    load(page, kinds_export)
    expect(page.locator("#layer-select input")).to_have_value("Global 04")
    page.get_by_role("tab", name="Analysis").click()
    expect(page.locator("#intervention-note")).to_contain_text("Intervention results: the results.csv")
    expect(page.locator("#intervention-side")).to_be_hidden()  # the analysis heat map has the width
    page.locator("#intervention-path textarea, #intervention-path input").first.fill(str(tmp_path))
    page.locator("#intervention-open").click()
    table = page.locator("#intervention-table")
    expect(page.locator("#intervention-note")).to_contain_text("4 head ablations in the file; 4 on this")
    expect(table).to_contain_text("Global 02")
    expect(page.locator("#analysis-table")).to_contain_text("Global 02", timeout=120_000)  # beside it
    table_box, analysis_box = table.bounding_box(), page.locator("#analysis-table").bounding_box()
    assert table_box["x"] > analysis_box["x"] + analysis_box["width"] - 1  # to its right
    # Global 02, Head 4 is the largest depth error: the top of jet; the column is chosen in a dropdown.
    style = table.locator('[data-testid="cell-1-5"]').get_attribute("style") or ""
    red, green, blue = render.JET_LUT[255]
    assert f"background-color: rgb({red}, {green}, {blue})" in style
    page.locator("#intervention-column input").click()
    page.get_by_role("option", name="track_px", exact=True).click()
    expect(page.locator("#intervention-note")).to_contain_text("coloured from 0 to 2 (track_px")
    # A cell opens its layer and head in the main view.
    before = drawn(page, "overlays")
    table.locator('[data-testid="cell-1-3"]').click()
    wait_drawn(page, "overlays", before)
    expect(page.locator("#layer-select input")).to_have_value("Global 02")
    expect(page.locator("#head-select input")).to_have_value("Head 2")
    # A file that is not a sweep's: one line beside the path box; the table stays.
    (tmp_path / "bad.csv").write_text("<b>a</b>,b\n")
    page.locator("#intervention-path textarea, #intervention-path input").first.fill(
        str(tmp_path / "bad.csv")
    )
    page.locator("#intervention-open").click()
    expect(page.locator("#export-message")).to_contain_text("is not an intervention results file")
    expect(table).to_contain_text("Global 02")
