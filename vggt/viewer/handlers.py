"""Gradio event handlers: thin wrappers over :mod:`vggt.viewer.views` that speak Gradio's types.

Each handler takes the session (``gr.State``) and the controls' values and returns a named tuple in the
order of the outputs the app wires (so tests can call them directly and read fields by name). Every
tuple ends with ``message``, the message area under the path box: cleared on success; on any failure
(:func:`reports_errors`) it says what went wrong and every other output is skipped, so the page, the
session and the export already open stay as they were.

The main view (query frame, overlays, the controls that choose them) is answered by :class:`MainView`
from every handler that changes it; :func:`open_layer_head` opens a layer and head there, for any
panel that wants to (a click on a composite's cell, an analysis heatmap). The secondary panels below it
are brought up to date by :func:`on_panels` after each change, the open one only.
"""

from __future__ import annotations

import functools
import tempfile
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import gradio as gr
import pandas as pd

from vggt.attn_format import AttnExport
from vggt.viewer import analysis as analysis_panel
from vggt.viewer import interventions as interventions_panel
from vggt.viewer import payload, state, views
from vggt.viewer.messages import error_text, lines_html, message_html
from vggt.viewer.state import CACHE, LoadedExport, Session, SessionBox, Settings, ViewerError
from vggt.wording import plural

CHART_COLUMNS = ["frame", "token", "share"]
CLICK_PROMPT = "Click a patch of the query frame."
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


def in_session(handler: Handler) -> Handler:
    """Run ``handler`` (whose first argument is the :class:`Session`) on a page's :class:`SessionBox`,
    under its lock; the session it returns is left in the box, and the box is the State's output (the
    same object: Gradio then knows the page's state is in use, and calls :func:`on_session_end` with it
    once the page is gone)."""

    @functools.wraps(handler)
    def wrapped(box: SessionBox, *args: Any, **kwargs: Any) -> Any:
        with box.lock:
            out = handler(box.session, *args, **kwargs)
            session = getattr(out, "session", None)
            if isinstance(session, Session):
                box.session = session
            return out._replace(session=box) if "session" in getattr(out, "_fields", ()) else out

    return wrapped  # type: ignore[return-value]


# ---- outputs ------------------------------------------------------------------------------------------


class MainView(NamedTuple):
    """Outputs of every change of the main view: the controls (``gr.skip()`` where unchanged), the query
    frame (a picker with the readout beside it) and the overlays (a grid); see :mod:`.payload`."""

    session: Session
    layer: Any
    head: Any
    mode_frames: Any
    mode_layers: Any
    mode_heads: Any
    mode_layers_heads: Any
    grid_frame: Any
    query_view: dict
    overlays: dict
    message: str


class Panels(NamedTuple):
    """Outputs of the secondary panels; only the open one (``session.panel``) is computed."""

    shares_table: Any
    shares_chart: Any
    shares_note: Any
    token_query: Any
    token_view: Any
    reverse_frame: Any
    reverse_view: Any
    points_note: Any
    points_3d: Any
    analysis_table: Any
    analysis_readout: Any
    message: str


class Reverse(NamedTuple):
    """Outputs of the reverse view's frame choice and clicks."""

    session: Session
    reverse_view: dict
    message: str


MODE_FIELDS = {
    "frames": "mode_frames",
    "layers": "mode_layers",
    "heads": "mode_heads",
    "layers_heads": "mode_layers_heads",
}


# ---- helpers ------------------------------------------------------------------------------------------


def _loaded(session: Session | None) -> LoadedExport:
    if session is None or session.export_key is None:
        raise ViewerError("load an export first")
    return CACHE.get(session.export_key)


def _current(session: Session | None, opacity: Any) -> tuple[LoadedExport, Settings]:
    """The session's export and what its main view shows, at the page's opacity.

    The view's layer, head, mode and frame live in the session (the page's dropdowns may still show an
    older value while an answer is on its way); a control's handler changes them, the others read them.
    """
    loaded = _loaded(session)
    if session.view is None:
        raise ViewerError("load an export first")
    return loaded, replace(session.view, opacity=_opacity(opacity))


def _opacity(value: Any) -> float:
    try:
        opacity = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ViewerError(f"unknown opacity {value!r}") from None
    if not 0.0 <= opacity <= 1.0:  # also refuses nan
        raise ViewerError(f"opacity {opacity} outside [0, 1]")
    return opacity


def _frame(loaded: LoadedExport, frame: Any) -> int:
    try:
        index = int(frame or 0)
    except (TypeError, ValueError, OverflowError):
        raise ViewerError(f"unknown frame {frame!r}") from None
    if not 0 <= index < loaded.num_frames:
        raise ViewerError(f"frame {index} out of range 0..{loaded.num_frames - 1}")
    return index


def _fitted(loaded: LoadedExport, settings: Settings) -> Settings:
    """``settings`` with a head the layer has (else Average) and a mode that applies (else frames)."""
    head = views.head_for(loaded, settings.layer, settings.head)
    mode = settings.mode if views.mode_available(loaded, settings.layer, settings.mode) else "frames"
    return replace(settings, head=head, mode=mode)


def _head_choice(head: int | None) -> str:
    return state.AVERAGE if head is None else f"Head {head + 1}"


def _kept_head(loaded: LoadedExport, layer: str, current: str | None) -> str:
    """``current`` where ``layer`` has that head, else Average."""
    return current if current in state.head_choices(loaded, layer) else state.AVERAGE


def _head_dropdown(loaded: LoadedExport, layer: str, current: str | None = None) -> gr.Dropdown:
    """The Head control for ``layer``: Average plus its heads, keeping ``current`` when still valid;
    disabled where the layer has no per-head maps (an averaged export, the rollout)."""
    choices = state.head_choices(loaded, layer)
    return gr.Dropdown(
        choices=choices, value=_kept_head(loaded, layer, current), interactive=len(choices) > 1
    )


def _mode_buttons(loaded: LoadedExport, layer: str, mode: str) -> dict[str, gr.Button]:
    """The view-mode buttons: the current one highlighted, those that do not apply disabled."""
    return {
        field: gr.Button(
            variant="primary" if name == mode else "secondary",
            interactive=views.mode_available(loaded, layer, name),
        )
        for name, field in MODE_FIELDS.items()
    }


def _views(loaded: LoadedExport, session: Session, settings: Settings) -> tuple[dict, dict, Session]:
    """The query frame's and the overlays' values for the session's clicked query (or the prompt), the
    frames with them where the page does not hold them yet (and the session noting that it does)."""
    picker = views.query_picker(loaded, session.query)
    opacity = settings.opacity
    notes = describe(loaded)
    frames = session.frames_token != loaded.token
    if session.query is None:
        readout = views.value_readout(loaded, settings, None, None)
        query_view = payload.view_value(
            loaded, opacity, picker=picker, readout=readout, notes=notes, frames=frames
        )
        overlays = payload.view_value(loaded, opacity, empty=CLICK_PROMPT)
    else:
        grid = views.view_for(loaded, settings, session.query)
        readout = grid.readout
        entry = analysis_panel.ANALYSES.get(loaded)
        if entry is not None and settings.mode == "frames":
            readout = [*readout, *analysis_panel.query_lines(loaded, entry[0], settings, session.query)]
        query_view = payload.view_value(
            loaded, opacity, picker=picker, readout=readout, notes=notes, frames=frames
        )
        overlays = payload.view_value(loaded, opacity, grid=grid)
    return query_view, overlays, session.with_changes(frames_token=loaded.token, view=settings)


def _main_view(
    loaded: LoadedExport, session: Session, settings: Settings, controls: tuple[str, ...] = ()
) -> MainView:
    """The main view for ``settings`` (kept in the session); ``controls`` names those set to match it,
    from ``"layer"``, ``"head"``, ``"modes"`` (the mode buttons and the frame control)."""
    settings = _fitted(loaded, settings)
    query_view, overlays, session = _views(loaded, session, settings)
    updates: dict[str, Any] = {
        name: gr.skip() for name in ("layer", "head", "grid_frame", *MODE_FIELDS.values())
    }
    if "layer" in controls:
        updates["layer"] = gr.Dropdown(choices=state.layer_choices(loaded), value=settings.layer)
    if "head" in controls:
        updates["head"] = _head_dropdown(loaded, settings.layer, _head_choice(settings.head))
    if "modes" in controls:
        updates |= _mode_buttons(loaded, settings.layer, settings.mode)
        updates["grid_frame"] = gr.Dropdown(interactive=settings.mode == "layers_heads")
    return MainView(session=session, query_view=query_view, overlays=overlays, message="", **updates)


# ---- Load ---------------------------------------------------------------------------------------------


def _model_info(export: AttnExport) -> dict:
    model = export.manifest.get("model")
    return model if isinstance(model, dict) else {}


def _model_text(model: dict) -> str:
    """What the manifest says of the weights: random (seed), the hub id and revision, or the file."""
    if model.get("random_weights"):
        return f"random weights (seed {model.get('random_seed')})"
    if model.get("id"):
        revision = model.get("revision")
        return f"{model['id']}" + (f" @ {str(revision)[:12]}" if revision else "")
    if model.get("checkpoint_file"):
        return f"{model['checkpoint_file']}"
    return "unknown"


def describe(loaded: LoadedExport) -> list[str]:
    """What the export is (one line), then what to be warned of (random weights, seed format, notes)."""
    export = loaded.export
    meta = export.layer_meta(export.layer_names[0])
    height, width = export.image_size
    per_head = (
        f"per head ({plural(meta['num_heads'], 'head')})" if meta["per_head_data"] else "averaged over heads"
    )
    info = (
        f"{export.name} · {state.kinds_summary(loaded)} · "
        f"{plural(meta['S'], 'frame')} of {width} x {height} px (W x H) · query grid {meta['W_ds']} x "
        f"{meta['H_ds']} cells (patch grid {meta['W_p']} x {meta['H_p']}, stride {meta['stride_w']} x "
        f"{meta['stride_h']}) · {per_head} · {meta['dtype']} · model {_model_text(_model_info(export))}"
    )
    lines = [info]
    if export.random_weights:
        seed = _model_info(export).get("random_seed")
        lines.append(
            f"Random weights: this export was made with seeded random weights (seed {seed}), not a trained "
            "model. The maps show the pipeline, not what VGGT attends to."
        )
    if export.is_seed:
        lines.append("Seed-format export: no special-token mass; frames are the copied source images.")
    lines.extend(f"Note: {warning}" for warning in dict.fromkeys(export.warnings))
    return lines


@reports_errors(MainView)
def on_load(session: Session | None, path: str) -> MainView:
    """Load button (and ``--attn_dir`` at start): open an export and reset the view for it."""
    loaded = CACHE.open(path or "", reload=True)
    previous = session if isinstance(session, Session) else Session()
    session = Session(export_key=CACHE.key_for(path), frames_token=previous.frames_token)  # page keeps frames
    CACHE.hold(session.export_key, previous.export_key)
    layer = state.default_layer(loaded)
    settings = Settings(layer=layer, head=None)
    query_view, overlays, session = _views(loaded, session, settings)  # the session holds the view
    return MainView(
        session=session,
        layer=gr.Dropdown(choices=state.layer_choices(loaded), value=layer),
        head=_head_dropdown(loaded, layer),
        **_mode_buttons(loaded, layer, "frames"),
        grid_frame=gr.Dropdown(
            choices=[(label, index) for index, label in enumerate(loaded.labels)], value=0, interactive=False
        ),
        query_view=query_view,
        overlays=overlays,
        message="",
    )


def on_session_end(box: SessionBox | Session | None) -> None:
    """Gradio ended a page's session (the page closed, its state expired): let go of the export it had
    open, so that an export no session holds is forgotten and a zip's extraction removed."""
    session = box.session if isinstance(box, SessionBox) else box
    if isinstance(session, Session):
        CACHE.release(session.export_key)


# ---- the main view ------------------------------------------------------------------------------------


def _skipped_before_load(session: Session | None) -> bool:
    return session is None or session.export_key is None


@reports_errors(MainView)
def on_query_select(session: Session, opacity: float, evt: gr.EventData) -> MainView:
    """A click on the query frame at frame pixel ``(evt.x, evt.y)``: the cell under it is the query."""
    loaded, settings = _current(session, opacity)
    x, y = _click_xy(evt)
    return _main_view(loaded, session.with_changes(query=loaded.geometry.cell_at(x, y)), settings)


def _click_xy(evt: gr.EventData) -> tuple[float, float]:
    data = getattr(evt, "_data", None)
    try:
        x, y = float(data["x"]), float(data["y"])
    except (TypeError, KeyError, ValueError, OverflowError):
        raise ViewerError("unexpected click data") from None
    if not (abs(x) < 1e9 and abs(y) < 1e9):  # also rejects nan and inf
        raise ViewerError("unexpected click position")
    return x, y


@reports_errors(MainView)
def on_layer_change(session: Session, layer: str, opacity: float) -> MainView:
    """Another layer chosen: the head kept where the layer has it (else Average: the rollout and averaged
    exports have no per-head maps), the view mode kept where it applies; the Head control and the mode
    buttons fitted to the layer."""
    if _skipped_before_load(session):
        return unchanged(MainView)
    loaded, settings = _current(session, opacity)
    settings = replace(settings, layer=state.check_layer(loaded, layer))
    return _main_view(loaded, session, settings, controls=("head", "modes"))


@reports_errors(MainView)
def on_head_change(session: Session, head: str, opacity: float) -> MainView:
    """Another head chosen (``"Average"``, ``"Head 3"``): re-render the current query."""
    if _skipped_before_load(session):
        return unchanged(MainView)
    loaded, settings = _current(session, opacity)
    settings = replace(settings, head=state.parse_head(head, loaded, settings.layer))
    return _main_view(loaded, session, settings)


@reports_errors(MainView)
def on_grid_frame(session: Session, frame: Any, opacity: float) -> MainView:
    """Another frame chosen for the layers x heads view."""
    if _skipped_before_load(session):
        return unchanged(MainView)
    loaded, settings = _current(session, opacity)
    return _main_view(loaded, session, replace(settings, frame=_frame(loaded, frame)))


def on_mode(mode: str) -> Callable[..., MainView]:
    """The handler of a view-mode button: switch the main view to ``mode``."""

    @reports_errors(MainView)
    def handler(session: Session, opacity: float) -> MainView:
        if _skipped_before_load(session):
            return unchanged(MainView)
        loaded, settings = _current(session, opacity)
        if not views.mode_available(loaded, settings.layer, mode):
            raise ViewerError(f"{views.MODES[mode]} needs per-head maps, which this layer does not hold")
        return _main_view(loaded, session, replace(settings, mode=mode), controls=("modes",))

    handler.__name__ = f"on_mode_{mode}"
    return handler


def open_layer_head(session: Session, layer: str, head: int | None, opacity: float) -> MainView:
    """Open ``layer`` and ``head`` (0-based, ``None`` = Average) in the frames view, controls included.

    The one way a panel opens a layer and head in the main view (a composite's cell, an analysis
    heatmap's cell): wire it with ``outputs=`` the app's main-view outputs (``Page.main_outputs``).
    """
    loaded, settings = _current(session, opacity)
    layer = state.check_layer(loaded, layer)
    head = state.parse_head(_head_choice(head), loaded, layer)
    settings = replace(settings, layer=layer, head=head, mode="frames")
    return _main_view(loaded, session, settings, controls=("layer", "head", "modes"))


@reports_errors(MainView)
def on_open_cell(session: Session, opacity: float, evt: gr.EventData) -> MainView:
    """A click on a composite's cell: open its layer and head (``evt.layer``, ``evt.head``)."""
    data = getattr(evt, "_data", None)
    if not isinstance(data, dict) or not isinstance(data.get("layer"), str):
        raise ViewerError("unexpected cell data")
    head = data.get("head")
    if head is not None and (not isinstance(head, int) or isinstance(head, bool)):
        raise ViewerError("unexpected cell data")
    return open_layer_head(session, data["layer"], head, opacity)


# ---- files handed to the page ---------------------------------------------------------------------------


@functools.cache
def _output_folder() -> Path:
    """A private folder for the files this process hands to the page (figures, 3D views); removed when
    the process exits (Gradio serves its own copies)."""
    folder = tempfile.TemporaryDirectory(prefix="vggt-viewer-")
    _FOLDERS.append(folder)
    return Path(folder.name)


_FOLDERS: list[tempfile.TemporaryDirectory] = []
_RECENT: deque[Path] = deque()
_KEPT_FILES = 32


def _output_file(suffix: str) -> Path:
    """A new file name in :func:`_output_folder`; files older than the last :data:`_KEPT_FILES` are
    removed."""
    path = _output_folder() / f"{uuid.uuid4().hex}{suffix}"
    _RECENT.append(path)
    while len(_RECENT) > _KEPT_FILES:
        _RECENT.popleft().unlink(missing_ok=True)
    return path


# ---- secondary panels ---------------------------------------------------------------------------------


def _token_panel(loaded: LoadedExport, settings: Settings, choice: str | None) -> tuple[gr.Dropdown, dict]:
    """The camera-token view of the layer in view, for the chosen token (the same token when the layer
    has it, else its first)."""
    row = views.resolve_token(loaded, settings.layer, choice)
    choices = views.token_choices(loaded, settings.layer)
    dropdown = gr.Dropdown(
        choices=choices, value=None if row is None else choices[row][1], interactive=bool(choices)
    )
    if row is None:
        return dropdown, payload.view_value(
            loaded, empty=" ".join(views.no_token_readout(loaded, settings.layer))
        )
    grid = views.token_view(loaded, settings, row)
    return dropdown, payload.view_value(loaded, settings.opacity, grid=grid, readout=grid.readout)


def _reverse_panel(loaded: LoadedExport, session: Session, settings: Settings) -> dict:
    frame = session.reverse_frame if session.reverse_frame < loaded.num_frames else 0
    cell = session.reverse_cell
    if cell is not None and not views.reverse_in_view(loaded, settings.layer, frame):
        cell = None  # a frame or DINOv2 layer holds no reverse view of frames other than 0: cleared
    picker = views.reverse_picker(loaded, frame, cell)
    if cell is None:
        readout = [
            "Click a patch of this frame: the query frame then shows which of its patches attend to it."
        ]
        return payload.view_value(loaded, settings.opacity, picker=picker, readout=readout)
    grid = views.reverse_view(loaded, settings, frame, cell)
    return payload.view_value(loaded, settings.opacity, picker=picker, grid=grid, readout=grid.readout)


@reports_errors(Panels)
def on_panels(session: Session, opacity: float, token: str | None, reverse_frame: Any, panel: str) -> Panels:
    """Bring the open secondary panel (``panel``: ``"tokens"``, ``"camera"``, ``"3d"``, ``"reverse"``) up
    to date with the main view; the others are skipped."""
    if _skipped_before_load(session):
        return unchanged(Panels)
    loaded, settings = _current(session, opacity)
    out = {name: gr.skip() for name in Panels._fields}  # the message too: a main view's error stays
    if panel == "tokens":
        if session.query is None:
            out |= {"shares_table": pd.DataFrame(columns=views.share_columns({})), "shares_chart": None,
                    "shares_note": lines_html([CLICK_PROMPT], "note")}  # fmt: skip
        else:
            rows, chart, note, columns = views.token_shares(loaded, settings, session.query)
            out |= {
                "shares_table": pd.DataFrame(rows, columns=columns),
                "shares_chart": pd.DataFrame(chart, columns=CHART_COLUMNS),
                "shares_note": lines_html([note], "note"),
            }
    elif panel == "camera":
        out["token_query"], out["token_view"] = _token_panel(loaded, settings, token)
    elif panel == "3d":
        out["points_note"], out["points_3d"] = _points_panel(loaded, session, settings)
    elif panel == "analysis":
        entry = analysis_panel.ANALYSES.get(loaded)  # computed when the tab opens (on_analysis), not here
        if entry is not None:
            out["analysis_readout"] = lines_html(
                analysis_panel.query_lines(loaded, entry[0], settings, session.query), "note"
            )
    elif panel == "reverse":
        out["reverse_frame"] = gr.Dropdown(
            choices=[(label, index) for index, label in enumerate(loaded.labels)],
            value=session.reverse_frame if session.reverse_frame < loaded.num_frames else 0,
        )
        out["reverse_view"] = _reverse_panel(loaded, session, settings)
    return Panels(**out)


# ---- analysis panel -----------------------------------------------------------------------------------


class AnalysisPanel(NamedTuple):
    """Outputs of the Analysis tab: where the analysis came from, the heat map, the query's readout."""

    analysis_note: Any
    analysis_table: Any
    analysis_readout: Any
    message: str


@reports_errors(AnalysisPanel)
def on_analysis(
    session: Session,
    opacity: float,
    metric: str,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way of asking for a progress bar
) -> AnalysisPanel:
    """The Analysis tab opened, or its metric chosen: the export's analysis (read from beside the export,
    else computed now with a progress bar, and saved there when the folder can be written), the metric
    as a layers x heads heat map, and the clicked query's own metrics."""
    if _skipped_before_load(session):
        return unchanged(AnalysisPanel)
    loaded, settings = _current(session, opacity)
    metric = analysis_panel.check_metric(metric)

    def report(done: int, total: int, name: str) -> None:
        progress((done, total), desc=f"Analysing {loaded.layer_labels.get(name, name)}", unit="layers")

    analysis, origin = analysis_panel.ANALYSES.compute(loaded, report)
    return AnalysisPanel(
        analysis_note=lines_html(analysis_panel.status_lines(loaded, analysis, origin), "note"),
        analysis_table=analysis_panel.heatmap(loaded, analysis, metric),
        analysis_readout=lines_html(
            analysis_panel.query_lines(loaded, analysis, settings, session.query), "note"
        ),
        message="",
    )


@reports_errors(MainView)
def on_analysis_cell(session: Session, opacity: float, evt: gr.SelectData) -> MainView:
    """A click on a cell of the analysis heat map: open its layer and head in the main view."""
    loaded = _loaded(session)
    entry = analysis_panel.ANALYSES.get(loaded)
    if entry is None:
        raise ViewerError("open the Analysis tab first")
    index = evt.index if isinstance(evt.index, list | tuple) else None
    if index is None or len(index) != 2 or not all(isinstance(i, int) for i in index):
        raise ViewerError("unexpected cell data")
    layer, head = analysis_panel.cell_layer_head(entry[0], index[0], index[1])
    return open_layer_head(session, layer, head, opacity)


class TokenPanel(NamedTuple):
    token_view: dict
    message: str


def _points_panel(loaded: LoadedExport, session: Session, settings: Settings) -> tuple[str, str | None]:
    """The 3D view's note and its GLB file (``None`` before a click or without geometry)."""
    from vggt.viewer import scene3d

    if loaded.export.geometry() is None:
        return lines_html(
            ["This export holds no geometry: export it with --geometry for the 3D view."], "note"
        ), None
    if session.query is None:
        return lines_html([CLICK_PROMPT], "note"), None
    cloud = scene3d.attention_cloud(loaded, settings, session.query)
    path = scene3d.write_glb(cloud, _output_file(".glb"))
    return lines_html(cloud.readout, "note"), str(path)


@reports_errors(TokenPanel)
def on_token_view(session: Session, opacity: float, token: str | None) -> TokenPanel:
    """Camera-token view: a token chosen; render its maps on every key frame of the current layer."""
    if _skipped_before_load(session):
        return unchanged(TokenPanel)
    loaded, settings = _current(session, opacity)
    _, value = _token_panel(loaded, settings, token)
    return TokenPanel(value, "")


@reports_errors(Reverse)
def on_reverse_frame(session: Session, reverse_frame: Any, opacity: float) -> Reverse:
    """Reverse view: another frame chosen; show it with its grid and clear the clicked cell."""
    if _skipped_before_load(session):
        return unchanged(Reverse)
    loaded, settings = _current(session, opacity)
    session = session.with_changes(reverse_frame=_frame(loaded, reverse_frame), reverse_cell=None)
    return Reverse(session, _reverse_panel(loaded, session, settings), "")


@reports_errors(Reverse)
def on_reverse_select(session: Session, reverse_frame: Any, opacity: float, evt: gr.EventData) -> Reverse:
    """Reverse view: a click on a patch of the chosen frame shows which queries attend to it (a one-line
    message where the layer holds no attention to that frame: frame and DINOv2 layers hold frame 0 only)."""
    loaded, settings = _current(session, opacity)
    chosen = _frame(loaded, reverse_frame)
    cell = loaded.geometry.cell_at(*_click_xy(evt))
    views.reverse_view(loaded, settings, chosen, cell)  # raises where the layer holds no such column
    session = session.with_changes(reverse_frame=chosen, reverse_cell=cell)
    return Reverse(session, _reverse_panel(loaded, session, settings), "")


# ---- figures ------------------------------------------------------------------------------------------


class Saved(NamedTuple):
    """Outputs of Save figure: the files written (PNG and SVG), offered for download."""

    figure_files: Any
    message: str


@reports_errors(Saved)
def on_save_figure(session: Session, opacity: float) -> Saved:
    """Save figure: the current view (query frame with the query marked, the maps, colour bar, layer,
    head and export name as text) as PNG and SVG at print resolution."""
    from vggt.viewer import figures  # matplotlib is imported only when a figure is made

    loaded, settings = _current(session, opacity)
    if session.query is None:
        raise ViewerError("click a patch of the query frame first: a figure shows its attention")
    grid = views.view_for(loaded, settings, session.query)
    figure = figures.view_figure(
        loaded, grid, settings.opacity, figures.figure_title(loaded, grid, session.query)
    )
    folder = Path(tempfile.mkdtemp(dir=_output_folder()))
    paths = figures.save(figure, folder / figures.file_stem(loaded, grid, session.query))
    return Saved(gr.File(value=[str(path) for path in paths], visible=True), "")


# ---- intervention results (Analysis tab) -----------------------------------------------------------------


class InterventionPanel(NamedTuple):
    """Outputs of the Analysis tab's intervention results: the column choice, what the table shows and the
    layers x heads table of a sweep's head ablations (:mod:`.interventions`)."""

    intervention_column: Any
    intervention_note: Any
    intervention_table: Any
    intervention_side: Any
    message: str


def _intervention_panel(session: Session, path: str, column: str | None) -> InterventionPanel:
    loaded = _loaded(session)
    drawn = interventions_panel.sweep_heatmap(loaded, interventions_panel.open_results(path), column or None)
    return InterventionPanel(
        intervention_column=gr.Dropdown(choices=drawn.columns, value=drawn.column, interactive=True),
        intervention_note=lines_html(drawn.lines, "note"),
        intervention_table=drawn.table,
        intervention_side=gr.Column(visible=True),
        message="",
    )


@reports_errors(InterventionPanel)
def on_interventions(session: Session, path: str, column: str | None) -> InterventionPanel:
    """The intervention results' path given (Open, Enter) or its column chosen: the sweep's head ablations
    as a heat map on the export's layers and heads, beside the analysis heat map."""
    return _intervention_panel(session, path, column)


@reports_errors(InterventionPanel)
def on_interventions_shown(session: Session, path: str, column: str | None) -> InterventionPanel:
    """The Analysis tab opened: the intervention heat map redrawn where a path is given (the export may
    have changed), else a word on what the path box is for."""
    if _skipped_before_load(session) or not (isinstance(path, str) and path.strip()):
        out = unchanged(InterventionPanel)
        return out._replace(intervention_note=lines_html([interventions_panel.PROMPT], "note"))
    return _intervention_panel(session, path, column)


@reports_errors(MainView)
def on_intervention_cell(session: Session, opacity: float, evt: gr.SelectData) -> MainView:
    """A click on a cell of the intervention heat map: open its layer and head in the main view."""
    loaded = _loaded(session)
    index = evt.index if isinstance(evt.index, list | tuple) else None
    if index is None or len(index) != 2 or not all(isinstance(i, int) for i in index):
        raise ViewerError("unexpected cell data")
    layer, head = interventions_panel.cell_layer_head(loaded, index[0], index[1])
    return open_layer_head(session, layer, head, opacity)
