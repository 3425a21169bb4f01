"""CLIP BPE tokenizer in pure Python, id-for-id OpenAI CLIP's simple_tokenizer (as open_clip ships it).

Text is cleaned as the reference does: ftfy.fix_text (mojibake, curly quotes, ligatures, full-width
forms, control characters, NFC), html.unescape twice, whitespace collapsed, lowercased; then split
with CLIP's regex and byte-level BPE over the shipped 49,408-token vocabulary.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Iterable

import ftfy
import numpy as np
import regex

from sdengine.assets.clip.derive_vocab import bytes_to_unicode
from sdengine.errors import InvalidInputError, ModelLoadError

log = logging.getLogger("sdengine")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77
_CACHE_LIMIT = 50_000  # BPE cache entries kept before the cache is cleared
_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# A high surrogate not followed by a low one, or a low one not preceded by a high one. A well-formed
# pair (from a UTF-16 source) is text: ftfy.fix_text joins it into the one character it encodes.
_LONE_SURROGATE = re.compile("[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")
_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}
_DROPPED_WORDS = 8  # words of the dropped tail quoted in the truncation log line
_DROPPED_CHARS = 60  # ... and at most this many characters of them


def check_text(text: str) -> None:
    """InvalidInputError on a lone surrogate: it is not text, and ftfy would silently turn it into U+FFFD."""
    found = _LONE_SURROGATE.search(text)
    if found is None:
        return
    code = ord(found.group())
    more = len(_LONE_SURROGATE.findall(text)) - 1
    hint = "remove it" + (f" (and {more} more)" if more else "")
    if 0xDC80 <= code <= 0xDCFF:
        hint += ("; it most likely came from bytes that are not UTF-8 (a file or a command-line "
                 "argument in another encoding): pass the text as UTF-8")
    raise InvalidInputError(f"U+{code:04X} at position {found.start()} is a lone surrogate, "
                            f"not valid Unicode text: {hint}")


def clean_text(text: str) -> str:
    """OpenAI CLIP's text cleanup: ftfy.fix_text, html.unescape twice, collapse whitespace, lowercase.

    Raises InvalidInputError on a lone surrogate (the reference would read it as U+FFFD).
    """
    check_text(text)
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _bpe(token: str, ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Apply BPE merges by rank to one byte-mapped word; the last symbol ends with '</w>'."""
    word = tuple(token[:-1]) + (token[-1] + END_OF_WORD,)
    while len(word) > 1:
        pairs = set(zip(word, word[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        first, second = best
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return word


def _read_text(path: Path, what: str) -> str:
    """Read a UTF-8 tokenizer file, turning any failure into a ModelLoadError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{what} not found: {path}. Point at a CLIP tokenizer folder "
                             "holding vocab.json and merges.txt.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {what} {path}: {exc}") from exc


def _parse_vocab(text: str, source: str) -> dict[str, int]:
    """Parse vocab.json text (token -> id) and check its shape."""
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{source} is not valid JSON ({exc}); re-download it.") from exc
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
    ):
        raise ModelLoadError(f"{source} must be a JSON object mapping tokens to integer ids.")
    return vocab


def _parse_merges(text: str, source: str) -> list[tuple[str, str]]:
    """Parse merges.txt text: an optional '#version' header, then one 'a b' pair per line."""
    merges = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ModelLoadError(f"{source}:{lineno}: expected two symbols, got {line!r}.")
        merges.append((parts[0], parts[1]))
    return merges


def _token_content(value: object) -> str | None:
    """A special token as written in tokenizer JSON: a string or {'content': ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=1)
def _shipped_tables() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Load the vocab.json and merges.txt shipped in sdengine/assets/clip (once per process)."""
    folder = resources.files("sdengine.assets.clip")
    try:
        vocab_text = folder.joinpath("vocab.json").read_text(encoding="utf-8")
        merges_text = folder.joinpath("merges.txt").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"the shipped CLIP vocabulary is missing or unreadable ({exc}); reinstall sdengine "
            "or run python -m sdengine.assets.clip.derive_vocab") from exc
    vocab = _parse_vocab(vocab_text, "sdengine/assets/clip/vocab.json")
    return vocab, tuple(_parse_merges(merges_text, "sdengine/assets/clip/merges.txt"))


class ClipTokenizer:
    """CLIP byte-level BPE: text -> [B, max_length] int64 ids (BOS, ids, EOS, padding)."""

    def __init__(self, vocab: dict[str, int], merges: Iterable[tuple[str, str]], *,
                 max_length: int = DEFAULT_MAX_LENGTH, pad_token: str = EOS_TOKEN):
        merges = [tuple(m) for m in merges]
        specials = [t for t in (BOS_TOKEN, EOS_TOKEN, pad_token) if t not in vocab]
        if specials:
            raise ModelLoadError(f"CLIP vocabulary lacks the special token(s) {specials!r}.")
        missing = [c + s for c in _BYTE_ENCODER.values() for s in ("", END_OF_WORD)
                   if c + s not in vocab]
        missing += ["".join(m) for m in merges if "".join(m) not in vocab]
        if missing:
            raise ModelLoadError(f"CLIP vocabulary lacks {len(missing)} token(s) its byte alphabet "
                                 f"or merges need, e.g. {missing[:3]!r}: vocab.json and merges.txt "
                                 "do not match.")
        if not isinstance(max_length, int) or max_length < 2:
            raise InvalidInputError(
                f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        self._vocab = dict(vocab)
        self._id_to_token = {i: t for t, i in self._vocab.items()}
        self._base_size = len(self._vocab)
        self._ranks = {m: r for r, m in enumerate(merges)}
        self._max_length = max_length
        self._pad_token = pad_token
        self._cache: dict[str, tuple[str, ...]] = {}
        self._triggers: dict[str, list[int]] = {}  # textual inversion: a trigger -> its n added ids
        self._trigger_re: re.Pattern | None = None

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path, *, pad_token: str = EOS_TOKEN,
                   max_length: int = DEFAULT_MAX_LENGTH) -> ClipTokenizer:
        """Load from a vocab.json and a merges.txt."""
        vocab = _parse_vocab(_read_text(vocab_path, "vocab file"), str(vocab_path))
        merges = _parse_merges(_read_text(merges_path, "merges file"), str(merges_path))
        return cls(vocab, merges, max_length=max_length, pad_token=pad_token)

    @classmethod
    def default(cls, *, pad_token: str = EOS_TOKEN,
                max_length: int = DEFAULT_MAX_LENGTH) -> ClipTokenizer:
        """The OpenAI CLIP vocabulary shipped with sdengine (pad with EOS for SD 1.x, '!' for 2.x)."""
        vocab, merges = _shipped_tables()
        return cls(vocab, merges, max_length=max_length, pad_token=pad_token)

    @classmethod
    def from_folder(cls, path: str | Path) -> ClipTokenizer:
        """Load a diffusers `tokenizer/` folder: vocab.json, merges.txt and its pad token."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"tokenizer folder not found: {folder}")
        pad_token, max_length = EOS_TOKEN, DEFAULT_MAX_LENGTH
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # later one wins
            file = folder / name
            if not file.is_file():
                continue
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelLoadError(f"cannot read {file}: {exc}") from exc
            if not isinstance(config, dict):
                raise ModelLoadError(f"{file} must hold a JSON object.")
            pad_token = _token_content(config.get("pad_token")) or pad_token
            n = config.get("model_max_length")
            if isinstance(n, int) and not isinstance(n, bool) and 2 <= n <= 4096:
                max_length = n
        return cls.from_files(folder / "vocab.json", folder / "merges.txt",
                              pad_token=pad_token, max_length=max_length)

    @property
    def bos_id(self) -> int:
        """Id of <|startoftext|> (49406 in CLIP)."""
        return self._vocab[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        """Id of <|endoftext|> (49407 in CLIP)."""
        return self._vocab[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        """Id of the padding token: EOS for SD 1.x, '!' (0) for SD 2.x."""
        return self._vocab[self._pad_token]

    @property
    def max_length(self) -> int:
        """Row length of __call__'s output, BOS and EOS included (77 for CLIP)."""
        return self._max_length

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary (49408 for CLIP)."""
        return len(self._vocab)

    def _word_symbols(self, word: str) -> tuple[str, ...]:
        """BPE symbols of one pre-token, cached; special tokens map to themselves."""
        symbols = self._cache.get(word)
        if symbols is None:
            if word in (BOS_TOKEN, EOS_TOKEN):
                symbols = (word,)
            else:
                symbols = _bpe("".join(_BYTE_ENCODER[b] for b in word.encode("utf-8")), self._ranks)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = symbols
        return symbols

    def has_token(self, token: str) -> bool:
        """Whether `token` is a vocabulary entry (BPE symbol or added token)."""
        return token in self._vocab

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Append textual inversion tokens at ids vocab_size, ...; tokens[0] is the trigger and stands for all of
        them in a prompt (diffusers' load_textual_inversion and maybe_convert_prompt). Matched case-sensitively in
        the raw text, before cleaning, as transformers matches added tokens."""
        clash = [t for t in tokens if t in self._vocab or t in (BOS_TOKEN, EOS_TOKEN)]
        if clash or not tokens:
            raise InvalidInputError(f"the token {clash[0] if clash else ''!r} is already in the vocabulary: give the "
                                    "embedding another token (--embedding FILE:TOKEN, or token=...)")
        ids = list(range(len(self._vocab), len(self._vocab) + len(tokens)))
        for token, i in zip(tokens, ids):
            self._vocab[token] = i
            self._id_to_token[i] = token
        self._triggers[tokens[0]] = ids
        self._trigger_re = re.compile("|".join(re.escape(t) for t in sorted(self._triggers, key=len, reverse=True)))
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of text, without BOS/EOS (InvalidInputError on a lone surrogate)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"prompt must be a str, got {type(text).__name__}")
        if self._trigger_re is None:
            return self._encode_plain(text)
        check_text(text)
        out: list[int] = []
        pos = 0
        for match in self._trigger_re.finditer(text):
            out += self._encode_plain(text[pos:match.start()]) + self._triggers[match.group()]
            pos = match.end()
        return out + self._encode_plain(text[pos:])

    def _encode_plain(self, text: str) -> list[int]:
        return [self._vocab[s] for word in _SPLIT.findall(clean_text(text))
                for s in self._word_symbols(word)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids: special tokens and padding after EOS dropped, '</w>' read as a space."""
        ids = [int(i) for i in ids]
        if self.pad_id not in (self.bos_id, self.eos_id) and self.eos_id in ids:
            ids = ids[: len(ids) - ids[::-1].index(self.eos_id)]  # SD 2.x rows: '!' after EOS
        unknown = [i for i in ids if i not in self._id_to_token]
        if unknown:
            raise InvalidInputError(f"ids not in the vocabulary: {unknown[:5]}")
        return self._text_of(ids)

    def _text_of(self, ids: list[int]) -> str:
        """Text of known ids, BOS and EOS skipped (decode without its checks and SD 2.x trimming)."""
        chars = []
        for i in ids:
            if i in (self.bos_id, self.eos_id):
                continue
            token = self._id_to_token[i]
            if i >= self._base_size:  # an added (textual inversion) token: its own text, then a space
                token = "".join(_BYTE_ENCODER[b] for b in (token + " ").encode("utf-8"))
            elif token.endswith(END_OF_WORD):
                token = token[: -len(END_OF_WORD)] + _BYTE_ENCODER[ord(" ")]
            chars.append(token)
        data = bytes(_BYTE_DECODER[c] for c in "".join(chars))
        return data.decode("utf-8", errors="replace").strip()

    def _dropped_words(self, dropped: list[int]) -> str:
        """The first few words of a dropped tail, for the truncation log line."""
        end, words = 0, 0
        while end < len(dropped) and words < _DROPPED_WORDS and end < 4 * _DROPPED_WORDS:
            words += self._id_to_token[dropped[end]].endswith(END_OF_WORD)
            end += 1
        text = self._text_of(dropped[:end]).strip(" \ufffd")  # multi-byte characters cut at either end
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
        if len(text) > _DROPPED_CHARS:
            text, end = text[:_DROPPED_CHARS], 0
        return text + (" ..." if end < len(dropped) else "")

    def _row(self, prompt: str) -> list[int]:
        """BOS + ids + EOS for one prompt, truncated to max_length (one log line says what was dropped)."""
        ids = self.encode(prompt)
        room = self._max_length - 2
        if len(ids) > room:
            dropped = ids[room:]
            if log.isEnabledFor(logging.WARNING):
                log.warning('prompt is %d tokens long; CLIP reads %d: dropped the last %d token(s) ("%s")',
                            len(ids), room, len(dropped), self._dropped_words(dropped))
            ids = ids[:room]
        return [self.bos_id, *ids, self.eos_id]

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """Tokenize prompts to an int64 array [B, max_length], padded with pad_id."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError("prompts must be a str or a list of str")
        out = np.full((len(prompts), self._max_length), self.pad_id, dtype=np.int64)
        rows: dict[str, list[int]] = {}  # a prompt repeated in the batch is tokenized (and logged) once
        for b, prompt in enumerate(prompts):
            row = rows.get(prompt)
            if row is None:
                row = rows[prompt] = self._row(prompt)
            out[b, : len(row)] = row
        return out
