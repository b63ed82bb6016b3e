"""Who may open what through the viewer: the path box's folder (``--root``), the address the server
listens on, and logins (``--auth``).

The viewer is a web server that reads files named in a text box. On this machine alone (the default,
127.0.0.1) that is the user's own business; once it listens on the network or through a public link,
anyone who reaches it types those names. So a viewer reachable from elsewhere only starts when told
which folder it serves (``--root``) or that any path is fine (``--allow_any_path``), and says so. The
path box's messages never tell more of the file system than the user typed: no expanded ``~``, no
resolved link, and outside the served folder no difference between a missing file and one that is not
an export.
"""

from __future__ import annotations

import ipaddress
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from vggt.attn_format import FormatError
from vggt.attn_format.hub import is_hub_path
from vggt.attn_format.paths import check_path_text, is_inside

_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
# The login, when not given with --auth: the environment is private to its user, a command line is not.
AUTH_VARIABLE = "VGGT_VIEWER_AUTH"


class ServingError(ValueError):
    """A way of starting the viewer that is refused (one-line message for the terminal)."""


class PathRefused(ValueError):
    """A path typed into the path box that the viewer will not open (one-line message for the page)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``--server_name``) is reachable from this machine only."""
    if host.strip().lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or an interface: assume the network reaches it


def parse_auth(text: str) -> tuple[str, str]:
    """``"user:password"`` as Gradio's ``auth`` pair; the password may contain ``:``."""
    user, _, password = text.partition(":")
    if not user or not password:
        raise ServingError(f"--auth (or {AUTH_VARIABLE}) takes user:password (both non-empty)")
    return user, password


def check_serving(server_name: str, share: bool, root: str | None, allow_any_path: bool) -> list[str]:
    """Refuse a viewer reachable from elsewhere that serves every path without being told to.

    Returns
    -------
    list of str
        Warnings to print at start-up (empty when the viewer is reachable from this machine only).

    Raises
    ------
    ServingError
        When the viewer would be reachable from the network (a non-loopback ``server_name`` or
        ``share``) with neither ``--root`` nor ``--allow_any_path``.
    """
    exposed = []
    if not is_loopback(server_name):
        exposed.append(f"on {server_name}, reachable from the network")
    if share:
        exposed.append("through a public gradio.live link")
    if not exposed:
        return []
    where = " and ".join(exposed)
    if root is None and not allow_any_path:
        raise ServingError(
            f"the viewer would listen {where} and open any path typed into it; give --root DIR (the "
            "folder of exports it may open) or --allow_any_path, and consider --auth user:password"
        )
    scope = f"exports under {root}" if root is not None else "any file this user can read (--allow_any_path)"
    return [f"warning: the viewer listens {where}; whoever reaches it can open {scope}"]


def exit_on_sigterm() -> None:
    """Let ``SIGTERM`` end the process as Ctrl+C does, so that exit handlers run (a zipped export's
    extraction is removed)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@dataclass(frozen=True)
class Located:
    """Where a typed path leads: the cache key (resolved), the path to open, and the text to quote."""

    key: str
    path: str
    typed: str


class PathRule:
    """The path box's rule: any path (``root`` is ``None``) or only exports under ``root``.

    Parameters
    ----------
    root : str or Path, optional
        The folder the path box serves. Typed paths are relative to it (absolute ones must lie in it,
        links followed); ``~`` is not expanded.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = None if root is None else Path(root).expanduser().resolve()
        if self.root is not None and not self.root.is_dir():
            raise ServingError(f"--root {root} is not a folder")

    def locate(self, typed: str, what: str = "export") -> Located:
        """Where the path typed into the path box leads (``what``: the kind of file asked for, as the
        refusal names it); raises :class:`PathRefused`."""
        text = typed.strip().strip('"').strip("'") if isinstance(typed, str) else ""
        if not text:
            raise PathRefused("enter the path of an export (folder, attn_maps/, a JSON file or a .zip)")
        try:
            check_path_text(text, f"{what} path")
        except FormatError as exc:
            raise PathRefused(str(exc)) from None
        if is_hub_path(text):  # a dataset of the Hugging Face Hub: read into its cache, not a local path
            if self.root is not None:
                raise PathRefused("this viewer serves the exports of one folder, not datasets of the hub")
            return Located(text, text, text)
        if self.root is None:
            try:
                key = str(Path(text).expanduser().resolve())
            except (OSError, RuntimeError, ValueError):
                key = text
            return Located(key, text, text)
        candidate = self.root / text
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError, ValueError):
            resolved = None
        if resolved is None or not is_inside(resolved, self.root) or not os.path.exists(resolved):
            # No word on whether something exists there: outside the root that would tell too much.
            raise PathRefused(f"no {what} at {text} in the folder this viewer serves")
        return Located(str(resolved), str(resolved), text)

    def quote_typed(self, message: str, located: Located) -> str:
        """A reader's message with the opened path put back as typed (no resolved path, no root)."""
        message = message.replace(located.path, located.typed)
        return message if self.root is None else message.replace(str(self.root), "<served folder>")
