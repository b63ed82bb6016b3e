"""The Gradio Blocks layout of the viewer; behaviour lives in :mod:`vggt.viewer.handlers`.

The page, for a 1400 x 900 window: the path box (and the message area beside it), then the query frame
with the readout and a description of the export beside it and the controls to its right, then the
overlays (a grid of frames, or a composite, with its colour bar), then the secondary panels in tabs.
The query frame, the overlays and the camera-token and reverse views are attention views: ``gr.HTML``
components drawn in the browser by ``static/attention_view.js`` from the values of
:mod:`vggt.viewer.payload`.

A panel added below (in :func:`build_app`, with ``gr.Tab``) finds the components in :class:`Page`; to
open a layer and head in the main view its handler returns :func:`handlers.open_layer_head` (inputs
``page.session``, ``page.opacity``) with outputs ``page.main_outputs``. What the main view shows lives in
the session (``Session.view``), not in the controls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import gradio as gr

from vggt.viewer import analysis as analysis_panel
from vggt.viewer import handlers, views
from vggt.viewer.state import AVERAGE, SessionBox

TITLE = "VGGT attention viewer"
STATIC = Path(__file__).parent / "static"
PATH_HINT = "Export path: its folder, attn_maps/, layers_manifest.json, a layer's metadata JSON or a .zip"
INTERVENTION_HINT = "results.csv of intervene_attention.py, or its folder"
PAGE_CSS = """
.viewer-error { color: var(--error-text-color); background: var(--error-background-fill);
  border: 1px solid var(--error-border-color); border-radius: 6px; padding: 4px 10px; }
.viewer-note { font-size: 13px; }
"""
# Dropdowns whose choices change with the export or layer: Gradio would refuse a value sent while the
# page still shows the old choices (a bare "Error"); the handlers check every value themselves.
CHANGING = {"allow_custom_value": True}
# Interactions answer without Gradio's queue (a direct request each) and without a progress overlay.
FAST = {"queue": False, "show_progress": "hidden"}


@cache
def _static(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def attention_view(elem_id: str) -> gr.HTML:
    """An attention view: a ``gr.HTML`` whose value (:mod:`.payload`) the page draws on canvases."""
    return gr.HTML(
        value={},
        html_template='<div class="av"></div>',
        css_template=_static("attention_view.css"),
        js_on_load=_static("attention_view.js"),
        apply_default_css=False,
        elem_id=elem_id,
    )


def text_area(elem_id: str, scale: int | None = None) -> gr.HTML:
    """A ``gr.HTML`` showing escaped text (:func:`messages.lines_html`, :func:`messages.message_html`)."""
    return gr.HTML(
        elem_id=elem_id, css_template=PAGE_CSS, apply_default_css=False, js_on_load=None, scale=scale
    )


@dataclass
class Page:
    """The components of the page, for the handlers' wiring and for panels added below."""

    session: gr.State
    path_box: gr.Textbox
    load_button: gr.Button
    message: gr.HTML
    layer: gr.Dropdown
    head: gr.Dropdown
    mode_buttons: dict[str, gr.Button]
    grid_frame: gr.Dropdown
    opacity: gr.Slider
    save_figure: gr.Button
    figure_files: gr.File
    query_view: gr.HTML
    overlays: gr.HTML
    panels: dict[str, gr.Component] = field(default_factory=dict)

    @property
    def main_outputs(self) -> list:
        """Outputs in the order of :class:`handlers.MainView`."""
        return [self.session, self.layer, self.head, *self.mode_buttons.values(), self.grid_frame,
                self.query_view, self.overlays, self.message]  # fmt: skip


def _main_view(initial_path: str | None) -> Page:
    session = gr.State(SessionBox(), delete_callback=handlers.on_session_end)
    # the message beside the path box gets a third of the row (a gr.HTML grows as scale 1), so that a
    # message is one line that does not push the page down
    with gr.Row(equal_height=False):
        path_box = gr.Textbox(
            value=initial_path or "", show_label=False, placeholder=PATH_HINT, container=False, scale=2,
            elem_id="export-path",
        )  # fmt: skip
        load_button = gr.Button("Load", variant="primary", scale=0, min_width=100, elem_id="load-button")
        message = text_area("export-message")  # every failure is said here (reports_errors)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=560):
            query_view = attention_view("query-view")
        with gr.Column(scale=2, min_width=460):
            with gr.Row():
                layer = gr.Dropdown(
                    label="Layer", **CHANGING, choices=[], scale=2, min_width=140, elem_id="layer-select"
                )
                head = gr.Dropdown(label="Head", choices=[AVERAGE], value=AVERAGE, scale=1, min_width=120,
                                   elem_id="head-select", **CHANGING)  # fmt: skip
                grid_frame = gr.Dropdown(label="Frame (layers × heads)", choices=[], interactive=False,
                                         scale=2, min_width=140, elem_id="grid-frame",
                                         **CHANGING)  # fmt: skip
            with gr.Row():
                mode_buttons = {
                    mode: gr.Button(text, size="sm", min_width=80, elem_id=f"mode-{mode.replace('_', '-')}",
                                    variant="primary" if mode == "frames" else "secondary", interactive=False)
                    for mode, text in views.MODES.items()
                }  # fmt: skip
            with gr.Row(equal_height=True):
                opacity = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Opacity", scale=3, min_width=140,
                                    elem_id="opacity")  # fmt: skip
                save_figure = gr.Button(
                    "Save figure", size="sm", scale=1, min_width=100, elem_id="save-figure"
                )
            figure_files = gr.File(label="Figure", show_label=False, file_count="multiple", visible=False,
                                   elem_id="figure-files")  # fmt: skip
    overlays = attention_view("overlays")
    return Page(session, path_box, load_button, message, layer, head, mode_buttons, grid_frame,
                opacity, save_figure, figure_files, query_view, overlays)  # fmt: skip


def _panels(page: Page) -> dict[str, gr.Tab]:
    """The secondary panels, as tabs below the main view; their components go into ``page.panels``."""
    tabs = {}
    with gr.Tabs(elem_id="panels"):
        with gr.Tab("Special tokens", id="tokens", elem_id="tab-tokens") as tabs["tokens"]:
            page.panels["shares_note"] = text_area("shares-note")
            with gr.Row():
                page.panels["shares_chart"] = gr.BarPlot(
                    x="frame", y="share", color="token", y_title="share of attention", elem_id="shares-chart"
                )
                page.panels["shares_table"] = gr.Dataframe(
                    label="Share of the query's attention", elem_id="shares-table"
                )
        with gr.Tab("Camera-token view", id="camera", elem_id="tab-camera") as tabs["camera"]:
            page.panels["token_query"] = gr.Dropdown(
                label="Token (camera tokens; the class token in DINOv2 layers)",
                **CHANGING,
                choices=[],
                elem_id="token-select",
            )
            page.panels["token_view"] = attention_view("token-view")
        with gr.Tab("3D", id="3d", elem_id="tab-3d") as tabs["3d"]:
            page.panels["points_note"] = text_area("points-note")
            page.panels["points_3d"] = gr.Model3D(
                label="Predicted points coloured by the clicked patch's attention",
                clear_color=(0.12, 0.12, 0.12, 1.0), height=560, elem_id="points-3d",
            )  # fmt: skip
        with gr.Tab("Reverse view", id="reverse", elem_id="tab-reverse") as tabs["reverse"]:
            page.panels["reverse_frame"] = gr.Dropdown(
                label="Frame", choices=[], **CHANGING, elem_id="reverse-frame"
            )
            page.panels["reverse_view"] = attention_view("reverse-view")
        with gr.Tab("Analysis", id="analysis", elem_id="tab-analysis") as tabs["analysis"]:
            with gr.Row(equal_height=True):
                page.panels["analysis_metric"] = gr.Dropdown(
                    label="Metric (layers × heads)", choices=analysis_panel.metric_choices(),
                    value=analysis_panel.DEFAULT_METRIC, scale=1, min_width=200, elem_id="analysis-metric",
                )  # fmt: skip
                page.panels["analysis_note"] = text_area("analysis-note", scale=3)
            page.panels["analysis_readout"] = text_area("analysis-readout")
            _intervention_controls(page)
            with gr.Row(equal_height=False):
                page.panels["analysis_table"] = gr.Dataframe(
                    interactive=False, show_label=False, max_height=520, elem_id="analysis-table"
                )
                _intervention_table(page)
    return tabs


def _intervention_controls(page: Page) -> None:
    """The Analysis tab's intervention results: a path box for a sweep's results.csv, the column drawn."""
    with gr.Row(equal_height=True):
        page.panels["intervention_path"] = gr.Textbox(
            label="Intervention results", placeholder=INTERVENTION_HINT, scale=4, elem_id="intervention-path"
        )
        page.panels["intervention_column"] = gr.Dropdown(
            label="Error (layers × heads)", choices=[], **CHANGING, scale=2, min_width=200,
            elem_id="intervention-column",
        )  # fmt: skip
        page.panels["intervention_open"] = gr.Button(
            "Open", size="sm", scale=1, min_width=80, elem_id="intervention-open"
        )
    page.panels["intervention_note"] = text_area("intervention-note")


def _intervention_table(page: Page) -> None:
    """The sweep's heat map, beside the analysis heat map (hidden until a sweep is opened)."""
    with gr.Column(visible=False, elem_id="intervention-side") as page.panels["intervention_side"]:
        page.panels["intervention_table"] = gr.Dataframe(
            interactive=False, show_label=False, max_height=520, elem_id="intervention-table"
        )


def launch(demo: gr.Blocks, **options) -> None:
    """Start the viewer's server (Gradio's ``launch`` with ``options``) the way the viewer needs it.

    Gradio's run history is off: it would keep every request's inputs and outputs (paths, the frames)
    in the browser's storage, and writing them there takes longer than drawing a click.
    """
    demo.queue().launch(**({"run_history": False} | options))


def build_app(initial_path: str | None = None) -> gr.Blocks:
    """Build the viewer.

    Parameters
    ----------
    initial_path : str, optional
        Export to open when a page loads (``--attn_dir``).

    Returns
    -------
    gr.Blocks
        The app, not yet launched (start it with :func:`launch`).
    """
    # delete_cache: files handed to the page (figures) are removed after a day, and at a restart
    with gr.Blocks(title=TITLE, fill_width=True, delete_cache=(3600, 86400)) as demo:
        page = _main_view(initial_path)
        tabs = _panels(page)
        _wire(demo, page, tabs, bool(initial_path))
    return demo


def _wire(demo: gr.Blocks, page: Page, tabs: dict[str, gr.Tab], load_at_start: bool) -> None:
    """Connect the page's events to the handlers, each run on the page's session (``in_session``)."""
    panels = page.panels
    session, opacity, main = page.session, page.opacity, page.main_outputs
    # which panel is open is the page's (a tab's select sets it in the page, without a request)
    open_panel = gr.Textbox(value="tokens", visible=False, elem_id="open-panel")
    panel_inputs = [session, opacity, panels["token_query"], panels["reverse_frame"], open_panel]
    panel_outputs = [panels[name] for name in handlers.Panels._fields[:-1]] + [page.message]

    def on(event, handler, inputs, outputs, panels_after: bool = False, **options) -> None:
        """``event`` runs ``handler`` on the page's session; ``panels_after``: then the open panel."""
        answered = event(handlers.in_session(handler), inputs, outputs, **(FAST | options))
        if panels_after:
            answered.then(handlers.in_session(handlers.on_panels), panel_inputs, panel_outputs, **FAST)

    load = [session, page.path_box]
    slow = {"show_progress": "minimal", "show_progress_on": page.query_view}  # a spinner on the query frame
    on(page.load_button.click, handlers.on_load, load, main, True, **slow)
    on(page.path_box.submit, handlers.on_load, load, main, True, **slow)
    if load_at_start:
        on(demo.load, handlers.on_load, load, main, True, **slow)

    # The view's state lives in the session; a control's handler gets the control's new value.
    # Dropdowns answer `select`: Gradio 6 fires `input` twice for one choice.
    on(page.query_view.select, handlers.on_query_select, [session, opacity], main, True)
    on(page.layer.select, handlers.on_layer_change, [session, page.layer, opacity], main, True)
    on(page.head.select, handlers.on_head_change, [session, page.head, opacity], main, True)
    on(page.grid_frame.select, handlers.on_grid_frame, [session, page.grid_frame, opacity], main)
    for mode, button in page.mode_buttons.items():
        on(button.click, handlers.on_mode(mode), [session, opacity], main)
    on(page.overlays.select, handlers.on_open_cell, [session, opacity], main, True)
    # the opacity is applied in the page, without a request; the handlers read it when they render
    page.opacity.input(None, [opacity], None, js="(v) => { window.vggtSetOpacity?.(v); return v; }")
    on(page.save_figure.click, handlers.on_save_figure, [session, opacity], [page.figure_files, page.message],
       show_progress="minimal", show_progress_on=page.figure_files)  # fmt: skip

    for name, tab in tabs.items():
        selected = tab.select(None, None, [open_panel], js=f"() => {json.dumps(name)}")
        selected.then(handlers.in_session(handlers.on_panels), panel_inputs, panel_outputs, **FAST)
    token = panels["token_query"]
    on(token.select, handlers.on_token_view, [session, opacity, token], [panels["token_view"], page.message])
    reverse = ([session, panels["reverse_frame"], opacity], [session, panels["reverse_view"], page.message])
    on(panels["reverse_frame"].select, handlers.on_reverse_frame, *reverse)
    on(panels["reverse_view"].select, handlers.on_reverse_select, *reverse)
    analysis = (
        [session, opacity, panels["analysis_metric"]],
        [panels[name] for name in handlers.AnalysisPanel._fields[:-1]] + [page.message],
    )
    # queued, with a progress bar over the tab: the first opening may analyse the whole export
    for event in (tabs["analysis"].select, panels["analysis_metric"].select):
        on(event, handlers.on_analysis, *analysis, queue=True, show_progress="full",
           show_progress_on=panels["analysis_table"])  # fmt: skip
    on(panels["analysis_table"].select, handlers.on_analysis_cell, [session, opacity], main, True)
    _wire_interventions(page, tabs, on)


def _wire_interventions(page: Page, tabs: dict[str, gr.Tab], on) -> None:
    """The Analysis tab's intervention results: opened (Open, Enter, a column chosen), redrawn when the
    tab opens; a cell of the table opens its layer and head (``on``: :func:`_wire`'s way of wiring)."""
    panels = page.panels
    inputs = [page.session, panels["intervention_path"], panels["intervention_column"]]
    outputs = [panels[name] for name in handlers.InterventionPanel._fields[:-1]] + [page.message]
    for event in (panels["intervention_open"].click, panels["intervention_path"].submit,
                  panels["intervention_column"].select):  # fmt: skip
        on(event, handlers.on_interventions, inputs, outputs)
    on(tabs["analysis"].select, handlers.on_interventions_shown, inputs, outputs)
    on(panels["intervention_table"].select, handlers.on_intervention_cell, [page.session, page.opacity],
       page.main_outputs, True)  # fmt: skip
