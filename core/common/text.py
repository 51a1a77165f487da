"""Words in captions and prompts as CLIP reads them: whitespace collapsed, any case, whole words."""

from __future__ import annotations

import re


def trigger_words(prefix: str) -> str:
    """The words of a caption prefix without its separator: "bauhaus style building, " → "bauhaus style building"."""
    return " ".join(prefix.split()).strip(" ,;:.")


def says(caption: str, words: str, *, at_start: bool = False) -> bool:
    """Whether `caption` holds `words` as whole words (any case), anywhere or only at its start."""
    if not words:
        return False
    pattern = ("^" if at_start else r"(?<!\w)") + re.escape(words) + r"(?!\w)"
    return re.search(pattern, " ".join(caption.split()), re.IGNORECASE) is not None
