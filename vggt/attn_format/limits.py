"""Caps on what an export may ask the reader to hold, and the checks that enforce them.

An export comes from someone else, so every number in it is hostile until checked against the bytes
that are really there. The reader checks each cap *before* allocating anything it governs; a file or
field beyond a cap is refused with a one-line :class:`~vggt.attn_format.schema.FormatError` naming the
cap. ``attn_maps_schema.md`` lists the same values (section "Limits").

Anything else that reads files of an export (its geometry, a download from the Hugging Face Hub) uses
the same checks: :func:`check_file_size`, :func:`check_zip_directory`, :func:`read_capped`,
:func:`~vggt.attn_format.schema.read_json` and :func:`~vggt.attn_format.npz.scan_npz`.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from vggt.attn_format.errors import FormatError

# ---- the caps (attn_maps_schema.md, "Limits") ---------------------------------------------------------

MAX_FRAMES = 1024  # S: frames of an export
MAX_LAYERS = 256  # layers listed by a manifest
MAX_HEADS = 256  # num_heads of a layer
MAX_IMAGE_SIDE = 4096  # each side of image_size, in pixels (also bounds H_p, W_p, H_ds, W_ds, strides)
MAX_PATCH_SIZE = 64  # patch_size, in pixels
MAX_SPECIAL_TOKENS = 64  # names in special_tokens
MAX_TOKEN_QUERIES = 4 * MAX_FRAMES  # rows of token_heatmaps
MAX_SOURCE_IMAGE_PIXELS = 50_000_000  # a seed export's copied original image, before resizing
MAX_SOURCE_IMAGE_SIDE = 16384
MAX_NAME_CHARS = 256  # names shown to the user: set, frame sources, layers, tokens, model id
MAX_STRING_CHARS = 4096  # any string in a JSON file (paths included)

MAX_JSON_BYTES = 4 << 20  # one JSON file
MAX_JSON_DEPTH = 32  # nesting of arrays and objects
MAX_JSON_NUMBER_CHARS = 40  # digits (and sign, point, exponent) of one number
MAX_JSON_VALUES = 400_000  # values (numbers, strings, arrays, objects) in one JSON file
MAX_EXPORT_JSON_VALUES = 2_000_000  # values in all of an export's JSON files together

MAX_NPZ_MEMBERS = 64  # members of one NPZ file
MAX_NPY_HEADER_BYTES = 10_000  # the text header of one .npy member (numpy's own default)
MAX_INFLATED_MEMBER_BYTES = 256 << 20  # one deflated NPZ member, decompressed into memory
MAX_INFLATED_CACHE_BYTES = 512 << 20  # deflated members one export keeps decompressed at a time
MAX_DECODED_FRAMES_BYTES = 256 << 20  # all frames decoded at once (AttnExport.frames)

MAX_ZIP_ENTRIES = 100_000  # members of a zipped export
MAX_ZIP_NAME_CHARS = 1024  # a member's name in a zipped export
MAX_ZIP_DIRECTORY_BYTES = 64 << 20  # a zip's central directory
MAX_ZIP_RATIO = 50  # what a zip may extract to, relative to its own size ...
MIN_ZIP_ALLOWANCE = 64 << 20  # ... but at least this much ...
MAX_ZIP_EXTRACT_BYTES = 16 << 30  # ... and never more than this, for the whole extraction
ZIP_FREE_SPACE_MARGIN = 256 << 20  # disk space left free in the temporary folder after extracting
MAX_DOWNLOAD_BYTES = 64 << 30  # what one export read from the Hugging Face Hub may download, all files


def mib(size: int) -> str:
    """``size`` bytes as a short human figure (``"256 MiB"``, ``"1.5 GiB"``)."""
    if size >= 1 << 30:
        return f"{size / (1 << 30):.3g} GiB"
    if size >= 1 << 20:
        return f"{size / (1 << 20):.3g} MiB"
    return f"{size} bytes"


def zip_allowance(zip_size: int) -> int:
    """Bytes a zip of ``zip_size`` bytes may extract to, all members together (and each member)."""
    return min(MAX_ZIP_EXTRACT_BYTES, max(MIN_ZIP_ALLOWANCE, MAX_ZIP_RATIO * zip_size))


def check_count(value: int, cap: int, what: str) -> None:
    """``value`` (a count the export declares) must not exceed ``cap``."""
    if value > cap:
        raise FormatError(f"{what} is {value}, above the limit of {cap}")


def check_name(value: str, what: str) -> None:
    """A name shown to the user holds at most :data:`MAX_NAME_CHARS` characters."""
    if len(value) > MAX_NAME_CHARS:
        raise FormatError(f"{what} is {len(value)} characters long (at most {MAX_NAME_CHARS})")


def check_file_size(size: int, cap: int, what: str) -> None:
    """A file of ``size`` bytes must not exceed ``cap`` (checked before it is read)."""
    if size > cap:
        raise FormatError(f"{what} is {mib(size)}, above the limit of {mib(cap)}")


def regular_file_size(path: Path, what: str) -> int:
    """Size of ``path``, which must be a regular file (not a folder, pipe or device)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{what} not found") from None
    except (OSError, ValueError) as exc:
        raise FormatError(f"cannot read {what} ({type(exc).__name__})") from None
    if not stat.S_ISREG(status.st_mode):
        raise FormatError(f"{what} is not a regular file")
    return status.st_size


def read_capped(path: Path, cap: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, refused when it holds more than ``cap`` bytes."""
    check_file_size(regular_file_size(path, what), cap, what)
    try:
        with open(path, "rb") as handle:
            data = handle.read(cap + 1)
    except OSError as exc:
        raise FormatError(f"cannot read {what} ({exc.strerror or type(exc).__name__})") from None
    check_file_size(len(data), cap, what)  # it grew after the stat
    return data


# ---- zip directories ----------------------------------------------------------------------------------

_END = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_END_SEARCH = _END.size + 0xFFFF  # the record is followed by a comment of at most 64 KiB


def check_zip_directory(path: Path, max_entries: int, what: str) -> tuple[int, int, int]:
    """Read a zip's end record and refuse a directory too large to parse, before ``zipfile`` reads it.

    Parameters
    ----------
    path : Path
        The zip (an export's zip or an NPZ), a regular file.
    max_entries : int
        The most members it may have.
    what : str
        Description used in error messages.

    Returns
    -------
    tuple of int
        ``(entries, directory_offset, directory_size)`` as the end record states them.
    """
    size = regular_file_size(path, what)
    try:
        with open(path, "rb") as handle:
            start = max(0, size - _END_SEARCH)
            handle.seek(start)
            tail = handle.read(size - start)
            position = tail.rfind(b"PK\x05\x06")
            if position < 0 or position + _END.size > len(tail):
                raise FormatError(f"{what} is not a readable zip (no end record); truncated or corrupt?")
            _, _, _, _, entries, directory_size, directory_offset, _ = _END.unpack_from(tail, position)
            locator_at = start + position - _ZIP64_LOCATOR.size
            if locator_at >= 0:
                handle.seek(locator_at)
                locator = handle.read(_ZIP64_LOCATOR.size)
                if locator[:4] == b"PK\x06\x07":
                    _, _, end64_at, _ = _ZIP64_LOCATOR.unpack(locator)
                    if end64_at + _ZIP64_END.size > size:
                        raise FormatError(f"{what} is not a readable zip (bad zip64 record)")
                    handle.seek(end64_at)
                    record = handle.read(_ZIP64_END.size)
                    if record[:4] != b"PK\x06\x06":
                        raise FormatError(f"{what} is not a readable zip (bad zip64 record)")
                    fields = _ZIP64_END.unpack(record)
                    entries, directory_size, directory_offset = fields[7], fields[8], fields[9]
    except OSError as exc:
        raise FormatError(f"cannot read {what} ({exc.strerror or type(exc).__name__})") from None
    check_count(entries, max_entries, f"the number of members of {what}")
    check_file_size(directory_size, min(MAX_ZIP_DIRECTORY_BYTES, size), f"the directory of {what}")
    return entries, directory_offset, directory_size
