"""A corpus of hostile exports, generated on demand (nothing of it is stored in the repository).

Each case is a small export made from a valid synthetic one, then damaged the way an export's author
could damage it: numbers beyond the format's caps, files that claim more bytes than they hold, links
and paths leading outside, zip bombs, markup and invalid Unicode in names. :func:`build_corpus` writes
every case under one folder, beside an ``outside/`` folder of decoys that no case may lead the reader to
open, and returns what each case must end as: an error (with a phrase its one-line message holds) or a
correct view.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vggt.attn_format import limits
from vggt.testing.synthetic import write_synthetic_export

ERROR, VIEW = "error", "view"
MARKUP = (
    '<img src="http://example.invalid/x.png"> ![](http://example.invalid/y.png) <script>alert(1)</script>'
)


@dataclass(frozen=True)
class Case:
    """One hostile export.

    Attributes
    ----------
    name : str
        Identifier (a pytest id).
    path : str
        What the user opens (typed into the path box).
    bound : str
        The export: folder or zip file; no file outside it (or outside a zip's extraction) may be opened.
    outcome : str
        ``"error"`` (a one-line message holding ``match``) or ``"view"`` (opens and renders).
    match : str
        Phrase the error message holds (case-insensitive), for ``"error"``.
    viewer_outcome : str
        The outcome in the viewer where it differs from the reader's: ``"any"`` for a damaged part the
        viewer does not read (the geometry), where an error and a view of the rest are both correct.
    """

    name: str
    path: str
    bound: str
    outcome: str
    match: str = ""
    viewer_outcome: str = ""  # in the viewer, when it differs: "any" for a part the viewer does not read


# ---- small builders -----------------------------------------------------------------------------------


def _attn(root: Path) -> Path:
    return root / "attn_maps"


DROP = object()  # a field value that removes the field


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps({key: value for key, value in data.items() if value is not DROP}))


def _edit_layers(root: Path, **changes: object) -> None:
    for meta in sorted(_attn(root).glob("*_metadata.json")):
        _edit(meta, **changes)


def _replace_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def _npz_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_raw(header: str, data: bytes) -> bytes:
    """A version 1.0 ``.npy`` member with any header text (padded as numpy pads it) and data."""
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def _npy_members(npz: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(npz) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def raw_zip(entries: list[dict]) -> bytes:
    """A zip written byte by byte, so that its headers may lie.

    Each entry: ``name`` (str), ``payload`` (bytes as stored in the zip), ``method`` (0 stored, 8
    deflated, ...), ``size`` (declared uncompressed size), ``crc``, and optionally ``flags`` and
    ``mode`` (Unix mode bits), ``data_of`` (the index of an earlier entry whose stored data this one's
    directory entry points to, as overlapping zip bombs do). Sizes of 4 GiB or more get zip64 extra
    fields.
    """
    body = io.BytesIO()
    central = io.BytesIO()
    offsets: list[int] = []
    for entry in entries:
        name = entry["name"].encode()
        payload, size = entry["payload"], entry["size"]
        big = size >= 0xFFFFFFFF or len(payload) >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, size, len(payload)) if big else b""
        small = (0xFFFFFFFF, 0xFFFFFFFF) if big else (len(payload), size)
        flags, method, crc = entry.get("flags", 0), entry.get("method", 0), entry.get("crc", 0)
        if "data_of" in entry:
            offset = offsets[entry["data_of"]]
        else:
            offset = body.tell()
            body.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, flags, method, 0, 33, crc, *small,
                                   len(name), len(extra)))  # fmt: skip
            body.write(name + extra + payload)
        offsets.append(offset)
        central_extra = struct.pack("<HHQQQ", 1, 24, size, len(payload), offset) if big else b""
        central.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 0x0300 | 45, 45, flags, method, 0, 33, crc,
                                  *small, len(name), len(central_extra), 0, 0, 0,
                                  entry.get("mode", 0o100644) << 16,
                                  0xFFFFFFFF if big else offset))  # fmt: skip
        central.write(name + central_extra)
    directory_offset, directory = body.tell(), central.getvalue()
    count = len(entries)
    body.write(directory)
    body.write(
        struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory), directory_offset, 0)
    )
    return body.getvalue()


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def _deflated_zeros(size: int) -> bytes:
    """A raw deflate stream of ``size`` zero bytes, made a block at a time."""
    packer = zlib.compressobj(1, zlib.DEFLATED, -15)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    parts.append(packer.compress(bytes(size & ((1 << 20) - 1))))
    return b"".join(parts) + packer.flush()


def _zip_folder(folder: Path, archive: Path, arcroot: str = "export") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                out.write(file, f"{arcroot}/{file.relative_to(folder).as_posix()}")
    return archive


def _zip_entries_of(folder: Path, arcroot: str = "export") -> list[dict]:
    """Stored entries of every file of ``folder``, for :func:`raw_zip`."""
    entries = []
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            data = file.read_bytes()
            entries.append({"name": f"{arcroot}/{file.relative_to(folder).as_posix()}", "payload": data,
                            "size": len(data), "crc": zlib.crc32(data)})  # fmt: skip
    return entries


def _blank_png(width: int, height: int) -> bytes:
    """A real grayscale PNG of ``width`` x ``height`` zeros, its pixel data deflated a row block at a time
    (about 1 KB of output per MB of pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(1)
    row_block = bytes((width + 1) * 64)
    parts = [packer.compress(row_block) for _ in range(height // 64)]
    parts.append(packer.compress(bytes((width + 1) * (height % 64))))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


# ---- the corpus ---------------------------------------------------------------------------------------


class _Corpus:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.base = write_synthetic_export(
            folder / "_base" / "export", per_head=True, num_layers=2, geometry=True
        )
        self.outside = folder / "outside"
        self.outside.mkdir()
        shutil.copy(_attn(self.base) / "layers_manifest.json", self.outside / "secret_manifest.json")
        shutil.copy(_attn(self.base) / "layer_01_metadata.json", self.outside / "secret_metadata.json")
        shutil.copy(_attn(self.base) / "layer_01/heatmaps_uint8.npz", self.outside / "secret.npz")
        shutil.copy(self.base / "images/frame_00.png", self.outside / "secret.png")
        shutil.copy(self.base / "geometry/geometry_metadata.json", self.outside / "secret_geometry.json")
        shutil.copytree(_attn(self.base), self.outside / "secret_attn_maps")
        (self.outside / "victim.txt").write_text("a file no case may write")
        self.cases: list[Case] = []

    def export(self, name: str, base: Path | None = None) -> Path:
        """A fresh copy of the valid export for case ``name``."""
        root = self.folder / name / "export"
        shutil.copytree(base or self.base, root, symlinks=True)
        return root

    def add(
        self,
        name: str,
        root: Path,
        outcome: str,
        match: str = "",
        opened: Path | str | None = None,
        viewer_outcome: str = "",
    ) -> None:
        path = str(opened if opened is not None else root)
        self.cases.append(Case(name, path, str(root), outcome, match, viewer_outcome))


def _caps(c: _Corpus) -> None:
    """Numbers in the metadata beyond the caps (each would have sized an allocation)."""
    for name, changes, match in (
        ("S_100_million", {"S": 100_000_000}, "frame count of 1 to 1024"),
        ("heads_10_million", {"num_heads": 10_000_000}, "head count of 1 to 256"),
        ("patch_size_400", {"patch_size": 400}, "patch size of 1 to 64"),
        ("grid_5000_squared", {"H_ds": 5000, "W_ds": 5000, "Q": 5000 * 5000, "H_p": 5000, "W_p": 5000},
         "query count of 1 to 16777216"),
        ("stride_huge", {"stride_h": 10**6}, "1 to 4096"),
        ("image_size_20000", {"image_size": [20000, 20000]}, "each 1 to 4096"),
        ("token_queries_5000", {"token_queries": [{"token": "camera", "frame": 0}] * 5000}, "at most 4096"),
        ("special_tokens_100", {"special_tokens": ["camera"] * 100}, "at most 64 token names"),
        ("source_name_100000", {"source_images": ["a" * 100_000, "b", "c"]}, "100000 characters"),
        ("source_name_300", {"source_images": ["a" * 300, "b", "c"]}, "at most 256 characters"),
        ("frames_2000_one_png", {"S": 2000, "image_paths": ["../images/frame_00.png"] * 2000}, "1024"),
        ("frames_one_png_three_times", {"image_paths": ["../images/frame_00.png"] * 3}, "same image"),
        ("key_frames_repeated", {"key_frames": [0, 0, 0]}, "distinct frames"),
        ("grid_declared_not_stored", {"H_ds": 40, "W_ds": 50, "Q": 2000, "H_p": 40, "W_p": 50,
                                      "image_size": [560, 700]}, "has shape"),
    ):  # fmt: skip
        root = c.export(name)
        _edit_layers(root, **changes)
        c.add(name, root, ERROR, match)

    root = c.export("seed_image_size_20000")
    manifest = _attn(root) / "layers_manifest.json"
    data = json.loads(manifest.read_text())
    data.pop("schema_version")
    manifest.write_text(json.dumps(data))
    for meta in _attn(root).glob("*_metadata.json"):
        layer = json.loads(meta.read_text())
        layer.pop("schema_version")
        layer["image_size"] = [20000, 20000]
        meta.write_text(json.dumps(layer))
    c.add("seed_image_size_20000", root, ERROR, "each 1 to 4096")

    # A seed export's paths are matched leniently (by their last components inside the export), never
    # followed out of it: a frame found nowhere inside is a gray placeholder, with a warning.
    root = c.export("seed_paths_outside")
    manifest = _attn(root) / "layers_manifest.json"
    data = json.loads(manifest.read_text())
    data.pop("schema_version")
    manifest.write_text(json.dumps(data))
    secret = str(c.outside / "secret.png")
    for meta in _attn(root).glob("*_metadata.json"):
        layer = json.loads(meta.read_text())
        layer.pop("schema_version")
        layer["image_paths"] = [secret, "../../../outside/secret.png", "/proc/self/root" + secret]
        meta.write_text(json.dumps(layer))
    c.add("seed_paths_outside", root, VIEW)

    root = c.export("layers_3000_one_metadata")
    manifest = _attn(root) / "layers_manifest.json"
    entries = [{"name": f"layer_{i}", "metadata_path": "layer_01_metadata.json"} for i in range(3000)]
    _edit(manifest, layers=entries)
    c.add("layers_3000_one_metadata", root, ERROR, "1 to 256 layers")

    root = c.export("layers_two_one_metadata")
    _edit(_attn(root) / "layers_manifest.json", layers=[
        {"name": "a", "metadata_path": "layer_01_metadata.json"},
        {"name": "b", "metadata_path": "./layer_01_metadata.json"}])  # fmt: skip
    c.add("layers_two_one_metadata", root, ERROR, "same metadata file")

    root = c.export("set_name_1000")
    _edit(_attn(root) / "layers_manifest.json", image_set_name="x" * 1000)
    c.add("set_name_1000", root, ERROR, "at most 256 characters")

    root = c.export("model_seed_nested")
    _edit(_attn(root) / "layers_manifest.json", model={"random_weights": True, "random_seed": [[[1]]] * 50})
    c.add("model_seed_nested", root, ERROR, "manifest field model")


def _json(c: _Corpus) -> None:
    """JSON that is too large, too deep, too long in its numbers, or not text."""
    root = c.export("json_5_mb")
    manifest = _attn(root) / "layers_manifest.json"
    manifest.write_text(manifest.read_text() + " " * (5 << 20))
    c.add("json_5_mb", root, ERROR, "above the limit of 4 MiB")

    root = c.export("json_500k_values")
    _edit(_attn(root) / "layer_01_metadata.json", junk=[0] * 500_000)
    c.add("json_500k_values", root, ERROR, "number of JSON values")

    root = c.export(
        "json_export_budget", write_synthetic_export(c.folder / "_base6" / "export", num_layers=6)
    )
    _edit_layers(root, junk=[0] * 380_000)
    c.add("json_export_budget", root, ERROR, "values together")

    root = c.export("json_deep_100000")
    (_attn(root) / "layers_manifest.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    c.add("json_deep_100000", root, ERROR, "nested")

    root = c.export("json_depth_40")
    _edit(_attn(root) / "layers_manifest.json", junk=json.loads("[" * 40 + "]" * 40))
    c.add("json_depth_40", root, ERROR, "nested 41 levels")

    root = c.export("json_int_5000_digits")
    _replace_text(_attn(root) / "layer_01_metadata.json", '"S": 3', '"S": ' + "7" * 5000)
    c.add("json_int_5000_digits", root, ERROR, "a number of 5000 characters")

    root = c.export("json_float_5000_digits")
    _replace_text(
        _attn(root) / "layer_01_metadata.json",
        '"layer_vmax99": ',
        '"layer_vmax99": 0.' + "1" * 5000 + ', "x": ',
    )
    c.add("json_float_5000_digits", root, ERROR, "characters (at most 40)")

    root = c.export("json_not_utf8")
    (_attn(root) / "layer_01_metadata.json").write_bytes(b'{"S": "\xff\xfe"}')
    c.add("json_not_utf8", root, ERROR, "not UTF-8")

    root = c.export("manifest_is_a_list")
    (_attn(root) / "layers_manifest.json").write_text("[1, 2, 3]")
    c.add("manifest_is_a_list", root, ERROR, "must hold a JSON object")

    root = c.export("layer_name_is_an_object")
    _edit(
        _attn(root) / "layers_manifest.json",
        layers=[{"name": {"x": 1}, "metadata_path": "layer_01_metadata.json"}],
    )
    c.add("layer_name_is_an_object", root, ERROR, "manifest field layers")

    for name, changes, match in (
        ("layer_vmax_nan", {"layer_vmax99": float("nan")}, "layer_vmax99"),
        ("layer_vmax_infinity", {"layer_vmax99": float("inf")}, "layer_vmax99"),
        ("frames_nan", {"S": float("nan")}, "frame count"),
        ("patch_size_infinity", {"patch_size": float("-inf")}, "patch size"),
        ("image_size_nan", {"image_size": [float("nan"), 70]}, "image_size"),
        ("stride_fraction", {"stride_h": 1.5}, "stride"),
        ("heads_true", {"num_heads": True}, "head count"),
        ("query_frame_nan", {"query_frame": float("nan")}, "query_frame"),
    ):
        root = c.export(name)
        _edit_layers(root, **changes)  # written as the JSON literals NaN and Infinity
        c.add(name, root, ERROR, match)

    for name, value, match in (
        ("vmax_nan", [float("nan")] * 4, "positive numbers"),
        ("vmax_string", "abc", "positive numbers"),
        ("vmax_nested", [[1.0]] * 4, "positive numbers"),
        ("vmax_wrong_count", [0.1, 0.2], "must list 4 values"),
        ("vmax_negative", [-0.1] * 4, "positive numbers"),
        ("vmax_beyond_float32", [1e39] * 4, "positive numbers"),
        ("vmax_bools", [True] * 4, "positive numbers"),
    ):
        root = c.export(name)
        _edit_layers(root, per_head_vmax99=value)
        c.add(name, root, ERROR, match)


def _paths(c: _Corpus) -> None:
    """Links and paths leading outside the export, and files that are not files."""
    for name, file, decoy in (
        ("manifest_symlink_outside", "attn_maps/layers_manifest.json", c.outside / "secret_manifest.json"),
        ("metadata_symlink_outside", "attn_maps/layer_02_metadata.json", c.outside / "secret_metadata.json"),
        ("npz_symlink_outside", "attn_maps/layer_01/heatmaps_uint8.npz", c.outside / "secret.npz"),
        ("image_symlink_etc_passwd", "images/frame_01.png", Path("/etc/passwd")),
        ("image_symlink_proc_environ", "images/frame_01.png", Path("/proc/self/environ")),
    ):
        root = c.export(name)
        (root / file).unlink()
        (root / file).symlink_to(decoy)
        c.add(name, root, ERROR, "points outside")

    root = c.export("attn_maps_symlink_outside")
    shutil.rmtree(_attn(root))
    _attn(root).symlink_to(c.outside / "secret_attn_maps")
    c.add("attn_maps_symlink_outside", root, ERROR, "points outside")
    c.add("attn_maps_symlink_outside_opened_directly", root, ERROR, "points outside", opened=_attn(root))
    c.add("manifest_through_linked_attn_maps", root, ERROR, "points outside",
          opened=_attn(root) / "layers_manifest.json")  # fmt: skip

    root = c.export("attn_maps_symlink_to_file")
    shutil.rmtree(_attn(root))
    _attn(root).symlink_to(c.outside / "secret_manifest.json")
    c.add("attn_maps_symlink_to_file", root, ERROR, "points outside")

    root = c.export("images_folder_linked_inside")
    (root / "images").rename(root / "stored_images")
    (root / "images").symlink_to("stored_images")
    c.add("images_folder_linked_inside", root, VIEW)

    root = c.export("metadata_path_traversal")
    _edit(_attn(root) / "layers_manifest.json", layers=[
        {"name": "layer_01", "metadata_path": "../../../outside/secret_metadata.json"}])  # fmt: skip
    c.add("metadata_path_traversal", root, ERROR, "points outside")

    root = c.export("npz_path_absolute")
    _edit(_attn(root) / "layer_01_metadata.json", npz_path=str(c.outside / "secret.npz"))
    c.add("npz_path_absolute", root, ERROR, "points outside")

    root = c.export("image_path_traversal")
    _edit_layers(root, image_paths=["../images/frame_00.png", "../../../outside/secret.png",
                                    "../images/frame_02.png"])  # fmt: skip
    c.add("image_path_traversal", root, ERROR, "points outside")

    root = c.export("npz_path_markup")
    _edit(_attn(root) / "layer_01_metadata.json", npz_path=MARKUP[:60] + ".npz")
    c.add("npz_path_markup", root, ERROR, "<img src=")  # quoted in the message, as text

    root = c.export("hardlinked_frame")  # a hard link is the file itself: its name is the export's
    (root / "images/frame_01.png").unlink()
    os.link(c.outside / "secret.png", root / "images/frame_01.png")
    c.add("hardlinked_frame", root, VIEW)

    root = c.export("npz_path_nul")
    _edit(_attn(root) / "layer_01_metadata.json", npz_path="layer_01/heat\u0000maps_uint8.npz")
    c.add("npz_path_nul", root, ERROR, "NUL")

    root = c.export("typed_path_nul")
    c.add("typed_path_nul", root, ERROR, "NUL", opened=f"{root}\x00/etc/passwd")

    root = c.export("metadata_is_a_fifo")
    (_attn(root) / "layer_02_metadata.json").unlink()
    os.mkfifo(_attn(root) / "layer_02_metadata.json")
    c.add("metadata_is_a_fifo", root, ERROR, "layer_02_metadata.json")

    root = c.export("manifest_is_a_fifo")
    (_attn(root) / "layers_manifest.json").unlink()
    os.mkfifo(_attn(root) / "layers_manifest.json")
    c.add("manifest_is_a_fifo", root, ERROR, "not a regular file")

    root = c.export("npz_is_a_folder")
    (_attn(root) / "layer_01/heatmaps_uint8.npz").unlink()
    (_attn(root) / "layer_01/heatmaps_uint8.npz").mkdir()
    c.add("npz_is_a_folder", root, ERROR, "not found")

    root = c.export("attn_maps_symlink_loop")
    shutil.rmtree(_attn(root))
    _attn(root).symlink_to("attn_maps")
    c.add("attn_maps_symlink_loop", root, ERROR, "")

    root = c.export("surrogates_and_markup_in_names")
    manifest = _attn(root) / "layers_manifest.json"
    model = json.loads(manifest.read_text())["model"] | {
        "id": "`evil` " + MARKUP[:80],
        "random_seed": MARKUP[:200],
    }
    _edit(manifest, image_set_name="set \ud800 " + MARKUP[:200], model=model)
    tokens = ["camera\ud800", MARKUP[:100], "register_2", "register_3", "register_4"]
    _edit_layers(root, source_images=["\udcff.png", MARKUP[:200], r"$\frac{1}{$.png"], special_tokens=tokens)
    c.add("surrogates_and_markup_in_names", root, VIEW)


def _npz(c: _Corpus) -> None:
    """NPZ files whose headers claim more than they hold."""
    root = c.export("stored_header_claims_more")
    npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
    data = npz.read_bytes()
    assert data.count(b"(20, 4, 3, 4, 5)") == 1
    npz.write_bytes(data.replace(b"(20, 4, 3, 4, 5)", b"(99, 4, 3, 4, 5)"))
    _edit(_attn(root) / "layer_01_metadata.json", heatmaps_shape=DROP)
    c.add("stored_header_claims_more", root, ERROR, "declares 23760 bytes")

    root = c.export("deflated_header_claims_more")
    npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
    members = _npy_members(npz)
    members["heatmaps.npy"] = members["heatmaps.npy"].replace(b"(20, 4, 3, 4, 5)", b"(99, 4, 3, 4, 5)")
    npz.write_bytes(_npz_bytes(members, zipfile.ZIP_DEFLATED))
    c.add("deflated_header_claims_more", root, ERROR, "declares")

    # Deflated zeros that expand to gigabytes: the member's header and the zip declare 2 GiB.
    root = c.export("deflated_zeros_2_gib")
    npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
    header = _npy(np.zeros((0,), np.uint8)).replace(b"(0,)", b"(2147483648,)")
    header = header[:8] + struct.pack("<H", len(header) - 10) + header[10:]
    payload = _deflate(header + bytes(1 << 16))
    npz.write_bytes(raw_zip([{"name": "heatmaps.npy", "payload": payload, "method": 8,
                              "size": len(header) + (2 << 30), "crc": 0}]))  # fmt: skip
    c.add("deflated_zeros_2_gib", root, ERROR, "above the limit of 256 MiB")

    root = c.export("deflated_stream_longer_than_declared")
    npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
    entries = _zip_entries_of_npz(npz)
    real = entries[0]["payload"]
    entries[0].update(payload=_deflate(real + bytes(1 << 20)), method=8)
    npz.write_bytes(raw_zip(entries))
    c.add("deflated_stream_longer_than_declared", root, VIEW)  # the declared bytes are read, no more

    # Headers of every shape and dtype numpy's parser takes, each holding exactly the bytes it declares.
    for name, descr, shape, match in (
        ("npz_dtype_complex", "<c16", (20, 4, 3, 4, 5), "dtype complex128"),
        ("npz_dtype_unicode", "<U2", (20, 4, 3, 4, 5), "dtype str64"),
        ("npz_dtype_structured", [("a", "u1")], (20, 4, 3, 4, 5), "dtype"),
        ("npz_dtype_datetime", "<M8[s]", (20, 4, 3, 4, 5), "dtype datetime64"),
        ("npz_shape_negative", "|u1", (-20, 4, 3, 4, 5), "negative"),
        ("npz_shape_2_pow_64", "|u1", (2**32, 2**32, 0, 4, 5), "shape"),
        ("npz_shape_empty", "|u1", (20, 4, 3, 0, 5), "shape"),
        ("npz_shape_scalar", "|u1", (), "shape"),
    ):  # fmt: skip
        root = c.export(name)
        npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
        members = _npy_members(npz)
        count = max(0, int(np.prod(shape, dtype=object))) if shape else 1
        data = bytes(count * np.dtype(descr).itemsize) if count < 10**6 else b""
        header = repr({"descr": descr, "fortran_order": False, "shape": shape})
        members["heatmaps.npy"] = _npy_raw(header, data)
        npz.write_bytes(_npz_bytes(members))
        _edit_layers(root, heatmaps_shape=DROP)
        c.add(name, root, ERROR, match)

    root = c.export("npz_fortran_order")  # the same values, stored column-major: a correct view
    npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
    with np.load(npz) as stored:
        arrays = {key: stored[key] for key in stored.files}
    members = {f"{key}.npy": _npy(np.asfortranarray(value)) for key, value in arrays.items()}
    npz.write_bytes(_npz_bytes(members))
    c.add("npz_fortran_order", root, VIEW)

    for name, method in (("npy_header_4_gib_stored", zipfile.ZIP_STORED),
                         ("npy_header_4_gib_deflated", zipfile.ZIP_DEFLATED)):  # fmt: skip
        root = c.export(name)  # a version 2 header whose length field says 4 GiB, then zeros
        npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
        members = _npy_members(npz)
        members["heatmaps.npy"] = b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + bytes(1 << 20)
        npz.write_bytes(_npz_bytes(members, method))
        c.add(name, root, ERROR, "a .npy header of 4294967280 bytes")

    root = c.export("npy_version_3")
    npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
    members = _npy_members(npz)
    members["heatmaps.npy"] = b"\x93NUMPY\x03" + members["heatmaps.npy"][7:]
    npz.write_bytes(_npz_bytes(members))
    c.add("npy_version_3", root, ERROR, "version")

    root = c.export("npz_100000_members")
    npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
    npz.write_bytes(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 65535, 65535, 100_000 * 46, 0, 0))
    c.add("npz_100000_members", root, ERROR, "number of members")

    root = c.export("npz_empty_file")
    (_attn(root) / "layer_01/heatmaps_uint8.npz").write_bytes(b"")
    c.add("npz_empty_file", root, ERROR, "not a readable zip")

    root = c.export("npz_encrypted_member")
    npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
    npz.write_bytes(raw_zip([{**e, "flags": 1} for e in _zip_entries_of_npz(npz)]))
    c.add("npz_encrypted_member", root, ERROR, "encrypted")

    root = c.export("npz_object_member")
    npz = _attn(root) / "layer_01/heatmaps_uint8.npz"
    np.savez(
        npz,
        heatmaps=np.empty((20, 4, 3, 4, 5), dtype=object),
        special_mass=np.zeros((20, 4, 3, 5), np.float16),
    )
    c.add("npz_object_member", root, ERROR, "Python objects")

    root = c.export("compressed_export", write_synthetic_export(c.folder / "_basez" / "export", per_head=True,
                                                                compress=True))  # fmt: skip
    c.add("compressed_export", root, VIEW)

    root = c.export("stride_64", write_synthetic_export(c.folder / "_base64" / "export", H_p=4, W_p=5,
                                                        stride_h=64, stride_w=64, per_head=True))  # fmt: skip
    c.add("stride_64", root, VIEW)


def _zip_entries_of_npz(npz: Path) -> list[dict]:
    return [{"name": name, "payload": data, "size": len(data), "crc": zlib.crc32(data)}
            for name, data in _npy_members(npz).items()]  # fmt: skip


def _images(c: _Corpus) -> None:
    """Frames that are huge, of another size, another format, or not images."""
    huge = _blank_png(14000, 14000)
    root = c.export("png_14000_squared")
    (root / "images/frame_01.png").write_bytes(huge)
    c.add("png_14000_squared", root, ERROR, "above the limit")

    root = c.export("seed_png_14000_squared")
    for meta in [_attn(root) / "layers_manifest.json", *_attn(root).glob("*_metadata.json")]:
        data = json.loads(meta.read_text())
        data.pop("schema_version")
        meta.write_text(json.dumps(data))
    (root / "images/frame_01.png").write_bytes(huge)
    c.add("seed_png_14000_squared", root, ERROR, "above the limit")

    root = c.export("png_other_size")
    Image.new("RGB", (71, 56)).save(root / "images/frame_02.png")
    c.add("png_other_size", root, ERROR, "71x56, metadata says 70x56")

    root = c.export("png_is_text")
    (root / "images/frame_00.png").write_text("not an image at all")
    c.add("png_is_text", root, ERROR, "cannot read it")

    root = c.export("png_is_a_gif")
    Image.new("RGB", (70, 56)).save(root / "images/frame_00.png", format="GIF")
    c.add("png_is_a_gif", root, ERROR, "cannot read it")

    root = c.export("png_truncated")
    image = root / "images/frame_00.png"
    image.write_bytes(image.read_bytes()[:60])
    c.add("png_truncated", root, ERROR, "cannot read it")


def _zips(c: _Corpus) -> None:
    """Zipped exports: bombs, lies, encryption, links and names outside the root."""
    valid = c.folder / "_base_zip" / "export"
    shutil.copytree(c.base, valid)
    entries = _zip_entries_of(valid)

    def add_zip(name: str, zip_entries: list[dict], outcome: str, match: str = "") -> None:
        archive = c.folder / name / "export.zip"
        archive.parent.mkdir()
        archive.write_bytes(raw_zip(zip_entries))
        c.add(name, archive, outcome, match, opened=archive)

    archive = _zip_folder(valid, c.folder / "zip_valid.zip")
    c.add("zip_valid", archive, VIEW, opened=archive)

    npz_name = "export/attn_maps/layer_01/heatmaps_uint8.npz"
    header = _npy(np.zeros((0,), np.uint8)).replace(b"(0,)", b"(5368709120,)")
    header = header[:8] + struct.pack("<H", len(header) - 10) + header[10:]
    bomb = {"name": npz_name, "payload": _deflate(header + bytes(1 << 20)), "method": 8,
            "size": 5 << 30, "crc": 0}  # fmt: skip
    add_zip("zip_5_gib_member", [e for e in entries if e["name"] != npz_name] + [bomb], ERROR,
            "above what a zip of this size may extract to")  # fmt: skip

    lying = dict(next(e for e in entries if e["name"] == npz_name))
    lying.update(payload=_deflate(lying["payload"] + bytes(1 << 20)), method=8)
    add_zip("zip_member_longer_than_declared", [e for e in entries if e["name"] != npz_name] + [lying], VIEW)

    # Layer 2's NPZ entry pointing at layer 1's stored data (as overlapping zip bombs point many entries
    # at one kernel): layer 1 reads, layer 2 is refused.
    others = [e for e in entries if not e["name"].endswith("heatmaps_uint8.npz")]
    kernel = next(e for e in entries if e["name"] == npz_name)
    overlapping = [kernel, dict(kernel, name=npz_name.replace("layer_01", "layer_02"), data_of=len(others))]
    add_zip("zip_overlapping_entries", others + overlapping, ERROR, "layer_02/heatmaps_uint8.npz")

    bad_crc = dict(next(e for e in entries if e["name"] == npz_name), crc=12345)
    add_zip("zip_bad_crc", [e for e in entries if e["name"] != npz_name] + [bad_crc], ERROR, "cannot extract")

    add_zip("zip_encrypted", [{**e, "flags": 1} for e in entries], ERROR, "encrypted")
    add_zip("zip_method_ppmd", [{**e, "method": 98} for e in entries], ERROR, "compression method 98")
    for case, name in (("zip_slip", "export/../../evil.txt"), ("zip_absolute_name", "/tmp/evil.txt")):
        evil = {"name": name, "payload": b"x", "size": 1, "crc": zlib.crc32(b"x")}
        add_zip(case, [*entries, evil], ERROR, "outside the archive root")
    link = {"name": "export/images/frame_09.png", "payload": b"/etc/passwd", "size": 11,
            "crc": zlib.crc32(b"/etc/passwd"), "mode": stat.S_IFLNK | 0o777}  # fmt: skip
    add_zip("zip_symlink_member", [*entries, link], ERROR, "symlink")
    device = {"name": "export/images/dev", "payload": b"", "size": 0, "crc": 0, "mode": stat.S_IFCHR | 0o666}
    add_zip("zip_device_member", [*entries, device], ERROR, "not a regular file")
    add_zip("zip_duplicate_names", [*entries, entries[0]], ERROR, "stored twice")
    clash = {"name": "export/images/frame_00.png/inner", "payload": b"x", "size": 1, "crc": zlib.crc32(b"x")}
    add_zip("zip_file_and_folder", [*entries, clash], ERROR, "both a file and a folder")
    control = {"name": "export/images/a\x07b.png", "payload": b"x", "size": 1, "crc": zlib.crc32(b"x")}
    add_zip("zip_control_characters", [*entries, control], ERROR, "control characters")
    long_name = {"name": "export/" + "x" * 2000, "payload": b"x", "size": 1, "crc": zlib.crc32(b"x")}
    add_zip("zip_long_member_name", [*entries, long_name], ERROR, "entry name of 2007 characters")

    archive = c.folder / "zip_200000_entries" / "export.zip"
    archive.parent.mkdir()
    end64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 200_000, 200_000, 200_000 * 46, 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    archive.write_bytes(end64 + locator + end)
    c.add("zip_200000_entries", archive, ERROR, "number of members", opened=archive)

    archive = c.folder / "zip_truncated" / "export.zip"
    archive.parent.mkdir()
    archive.write_bytes(_zip_folder(valid, c.folder / "_tmp.zip").read_bytes()[:-100])
    c.add("zip_truncated", archive, ERROR, "not a readable zip", opened=archive)

    # Members within the per-member allowance that together exceed what the zip may extract to.
    padded = c.folder / "_base_padded" / "export"
    shutil.copytree(c.base, padded)
    pad = limits.MIN_ZIP_ALLOWANCE // 2 + (1 << 20)
    for layer in ("layer_01", "layer_02"):
        npz = _attn(padded) / layer / "heatmaps_uint8.npz"
        with np.load(npz) as data:
            arrays = {key: data[key] for key in data.files}
        np.savez(npz, **arrays, padding=np.zeros(pad, np.uint8))
    archive = _zip_folder(padded, c.folder / "zip_over_allowance.zip")
    c.add(
        "zip_over_allowance", archive, ERROR, "above what a zip of this size may extract to", opened=archive
    )


def _geometry(c: _Corpus) -> None:
    """The geometry part (the shared JSON and NPZ checks apply to it too)."""
    geometry = "geometry/geometry_metadata.json"
    root = c.export("geometry_metadata_symlink_outside")
    (root / geometry).unlink()
    (root / geometry).symlink_to(c.outside / "secret_geometry.json")
    c.add("geometry_metadata_symlink_outside", root, ERROR, "points outside", viewer_outcome="any")

    root = c.export("geometry_path_traversal")
    _edit(
        _attn(root) / "layers_manifest.json", geometry={"metadata_path": "../../outside/secret_geometry.json"}
    )
    c.add("geometry_path_traversal", root, ERROR, "points outside", viewer_outcome="any")

    root = c.export("geometry_frames_disagree")
    _edit(root / geometry, S=100_000_000)
    c.add("geometry_frames_disagree", root, ERROR, "the export has 3", viewer_outcome="any")

    root = c.export("geometry_deep_json")
    (root / geometry).write_text('{"S": ' + "[" * 5000 + "]" * 5000 + "}")
    c.add("geometry_deep_json", root, ERROR, "nested", viewer_outcome="any")

    root = c.export("geometry_header_claims_more")
    npz = root / "geometry/geometry.npz"
    entries = _zip_entries_of_npz(npz)
    for entry in entries:
        if entry["name"] == "depth.npy":
            shape = f"({3}, {56}, {70})".encode()
            assert entry["payload"].count(shape) == 1
            entry["payload"] = entry["payload"].replace(shape, b"(9, 56, 70)")
    npz.write_bytes(raw_zip(entries))
    c.add("geometry_header_claims_more", root, ERROR, "declares", viewer_outcome="any")


def _geometry_values(c: _Corpus) -> None:
    """Geometry arrays of the right shapes holding NaN and infinities (drawn in the 3D view and markers)."""
    root = c.export("geometry_nan_and_infinity")
    npz = root / "geometry/geometry.npz"
    with np.load(npz) as stored:
        arrays = {key: stored[key] for key in stored.files}
    for key, values in arrays.items():
        if values.dtype.kind == "f":
            values = values.copy()
            values.reshape(-1)[0::3] = np.nan
            values.reshape(-1)[1::3] = np.inf
            arrays[key] = values
    np.savez(npz, **arrays)
    c.add("geometry_nan_and_infinity", root, VIEW, viewer_outcome="any")

    root = c.export("geometry_npz_symlink_outside")
    (root / "geometry/geometry.npz").unlink()
    (root / "geometry/geometry.npz").symlink_to(c.outside / "secret.npz")
    c.add("geometry_npz_symlink_outside", root, ERROR, "points outside", viewer_outcome="any")


def _analysis(c: _Corpus) -> None:
    """The analysis kept beside an export (``analysis/``), which the viewer reads back and writes: links
    there must neither be read nor written through, and what is read is held to the format's caps."""
    from vggt.analysis.store import analysis_for
    from vggt.attn_format import open_export

    analysed = c.folder / "_base_analysis" / "export"
    shutil.copytree(c.base, analysed)
    with open_export(analysed) as export:
        assert analysis_for(export)[1] == "saved"
    saved = analysed / "analysis"
    shutil.copy(saved / "summary.json", c.outside / "secret_summary.json")
    (c.outside / "analysis_folder").mkdir()

    root = c.export("analysis_saved", analysed)
    c.add("analysis_saved", root, VIEW)

    root = c.export("analysis_links_where_files_are_written")
    (root / "analysis").mkdir()
    for name in ("summary.json", "per_query.npz", "layer_head_metrics.csv"):
        for link in (name, f"{name}.tmp", f".{name}.tmp"):
            (root / "analysis" / link).symlink_to(c.outside / "victim.txt")
    c.add("analysis_links_where_files_are_written", root, VIEW)

    root = c.export("analysis_folder_link_outside")
    (root / "analysis").symlink_to(c.outside / "analysis_folder")
    c.add("analysis_folder_link_outside", root, VIEW)

    root = c.export("analysis_summary_link_outside", analysed)
    (root / "analysis/summary.json").unlink()
    (root / "analysis/summary.json").symlink_to(c.outside / "secret_summary.json")
    c.add("analysis_summary_link_outside", root, VIEW)

    root = c.export("analysis_summary_deep_json", analysed)
    (root / "analysis/summary.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    c.add("analysis_summary_deep_json", root, VIEW)

    root = c.export("analysis_arrays_deflated_2_gib", analysed)
    header = _npy(np.zeros((0,), np.float32)).replace(b"(0,)", b"(536870912,)")
    header = header[:8] + struct.pack("<H", len(header) - 10) + header[10:]
    (root / "analysis/per_query.npz").write_bytes(raw_zip([{
        "name": "entropy.npy", "payload": _deflate(header + bytes(1 << 16)), "method": 8,
        "size": len(header) + (2 << 30), "crc": 0}]))  # fmt: skip
    c.add("analysis_arrays_deflated_2_gib", root, VIEW)

    root = c.export("analysis_arrays_of_a_million_rows", analysed)
    npz = root / "analysis/per_query.npz"
    with np.load(npz) as stored:
        arrays = {key: stored[key] for key in stored.files}
    arrays["layer"] = np.array(["layer_01"] * 1_000_000)
    np.savez(npz, **arrays)
    c.add("analysis_arrays_of_a_million_rows", root, VIEW)

    root = c.export("analysis_arrays_pickled", analysed)
    npz = root / "analysis/per_query.npz"
    with np.load(npz) as stored:
        arrays = {key: stored[key] for key in stored.files}
    arrays["layer"] = np.array([object()] * arrays["layer"].size, dtype=object)
    np.savez(npz, **arrays)
    c.add("analysis_arrays_pickled", root, VIEW)


def _interventions(c: _Corpus) -> None:
    """An intervention sweep's ``results.csv`` sent with the export, opened in the Analysis tab: as many
    rows as the reader takes, on heads and layers the export has and has not, markup in its names."""
    from vggt.intervention_results import COLUMNS, MAX_HEAD, MAX_ROWS, NUMBER_COLUMNS

    root = c.export("interventions_results_all_rows")
    numbers = ",".join(["0.5"] * len(NUMBER_COLUMNS))
    lines = [",".join(COLUMNS)]
    for row in range(MAX_ROWS):
        head = 1 + row % MAX_HEAD
        lines.append(f"<img src=x> {row},ablate_heads,global:{1 + row % 3},{head},{numbers}")
    (root / "results.csv").write_text("\n".join(lines) + "\n")
    c.add("interventions_results_all_rows", root, VIEW)


def build_corpus(folder: Path) -> list[Case]:
    """Write every hostile case under ``folder`` (a fresh, empty folder) and return the cases."""
    corpus = _Corpus(folder)
    for group in (
        _caps,
        _json,
        _paths,
        _npz,
        _images,
        _zips,
        _geometry,
        _geometry_values,
        _analysis,
        _interventions,
    ):
        group(corpus)
    return corpus.cases


HUB_CACHE = "hub_cache"  # under the corpus folder: HF_HUB_CACHE of the child, read offline
# Outcomes that differ through the hub: a dataset holds no file of that name, and read offline the reader
# cannot know which files the dataset holds beyond the cache (a seed export's frame found nowhere is
# then a missing file, not a gray frame).
_NOT_CACHED = (ERROR, "is not in the local Hugging Face cache")
_HUB_OUTCOMES = {"npz_path_markup": _NOT_CACHED, "seed_paths_outside": _NOT_CACHED}


def publish_on_hub(cases: list[Case], folder: Path) -> list[Case]:
    """The cases whose damage is in their files' contents (not in links, special files or names a
    dataset cannot hold), also laid out in a Hugging Face cache under ``folder`` as the hub lays out a
    downloaded dataset ``hostile/<case>``; returns those cases as ``hf://datasets/...`` paths."""
    from tests.test_hub import publish

    published = []
    for case in cases:
        root = Path(case.bound)
        entries = list(root.rglob("*"))
        if case.path != case.bound or not root.is_dir() or case.name.startswith("analysis_"):
            continue
        if any(path.is_symlink() or not (path.is_file() or path.is_dir()) for path in entries):
            continue
        if any(path.is_dir() and path.suffix for path in entries):  # a folder where a file belongs
            continue
        publish(folder / HUB_CACHE, root, repo_id=f"hostile/{case.name}")
        repo = folder / HUB_CACHE / f"datasets--hostile--{case.name}"
        outcome, match = _HUB_OUTCOMES.get(case.name, (case.outcome, case.match))
        published.append(Case(f"hub_{case.name}", f"hf://datasets/hostile/{case.name}", str(repo),
                              outcome, match, case.viewer_outcome))  # fmt: skip
    return published


def write_cases(cases: list[Case], path: Path) -> None:
    path.write_text(json.dumps([asdict(case) for case in cases]))


def read_cases(path: Path) -> list[Case]:
    return [Case(**item) for item in json.loads(path.read_text())]


CaseBuilder = Callable[[_Corpus], None]
