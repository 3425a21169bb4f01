"""Tracing a module to ONNX, type inference on graphs of any size, and saving with one external-data file.

A traced graph is held as a `Traced`: a protobuf without the data of its large initializers (name, type and
dims only) and those values as numpy arrays beside it. The protobuf runtime (upb) keeps every byte ever
written into a message until the whole message is freed, so clearing, replacing or copying a tensor's data in
place would hold a second copy of the weights; numpy arrays are freed (or replaced by their fp16 rounding) one
at a time, and written to disk tensor by tensor.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..specs import DYNAMIC_DIMS, GraphSpec, shapes
from .wrappers import GraphModule, export_mode

# protobuf cannot serialise a message of 2 GiB; leave room for the graph itself.
PROTO_LIMIT = 2**31 - 2**26
LARGE = 4096  # bytes: an initializer above this is held outside the protobuf (Traced.arrays)
ALIGN = 4096  # external data offsets (page-aligned: ONNX Runtime can map them)
EXTERNAL_MIN = 1024  # bytes: in a graph saved with external data, smaller tensors stay inside the protobuf


@dataclass
class Traced:
    """A graph whose large initializers' values live in `arrays` (by name), not in `model`'s protobuf."""

    model: onnx.ModelProto
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def value(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The value of one of the graph's initializers, wherever it is held."""
        held = self.arrays.get(tensor.name)
        return numpy_helper.to_array(tensor) if held is None else held

    def drop_unused(self) -> None:
        """Forget the arrays of initializers the graph no longer has."""
        names = {t.name for t in self.model.graph.initializer}
        for name in [n for n in self.arrays if n not in names]:
            del self.arrays[name]


def _read_external(tensor: onnx.TensorProto, base: Path) -> np.ndarray:
    info = {e.key: e.value for e in tensor.external_data}
    count = int(np.prod(tensor.dims, dtype=np.int64))
    dtype = numpy_dtype(tensor.data_type)
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        data = np.fromfile(f, dtype=dtype, count=count)
    if data.size != count:
        raise ValueError(f"external data of {tensor.name} holds {data.size} values, its dims {list(tensor.dims)}")
    return data.reshape(tuple(tensor.dims))


def detach(path: Path) -> Traced:
    """Load the graph at `path` with its large initializers read into numpy arrays, one at a time."""
    model = onnx.load(str(path), load_external_data=False)
    arrays = {}
    for t in model.graph.initializer:
        external = t.data_location == onnx.TensorProto.EXTERNAL
        if external or len(t.raw_data) > LARGE:
            arrays[t.name] = _read_external(t, path.parent) if external else numpy_helper.to_array(t).copy()
            for name in ("raw_data", "external_data", "data_location"):
                t.ClearField(name)
    light = onnx.ModelProto()
    light.CopyFrom(model)  # cleared fields are not copied: the fresh message holds no tensor data
    return Traced(light, arrays)


def dynamic_axes(spec: GraphSpec, static: bool) -> dict[str, dict[int, str]]:
    """{tensor: {axis: symbol}} for the symbols of sdengine.specs.DYNAMIC_DIMS (none when static)."""
    if static:
        return {}
    return {t.name: {i: d for i, d in enumerate(t.dims) if d in DYNAMIC_DIMS}
            for t in spec.inputs + spec.outputs if any(d in DYNAMIC_DIMS for d in t.dims)}


def trace(gm: GraphModule, dims: dict[str, int], opset: int, static: bool) -> Traced:
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
        traced = detach(path)  # with any external data the exporter wrote beside it
    declare_io(traced.model, spec, dims, static)
    return traced


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


def tensor_bytes(model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None) -> int:
    """Bytes of tensor data of the graph: held in the proto (initializers, Constant values) or in `arrays`."""
    total = sum(a.nbytes for a in (arrays or {}).values())
    total += sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)
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


def save(traced: Traced, path: Path) -> str | None:
    """Write the graph; above the protobuf limit its large tensors go to one `<file>.data` beside it (returned).

    Consumes `traced`: each array is dropped once written (into the protobuf, or streamed to the data file).
    """
    model, arrays = traced.model, traced.arrays
    if tensor_bytes(model, arrays) < PROTO_LIMIT:
        for t in (t for t in model.graph.initializer if t.name in arrays):
            t.raw_data = np.ascontiguousarray(arrays.pop(t.name)).tobytes()
        onnx.save_model(model, str(path))
        return None
    location = f"{path.name}.data"
    with open(path.parent / location, "wb") as f:
        for t in model.graph.initializer:
            if t.name in arrays:
                data = memoryview(np.ascontiguousarray(arrays.pop(t.name))).cast("B")
            elif len(t.raw_data) >= EXTERNAL_MIN:
                data = memoryview(t.raw_data)
                t.ClearField("raw_data")
            else:
                continue
            offset = -f.tell() % ALIGN + f.tell()
            f.seek(offset)
            f.write(data)
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(data.nbytes))):
                t.external_data.add(key=key, value=value)
            del data
    onnx.save_model(model, str(path))
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
