"""What the viewer shows, as data: grids of colour codes over frames, with their labels, scales and
readouts, computed from an opened export and a session's settings (no Gradio, no pixels).

A view is a :class:`Grid` of rows of :class:`Cell` s, each cell one map's colour codes over one frame,
plus the text around it. The browser colours and draws it (:mod:`vggt.viewer.payload` sends it,
``static/attention_view.js`` draws it); :mod:`vggt.viewer.figures` draws the same grid for print. The
views:

- ``frames``: the clicked query's maps, one cell per key frame of the layer (every frame for global
  layers and the rollout, frame 0 alone for frame and DINOv2 layers);
- ``layers``: rows = every layer, columns = frames, each row on its own scale;
- ``heads``: rows = the heads of the layer, columns = frames, each row on the head's own scale;
- ``layers_heads``: rows = layers, columns = the head average and every head, for one frame, each row
  on one scale (its layer's largest head vmax99);
- the camera-token view and the reverse view (:func:`token_view`, :func:`reverse_view`).

Colour codes are ``round(clip(p / scale, 0, 1) * 255)`` of probabilities ``p`` (:func:`render.to_codes`),
so a code and its row's scale give back the probability a colour stands for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from vggt.attn_format import FormatError
from vggt.attn_format.quantization import vmax99
from vggt.attn_format.schema import ROLLOUT_KIND
from vggt.viewer import markers, render
from vggt.viewer.markers import Marker, QueryPositions
from vggt.viewer.state import (
    AVERAGE,
    TOKEN_NAMES,
    LoadedExport,
    Settings,
    ViewerError,
    discard_text,
    key_frames,
    kinds_summary,
    layer_description,
    layer_heads,
    layer_kind,
)
from vggt.wording import plural

MODES = {"frames": "Frames", "layers": "All layers", "heads": "All heads", "layers_heads": "Layers × heads"}


@dataclass(frozen=True)
class Cell:
    """One map over one frame.

    Attributes
    ----------
    frame : int
        The frame drawn under the map.
    codes : np.ndarray or None
        ``[H_ds, W_ds] uint8`` colour codes; ``None`` draws the frame alone.
    caption : str
        Text under the cell.
    outline : tuple of int, optional
        Grid cell ``(row, col)`` outlined (the query cell on frame 0).
    opens : tuple, optional
        ``(layer, head)`` a click on the cell opens in the main view (``head`` 0-based or ``None``).
    markers : list of Marker
        Points drawn over the map.
    """

    frame: int
    codes: np.ndarray | None
    caption: str
    outline: tuple[int, int] | None = None
    opens: tuple[str, int | None] | None = None
    markers: tuple[Marker, ...] = ()


@dataclass(frozen=True)
class Row:
    """A row of cells; ``None`` leaves a column empty (a frame layer has no frame 1).

    ``query`` is the query cell the row's maps belong to (a figure shows it on the query frame).
    """

    label: str
    cells: list[Cell | None]
    scale: float | None = None  # probability at full colour, when the row has its own scale
    note: str = ""
    query: tuple[int, int] | None = None


@dataclass(frozen=True)
class Grid:
    """A view: rows of cells under column headers, what full colour means, and a text readout."""

    rows: list[Row]
    columns: list[str]
    scale: float | None  # one scale for every row; None when each row states its own
    scale_text: str
    readout: list[str] = field(default_factory=list)
    mode: str = "frames"


@dataclass(frozen=True)
class Picker:
    """A frame to click on: its grid drawn, the chosen cell highlighted."""

    frame: int
    cell: tuple[int, int] | None
    caption: str


# ---- display scales -----------------------------------------------------------------------------------


def single_map_scale(meta: dict, head: int | None, token: bool = False) -> float | None:
    """The stored scale of one map: the head's vmax99, or the layer's (``None`` if not recorded).

    ``token`` picks the token queries' scales (``token_per_head_vmax99``, ``token_vmax99``).
    """
    prefix = "token_" if token else ""
    if meta["normalized_by"] == "head" and head is not None:
        return float(meta[f"{prefix}per_head_vmax99"][head])
    value = meta.get("token_vmax99" if token else "layer_vmax99")
    return float(value) if value else None


def normalize_for_display(
    meta: dict, raw: np.ndarray, head: int | None, token: bool = False
) -> tuple[np.ndarray, float]:
    """Maps from the reader normalized for display, and the probability shown as full colour.

    Per-head data shown as Average (``raw`` with a heads axis): each head was dequantized with its own
    vmax99; they are averaged as probabilities, then renormalized by the average's own 99th percentile.
    A single map (averaged data or a chosen head) is shown on its stored scale (its vmax99; the
    layer's for raw float16).

    Parameters
    ----------
    meta : dict
        The layer's metadata.
    raw : np.ndarray
        ``[K, H_ds, W_ds]`` or ``[heads, K, H_ds, W_ds]`` float32 probabilities.
    head : int or None
        The head ``raw`` belongs to (``None``: averaged data or all heads).
    token : bool
        ``raw`` holds token-query maps (their own scales).

    Returns
    -------
    normalized : np.ndarray
        ``[K, H_ds, W_ds]`` float32 (values above 1 are clipped when coloured).
    scale : float
        Probability drawn at full colour.
    """
    if raw.ndim == 4:
        raw = raw.mean(axis=0)
        scale = vmax99(raw)
    else:
        scale = single_map_scale(meta, head, token) or vmax99(raw)
    return raw / np.float32(scale), scale


def display_maps(loaded: LoadedExport, layer: str, qi: int, head: int | None) -> tuple[np.ndarray, float]:
    """One query's maps normalized for display (see :func:`normalize_for_display`): ``[K, H_ds, W_ds]``
    float32 over the layer's key frames, and the probability drawn at full colour."""
    meta = loaded.export.layer_meta(layer)
    return normalize_for_display(meta, loaded.export.query_maps(layer, qi, head), head)


def head_for(loaded: LoadedExport, layer: str, head: int | None) -> int | None:
    """``head`` where ``layer`` has it, else ``None`` (its average): for views over several layers."""
    return head if head is not None and head < layer_heads(loaded, layer) else None


def query_index(loaded: LoadedExport, query: tuple[int, int]) -> int:
    return query[0] * loaded.geometry.W_ds + query[1]


def _head_text(head: int | None) -> str:
    return AVERAGE if head is None else f"Head {head + 1}"


# ---- the main view's grids ----------------------------------------------------------------------------


def query_picker(loaded: LoadedExport, query: tuple[int, int] | None) -> Picker:
    """The query frame (frame 0) to click on, the clicked cell highlighted."""
    return Picker(0, query, f"query frame · {loaded.labels[0]}")


def query_geometry(loaded: LoadedExport, query: tuple[int, int]) -> tuple[QueryPositions | None, list[str]]:
    """Where the clicked query's point lies in every frame (exports with geometry), and readout lines:
    the markers' legend, or why the export's geometry cannot be shown (the maps are shown anyway)."""
    try:
        geometry = loaded.export.geometry()
        if geometry is None:
            return None, []
        positions = markers.query_positions(geometry, query_index(loaded, query))
    except FormatError as error:
        return None, [f"Geometry not shown: {error}"]
    return positions, [markers.legend(positions.sources)]


def _frame_cell(
    loaded: LoadedExport,
    frame: int,
    codes: np.ndarray,
    caption: str,
    query: tuple[int, int] | None,
    opens: tuple[str, int | None] | None,
    positions: QueryPositions | None,
) -> Cell:
    """A map over ``frame``: the query cell outlined on frame 0, the query point's markers, and in the
    caption the sources that do not see the point there."""
    note = markers.hidden_note(positions, frame)
    caption = f"{caption} · {note}" if note else caption
    outline = query if frame == 0 else None
    return Cell(frame, codes, caption, outline, opens, markers.frame_markers(positions, frame))


def _frame_cells(
    loaded: LoadedExport,
    normalized: np.ndarray,
    frames: list[int],
    query: tuple[int, int] | None,
    opens: tuple[str, int | None] | None = None,
    positions: QueryPositions | None = None,
) -> list[Cell | None]:
    """One cell per frame of the export; frames the maps do not cover stay empty."""
    cells: list[Cell | None] = [None] * loaded.num_frames
    codes = render.to_codes(normalized)
    for position, frame in enumerate(frames):
        cells[frame] = _frame_cell(
            loaded, frame, codes[position], loaded.labels[frame], query, opens, positions
        )
    return cells


def frames_view(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> Grid:
    """The clicked query's maps on every key frame of the layer, one scale."""
    layer = settings.layer
    frames = key_frames(loaded, layer)
    normalized, scale = display_maps(loaded, layer, query_index(loaded, query), settings.head)
    positions, geometry_lines = query_geometry(loaded, query)
    cells = [cell for cell in _frame_cells(loaded, normalized, frames, query, None, positions) if cell]
    columns = [cell.caption for cell in cells]
    if positions is not None:  # each frame's caption: where its attention peaks, how far from each marker
        grid = loaded.export.manifest["grid"]
        notes = markers.peak_notes(normalized, frames, positions, grid)
        captions = [f"{loaded.labels[cell.frame]} · {note}" for cell, note in zip(cells, notes, strict=True)]
        cells = [replace(cell, caption=caption) for cell, caption in zip(cells, captions, strict=True)]
    row = Row(f"{loaded.layer_labels[layer]} · {_head_text(settings.head)}", cells, scale, query=query)
    readout = value_readout(loaded, settings, query, scale)
    if len(frames) < loaded.num_frames:
        readout.append(f"{loaded.layer_labels[layer]} attends within frame 0 only: one map")
    readout.extend(geometry_lines)
    return Grid([row], columns, scale, _full_colour(scale), readout)


def layers_view(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> Grid:
    """Rows = every layer (manifest order), columns = frames; each row on its own scale.

    The chosen head is shown where a layer has it; a layer without it (the rollout) shows its average,
    which its row label says. Clicking a cell opens that layer (and head) in the frames view.
    """
    qi = query_index(loaded, query)
    positions, geometry_lines = query_geometry(loaded, query)
    rows = []
    for layer in loaded.export.layer_names:
        head = head_for(loaded, layer, settings.head)
        normalized, scale = display_maps(loaded, layer, qi, head)
        average = " · average" if settings.head is not None and head is None else ""
        cells = _frame_cells(loaded, normalized, key_frames(loaded, layer), query, (layer, head), positions)
        rows.append(Row(f"{loaded.layer_labels[layer]}{average}", cells, scale, _full_colour(scale), query))
    readout = value_readout(loaded, settings, query, None) + geometry_lines
    return Grid(rows, list(loaded.labels), None, "each row: 0 to its full colour", readout, "layers")


def heads_view(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> Grid:
    """Rows = the heads of the layer, columns = frames; each row on the head's own stored scale."""
    layer = settings.layer
    heads = layer_heads(loaded, layer)
    if not heads:
        raise ViewerError(f"{loaded.layer_labels[layer]} holds no per-head maps: no view of all heads")
    meta = loaded.export.layer_meta(layer)
    maps = loaded.export.query_maps(layer, query_index(loaded, query))  # [heads, K, H_ds, W_ds]
    frames = key_frames(loaded, layer)
    positions, geometry_lines = query_geometry(loaded, query)
    rows = []
    for head in range(heads):
        scale = single_map_scale(meta, head) or vmax99(maps[head])
        normalized = maps[head] / np.float32(scale)
        cells = _frame_cells(loaded, normalized, frames, query, (layer, head), positions)
        rows.append(Row(f"Head {head + 1}", cells, scale, _full_colour(scale), query))
    readout = value_readout(loaded, settings, query, None) + geometry_lines
    return Grid(rows, list(loaded.labels), None, "each row: 0 to the head's vmax99", readout, "heads")


def layers_heads_view(loaded: LoadedExport, settings: Settings, query: tuple[int, int], frame: int) -> Grid:
    """Rows = layers, columns = the head average and every head, all on one chosen frame.

    Each row is drawn on one scale, its layer's largest head vmax99 (the stored scale for a layer
    without per-head data), so that the heads of a layer compare by colour. Layers that do not attend
    to ``frame`` (frame and DINOv2 layers: frame 0 only) have no row.
    """
    if not 0 <= frame < loaded.num_frames:
        raise ViewerError(f"frame {frame} out of range 0..{loaded.num_frames - 1}")
    qi = query_index(loaded, query)
    positions, geometry_lines = query_geometry(loaded, query)
    most = max((layer_heads(loaded, name) for name in loaded.export.layer_names), default=0)
    rows = []
    for layer in loaded.export.layer_names:
        frames = key_frames(loaded, layer)
        if frame not in frames:
            continue
        meta = loaded.export.layer_meta(layer)
        maps = loaded.export.query_maps(layer, qi)[..., frames.index(frame), :, :]  # [(heads,) H, W]
        heads = layer_heads(loaded, layer)
        if heads:
            stored = [single_map_scale(meta, head) for head in range(heads)]
            scale = max(stored) if all(stored) else vmax99(maps)
            maps = np.concatenate([maps.mean(axis=0, keepdims=True), maps])
        else:
            scale = single_map_scale(meta, None) or vmax99(maps)
            maps = maps[None]
        codes = render.to_codes(maps / np.float32(scale))
        cells: list[Cell | None] = [None] * (most + 1)
        for column in range(codes.shape[0]):
            head = None if column == 0 else column - 1
            cells[column] = _frame_cell(
                loaded, frame, codes[column], _head_text(head), query, (layer, head), positions
            )
        rows.append(Row(loaded.layer_labels[layer], cells, scale, _full_colour(scale), query))
    if not rows:
        raise ViewerError(f"no layer of this export attends to frame {frame}")
    columns = [AVERAGE] + [f"Head {head + 1}" for head in range(most)]
    readout = [
        f"Layers × heads on {loaded.labels[frame]} · {kinds_summary(loaded)}",
        "Each row on one scale: its layer's largest head vmax99 (row label); click a cell to open it",
    ]
    readout.append(f"Query cell row {query[0]}, col {query[1]} (qi = {qi})")
    readout.extend(geometry_lines)
    return Grid(rows, columns, None, "each row: 0 to its full colour", readout, "layers_heads")


def view_for(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> Grid:
    """The grid of the view mode in ``settings``."""
    if settings.mode == "layers":
        return layers_view(loaded, settings, query)
    if settings.mode == "heads":
        return heads_view(loaded, settings, query)
    if settings.mode == "layers_heads":
        return layers_heads_view(loaded, settings, query, settings.frame)
    return frames_view(loaded, settings, query)


def mode_available(loaded: LoadedExport, layer: str, mode: str) -> bool:
    """Whether a view mode applies: the heads views need per-head maps (in the layer, or anywhere)."""
    if mode == "heads":
        return layer_heads(loaded, layer) > 0
    if mode == "layers_heads":
        return any(layer_heads(loaded, name) > 0 for name in loaded.export.layer_names)
    return mode in MODES


# ---- readouts -----------------------------------------------------------------------------------------


def _full_colour(scale: float) -> str:
    return f"full colour = {scale:.4g}"


def _scale_lines(meta: dict, head: int | None, token: bool = False) -> list[str]:
    """The stored scales in view: the layer's (or token queries') vmax99, a head's, or the heads' range."""
    prefix, what = ("token_", "token vmax99") if token else ("", "vmax99")
    layer_vmax = meta.get("token_vmax99" if token else "layer_vmax99")
    layer_text = f"{layer_vmax:.4g}" if layer_vmax else "not recorded"
    raw = "raw float16 probabilities · " if meta["normalized_by"] == "none" else ""
    lines = [f"{raw}layer {what} = {layer_text}"]
    if not meta["per_head_data"]:  # one map per frame: the colours use the stored scale, where there is one
        own = "; the colours use the query's own 99th percentile"
        lines[0] += " (the colours' scale)" if layer_vmax else own
    else:
        head_vmax = meta.get(f"{prefix}per_head_vmax99")
        if head is not None:
            own = f"{head_vmax[head]:.4g}" if head_vmax else layer_text
            lines.append(f"Head {head + 1} {what} = {own} (the colours' scale)")
        elif head_vmax:
            lines.append(
                f"Average of {plural(meta['num_heads'], 'head')} (head {what} from {min(head_vmax):.4g} to "
                f"{max(head_vmax):.4g}); the colours use the average's own 99th percentile"
            )
        else:
            lines.append(
                f"Average of {plural(meta['num_heads'], 'head')}; the colours use its own 99th percentile"
            )
    return lines


def value_readout(
    loaded: LoadedExport, settings: Settings, query: tuple[int, int] | None, scale: float | None
) -> list[str]:
    """Lines of text saying what is in view: the layer (label, kind; the rollout's discard ratio) or the
    composite, the stored scales, which scale the colours use, and the query cell."""
    export = loaded.export
    meta = export.layer_meta(settings.layer)
    lines = []
    if settings.mode == "layers":
        lines.append(f"All layers · {kinds_summary(loaded)} · each row on its own scale (row label)")
        if any(key_frames(loaded, name) != list(range(loaded.num_frames)) for name in export.layer_names):
            lines.append("Frame and DINOv2 layers attend within a frame: their rows hold frame 0 only")
        for name in export.layer_names:
            ratio = discard_text(export.layer_meta(name))
            if layer_kind(export.layer_meta(name)) == ROLLOUT_KIND and ratio:
                lines.append(f"{loaded.layer_labels[name]}: discard ratio {ratio}, head average")
        if settings.head is not None:
            lines.append(f"Head {settings.head + 1} where a layer has it, else the layer's head average")
    elif settings.mode == "heads":
        lines.append(f"All heads of {layer_description(loaded, settings.layer)}")
        lines.append("Each row on its head's own vmax99 (row label); click a cell to open it")
    else:
        first, *more = _scale_lines(meta, settings.head)
        lines.append(f"{layer_description(loaded, settings.layer)} · {first}")
        lines.extend(more)
    if scale is not None:
        lines.append(f"Full colour (dark red) = probability {scale:.4g}; transparent blue = 0")
    if query is not None:
        lines.append(f"Query cell row {query[0]}, col {query[1]} (qi = {query_index(loaded, query)})")
    return lines


# ---- special tokens -----------------------------------------------------------------------------------


def share_columns(meta: dict) -> list[str]:
    """Columns of the shares table: the layer's first special token (``camera``, or ``cls`` in DINOv2
    layers), registers, patches."""
    tokens = meta.get("special_tokens") or []
    return ["frame", "source", tokens[0] if tokens else "camera", "registers", "patches", "total"]


def token_shares(
    loaded: LoadedExport, settings: Settings, query: tuple[int, int]
) -> tuple[list[list], list, str, list[str]]:
    """Where the clicked query's attention goes, per key frame: camera (or class) token, registers, patches.

    Returns
    -------
    rows : list of list
        Table rows ``[frame, source, camera, registers, patches, total]``, one per key frame of the
        layer and a final ``"all"`` row; shares are probabilities (the whole row sums to 1).
    chart : list of dict
        Long-form records ``{"frame", "token", "share"}`` for a stacked bar chart.
    note : str
        How the numbers were obtained.
    columns : list of str
        The table's columns (:func:`share_columns`: ``cls`` in place of ``camera`` for DINOv2 layers).
    """
    export = loaded.export
    layer = settings.layer
    meta = export.layer_meta(layer)
    frames = key_frames(loaded, layer)
    columns = share_columns(meta)
    first_token = columns[2]
    qi = query_index(loaded, query)
    maps = export.query_maps(layer, qi, settings.head)
    if maps.ndim == 4:  # per-head data shown as the average of heads
        maps = maps.mean(axis=0)
    patches = maps.sum(axis=(-2, -1), dtype=np.float64)  # [K]
    special = export.special_mass(layer)
    if special is None:
        first = registers = np.full(len(frames), np.nan)
        note = "This export holds no special-token mass (seed format): patches only."
    else:
        mass = np.asarray(special[qi], dtype=np.float64)  # [K, n] or [heads, K, n]
        if mass.ndim == 3:
            mass = mass.mean(axis=0) if settings.head is None else mass[settings.head]
        first, registers = mass[:, 0], mass[:, 1:].sum(axis=-1)
        note = (
            f"Special tokens: {', '.join(meta['special_tokens'])} (exact, float16). "
            f"All special tokens together: {float(mass.sum()):.4f}; all patches therefore "
            f"{1.0 - float(mass.sum()):.4f}."
        )
    if frames != list(range(loaded.num_frames)):
        note += " This layer attends within frame 0 only."
    if meta["dtype"] == "uint8":
        note += " Patch sums are of dequantized uint8 cells, clipped at vmax99: a lower bound."
    rows: list[list] = []
    chart: list[dict] = []
    for position, frame in enumerate(frames):
        values = [first[position], registers[position], patches[position]]
        total = float(np.nansum(values))
        rows.append(
            [str(frame), export.frame_sources[frame], *[_rounded(v) for v in values], round(total, 5)]
        )
        for token, value in zip((first_token, "registers", "patches"), values, strict=True):
            if not np.isnan(value):
                chart.append({"frame": f"frame {frame}", "token": token, "share": float(value)})
    first_total = None if special is None else float(first.sum())
    registers_total = None if special is None else float(registers.sum())
    patches_total = float(patches.sum())
    everything = patches_total + (first_total or 0.0) + (registers_total or 0.0)
    totals = [first_total, registers_total, patches_total, everything]
    rows.append(["all", "", *[None if v is None else round(v, 5) for v in totals]])
    return rows, chart, note, columns


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 5)


# ---- camera-token view --------------------------------------------------------------------------------


def _token_value(query: dict) -> str:
    return f"{query['token']}:{query['frame']}"


def token_choices(loaded: LoadedExport, layer: str) -> list[tuple[str, str]]:
    """Token-query dropdown choices of a layer, ``(label, value)``: ``("camera token of frame 1 ·
    view_001.png", "camera:1")``, one per row of its token maps; empty when it has none (seed)."""
    choices = []
    for query in loaded.export.layer_meta(layer)["token_queries"]:
        name = TOKEN_NAMES.get(query["token"], f"{query['token']} token")
        frame = query["frame"]
        choices.append(
            (f"{name} of frame {frame} · {loaded.export.frame_sources[frame]}", _token_value(query))
        )
    return choices


def resolve_token(loaded: LoadedExport, layer: str, choice: str | None) -> int | None:
    """Row of the layer's token maps for a dropdown value; the same token (say frame 1's camera token)
    when the layer has it, else its first token query; ``None`` when the layer has none."""
    values = [_token_value(query) for query in loaded.export.layer_meta(layer)["token_queries"]]
    if not values:
        return None
    return values.index(choice) if choice in values else 0


def token_view(loaded: LoadedExport, settings: Settings, row: int) -> Grid:
    """A special token's attention to every key frame of the layer (the camera-token view).

    Parameters
    ----------
    row : int
        Row of the layer's token maps (``layer_meta(layer)["token_queries"][row]``).
    """
    export = loaded.export
    layer = settings.layer
    meta = export.layer_meta(layer)
    query = meta["token_queries"][row]
    frames = key_frames(loaded, layer)
    normalized, scale = normalize_for_display(
        meta, export.token_maps(layer, row, settings.head), settings.head, token=True
    )
    codes = render.to_codes(normalized)
    cells = [
        Cell(
            frame,
            codes[position],
            loaded.labels[frame] + (" (the token's frame)" if frame == query["frame"] else ""),
        )
        for position, frame in enumerate(frames)
    ]
    label = {value: text for text, value in token_choices(loaded, layer)}[_token_value(query)]
    lines = [f"{label} on {layer_description(loaded, layer)}"]
    lines.extend(_scale_lines(meta, settings.head, token=True))
    lines.append(f"Full colour (dark red) = probability {scale:.4g}; transparent blue = 0")
    special = export.token_special_mass(layer)
    if special is not None:
        mass = np.asarray(special[row], dtype=np.float64)  # [K, n] or [heads, K, n]
        if mass.ndim == 3:
            mass = mass.mean(axis=0) if settings.head is None else mass[settings.head]
        lines.append(
            f"Special tokens ({', '.join(meta['special_tokens'])}) of the key frames receive "
            f"{float(mass.sum()):.4f} of this token's attention (exact); the maps show the patches"
        )
    row_label = f"{loaded.layer_labels[layer]} · {_head_text(settings.head)}"
    return Grid([Row(row_label, list(cells))], [c.caption for c in cells], scale, _full_colour(scale), lines)


def no_token_readout(loaded: LoadedExport, layer: str) -> list[str]:
    """What the camera-token view says for a layer without token queries (seed exports)."""
    return [
        layer_description(loaded, layer),
        "This layer stores no token queries (exports of the seed format have none): there is no "
        "camera-token view for it.",
    ]


# ---- reverse view -------------------------------------------------------------------------------------


def reverse_picker(loaded: LoadedExport, frame: int, cell: tuple[int, int] | None) -> Picker:
    """Frame ``frame`` to click on in the reverse view."""
    if not 0 <= frame < loaded.num_frames:
        raise ViewerError(f"frame {frame} out of range 0..{loaded.num_frames - 1}")
    return Picker(frame, cell, f"click a patch of {loaded.labels[frame]}")


def reverse_view(loaded: LoadedExport, settings: Settings, frame: int, cell: tuple[int, int]) -> Grid:
    """Which query patches send attention to key cell ``cell`` of ``frame``, as a map on frame 0.

    This is the column ``[:, (head,) frame, r, c]`` of the exported maps over the query grid,
    normalized like the forward view (stored scale for one map, own 99th percentile for an average).

    Raises
    ------
    ViewerError
        When ``frame`` is not a key frame of the layer (frame and DINOv2 layers attend within frame 0).
    """
    export = loaded.export
    layer = settings.layer
    meta = export.layer_meta(layer)
    frames = key_frames(loaded, layer)
    if frame not in frames:
        raise ViewerError(
            f"{loaded.layer_labels[layer]} holds no attention to frame {frame} (its queries attend "
            f"to frame {', '.join(map(str, frames))} only): pick frame {frames[0]} in the reverse view, "
            "or a global layer or the rollout"
        )
    column = export.key_maps(layer, frame, cell[0], cell[1], settings.head)
    if column.ndim == 3:
        column = column.mean(axis=0)
        scale = vmax99(column)
    else:
        scale = single_map_scale(meta, settings.head) or vmax99(column)
    outline = cell if frame == 0 else None
    caption = f"queries of {loaded.labels[0]} attending to frame {frame} cell ({cell[0]}, {cell[1]})"
    result = Cell(0, render.to_codes(column / np.float32(scale)), caption, outline)
    lines = [
        f"Reverse view · {layer_description(loaded, layer)} · {_head_text(settings.head)}",
        f"Key cell row {cell[0]}, col {cell[1]} of {loaded.labels[frame]}",
        f"Full colour (dark red) = probability {scale:.4g}; transparent blue = 0",
    ]
    row_label = f"{loaded.layer_labels[layer]} · {_head_text(settings.head)}"
    return Grid([Row(row_label, [result])], [caption], scale, _full_colour(scale), lines)


def reverse_in_view(loaded: LoadedExport, layer: str, frame: int) -> bool:
    """Whether the reverse view of ``frame`` exists for ``layer`` (``frame`` is one of its key frames)."""
    return frame in key_frames(loaded, layer)
