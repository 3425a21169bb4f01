"""Which ONNX initializer holds which checkpoint weight: the map LoRA swapping needs (sdengine.lora).

The legacy exporter renames weights, and with constant folding may store a Linear weight transposed in a
new initializer (`onnx::MatMul_123`); the fp16 conversion rounds them. So each initializer is matched by
its bytes to a weight, its transpose, or their fp16 rounding, and the export's manifest records
{`component.parameter`: {"shape": [...], "initializers": [[name, transposed], ...]}} per graph.
Weights whose bytes are not unique (two equal tensors) are left out: they could not be swapped alone.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from onnx import TensorProto
from torch import nn

from .onnx_io import Traced

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _key(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array)
    return array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).digest()


def parameter_map(traced: Traced, component: str, module: nn.Module) -> dict[str, dict[str, Any]]:
    """The initializers of the graph that hold `module`'s weights (ndim >= 2), by their checkpoint names."""
    index: dict[tuple, set[tuple[str, bool]]] = {}
    for name, p in module.named_parameters():
        if p.ndim < 2:
            continue
        a = p.detach().float().cpu().numpy()
        for arr, transposed in ((a, False), (a.T, True)) if a.ndim == 2 else ((a, False),):
            for dtype in (np.float32, np.float16):
                index.setdefault(_key(arr.astype(dtype)), set()).add((f"{component}.{name}", transposed))
    out: dict[str, dict[str, Any]] = {}
    for init in traced.model.graph.initializer:
        if init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or len(init.dims) < 2:
            continue
        hits = index.get(_key(traced.value(init)))
        if not hits or len(hits) > 1:
            continue
        (param, transposed), = hits
        shape = list(init.dims)[::-1] if transposed else list(init.dims)
        out.setdefault(param, {"shape": shape, "initializers": []})["initializers"].append([init.name, transposed])
    duplicated = {k for keys in index.values() for k, _ in keys if len({n for n, _ in keys}) > 1}
    return {k: v for k, v in sorted(out.items()) if k not in duplicated}
