"""The one error type of the format package."""

from __future__ import annotations

MAX_MESSAGE_CHARS = 400


def printable(text: str) -> str:
    """``text`` with lone surrogates (invalid Unicode, as ``"\\ud800"`` in JSON or undecodable bytes of a
    file name) replaced by U+FFFD, so that it can be encoded, sent and shown."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` as one line of valid Unicode (:func:`printable`) of at most ``limit`` characters."""
    line = " ".join(printable(str(text)).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class FormatError(ValueError):
    """An export, or a file in it, that cannot be read as the format says.

    The message is one line of valid Unicode, at most :data:`MAX_MESSAGE_CHARS` characters: messages
    quote foreign text (names from the export, zip, numpy and JSON errors).
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))
