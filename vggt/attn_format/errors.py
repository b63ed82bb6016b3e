"""The one error type of the format package."""

from __future__ import annotations

MAX_MESSAGE_CHARS = 400


def printable(text: str) -> str:
    """``text`` with lone surrogates (invalid Unicode, as ``"\\ud800"`` in JSON or undecodable bytes of a
    file name) replaced by U+FFFD, so that it can be encoded, sent and shown."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


class FormatError(ValueError):
    """An export, or a file in it, that cannot be read as the format says.

    The message is one line of valid Unicode, at most :data:`MAX_MESSAGE_CHARS` characters: messages
    quote foreign text (names from the export, zip, numpy and JSON errors).
    """

    def __init__(self, message: str) -> None:
        text = " ".join(printable(str(message)).split())
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[: MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(text)
