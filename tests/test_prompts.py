"""Prompt syntax: A1111's emphasis parse, BREAK, chunks of 75 tokens, the chunk limit, emphasis arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from sdengine.errors import InvalidInputError
from sdengine.prompts import (MAX_PROMPT_CHUNKS, apply_emphasis, check_clip_skip, chunk_prompt, parse_prompt_attention,
                              prompt_batch)
from sdengine.tokenizer import ClipTokenizer

# The examples of AUTOMATIC1111's modules/prompt_parser.py parse_prompt_attention docstring, with its outputs
# exactly (float products included), then the edge cases its code decides.
A1111_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]
EDGE_CASES = [
    ("", [("", 1.0)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("unbalanced)", [("unbalanced)", 1.0)]),         # a closing bracket with none open is text
    ("close] early", [("close] early", 1.0)]),
    ("x:1.5) y", [("x:1.5) y", 1.0)]),               # a weight with no open bracket is text
    ("(a:1.2.3) x", [("a:1.2.3", 1.1), (" x", 1.0)]),  # an unreadable weight is text; ")" still closes
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # as A1111: BREAK inside brackets is weighted
    ("a BREAKFAST", [("a BREAKFAST", 1.0)]),
]


@pytest.mark.parametrize("text, expected", A1111_CASES + EDGE_CASES)
def test_parse_matches_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text", ["(((", ")))", "[[[(", "\\", "(:", ":)", "(a:)", "(a:-)", "(a:.)", "]]](((:2)"])
def test_parse_never_raises(text):
    out = parse_prompt_attention(text)
    assert out and all(isinstance(t, str) and isinstance(w, float) for t, w in out)


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer.default()


def test_short_prompt_is_the_tokenizer_row(tok):
    """One chunk of a prompt of <= 75 tokens is exactly the 77-id row the tokenizer gives (BOS, ids, EOS, pad)."""
    for text in ["a photo of a red cat", "", "x " * 75]:
        c = chunk_prompt(tok, text)
        assert c.chunks == 1
        np.testing.assert_array_equal(c.ids, tok([text]))
        assert (c.weights == 1).all()


def test_long_prompt_is_cut_into_chunks_of_75(tok):
    words = [f"w{i}" for i in range(100)]
    text = " ".join(words)
    ids = tok.encode(text)
    c = chunk_prompt(tok, text)
    assert c.tokens == len(ids) and c.chunks == -(-len(ids) // 75)
    assert c.ids.shape == (c.chunks, 77)
    got = [t for row in c.ids for t in row[1:-1] if t not in (tok.eos_id,)]
    assert got == ids
    assert (c.ids[:, 0] == tok.bos_id).all() and (c.ids[:, -1] == tok.eos_id).all()
    np.testing.assert_array_equal(c.ids[0, 1:76], ids[:75])


def test_exactly_75_tokens_is_one_chunk_and_76_is_two(tok):
    assert chunk_prompt(tok, "cat " * 75).chunks == 1
    assert chunk_prompt(tok, "cat " * 76).chunks == 2


def test_break_starts_a_new_chunk(tok):
    c = chunk_prompt(tok, "a red cat BREAK a blue dog")
    assert c.chunks == 2
    np.testing.assert_array_equal(c.ids[0], tok(["a red cat"])[0])
    np.testing.assert_array_equal(c.ids[1], tok(["a blue dog"])[0])
    assert chunk_prompt(tok, "a cat BREAK").chunks == 1          # a trailing BREAK adds nothing
    assert chunk_prompt(tok, "BREAK a cat").chunks == 2          # ... a leading one an empty chunk
    assert chunk_prompt(tok, "a BREAK BREAK b").chunks == 3
    assert chunk_prompt(tok, "a BREAK b", weighting=False).chunks == 2  # BREAK works without weighting too


def test_weights_follow_their_tokens(tok):
    c = chunk_prompt(tok, "a (red:1.5) [cat]")
    n = len(tok.encode("a"))
    red = len(tok.encode("red"))
    w = c.weights[0]
    assert w[0] == 1 and (w[1:1 + n] == 1).all()
    np.testing.assert_allclose(w[1 + n:1 + n + red], 1.5)
    np.testing.assert_allclose(w[1 + n + red:1 + n + red + len(tok.encode("cat"))], 1 / 1.1, rtol=1e-6)
    assert (w[1 + n + red + 1:] == 1).all()


def test_weighting_off_reads_brackets_as_text(tok):
    c = chunk_prompt(tok, "a (red:1.5) cat", weighting=False)
    np.testing.assert_array_equal(c.ids, tok(["a (red:1.5) cat"]))
    assert (c.weights == 1).all()


def test_chunk_limit(tok):
    assert chunk_prompt(tok, "cat " * (75 * MAX_PROMPT_CHUNKS)).chunks == MAX_PROMPT_CHUNKS
    with pytest.raises(InvalidInputError, match=r"needs 9 chunks of 75 tokens \(601 tokens\); at most 8"):
        chunk_prompt(tok, "cat " * (75 * MAX_PROMPT_CHUNKS + 1))
    with pytest.raises(InvalidInputError, match="at most 2 are read"):
        chunk_prompt(tok, "a BREAK b BREAK c", max_chunks=2)


def test_batch_pads_to_the_most_chunks_with_empty_chunks(tok):
    ids, weights = prompt_batch(tok, ["", "cat " * 100, "a BREAK b BREAK c"])
    assert ids.shape == (3, 3, 77) and weights.shape == (3, 3, 77)
    empty = tok([""])[0]
    for r, c in [(0, 1), (0, 2), (1, 2)]:
        np.testing.assert_array_equal(ids[r, c], empty)
        assert (weights[r, c] == 1).all()


def test_emphasis_scales_then_restores_the_mean():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 2, 77, 8)).astype(np.float32) + 0.3
    weights = np.ones((2, 2, 77), np.float32)
    weights[0, 1, 3:6] = 1.5
    out = apply_emphasis(hidden, weights)
    assert out.shape == (2, 154, 8)
    np.testing.assert_array_equal(out[1], hidden[1].reshape(154, 8))  # unit weights: untouched, bit for bit
    np.testing.assert_array_equal(out[0, :77], hidden[0, 0])
    chunk = hidden[0, 1].astype(np.float64)
    scaled = chunk * weights[0, 1, :, None]
    expected = scaled * (chunk.mean() / scaled.mean())
    np.testing.assert_allclose(out[0, 77:], expected, rtol=1e-6)
    np.testing.assert_allclose(out[0, 77:].astype(np.float64).mean(), chunk.mean(), rtol=1e-5)


def test_clip_skip_range():
    assert check_clip_skip(None, 12) == 0 and check_clip_skip(2, 12) == 2
    for bad in (-1, 12, 1.0, True, "1"):
        with pytest.raises(InvalidInputError, match="clip_skip must be an integer in"):
            check_clip_skip(bad, 12)


def test_break_inside_brackets_still_breaks(tok):
    """A1111 encodes the word "break" at weight -1.1 there; a negative weight is never meant: it breaks."""
    c = chunk_prompt(tok, "(a BREAK b)")
    assert c.chunks == 2 and (c.weights >= 0).all()


def test_emphasis_leaves_a_mean_of_zero_alone():
    """A chunk whose mean is ~0 against its size (a final layer norm without bias) is only scaled."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1, 1, 77, 16))
    z = (z - z.mean(axis=-1, keepdims=True)).astype(np.float32)  # every token's mean 0, as a bias-free layer norm
    weights = np.ones((1, 1, 77), np.float32)
    weights[0, 0, 2] = 1.3
    out = apply_emphasis(z, weights)
    np.testing.assert_allclose(out[0], z[0, 0] * weights[0, 0, :, None], rtol=1e-6)
