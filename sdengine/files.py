"""Writing files whole or not at all: a temporary name beside the target, then one rename.

Temporary files and folders get the permissions an ordinary open() or mkdir() would give (the process
umask applied), not the 0o600/0o700 of tempfile.mkstemp/mkdtemp.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import PickleCheckpointError


def umask_mode(mode: int) -> int:
    """`mode` less the process umask (what open() would have given; mkstemp/mkdtemp use 0o600/0o700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write_bytes_atomic(path: Path, data: Any) -> None:
    """Write a bytes-like object (a TensorRT IHostMemory too) to a temporary file beside `path`, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, umask_mode(0o666))
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def temporary_folder(out: Path) -> Path:
    """A new folder beside `out`, with mkdir's permissions, to be renamed onto `out` when complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, umask_mode(0o777))
    return tmp


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save zip archive, raw pickle protocol >= 2


def is_pickle(path: Path) -> bool:
    """True for a pickle file: by its suffix, or by its first bytes whatever its name."""
    head = b""
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(9)
    # A safetensors file is an 8-byte header length then a JSON object; its length bytes may look like pickle.
    return path.suffix.lower() in PICKLE_SUFFIXES or (head.startswith(_PICKLE_MAGIC) and head[8:9] != b"{")


def refuse_pickle(path: Path) -> None:
    """Raise PickleCheckpointError, with the conversion command, if `path` is a pickle checkpoint."""
    if is_pickle(path):
        out = path.with_suffix(".safetensors")
        raise PickleCheckpointError(
            f"{path} is a pickle checkpoint; sdengine loads safetensors only, since unpickling can run "
            f"arbitrary code. Convert it once, on a machine where you trust the file: "
            f"python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{path}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
            f"save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, '{out}')\" "
            f"then pass {out}"
        )
