"""The viewer's one error path: whatever fails in a handler becomes one line of text beside the path box.

Handlers never raise to Gradio (a raised error turns every output into a red "Error" badge, blocks
the images behind an overlay and piles up toasts): :func:`error_text` words the failure, and
:func:`message_html` renders it, escaped, in the message area under the path box, while every other
output is left as it was (so the export already open keeps working).
"""

from __future__ import annotations

import html
import logging

from vggt.attn_format import FormatError
from vggt.attn_format.errors import one_line
from vggt.viewer.state import ViewerError

LOG = logging.getLogger("vggt.viewer")


def error_text(exc: BaseException) -> str:
    """One line saying what went wrong: the reader's and viewer's own messages as they are, a file
    system error with its reason, anything else (a bug) by its type, its traceback logged. Valid Unicode,
    a few hundred characters at most (messages quote what was typed or sent)."""
    if isinstance(exc, FormatError | ViewerError):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = f"cannot read the export: {exc.strerror or exc}"
    else:
        LOG.error("viewer handler failed", exc_info=exc)
        text = f"the viewer failed on this request ({type(exc).__name__}); the details are in its terminal"
    return one_line(text)


def message_html(text: str, kind: str = "error") -> str:
    """The message area's content: ``text`` escaped (never markup) on one line; empty clears it.

    Parameters
    ----------
    kind : str
        ``"error"`` or ``"note"`` (styling only).
    """
    if not text:
        return ""
    return (
        f'<div class="viewer-message viewer-{kind}" role="status">{html.escape(" ".join(text.split()))}</div>'
    )


def lines_html(lines: list[str], kind: str) -> str:
    """Lines of text (strings from an export among them) as escaped HTML, one ``<div>`` a line."""
    return "".join(
        f'<div class="viewer-{kind}">{html.escape(" ".join(line.split()))}</div>' for line in lines if line
    )
