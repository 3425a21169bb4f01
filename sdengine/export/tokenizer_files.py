"""The tokenizer files an export folder carries, so a torch-free process tokenizes exactly as the model does."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelLoadError
from ..files import umask_mode
from ..manifest import TOKENIZER_DIR
from ..tokenizer import ClipTokenizer

_CLIP_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip"
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _from_shipped(dst: Path, tokenizer: ClipTokenizer) -> None:
    """The shipped CLIP files with the model's pad token (EOS for SD 1.x, '!' for SD 2.x)."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(_CLIP_DIR / name, dst / name)
    vocab = json.loads((dst / "vocab.json").read_text(encoding="utf-8"))
    pad = next(token for token, i in vocab.items() if i == tokenizer.pad_id)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.max_length,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": pad}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_tokenizer(out: Path, components, folder: str = TOKENIZER_DIR) -> None:
    """out/tokenizer: the model folder's tokenizer files, or the shipped ones with its pad token; folder
    "tokenizer_2": SDXL's second tokenizer (components.tokenizer_2) the same way."""
    source = Path(components.source) / folder
    tokenizer = components.tokenizer if folder == TOKENIZER_DIR else components.tokenizer_2
    dst = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=out))
    try:
        if (source / "vocab.json").is_file():
            for name in _FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, dst / name)
        else:
            _from_shipped(dst, tokenizer)
        ref, got = tokenizer, ClipTokenizer.from_folder(dst)
        probe = "a photo of an astronaut riding a horse"
        if (got.pad_id, got.max_length) != (ref.pad_id, ref.max_length) or (got(probe) != ref(probe)).any():
            raise ModelLoadError(f"the tokenizer files written to {out / folder} do not tokenize as the "
                                 f"model's tokenizer does; check {source}")
        dst.chmod(umask_mode(0o777))
        shutil.rmtree(out / folder, ignore_errors=True)
        dst.replace(out / folder)
    finally:
        shutil.rmtree(dst, ignore_errors=True)
