"""Derive the real CLIP ViT-L/14 tokenizer files (vocab.json, merges.txt) for SD 1.5.

Stable Diffusion 1.5 uses OpenAI's CLIP BPE tokenizer. Its vocabulary cannot be
invented: it is defined by the BPE merges file ``bpe_simple_vocab_16e6.txt.gz``,
which OpenAI's CLIP repository and the ``open-clip-torch`` wheel on PyPI ship.
This script rebuilds the Hugging Face tokenizer files from that file exactly the
way CLIP's own ``SimpleTokenizer`` does, so Atelier works offline without
downloading ``openai/clip-vit-large-patch14``.

Usage::

    python assets/make_clip_tokenizer.py open_clip_torch-3.3.0-py3-none-any.whl
    python assets/make_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz --out DIR
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # = VOCAB_SIZE - 2 * 256 - 2: bytes, end-of-word bytes, merges, 2 specials
DEFAULT_OUT = Path(__file__).resolve().parent / "sd15" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def read_bpe_text(source: Path) -> str:
    """Return the decompressed merges text from a ``.txt.gz`` file or an open-clip-torch wheel."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(WHEEL_MEMBER)
    else:
        data = source.read_bytes()
    return gzip.decompress(data).decode("utf-8")


def derive(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """Build (vocab, merges) as CLIP's SimpleTokenizer does.

    The first line of the file is a version header; CLIP keeps the next 49152-256-2 lines
    (``merges[1 : 49152 - 256 - 2 + 1]`` in ``SimpleTokenizer``).
    """
    lines = bpe_text.split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise ValueError(f"unexpected vocabulary: {len(tokens)} tokens, {len(set(tokens))} unique")
    return {tok: i for i, tok in enumerate(tokens)}, [" ".join(pair) for pair in merges]


def write_tokenizer_files(source: Path, out_dir: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (Hugging Face layout) into ``out_dir``."""
    vocab, merges = derive(read_bpe_text(source))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    log.info("wrote %d tokens and %d merges to %s", len(vocab), len(merges), out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="bpe_simple_vocab_16e6.txt.gz or an open-clip-torch wheel")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tokenizer_files(args.source, args.out)


if __name__ == "__main__":
    main()
