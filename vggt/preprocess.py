"""Image loading and resizing that reproduces the input pipeline of upstream VGGT.

The output of :func:`load_and_preprocess_images` is meant to be bit-identical to
``vggt.utils.load_fn.load_and_preprocess_images`` of the upstream release, so that the
attention exported here is the attention of the real model on the real inputs. The sizes and offsets
of the resize, crop and padding come from :mod:`vggt.geometry.placement`, which maps points of the
original images into the frames by the same rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from vggt.geometry.placement import MODES, FramePlacement, place_frames

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Modes with more than 8 bits per sample; PIL's own convert("RGB") clips these at 255,
# which turns most of a 16-bit image white, so they are rescaled first.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(ValueError):
    """An input image could not be read; the message is a single line naming the file."""


def _fail(path: str | Path, reason: str) -> ImageLoadError:
    reason = " ".join(str(reason).split()) or "unknown error"
    return ImageLoadError(f"cannot read image {str(path)!r}: {reason}")


def _describe(path: Path, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if "truncated" in text.lower():
        return "file is truncated"
    if isinstance(exc, UnidentifiedImageError):
        try:
            if path.stat().st_size == 0:
                return "file is empty"
        except OSError:
            pass
        return "not a recognised image format"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _wide_to_8bit(img: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer image onto 8 bits, treating 0..65535 as the full range."""
    arr = np.asarray(img).astype(np.float64)
    arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def _open_rgb(path: str | Path) -> Image.Image:
    """Open an image fully decoded, upright (EXIF), alpha on white, as 8-bit RGB."""
    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()  # decode everything now so a truncated file fails here
            img = ImageOps.exif_transpose(img)
            if img.mode in _WIDE_INT_MODES:
                img = _wide_to_8bit(img)
            if img.mode == "RGBA":
                # Only RGBA is composited, as upstream does; LA/PA/palette alpha is
                # dropped by convert("RGB") below, again as upstream does.
                white = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, img)
            return img.convert("RGB")
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise _fail(p, _describe(p, exc)) from exc


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 ``[3, H, W]`` holding k/255 for byte value k."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div(255)


def _paste(img: torch.Tensor, placement: FramePlacement) -> torch.Tensor:
    """Pad the kept pixels ``[C, h, w]`` with 1.0 (white) to the frame, at the placement's offsets."""
    right = placement.frame_width - placement.left - img.shape[2]
    bottom = placement.frame_height - placement.top - img.shape[1]
    if placement.left == placement.top == right == bottom == 0:
        return img
    return F.pad(img, (placement.left, right, placement.top, bottom), mode="constant", value=1.0)


def load_and_preprocess_images(image_paths: Sequence[str | Path], mode: str = "crop") -> torch.Tensor:
    """Load images and resize them the way upstream VGGT does before inference.

    Parameters
    ----------
    image_paths
        N image files. Any PIL-readable format; RGBA is composited onto white, 16-bit
        grayscale is scaled to 8 bits (0..65535 -> 0..255).
    mode
        ``"crop"``: width 518, height keeps the aspect ratio rounded to a multiple of 14 and
        is centre-cropped to 518 if larger. ``"pad"``: the longer side 518, the other a
        multiple of 14, padded with white to 518 x 518.

    Returns
    -------
    torch.Tensor
        ``[N, 3, H, W]`` float32 in [0, 1]. Images that end up with different sizes are
        padded with white, centred, to the largest H and the largest W.

    Raises
    ------
    ImageLoadError
        Empty list, unknown mode, or a file that is missing or cannot be fully decoded.
    """
    if mode not in MODES:
        raise ImageLoadError(f"unknown preprocessing mode {mode!r}; expected one of {', '.join(MODES)}")
    if isinstance(image_paths, (str, Path)):
        image_paths = [image_paths]
    if len(image_paths) == 0:
        raise ImageLoadError("no images given: at least one image is required")

    kept, sizes = [], []
    for path in image_paths:
        img = _open_rgb(path)
        try:
            alone = place_frames([img.size], mode)[0]
        except ValueError as exc:
            raise _fail(path, str(exc)) from None
        sizes.append(img.size)
        img = img.resize((alone.resized_width, alone.resized_height), Image.Resampling.BICUBIC)
        kept.append(_to_tensor(img)[:, alone.crop_top : alone.crop_top + alone.kept_height, :])
    placements = place_frames(sizes, mode)
    return torch.stack([_paste(t, p) for t, p in zip(kept, placements, strict=True)]).contiguous()


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """Convert preprocessed images back to bytes, as the model saw them.

    Parameters
    ----------
    images
        ``[N, 3, H, W]`` float tensor in [0, 1].

    Returns
    -------
    np.ndarray
        ``[N, H, W, 3]`` uint8, ``round(x * 255)`` clipped to 0..255.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [N, 3, H, W], got {list(images.shape)}")
    frames = (images.detach().to("cpu", torch.float32) * 255).round().clamp(0, 255).to(torch.uint8)
    return frames.permute(0, 2, 3, 1).contiguous().numpy()


def _natural_key(name: str) -> tuple:
    parts = re.split(r"(\d+)", name.casefold())
    # Odd positions are digit runs; even positions are text, so comparisons never mix types.
    key = tuple(int(p) if i % 2 else p for i, p in enumerate(parts))
    return key, name


def list_images(image_dir: str | Path, extension: str | None = None) -> list[Path]:
    """List the image files of a directory in natural order (``img2`` before ``img10``).

    Parameters
    ----------
    image_dir
        Directory to scan (not recursive). Hidden files (leading dot) are skipped.
    extension
        Only this extension (``"png"`` or ``".png"``, any case); by default png, jpg, jpeg,
        bmp, tif, tiff and webp.

    Returns
    -------
    list[Path]
        Matching files, naturally sorted by file name.
    """
    directory = Path(image_dir)
    if not directory.is_dir():
        raise NotADirectoryError(f"not a directory: {str(directory)!r}")
    if extension is None:
        wanted = set(IMAGE_EXTENSIONS)
    else:
        wanted = {"." + extension.lower().lstrip(".")}
    files = [
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in wanted
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))
