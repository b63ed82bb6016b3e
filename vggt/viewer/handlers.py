"""Gradio event handlers: thin wrappers over :mod:`vggt.viewer.state` that speak Gradio's types.

Each handler takes the session (``gr.State``) and the controls' values and returns a named tuple in the
order of the outputs the app wires (so tests can call them directly and read fields by name). Every
tuple ends with ``message``, the message area under the path box: cleared on success; on any failure
(:func:`reports_errors`) it says what went wrong and every other output is skipped, so the page, the
session and the export already open stay as they were.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import gradio as gr
import numpy as np
import pandas as pd

from vggt.attn_format import AttnExport
from vggt.viewer import state, views
from vggt.viewer.messages import error_text, message_html
from vggt.viewer.state import CACHE, LoadedExport, Session, Settings, ViewerError

CHART_COLUMNS = ["frame", "token", "share"]
Outputs = TypeVar("Outputs", bound=tuple)
Handler = TypeVar("Handler", bound=Callable[..., Any])


def unchanged(outputs: type[Outputs], message: str = "") -> Outputs:
    """Outputs that leave every component as it is, the message area showing ``message`` (escaped)."""
    return outputs(**{name: gr.skip() for name in outputs._fields} | {"message": message_html(message)})


def reports_errors(outputs: type[NamedTuple]) -> Callable[[Handler], Handler]:
    """Route every failure of a handler returning ``outputs`` to the message area (the one error path).

    The handler's exception, whatever it is, becomes one line (:func:`messages.error_text`) shown beside
    the path box; every other output is :func:`gr.skip`-ped, so no component shows an error state.
    """

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return handler(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, none reaches Gradio
                return unchanged(outputs, error_text(exc))

        return wrapped  # type: ignore[return-value]

    return decorate


class Rendered(NamedTuple):
    """Outputs of every re-render of the clicked query's view (click, head, opacity, toggles)."""

    session: Session
    query_image: np.ndarray
    gallery: list
    readout: str
    shares_table: pd.DataFrame
    shares_chart: pd.DataFrame | None
    shares_note: str
    reverse_result: np.ndarray | None
    message: str


class TokenView(NamedTuple):
    """Outputs of the camera-token view: the layer's token queries, one overlay per key frame, readout."""

    token_query: gr.Dropdown
    token_gallery: list
    token_readout: str
    message: str


class LayerChanged(NamedTuple):
    """Outputs of a layer change: the Head control for the new layer, the re-rendered query view and
    the camera-token view of the new layer."""

    session: Session
    head: gr.Dropdown
    query_image: np.ndarray
    gallery: list
    readout: str
    shares_table: pd.DataFrame
    shares_chart: pd.DataFrame | None
    shares_note: str
    reverse_result: np.ndarray | None
    token_query: gr.Dropdown
    token_gallery: list
    token_readout: str
    message: str


class Loaded(NamedTuple):
    """Outputs of Load: the controls reset for the new export, then an empty view."""

    session: Session
    layer: gr.Dropdown
    head: gr.Dropdown
    banner: str
    info: str
    query_image: np.ndarray
    gallery: list
    readout: str
    shares_table: pd.DataFrame
    shares_chart: pd.DataFrame | None
    shares_note: str
    reverse_frame: gr.Dropdown
    reverse_source: np.ndarray
    reverse_result: np.ndarray | None
    token_query: gr.Dropdown
    token_gallery: list
    token_readout: str
    message: str


class Reverse(NamedTuple):
    """Outputs of the reverse view's frame choice and clicks."""

    session: Session
    reverse_source: np.ndarray
    reverse_result: np.ndarray | None
    message: str


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame(columns=views.SHARE_COLUMNS)


def _empty_chart() -> None:
    # None, not an empty DataFrame: after an empty frame Gradio's BarPlot draws no bars for later data.
    return None


def _settings(
    loaded: LoadedExport, layer: str, head: str | None, opacity: float, all_layers: bool, all_heads: bool
) -> Settings:
    layer = state.check_layer(loaded, layer)
    return Settings(
        layer=layer,
        head=state.parse_head(head, loaded, layer),
        opacity=float(opacity),
        all_layers=bool(all_layers),
        all_heads=bool(all_heads),
    )


def _click_xy(evt: gr.SelectData) -> tuple[float, float]:
    index = evt.index
    if not isinstance(index, list | tuple) or len(index) != 2:
        raise ViewerError(f"unexpected click position {index!r}")
    return float(index[0]), float(index[1])


def _model_info(export: AttnExport) -> dict:
    model = export.manifest.get("model")
    return model if isinstance(model, dict) else {}


def _banner(loaded: LoadedExport) -> str:
    export = loaded.export
    lines = []
    if export.random_weights:
        seed = _model_info(export).get("random_seed")
        lines.append(
            f"⚠️ **Random weights**: this export was made with seeded random weights (seed {seed}), not a "
            "trained model. The maps show the pipeline, not what VGGT attends to."
        )
    if export.is_seed:
        lines.append("Seed-format export: no special-token mass; frames are the copied source images.")
    lines.extend(f"Note: {warning}" for warning in dict.fromkeys(export.warnings))
    return "\n\n".join(lines)


def _info(loaded: LoadedExport) -> str:
    export = loaded.export
    manifest = export.manifest
    meta = export.layer_meta(export.layer_names[0])
    model = _model_info(export)
    per_head = f"per head ({meta['num_heads']} heads)" if meta["per_head_data"] else "averaged over heads"
    return (
        f"**{manifest.get('image_set_name') or export.root.name}** · {state.kinds_summary(loaded)} · "
        f"{meta['S']} frames of {export.image_size[1]}x{export.image_size[0]} px (W x H) · query grid "
        f"{meta['H_ds']}x{meta['W_ds']} (patch grid {meta['H_p']}x{meta['W_p']}, stride "
        f"{meta['stride_h']}x{meta['stride_w']}) · {per_head} · {meta['dtype']} · model "
        f"{_model_text(model)} · `{export.root}`"
    )


def _model_text(model: dict) -> str:
    """What the manifest says of the weights: random (seed), the hub id and revision, or the file."""
    if model.get("random_weights"):
        return f"random weights (seed {model.get('random_seed')})"
    if model.get("id"):
        revision = model.get("revision")
        return f"`{model['id']}`" + (f" @ `{str(revision)[:12]}`" if revision else "")
    if model.get("checkpoint_file"):
        return f"`{model['checkpoint_file']}`"
    return "unknown"


def _frame_choices(loaded: LoadedExport) -> list[tuple[str, int]]:
    return [(label, index) for index, label in enumerate(loaded.labels)]


def _kept_head(loaded: LoadedExport, layer: str, current: str | None) -> str:
    """``current`` where ``layer`` has that head, else Average."""
    return current if current in state.head_choices(loaded, layer) else state.AVERAGE


def _head_dropdown(loaded: LoadedExport, layer: str, current: str | None = None) -> gr.Dropdown:
    """The Head control for ``layer``: Average plus its heads, keeping ``current`` when still valid."""
    choices = state.head_choices(loaded, layer)
    return gr.Dropdown(
        choices=choices, value=_kept_head(loaded, layer, current), interactive=len(choices) > 1
    )


def _token_view(loaded: LoadedExport, settings: Settings, choice: str | None) -> TokenView:
    """The camera-token view of the layer in view, for the chosen token (the same token when the layer
    has it, else its first)."""
    row = views.resolve_token(loaded, settings.layer, choice)
    choices = views.token_choices(loaded, settings.layer)
    dropdown = gr.Dropdown(
        choices=choices, value=None if row is None else choices[row][1], interactive=bool(choices)
    )
    if row is None:
        return TokenView(dropdown, [], views.no_token_readout(loaded, settings.layer), "")
    gallery, readout = views.token_view(loaded, settings, row)
    return TokenView(dropdown, gallery, readout, "")


@reports_errors(Loaded)
def on_load(path: str, session: Session | None) -> Loaded:
    """Load button (and ``--attn_dir`` at start): open an export and reset the view for it."""
    loaded = CACHE.open(path or "", reload=True)
    session = Session(export_key=CACHE.key_for(path))
    layer = state.default_layer(loaded)
    settings = Settings(layer=layer, head=None, opacity=0.6)
    return Loaded(
        session=session,
        layer=gr.Dropdown(choices=state.layer_choices(loaded), value=layer),
        head=_head_dropdown(loaded, layer),
        banner=_banner(loaded),
        info=_info(loaded),
        query_image=views.query_image(loaded, None),
        gallery=[],
        readout=views.value_readout(loaded, settings, None, None, ["Click a patch of the query frame."]),
        shares_table=_empty_table(),
        shares_chart=_empty_chart(),
        shares_note="",
        reverse_frame=gr.Dropdown(choices=_frame_choices(loaded), value=0),
        reverse_source=views.reverse_source_image(loaded, 0, None),
        reverse_result=None,
        **_token_view(loaded, settings, None)._asdict(),  # with message="": a good Load clears it
    )


def _render(loaded: LoadedExport, session: Session, settings: Settings) -> Rendered:
    reverse = None
    if session.reverse_cell is not None and views.reverse_in_view(
        loaded, settings.layer, session.reverse_frame
    ):  # a frame or DINOv2 layer holds no reverse view of frames other than 0: cleared, not an error
        reverse = views.reverse_overlay(loaded, settings, session.reverse_frame, session.reverse_cell)
    if session.query is None:
        readout = views.value_readout(loaded, settings, None, None, ["Click a patch of the query frame."])
        return Rendered(
            session,
            views.query_image(loaded, None),
            [],
            readout,
            _empty_table(),
            _empty_chart(),
            "",
            reverse,
            "",
        )
    gallery, readout = views.gallery_for(loaded, settings, session.query)
    rows, chart, note, columns = views.token_shares(loaded, settings, session.query)
    return Rendered(
        session=session,
        query_image=views.query_image(loaded, session.query),
        gallery=gallery,
        readout=readout,
        shares_table=pd.DataFrame(rows, columns=columns),
        shares_chart=pd.DataFrame(chart, columns=CHART_COLUMNS),
        shares_note=note,
        reverse_result=reverse,
        message="",
    )


@reports_errors(Rendered)
def on_settings_change(
    session: Session, layer: str, head: str, opacity: float, all_layers: bool, all_heads: bool
) -> Rendered:
    """Layer, head, opacity or a composite toggle changed: re-render the current query."""
    if session is None or session.export_key is None:
        return unchanged(Rendered)  # controls moved before any Load
    loaded = CACHE.get(session.export_key)
    return _render(loaded, session, _settings(loaded, layer, head, opacity, all_layers, all_heads))


@reports_errors(LayerChanged)
def on_layer_change(
    session: Session,
    layer: str,
    head: str,
    opacity: float,
    all_layers: bool,
    all_heads: bool,
    token: str | None,
) -> LayerChanged:
    """Another layer chosen: fit the Head control to it (Average only where it has no per-head data,
    as the rollout; the chosen head kept where it still exists), then re-render the query view and the
    camera-token view (the same token where the layer has it)."""
    if session is None or session.export_key is None:
        return unchanged(LayerChanged)
    loaded = CACHE.get(session.export_key)
    layer = state.check_layer(loaded, layer)
    settings = _settings(loaded, layer, _kept_head(loaded, layer, head), opacity, all_layers, all_heads)
    rendered = _render(loaded, session, settings)
    token_view = _token_view(loaded, settings, token)
    return LayerChanged(
        head=_head_dropdown(loaded, layer, head), **(rendered._asdict() | token_view._asdict())
    )


@reports_errors(TokenView)
def on_token_view(session: Session, layer: str, head: str, opacity: float, token: str | None) -> TokenView:
    """Camera-token view: a token chosen, or the head or opacity changed; render that token's maps on
    every key frame of the current layer."""
    if session is None or session.export_key is None:
        return unchanged(TokenView)
    loaded = CACHE.get(session.export_key)
    return _token_view(loaded, _settings(loaded, layer, head, opacity, False, False), token)


@reports_errors(Rendered)
def on_query_select(
    session: Session,
    layer: str,
    head: str,
    opacity: float,
    all_layers: bool,
    all_heads: bool,
    evt: gr.SelectData,
) -> Rendered:
    """A click on the query frame: select the grid cell under the pointer and render its maps."""
    loaded = CACHE.get(session.export_key)
    settings = _settings(loaded, layer, head, opacity, all_layers, all_heads)
    query = loaded.geometry.cell_at(*_click_xy(evt))
    return _render(loaded, session.with_changes(query=query), settings)


@reports_errors(Reverse)
def on_reverse_frame(session: Session, frame: int, layer: str, head: str, opacity: float) -> Reverse:
    """Reverse view: another frame chosen; show it with its grid and clear the clicked cell."""
    loaded = CACHE.get(session.export_key)
    frame = int(frame or 0)
    session = session.with_changes(reverse_frame=frame, reverse_cell=None)
    return Reverse(session, views.reverse_source_image(loaded, frame, None), None, "")


@reports_errors(Reverse)
def on_reverse_select(
    session: Session, frame: int, layer: str, head: str, opacity: float, evt: gr.SelectData
) -> Reverse:
    """Reverse view: a click on a patch of the chosen frame shows which queries attend to it (a one-line
    error where the layer holds no attention to that frame: frame and DINOv2 layers hold frame 0 only)."""
    loaded = CACHE.get(session.export_key)
    settings = _settings(loaded, layer, head, opacity, False, False)
    frame = int(frame or 0)
    cell = loaded.geometry.cell_at(*_click_xy(evt))
    source = views.reverse_source_image(loaded, frame, cell)
    result = views.reverse_overlay(loaded, settings, frame, cell)
    return Reverse(session.with_changes(reverse_frame=frame, reverse_cell=cell), source, result, "")
