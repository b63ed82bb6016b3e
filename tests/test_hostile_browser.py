"""Markup from an export never becomes markup in the page: an export whose names hold HTML, Markdown
images and scripts is opened and used in Chromium, and the browser never fetches the addresses they
name, runs their scripts or shows anything but their text."""

from __future__ import annotations

import contextlib
import json
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile_exports import MARKUP
from vggt.testing.synthetic import write_synthetic_export
from vggt.viewer.state import CACHE, load_export

browser = pytest.importorskip("tests.test_viewer_browser", reason="needs Playwright and Chromium")
pytestmark = browser.pytestmark
EVIL_HOST = "example.invalid"


def _markup_export(root: Path) -> Path:
    """A valid export whose every name shown in the page is markup."""
    write_synthetic_export(root, per_head=True, num_layers=2)
    attn = root / "attn_maps"
    manifest = json.loads((attn / "layers_manifest.json").read_text())
    manifest["image_set_name"] = "set " + MARKUP[:200]
    manifest["model"] |= {"id": "`x` ![](http://example.invalid/m.png)", "random_seed": MARKUP[:200]}
    for position, entry in enumerate(manifest["layers"]):
        entry["name"] = f"<b>L{position}</b><img src=http://{EVIL_HOST}/l{position}.png>"
    (attn / "layers_manifest.json").write_text(json.dumps(manifest))
    for meta_path in attn.glob("*_metadata.json"):
        meta = json.loads(meta_path.read_text())
        meta["source_images"] = [f"<img src=http://{EVIL_HOST}/s{i}.png>{i}.png" for i in range(2)]
        meta["source_images"].append(r"$\frac{1}{$ $x^{2$.png")  # mathtext for matplotlib, malformed
        meta["special_tokens"] = [MARKUP[:100], *meta["special_tokens"][1:]]
        meta_path.write_text(json.dumps(meta))
    return root


@contextlib.contextmanager
def _viewer_page() -> Iterator[object]:
    """A Chromium page on a viewer started for the test; the viewer is stopped and its cache cleared."""
    demo, url = browser.start_viewer()
    try:
        with browser.sync_api.sync_playwright() as playwright:
            chromium = browser.chromium(playwright)
            try:
                page = chromium.new_page(viewport=browser.WINDOW)
                page.set_default_timeout(browser.TIMEOUT_MS)
                yield page, url
            finally:
                chromium.close()
    finally:
        demo.close()
        CACHE.clear()


def test_names_from_an_export_are_text_in_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names from a markup export are text in the page, wherever they are shown; the files Gradio served
    the page (the saved figure) are gone once the viewer stops."""
    served = tmp_path / "gradio_cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(served))  # read when the viewer's components are made
    export = _markup_export(tmp_path / "export")
    loaded = load_export(str(export))
    size = (loaded.geometry.width, loaded.geometry.height)
    requests: list[str] = []
    dialogs: list[str] = []
    with _viewer_page() as (page, url):
        page.on("request", lambda request: requests.append(request.url))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(url)
        browser.load(page, export)
        browser.click_frame_pixel(page, "query-view", 10, 10, size)
        for mode in ("mode-layers", "mode-heads", "mode-frames"):
            browser.press(page, mode)
        for tab in ("Camera-token view", "Reverse view", "Special tokens"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(300)
        page.get_by_role("tab", name="Analysis").click()  # its notes and table (rows by the layers' labels)
        browser.sync_api.expect(page.locator("#analysis-note")).to_contain_text("Analysis", timeout=120_000)
        browser.sync_api.expect(page.locator("#analysis-table")).to_contain_text("Global 01")
        page.locator("#save-figure").click()
        browser.sync_api.expect(page.locator("#figure-files")).to_be_visible()
        assert any(path.is_file() for path in served.rglob("*"))  # handed to the page from Gradio's cache
        # a typed path holding markup comes back in the message as text
        page.locator("#export-path textarea, #export-path input").first.fill(
            f"/no/such/<img src=http://{EVIL_HOST}/typed.png>"
        )
        page.locator("#load-button").click()
        message = page.locator("#export-message")
        browser.sync_api.expect(message).to_contain_text(f"<img src=http://{EVIL_HOST}/typed.png>")

        body = page.inner_text("body")
        assert "<b>L1</b>" in body and "<img src=http://example.invalid/s1.png>1.png" in body
        injected = page.evaluate(
            """(host) => [...document.querySelectorAll('img, script, a, iframe, b')]
                .filter(e => { const url = e.src || e.href;
                    return (url && new URL(url, document.baseURI).hostname === host)
                        || /^L[01]$/.test(e.textContent); })
                .map(e => e.outerHTML)""",
            EVIL_HOST,
        )
        assert injected == []
    assert not [address for address in requests if EVIL_HOST in address]
    assert dialogs == []
    assert not [path for path in served.rglob("*") if path.is_file()]


def test_figures_keep_names_as_text(tmp_path: Path) -> None:
    """The SVG of Save figure holds the names as escaped text (no markup, no mathtext)."""
    from vggt.viewer import handlers
    from vggt.viewer.state import Session

    export = _markup_export(tmp_path / "export")
    CACHE.clear()
    main = handlers.on_load(Session(), str(export))
    clicked = handlers.on_query_select(main.session, 0.6, _Click(5, 5))
    saved = handlers.on_save_figure(clicked.session, 0.6)
    assert saved.message == ""
    svg = next(Path(f) for f in saved.figure_files.constructor_args["value"] if str(f).endswith(".svg"))
    tree = ElementTree.parse(svg)  # well-formed: the names did not break the XML
    text = "".join(tree.getroot().itertext())
    assert "<img" in text and not any(element.tag.endswith("img") for element in tree.iter())
    assert r"$\frac{1}{$ $x^{2$.png" in text  # drawn as written, not as mathematics
    handlers.on_session_end(clicked.session)
    CACHE.clear()


class _Click:
    def __init__(self, x: float, y: float) -> None:
        self._data = {"x": x, "y": y}


def test_a_closed_page_lets_go_of_its_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradio ends a closed page's session (after an hour; a second here) and the zip's extraction that
    only that page had open is removed."""
    import shutil
    import time

    from vggt.attn_format.paths import extraction_folders

    monkeypatch.setenv("GRADIO_IS_E2E_TEST", "1")  # Gradio keeps a closed page's state for 1 s, not 1 h
    export = write_synthetic_export(tmp_path / "kitchen")
    archive = Path(
        shutil.make_archive(str(tmp_path / "kitchen"), "zip", root_dir=tmp_path, base_dir="kitchen")
    )
    CACHE.clear()
    before = set(extraction_folders())
    with _viewer_page() as (page, url):
        page.goto(url)
        browser.load(page, archive)
        browser.sync_api.expect(page.locator("#query-view .av-readout")).to_contain_text("Global")
        (folder,) = set(extraction_folders()) - before
        assert folder.is_dir()
        page.close()
        deadline = time.monotonic() + 60  # Gradio checks the states every second
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not folder.exists()
    assert export.is_dir()
