"""The Gradio Blocks layout of the viewer; behaviour lives in :mod:`vggt.viewer.handlers`."""

from __future__ import annotations

import gradio as gr

from vggt.viewer import handlers
from vggt.viewer.state import AVERAGE, Session

TITLE = "VGGT attention viewer"
INTRO = (
    "Open an export (its folder, `attn_maps/`, `layers_manifest.json`, one layer's metadata JSON, or a "
    "`.zip` of the folder), then click a patch of the query frame: each frame shows how much attention "
    "that patch sends to it, in jet colours (transparent blue = none, dark red = the value in the readout)."
)


def build_app(initial_path: str | None = None) -> gr.Blocks:
    """Build the viewer.

    Parameters
    ----------
    initial_path : str, optional
        Export to open when a page loads (``--attn_dir``).

    Returns
    -------
    gr.Blocks
        The app, not yet launched.
    """
    with gr.Blocks(title=TITLE) as demo:
        session = gr.State(Session())
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row(equal_height=True):
            path_box = gr.Textbox(
                value=initial_path or "",
                label="Export path",
                placeholder="attn_first2all_kitchen (or …/attn_maps, …/layers_manifest.json, a .zip)",
                scale=5,
                elem_id="export-path",
            )
            load_button = gr.Button("Load", variant="primary", scale=1, elem_id="load-button")
        message = gr.HTML(
            elem_id="export-message"
        )  # every failure is reported here (handlers.reports_errors)
        banner = gr.Markdown(elem_id="banner")
        info = gr.Markdown(elem_id="export-info")
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    layer = gr.Dropdown(label="Layer", choices=[], elem_id="layer-select")
                    head = gr.Dropdown(label="Head", choices=[AVERAGE], value=AVERAGE, elem_id="head-select")
                opacity = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Opacity", elem_id="opacity")
                with gr.Row():
                    all_layers = gr.Checkbox(label="Show all layers at once", elem_id="all-layers")
                    all_heads = gr.Checkbox(label="Show all heads at once", elem_id="all-heads")
                readout = gr.Markdown(elem_id="value-readout")
                query_image = gr.Image(
                    label="Query frame (frame 0): click a patch",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id="query-image",
                )
            with gr.Column(scale=3):
                gallery = gr.Gallery(
                    label="Attention from the clicked patch to every frame",
                    columns=3,
                    format="jpeg",
                    object_fit="contain",
                    elem_id="overlays",
                )
        with gr.Accordion("Special tokens vs patches, per frame (clicked query)", open=True):
            shares_note = gr.Markdown(elem_id="shares-note")
            with gr.Row():
                shares_chart = gr.BarPlot(
                    x="frame",
                    y="share",
                    color="token",
                    y_title="share of attention",
                    elem_id="shares-chart",
                )
                shares_table = gr.Dataframe(label="Share of the query's attention", elem_id="shares-table")
        with gr.Accordion(
            "Camera-token view: a frame's camera token and its attention to every frame", open=False
        ):
            token_readout = gr.Markdown(elem_id="token-readout")
            token_query = gr.Dropdown(
                label="Token (camera tokens; the class token in DINOv2 layers)",
                choices=[],
                elem_id="token-select",
            )
            token_gallery = gr.Gallery(
                label="Attention from that token to every frame of the layer",
                columns=3,
                format="jpeg",
                object_fit="contain",
                elem_id="token-overlays",
            )
        with gr.Accordion("Reverse view: which query patches attend to a patch of any frame", open=False):
            reverse_frame = gr.Dropdown(label="Frame", choices=[], elem_id="reverse-frame")
            with gr.Row():
                reverse_source = gr.Image(
                    label="Click a patch of this frame",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id="reverse-source",
                )
                reverse_result = gr.Image(
                    label="Query frame: attention sent to that patch",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id="reverse-result",
                )

        token_outputs = [token_query, token_gallery, token_readout]
        loaded_outputs = [
            session, layer, head, banner, info, query_image, gallery, readout,
            shares_table, shares_chart, shares_note, reverse_frame, reverse_source, reverse_result,
            *token_outputs, message,
        ]  # fmt: skip
        rendered_outputs = [
            session, query_image, gallery, readout, shares_table, shares_chart, shares_note, reverse_result,
            message,
        ]  # fmt: skip
        layer_outputs = [session, head, *rendered_outputs[1:-1], *token_outputs, message]
        token_view_outputs = [*token_outputs, message]
        reverse_outputs = [session, reverse_source, reverse_result, message]
        view_controls = [layer, head, opacity, all_layers, all_heads]
        token_inputs = [session, layer, head, opacity, token_query]

        # "minimal": a small spinner, no overlay over the images while a request runs
        quiet = {"show_progress": "minimal"}
        load_button.click(handlers.on_load, [path_box, session], loaded_outputs, **quiet)
        path_box.submit(handlers.on_load, [path_box, session], loaded_outputs, **quiet)
        if initial_path:
            demo.load(handlers.on_load, [path_box, session], loaded_outputs, **quiet)
        layer.input(handlers.on_layer_change, [session, *view_controls, token_query], layer_outputs, **quiet)
        for control in (head, all_layers, all_heads):
            control.input(handlers.on_settings_change, [session, *view_controls], rendered_outputs, **quiet)
        opacity.release(handlers.on_settings_change, [session, *view_controls], rendered_outputs, **quiet)
        # the camera-token view follows the head and opacity too (the layer change renders it itself)
        for event in (head.input, opacity.release, token_query.input):
            event(handlers.on_token_view, token_inputs, token_view_outputs, show_progress="minimal")
        query_image.select(handlers.on_query_select, [session, *view_controls], rendered_outputs, **quiet)
        reverse_inputs = [session, reverse_frame, layer, head, opacity]
        reverse_frame.input(handlers.on_reverse_frame, reverse_inputs, reverse_outputs, **quiet)
        reverse_source.select(handlers.on_reverse_select, reverse_inputs, reverse_outputs, **quiet)
    return demo
