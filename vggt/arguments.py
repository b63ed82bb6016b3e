"""Arguments named in error messages, spelled as the caller wrote them.

The same check raises the same message for a Python caller and for the command line, but the two
spell an argument differently: ``checkpoint="model.pt"`` and ``random_weights=True`` in Python,
``--checkpoint PATH`` and ``--random_weights`` in a shell. A message names an argument through
:func:`argument`; ``str(error)`` gives the Python spelling, and the command line prints
``error.spelled(command_line_spelling(...))``. One message source, two spellings.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping

Spelling = Callable[[str, str], str]

# Private-use characters: an argument's mark survives f-strings and never occurs in real text.
_OPEN, _BETWEEN, _CLOSE = "\ue000", "\ue001", "\ue002"
_MARK = re.compile(f"{_OPEN}([^{_BETWEEN}{_CLOSE}]*){_BETWEEN}([^{_CLOSE}]*){_CLOSE}")


def argument(name: str, value: object = "") -> str:
    """Argument ``name`` (its Python name), with ``value`` when the message gives one, marked for
    spelling: put it in a message of a :class:`SpelledError`."""
    return f"{_OPEN}{name}{_BETWEEN}{value}{_CLOSE}"


def python_spelling(name: str, value: str) -> str:
    """``name=value`` (or ``name`` alone when no value is given)."""
    return f"{name}={value}" if value else name


def command_line_spelling(flags: Mapping[str, str] | None = None) -> Spelling:
    """``--flag value`` (``--flag`` alone for ``True``); ``flags`` maps Python names to flag names
    where they differ (``{"per_head": "save_per_head"}``)."""
    renamed = dict(flags or {})

    def spell(name: str, value: str) -> str:
        flag = f"--{renamed.get(name, name)}"
        return flag if value in ("", "True") else f"{flag} {value}"

    return spell


def spell(message: str, spelling: Spelling) -> str:
    """``message`` with every :func:`argument` in it written out by ``spelling``."""
    return _MARK.sub(lambda match: spelling(match.group(1), match.group(2)), message)


class SpelledError(Exception):
    """An error whose message may name arguments through :func:`argument`; ``str()`` spells them as
    a Python caller writes them."""

    def __str__(self) -> str:
        return spell(super().__str__(), python_spelling)

    def spelled(self, spelling: Spelling) -> str:
        """The message with its arguments written out by ``spelling``."""
        return spell(super().__str__(), spelling)


EXIT_USAGE = 2  # a bad argument or input: the commands' exit status


class UsageError(Exception):
    """A one-line user error; a command prints it and exits with :data:`EXIT_USAGE`."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose own errors (an unknown flag, a bad value) are :class:`UsageError`, so that
    a command reports them on one line like every other bad input."""

    def error(self, message: str) -> None:
        raise UsageError(message)
