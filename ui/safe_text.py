"""Untrusted text (file names, captions, metadata, configs, error messages quoting them) shown as plain text.

Gradio's Markdown keeps `<img src>`, `<a href>`, `<form>`, `style` and Markdown link/image syntax, and linkifies
bare addresses, so a file name like `<img src=http://…>` would load a remote image with the app's address as
referrer. Every tab builds its Markdown through these helpers, never by pasting such text between backticks or
asterisks: a backtick in a name would close the code span and let the rest be read as Markdown.
"""

import re

# Characters that are HTML or Markdown syntax (links, images, emphasis, code, headings, tables, escapes,
# autolinks): each becomes a numeric character reference, which the browser shows as the character itself and
# which neither the Markdown parser nor the HTML sanitizer reads as syntax.
_SPECIAL = re.compile(r"[&<>\"'`\[\]()!*_#|~\\{}$:@]")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c]+")
_WWW = re.compile(r"www\.", re.IGNORECASE)
_BACKTICK_RUN = re.compile(r"`+")


def md(text: object) -> str:
    """`text` as Markdown that renders to exactly its characters, on one line.

    Line breaks become spaces: a new line could start a list, a quote or a heading. "www." loses its dot's
    meaning too, so GFM does not turn it into a link.
    """
    flat = _LINE_BREAKS.sub(" ", str(text))
    escaped = _SPECIAL.sub(lambda match: f"&#{ord(match.group())};", flat)
    return _WWW.sub(lambda match: f"{match.group()[:3]}&#46;", escaped)


def code(text: object) -> str:
    """`text` as an inline code span (monospace), safe whatever backticks or HTML it holds."""
    return f"<code>{md(text)}</code>"


def fenced(text: object) -> str:
    """`text` as a fenced code block kept verbatim, line breaks included: the fence is longer than any run of
    backticks in the text, so no line of it can close the block, and code blocks show HTML as text."""
    longest = max((len(run) for run in _BACKTICK_RUN.findall(str(text))), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"
