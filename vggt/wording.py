"""Wording shared by every message the package prints or shows (no torch, no numpy)."""

from __future__ import annotations


def plural(count: int, word: str, suffix: str = "s") -> str:
    """``"1 frame"``, ``"3 frames"``, ``"1,024 layers"``; ``suffix`` for words such as ``"match"``."""
    return f"{count:,} {word}" + ("" if count == 1 else suffix)
