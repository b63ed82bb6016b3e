"""Exports published as Hugging Face dataset repositories, opened by their id.

``hf://datasets/<owner>/<name>`` (the hub's own URL form; ``@<revision>`` pins a branch, tag or commit,
and a path after the name opens an export in a subfolder) is read through ``huggingface_hub``, into its
cache: ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``, revisions and tokens (``hf auth login``,
``HF_TOKEN``) behave as they do for the hub's other users. Files are fetched as the reader needs them:
opening an export fetches its JSON files, a query's maps fetch that layer's NPZ, so a large export is
never downloaded whole for one view.

A repository is as untrusted as any shared export: every file read lies inside the repository's
snapshot (links in the cache lead to its own blobs, nothing else), every file's size is checked against
the caps of :mod:`.limits` before it is downloaded, the downloads of one export together are capped
(:data:`~.limits.MAX_DOWNLOAD_BYTES`), and everything it holds passes the reader's usual checks. Every
problem is a one-line :class:`FormatError`.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from vggt.attn_format import limits
from vggt.attn_format.errors import FormatError
from vggt.attn_format.paths import LexicalFiles, is_inside
from vggt.attn_format.schema import MANIFEST_NAME

SCHEME = "hf://datasets/"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_hub_path(text: str) -> bool:
    """Whether ``text`` names a dataset repository of the hub (``hf://datasets/...``)."""
    return isinstance(text, str) and text.startswith(SCHEME)


def hub_url(repo: str) -> str:
    """``owner/name`` or ``owner/name@revision`` as ``hf://datasets/owner/name[@revision]`` (what a
    ``--repo`` flag takes)."""
    return repo if is_hub_path(repo) else SCHEME + repo.strip().strip("/")


def parse_hub_path(text: str) -> tuple[str, str | None, str]:
    """``hf://datasets/<owner>/<name>[@<revision>][/<path>]`` as ``(repo_id, revision, path)``.

    A revision holding ``/`` (``refs/pr/1``) is written URL-encoded (``@refs%2Fpr%2F1``), as the hub
    writes it.
    """
    rest = text[len(SCHEME) :]
    parts = rest.split("/", 2)
    if len(parts) < 2:
        raise FormatError(f"{text}: expected hf://datasets/<owner>/<name>")
    owner, name = parts[0], parts[1]
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
        revision = unquote(revision)
        if not revision or "\x00" in revision or len(revision) > limits.MAX_NAME_CHARS:
            raise FormatError(f"{text}: bad revision after @")
    repo_id = f"{owner}/{name}"
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise FormatError(f"{text}: {repo_id!r} is not a repository id (owner/name)")
    path = parts[2].strip("/") if len(parts) > 2 else ""
    if any(part in ("", ".", "..") for part in PurePosixPath(path).parts) and path:
        raise FormatError(f"{text}: bad path in the repository")
    return repo_id, revision, path


_UNREACHABLE = "is not in the local Hugging Face cache, and the hub cannot be reached (or HF_HUB_OFFLINE=1)"


def _hub_error(error: Exception, repo_id: str, revision: str | None) -> FormatError:
    """A one-line message for what ``huggingface_hub`` raised."""
    from huggingface_hub import errors

    at = f" at revision {revision!r}" if revision else ""
    if isinstance(error, errors.GatedRepoError):
        return FormatError(f"dataset {repo_id} is gated on the Hugging Face Hub: accept its terms, log in")
    if isinstance(error, errors.RepositoryNotFoundError):
        login = "private ones need `hf auth login` or HF_TOKEN"
        return FormatError(f"dataset {repo_id} not found on the Hugging Face Hub ({login})")
    if isinstance(error, errors.RevisionNotFoundError):
        return FormatError(f"dataset {repo_id} has no revision {revision!r}")
    if isinstance(error, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        return FormatError(f"dataset {repo_id}{at} {_UNREACHABLE}")
    if isinstance(error, errors.HFValidationError):
        return FormatError(f"{repo_id!r} is not a dataset repository id")
    text = " ".join(str(error).split())[:200]
    return FormatError(f"dataset {repo_id}{at}: the Hugging Face Hub answered {type(error).__name__}: {text}")


class HubFiles(LexicalFiles):
    """A dataset repository of the hub, seen as an export's files (see the module).

    Parameters
    ----------
    repo_id, revision
        The repository (``owner/name``) and branch, tag or commit (the default branch when ``None``).
    cache_dir
        The hub cache (``HF_HUB_CACHE`` by default).

    Attributes
    ----------
    root : Path
        The repository's snapshot folder in the cache (``datasets--owner--name/snapshots/<commit>``);
        a file exists there once it has been fetched.
    commit : str
        The commit the revision resolved to: every file is read at it.
    offline : bool
        Whether only the cache is read (``HF_HUB_OFFLINE=1``, or the hub out of reach).
    """

    def __init__(
        self, repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
    ) -> None:
        from huggingface_hub import constants, errors
        from huggingface_hub.file_download import repo_folder_name

        self.repo_id, self.revision = repo_id, revision
        self._cache_dir = cache_dir
        self._lock = threading.Lock()
        self._downloaded = 0
        self.offline = bool(constants.HF_HUB_OFFLINE)
        hub_errors = (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
                      errors.HFValidationError, ValueError, OSError)  # fmt: skip
        try:
            listing = None if self.offline else self._listing()
            if listing is None:
                self.offline = True
                self.commit = self._cached_commit()
            else:
                self.commit, self._sizes = listing
        except hub_errors as error:
            raise _hub_error(error, repo_id, revision) from None
        hub_cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
        folder = repo_folder_name(repo_id=repo_id, repo_type="dataset")
        self._repo_folder = Path(os.path.abspath(hub_cache / folder))
        self.root = self._repo_folder / "snapshots" / self.commit
        # Offline, the cache holds what was read before; a file it lacks is named when it is read.
        self._complete = listing is not None
        if listing is None:
            self._sizes = self._cached_files()

    def _listing(self) -> tuple[str, dict[PurePosixPath, int]] | None:
        """The commit and the repository's files with their sizes, or ``None`` when the hub is out of
        reach (the cache is then all there is)."""
        from huggingface_hub import HfApi, errors

        try:
            info = HfApi().repo_info(
                self.repo_id, repo_type="dataset", revision=self.revision, files_metadata=True
            )
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.HFValidationError):
            raise
        except (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, ConnectionError, OSError):
            return None
        siblings = info.siblings or []
        limits.check_count(len(siblings), limits.MAX_ZIP_ENTRIES, f"files in dataset {self.repo_id}")
        return info.sha, {PurePosixPath(entry.rfilename): int(entry.size or 0) for entry in siblings}

    def _cached_commit(self) -> str:
        """The commit the revision names in the cache (raises when the cache has none)."""
        from huggingface_hub import snapshot_download

        folder = snapshot_download(self.repo_id, repo_type="dataset", revision=self.revision,
                                   cache_dir=self._cache_dir, local_files_only=True)  # fmt: skip
        return Path(folder).name

    def _cached_files(self) -> dict[PurePosixPath, int]:
        """What the cache holds of this commit (offline, that is all that can be read)."""
        sizes = {}
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = Path(folder) / name
                sizes[PurePosixPath(path.relative_to(self.root).as_posix())] = -1  # measured when read
                limits.check_count(len(sizes), limits.MAX_ZIP_ENTRIES, f"files of dataset {self.repo_id}")
        return sizes

    def is_file(self, location: Path) -> bool:
        relative = self._relative(location)
        if relative is None or relative.parts == ():
            return False
        return relative in self._sizes or not self._complete

    def is_dir(self, location: Path) -> bool:
        relative = self._relative(location)
        return relative is not None and any(relative in path.parents for path in self._sizes)

    def names_in(self, folder: Path, suffix: str) -> list[str]:
        relative = self._relative(folder)
        names = [path.name for path in self._sizes if path.parent == relative and path.name.endswith(suffix)]
        limits.check_count(len(names), limits.MAX_LAYERS, f"files *{suffix} in one folder")
        return sorted(names)

    def describe(self, location: Path) -> str:
        relative = self._relative(location)
        return f"{self.repo_id}/{relative}" if relative is not None else location.name

    def local(self, location: Path, what: str) -> Path:
        """The file on disk, fetched into the cache first if it is not there yet."""
        found = self.check_readable(location, what)
        relative = self._relative(found)
        if not os.path.lexists(found):
            self._fetch(relative, what)
        return self._checked_blob(found, relative, what)

    def _fetch(self, relative: PurePosixPath, what: str) -> None:
        from huggingface_hub import errors, hf_hub_download

        if self.offline:
            raise FormatError(f"{what} of dataset {self.repo_id} {_UNREACHABLE}")
        size = self._sizes.get(relative, 0)
        with self._lock:  # checked and counted before the download starts
            if self._downloaded + size > limits.MAX_DOWNLOAD_BYTES:
                cap = limits.mib(limits.MAX_DOWNLOAD_BYTES)
                raise FormatError(
                    f"{what}: dataset {self.repo_id} needs more than {cap} of downloads (limit)"
                )
            self._repo_folder.mkdir(parents=True, exist_ok=True)
            if size + limits.ZIP_FREE_SPACE_MARGIN > shutil.disk_usage(self._repo_folder).free:
                raise FormatError(f"{what}: no disk space for {limits.mib(size)} in the Hugging Face cache")
            self._downloaded += size
        try:
            hf_hub_download(self.repo_id, str(relative), repo_type="dataset", revision=self.commit,
                            cache_dir=self._cache_dir)  # fmt: skip
        except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
                ValueError, OSError) as error:  # fmt: skip
            raise _hub_error(error, self.repo_id, self.revision) from None

    def _checked_blob(self, location: Path, relative: PurePosixPath, what: str) -> Path:
        """The file a snapshot entry stands for: a regular file inside the repository's cache folder (its
        ``blobs/``, where ``huggingface_hub`` keeps the content), of the size the hub listed."""
        try:
            target = location.resolve(strict=True)
        except (OSError, RuntimeError):
            raise FormatError(f"{what} of dataset {self.repo_id} cannot be read from the cache") from None
        if not is_inside(target, self._repo_folder.resolve()):
            raise FormatError(f"{what} points outside the dataset's cache (refused)")
        size = limits.regular_file_size(target, what)
        listed = self._sizes.get(relative, -1)
        if listed >= 0 and size != listed:
            raise FormatError(f"{what} holds {size} bytes, the hub lists {listed}")
        return target

    def find_attn_dir(self, subfolder: str = "") -> Path:
        """The export's ``attn_maps/`` folder in ``subfolder`` of the repository (or in the repository):
        the shallowest folder below it holding a manifest, else layer metadata."""
        base = PurePosixPath(subfolder) if subfolder else None

        def below(path: PurePosixPath) -> bool:
            return base is None or base == path.parent or base in path.parent.parents

        for matches in (lambda name: name == MANIFEST_NAME, lambda name: name.endswith("_metadata.json")):
            hits = sorted(
                (p for p in self._sizes if matches(p.name) and below(p)), key=lambda p: (len(p.parts), str(p))
            )
            if hits:
                return self.root.joinpath(*hits[0].parent.parts)
        where = f"{self.repo_id}/{subfolder}" if subfolder else self.repo_id
        raise FormatError(f"dataset {where} holds no {MANIFEST_NAME} or layer metadata")


def open_hub_files(text: str) -> tuple[HubFiles, Path]:
    """The files of the export that ``text`` (``hf://datasets/...``) names, and its ``attn_maps/`` folder."""
    repo_id, revision, path = parse_hub_path(text)
    files = HubFiles(repo_id, revision)
    return files, files.find_attn_dir(path)


__all__ = ["HubFiles", "hub_url", "is_hub_path", "open_hub_files", "parse_hub_path"]
