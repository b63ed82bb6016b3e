"""Where an export's files are: every file the reader opens lies inside the export, and a zipped export
is extracted safely, once per content, only as far as it is read.

An export is shared as a folder or a zip; neither may lead the reader to a file outside it. Both are
seen through :class:`ExportFiles`:

* :class:`FolderFiles`: a folder on disk. A location is the fully resolved path (links followed); it is
  readable when it lies inside the export's root and is a regular file.
* :class:`ZipFiles`: a zip, whose members are listed, checked (names inside the archive's root, no
  links, no encryption, known compression) before anything is written, and extracted on first read into
  a private temporary folder shared by every reader of the same zip content. Each member is streamed
  with a running size check; the whole extraction is capped relative to the zip's size and absolutely
  (:func:`~.limits.zip_allowance`). The folder is removed when the last reader releases it
  (:meth:`ZipFiles.close`, or when the reader is garbage-collected) and at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import weakref
import zipfile
from pathlib import Path, PurePosixPath

from vggt.attn_format import limits
from vggt.attn_format.errors import FormatError
from vggt.attn_format.npz import DAMAGED_DATA_ERRORS
from vggt.attn_format.schema import IMAGES_DIR_NAME, MANIFEST_NAME

_LENIENT_TAIL = 4  # a seed path is matched by at most its last components
_COPY_BLOCK = 1 << 20
ZIP_FOLDER_PREFIX = "vggt-attn-zip-"


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in ``root`` (both already resolved)."""
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def check_path_text(raw: object, what: str) -> str:
    """A path as written in an export or typed by a user: a non-empty string without NUL characters."""
    if not isinstance(raw, str) or not raw:
        raise FormatError(f"{what}: path must be a non-empty string")
    if "\x00" in raw:
        raise FormatError(f"{what}: path contains a NUL character")
    if len(raw) > limits.MAX_STRING_CHARS:
        raise FormatError(f"{what}: path of {len(raw)} characters (at most {limits.MAX_STRING_CHARS})")
    return raw


class ExportFiles:
    """The files of one export and the rule that keeps every read inside it.

    Attributes
    ----------
    root : Path
        The folder every file read lies in (resolved). For a zip, the extraction folder: a file there
        exists once :meth:`local` has extracted it.
    """

    root: Path

    def inside(self, path: Path) -> Path | None:
        """``path``'s location (links followed) when it lies inside :attr:`root`, else ``None``."""
        raise NotImplementedError

    def is_file(self, location: Path) -> bool:
        """Whether a location (from :meth:`inside`) is a regular file of the export."""
        raise NotImplementedError

    def is_dir(self, location: Path) -> bool:
        raise NotImplementedError

    def names_in(self, folder: Path, suffix: str) -> list[str]:
        """Sorted names of the regular files directly in ``folder`` whose name ends with ``suffix``."""
        raise NotImplementedError

    def local(self, location: Path, what: str) -> Path:
        """A path on disk to read the file at ``location`` from (extracted first, for a zip)."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what the export holds (a zip's extraction, when no other reader uses it)."""

    def describe(self, location: Path) -> str:
        """``location`` relative to the export's root, for messages (no absolute or temporary paths)."""
        try:
            return location.relative_to(self.root).as_posix() or "."
        except ValueError:
            return location.name

    def check_readable(self, location: Path, what: str) -> Path:
        """``location`` itself, refused unless it lies inside the export and is a regular file."""
        found = self.inside(location)
        if found is None:
            raise FormatError(f"{what} points outside the export (refused)")
        if not self.is_file(found):
            raise FormatError(f"{what} is not a file of the export")
        return found


class FolderFiles(ExportFiles):
    """An export folder on disk; links are followed, and must stay inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def inside(self, path: Path) -> Path | None:
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError, ValueError):  # link loops, NUL characters
            return None
        return resolved if is_inside(resolved, self.root) else None

    def _mode(self, location: Path) -> int:
        try:
            return os.stat(location).st_mode
        except (OSError, ValueError):
            return 0

    def is_file(self, location: Path) -> bool:
        return stat.S_ISREG(self._mode(location))

    def is_dir(self, location: Path) -> bool:
        return stat.S_ISDIR(self._mode(location))

    def names_in(self, folder: Path, suffix: str) -> list[str]:
        names = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.endswith(suffix):
                        names.append(entry.name)
                        limits.check_count(len(names), limits.MAX_LAYERS, f"files *{suffix} in one folder")
        except OSError:
            return []
        return sorted(name for name in names if self.is_file(folder / name))

    def local(self, location: Path, what: str) -> Path:
        return self.check_readable(location, what)


# ---- zips ---------------------------------------------------------------------------------------------


def _member_parts(info: zipfile.ZipInfo, archive_name: str) -> tuple[str, ...]:
    """The path components of a member's name, refused when it could land outside the extraction."""
    name = info.filename.replace("\\", "/")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts or not parts:
        raise FormatError(
            f"{archive_name}: entry {info.filename!r} points outside the archive root (refused)"
        )
    if len(name) > limits.MAX_ZIP_NAME_CHARS:
        raise FormatError(f"{archive_name}: an entry name of {len(name)} characters (refused)")
    if any(ord(c) < 32 for c in name):
        raise FormatError(
            f"{archive_name}: entry {info.filename!r} has control characters in its name (refused)"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise FormatError(f"{archive_name}: entry {info.filename!r} is a symlink (refused)")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise FormatError(f"{archive_name}: entry {info.filename!r} is not a regular file (refused)")
    if info.flag_bits & 0x1:
        raise FormatError(f"{archive_name} is encrypted (refused)")
    if info.compress_type not in _ZIP_METHODS:
        raise FormatError(
            f"{archive_name}: entry {info.filename!r} uses compression method {info.compress_type} "
            "(stored, deflated, bzip2 or lzma are read)"
        )
    return parts


_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


class _ZipContent:
    """One zip content's listing and extraction folder, shared by every reader of it."""

    def __init__(self, key: tuple, path: Path, archive_name: str, zip_size: int) -> None:
        self.key = key
        self.archive_name = archive_name
        self.allowance = limits.zip_allowance(zip_size)
        self.users = 0
        self.extracted = 0  # bytes written or reserved so far
        self._lock = threading.Lock()
        self._member_locks: dict[PurePosixPath, threading.Lock] = {}
        self.members: dict[PurePosixPath, zipfile.ZipInfo] = {}
        self.dirs: set[PurePosixPath] = {PurePosixPath(".")}
        try:
            self.archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise FormatError(f"{archive_name} is not a readable zip ({exc})") from None
        try:
            self._list(self.archive.infolist())
        except BaseException:
            self.archive.close()
            raise
        # Nothing is written before every member passed: only now is the (empty) folder made.
        self.folder = Path(tempfile.mkdtemp(prefix=f"{ZIP_FOLDER_PREFIX}{os.getpid()}-")).resolve()

    def _list(self, infos: list[zipfile.ZipInfo]) -> None:
        for info in infos:
            parts = _member_parts(info, self.archive_name)
            relative = PurePosixPath(*parts)
            if info.is_dir():
                self.dirs.add(relative)
            elif relative in self.members:
                raise FormatError(f"{self.archive_name}: {relative} is stored twice (refused)")
            else:
                self.members[relative] = info
            self.dirs.update(relative.parents)
        clash = self.dirs.intersection(self.members)
        if clash:
            raise FormatError(
                f"{self.archive_name}: {sorted(clash)[0]} is both a file and a folder (refused)"
            )

    def extract(self, relative: PurePosixPath) -> Path:
        """The member at ``relative``, extracted (once) and returned as a path on disk."""
        with self._lock:
            member_lock = self._member_locks.setdefault(relative, threading.Lock())
        with member_lock:  # readers of other members (and of other zips) do not wait for this one
            target = self.folder.joinpath(*relative.parts)
            if target.is_file():
                return target
            info = self.members[relative]
            what = f"{self.archive_name}: {relative}"
            self._reserve(info.file_size, what)
            try:
                written = self._stream(info, target, what)
            except BaseException:
                with self._lock:
                    self.extracted -= info.file_size
                raise
            with self._lock:
                self.extracted += written - info.file_size
            return target

    def _reserve(self, size: int, what: str) -> None:
        with self._lock:
            if self.extracted + size > self.allowance:
                raise FormatError(
                    f"{what} would extract to {limits.mib(self.extracted + size)}, above what a zip of "
                    f"this size may extract to ({limits.mib(self.allowance)})"
                )
            self.extracted += size
        free = shutil.disk_usage(self.folder).free
        if size + limits.ZIP_FREE_SPACE_MARGIN > free:
            with self._lock:
                self.extracted -= size
            raise FormatError(f"{what}: not enough free space in the temporary folder ({limits.mib(free)})")

    def _stream(self, info: zipfile.ZipInfo, target: Path, what: str) -> int:
        """Copy a member to ``target`` through a temporary name, checking its size as it comes."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        written = 0
        try:
            with self.archive.open(info) as source, open(partial, "wb") as sink:
                while block := source.read(_COPY_BLOCK):
                    written += len(block)
                    if written > info.file_size:
                        raise FormatError(f"{what} holds more than the {info.file_size} bytes it declares")
                    sink.write(block)
            if written != info.file_size:
                raise FormatError(f"{what} holds {written} of the {info.file_size} bytes it declares")
            os.replace(partial, target)
        except FormatError:
            partial.unlink(missing_ok=True)
            raise
        except (zipfile.BadZipFile, *DAMAGED_DATA_ERRORS) as exc:
            partial.unlink(missing_ok=True)
            raise FormatError(f"cannot extract {what} ({type(exc).__name__}: {exc})") from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return written

    def remove(self) -> None:
        self.archive.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class _ZipRegistry:
    """The zip contents in use in this process, each with how many readers hold it."""

    def __init__(self) -> None:
        self._contents: dict[tuple, _ZipContent] = {}
        self._lock = threading.Lock()
        self._swept = False

    def acquire(self, path: Path, archive_name: str) -> _ZipContent:
        entries, directory_offset, directory_size = limits.check_zip_directory(
            path, limits.MAX_ZIP_ENTRIES, archive_name
        )
        size = path.stat().st_size
        try:
            with open(path, "rb") as handle:
                handle.seek(directory_offset)
                directory = handle.read(directory_size)
        except OSError as exc:
            raise FormatError(f"cannot read {archive_name} ({exc.strerror or type(exc).__name__})") from None
        # One extraction per content: the same zip touched, copied over or reopened shares it.
        key = (str(path), size, entries, hashlib.sha256(directory).hexdigest())
        with self._lock:
            if not self._swept:
                self._swept = True
                sweep_stale_zip_folders()
            content = self._contents.get(key)
            if content is None:
                content = _ZipContent(key, path, archive_name, size)
                self._contents[key] = content
            content.users += 1
        return content

    def release(self, content: _ZipContent) -> None:
        with self._lock:
            content.users -= 1
            if content.users > 0:
                return
            self._contents.pop(content.key, None)
        content.remove()

    def folders(self) -> list[Path]:
        with self._lock:
            return [content.folder for content in self._contents.values()]

    def remove_all(self) -> None:
        with self._lock:
            contents = list(self._contents.values())
            self._contents.clear()
        for content in contents:
            content.remove()


ZIPS = _ZipRegistry()
atexit.register(ZIPS.remove_all)


def sweep_stale_zip_folders() -> None:
    """Remove extraction folders that processes of this user left behind when they were killed."""
    folder = Path(tempfile.gettempdir())
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(ZIP_FOLDER_PREFIX):
            continue
        pid_text = entry.name[len(ZIP_FOLDER_PREFIX) :].split("-", 1)[0]
        try:
            if (
                not entry.is_dir(follow_symlinks=False)
                or entry.stat(follow_symlinks=False).st_uid != os.getuid()
            ):
                continue
            pid = int(pid_text)
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except (OSError, ValueError, AttributeError):
            continue


class LexicalFiles(ExportFiles):
    """Files whose locations are checked lexically, by their names below :attr:`root`: a zip's extraction
    (which holds no links) and a hub dataset's snapshot (whose links to blobs are checked when read)."""

    def _relative(self, location: Path) -> PurePosixPath | None:
        try:
            return PurePosixPath(location.relative_to(self.root).as_posix())
        except ValueError:
            return None

    def inside(self, path: Path) -> Path | None:
        normalized = Path(os.path.normpath(path))  # ".." is lexical here
        return normalized if is_inside(normalized, self.root) else None


class ZipFiles(LexicalFiles):
    """A zipped export: a reader's hold on the shared extraction of its content (see the module)."""

    def __init__(self, path: Path, archive_name: str) -> None:
        self.archive_name = archive_name
        self._content = ZIPS.acquire(path, archive_name)
        self.root = self._content.folder
        self._release = weakref.finalize(self, ZIPS.release, self._content)

    def close(self) -> None:
        self._release()

    def is_file(self, location: Path) -> bool:
        return self._relative(location) in self._content.members

    def is_dir(self, location: Path) -> bool:
        return self._relative(location) in self._content.dirs

    def names_in(self, folder: Path, suffix: str) -> list[str]:
        relative = self._relative(folder)
        names = [m.name for m in self._content.members if m.parent == relative and m.name.endswith(suffix)]
        limits.check_count(len(names), limits.MAX_LAYERS, f"files *{suffix} in one folder")
        return sorted(names)

    def local(self, location: Path, what: str) -> Path:
        found = self.check_readable(location, what)
        return self._content.extract(self._relative(found))

    def find_attn_dir(self) -> Path:
        """The shallowest folder of the zip holding a manifest (or, failing that, layer metadata)."""
        members = self._content.members
        for matches in (lambda name: name == MANIFEST_NAME, lambda name: name.endswith("_metadata.json")):
            hits = sorted((m for m in members if matches(m.name)), key=lambda m: (len(m.parts), str(m)))
            if hits:
                return self.root.joinpath(*hits[0].parent.parts)
        raise FormatError(f"no {MANIFEST_NAME} or layer metadata found in {self._content.archive_name}")


def extraction_folders() -> list[Path]:
    """The extraction folders of the zips in use in this process (for tests and diagnostics)."""
    return ZIPS.folders()


# ---- paths written in an export -----------------------------------------------------------------------


def resolve_in_export(
    raw: object, base: Path, root: Path, files: ExportFiles, lenient: bool, what: str
) -> Path:
    """Resolve a path written in an export to a file inside the export.

    Parameters
    ----------
    raw : str
        The path as written, relative to ``base``.
    base : Path
        Folder the path is relative to (``attn_maps/``).
    root : Path
        The export's root folder (where ``images/`` is), inside ``files.root``.
    files : ExportFiles
        The export's files; a path that resolves outside its root is refused, links included.
    lenient : bool
        Seed exports: absolute and cwd-relative paths are matched by their last components under
        ``base``, the root and ``root/images``. Current exports must hold exact relative paths.
    what : str
        Description used in error messages.

    Returns
    -------
    Path
        The file's location (for a zip, read it through ``files.local``).
    """
    raw = check_path_text(raw, what)
    written = PurePosixPath(raw.replace("\\", "/"))
    direct = None if written.is_absolute() else files.inside(base / written)
    if direct is not None and files.is_file(direct):
        return direct
    if lenient:
        parts = [p for p in written.parts if p not in ("/", "..", ".") and not p.endswith(":")]
        for start in range(max(0, len(parts) - _LENIENT_TAIL), len(parts)):
            for folder in (base, root, root / IMAGES_DIR_NAME):
                found = files.inside(folder.joinpath(*parts[start:]))
                if found is not None and files.is_file(found):
                    return found
    if direct is None:
        raise FormatError(f"{what}: path {raw!r} points outside the export (refused)")
    raise FormatError(f"{what}: file {raw!r} not found in the export")
