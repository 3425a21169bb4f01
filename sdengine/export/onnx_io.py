"""Tracing a module to ONNX, type inference on graphs of any size, and saving with one external-data file."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch

from ..specs import DYNAMIC_DIMS, GraphSpec, shapes
from .wrappers import GraphModule, export_mode

# protobuf cannot serialise a message of 2 GiB; leave room for the graph itself.
PROTO_LIMIT = 2**31 - 2**26


def dynamic_axes(spec: GraphSpec, static: bool) -> dict[str, dict[int, str]]:
    """{tensor: {axis: symbol}} for the symbols of sdengine.specs.DYNAMIC_DIMS (none when static)."""
    if static:
        return {}
    return {t.name: {i: d for i, d in enumerate(t.dims) if d in DYNAMIC_DIMS}
            for t in spec.inputs + spec.outputs if any(d in DYNAMIC_DIMS for d in t.dims)}


def trace(gm: GraphModule, dims: dict[str, int], opset: int, static: bool) -> onnx.ModelProto:
    """The fp32 graph of `gm` by the TorchScript exporter, traced at the shape point `dims`."""
    spec = gm.spec
    shp = shapes(spec, dims)
    args = tuple(torch.zeros(shp[t.name], dtype=getattr(torch, t.dtype)) for t in spec.inputs)
    with tempfile.TemporaryDirectory(prefix="sdengine-trace-") as tmp, export_mode(gm.module), \
            warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # TracerWarnings: the branches they name are fixed by the spec
        path = Path(tmp) / spec.file
        torch.onnx.export(gm.module, args, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=dynamic_axes(spec, static),
                          opset_version=opset, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(path))  # loads any external data the exporter wrote beside it
    declare_io(model, spec, dims, static)
    return model


def declare_io(model: onnx.ModelProto, spec: GraphSpec, dims: dict[str, int], static: bool) -> None:
    """Declared input/output shapes exactly as the spec says (the exporter names dims it cannot infer)."""
    keep_unused_inputs(model, spec)
    declared = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for t in spec.inputs + spec.outputs:
        shape = declared[t.name].type.tensor_type.shape
        shape.ClearField("dim")
        for d in t.dims:
            dim = shape.dim.add()
            if isinstance(d, str) and d in DYNAMIC_DIMS and not static:
                dim.dim_param = d
            else:
                dim.dim_value = d if isinstance(d, int) else dims[d]


def keep_unused_inputs(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Give back the spec's inputs the exporter dropped because no node reads them (step caching's shallow step on a
    U-Net whose shallow branch has no cross-attention never reads the text), in the spec's order: every graph
    keeps its spec's inputs, so one loop binds them all."""
    present = {v.name for v in model.graph.input}
    if all(t.name in present for t in spec.inputs):
        return
    kept = {v.name: onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in model.graph.input}
    for t in spec.inputs:
        if t.name not in kept:
            kept[t.name] = onnx.helper.make_tensor_value_info(
                t.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), [None] * len(t.dims))
    order = [t.name for t in spec.inputs] + [name for name in kept if name not in {t.name for t in spec.inputs}]
    del model.graph.input[:]
    model.graph.input.extend(kept[name] for name in order)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in the proto (initializers and Constant values)."""
    total = sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                total += len(attr.t.raw_data)
    return total


def _large_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for t in model.graph.initializer:
        if len(t.raw_data) > 4096:
            yield t


def infer(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """Shape/type inference on any size of graph: large tensor data is set aside while the proto is inferred."""
    stash = [(t, t.raw_data) for t in _large_tensors(model)]
    try:
        for t, _ in stash:
            t.ClearField("raw_data")
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=strict, data_prop=True)
    finally:
        for t, data in stash:
            t.raw_data = data


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor (inputs, outputs, intermediates, initializers)."""
    g = infer(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def save(model: onnx.ModelProto, path: Path) -> str | None:
    """Write `model`; above the protobuf limit its tensors go to one `<file>.data` beside it (returned)."""
    if tensor_bytes(model) < PROTO_LIMIT:
        onnx.save_model(model, str(path))
        return None
    location = f"{path.name}.data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return location


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Replace metadata_props entries by `values`."""
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)


def numpy_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
