"""The gist of an error for a message: its first line; the full text stays in the exception chain."""

from __future__ import annotations


def first_line(error: BaseException, fallback: str = "") -> str:
    """The first non-empty line of `error`'s text, or `fallback` when it has none."""
    return (str(error).strip().splitlines() or [fallback])[0]
