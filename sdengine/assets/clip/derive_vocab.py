"""Derive CLIP's vocab.json and merges.txt from OpenAI's bpe_simple_vocab_16e6.txt.gz.

Usage: python -m sdengine.assets.clip.derive_vocab SOURCE [--out DIR]
SOURCE is an open-clip-torch / clip-anytorch wheel (.whl) or the .gz itself.
The derivation follows OpenAI CLIP's simple_tokenizer.SimpleTokenizer.__init__.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import zipfile
from pathlib import Path

GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # lines[1 : NUM_MERGES + 1] of the gz, as in simple_tokenizer
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MERGES_HEADER = "#version: 0.2"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char table (256 entries, in CLIP's vocab order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_bpe_gz(source: Path) -> bytes:
    """Return the compressed bytes of the BPE gz, from a wheel (zip) or the .gz file itself."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + GZ_NAME) or n == GZ_NAME]
            if not names:
                raise FileNotFoundError(f"{source} holds no */{GZ_NAME}")
            return zf.read(sorted(names)[0])
    return source.read_bytes()


def derive(gz_bytes: bytes) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab token -> id, merges) exactly as OpenAI CLIP's SimpleTokenizer builds them."""
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    # Blank lines (the gz's trailing newline, for files shorter than CLIP's) carry no merge.
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1] if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"malformed merge line(s), e.g. {bad[0]!r}: expected two symbols")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += list(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"duplicate tokens: {len(tokens)} tokens but {len(vocab)} distinct")
    return vocab, merges


def render(vocab: dict[str, int], merges: list[tuple[str, str]]) -> tuple[bytes, bytes]:
    """Serialize to (vocab.json, merges.txt) bytes: compact UTF-8 JSON, '#version: 0.2' header."""
    vocab_json = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n"
    merges_txt = "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n"
    return vocab_json.encode("utf-8"), merges_txt.encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to a temporary sibling of path, then rename it over path."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: derive and write vocab.json and merges.txt."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help=f"a .whl holding */{GZ_NAME}, or the .gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder (default: this module's folder)")
    args = parser.parse_args(argv)
    try:
        vocab, merges = derive(read_bpe_gz(args.source))
    except (OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        print(f"derive_vocab: cannot read {args.source}: {exc}", file=sys.stderr)
        return 1
    vocab_json, merges_txt = render(vocab, merges)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "vocab.json", vocab_json)
    write_atomic(args.out / "merges.txt", merges_txt)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
