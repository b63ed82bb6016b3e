"""What the viewer shows, computed from an opened export and a session's settings, independent of
Gradio: display scales, overlay galleries and composites, value readouts, special-token shares, the
camera-token view and the reverse view.

Every view draws one overlay per key frame of the layer in view: every frame for global layers and the
rollout, frame 0 alone for frame and DINOv2 layers.
"""

from __future__ import annotations

import numpy as np

from vggt.attn_format.quantization import vmax99
from vggt.viewer import render
from vggt.viewer.state import (
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
    """Maps from the reader normalized for display, and the value shown as full colour.

    Per-head data shown as Average (``raw`` with a heads axis): each head was dequantized with its own
    vmax99; they are averaged in raw scale, then renormalized by the average's own 99th percentile. A
    single map (averaged data or a chosen head) is shown on its stored scale (its vmax99; the layer's
    for raw float16).

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
    """One query's maps normalized for display (see :func:`normalize_for_display`).

    Returns
    -------
    normalized : np.ndarray
        ``[K, H_ds, W_ds]`` float32 over the layer's key frames.
    scale : float
        Probability drawn at full colour.
    """
    meta = loaded.export.layer_meta(layer)
    return normalize_for_display(meta, loaded.export.query_maps(layer, qi, head), head)


def _head_for(loaded: LoadedExport, layer: str, head: int | None) -> int | None:
    """``head`` where ``layer`` has it, else ``None`` (its average): for views over several layers."""
    return head if head is not None and head < layer_heads(loaded, layer) else None


# ---- images -------------------------------------------------------------------------------------------


def query_image(loaded: LoadedExport, query: tuple[int, int] | None) -> np.ndarray:
    """Frame 0 with the query grid, and the clicked cell highlighted: ``[Hd, Wd, 3] uint8``."""
    image = loaded.grid_frames[0]
    if query is None:
        return image
    return render.highlight_cell(image, loaded.geometry, *query)


def _frame_blocks(loaded: LoadedExport, frames: list[int]) -> np.ndarray:
    """Blend-table offsets ``[K, H_ds, cell_h, W_ds, cell_w, 3]`` of the given frames (a view where
    they are consecutive, as all frames or frame 0 alone are)."""
    first = frames[0] if frames else 0
    if frames == list(range(first, first + len(frames))):
        return loaded.base_index[first : first + len(frames)]
    return loaded.base_index[frames]


def _draw_maps(
    loaded: LoadedExport,
    normalized: np.ndarray,
    frames: list[int],
    opacity: float,
    query: tuple[int, int] | None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Overlays ``[K, Hd, Wd, 3] uint8`` of normalized maps on their key frames; the query cell is
    outlined on frame 0 when given."""
    images = render.overlay(
        _frame_blocks(loaded, frames), render.to_codes(normalized), loaded.geometry, opacity, out=out
    )
    if query is not None and 0 in frames:
        render.outline_cell(images[frames.index(0)], loaded.geometry, *query, color=(255, 255, 255))
    return images


def _labelled_gallery(loaded: LoadedExport, images: np.ndarray, captions: list[str]) -> list:
    size = render.label_size(images.shape[2])
    for image, caption in zip(images, captions, strict=True):
        render.stamp_text(image, caption, 6, 4, size)
    return [(image, caption) for image, caption in zip(images, captions, strict=True)]


def query_overlays(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> tuple[list, float]:
    """One overlay per key frame of the layer for the clicked query.

    Returns
    -------
    gallery : list of (np.ndarray, str)
        ``K`` labelled overlays ``[Hd, Wd, 3] uint8`` (the query cell outlined on frame 0) with captions
        ``"frame i · source"``; ``K = S`` for global layers and the rollout, 1 (frame 0) for frame and
        DINOv2 layers.
    scale : float
        Probability drawn at full colour.
    """
    qi = query[0] * loaded.geometry.W_ds + query[1]
    frames = key_frames(loaded, settings.layer)
    normalized, scale = display_maps(loaded, settings.layer, qi, settings.head)
    images = _draw_maps(loaded, normalized, frames, settings.opacity, query)
    return _labelled_gallery(loaded, images, [loaded.labels[f] for f in frames]), scale


def _strip(
    loaded: LoadedExport,
    normalized: np.ndarray,
    frames: list[int],
    settings: Settings,
    query: tuple[int, int],
    title: str,
) -> tuple[np.ndarray, str]:
    """A vertical strip ``[TITLE_HEIGHT + K * Hd, Wd, 3] uint8``: title, then one overlay per key frame."""
    geometry = loaded.geometry
    strip = render.new_strip(len(frames), geometry.display_height, geometry.display_width)
    _draw_maps(
        loaded, normalized, frames, settings.opacity, query, out=render.strip_frames(strip, len(frames))
    )
    return render.finish_strip(strip, title, [loaded.labels[f] for f in frames]), title


def all_layers_strips(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> list:
    """One vertical strip per layer of every kind, manifest order, for the clicked query.

    Each strip is titled with the layer's label and its full-colour value and holds the layer's key
    frames (frame 0 alone for frame and DINOv2 layers). The chosen head is shown where a layer has it;
    layers without it (the rollout) show their average, which the title says.
    """
    qi = query[0] * loaded.geometry.W_ds + query[1]
    strips = []
    for layer in loaded.export.layer_names:
        head = _head_for(loaded, layer, settings.head)
        normalized, scale = display_maps(loaded, layer, qi, head)
        average = " · average" if settings.head is not None and head is None else ""
        title = f"{loaded.layer_labels[layer]}{average}  (full colour = {scale:.4g})"
        strips.append(_strip(loaded, normalized, key_frames(loaded, layer), settings, query, title))
    return strips


def all_heads_strips(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> list:
    """One vertical strip per head of the current layer (its key frames), the head's vmax99 in the title."""
    export = loaded.export
    meta = export.layer_meta(settings.layer)
    qi = query[0] * loaded.geometry.W_ds + query[1]
    heads = export.query_maps(settings.layer, qi)  # [heads, K, H_ds, W_ds]
    frames = key_frames(loaded, settings.layer)
    strips = []
    for head in range(heads.shape[0]):
        scale = single_map_scale(meta, head) or vmax99(heads[head])
        title = f"Head {head + 1}  (vmax99 {scale:.4g})"
        strips.append(_strip(loaded, heads[head] / np.float32(scale), frames, settings, query, title))
    return strips


def gallery_for(loaded: LoadedExport, settings: Settings, query: tuple[int, int]) -> tuple[list, str]:
    """The gallery for the current settings and the readout describing what is shown."""
    notes = []
    if settings.all_layers:
        gallery = all_layers_strips(loaded, settings, query)
        scale = None
        if settings.all_heads:
            notes.append("All layers shown; uncheck it to see all heads.")
    elif settings.all_heads and layer_heads(loaded, settings.layer):
        gallery = all_heads_strips(loaded, settings, query)
        scale = None
    else:
        if settings.all_heads:
            notes.append("No per-head data in this layer: showing the head average.")
        gallery, scale = query_overlays(loaded, settings, query)
    return gallery, value_readout(loaded, settings, query, scale, notes)


# ---- readouts -----------------------------------------------------------------------------------------


def _scale_lines(meta: dict, head: int | None, token: bool = False) -> list[str]:
    """The stored scales in view: the layer's (or token queries') vmax99, a head's, or the heads' range."""
    prefix, what = ("token_", "token vmax99") if token else ("", "vmax99")
    layer_vmax = meta.get("token_vmax99" if token else "layer_vmax99")
    layer_text = f"{layer_vmax:.4g}" if layer_vmax else "not recorded"
    raw = "raw float16 probabilities · " if meta["normalized_by"] == "none" else ""
    lines = [f"{raw}layer {what} = **{layer_text}**"]
    if meta["per_head_data"]:
        head_vmax = meta.get(f"{prefix}per_head_vmax99")
        if head is not None:
            own = f"{head_vmax[head]:.4g}" if head_vmax else layer_text
            lines.append(f"Head {head + 1} {what} = **{own}**")
        elif head_vmax:
            lines.append(
                f"Average of {meta['num_heads']} heads · head {what} range **{min(head_vmax):.4g} – "
                f"{max(head_vmax):.4g}** · the average is renormalized by its own 99th percentile"
            )
        else:
            lines.append(f"Average of {meta['num_heads']} heads, renormalized by its own 99th percentile")
    return lines


def value_readout(
    loaded: LoadedExport,
    settings: Settings,
    query: tuple[int, int] | None,
    scale: float | None,
    notes: list[str] | None = None,
) -> str:
    """Markdown describing what is in view: the layer (label, kind; the rollout's discard ratio) or the
    all-layers composite, and the value range."""
    export = loaded.export
    meta = export.layer_meta(settings.layer)
    lines = []
    if settings.all_layers:
        names = export.layer_names
        lines.append(
            f"**All layers** · {kinds_summary(loaded)} · one strip per layer, each drawn at its own "
            "full-colour value (in its title)"
        )
        if any(key_frames(loaded, name) != list(range(loaded.num_frames)) for name in names):
            lines.append("Frame and DINOv2 layers attend within a frame: their strips hold frame 0 only")
        for name in names:
            ratio = discard_text(export.layer_meta(name))
            if layer_kind(export.layer_meta(name)) == "rollout" and ratio:
                lines.append(f"{loaded.layer_labels[name]}: discard ratio **{ratio}**, head average")
        if settings.head is not None:
            lines.append(f"Head {settings.head + 1} where a layer has it, else the layer's head average")
    else:
        first, *more = _scale_lines(meta, settings.head)
        lines.append(f"{layer_description(loaded, settings.layer)} · {first}")
        lines.extend(more)
    if scale is not None:
        lines.append(f"Full colour (dark red) = probability **{scale:.4g}**; transparent blue = 0")
    if query is not None:
        qi = query[0] * loaded.geometry.W_ds + query[1]
        lines.append(f"Query cell row {query[0]}, col {query[1]} (qi = {qi})")
    lines.extend(notes or [])
    return "  \n".join(lines)


# ---- special tokens -----------------------------------------------------------------------------------

SHARE_COLUMNS = ["frame", "source", "camera", "registers", "patches", "total"]


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
    qi = query[0] * loaded.geometry.W_ds + query[1]
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


def token_view(loaded: LoadedExport, settings: Settings, row: int) -> tuple[list, str]:
    """A special token's attention to every key frame of the layer (the camera-token view).

    Parameters
    ----------
    row : int
        Row of the layer's token maps (``layer_meta(layer)["token_queries"][row]``).

    Returns
    -------
    gallery : list of (np.ndarray, str)
        One labelled overlay ``[Hd, Wd, 3] uint8`` per key frame, at the current head and opacity.
    readout : str
        Markdown: the token, the layer, the scales and the full-colour value.
    """
    export = loaded.export
    layer = settings.layer
    meta = export.layer_meta(layer)
    query = meta["token_queries"][row]
    frames = key_frames(loaded, layer)
    normalized, scale = normalize_for_display(
        meta, export.token_maps(layer, row, settings.head), settings.head, token=True
    )
    images = _draw_maps(loaded, normalized, frames, settings.opacity, None)
    captions = [loaded.labels[f] + (" (the token's frame)" if f == query["frame"] else "") for f in frames]
    gallery = _labelled_gallery(loaded, images, captions)

    label = {value: text for text, value in token_choices(loaded, layer)}[_token_value(query)]
    lines = [f"**{label}** on {layer_description(loaded, layer)}"]
    lines.extend(_scale_lines(meta, settings.head, token=True))
    lines.append(f"Full colour (dark red) = probability **{scale:.4g}**; transparent blue = 0")
    special = export.token_special_mass(layer)
    if special is not None:
        mass = np.asarray(special[row], dtype=np.float64)  # [K, n] or [heads, K, n]
        if mass.ndim == 3:
            mass = mass.mean(axis=0) if settings.head is None else mass[settings.head]
        lines.append(
            f"Special tokens ({', '.join(meta['special_tokens'])}) of the key frames receive "
            f"**{float(mass.sum()):.4f}** of this token's attention (exact); the maps show the patches"
        )
    return gallery, "  \n".join(lines)


def no_token_readout(loaded: LoadedExport, layer: str) -> str:
    """What the camera-token view says for a layer without token queries (seed exports)."""
    return (
        f"{layer_description(loaded, layer)}  \nThis layer stores no token queries (exports of the seed "
        "format have none): there is no camera-token view for it."
    )


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

    Raises
    ------
    ViewerError
        When ``frame`` is not a key frame of the layer (frame and DINOv2 layers attend within frame 0).
    """
    export = loaded.export
    meta = export.layer_meta(settings.layer)
    frames = key_frames(loaded, settings.layer)
    if frame not in frames:
        raise ViewerError(
            f"{loaded.layer_labels[settings.layer]} holds no attention to frame {frame} (its queries attend "
            f"to frame {', '.join(map(str, frames))} only): pick frame {frames[0]} in the reverse view, "
            "or a global layer or the rollout"
        )
    column = export.key_maps(settings.layer, frame, cell[0], cell[1], settings.head)
    if column.ndim == 3:
        column = column.mean(axis=0)
        scale = vmax99(column)
    else:
        scale = single_map_scale(meta, settings.head) or vmax99(column)
    codes = render.to_codes(column / np.float32(scale))[None]
    image = render.overlay(loaded.base_index[:1], codes, loaded.geometry, settings.opacity)[0]
    if frame == 0:
        render.outline_cell(image, loaded.geometry, *cell, color=(255, 255, 255))
    return render.labelled(
        image, f"queries attending to frame {frame} cell ({cell[0]}, {cell[1]}) · full colour {scale:.3g}"
    )


def reverse_in_view(loaded: LoadedExport, layer: str, frame: int) -> bool:
    """Whether the reverse view of ``frame`` exists for ``layer`` (``frame`` is one of its key frames)."""
    return frame in key_frames(loaded, layer)
