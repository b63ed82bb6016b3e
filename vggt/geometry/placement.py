"""Where each original image lands in the frame the model sees: the one rule of the preprocessing.

Upstream VGGT resizes an image so that one side is 518 pixels and the other a multiple of 14, then
centre-crops (``crop``) or pads it with white (``pad``), and pads a batch of unequal frames, centred, to
the largest height and width. :func:`place_frames` works out these sizes and offsets once;
:mod:`vggt.preprocess` cuts and pads the pixels with them, and the geometry code maps points with them.

Pixel coordinates follow :mod:`vggt.geometry.scene`: ``(x, y)`` = (column, row), the centre of the
top-left pixel at ``(0, 0)``, so pixel ``i`` covers ``[i - 0.5, i + 0.5)``. A resize from ``n`` to
``m`` pixels maps pixel centres as PIL's resampling does, ``x' = (x + 0.5) * m / n - 0.5``.
numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

TARGET_SIZE = 518
PATCH_SIZE = 14
MODES = ("crop", "pad")


def resized_size(width: int, height: int, mode: str) -> tuple[int, int]:
    """``(width, height)`` an image is resized to before cropping or padding.

    One side becomes 518, the other keeps the aspect ratio rounded to a multiple of 14 (Python's
    round-half-to-even, as upstream): the width in ``crop`` mode and for landscape images in ``pad``
    mode, the height for portrait images in ``pad`` mode. A size of 0 means the aspect ratio is too
    extreme for the model.
    """
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "pad" and height > width:
        new_height = TARGET_SIZE
        new_width = round(width * (new_height / height) / PATCH_SIZE) * PATCH_SIZE
    else:
        new_width = TARGET_SIZE
        new_height = round(height * (new_width / width) / PATCH_SIZE) * PATCH_SIZE
    return new_width, new_height


def centred_padding(size: int, target: int) -> tuple[int, int]:
    """Padding ``(before, after)`` that centres ``size`` pixels in ``target``; the odd one goes after."""
    extra = max(target - size, 0)
    return extra // 2, extra - extra // 2


@dataclass(frozen=True)
class FramePlacement:
    """How one original image becomes a model frame.

    The image (``source_width x source_height``) is resized to ``resized_width x resized_height``;
    rows ``[crop_top, crop_top + kept_height)`` of the resized image are kept (all of them unless
    ``crop`` mode cut a tall image to 518); what is kept is pasted with its top-left pixel at
    ``(left, top)`` of a ``frame_width x frame_height`` frame, the rest of which is white padding.
    """

    source_width: int
    source_height: int
    resized_width: int
    resized_height: int
    crop_top: int
    kept_height: int
    left: int
    top: int
    frame_width: int
    frame_height: int

    @property
    def scale_x(self) -> float:
        return self.resized_width / self.source_width

    @property
    def scale_y(self) -> float:
        return self.resized_height / self.source_height

    def to_frame(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Original-image pixel coordinates ``x, y`` (each [...]) -> model-frame coordinates, float64."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        frame_x = (x + 0.5) * self.scale_x - 0.5 + self.left
        frame_y = (y + 0.5) * self.scale_y - 0.5 - self.crop_top + self.top
        return frame_x, frame_y

    def to_source(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Model-frame coordinates ``x, y`` (each [...]) -> original-image coordinates, float64."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        source_x = (x - self.left + 0.5) / self.scale_x - 0.5
        source_y = (y - self.top + self.crop_top + 0.5) / self.scale_y - 0.5
        return source_x, source_y

    def shows(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Whether model-frame coordinates ``x, y`` (each [...]) fall on image content, not on padding
        or outside the frame: bool [...]."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        with np.errstate(invalid="ignore"):
            return (
                (x >= self.left - 0.5)
                & (x < self.left + self.resized_width - 0.5)
                & (y >= self.top - 0.5)
                & (y < self.top + self.kept_height - 0.5)
            )


def _place_alone(width: int, height: int, mode: str) -> FramePlacement:
    """Placement of one image in its own frame: the kept pixels, padded to 518 x 518 in ``pad`` mode."""
    new_width, new_height = resized_size(width, height, mode)
    if new_width <= 0 or new_height <= 0:
        raise ValueError(f"aspect ratio {width}x{height} too extreme to resize")
    crop_top, kept = 0, new_height
    if mode == "crop" and new_height > TARGET_SIZE:
        crop_top, kept = (new_height - TARGET_SIZE) // 2, TARGET_SIZE
    frame_width, frame_height = new_width, kept
    if mode == "pad":
        frame_width, frame_height = max(new_width, TARGET_SIZE), max(kept, TARGET_SIZE)
    return FramePlacement(
        width, height, new_width, new_height, crop_top, kept,
        centred_padding(new_width, frame_width)[0], centred_padding(kept, frame_height)[0],
        frame_width, frame_height,
    )  # fmt: skip


def _centred_in(placement: FramePlacement, frame_width: int, frame_height: int) -> FramePlacement:
    """``placement``'s frame padded, centred, to ``frame_width x frame_height``."""
    return replace(
        placement,
        left=placement.left + centred_padding(placement.frame_width, frame_width)[0],
        top=placement.top + centred_padding(placement.frame_height, frame_height)[0],
        frame_width=frame_width,
        frame_height=frame_height,
    )


def place_frames(sizes: Sequence[tuple[int, int]], mode: str) -> list[FramePlacement]:
    """Placement of every image of one preprocessed batch.

    Parameters
    ----------
    sizes
        ``(width, height)`` of each original image (upright, after EXIF orientation).
    mode
        ``"crop"`` or ``"pad"``.

    Returns
    -------
    list of FramePlacement
        One per image; all share the batch's frame size (the largest height and the largest width).

    Raises
    ------
    ValueError
        An unknown mode, no sizes, or an aspect ratio too extreme to resize (a side would be 0 pixels).
    """
    if not sizes:
        raise ValueError("no images to place")
    alone = [_place_alone(width, height, mode) for width, height in sizes]
    frame_width = max(p.frame_width for p in alone)
    frame_height = max(p.frame_height for p in alone)
    return [_centred_in(p, frame_width, frame_height) for p in alone]


def place_frame(width: int, height: int, mode: str, frame_size: tuple[int, int]) -> FramePlacement:
    """Placement of one ``width x height`` image in a batch of ``frame_size = (H, W)`` frames.

    The batch pads every frame to its largest height and width, so a frame's offsets depend on the
    batch; an export records that size (``image_size``), which is all that is needed here.
    """
    frame_height, frame_width = (int(n) for n in frame_size)
    alone = _place_alone(width, height, mode)
    if alone.frame_width > frame_width or alone.frame_height > frame_height:
        raise ValueError(
            f"an image of {width}x{height} becomes a {alone.frame_width}x{alone.frame_height} frame in "
            f"{mode} mode, larger than the batch's {frame_width}x{frame_height}"
        )
    return _centred_in(alone, frame_width, frame_height)
