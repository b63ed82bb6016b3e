"""What a viewer session has open and has chosen, independent of Gradio: opened exports, sessions,
settings, and the layers and heads an export offers (what is drawn from them: :mod:`vggt.viewer.views`).

Opened exports live in a small process-wide cache keyed by their resolved path (they are read-only,
so sessions may share them); everything a session chose lives in its own :class:`Session`, which the
app keeps in a ``gr.State``. Two sessions with different exports therefore never see each other's
state.

An export holds layers of several kinds (``global``, ``frame``, ``dino`` and the ``rollout``; see
``attn_maps_schema.md``); a layer's maps run over its key frames only.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from vggt.attn_format import AttnExport, FormatError, open_export
from vggt.attn_format.schema import ROLLOUT_KIND
from vggt.viewer import render
from vggt.viewer.serving import Located, PathRefused, PathRule
from vggt.wording import plural

AVERAGE = "Average"
_CACHE_SIZE = 4
_TYPED_SIZE = 1024

# Layer kinds as the dropdown names them, in the order an export lists them.
KIND_TITLES = {"global": "Global", "frame": "Frame", "dino": "DINOv2", "rollout": "Rollout"}
KIND_DESCRIPTIONS = {
    "global": "global attention (over the tokens of all frames)",
    "frame": "frame attention (within frame 0 only)",
    "dino": "DINOv2 patch-embedding attention (within frame 0 only)",
}
TOKEN_NAMES = {"camera": "camera token", "cls": "class token"}


class ViewerError(ValueError):
    """A request the viewer cannot serve (no export loaded, nothing clicked yet); one-line message."""


@dataclass(frozen=True)
class Settings:
    """What the view shows: layer, head (0-based, ``None`` = Average), opacity, the view mode and the
    frame of the layers x heads view."""

    layer: str
    head: int | None
    opacity: float = 0.6
    mode: str = "frames"
    frame: int = 0


@dataclass(frozen=True)
class Session:
    """One browser session's choices.

    Attributes
    ----------
    export_key : str or None
        Resolved path of the opened export (key of the export cache).
    view : Settings or None
        What the main view shows (layer, head, mode, frame): the server's record, which every handler
        reads; the page's controls show it.
    query : tuple of int or None
        Clicked query cell ``(qr, qc)`` on the query grid.
    reverse_frame : int
        Frame shown in the reverse view.
    reverse_cell : tuple of int or None
        Clicked key cell ``(r, c)`` of ``reverse_frame``.
    frames_token : str or None
        The frames the page holds (:attr:`LoadedExport.token`): a view of other frames sends them.
    """

    export_key: str | None = None
    view: Settings | None = None
    query: tuple[int, int] | None = None
    reverse_frame: int = 0
    reverse_cell: tuple[int, int] | None = None
    frames_token: str | None = None

    def with_changes(self, **changes: object) -> Session:
        return replace(self, **changes)


class SessionBox:
    """A page's ``gr.State``: its :class:`Session`, replaced under a lock.

    The viewer answers without Gradio's queue, so a page's requests may run at once (a click while a
    layer change is on its way); each handler takes the box's lock, reads the session, and leaves the
    one it returns, so that they apply one after the other and none is lost.
    """

    def __init__(self, session: Session | None = None) -> None:
        self.session = session or Session()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> SessionBox:  # Gradio copies a State's initial value per page
        return SessionBox(self.session)


@dataclass
class LoadedExport:
    """An opened export with what the views need precomputed once.

    Attributes
    ----------
    export : AttnExport
        The reader.
    key : str
        Cache key (resolved path as given).
    geometry : Geometry
        Grid placement in frame pixels.
    frames : np.ndarray
        ``[S, H, W, 3] uint8`` frames as the model saw them (decoded once).
    labels : list of str
        ``"frame i · source"`` per frame.
    layer_labels : dict of str to str
        Display label of each layer (``"Global 24"``, ``"Rollout (discard 0.9)"``), manifest order.
    token : str
        A digest of the frames: the name under which the page keeps them (no path reaches the browser).
    """

    export: AttnExport
    key: str
    geometry: render.Geometry
    frames: np.ndarray
    labels: list[str]
    layer_labels: dict[str, str]
    token: str = ""
    _frame_images: list[str] | None = field(default=None, repr=False)

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    def frame_images(self) -> list[str]:
        """The frames as PNG data URLs, for the browser (encoded once, on all cores: zlib releases the
        GIL)."""
        if self._frame_images is None:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                self._frame_images = list(pool.map(render.png_data_url, self.frames))
        return self._frame_images


def load_export(path: str) -> LoadedExport:
    """Open and validate an export and decode its frames.

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
        scale=1,
    )
    for name in export.layer_names[1:]:
        meta = export.layer_meta(name)
        if (meta["H_ds"], meta["W_ds"], meta["S"]) != (first["H_ds"], first["W_ds"], first["S"]):
            raise FormatError(
                f"layer {name} has a different grid or frame count than {export.layer_names[0]}"
            )
    frames = np.stack(export.frames())
    digest = hashlib.sha1(frames.tobytes(), usedforsecurity=False)
    digest.update(repr(geometry).encode())
    return LoadedExport(
        token=digest.hexdigest()[:20],
        export=export,
        key=str(path),
        geometry=geometry,
        frames=frames,
        labels=render.frame_labels(frames.shape[0], export.frame_sources),
        layer_labels={name: layer_label(name, export.layer_meta(name)) for name in export.layer_names},
    )


class ExportCache:
    """Process-wide LRU cache of opened exports, keyed by resolved path; thread-safe."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[str, LoadedExport] = OrderedDict()
        self._typed: OrderedDict[str, str] = OrderedDict()  # key -> the path as the user typed it
        self._holders: dict[str, int] = {}  # key -> sessions that have it open
        self._lock = threading.Lock()
        self.rule = PathRule()

    def serve(self, rule: PathRule) -> None:
        """Open only what ``rule`` allows from now on (``--root``); forgets what was open."""
        with self._lock:
            self.rule = rule
            self._entries.clear()
            self._typed.clear()

    def _locate(self, path: str) -> Located:
        try:
            return self.rule.locate(path)
        except PathRefused as exc:
            raise ViewerError(str(exc)) from None

    def key_for(self, path: str) -> str:
        return self._locate(path).key

    def open(self, path: str, reload: bool = False) -> LoadedExport:
        """Open ``path`` as typed (or reuse it when already open and unchanged on request); messages
        quote it as typed."""
        located = self._locate(path)
        key = located.key
        with self._lock:
            if not reload and key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        try:
            loaded = load_export(located.path)
        except FormatError as exc:
            raise FormatError(self.rule.quote_typed(str(exc), located)) from None
        with self._lock:
            self._entries[key] = loaded
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
            self._typed[key] = located.typed  # kept after eviction: a session reopens it as typed
            self._typed.move_to_end(key)
            while len(self._typed) > _TYPED_SIZE:
                self._typed.popitem(last=False)
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
            typed = self._typed.get(key, key)
        return self.open(typed)

    def hold(self, key: str, previous: str | None = None) -> None:
        """A session now has ``key`` open, and no longer ``previous`` (see :meth:`release`)."""
        with self._lock:
            self._holders[key] = self._holders.get(key, 0) + 1
        if previous is not None:
            self.release(previous)

    def release(self, key: str | None) -> None:
        """A session let go of ``key`` (it opened another export, or it ended): once no session holds an
        export, it is forgotten, and its files (a zip's extraction) are let go of once in-flight requests
        are done with it."""
        if key is None:
            return
        with self._lock:
            count = self._holders.get(key, 0) - 1
            if count > 0:
                self._holders[key] = count
                return
            self._holders.pop(key, None)
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._typed.clear()
            self._holders.clear()


CACHE = ExportCache()


# ---- layers and their kinds ---------------------------------------------------------------------------


def layer_kind(meta: dict) -> str:
    """``"global"``, ``"frame"``, ``"dino"`` or ``"rollout"`` (seed layers are global)."""
    return str(meta.get("layer_kind") or "global")


def discard_text(meta: dict) -> str | None:
    """The rollout's discard ratio as shown (``"0.9"``); ``None`` for other layers or when unrecorded."""
    ratio = meta.get("rollout_discard_ratio")
    return None if ratio is None else f"{float(ratio):g}"


def layer_label(name: str, meta: dict) -> str:
    """Display label of a layer: its kind and number (``"Global 24"``, ``"Frame 03"``, ``"DINOv2 05"``,
    the number as in its name), or ``"Rollout (discard 0.9)"``; the name itself for unknown kinds."""
    kind = layer_kind(meta)
    if kind == ROLLOUT_KIND:
        ratio = discard_text(meta)
        return "Rollout" if ratio is None else f"Rollout (discard {ratio})"
    number = meta.get("layer_index")
    if not isinstance(number, int):
        match = re.search(r"(\d+)$", name)
        number = int(match.group(1)) if match else None
    title = KIND_TITLES.get(kind)
    return name if title is None or number is None else f"{title} {number:02d}"


def layer_choices(loaded: LoadedExport) -> list[tuple[str, str]]:
    """Layer dropdown choices ``(label, name)`` in manifest order (by kind, then number)."""
    return [(label, name) for name, label in loaded.layer_labels.items()]


def default_layer(loaded: LoadedExport) -> str:
    """The layer shown first: the last global layer, or the last layer when there is none."""
    names = loaded.export.layer_names
    global_layers = [n for n in names if layer_kind(loaded.export.layer_meta(n)) == "global"]
    return (global_layers or names)[-1]


def key_frames(loaded: LoadedExport, layer: str) -> list[int]:
    """Frames along a layer's K axis: all frames, or ``[0]`` for frame and DINOv2 layers."""
    return loaded.export.key_frames(layer)


def layer_description(loaded: LoadedExport, layer: str) -> str:
    """``Global 02 (global_02) · global attention (...)``: label, name and what the kind is."""
    meta = loaded.export.layer_meta(layer)
    kind = layer_kind(meta)
    if kind == ROLLOUT_KIND:
        depth = meta.get("rollout_layers")
        through = (
            f"through {depth} frame and global layers" if depth else "through the frame and global layers"
        )
        ratio = discard_text(meta)
        what = f"attention rollout {through}" + (f" · discard ratio {ratio}" if ratio else "")
    else:
        what = KIND_DESCRIPTIONS.get(kind, f"{kind} layer")
    return f"{loaded.layer_labels[layer]} ({layer}) · {what}"


def kinds_summary(loaded: LoadedExport) -> str:
    """``"7 layers (2 global, 2 frame, 2 DINOv2, rollout with discard 0.9)"``."""
    export = loaded.export
    counts: dict[str, int] = {}
    rollout = None
    for name in export.layer_names:
        meta = export.layer_meta(name)
        kind = layer_kind(meta)
        counts[kind] = counts.get(kind, 0) + 1
        if kind == ROLLOUT_KIND:
            rollout = discard_text(meta)
    parts = []
    for kind, count in counts.items():
        if kind == ROLLOUT_KIND:
            parts.append("rollout" + (f" with discard {rollout}" if rollout else ""))
        else:
            parts.append(f"{count} {'DINOv2' if kind == 'dino' else kind}")
    return f"{plural(len(export.layer_names), 'layer')} ({', '.join(parts)})"


# ---- controls -----------------------------------------------------------------------------------------


def layer_heads(loaded: LoadedExport, layer: str) -> int:
    """Number of heads whose maps the layer stores one by one; 0 without per-head data."""
    meta = loaded.export.layer_meta(layer)
    return int(meta["num_heads"] or 0) if meta["per_head_data"] else 0


def head_choices(loaded: LoadedExport, layer: str) -> list[str]:
    """``["Average", "Head 1", ..., "Head H"]``, just ``["Average"]`` for a layer without per-head data
    (averaged exports, the rollout)."""
    return [AVERAGE] + [f"Head {index + 1}" for index in range(layer_heads(loaded, layer))]


def parse_head(choice: str | None, loaded: LoadedExport, layer: str) -> int | None:
    """0-based head of a head-dropdown choice for ``layer``; ``None`` for Average.

    A head chosen on a layer without per-head data (the rollout, an averaged export: the Head control
    there offers Average only) shows the head average.
    """
    if choice in (None, "", AVERAGE):
        return None
    try:
        head = int(str(choice).removeprefix("Head").strip()) - 1
    except ValueError:
        raise ViewerError(f"unknown head choice {choice!r}") from None
    heads = layer_heads(loaded, layer)
    if heads == 0:
        return None
    if not 0 <= head < heads:
        raise ViewerError(f"head {head + 1} out of range 1..{heads} for layer {layer}")
    return head


def check_layer(loaded: LoadedExport, layer: str | None) -> str:
    if layer not in loaded.export.layer_names:
        raise ViewerError(f"unknown layer {layer!r}")
    return layer
