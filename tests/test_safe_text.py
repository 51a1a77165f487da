"""ui.safe_text: untrusted text rendered by a CommonMark parser (with linkify) comes out as exactly its characters."""

from __future__ import annotations

import html
import re

import pytest
from markdown_it import MarkdownIt

from ui.safe_text import code, fenced, md

HOSTILE = [
    "<img src=http://198.51.100.7/x.png>",
    "<a href=http://198.51.100.7/>CLICK TO FIX YOUR DATASET</a>",
    "<form action=http://198.51.100.7><input name=q></form>",
    '<div style="position:fixed;inset:0">x</div>',
    "![x](http://198.51.100.7/x.png)",
    "[CLICK](http://198.51.100.7/)",
    "name` <b>bold</b> `",
    "```\n<b>out of the fence</b>",
    "# heading | a | b |\n- list\n> quote",
    "*em* _em_ **strong** ~~gone~~ \\* &amp; &lt;",
    "http://198.51.100.7/ www.example.com user@example.com",
    "{braces} $math$ (parens) ! ' \"",
]


def _render(markdown: str) -> str:
    return MarkdownIt("commonmark", {"linkify": False}).enable("table").enable("strikethrough").render(markdown)


def _text(rendered: str) -> str:
    """The characters a browser would show: tags dropped, character references decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", rendered)).strip()


@pytest.mark.parametrize("text", HOSTILE)
def test_md_renders_as_its_own_characters_in_one_paragraph(text: str) -> None:
    rendered = _render(md(text))
    assert re.findall(r"<(\w+)", rendered) == ["p"]
    assert _text(rendered) == re.sub(r"\n", " ", text)


@pytest.mark.parametrize("char", list("&<>\"'`[]()!*_#|~\\{}$:@"))
def test_md_turns_each_special_character_into_a_reference(char: str) -> None:
    assert md(f"a{char}b") == f"a&#{ord(char)};b"


def test_md_keeps_plain_text_and_breaks_www_and_lines() -> None:
    assert md("photo 01.png, a cat") == "photo 01.png, a cat"
    assert md("see WWW.example.com") == "see WWW&#46;example.com"
    assert md("one\r\ntwo\nthree") == "one two three"
    assert md(ValueError("bad <x>")) == "bad &#60;x&#62;"


@pytest.mark.parametrize("text", HOSTILE)
def test_code_is_one_code_span_holding_the_text(text: str) -> None:
    rendered = _render(f"Saved {code(text)}.")
    assert re.findall(r"<(\w+)", rendered) == ["p", "code"]
    assert _text(rendered) == "Saved " + re.sub(r"\n", " ", text) + "."


@pytest.mark.parametrize("run", [1, 2, 3, 4, 7])
def test_fenced_block_is_longer_than_any_backtick_run(run: int) -> None:
    text = f"summary\n{'`' * run}\n<b>after the fence</b>\n{'`' * run}python"
    block = fenced(text)
    assert block.startswith("`" * max(3, run + 1) + "\n") and block.endswith("\n" + "`" * max(3, run + 1))
    rendered = _render(block)
    assert re.findall(r"<(\w+)", rendered) == ["pre", "code"]
    assert html.unescape(re.sub(r"<[^>]+>", "", rendered)).rstrip("\n") == text
