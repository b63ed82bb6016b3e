"""What the viewer computes, independent of Gradio: opened exports, per-session state and views.

Opened exports live in a small process-wide cache keyed by their resolved path (they are read-only,
so sessions may share them); everything a session chose lives in its own :class:`Session`, which the
app keeps in a ``gr.State``. Two sessions with different exports therefore never see each other's
state.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vggt.attn_format import AttnExport, FormatError, open_export
from vggt.viewer import render

AVERAGE = "Average"
_CACHE_SIZE = 4


class ViewerError(ValueError):
    """A request the viewer cannot serve (no export loaded, nothing clicked yet); one-line message."""


@dataclass(frozen=True)
class Session:
    """One browser session's choices.

    Attributes
    ----------
    export_key : str or None
        Resolved path of the opened export (key of the export cache).
    query : tuple of int or None
        Clicked query cell ``(qr, qc)`` on the query grid.
    reverse_frame : int
        Frame shown in the reverse view.
    reverse_cell : tuple of int or None
        Clicked key cell ``(r, c)`` of ``reverse_frame``.
    """

    export_key: str | None = None
    query: tuple[int, int] | None = None
    reverse_frame: int = 0
    reverse_cell: tuple[int, int] | None = None

    def with_changes(self, **changes: object) -> Session:
        return replace(self, **changes)


@dataclass(frozen=True)
class Settings:
    """The controls' values: layer, head (0-based, ``None`` = Average), opacity and composite toggles."""

    layer: str
    head: int | None
    opacity: float
    all_layers: bool = False
    all_heads: bool = False


@dataclass
class LoadedExport:
    """An opened export with everything the renderer needs precomputed once.

    Attributes
    ----------
    export : AttnExport
        The reader.
    key : str
        Cache key (resolved path as given).
    geometry : Geometry
        Grid placement in display pixels.
    frames : np.ndarray
        ``[S, Hd, Wd, 3] uint8`` frames in display pixels (decoded once).
    base_index : np.ndarray
        ``[S, H_ds, cell_h, W_ds, cell_w, 3] int32`` blend-table offsets of the frames, cut into cells.
    grid_frames : list of np.ndarray
        Each frame ``[Hd, Wd, 3] uint8`` with the grid drawn.
    labels : list of str
        ``"frame i · source"`` per frame.
    """

    export: AttnExport
    key: str
    geometry: render.Geometry
    frames: np.ndarray
    base_index: np.ndarray
    grid_frames: list[np.ndarray]
    labels: list[str]

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def per_head(self) -> bool:
        return bool(self.export.layer_meta(self.export.layer_names[0])["per_head_data"])

    @property
    def num_heads(self) -> int:
        return int(self.export.layer_meta(self.export.layer_names[0])["num_heads"] or 0)


def load_export(path: str) -> LoadedExport:
    """Open and validate an export and precompute its display frames.

    Raises
    ------
    FormatError
        For anything unreadable; see :func:`vggt.attn_format.open_export`.
    """
    export = open_export(path)
    export.validate()
    first = export.layer_meta(export.layer_names[0])
    height, width = export.image_size
    geometry = render.Geometry(
        height=height,
        width=width,
        H_ds=first["H_ds"],
        W_ds=first["W_ds"],
        stride_h=first["stride_h"],
        stride_w=first["stride_w"],
        patch_size=first["patch_size"],
        scale=render.display_scale(height, width),
    )
    for name in export.layer_names[1:]:
        meta = export.layer_meta(name)
        if (meta["H_ds"], meta["W_ds"], meta["S"]) != (first["H_ds"], first["W_ds"], first["S"]):
            raise FormatError(
                f"layer {name} has a different grid or frame count than {export.layer_names[0]}"
            )
    frames = render.upscale(np.stack(export.frames()), geometry.scale)
    return LoadedExport(
        export=export,
        key=str(path),
        geometry=geometry,
        frames=frames,
        base_index=render.base_indices(frames, geometry),
        grid_frames=[render.draw_grid(frame, geometry) for frame in frames],
        labels=render.frame_labels(frames.shape[0], export.frame_sources),
    )


class ExportCache:
    """Process-wide LRU cache of opened exports, keyed by resolved path; thread-safe."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[str, LoadedExport] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key_for(path: str) -> str:
        text = path.strip().strip('"').strip("'")
        if not text:
            raise ViewerError("enter the path of an export (folder, attn_maps/, a JSON file or a .zip)")
        return str(Path(text).expanduser().resolve())

    def open(self, path: str, reload: bool = False) -> LoadedExport:
        """Open ``path`` (or reuse it when already open and unchanged on request)."""
        key = self.key_for(path)
        with self._lock:
            if not reload and key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        loaded = load_export(key)
        with self._lock:
            self._entries[key] = loaded
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return loaded

    def get(self, key: str | None) -> LoadedExport:
        """The export a session opened (reopened if the cache evicted it)."""
        if key is None:
            raise ViewerError("load an export first")
        with self._lock:
            loaded = self._entries.get(key)
            if loaded is not None:
                self._entries.move_to_end(key)
                return loaded
        return self.open(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


CACHE = ExportCache()


# ---- controls -----------------------------------------------------------------------------------------


def head_choices(loaded: LoadedExport) -> list[str]:
    """``["Average", "Head 1", ..., "Head H"]`` (just ``["Average"]`` without per-head data)."""
    if not loaded.per_head:
        return [AVERAGE]
    return [AVERAGE] + [f"Head {index + 1}" for index in range(loaded.num_heads)]


def parse_head(choice: str | None, loaded: LoadedExport) -> int | None:
    """0-based head of a head-dropdown choice; ``None`` for Average."""
    if choice in (None, "", AVERAGE):
        return None
    try:
        head = int(str(choice).removeprefix("Head").strip()) - 1
    except ValueError:
        raise ViewerError(f"unknown head choice {choice!r}") from None
    if not loaded.per_head:
        raise ViewerError("this export has head-averaged maps only")
    if not 0 <= head < loaded.num_heads:
        raise ViewerError(f"head {head + 1} out of range 1..{loaded.num_heads}")
    return head


def check_layer(loaded: LoadedExport, layer: str | None) -> str:
    if layer not in loaded.export.layer_names:
        raise ViewerError(f"unknown layer {layer!r}")
    return layer


def _fallback_scale(values: np.ndarray) -> float:
    scale = float(np.percentile(values, 99.0)) if values.size else 0.0
    return scale if scale > 0 else float(values.max(initial=0.0)) or 1.0


def display_maps(loaded: LoadedExport, layer: str, qi: int, head: int | None) -> tuple[np.ndarray, float]:
    """One query's maps normalized for display, and the value shown as full colour.

    Per-head data shown as Average: each head dequantized with its own vmax99, averaged in raw scale,
    then renormalized by the average's own 99th percentile. A single map (averaged export or chosen
    head) is shown on its stored scale (its vmax99; ``layer_vmax99`` for raw float16).

    Returns
    -------
    normalized : np.ndarray
        ``[S, H_ds, W_ds]`` float32 (values above 1 are clipped when coloured).
    scale : float
        Probability drawn at full colour.
    """
    export = loaded.export
    meta = export.layer_meta(layer)
    if meta["per_head_data"] and head is None:
        raw = export.query_maps(layer, qi).mean(axis=0)
        scale = _fallback_scale(raw)
    else:
        raw = export.query_maps(layer, qi, head)
        scale = single_map_scale(meta, head)
        if scale is None:
            scale = _fallback_scale(raw)
    return raw / np.float32(scale), scale


def single_map_scale(meta: dict, head: int | None) -> float | None:
    """The stored scale of one map: the head's vmax99, or the layer's (``None`` if not recorded)."""
    if meta["normalized_by"] == "head" and head is not None:
        return float(meta["per_head_vmax99"][head])
    value = meta.get("layer_vmax99")
    return float(value) if value else None


# ---- images -------------------------------------------------------------------------------------------


def query_image(loaded: LoadedExport, query: tuple[int, int] | None) -> np.ndarray:
    """Frame 0 with the query grid, and the clicked cell highlighted: ``[Hd, Wd, 3] uint8``."""
    image = loaded.grid_frames[0]
    if query is None:
        return image
    return render.highlight_cell(image, loaded.geometry, *query)


def query_overlays(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> tuple[list, float]:
    """One overlay per frame for the clicked query.

    Returns
    -------
    gallery : list of (np.ndarray, str)
        ``S`` labelled overlays (the query cell outlined on frame 0) with captions.
    scale : float
        Probability drawn at full colour.
    """
    qi = query[0] * loaded.geometry.W_ds + query[1]
    normalized, scale = display_maps(loaded, settings.layer, qi, settings.head)
    frames = render.overlay(loaded.base_index, render.to_codes(normalized), loaded.geometry, settings.opacity)
    render.outline_cell(frames[0], loaded.geometry, *query, color=(255, 255, 255))
    size = render.label_size(frames.shape[2])
    for frame, label in zip(frames, loaded.labels, strict=True):
        render.stamp_text(frame, label, 6, 4, size)
    gallery = [(frame, label) for frame, label in zip(frames, loaded.labels, strict=True)]
    return gallery, scale


def all_layers_strips(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> list:
    """One vertical strip per layer (title, then every frame) for the clicked query."""
    qi = query[0] * loaded.geometry.W_ds + query[1]
    strips = []
    geometry = loaded.geometry
    for layer in loaded.export.layer_names:
        normalized, scale = display_maps(loaded, layer, qi, settings.head)
        strip = render.new_strip(loaded.num_frames, geometry.display_height, geometry.display_width)
        frames = render.strip_frames(strip, loaded.num_frames)
        render.overlay(loaded.base_index, render.to_codes(normalized), geometry, settings.opacity, out=frames)
        render.outline_cell(frames[0], geometry, *query, color=(255, 255, 255))
        title = f"{layer}  (full colour = {scale:.4g})"
        strips.append((render.finish_strip(strip, title, loaded.labels), title))
    return strips


def all_heads_strips(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> list:
    """One vertical strip per head of the current layer, its vmax99 in the title."""
    export = loaded.export
    meta = export.layer_meta(settings.layer)
    qi = query[0] * loaded.geometry.W_ds + query[1]
    heads = export.query_maps(settings.layer, qi)  # [heads, S, H_ds, W_ds]
    geometry = loaded.geometry
    strips = []
    for head in range(heads.shape[0]):
        scale = single_map_scale(meta, head) or _fallback_scale(heads[head])
        strip = render.new_strip(loaded.num_frames, geometry.display_height, geometry.display_width)
        frames = render.strip_frames(strip, loaded.num_frames)
        codes = render.to_codes(heads[head] / np.float32(scale))
        render.overlay(loaded.base_index, codes, geometry, settings.opacity, out=frames)
        render.outline_cell(frames[0], geometry, *query, color=(255, 255, 255))
        title = f"Head {head + 1}  (vmax99 {scale:.4g})"
        strips.append((render.finish_strip(strip, title, loaded.labels), title))
    return strips


def gallery_for(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> tuple[list, str]:
    """The gallery for the current settings and the readout describing what is shown."""
    notes = []
    if settings.all_layers:
        gallery = all_layers_strips(loaded, settings, query)
        scale = None
        if settings.all_heads:
            notes.append("All layers shown; uncheck it to see all heads.")
    elif settings.all_heads and loaded.per_head:
        gallery = all_heads_strips(loaded, settings, query)
        scale = None
    else:
        if settings.all_heads:
            notes.append("No per-head data in this export: showing the head average.")
        gallery, scale = query_overlays(loaded, settings, query)
    return gallery, value_readout(loaded, settings, query, scale, notes)


def value_readout(
    loaded: LoadedExport,
    settings: Settings,
    query: tuple[int, int] | None,
    scale: float | None,
    notes: list[str] | None = None,
) -> str:
    """Markdown describing the value range in view."""
    meta = loaded.export.layer_meta(settings.layer)
    lines = []
    layer_vmax = meta.get("layer_vmax99")
    layer_text = f"{layer_vmax:.4g}" if layer_vmax else "not recorded"
    if meta["normalized_by"] == "none":
        lines.append(f"**{settings.layer}** · raw float16 probabilities · layer vmax99 = **{layer_text}**")
    else:
        lines.append(f"**{settings.layer}** · layer vmax99 = **{layer_text}**")
    if meta["per_head_data"]:
        head_vmax = meta.get("per_head_vmax99")
        if settings.head is not None:
            own = f"{head_vmax[settings.head]:.4g}" if head_vmax else layer_text
            lines.append(f"Head {settings.head + 1} vmax99 = **{own}**")
        elif head_vmax:
            lines.append(
                f"Average of {meta['num_heads']} heads · head vmax99 range **{min(head_vmax):.4g} – "
                f"{max(head_vmax):.4g}** · the average is renormalized by its own 99th percentile"
            )
        else:
            lines.append(f"Average of {meta['num_heads']} heads, renormalized by its own 99th percentile")
    if scale is not None:
        lines.append(f"Full colour (dark red) = probability **{scale:.4g}**; transparent blue = 0")
    if query is not None:
        qi = query[0] * loaded.geometry.W_ds + query[1]
        lines.append(f"Query cell row {query[0]}, col {query[1]} (qi = {qi})")
    lines.extend(notes or [])
    return "  \n".join(lines)


# ---- special tokens -----------------------------------------------------------------------------------

SHARE_COLUMNS = ["frame", "source", "camera", "registers", "patches", "total"]


def token_shares(
    loaded: LoadedExport, settings: Settings, query: tuple[int, int]
) -> tuple[list[list], list, str]:
    """Where the clicked query's attention goes, per frame: camera, registers, patches.

    Returns
    -------
    rows : list of list
        Table rows ``[frame, source, camera, registers, patches, total]``, one per frame and a final
        ``"all"`` row; shares are probabilities (the whole row sums to 1).
    chart : list of dict
        Long-form records ``{"frame", "token", "share"}`` for a stacked bar chart.
    note : str
        How the numbers were obtained.
    """
    export = loaded.export
    layer = settings.layer
    meta = export.layer_meta(layer)
    qi = query[0] * loaded.geometry.W_ds + query[1]
    maps = export.query_maps(layer, qi, settings.head)
    if maps.ndim == 4:  # per-head data shown as the average of heads
        maps = maps.mean(axis=0)
    patches = maps.sum(axis=(-2, -1), dtype=np.float64)  # [S]
    special = export.special_mass(layer)
    if special is None:
        camera = registers = np.full(loaded.num_frames, np.nan)
        note = "This export holds no special-token mass (seed format): patches only."
    else:
        mass = np.asarray(special[qi], dtype=np.float64)  # [S, n] or [heads, S, n]
        if mass.ndim == 3:
            mass = mass.mean(axis=0) if settings.head is None else mass[settings.head]
        camera, registers = mass[:, 0], mass[:, 1:].sum(axis=-1)
        note = (
            f"Special tokens: {', '.join(meta['special_tokens'])} (exact, float16). "
            f"All special tokens together: {float(mass.sum()):.4f}; all patches therefore "
            f"{1.0 - float(mass.sum()):.4f}."
        )
    if meta["dtype"] == "uint8":
        note += " Patch sums are of dequantized uint8 cells, clipped at vmax99: a lower bound."
    rows: list[list] = []
    chart: list[dict] = []
    for frame in range(loaded.num_frames):
        values = [camera[frame], registers[frame], patches[frame]]
        total = float(np.nansum(values))
        rows.append(
            [str(frame), export.frame_sources[frame], *[_rounded(v) for v in values], round(total, 5)]
        )
        for token, value in zip(("camera", "registers", "patches"), values, strict=True):
            if not np.isnan(value):
                chart.append({"frame": f"frame {frame}", "token": token, "share": float(value)})
    camera_total = None if special is None else float(camera.sum())
    registers_total = None if special is None else float(registers.sum())
    patches_total = float(patches.sum())
    everything = patches_total + (camera_total or 0.0) + (registers_total or 0.0)
    totals = [camera_total, registers_total, patches_total, everything]
    rows.append(["all", "", *[None if v is None else round(v, 5) for v in totals]])
    return rows, chart, note


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 5)


# ---- reverse view -------------------------------------------------------------------------------------


def reverse_source_image(loaded: LoadedExport, frame: int, cell: tuple[int, int] | None) -> np.ndarray:
    """Frame ``frame`` with the grid and the clicked key cell highlighted: ``[Hd, Wd, 3] uint8``."""
    if not 0 <= frame < loaded.num_frames:
        raise ViewerError(f"frame {frame} out of range 0..{loaded.num_frames - 1}")
    image = loaded.grid_frames[frame]
    return image if cell is None else render.highlight_cell(image, loaded.geometry, *cell)


def reverse_overlay(
    loaded: LoadedExport, settings: Settings, frame: int, cell: tuple[int, int]
) -> np.ndarray:
    """Which query patches send attention to key cell ``cell`` of ``frame``, drawn on frame 0.

    This is the column ``[:, (head,) frame, r, c]`` of the exported maps over the query grid,
    normalized like the forward view (stored scale for one map, own 99th percentile for an average).
    """
    export = loaded.export
    meta = export.layer_meta(settings.layer)
    column = export.key_maps(settings.layer, frame, cell[0], cell[1], settings.head)
    if column.ndim == 3:
        column = column.mean(axis=0)
        scale = _fallback_scale(column)
    else:
        scale = single_map_scale(meta, settings.head) or _fallback_scale(column)
    codes = render.to_codes(column / np.float32(scale))[None]
    image = render.overlay(loaded.base_index[:1], codes, loaded.geometry, settings.opacity)[0]
    if frame == 0:
        render.outline_cell(image, loaded.geometry, *cell, color=(255, 255, 255))
    return render.labelled(
        image, f"queries attending to frame {frame} cell ({cell[0]}, {cell[1]}) · full colour {scale:.3g}"
    )
