"""The AUTOMATIC1111 "parameters" PNG text chunk: write it, read it, split it into prompt and settings.

A1111, Forge, ComfyUI importers and civitai all read this one layout, so images made here restore their
settings there and theirs restore here:

    <prompt, any number of lines>
    Negative prompt: <negative prompt, any number of lines>
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15

The settings line is "key: value" pairs joined by ", "; a value holding a comma, colon or newline is
written as a JSON string ("..."), as A1111's `quote` does. Parsing follows A1111's
`parse_generation_parameters` (the same key/value pattern, and a last line with fewer than three pairs
is still prompt text) but keeps every prompt line as written, so `parse_parameters` inverts
`format_parameters` exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from core.common.fsutil import atomic_path

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"

# A1111's re_param: a key (word characters, spaces, hyphens, slashes) then a quoted or comma-free value.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]+")
# A1111 treats a last line with fewer pairs as part of the prompt ("style: ink" is a prompt, not settings).
_MIN_SETTINGS = 3


def _quote(value: str) -> str:
    """A1111's `quote`, plus the cases its parser would otherwise change (leading quote or whitespace, \\r)."""
    needs_quotes = any(char in value for char in ",:\n\r") or value.startswith('"') or value != value.lstrip()
    return json.dumps(value, ensure_ascii=False) if needs_quotes else value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            return value
    return value


def format_parameters(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    """The A1111 text: prompt, "Negative prompt: ..." (left out when empty), then the settings line.

    Settings keep their order; None values are left out (A1111 does the same); other values are written
    with `str()` and quoted when needed. Keys must fit A1111's pattern (letters, digits, spaces, "-",
    "/", "_", at least two characters). Fewer than three settings read back as prompt text, as in A1111.
    """
    pairs = []
    for key, value in settings.items():
        if not _KEY.fullmatch(key):
            raise ValueError(
                f"setting name {key!r} cannot be read back by A1111: use letters, digits, spaces, '-', '/' "
                "and '_' only, starting with a letter or digit, at least two characters"
            )
        if value is not None:
            pairs.append(f"{key}: {_quote(str(value))}")
    lines = [prompt] if prompt else []
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) from an A1111 "parameters" text; values come back as strings.

    Lines before "Negative prompt:" are the prompt, lines from it up to the settings line the negative
    prompt; quoted values are unquoted. Windows line ends and blank lines after the settings are
    tolerated. "Size" stays "512x512" (A1111 splits it into Size-1/Size-2 only inside its UI).
    """
    lines = text.replace("\r\n", "\n").split("\n")
    last = len(lines) - 1
    while last > 0 and not lines[last].strip():
        last -= 1
    settings: dict[str, str] = {}
    pairs = _PARAM.findall(lines[last])
    if len(pairs) >= _MIN_SETTINGS:
        settings = {key: _unquote(value) for key, value in pairs}
        lines = lines[:last]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if not negative_lines and line.startswith(NEGATIVE_PREFIX):
            rest = line[len(NEGATIVE_PREFIX) :]
            negative_lines.append(rest[1:] if rest.startswith(" ") else rest)
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), settings


def save_png_with_parameters(image: Image.Image, path: Path, parameters: str) -> None:
    """Write `image` as a PNG carrying `parameters`, atomically (a crash never leaves half a file).

    Pillow stores text outside Latin-1 as an iTXt chunk, which A1111 reads the same way.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_parameters(path_or_image: Path | str | Image.Image) -> str | None:
    """The "parameters" text of a PNG (a path or an opened image), or None when it has none."""
    if isinstance(path_or_image, Image.Image):
        return _parameters_of(path_or_image)
    with Image.open(path_or_image) as image:
        return _parameters_of(image)


def _parameters_of(image: Image.Image) -> str | None:
    # `text` also reads chunks stored after the image data; `info` covers images built in memory.
    text = getattr(image, "text", None) or {}
    value = text.get(PARAMETERS_KEY, image.info.get(PARAMETERS_KEY))
    return value if isinstance(value, str) else None
