"""fp32 graph -> fp16 body with fp32 edges, fp32 update and fp32 islands for normalisation and softmax.

The fp32 trace is converted by ONNX Runtime's float16 converter (the maintained fork of
onnxconverter-common's) with a block list computed here, then cleaned so that every precision change
is one explicit Cast: a strongly typed TensorRT build follows these types exactly. Kept in fp32:
- graph inputs and outputs (keep_io_types);
- every op outside the network body: guidance, the scheduler update, latent scaling;
- the subgraph fed only by `fp32_inputs` (the timestep's sinusoidal embedding and its MLPs: sin/cos of
  t up to 999 lose whole periods in fp16);
- InstanceNormalization (GroupNorm), LayerNormalization and Softmax, whose reductions overflow or
  lose precision in fp16; with `fp32_attention` (the reference upcasts it) also the two attention MatMuls.
"""

from __future__ import annotations

from typing import Iterable
from unittest import mock

import numpy as np
import onnx
from onnx import TensorProto

from ..specs import GraphSpec
from .onnx_io import Traced, value_types

FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax")
_SHAPE_OPS = ("Shape", "Size")  # integer outputs: no float data flows through them


def fold_constant_nodes(model: onnx.ModelProto) -> None:
    """Constant nodes -> initializers, Identity-of-initializer -> the initializer (the converter then keeps
    an initializer fp32 when only fp32 ops read it, instead of rounding it to fp16 and back)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    outputs = {o.name for o in g.output}
    rename, keep = {}, []
    for n in g.node:
        single_value = len(n.attribute) == 1 and n.attribute[0].name == "value"
        if n.op_type == "Constant" and single_value and n.output[0] not in outputs:
            t = TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
            inits.add(t.name)
        elif n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
            rename[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    for n in keep:
        n.input[:] = [rename.get(i, i) for i in n.input]
    del g.node[:]
    g.node.extend(keep)


def _reach(nodes: Iterable[onnx.NodeProto], sources: set[str]) -> set[str]:
    """Tensors computed from `sources` through float data (not through Shape/Size); nodes are in topo order."""
    reached = set(sources)
    for n in nodes:
        if n.op_type not in _SHAPE_OPS and any(i in reached for i in n.input):
            reached.update(n.output)
    return reached


def _in_body(name: str, body: tuple[str, ...] | None) -> bool:
    return body is None or any(name.startswith(f"/{child}/") for child in body)


def _attention_matmuls(nodes: list[onnx.NodeProto]) -> set[str]:
    """The MatMul feeding each Softmax (Q K^T) and the MatMuls reading it (P V)."""
    producer = {o: n for n in nodes for o in n.output}
    names = set()
    for n in nodes:
        if n.op_type != "Softmax":
            continue
        p = producer.get(n.input[0])
        if p is not None and p.op_type == "MatMul":
            names.add(p.name)
        names.update(c.name for c in nodes if c.op_type == "MatMul" and n.output[0] in c.input)
    return names


def fp32_nodes(model: onnx.ModelProto, spec: GraphSpec, body: tuple[str, ...] | None,
               fp32_attention: bool) -> list[str]:
    """Names of the nodes kept fp32 (FP32_OPS are blocked by type, not listed here)."""
    nodes = list(model.graph.node)
    others = {t.name for t in model.graph.input} - set(spec.fp32_inputs)
    from_fp32_inputs = _reach(nodes, set(spec.fp32_inputs)) - _reach(nodes, others)
    keep = _attention_matmuls(nodes) if fp32_attention else set()
    for n in nodes:
        if not _in_body(n.name, body) or (n.output and all(o in from_fp32_inputs for o in n.output)):
            keep.add(n.name)
    return sorted(keep)


def collapse_casts(model: onnx.ModelProto) -> None:
    """Each Cast whose input chain holds the wanted type reads that tensor directly (fp32 -> fp16 -> fp32
    round trips the converter leaves at graph inputs and outputs are removed); dead nodes are dropped."""
    g = model.graph
    types = value_types(model)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    rename = {}
    for n in g.node:
        if n.op_type != "Cast":
            continue
        to = next(a.i for a in n.attribute if a.name == "to")
        best, cur = (n.input[0] if types.get(n.input[0]) == to else None), n.input[0]
        while cur in producer and producer[cur].op_type == "Cast":
            cur = producer[cur].input[0]
            if types.get(cur) == to:
                best = cur
        if best is None:
            continue
        if n.output[0] in outputs:  # keep the output's name: an Identity of the source
            n.op_type, n.input[0] = "Identity", best
            del n.attribute[:]
        else:
            rename[n.output[0]] = best
    for n in g.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
    _prune(g)


def _prune(g: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads, and initializers no node reads."""
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(used)


def toposort(g: onnx.GraphProto) -> None:
    """Order nodes so each one follows the producers of its inputs (the converter appends Casts out of order)."""
    ready = {t.name for t in g.input} | {t.name for t in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a dangling input near node {rest[0].name}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def to_fp16(traced: Traced, spec: GraphSpec, body: tuple[str, ...] | None, fp32_attention: bool) -> Traced:
    """The fp16 graph of an fp32 trace (see the module docstring for what stays fp32), converted in place.

    The converter sees the protobuf without the large initializers' data and only retypes those it converts;
    each of their arrays is then rounded by the converter's own function, one at a time, the fp32 array dropped.
    """
    from onnxruntime.transformers import float16

    model = traced.model
    fold_constant_nodes(model)
    keep = fp32_nodes(model, spec, body, fp32_attention)
    model = _with_value_info(model)
    # The converter reads a converted initializer's shape through numpy_helper.to_array, which needs its data:
    # the held ones have none in the protobuf, so their shape comes from their dims (the same value).
    with mock.patch.object(float16, "make_value_info_from_tensor", _value_info_from_dims):
        model = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP32_OPS),
                                                 node_block_list=keep, disable_shape_infer=True)
    for t in model.graph.initializer:
        held = traced.arrays.get(t.name)
        if held is not None and t.data_type == TensorProto.FLOAT16 and held.dtype == np.float32:
            traced.arrays[t.name] = float16.convert_np_to_float16(held)
        del held
    toposort(model.graph)
    collapse_casts(model)
    traced.model = model
    traced.drop_unused()
    return traced


def _value_info_from_dims(tensor: TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def _with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy inferred intermediate types into `model` (the converter reads them; it cannot infer >2 GB)."""
    from .onnx_io import infer

    inferred = infer(model).graph
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.value_info)
    return model


def compute_types(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> 'fp16', 'fp32' or 'other' by the float type of its first float output."""
    types = value_types(model)
    names = {TensorProto.FLOAT16: "fp16", TensorProto.FLOAT: "fp32"}
    return {n.name: next((names[types[o]] for o in n.output if types.get(o) in names), "other")
            for n in model.graph.node}
