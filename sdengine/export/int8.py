"""int8 U-Net graphs for the CPU: ONNX Runtime's dynamic quantization of an exported fp32 graph.

`sdengine export --int8 [OPS]` traces the U-Net graphs (the denoise step, step caching's graphs, the plain
U-Net) at fp32 as always, then rewrites each with `onnxruntime.quantization.quantize_dynamic`: the weights of
the chosen op types are stored as int8 and each call quantizes their activations (DynamicQuantizeLinear ->
MatMulInteger / ConvInteger). The text encoder and the VAE stay fp32, and so do the graph's inputs, outputs and
the sampler update. The quantized graph is validated against the fp32 PyTorch reference with INT8_TOLERANCE
before it is written (export/validate.py), like every graph. Measured speed and quality: README ("int8").
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from .onnx_io import PROTO_LIMIT, tensor_bytes
from .settings import INT8_OPS

WEIGHT_TYPE = "QInt8"  # signed int8 weights, uint8 activations (ONNX Runtime's default for quantize_dynamic)


def quantize(src: Path, dst: Path, ops: str) -> str | None:
    """Quantize the graph at `src` (fp32, any size) into `dst`; the external-data file name written beside it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = _large(src)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process (shape inference, fusions): the graph is inferred already
    try:
        quantize_dynamic(src, dst, op_types_to_quantize=list(INT8_OPS[ops]), per_channel=False, reduce_range=False,
                         weight_type=getattr(QuantType, WEIGHT_TYPE), use_external_data_format=large)
    finally:
        root.setLevel(level)
    location = f"{dst.name}.data"
    if not large:
        return None
    if not (dst.parent / location).is_file():  # the quantizer names it after the graph: keep to save()'s name
        raise RuntimeError(f"the quantizer wrote no {location} beside {dst.name}")
    return location


def _large(path: Path) -> bool:
    """Whether the graph at `path` needs external data (a quantized graph is never larger than its source)."""
    model = onnx.load(str(path), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    return external or tensor_bytes(model) >= PROTO_LIMIT


def quantized_ops(path: Path) -> dict[str, int]:
    """Count of each integer op in the graph at `path` (what `--int8` adds): {} for a float graph."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in INTEGER_OPS:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


INTEGER_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
               "QLinearConv", "QuantizeLinear", "DequantizeLinear")
