"""Tests of sdengine.tokenizer and sdengine.assets.clip.derive_vocab."""

from __future__ import annotations

import gzip
import json
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sdengine.assets.clip import derive_vocab
from sdengine.errors import ModelLoadError
from sdengine.tokenizer import ClipTokenizer, PromptTruncatedWarning

ASSETS = Path(derive_vocab.__file__).resolve().parent
WHEEL = Path("/tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl")
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
LONG_PROMPT = " ".join(["a majestic castle on a hill at sunset, highly detailed"] * 12) + " zebra"

# Prompts compared id-for-id with transformers' CLIPTokenizer. Left out on purpose, where
# sdengine follows OpenAI CLIP's simple_tokenizer and transformers 5 (Rust tokenizers) does not
# (see test_follows_openai_clip_where_transformers_differs):
#   - HTML entities ("&amp;"): OpenAI CLIP unescapes them twice, transformers keeps them;
#   - Greek final capital sigma ("ΟΔΟΣ"): Python's str.lower() gives "ς", Rust's per-char
#     lowercase gives "σ";
#   - ASCII separators \x1c-\x1f: whitespace to Python's str.split(), not to Rust's \s;
#   - "<|ENDOFTEXT|>" in upper case: OpenAI lowercases it into the EOS token, transformers matches
#     special tokens case-sensitively before lowercasing;
#   - code points unassigned in Python 3.11's Unicode 14 tables (the `regex` module and
#     tokenizers classify them with other Unicode versions).
# ftfy's mojibake repairs (OpenAI CLIP runs ftfy.fix_text) are done by neither: only its NFC step.
PARITY_PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "an astronaut riding a horse on mars, trending on artstation, 4k, 8K UHD",
    "portrait of a woman, 1920s style, oil painting (by greg rutkowski)",
    "don't stop; it's what we'll do, they've said, I'm sure you'd agree",
    "state-of-the-art, well-known, x-ray, sci-fi",
    "café au lait, crème brûlée, naïve résumé",
    "cafe\u0301 with a combining accent",  # NFC turns e + U+0301 into é
    "a cute dog 🐶🐕 with sunglasses 😎",
    "一只可爱的猫, 東京の夜景, 서울의 밤",
    "  lots   of\twhitespace\n\nand   newlines   ",
    "",
    "!!!",
    "[masterpiece], ((best quality)), {detailed}, <lora:foo:0.8>",
    "price: $19.99 — 50% off!",
    "3.14159 and 1,000,000 and 2024-01-01",
    "hello...world?!",
    "emoji only 🎉",
    "ΑΘΗΝΑ και Москва",
    "über straße",
    "e-mail: someone@example.com, url https://example.org/a_b",
    "a <|endoftext|> b",
    "o'clock rock'n'roll",
    "ALL CAPS SHOUTING",
    "tabs\tand\u00a0non-breaking\u3000spaces",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "#hashtag @mention ~tilde `backtick` ^caret |pipe|",
    "photorealistic, unreal engine 5, octane render, hdr",
    LONG_PROMPT,
]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer.default()


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """transformers' CLIP tokenizer on the shipped files, an independent implementation."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(ASSETS / "vocab.json", folder)
    shutil.copy(ASSETS / "merges.txt", folder)
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    # transformers 5 can silently ignore vocabulary files: prove this one loaded them.
    assert hf("a photo of a cat")["input_ids"] == CAT_IDS
    return lambda text: hf(text, padding="max_length", max_length=77, truncation=True)["input_ids"]


def test_pinned_ids(tok):
    row = tok("a photo of a cat")
    assert row.dtype == np.int64 and row.shape == (1, 77)
    assert row[0].tolist() == CAT_IDS + [49407] * 70
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (49406, 49407, 49407, 49408)
    assert tok.encode("a photo of a cat") == CAT_IDS[1:-1]


@pytest.mark.parametrize("prompt", PARITY_PROMPTS)
def test_parity_with_transformers(tok, oracle, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ours = tok(prompt)[0].tolist()
    assert ours == oracle(prompt)


def test_batch_matches_rows(tok):
    prompts = ["a photo of a cat", "", "café 🐶"]
    batch = tok(prompts)
    assert batch.shape == (3, 77)
    for prompt, row in zip(prompts, batch):
        assert row.tolist() == tok(prompt)[0].tolist()


def test_html_entities_are_unescaped(tok, oracle):
    # OpenAI CLIP unescapes twice: "&amp;amp;" -> "&amp;" -> "&".
    assert tok("salt &amp; pepper")[0].tolist() == oracle("salt & pepper")
    assert tok("salt &amp;amp; pepper &quot;x&quot;")[0].tolist() == oracle('salt & pepper "x"')


def test_follows_openai_clip_where_transformers_differs(tok):
    assert tok.encode("ΟΔΟΣ") == tok.encode("οδος") != tok.encode("οδοσ")
    assert tok.encode("a\x1cb\x1fc") == tok.encode("a b c")
    assert tok.encode("<|ENDOFTEXT|> x") == [tok.eos_id, tok.encode("x")[0]]


def test_truncation_warns_and_ends_with_eos(tok):
    with pytest.warns(PromptTruncatedWarning) as record:
        row = tok(LONG_PROMPT)[0]
    message = str(record[0].message)
    assert "zebra" in message and "detailed" in message
    dropped = len(tok.encode(LONG_PROMPT)) - 75
    assert f"{dropped} token" in message
    assert row[76] == tok.eos_id and row[0] == tok.bos_id
    assert row[1:76].tolist() == tok.encode(LONG_PROMPT)[:75]


def test_no_warning_when_it_fits(tok):
    exact = " ".join(["cat"] * 75)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        row = tok(exact)[0]
    assert row[76] == tok.eos_id and (row[1:76] == 2368).all()


def _tokenizer_folder(tmp_path: Path, special_tokens_map: dict | None, config: dict | None) -> Path:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    shutil.copy(ASSETS / "vocab.json", folder)
    shutil.copy(ASSETS / "merges.txt", folder)
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_from_folder_sd2_pads_with_bang(tmp_path, tok):
    folder = _tokenizer_folder(
        tmp_path,
        {"bos_token": {"content": "<|startoftext|>"}, "eos_token": "<|endoftext|>",
         "pad_token": "!"},
        {"model_max_length": 77, "pad_token": "<|endoftext|>"},
    )
    sd2 = ClipTokenizer.from_folder(folder)
    row = sd2("a photo of a cat")[0]
    assert sd2.pad_id == 0 and sd2.max_length == 77
    assert row.tolist() == CAT_IDS + [0] * 70
    assert sd2.decode(row) == "a photo of a cat"


def test_from_folder_sd1_and_insane_max_length(tmp_path):
    folder = _tokenizer_folder(tmp_path, None, {"model_max_length": 1000000000000000019884624838656,
                                                "pad_token": {"content": "<|endoftext|>"}})
    sd1 = ClipTokenizer.from_folder(folder)
    assert sd1.pad_id == 49407 and sd1.max_length == 77


def test_from_folder_short_max_length(tmp_path):
    sd = ClipTokenizer.from_folder(_tokenizer_folder(tmp_path, None, {"model_max_length": 8}))
    with pytest.warns(PromptTruncatedWarning):
        row = sd("one two three four five six seven")[0]
    assert row.shape == (8,) and row[-1] == 49407


@pytest.mark.parametrize("prompt", [
    "a photo of a cat", "café au lait, crème brûlée", "a cute dog 🐶 with sunglasses",
    "一只可爱的猫", "state-of-the-art x-ray", "4k uhd, 8k!",
])
def test_decode_round_trip(tok, prompt):
    text = tok.decode(tok(prompt)[0])
    assert text.replace(" ", "") == prompt.replace(" ", "")
    assert tok.encode(text) == tok.encode(prompt)


def test_decode_plain(tok):
    assert tok.decode(tok.encode("a photo of a cat")) == "a photo of a cat"


def test_missing_vocab_file(tmp_path):
    shutil.copy(ASSETS / "merges.txt", tmp_path)
    with pytest.raises(ModelLoadError, match="vocab"):
        ClipTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(ModelLoadError, match="vocab"):
        ClipTokenizer.from_folder(tmp_path)


def test_corrupt_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{not json")
    shutil.copy(ASSETS / "merges.txt", tmp_path)
    with pytest.raises(ModelLoadError, match="JSON"):
        ClipTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(ModelLoadError, match="special token"):
        ClipTokenizer.from_folder(tmp_path)
    vocab = json.loads((ASSETS / "vocab.json").read_text(encoding="utf-8"))
    del vocab["cat</w>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ModelLoadError, match="do not match"):
        ClipTokenizer.from_folder(tmp_path)
    with pytest.raises(ModelLoadError, match="not found"):
        ClipTokenizer.from_folder(tmp_path / "nowhere")


FAKE_MERGES = ["i n", "t h", "th e</w>", "a n", "c a", "ca t</w>"]


def _fake_gz(path: Path) -> Path:
    text = '"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(FAKE_MERGES) + "\n"
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


def test_derive_structure_from_fake_gz(tmp_path):
    out = tmp_path / "out"
    assert derive_vocab.main([str(_fake_gz(tmp_path / "bpe.txt.gz")), "--out", str(out)]) == 0
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges == ["#version: 0.2"] + FAKE_MERGES
    assert len(vocab) == 512 + len(FAKE_MERGES) + 2
    # Ā is byte 0x00 and Ġ the space byte, the first two bytes outside the printable ranges.
    assert (vocab["!"], vocab["a"], vocab["Ā"], vocab["Ġ"]) == (0, 64, 188, 220)
    assert (vocab["!</w>"], vocab["a</w>"]) == (256, 320)
    assert [vocab["".join(m.split())] for m in FAKE_MERGES] == list(range(512, 518))
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (518, 519)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert not list(out.glob(".*tmp*"))
    tiny = ClipTokenizer.from_files(out / "vocab.json", out / "merges.txt")
    assert tiny.encode("the cat") == [vocab["the</w>"], vocab["cat</w>"]]
    assert tiny("in")[0, :4].tolist() == [518, vocab["i"], vocab["n</w>"], 519]


def test_derive_from_fake_wheel(tmp_path):
    gz = _fake_gz(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gz, "pkg/bpe_simple_vocab_16e6.txt.gz")
    assert derive_vocab.main([str(wheel), "--out", str(tmp_path / "a")]) == 0
    assert derive_vocab.main([str(gz), "--out", str(tmp_path / "b")]) == 0
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_derive_rejects_bad_source(tmp_path, capsys):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"not gzip")
    assert derive_vocab.main([str(bad), "--out", str(tmp_path / "out")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.skipif(not WHEEL.is_file(), reason=f"needs the open-clip-torch 3.3.0 wheel at {WHEEL}")
def test_derive_reproduces_shipped_files(tmp_path):
    assert derive_vocab.main([str(WHEEL), "--out", str(tmp_path)]) == 0
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
