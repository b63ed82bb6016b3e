"""Gradio event handlers: thin wrappers over :mod:`vggt.viewer.state` that speak Gradio's types.

Each handler takes the session (``gr.State``) and the controls' values and returns a named tuple in the
order of the outputs the app wires (so tests can call them directly and read fields by name). Bad
input of any kind becomes a one-line ``gr.Error``; the app keeps working and the session is unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import gradio as gr
import numpy as np
import pandas as pd

from vggt.attn_format import AttnExport, FormatError
from vggt.viewer import state
from vggt.viewer.state import CACHE, LoadedExport, Session, Settings, ViewerError

CHART_COLUMNS = ["frame", "token", "share"]
Handler = TypeVar("Handler", bound=Callable[..., Any])


def user_errors(handler: Handler) -> Handler:
    """Turn the reader's and viewer's errors into a ``gr.Error`` with the same one-line message."""

    @functools.wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except (FormatError, ViewerError) as exc:
            raise gr.Error(str(exc), print_exception=False) from exc
        except OSError as exc:
            raise gr.Error(f"cannot read the export: {exc}", print_exception=False) from exc

    return wrapped  # type: ignore[return-value]


class Rendered(NamedTuple):
    """Outputs of every re-render (click, layer, head, opacity, toggles)."""

    session: Session
    query_image: np.ndarray
    gallery: list
    readout: str
    shares_table: pd.DataFrame
    shares_chart: pd.DataFrame | None
    shares_note: str
    reverse_result: np.ndarray | None


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


class Reverse(NamedTuple):
    """Outputs of the reverse view's frame choice and clicks."""

    session: Session
    reverse_source: np.ndarray
    reverse_result: np.ndarray | None


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame(columns=state.SHARE_COLUMNS)


def _empty_chart() -> None:
    # None, not an empty DataFrame: after an empty frame Gradio's BarPlot draws no bars for later data.
    return None


def _settings(
    loaded: LoadedExport, layer: str, head: str | None, opacity: float, all_layers: bool, all_heads: bool
):
    return Settings(
        layer=state.check_layer(loaded, layer),
        head=state.parse_head(head, loaded),
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
        f"**{manifest.get('image_set_name') or export.root.name}** · {len(export.layer_names)} layers · "
        f"{meta['S']} frames of {export.image_size[1]}x{export.image_size[0]} px (W x H) · query grid "
        f"{meta['H_ds']}x{meta['W_ds']} (patch grid {meta['H_p']}x{meta['W_p']}, stride "
        f"{meta['stride_h']}x{meta['stride_w']}) · {per_head} · {meta['dtype']} · model "
        f"`{model.get('id', 'unknown')}` · `{export.root}`"
    )


def _frame_choices(loaded: LoadedExport) -> list[tuple[str, int]]:
    return [(label, index) for index, label in enumerate(loaded.labels)]


@user_errors
def on_load(path: str, session: Session | None) -> Loaded:
    """Load button (and ``--attn_dir`` at start): open an export and reset the view for it."""
    loaded = CACHE.open(path or "", reload=True)
    session = Session(export_key=CACHE.key_for(path))
    last_layer = loaded.export.layer_names[-1]
    settings = Settings(layer=last_layer, head=None, opacity=0.6)
    return Loaded(
        session=session,
        layer=gr.Dropdown(choices=loaded.export.layer_names, value=last_layer),
        head=gr.Dropdown(
            choices=state.head_choices(loaded), value=state.AVERAGE, interactive=loaded.per_head
        ),
        banner=_banner(loaded),
        info=_info(loaded),
        query_image=state.query_image(loaded, None),
        gallery=[],
        readout=state.value_readout(loaded, settings, None, None, ["Click a patch of the query frame."]),
        shares_table=_empty_table(),
        shares_chart=_empty_chart(),
        shares_note="",
        reverse_frame=gr.Dropdown(choices=_frame_choices(loaded), value=0),
        reverse_source=state.reverse_source_image(loaded, 0, None),
        reverse_result=None,
    )


def _render(loaded: LoadedExport, session: Session, settings: Settings) -> Rendered:
    reverse = None
    if session.reverse_cell is not None:
        reverse = state.reverse_overlay(loaded, settings, session.reverse_frame, session.reverse_cell)
    if session.query is None:
        readout = state.value_readout(loaded, settings, None, None, ["Click a patch of the query frame."])
        return Rendered(
            session, state.query_image(loaded, None), [], readout, _empty_table(), _empty_chart(), "", reverse
        )
    gallery, readout = state.gallery_for(loaded, settings, session.query)
    rows, chart, note = state.token_shares(loaded, settings, session.query)
    return Rendered(
        session=session,
        query_image=state.query_image(loaded, session.query),
        gallery=gallery,
        readout=readout,
        shares_table=pd.DataFrame(rows, columns=state.SHARE_COLUMNS),
        shares_chart=pd.DataFrame(chart, columns=CHART_COLUMNS),
        shares_note=note,
        reverse_result=reverse,
    )


@user_errors
def on_settings_change(
    session: Session, layer: str, head: str, opacity: float, all_layers: bool, all_heads: bool
) -> Rendered:
    """Layer, head, opacity or a composite toggle changed: re-render the current query."""
    if session is None or session.export_key is None:
        return Rendered(*[gr.skip()] * len(Rendered._fields))  # controls moved before any Load
    loaded = CACHE.get(session.export_key)
    return _render(loaded, session, _settings(loaded, layer, head, opacity, all_layers, all_heads))


@user_errors
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


@user_errors
def on_reverse_frame(session: Session, frame: int, layer: str, head: str, opacity: float) -> Reverse:
    """Reverse view: another frame chosen; show it with its grid and clear the clicked cell."""
    loaded = CACHE.get(session.export_key)
    frame = int(frame or 0)
    session = session.with_changes(reverse_frame=frame, reverse_cell=None)
    return Reverse(session, state.reverse_source_image(loaded, frame, None), None)


@user_errors
def on_reverse_select(
    session: Session, frame: int, layer: str, head: str, opacity: float, evt: gr.SelectData
) -> Reverse:
    """Reverse view: a click on a patch of the chosen frame shows which queries attend to it."""
    loaded = CACHE.get(session.export_key)
    settings = _settings(loaded, layer, head, opacity, False, False)
    frame = int(frame or 0)
    cell = loaded.geometry.cell_at(*_click_xy(evt))
    session = session.with_changes(reverse_frame=frame, reverse_cell=cell)
    return Reverse(
        session,
        state.reverse_source_image(loaded, frame, cell),
        state.reverse_overlay(loaded, settings, frame, cell),
    )
