"""Prompt syntax: A1111's emphasis, BREAK and long prompts in chunks of 75 tokens (numpy only: the runtime imports it).

- Emphasis (AUTOMATIC1111's `parse_prompt_attention` semantics): `(text)` multiplies the weight of its tokens by
  1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by 1.3; they nest and multiply. `\\(`, `\\)`, `\\[`,
  `\\]` and `\\\\` are the literal characters. Nothing is ever a syntax error: a bracket left open applies to the
  rest of the prompt, a closing bracket with none open is kept as text.
- Long prompts: the tokens are cut into chunks of 75; each chunk is wrapped in BOS ... EOS and padded to 77 as a
  single prompt is, encoded on its own, and the chunks' embeddings are concatenated along the sequence axis.
  `BREAK` (upper case, a word of its own) ends the current chunk. Every row of one call (the negative prompts
  included) is padded to the same number of chunks with empty chunks: the encoding of BOS, EOS, padding.
- Weights scale the text encoder's output token by token, then the chunk is rescaled to its original mean
  (A1111's original emphasis), in numpy on the host (`apply_emphasis`), so every backend shares it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InvalidInputError

MAX_PROMPT_CHUNKS = 8   # 8 x 75 = 600 tokens: the default limit of exports, engines and the server
ROUND_UP, SQUARE_DOWN = 1.1, 1 / 1.1
MEAN_FLOOR = 1e-3  # emphasis restores a chunk's mean only when it is at least this fraction of its RMS
BREAK = "BREAK"
_BREAK_WEIGHT = -1.0
# One token of the emphasis syntax per match: escapes, brackets, ":weight)", plain text, a lone ":".
_SYNTAX = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """(fragment, weight) pairs of a prompt, A1111's way; ("BREAK", -1.0) where BREAK starts a new chunk.

    Adjacent fragments of equal weight are merged; an empty prompt gives [("", 1.0)]. Never raises.
    """
    parts: list[list] = []       # [text, weight]
    opened_round: list[int] = []  # index in parts where each open "(" starts
    opened_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _SYNTAX.finditer(text):
        token, number = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])  # an escaped character, or a lone backslash (kept as "")
            continue
        if token == "(":
            opened_round.append(len(parts))
            continue
        if token == "[":
            opened_square.append(len(parts))
            continue
        if number is not None and opened_round:
            factor = _float(number)
            if factor is not None:
                scale_from(opened_round.pop(), factor)
                continue
        if token == ")" and opened_round:
            scale_from(opened_round.pop(), ROUND_UP)
            continue
        if token == "]" and opened_square:
            scale_from(opened_square.pop(), SQUARE_DOWN)
            continue
        if number is not None and _float(number) is None:  # ":1.2.3)": text, then a closing bracket
            _append_text(parts, token[:-1])
            if opened_round:
                scale_from(opened_round.pop(), ROUND_UP)
            else:
                _append_text(parts, ")")
            continue
        _append_text(parts, token)
    for start in opened_round:
        scale_from(start, ROUND_UP)
    for start in opened_square:
        scale_from(start, SQUARE_DOWN)
    if not parts:
        parts = [["", 1.0]]
    merged: list[list] = [parts[0]]
    for part in parts[1:]:
        if part[1] == merged[-1][1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(t, w) for t, w in merged]


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _append_text(parts: list[list], text: str) -> None:
    """Plain text, with every BREAK in it turned into a ("BREAK", -1) marker."""
    for i, piece in enumerate(_BREAK_SPLIT.split(text)):
        if i:
            parts.append([BREAK, _BREAK_WEIGHT])
        parts.append([piece, 1.0])


def plain_fragments(text: str) -> list[tuple[str, float]]:
    """The prompt as text at weight 1 (prompt_weighting=False): brackets are characters; BREAK still splits."""
    out: list[tuple[str, float]] = []
    for i, piece in enumerate(_BREAK_SPLIT.split(text)):
        if i:
            out.append((BREAK, _BREAK_WEIGHT))
        out.append((piece, 1.0))
    return out


@dataclass(frozen=True)
class PromptChunks:
    """One prompt as k rows of token ids [k, L] (BOS, tokens, EOS, padding) and their weights [k, L]."""

    ids: np.ndarray
    weights: np.ndarray
    tokens: int  # tokens of the prompt (BOS, EOS and padding not counted)

    @property
    def chunks(self) -> int:
        return int(self.ids.shape[0])


def _row(tokenizer, ids: list[int], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    length = tokenizer.max_length
    row = np.full(length, tokenizer.pad_id, np.int64)
    row[: len(ids) + 2] = [tokenizer.bos_id, *ids, tokenizer.eos_id]
    w = np.ones(length, np.float32)
    w[1: len(ids) + 1] = weights
    return row, w


def chunk_prompt(tokenizer, text: str, weighting: bool = True, max_chunks: int = MAX_PROMPT_CHUNKS,
                 what: str = "prompt") -> PromptChunks:
    """Token ids and weights of `text` in chunks of tokenizer.max_length - 2 (75) tokens.

    A chunk is closed when it is full and another token comes, or at BREAK (so BREAK on an empty chunk gives an
    empty chunk, and a trailing BREAK none); InvalidInputError beyond `max_chunks` chunks.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a str, got {type(text).__name__}")
    size = tokenizer.max_length - 2
    fragments = parse_prompt_attention(text) if weighting else plain_fragments(text)
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    total = 0
    for fragment, weight in fragments:
        if _is_break(fragment, weight):
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        for token in tokenizer.encode(fragment):
            if len(ids) == size:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(weight)
            total += 1
    if ids or not chunks:
        chunks.append((ids, weights))
    if len(chunks) > max_chunks:
        raise InvalidInputError(
            f"{what} needs {len(chunks)} chunks of {size} tokens ({total} tokens"
            f"{', with BREAK' if any(_is_break(f, w) for f, w in fragments) else ''}); "
            f"at most {max_chunks} are read ({max_chunks * size} tokens): shorten it")
    rows = [_row(tokenizer, i, w) for i, w in chunks]
    return PromptChunks(np.stack([r for r, _ in rows]), np.stack([w for _, w in rows]), total)


def _is_break(fragment: str, weight: float) -> bool:
    """A BREAK marker; inside brackets its -1 is scaled (A1111 then encodes the word "break" at a negative weight:
    here it still breaks)."""
    return fragment == BREAK and weight < 0


def empty_chunk(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The row of the empty prompt (BOS, EOS, padding) and its unit weights: what shorter prompts are padded with."""
    return _row(tokenizer, [], [])


def prompt_batch(tokenizer, prompts: Sequence[str], weighting: bool = True,
                 max_chunks: int = MAX_PROMPT_CHUNKS, what: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
    """ids [R, k, L] int64 and weights [R, k, L] float32 of R prompts, all padded to the most chunks k."""
    cache: dict[str, PromptChunks] = {}
    parts = []
    for text in prompts:
        if text not in cache:
            cache[text] = chunk_prompt(tokenizer, text, weighting, max_chunks, what)
        parts.append(cache[text])
    k = max(p.chunks for p in parts)
    pad_ids, pad_w = empty_chunk(tokenizer)
    ids = np.stack([np.concatenate([p.ids, np.tile(pad_ids, (k - p.chunks, 1))]) for p in parts])
    weights = np.stack([np.concatenate([p.weights, np.tile(pad_w, (k - p.chunks, 1))]) for p in parts])
    return ids, weights


def apply_emphasis(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Text embeddings [R, k, L, D] and weights [R, k, L] -> context [R, k*L, D] (float32).

    Each chunk whose weights are not all 1 is scaled token by token, then multiplied by (mean before / mean after)
    so its mean over tokens and channels is restored (A1111's original emphasis, per row: rows stay independent).
    Where either mean is below MEAN_FLOOR x the chunk's RMS, the mean is no scale to restore and is left alone.
    """
    hidden = np.asarray(hidden, np.float32)
    rows, k, length, dim = hidden.shape
    out = hidden.copy()
    for r in range(rows):
        for c in range(k):
            w = weights[r, c]
            if np.all(w == 1.0):
                continue
            z = hidden[r, c].astype(np.float64)
            before, scale = z.mean(), np.sqrt(np.mean(z * z))
            z = z * w[:, None].astype(np.float64)
            after = z.mean()
            # A mean near 0 against the values' size (a final layer norm without bias) fixes no scale: dividing by
            # it would multiply the chunk by rounding noise, so such a chunk is only scaled.
            if min(abs(before), abs(after)) > MEAN_FLOOR * scale:
                z = z * (before / after)
            out[r, c] = z.astype(np.float32)
    return out.reshape(rows, k * length, dim)


def check_clip_skip(clip_skip: object, layers: int) -> int:
    """clip_skip as diffusers defines it: the hidden state of layer -1-clip_skip (None and 0: the last layer)."""
    if clip_skip is None:
        return 0
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or not 0 <= clip_skip < layers:
        raise InvalidInputError(f"clip_skip must be an integer in [0, {layers - 1}] (this text encoder has {layers} "
                                f"layers; 1 reads the penultimate layer, A1111's 'Clip skip: 2'), got {clip_skip!r}")
    return int(clip_skip)
