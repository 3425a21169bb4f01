"""Write tests/data/openclip_ids.json: reference CLIP token ids from open_clip's SimpleTokenizer.

open_clip's ``SimpleTokenizer`` is OpenAI CLIP's ``simple_tokenizer`` (the BPE CLIP ViT-L/14, SD 1.x's
text encoder, was trained with): ``ftfy.fix_text``, ``html.unescape`` twice, strip, whitespace collapse,
lowercase, then byte-level BPE on the 49,408-token vocabulary that sdengine ships in sdengine/assets/clip.

How to run it (the open_clip package itself is never imported: its ``__init__`` pulls in torchvision and
timm, and torchvision may fail to import beside the installed torch build)::

    pip install torch ftfy regex numpy                    # what open_clip/tokenizer.py imports
    pip download open_clip_torch==3.3.0 --no-deps -d /tmp/oc
    python tests/data/make_openclip_ids.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

The argument is the wheel, or a folder holding ``tokenizer.py`` and ``bpe_simple_vocab_16e6.txt.gz``
(``src/open_clip`` of an open_clip checkout). The script copies those two files into a temporary folder
and loads ``tokenizer.py`` there as a stand-alone module with ``importlib.util.spec_from_file_location``
(it imports only gzip, html, ftfy, numpy, regex and torch, and finds the .gz next to itself).

What it records, for context length 77 (``SimpleTokenizer()(text, context_length=77)``): the row with
open_clip's zero padding removed, i.e. BOS 49406, the ids, EOS 49407 (truncated as open_clip does:
the first 76 tokens, then EOS). Two sets of texts:

* ``cases``: hand-picked texts, each with a short name (curly quotes, ligatures, mojibake, html
  entities, full-width forms, NFC/NFD accents, emoji, CJK, zero-width characters, whitespace,
  number forms, math alphanumerics, combining marks, right-to-left text, Stable Diffusion prompts).
* ``random``: RANDOM_COUNT strings from ``random_texts(RANDOM_SEED, RANDOM_COUNT)`` below, a
  documented generator: each string joins 1-10 pieces (with a space, or nothing) drawn from ASCII
  words in random case, ASCII punctuation runs, digits, whitespace of several kinds, HTML entities,
  mojibake (UTF-8 bytes read back as Windows-1252 or Latin-1), contractions, and 1-4 random code
  points from one of the Unicode blocks in BLOCKS. Only code points that this Python's unicodedata
  calls assigned are drawn (so the ids do not hinge on the Unicode version of the regex module or of
  Python), and never a surrogate (U+D800..U+DFFF).

The texts are stored in the JSON, so the tests do not depend on this generator. The versions of
Python, Unicode, ftfy, regex and open_clip used are recorded under "generator": ftfy's repairs
change between versions, so regenerate the file when you raise the ftfy floor.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import string
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "openclip_ids.json"
CONTEXT_LENGTH = 77
RANDOM_SEED = 20240611
RANDOM_COUNT = 2000
_FILES = ("tokenizer.py", "bpe_simple_vocab_16e6.txt.gz")

# (name, text): hand-picked cases. Names are test ids: keep them short and unique.
CASES = [
    ("curly_quotes", "\u2019curly\u2019 \u201cquotes\u201d"),
    ("smart_quotes", "\u201csmart\u201d \u2018quotes\u2019"),
    ("curly_apostrophe_contractions", "it\u2019s tom\u2019s, we\u2019ll see, I\u2019m sure"),
    ("ligature_fi", "\ufb01ne \ufb01sh"),
    ("ligature_fl", "\ufb02ower \ufb02uid"),
    ("ligature_ff", "\ufb00 o\ufb00 a\ufb00ord"),
    ("ligatures_ffi_ffl_st", "o\ufb03ce ra\ufb04e \ufb06op"),
    ("mojibake_cafe", "Caf\u00c3\u00a9"),
    ("mojibake_resume", "na\u00c3\u00afve r\u00c3\u00a9sum\u00c3\u00a9, cr\u00c3\u00a8me br\u00c3\u00bbl\u00c3\u00a9e"),
    ("mojibake_quotes", "\u00e2\u20ac\u0153quoted\u00e2\u20ac\u009d and it\u00e2\u20ac\u2122s"),
    ("mojibake_dash", "a \u00e2\u20ac\u201d b"),
    ("html_amp_twice", "&amp;amp;"),
    ("html_salt_pepper", "salt &amp; pepper &quot;x&quot; &#39;y&#39;"),
    ("html_tags_escaped", "&lt;b&gt;bold&lt;/b&gt; &nbsp;&eacute;&#x263A;"),
    ("html_with_tag", "<b>&amp;</b> &lt;i&gt;"),
    ("html_surrogate_charref", "&#xD800; &#55296;"),
    ("fullwidth_letters", "\uff21\uff22\uff23 \uff41\uff42\uff43 \uff11\uff12\uff13\uff01"),
    ("halfwidth_katakana", "\uff76\uff80\uff76\uff85"),
    ("ideographic_space", "a\u3000b"),
    ("nfc_accents", "caf\u00e9 \u00c5str\u00f6m"),
    ("nfd_accents", "cafe\u0301 A\u030astro\u0308m"),
    ("emoji", "a cute dog \U0001f436\U0001f415 with sunglasses \U0001f60e"),
    ("emoji_skin_tone_flag", "\U0001f44d\U0001f3fd \U0001f1ef\U0001f1f5"),
    ("emoji_zwj_family", "\U0001f468\u200d\U0001f469\u200d\U0001f467"),
    ("cjk", "\u4e00\u53ea\u53ef\u7231\u7684\u732b, \u6771\u4eac\u306e\u591c\u666f, \uc11c\uc6b8\uc758 \ubc24"),
    ("zero_width", "zero\u200bwidth\u200cnon\u200djoiner\u2060wj"),
    ("byte_order_mark", "\ufeffbom at start"),
    ("tabs_newlines", "  a\tb\nc\r\nd  e\n\n"),
    ("unicode_line_separators", "line1\u2028line2\u2029p\u0085nel"),
    ("vertical_tab_form_feed", "\x0bvtab\x0cformfeed"),
    ("ascii_controls", "a\x1cb\x1fc \x00nul\x7fdel"),
    ("terminal_escape", "\x1b[31mred\x1b[0m text"),
    ("roman_numeral", "\u216b century, \u2160\u2161\u2162"),
    ("superscripts", "x\u00b2 + y\u00b3 = z\u2074, \u00bd cup"),
    ("math_alphanumerics", "\U0001d400\U0001d401\U0001d402 \U0001d465\U0001d466 \U0001d7ce\U0001d7cf"),
    ("letterlike", "\u210c\u2102 \u2122 \u2116 \u338f"),
    ("circled_numbers", "\u2460\u2461\u2462 \u2474"),
    ("other_digits", "\u0661\u0662\u0663 \u0967\u0968 \u0e51"),
    ("combining_marks", "Z\u0335\u0321\u0322a\u0337l\u0338g\u0334o\u0336"),
    ("rtl_arabic", "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645"),
    ("rtl_hebrew_marks", "\u05e9\u05dc\u05d5\u05dd \u200f\u05e2\u05d5\u05dc\u05dd\u200e ok"),
    ("greek_final_sigma", "\u039f\u0394\u039f\u03a3 \u0391\u0398\u0397\u039d\u0391"),
    ("turkish_dotted_i", "\u0130stanbul \u0131"),
    ("sharp_s", "stra\u00dfe STRA\u1e9eE"),
    ("titlecase_digraph", "\u01c5ur\u01c6a"),
    ("replacement_char", "a\ufffdb"),
    ("private_use", "\ue000\uf8ff"),
    ("sd_weights", "(masterpiece:1.2), best quality, ultra-detailed, 1girl, solo"),
    ("sd_brackets", "[cat|dog], ((red hair)), {blue eyes}, <lora:foo:0.8>"),
    ("sd_negative", "(worst quality:1.4), lowres, bad anatomy, text, watermark, jpeg artifacts"),
    ("sd_photo", "an astronaut riding a horse on mars, trending on artstation, 4k, 8K UHD"),
    ("sd_cat", "a photo of a cat"),
    ("sd_caps", "A Photo Of A CAT, ALL CAPS SHOUTING"),
    ("contractions", "don't stop; it's what we'll do, they've said, I'm sure you'd agree, DON'T"),
    ("numbers", "3.14159 and 1,000,000 and 2024-01-01, $19.99 \u2014 50% off!"),
    ("urls", "e-mail: someone@example.com, url https://example.org/a_b?x=1&y=2"),
    ("empty", ""),
    ("whitespace_only", " \t\n\u00a0 "),
    ("long_prompt", " ".join(["a majestic castle on a hill at sunset, highly detailed"] * 12) + " zebra"),
]

# Unicode blocks random code points are drawn from: (name, first, last), inclusive.
BLOCKS = [
    ("c0_c1_controls", 0x00, 0x9F),
    ("latin1", 0xA0, 0xFF),
    ("latin_ext", 0x100, 0x24F),
    ("ipa_modifiers", 0x250, 0x2FF),
    ("combining", 0x300, 0x36F),
    ("greek", 0x370, 0x3FF),
    ("cyrillic", 0x400, 0x4FF),
    ("hebrew", 0x590, 0x5FF),
    ("arabic", 0x600, 0x6FF),
    ("devanagari", 0x900, 0x97F),
    ("thai", 0xE00, 0xE7F),
    ("hangul_jamo", 0x1100, 0x11FF),
    ("latin_ext_additional", 0x1E00, 0x1EFF),
    ("general_punctuation", 0x2000, 0x206F),
    ("super_subscripts", 0x2070, 0x209F),
    ("currency", 0x20A0, 0x20CF),
    ("letterlike", 0x2100, 0x214F),
    ("number_forms", 0x2150, 0x218F),
    ("arrows_math", 0x2190, 0x22FF),
    ("enclosed_alnum", 0x2460, 0x24FF),
    ("shapes_symbols", 0x2500, 0x27BF),
    ("cjk_symbols", 0x3000, 0x303F),
    ("kana", 0x3040, 0x30FF),
    ("cjk_compat", 0x3300, 0x33FF),
    ("cjk", 0x4E00, 0x9FFF),
    ("hangul", 0xAC00, 0xD7A3),
    ("private_use", 0xE000, 0xE0FF),
    ("alphabetic_presentation", 0xFB00, 0xFB4F),
    ("arabic_presentation", 0xFE70, 0xFEFF),
    ("halfwidth_fullwidth", 0xFF00, 0xFFEF),
    ("specials", 0xFFF0, 0xFFFD),
    ("math_alphanumerics", 0x1D400, 0x1D7FF),
    ("emoji", 0x1F300, 0x1FAFF),
]
WORDS = ["a", "photo", "of", "cat", "castle", "portrait", "woman", "masterpiece", "best", "quality",
         "detailed", "sunset", "cafe", "the", "in", "style", "by", "greg", "rutkowski", "octane",
         "render", "4k", "hdr", "neon", "city", "anime", "girl", "blue", "eyes", "forest"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u200b"]
ENTITIES = ["&amp;", "&amp;amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x263a;", "&nbsp;", "&eacute;",
            "&hellip;", "&mdash;"]
MOJIBAKE_SOURCES = ["caf\u00e9", "na\u00efve", "\u201cquoted\u201d", "it\u2019s", "\u2014", "\u00fcber",
                    "\u00bd", "\u20ac5", "\u2026", "\u00c5ngstr\u00f6m", "\u00f1and\u00fa"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "\u2019s", "\u2019ll"]


def _assigned(first: int, last: int) -> list[str]:
    return [chr(c) for c in range(first, last + 1)
            if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn"]


def _mojibake(rng: random.Random) -> str:
    data = rng.choice(MOJIBAKE_SOURCES).encode("utf-8")
    try:
        return data.decode(rng.choice(["cp1252", "latin-1"]))
    except UnicodeDecodeError:  # bytes 0x81, 0x8d, 0x8f, 0x90, 0x9d are undefined in cp1252
        return data.decode("latin-1")


def random_texts(seed: int = RANDOM_SEED, count: int = RANDOM_COUNT) -> list[str]:
    """`count` strings from a fixed seed (see the module docstring); never a surrogate."""
    rng = random.Random(seed)
    blocks = [_assigned(first, last) for _, first, last in BLOCKS]

    def word() -> str:
        w = rng.choice(WORDS)
        return rng.choice([w, w, w.title(), w.upper()])

    makers = [
        (word, 6),
        (lambda: "".join(rng.choice(string.punctuation) for _ in range(rng.randint(1, 3))), 2),
        (lambda: "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 4))), 1),
        (lambda: rng.choice(SPACES), 2),
        (lambda: rng.choice(ENTITIES), 1),
        (lambda: _mojibake(rng), 1),
        (lambda: rng.choice(CONTRACTIONS), 1),
        (lambda: "".join(rng.choice(rng.choice(blocks)) for _ in range(rng.randint(1, 4))), 6),
    ]
    funcs = [f for f, _ in makers]
    weights = [w for _, w in makers]
    texts = []
    for _ in range(count):
        pieces = [rng.choices(funcs, weights)[0]() for _ in range(rng.randint(1, 10))]
        texts.append("".join(p + rng.choice(["", " "]) for p in pieces))
    return texts


def load_simple_tokenizer_module(source: Path, workdir: Path):
    """open_clip/tokenizer.py (from a wheel or a folder) loaded alone, as a module of its own."""
    for name in _FILES:
        if source.is_dir():
            shutil.copy(source / name, workdir / name)
        else:
            with zipfile.ZipFile(source) as wheel:
                (workdir / name).write_bytes(wheel.read(f"open_clip/{name}"))
    spec = importlib.util.spec_from_file_location("openclip_reference_tokenizer", workdir / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_ids(tokenizer, text: str) -> list[int]:
    """open_clip's row for text at context length 77, without its zero padding."""
    row = tokenizer(text, context_length=CONTEXT_LENGTH)[0].tolist()
    n = min(len(tokenizer.encode(text)) + 2, CONTEXT_LENGTH)
    assert row[0] == 49406 and row[n - 1] == 49407 and not any(row[n:]), (text, row)
    return row[:n]


def _versions(source: Path) -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0], "unicodedata": unicodedata.unidata_version,
                "open_clip_source": source.name}
    for dist in ("ftfy", "regex", "torch"):
        versions[dist] = metadata.version(dist)
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path,
                        help="open_clip_torch wheel, or a folder with tokenizer.py and the bpe .gz")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        module = load_simple_tokenizer_module(args.source, Path(tmp))
        tokenizer = module.SimpleTokenizer()
        names = [name for name, _ in CASES]
        assert len(set(names)) == len(names), "case names must be unique"
        cases = [{"name": name, "text": text, "ids": reference_ids(tokenizer, text)} for name, text in CASES]
        randoms = [[text, reference_ids(tokenizer, text)] for text in random_texts()]
    header = {"generator": {"script": "tests/data/make_openclip_ids.py", "context_length": CONTEXT_LENGTH,
                            "random_seed": RANDOM_SEED, "random_count": RANDOM_COUNT,
                            "versions": _versions(args.source)}}
    # One case per line, ASCII-escaped: invisible and control characters stay visible in diffs.
    lines = [json.dumps(header)[:-1] + ',\n"cases": [']
    lines.append(",\n".join(json.dumps(c) for c in cases) + "],")
    lines.append('"random": [')
    lines.append(",\n".join(json.dumps(r, separators=(",", ":")) for r in randoms) + "]}")
    args.out.write_text("\n".join(lines) + "\n", encoding="ascii")
    json.loads(args.out.read_text(encoding="ascii"))  # well-formed
    print(f"wrote {args.out}: {len(cases)} cases, {len(randoms)} random strings, "
          f"{args.out.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
