"""Preprocessing must match upstream VGGT exactly and fail cleanly on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vggt.preprocess import ImageLoadError, list_images, load_and_preprocess_images, to_uint8_frames

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE_DIR = FIXTURES / "preprocess_images"
META = json.loads((FIXTURES / "preprocess_reference.json").read_text())
REFERENCE = load_file(str(FIXTURES / "preprocess_reference.safetensors"))


def _paths_for(key: str) -> list[Path]:
    _, kind, *rest = key.split(".", 2)
    names = META["images"] if kind == "all" else rest
    return [IMAGE_DIR / name for name in names]


def test_reference_covers_both_modes_alone_and_together():
    expected = {f"{m}.all" for m in ("crop", "pad")}
    expected |= {f"{m}.single.{name}" for m in ("crop", "pad") for name in META["images"]}
    assert set(REFERENCE) == expected


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_matches_upstream_reference_bit_for_bit(key: str):
    mode = key.split(".", 1)[0]
    out = load_and_preprocess_images(_paths_for(key), mode=mode)
    ref = REFERENCE[key]
    assert out.dtype == torch.float32
    assert list(out.shape) == META["shapes"][key]
    # The fixture stores k for the value k/255; output * 255 must sit on those integers.
    scaled = out * 255
    assert (scaled - scaled.round()).abs().max().item() < 1e-4
    assert torch.equal(scaled.round().to(torch.uint8), ref)
    # Stronger: identical float32 bits to what a uint8 -> /255 conversion gives.
    assert torch.equal(out, ref.to(torch.float32) / 255)


def test_to_uint8_frames_round_trips_the_reference():
    out = load_and_preprocess_images(_paths_for("crop.all"), mode="crop")
    frames = to_uint8_frames(out)
    assert frames.dtype == np.uint8 and frames.shape == (4, 518, 518, 3)
    np.testing.assert_array_equal(frames, REFERENCE["crop.all"].permute(0, 2, 3, 1).numpy())


def test_to_uint8_frames_rounds_and_clips():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.49 / 255, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    frames = to_uint8_frames(x)
    assert frames.shape == (1, 1, 6, 3)
    assert frames[0, 0, :, 0].tolist() == [0, 0, 0, 1, 255, 255]  # 0.5 rounds half-to-even
    with pytest.raises(ValueError):
        to_uint8_frames(torch.zeros(3, 4, 4))


def test_mixed_sizes_are_padded_white_and_centred():
    wide = IMAGE_DIR / "c_wide_gray_1000x250.png"
    square = IMAGE_DIR / "d_square_518.jpg"
    out = load_and_preprocess_images([wide, square], mode="crop")
    alone = load_and_preprocess_images([wide], mode="crop")
    assert out.shape == (2, 3, 518, 518)
    top = (518 - 126) // 2
    assert torch.equal(out[0, :, top : top + 126], alone[0])
    assert torch.all(out[0, :, :top] == 1.0) and torch.all(out[0, :, top + 126 :] == 1.0)


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], axis=-1)
    return rgb.astype(np.uint8)


def test_rgba_is_composited_onto_white(tmp_path: Path):
    rgba = np.zeros((100, 140, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 70:, 3] = 255  # left half fully transparent, right half opaque red-ish
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_and_preprocess_images([tmp_path / "rgba.png"])
    assert out.shape == (1, 3, 364, 518)  # 100 * 518 / 140 = 370 -> 26 patches of 14
    left, right = out[0, :, :, :200], out[0, :, :, -200:]
    assert torch.allclose(left, torch.ones_like(left))
    assert torch.allclose(right[0], torch.full_like(right[0], 200 / 255))
    assert torch.all(right[1:] == 0)


def test_grayscale_palette_and_jpeg_inputs(tmp_path: Path):
    rgb = _gradient(300, 400)
    gray = rgb[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    Image.fromarray(rgb, "RGB").quantize(64).save(tmp_path / "palette.png")
    Image.fromarray(rgb, "RGB").save(tmp_path / "photo.jpg", quality=95)
    assert Image.open(tmp_path / "palette.png").mode == "P"

    g = load_and_preprocess_images([tmp_path / "gray.png"])
    assert g.shape == (1, 3, 392, 518)  # 300 * 518 / 400 = 388.5 -> 28 patches of 14
    assert torch.equal(g[0, 0], g[0, 1]) and torch.equal(g[0, 0], g[0, 2])
    assert g[0, 0, :, :5].mean() < 0.05 and g[0, 0, :, -5:].mean() > 0.95

    p = load_and_preprocess_images([tmp_path / "palette.png"])
    j = load_and_preprocess_images([tmp_path / "photo.jpg"])
    exact = load_and_preprocess_images([_save(tmp_path / "exact.png", rgb)])
    for img in (p, j):
        assert img.shape == (1, 3, 392, 518)
        assert (img - exact).abs().mean() < 0.03


def _save(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path):
    ramp16 = (np.linspace(0, 65535, 280)[None, :].repeat(210, 0)).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    ramp8 = np.rint(ramp16 / 257).astype(np.uint8)
    out16 = load_and_preprocess_images([tmp_path / "ramp16.png"])
    out8 = load_and_preprocess_images([_save(tmp_path / "ramp8.png", ramp8)])
    assert out16.shape == (1, 3, 392, 518)
    # PIL's plain convert("RGB") would clip everything above 255/65535 to white
    assert 0.4 < out16.mean() < 0.6
    assert torch.equal(out16, out8)


def test_exif_orientation_is_applied(tmp_path: Path):
    img = Image.fromarray(_gradient(200, 400))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    out = load_and_preprocess_images([tmp_path / "rotated.jpg"], mode="pad")
    # displayed portrait 200 x 400 -> height 518, width 259 -> 252; white bars left and right
    assert out.shape == (1, 3, 518, 518)
    assert torch.all(out[0, :, :, :100] == 1.0) and torch.all(out[0, :, :, -100:] == 1.0)
    assert out[0, :, :, 200:300].mean() < 0.9


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    png = (IMAGE_DIR / "a_landscape_640x480.png").read_bytes()
    jpg = (IMAGE_DIR / "d_square_518.jpg").read_bytes()
    files = {
        "missing": tmp_path / "missing_image.png",
        "empty": tmp_path / "empty_image.png",
        "truncated_png": tmp_path / "cut_short.png",
        "truncated_jpg": tmp_path / "cut_short.jpg",
        "not_an_image": tmp_path / "notes.png",
    }
    files["empty"].write_bytes(b"")
    files["truncated_png"].write_bytes(png[: len(png) // 2])
    files["truncated_jpg"].write_bytes(jpg[: len(jpg) // 2])
    files["not_an_image"].write_text("this is text,\nnot a picture\n")
    return files


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "no such file"),
        ("empty", "empty"),
        ("truncated_png", "truncated"),
        ("truncated_jpg", "truncated"),
        ("not_an_image", "not a recognised image"),
    ],
)
def test_bad_files_raise_one_line_error_naming_the_file(tmp_path: Path, kind: str, reason: str):
    path = _bad_files(tmp_path)[kind]
    good = IMAGE_DIR / "d_square_518.jpg"
    with pytest.raises(ImageLoadError) as info:
        load_and_preprocess_images([good, path])
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message and reason in message
    assert isinstance(info.value, ValueError)


def test_empty_list_and_unknown_mode_raise():
    with pytest.raises(ImageLoadError):
        load_and_preprocess_images([])
    with pytest.raises(ImageLoadError, match="mode"):
        load_and_preprocess_images([IMAGE_DIR / "d_square_518.jpg"], mode="stretch")


def test_list_images_natural_sort_and_extension_filter(tmp_path: Path):
    names = ["img10.png", "img2.PNG", "img1.jpg", "IMG3.jpeg", "img20.webp", "notes.txt", ".hidden.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "img4.png").mkdir()  # directories never count as images
    assert [p.name for p in list_images(tmp_path)] == [
        "img1.jpg",
        "img2.PNG",
        "IMG3.jpeg",
        "img10.png",
        "img20.webp",
    ]
    assert [p.name for p in list_images(tmp_path, "png")] == ["img2.PNG", "img10.png"]
    assert [p.name for p in list_images(tmp_path, ".JPG")] == ["img1.jpg"]
    assert list_images(tmp_path, "tiff") == []
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "nope")


def test_list_images_feeds_the_loader():
    paths = list_images(IMAGE_DIR)
    assert [p.name for p in paths] == META["images"]
    out = load_and_preprocess_images(paths, mode="pad")
    assert torch.equal(out, REFERENCE["pad.all"].to(torch.float32) / 255)
