"""Where an export's files are: zips extracted safely, paths resolved strictly inside the export.

An export is shared as a folder or a zip; neither may lead the reader to a file outside it.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import stat
import tempfile
import threading
import zipfile
from pathlib import Path

from vggt.attn_format.npz import DAMAGED_DATA_ERRORS
from vggt.attn_format.schema import IMAGES_DIR_NAME, MANIFEST_NAME, FormatError


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in ``root`` (both already resolved)."""
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


_zip_cache: dict[tuple[str, int, int], Path] = {}
_zip_lock = threading.Lock()


def _cleanup_zip_cache() -> None:
    for folder in _zip_cache.values():
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(_cleanup_zip_cache)


def extract_zip_safely(zip_path: Path) -> Path:
    """Extract an export's zip once per (path, size, mtime) into a private temporary folder.

    Entries with absolute paths, ``..`` components, drive letters or symlink modes are refused.
    """
    status = zip_path.stat()
    cache_key = (str(zip_path.resolve()), status.st_size, status.st_mtime_ns)
    with _zip_lock:
        cached = _zip_cache.get(cache_key)
        if cached is not None and cached.is_dir():
            return cached
        digest = hashlib.sha1(repr(cache_key).encode()).hexdigest()[:12]
        target = Path(tempfile.mkdtemp(prefix=f"vggt-attn-zip-{digest}-"))
        try:
            with zipfile.ZipFile(zip_path) as archive:
                for info in archive.infolist():
                    _check_zip_entry(info, zip_path.name)
                for info in archive.infolist():
                    destination = target.joinpath(*Path(info.filename.replace("\\", "/")).parts)
                    if info.is_dir():
                        destination.mkdir(parents=True, exist_ok=True)
                        continue
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as source, open(destination, "wb") as sink:
                        shutil.copyfileobj(source, sink, length=1 << 20)
        except zipfile.BadZipFile as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise FormatError(f"{zip_path.name} is not a readable zip ({exc})") from None
        except FormatError:
            shutil.rmtree(target, ignore_errors=True)
            raise
        except DAMAGED_DATA_ERRORS as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise FormatError(f"cannot extract {zip_path.name} ({exc})") from None
        _zip_cache[cache_key] = target
        return target


def _check_zip_entry(info: zipfile.ZipInfo, archive_name: str) -> None:
    name = info.filename.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts or not parts:
        raise FormatError(
            f"{archive_name}: entry {info.filename!r} points outside the archive root (refused)"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise FormatError(f"{archive_name}: entry {info.filename!r} is a symlink (refused)")


def find_attn_dir_in(folder: Path) -> Path:
    """The shallowest folder under ``folder`` holding a manifest (or, failing that, layer metadata)."""
    for pattern in (MANIFEST_NAME, "*_metadata.json"):
        hits = sorted(folder.rglob(pattern), key=lambda p: (len(p.parts), str(p)))
        if hits:
            return hits[0].parent
    raise FormatError(f"no {MANIFEST_NAME} or layer metadata found in {folder.name}")


def _existing_inside(candidate: Path, root: Path) -> Path | None:
    resolved = candidate.resolve()
    return resolved if is_inside(resolved, root) and resolved.is_file() else None


def resolve_in_export(raw: str, base: Path, root: Path, lenient: bool, what: str) -> Path:
    """Resolve a path written in an export to an existing file inside the export.

    Parameters
    ----------
    raw : str
        The path as written, relative to ``base``.
    base : Path
        Folder the path is relative to (``attn_maps/``).
    root : Path
        The export folder (already resolved); a path that resolves outside it is refused, symlinks
        included.
    lenient : bool
        Seed exports: absolute and cwd-relative paths are matched by their trailing components under
        ``base``, ``root`` and ``root/images``. Current exports must hold exact relative paths.
    what : str
        Description used in error messages.

    Returns
    -------
    Path
        The resolved file.
    """
    if not isinstance(raw, str) or not raw:
        raise FormatError(f"{what}: path must be a non-empty string, got {raw!r}")
    written = Path(raw.replace("\\", "/"))
    direct = None if written.is_absolute() else base / written
    if direct is not None:
        found = _existing_inside(direct, root)
        if found is not None:
            return found
    points_outside = direct is None or not is_inside(direct.resolve(), root)
    if lenient:
        parts = [p for p in written.parts if p not in ("/", "..", ".") and not p.endswith((":", ":/", ":\\"))]
        for start in range(len(parts)):
            tail = Path(*parts[start:])
            for folder in (base, root, root / IMAGES_DIR_NAME):
                found = _existing_inside(folder / tail, root)
                if found is not None:
                    return found
    if points_outside:
        raise FormatError(f"{what}: path {raw!r} points outside the export (refused)")
    raise FormatError(f"{what}: file {raw!r} not found in the export")
