"""Safetensors reading and strict state-dict loading. Pickle checkpoints are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import ModelLoadError, WeightsMismatchError
from ..files import PICKLE_SUFFIXES, refuse_pickle  # noqa: F401  (torch-free: sdengine.lora uses it too)

_SHOWN = 20  # keys listed per category in a mismatch report


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file (or a sharded set via its .index.json), on the CPU.

    The tensors are views of the memory-mapped file: nothing is read until a tensor is used. With `dtype`, the
    floating-point tensors of another dtype are read and cast one at a time (`_cast_each`), so the file's copy of
    them is never held beside the cast one.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    refuse_pickle(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path, dtype)
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} is missing")
    try:
        state = load_file(str(path), device="cpu")
        if dtype is not None:
            _cast_each(path, state, dtype)
        return state
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or "
                             f"corrupt: download or convert it again") from None


def _cast_each(path: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Replace the floating-point tensors of `state` (views of `path`'s mapping) that are not `dtype` by cast copies.

    Each is read with safetensors' pread backend (0.8 and later) into a buffer of its own, cast and dropped: the
    process holds the cast weights and one tensor of the file's. Cast from the mapping instead, every page read
    would stay resident until the last view of the file is gone: loading SD 1.5's fp32 files at float16 peaked at
    2.4x the fp16 weights (benchmarks/NOTES.md). Older safetensors, without pread, cast from the mapping.
    """
    from safetensors import safe_open

    keys = [k for k, v in state.items() if v.is_floating_point() and v.dtype != dtype]
    if not keys:
        return
    try:
        handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors < 0.8
        for key in keys:
            state[key] = state[key].to(dtype)
        return
    with handle as f:
        for key in keys:
            state[key] = f.get_tensor(key).to(dtype)


def _read_sharded(index: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a sharded checkpoint listed by `weight_map` in its index file."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index} is not a valid safetensors index ({exc})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = (index.parent / shard).resolve()
        if index.parent.resolve() not in shard_path.parents:
            raise ModelLoadError(f"{index} names shard {shard!r} outside its folder; refusing to read it")
        state.update(read_safetensors(shard_path, dtype))
    return state


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN]) + (f" ... (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")
    return f"{len(items)} {title}: {shown}"


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """Copy `state` into `module`, cast to its dtype (assign=True: the tensors become the module's, as they are);
    any missing, unexpected or mis-shaped key is an error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                       for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or misshaped:
        parts = [_listing(t, i) for t, i in (("missing", missing), ("unexpected", unexpected),
                                             ("mis-shaped", misshaped)) if i]
        raise WeightsMismatchError(f"{what} does not match its config: " + "; ".join(parts) +
                                   ". Check that the checkpoint and its config are of the same model.")
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise WeightsMismatchError(f"{what}: tensors {bad[:_SHOWN]} are not floating point")
    module.load_state_dict(state, strict=True, assign=assign)
