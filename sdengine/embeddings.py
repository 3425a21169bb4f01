"""Textual inversion embeddings (Gal et al. 2022): new tokens whose vectors extend CLIP's token table (numpy only).

Files read (safetensors only; pickles are refused as pickle checkpoints are):
- AUTOMATIC1111's: `emb_params` [n, D] (or a flattened `string_to_param.*` [n, D]);
- diffusers' `learned_embeds.safetensors`: one tensor [D] or [n, D] named after its token.

The trigger is the token given, else a diffusers file's own token name, else the file name without extension. An
n-vector embedding adds n tokens, `TRIGGER`, `TRIGGER_1` ... `TRIGGER_{n-1}`, as diffusers' load_textual_inversion
does; the trigger in a prompt stands for all n of them (sdengine.tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInputError, ModelLoadError, PickleCheckpointError
from .files import is_pickle

A1111_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")  # A1111's SDXL embeddings: text_encoder's vectors, text_encoder_2's


@dataclass(frozen=True)
class Embedding:
    """A trigger and its vectors [n, D] (float32)."""

    trigger: str
    vectors: np.ndarray
    vectors_2: np.ndarray | None = None  # SDXL: the second text encoder's vectors (A1111's "clip_g")

    @property
    def tokens(self) -> list[str]:
        """The n token names diffusers gives an n-vector embedding."""
        return [self.trigger] + [f"{self.trigger}_{i}" for i in range(1, len(self.vectors))]


def parse_spec(text: str) -> tuple[str, str | None]:
    """'FILE' or 'FILE:TOKEN' (the CLI's --embedding) -> (file, token or None)."""
    path, sep, token = text.rpartition(":")
    if sep and path and token and "/" not in token and "\\" not in token and not Path(text).exists():
        return path, token
    return text, None


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """The embedding in a safetensors file; ModelLoadError on anything else (PickleCheckpointError on a pickle)."""
    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise ModelLoadError(f"embedding file {path} not found")
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError:  # pragma: no cover - a dependency
        raise ModelLoadError("reading embeddings needs the safetensors package: pip install safetensors") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc})") from None
    if SDXL_KEYS[0] in tensors and SDXL_KEYS[1] in tensors:  # A1111's SDXL embeddings: one set per text encoder
        name, vectors, vectors_2 = None, _vectors(tensors[SDXL_KEYS[0]], path), _vectors(tensors[SDXL_KEYS[1]], path)
        if len(vectors) != len(vectors_2):
            raise ModelLoadError(f"{path}: '{SDXL_KEYS[0]}' has {len(vectors)} vectors and '{SDXL_KEYS[1]}' "
                                 f"{len(vectors_2)}; an SDXL embedding has as many for each text encoder")
    else:
        (name, vectors), vectors_2 = _pick(tensors, path), None
        vectors = _vectors(vectors, path)
    trigger = token if token is not None else name if name is not None else path.stem
    if not isinstance(trigger, str) or not trigger.strip() or any(c.isspace() for c in trigger):
        raise InvalidInputError(f"an embedding's token must be one word without spaces, got {trigger!r}")
    return Embedding(trigger, vectors, vectors_2)


def _vectors(value: np.ndarray, path: Path) -> np.ndarray:
    vectors = np.asarray(value, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.shape[0] or not np.isfinite(vectors).all():
        raise ModelLoadError(f"{path}: the embedding must be finite vectors [n, width], got shape "
                             f"{list(vectors.shape)}")
    return np.ascontiguousarray(vectors)


def _pick(tensors: dict[str, np.ndarray], path: Path) -> tuple[str | None, np.ndarray]:
    """(diffusers token name or None, vectors) of the file's tensors."""
    if A1111_KEY in tensors:
        return None, tensors[A1111_KEY]
    params = [k for k in tensors if k.startswith("string_to_param")]
    if len(params) == 1:
        return None, tensors[params[0]]
    if len(tensors) == 1:
        (name, value), = tensors.items()
        return name, value
    keys = ", ".join(sorted(tensors)[:6])
    raise ModelLoadError(f"{path} is not a textual inversion embedding: expected A1111's '{A1111_KEY}' or one "
                         f"tensor named after its token (diffusers' learned_embeds), found {keys}")


def _refuse_pickle(path: Path) -> None:
    if is_pickle(path):
        out = path.with_suffix(".safetensors")
        raise PickleCheckpointError(
            f"{path} is a pickle embedding; sdengine reads safetensors only, since unpickling can run arbitrary code. "
            f"Convert it once, on a machine where you trust the file: python -c \"import torch; "
            f"from safetensors.torch import save_file; d = torch.load('{path}', map_location='cpu', "
            f"weights_only=True); p = d['string_to_param']['*'] if 'string_to_param' in d else next(iter(d.values())); "
            f"save_file({{'{A1111_KEY}': p.float().contiguous()}}, '{out}')\" then pass {out}")


def extended_table(table: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The token table [V, D] with `vectors` [n, D] appended as rows V .. V+n-1, in the table's dtype."""
    if vectors.shape[1] != table.shape[1]:
        raise InvalidInputError(f"the embedding's vectors are {vectors.shape[1]} wide; this text encoder's tokens are "
                                f"{table.shape[1]} wide: it was trained for another model family")
    return np.concatenate([table, vectors.astype(table.dtype)])
