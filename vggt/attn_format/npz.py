"""NPZ files of an export: member headers read without the data, stored members memory-mapped, and
the writer of stored NPZ files (large members page-aligned, written with direct I/O).

numpy's own ``np.load`` reads a whole member; an export's reader wants one query's maps, so stored
(uncompressed) members are located in the zip and memory-mapped, and deflated ones are decompressed
once. Nothing is ever unpickled. What :class:`StoredNpzWriter` writes, ``np.load`` reads as usual.
"""

from __future__ import annotations

import errno
import io
import math
import mmap
import os
import struct
import tokenize
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vggt.attn_format import limits
from vggt.attn_format.errors import FormatError

_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"
_STREAM_BLOCK_BYTES = 1 << 20  # a deflated member is decompressed this much at a time
# Members with at least this much data start on a page boundary and are written with direct I/O.
_DIRECT_MIN_BYTES = 4 << 20
_PAGE = 4096  # direct I/O writes whole pages from page-aligned memory
_DIRECT_CHUNK = 8 << 20  # bytes gathered per direct write

# What zipfile, zlib and numpy's header parser raise on damaged bytes (the header is parsed as a
# Python literal, hence the tokenizer and syntax errors).
DAMAGED_DATA_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    ValueError,
    EOFError,
    OSError,
    SyntaxError,
    tokenize.TokenError,
    struct.error,
)


@dataclass(frozen=True)
class NpyMember:
    """Where one ``.npy`` member of an NPZ lives and what its header says."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    stored: bool
    data_offset: int  # absolute file offset of the array bytes; only meaningful when stored

    @property
    def nbytes(self) -> int:
        """Bytes of the array's data, as its header declares them (exact Python integers)."""
        return math.prod(self.shape) * self.dtype.itemsize


_NPY_HEADER_LENGTH = {(1, 0): struct.Struct("<H"), (2, 0): struct.Struct("<I")}


def _read_npy_header(handle: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, order and dtype from the ``.npy`` header at ``handle``'s position, which is left just after
    it. The header's length field is checked against :data:`~.limits.MAX_NPY_HEADER_BYTES` before the
    header is read (numpy would read whatever length it states)."""
    try:
        version = np.lib.format.read_magic(handle)
        length_field = _NPY_HEADER_LENGTH.get(version)
        if length_field is None:
            raise FormatError(f"{where}: unsupported .npy format version {version}")
        length_bytes = handle.read(length_field.size)
        (length,) = length_field.unpack(length_bytes)
        if length > limits.MAX_NPY_HEADER_BYTES:
            raise FormatError(
                f"{where}: a .npy header of {length} bytes (at most {limits.MAX_NPY_HEADER_BYTES})"
            )
        header = io.BytesIO(np.lib.format.magic(*version) + length_bytes + handle.read(length))
        np.lib.format.read_magic(header)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(header)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(header)
    except FormatError:
        raise
    except DAMAGED_DATA_ERRORS as exc:
        raise FormatError(f"{where}: bad .npy header ({type(exc).__name__}: {exc})") from None
    if any(size < 0 for size in shape):
        raise FormatError(f"{where}: a .npy header with a negative dimension {list(shape)}")
    return shape, fortran_order, dtype


def _check_member_info(info: zipfile.ZipInfo, path: Path, where: str) -> None:
    if info.flag_bits & 0x1:
        raise FormatError(f"{where}: NPZ {path.name} is encrypted (refused)")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise FormatError(
            f"{where}: NPZ {path.name} uses compression method {info.compress_type} "
            "(only stored and deflated members are read)"
        )
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise FormatError(f"{where}: NPZ {path.name} has a stored member whose sizes disagree")


def scan_npz(path: Path, where: str) -> dict[str, NpyMember]:
    """Read the zip directory and every member's ``.npy`` header, without reading array data.

    Each member's header must declare exactly the bytes the member holds (stored members: in the file,
    before the zip directory; deflated members: its decompressed size, at most
    :data:`~.limits.MAX_INFLATED_MEMBER_BYTES`); objects, encryption and other compressions are refused.
    Shared by every reader of NPZ files in an export.
    """
    members: dict[str, NpyMember] = {}
    limits.check_zip_directory(path, limits.MAX_NPZ_MEMBERS, f"{where}: NPZ {path.name}")
    file_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                _check_member_info(info, path, where)
                key = info.filename[: -len(".npy")]
                if key in members:
                    raise FormatError(f"{where}: NPZ {path.name} holds {key!r} twice")
                stored = info.compress_type == zipfile.ZIP_STORED
                if stored:
                    raw.seek(info.header_offset)
                    header = raw.read(_ZIP_LOCAL_HEADER.size)
                    if len(header) < _ZIP_LOCAL_HEADER.size:
                        raise FormatError(f"{where}: truncated NPZ {path.name}")
                    fields = _ZIP_LOCAL_HEADER.unpack(header)
                    if fields[0] != _ZIP_LOCAL_SIGNATURE:
                        raise FormatError(f"{where}: NPZ {path.name} has a corrupt member header")
                    name_length, extra_length = fields[-2], fields[-1]
                    member_start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length
                    raw.seek(member_start)
                    shape, fortran_order, dtype = _read_npy_header(raw, where)
                    data_offset = raw.tell()
                    header_bytes = data_offset - member_start
                    member_end = member_start + info.file_size
                    if member_end > min(archive.start_dir, file_size):
                        raise FormatError(
                            f"{where}: truncated NPZ {path.name} (member {key!r} runs past its end)"
                        )
                else:
                    with archive.open(info) as stream:
                        shape, fortran_order, dtype = _read_npy_header(stream, where)
                        header_bytes = stream.tell()
                    data_offset = -1
                if dtype.hasobject:
                    raise FormatError(
                        f"{where}: NPZ member {key!r} holds Python objects (refused, never unpickled)"
                    )
                member = NpyMember(key, dtype, tuple(shape), fortran_order, stored, data_offset)
                if header_bytes + member.nbytes != info.file_size:
                    raise FormatError(
                        f"{where}: NPZ {path.name}: member {key!r} declares {member.nbytes} bytes of data "
                        f"but holds {info.file_size - header_bytes}"
                    )
                if not stored:
                    limits.check_file_size(
                        member.nbytes,
                        limits.MAX_INFLATED_MEMBER_BYTES,
                        f"{where}: deflated NPZ member {key!r} of {path.name}, decompressed,",
                    )
                members[key] = member
    except FormatError:
        raise
    except zipfile.BadZipFile as exc:
        raise FormatError(
            f"{where}: {path.name} is not a readable NPZ ({exc}); truncated or corrupt?"
        ) from None
    except DAMAGED_DATA_ERRORS as exc:
        raise FormatError(f"{where}: cannot read NPZ {path.name} ({type(exc).__name__}: {exc})") from None
    return members


def load_member(path: Path, member: NpyMember, where: str) -> np.ndarray:
    """A member's array: a read-only ``np.memmap`` when stored, decompressed into memory when deflated
    (read against the header :func:`scan_npz` checked, never re-sized from the stream)."""
    order = "F" if member.fortran_order else "C"
    if member.nbytes == 0:
        return np.zeros(member.shape, dtype=member.dtype, order=order)
    try:
        if member.stored:
            return np.memmap(
                path, dtype=member.dtype, mode="r", offset=member.data_offset, shape=member.shape, order=order
            )
        limits.check_file_size(
            member.nbytes, limits.MAX_INFLATED_MEMBER_BYTES, f"{where}: deflated NPZ member {member.key!r}"
        )
        array = np.empty(member.shape, dtype=member.dtype, order=order)
        with zipfile.ZipFile(path) as archive, archive.open(f"{member.key}.npy") as stream:
            if _read_npy_header(stream, where) != (member.shape, member.fortran_order, member.dtype):
                raise FormatError(f"{where}: NPZ {path.name} changed while it was read")
            buffer = array.reshape(-1, order="A").view(np.uint8)
            filled = 0
            while filled < len(buffer):
                count = stream.readinto(memoryview(buffer)[filled : filled + _STREAM_BLOCK_BYTES])
                if not count:
                    raise FormatError(f"{where}: NPZ member {member.key!r} of {path.name} is truncated")
                filled += count
            if stream.read(1):
                raise FormatError(f"{where}: NPZ member {member.key!r} of {path.name} holds extra data")
        array.flags.writeable = False
        return array
    except FormatError:
        raise
    except MemoryError:
        raise FormatError(
            f"{where}: not enough memory to read {member.key} of {path.name} ({limits.mib(member.nbytes)})"
        ) from None
    except DAMAGED_DATA_ERRORS as exc:
        raise FormatError(
            f"{where}: cannot read {member.key} from {path.name} ({type(exc).__name__}: {exc})"
        ) from None


# ---- writing ------------------------------------------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_CRC_OFFSET = 14  # signature, version, flags, method, time and date come first
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_ZIP64_VERSION = 45  # "ZIP64 format extensions" in the zip specification
_FROM_UNIX = 3 << 8
_REGULAR_FILE = 0o100644 << 16
_SIZE_IN_EXTRA = 0xFFFFFFFF
_DOS_DATE_1980_01_01 = (0 << 9) | (1 << 5) | 1


_LOCAL_EXTRA_SIZE = struct.calcsize("<HHQQ")  # the zip64 sizes in each local header
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere all data go through the file object
_REFUSED_DIRECT = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


@dataclass
class _Entry:
    name: bytes
    header_offset: int
    size: int
    crc: int


class _FileSink:
    """A member's data written through the file object, at its current position."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self._file = file

    def __enter__(self) -> _FileSink:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def write(self, data: np.ndarray) -> None:
        self._file.write(data)


class _DirectSink:
    """A member's data written with direct I/O, from a page-aligned file offset on.

    A multi-GB export then neither costs a copy into the page cache nor evicts what the cache held (the
    model's weights among it). Data in page-aligned memory are written as they are; other data are
    gathered into two page-aligned buffers that a thread of their own writes in turn, so the disk works
    while the next buffer fills. The last partial page goes through the ordinary descriptor, and so does
    everything once the file system refuses a direct write.
    Used as a context manager: a clean exit writes what is left and waits for the disk.
    """

    def __init__(self, path: Path, plain_fd: int, offset: int) -> None:
        self._direct_fd = os.open(path, os.O_WRONLY | _O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        self._plain_fd = plain_fd
        self._direct = True
        self._offset = offset  # file offset of the current buffer's first byte
        # Anonymous maps start on a page boundary; untouched pages cost nothing.
        self._buffers = [mmap.mmap(-1, _DIRECT_CHUNK) for _ in range(2)]
        self._current, self._filled = 0, 0
        self._writer = ThreadPoolExecutor(1)
        self._pending: Future | None = None

    def __enter__(self) -> _DirectSink:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                if self._filled:
                    self._submit()
                if self._pending is not None:
                    self._pending.result()
        finally:
            self._writer.shutdown(wait=True)
            os.close(self._direct_fd)

    def write(self, data: np.ndarray) -> None:
        """Append ``data``, a contiguous 1-D uint8 array."""
        view = memoryview(data)
        if not self._filled and data.ctypes.data % _PAGE == 0 and len(view) >= _PAGE:
            # Page-aligned memory goes to the disk as it is, whole pages of it; the rest is staged.
            pages = len(view) - len(view) % _PAGE
            self._write_out(view[:pages], self._offset)
            self._offset += pages
            view = view[pages:]
        taken = 0
        while taken < len(view):
            count = min(len(view) - taken, _DIRECT_CHUNK - self._filled)
            buffer = self._buffers[self._current]
            buffer[self._filled : self._filled + count] = view[taken : taken + count]
            self._filled += count
            taken += count
            if self._filled == _DIRECT_CHUNK:
                self._submit()

    def _submit(self) -> None:
        """Hand the current buffer to the writer thread and go on with the other one."""
        if self._pending is not None:
            self._pending.result()  # the other buffer is on disk: it may be refilled
        filled = memoryview(self._buffers[self._current])[: self._filled]
        self._pending = self._writer.submit(self._write_out, filled, self._offset)
        self._offset += self._filled
        self._current, self._filled = 1 - self._current, 0

    def _write_out(self, view: memoryview, offset: int) -> None:
        """Write ``view`` at ``offset``: its whole pages directly while the file system takes that."""
        pages = len(view) - len(view) % _PAGE
        if pages and self._direct:
            try:
                _write_all(self._direct_fd, view[:pages], offset)
                view, offset = view[pages:], offset + pages
            except OSError as exc:
                if exc.errno not in _REFUSED_DIRECT:
                    raise
                self._direct = False  # the whole buffer again, the ordinary way, and from now on
        _write_all(self._plain_fd, view, offset)


_Sink = _FileSink | _DirectSink


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until all of ``data`` is at ``offset``."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _npy_header(shape: tuple[int, ...], dtype: np.dtype, file_offset: int = 0, align: int = 1) -> bytes:
    """An ``.npy`` version 1.0 header written at ``file_offset``, padded with spaces so that the array
    data after it starts at a multiple of ``align`` in the file."""
    stream = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(stream, header)
    raw = stream.getvalue()
    padding = -(file_offset + len(raw)) % align
    if not padding:
        return raw
    # numpy pads the dictionary with spaces up to a final newline; the length field follows the magic.
    (length,) = struct.unpack_from("<H", raw, 8)
    return raw[:8] + struct.pack("<H", length + padding) + raw[10:-1] + b" " * padding + b"\n"


def write_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool = False) -> None:
    """Write an NPZ through a temporary file renamed into place: deflated with numpy's own writer when
    ``compress``, else stored with :class:`StoredNpzWriter` (so members can be memory-mapped)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        if compress:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, **{key: np.asarray(array) for key, array in arrays.items()})
        else:
            with StoredNpzWriter(tmp) as npz:
                for key, array in arrays.items():
                    npz.add(key, array)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


class StoredNpzWriter:
    """Writes an uncompressed NPZ that ``np.load`` reads.

    Members are stored (not deflated) with zip64 sizes, so they may exceed 4 GB; those of 4 MB or more
    start on a page and go to the disk with direct I/O while another thread computes their CRC-32. Use as
    a context manager: the zip directory is written on a clean exit.
    """

    def __init__(self, path: Path, direct_io: bool = True) -> None:
        self.path = Path(path)
        self.direct_io = direct_io
        self._file = open(self.path, "wb")
        self._entries: list[_Entry] = []

    def __enter__(self) -> StoredNpzWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            self._file.close()

    def add(self, key: str, data: np.ndarray) -> None:
        """Write member ``key`` (``key.npy``) holding the array ``data``."""
        array = np.ascontiguousarray(data)
        shape, dtype = array.shape, array.dtype
        if dtype.hasobject:
            raise FormatError(f"NPZ member {key!r}: object arrays are not stored")
        name = f"{key}.npy".encode()
        data_bytes = math.prod(shape) * dtype.itemsize
        direct = data_bytes >= _DIRECT_MIN_BYTES
        header_offset = self._file.seek(0, io.SEEK_END)
        header_start = header_offset + _LOCAL_HEADER.size + len(name) + _LOCAL_EXTRA_SIZE
        header = _npy_header(shape, dtype, header_start, _PAGE if direct else 1)
        size = len(header) + data_bytes
        extra = struct.pack("<HHQQ", 1, 16, size, size)
        local_header = _LOCAL_HEADER.pack(
            0x04034B50, _ZIP64_VERSION, 0, 0, 0, _DOS_DATE_1980_01_01, 0,
            _SIZE_IN_EXTRA, _SIZE_IN_EXTRA, len(name), len(extra),
        )  # fmt: skip
        self._file.write(local_header + name + extra + header)
        crc = zlib.crc32(header)
        with self._data_sink(header_start + len(header) if direct and self.direct_io else None) as sink:
            if direct:
                # A large member's checksum is computed while the disk writes it (zlib lets go of the GIL).
                with ThreadPoolExecutor(1, thread_name_prefix="npz-crc") as pool:
                    checksum = pool.submit(zlib.crc32, array, crc)
                    sink.write(array.reshape(-1).view(np.uint8))
                    crc = checksum.result()
            else:
                crc = zlib.crc32(array, crc)
                if array.size:
                    sink.write(array.reshape(-1).view(np.uint8))
        # The CRC is known only now: patch it into the local header written ahead of the data.
        self._file.seek(header_offset + _LOCAL_CRC_OFFSET)
        self._file.write(struct.pack("<I", crc))
        self._file.seek(0, io.SEEK_END)
        self._entries.append(_Entry(name, header_offset, size, crc))

    def _data_sink(self, data_offset: int | None) -> _Sink:
        """Where a member's data go: through the file object, or, for data starting at the page-aligned
        ``data_offset``, straight to the disk where the file system takes direct I/O."""
        if data_offset is not None and _O_DIRECT:
            self._file.flush()  # what the file object holds lands before the direct writes
            try:
                return _DirectSink(self.path, self._file.fileno(), data_offset)
            except OSError:  # a file system without direct I/O (tmpfs, some FUSE mounts)
                pass
        return _FileSink(self._file)

    def _finish(self) -> None:
        directory_offset = self._file.seek(0, io.SEEK_END)
        for entry in self._entries:
            extra = struct.pack("<HHQQQ", 1, 24, entry.size, entry.size, entry.header_offset)
            self._file.write(
                _CENTRAL_HEADER.pack(
                    0x02014B50,
                    _ZIP64_VERSION | _FROM_UNIX,
                    _ZIP64_VERSION,
                    0,
                    0,
                    0,
                    _DOS_DATE_1980_01_01,
                    entry.crc,
                    _SIZE_IN_EXTRA,
                    _SIZE_IN_EXTRA,
                    len(entry.name),
                    len(extra),
                    0,
                    0,
                    0,
                    _REGULAR_FILE,
                    _SIZE_IN_EXTRA,
                )  # fmt: skip
            )
            self._file.write(entry.name + extra)
        end_offset = self._file.tell()
        count, directory_size = len(self._entries), end_offset - directory_offset
        self._file.write(
            _ZIP64_END.pack(
                0x06064B50,
                _ZIP64_END.size - 12,
                _ZIP64_VERSION,
                _ZIP64_VERSION,
                0,
                0,
                count,
                count,
                directory_size,
                directory_offset,
            )  # fmt: skip
        )
        self._file.write(_ZIP64_LOCATOR.pack(0x07064B50, 0, end_offset, 1))
        self._file.write(_END.pack(0x06054B50, 0, 0, count, count, _SIZE_IN_EXTRA, _SIZE_IN_EXTRA, 0))
