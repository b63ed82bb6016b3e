"""The colour rule of the viewer and its rendering in numpy: the jet colour map, colour codes, overlays of
maps on frames, the grid and the highlighted cell.

The page colours maps itself (``static/attention_view.js``, with :data:`JET_LUT` and the same blending);
this module draws the same pictures as numpy ``uint8`` RGB arrays for figures (:mod:`.figures`) and
tests. Images are in *display* pixels: the model's frame upscaled by an integer factor ``scale``, which
keeps each grid cell an exact block of pixels. Cell ``(r, c)`` covers display rows
``[r * cell_h, min((r + 1) * cell_h, H * scale))`` with ``cell_h = stride_h * patch_size * scale``, and
columns likewise; the last row or column of cells is ragged when the stride does not divide the grid.
"""

from __future__ import annotations

import base64
import functools
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from vggt.attn_format.grid import cell_box, cell_index

GRID_COLOR = (0, 255, 0)
HIGHLIGHT_COLOR = (255, 230, 0)
OUTLINE_COLOR = (255, 0, 0)
_CHANNELS = 3
_CODE_STRIDE = 256 * _CHANNELS  # a colour code advances the blend-table index by this much


def jet_lut() -> np.ndarray:
    """The jet colormap as a lookup table.

    Returns
    -------
    np.ndarray
        ``[256, 3] uint8``: dark blue (0) through cyan, yellow, to dark red (255); each channel is the
        piecewise-linear ramp ``clip(1.5 - |4x - k|, 0, 1)`` with ``k = 3, 2, 1`` for red, green, blue.
    """
    x = np.linspace(0.0, 1.0, 256)
    ramps = [np.clip(1.5 - np.abs(4.0 * x - k), 0.0, 1.0) for k in (3.0, 2.0, 1.0)]
    return np.rint(np.stack(ramps, axis=-1) * 255.0).astype(np.uint8)


JET_LUT = jet_lut()


@functools.lru_cache(maxsize=32)
def blend_table(opacity: float) -> np.ndarray:
    """Every possible blended value for one opacity, so an overlay is a single table lookup.

    With colour code ``k`` (the normalized value times 255), base value ``b`` and channel ``ch``, the
    overlay pixel is ``b * (1 - a) + jet[k, ch] * a`` with per-pixel alpha ``a = k / 255 * opacity``.

    Returns
    -------
    np.ndarray
        ``[256 * 256 * 3] uint8`` indexed by ``k * 768 + b * 3 + ch``.
    """
    alpha = np.arange(256, dtype=np.float32)[:, None, None] / 255.0 * np.float32(opacity)
    base = np.arange(256, dtype=np.float32)[None, :, None]
    blended = base * (1.0 - alpha) + JET_LUT.astype(np.float32)[:, None, :] * alpha
    return np.rint(blended).astype(np.uint8).reshape(-1)


@dataclass(frozen=True)
class Geometry:
    """How the pooled grid lies on a frame in display pixels.

    Attributes
    ----------
    height, width : int
        The model's frame size in pixels (``H_p * patch_size`` by ``W_p * patch_size``).
    H_ds, W_ds : int
        Pooled grid.
    stride_h, stride_w, patch_size : int
        Cell size in patches and patch size in pixels.
    scale : int
        Integer display upscaling.
    """

    height: int
    width: int
    H_ds: int
    W_ds: int
    stride_h: int
    stride_w: int
    patch_size: int
    scale: int
    row_cells: np.ndarray = field(init=False, repr=False, compare=False)
    col_cells: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pixel = self.patch_size * self.scale  # a patch in display pixels
        rows = cell_index(np.arange(self.display_height), self.stride_h, pixel, self.H_ds)
        cols = cell_index(np.arange(self.display_width), self.stride_w, pixel, self.W_ds)
        object.__setattr__(self, "row_cells", rows.astype(np.intp))
        object.__setattr__(self, "col_cells", cols.astype(np.intp))

    @property
    def display_height(self) -> int:
        return self.height * self.scale

    @property
    def display_width(self) -> int:
        return self.width * self.scale

    @property
    def cell_height(self) -> int:
        """Display pixels per cell row (the last row may be shorter)."""
        return self.stride_h * self.patch_size * self.scale

    @property
    def cell_width(self) -> int:
        return self.stride_w * self.patch_size * self.scale

    def cell_at(self, x: float, y: float) -> tuple[int, int]:
        """Grid cell ``(row, col)`` under display pixel ``(x, y)``, clamped to the grid."""
        pixel = self.patch_size * self.scale
        return (
            int(cell_index(int(y), self.stride_h, pixel, self.H_ds)),
            int(cell_index(int(x), self.stride_w, pixel, self.W_ds)),
        )

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Display pixel box ``(y0, y1, x0, x1)`` (end-exclusive) covered by cell ``(row, col)``."""
        pixel = self.patch_size * self.scale
        H_p, W_p = self.height // self.patch_size, self.width // self.patch_size
        return cell_box(row, col, H_p, W_p, self.stride_h, self.stride_w, pixel)


def display_scale(height: int, width: int, target: int = 448) -> int:
    """Integer upscaling that brings the longer side of a small frame near ``target`` pixels."""
    return max(1, int(round(target / max(height, width, 1))))


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour integer upscaling of ``[..., H, W, 3]`` images to ``[..., H*scale, W*scale, 3]``."""
    if scale == 1:
        return frames
    return np.repeat(np.repeat(frames, scale, axis=-3), scale, axis=-2)


def base_indices(frames: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Precomputed blend-table offsets of the frames' pixels (``base * 3 + channel``), cut into cells.

    Parameters
    ----------
    frames : np.ndarray
        ``[S, Hd, Wd, 3] uint8`` frames in display pixels.
    geometry : Geometry
        Grid placement.

    Returns
    -------
    np.ndarray
        ``[S, H_ds, cell_h, W_ds, cell_w, 3] int32``; ragged last cells are padded with zeros, so that
        every cell is a full block and a map broadcasts over its blocks without being upsampled.
    """
    num_frames = frames.shape[0]
    padded = np.zeros(
        (num_frames, geometry.H_ds * geometry.cell_height, geometry.W_ds * geometry.cell_width, _CHANNELS),
        dtype=np.int32,
    )
    padded[:, : geometry.display_height, : geometry.display_width] = frames
    padded *= _CHANNELS
    padded += np.arange(_CHANNELS, dtype=np.int32)
    return padded.reshape(
        num_frames, geometry.H_ds, geometry.cell_height, geometry.W_ds, geometry.cell_width, 3
    )


def to_codes(normalized: np.ndarray) -> np.ndarray:
    """Colour codes ``round(clip(v, 0, 1) * 255)`` of normalized values, any shape, as uint8."""
    codes = np.clip(normalized, 0.0, 1.0) * 255.0
    return np.rint(codes).astype(np.uint8)


def overlay(
    base_blocks: np.ndarray,
    codes: np.ndarray,
    geometry: Geometry,
    opacity: float,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Jet overlays of pooled maps on their frames, with per-pixel alpha = value x opacity.

    Parameters
    ----------
    base_blocks : np.ndarray
        ``[S, H_ds, cell_h, W_ds, cell_w, 3] int32`` from :func:`base_indices`.
    codes : np.ndarray
        ``[S, H_ds, W_ds] uint8`` colour codes (see :func:`to_codes`).
    geometry : Geometry
        Grid placement; each cell fills exactly its block of display pixels.
    opacity : float
        Overlay opacity in ``[0, 1]``.
    out : np.ndarray, optional
        ``[S, Hd, Wd, 3] uint8`` C-contiguous destination (for example the frame area of a strip).

    Returns
    -------
    np.ndarray
        ``[S, Hd, Wd, 3] uint8``.
    """
    table = blend_table(round(float(np.clip(opacity, 0.0, 1.0)), 3))
    num_frames = base_blocks.shape[0]
    cell_offsets = codes.astype(np.int32) * _CODE_STRIDE
    index = base_blocks + cell_offsets[:, :, None, :, None, None]  # the map broadcast over its blocks
    padded_shape = (num_frames, index.shape[1] * index.shape[2], index.shape[3] * index.shape[4], _CHANNELS)
    shape = (num_frames, geometry.display_height, geometry.display_width, _CHANNELS)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    if padded_shape == shape:
        np.take(table, index.reshape(shape), out=out, mode="clip")
    else:
        padded = np.take(table, index.reshape(padded_shape), mode="clip")
        out[...] = padded[:, : shape[1], : shape[2]]
    return out


def draw_grid(image: np.ndarray, geometry: Geometry, alpha: float = 0.45) -> np.ndarray:
    """A copy of ``[Hd, Wd, 3] uint8`` with the cell boundaries drawn as 1-pixel lines."""
    result = image.astype(np.float32)
    color = np.asarray(GRID_COLOR, dtype=np.float32)
    rows = np.arange(1, geometry.H_ds) * geometry.cell_height
    cols = np.arange(1, geometry.W_ds) * geometry.cell_width
    result[rows] = result[rows] * (1.0 - alpha) + color * alpha
    result[:, cols] = result[:, cols] * (1.0 - alpha) + color * alpha
    return np.rint(result).astype(np.uint8)


def highlight_cell(
    image: np.ndarray, geometry: Geometry, row: int, col: int, fill: bool = True
) -> np.ndarray:
    """A copy of ``[Hd, Wd, 3] uint8`` with cell ``(row, col)`` tinted and outlined."""
    result = image.copy()
    y0, y1, x0, x1 = geometry.cell_box(row, col)
    if fill:
        block = result[y0:y1, x0:x1].astype(np.float32)
        result[y0:y1, x0:x1] = np.rint(block * 0.45 + np.asarray(HIGHLIGHT_COLOR, np.float32) * 0.55).astype(
            np.uint8
        )
    outline_cell(result, geometry, row, col)
    return result


def outline_cell(image: np.ndarray, geometry: Geometry, row: int, col: int, color=OUTLINE_COLOR) -> None:
    """Draw a rectangle (2 display pixels thick where the cell allows) around a cell, in place."""
    y0, y1, x0, x1 = geometry.cell_box(row, col)
    thickness = max(1, min(2, (y1 - y0) // 4, (x1 - x0) // 4))
    image[y0 : y0 + thickness, x0:x1] = color
    image[y1 - thickness : y1, x0:x1] = color
    image[y0:y1, x0 : x0 + thickness] = color
    image[y0:y1, x1 - thickness : x1] = color


def frame_labels(count: int, sources: list[str]) -> list[str]:
    """``"frame 0 · source.png"`` labels, one per frame."""
    return [f"frame {index} · {sources[index]}" for index in range(count)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(image: np.ndarray) -> bytes:
    """A ``[H, W, 3] uint8`` image as a PNG file: 8-bit RGB, rows unfiltered, zlib level 1.

    Written here rather than by Pillow, whose encoder tries a filter per row: this is three times
    faster for a 20% larger file, which is what sending frames to the page wants.
    """
    height, width, _ = image.shape
    rows = np.empty((height, 1 + width * 3), dtype=np.uint8)
    rows[:, 0] = 0  # filter type "none"
    rows[:, 1:] = image.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
        + _png_chunk(b"IEND", b"")
    )


def png_data_url(image: np.ndarray) -> str:
    """A ``[H, W, 3] uint8`` image as a ``data:image/png;base64,...`` URL (see :func:`png_bytes`)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(np.ascontiguousarray(image))).decode("ascii")
