"""ONNX Runtime's own levers on the denoise step, on the CPU: graph fusions and session options (issue 18).

    python benchmarks/ort_levers.py --export DIR [--threads 1 2] [--repeats 8]
        [--groups base,fused,extended base,no-mem-pattern,no-spin] [--profile base fused] [--work DIR] [--out JSON]

On one exported step graph (an `sdengine export` folder's denoise_step.onnx), in one process:
- graph variants: `fused` = `onnxruntime.transformers.optimizer.optimize_model(model_type="unet",
  opt_level=0)` with only the fusions whose ops the CPU execution provider has kernels for (attention into
  MultiHeadAttention, Gelu/BiasGelu, LayerNorm/SkipLayerNorm); `fused-unpacked` the same without packed
  q/k/v; `fused-default` the optimizer's defaults for `unet`, which add CUDA-only ops: the script lists them
  and records that the CPU execution provider refuses the graph (it is never timed silently);
- session variants of the plain graph: `extended` (ORT_ENABLE_EXTENDED instead of the default ALL),
  `no-mem-pattern`, `no-spin` (session.intra_op.allow_spinning 0), `parallel` (ORT_PARALLEL execution);
- each group of variants (base first) is timed with calls interleaved A B C A B C ..., `--repeats` rounds
  after 2 uncounted ones, per `--threads` value; median/min ms, ratio to base; the load average is recorded;
- the output of every variant against base on the same inputs (a real sampler row, as export validation
  draws them): max |difference| and relative L2 (export validation's fp32 tolerance is 1e-4 relative L2);
- op counts: the ONNX graph's node types before and after fusion, and the node types ONNX Runtime runs after
  its own optimisations (from the profile);
- `--profile`: per-op profile (SessionOptions.enable_profiling) at the first thread count: time by op type
  and by class (Conv, MatMul, attention, norms, elementwise, layout).

Memory: every session of a group holds its own weights (an SD 1.5 step graph: ~3.5 GB each), so keep
groups small there and run under `flock /tmp/sdengine-bigmem.lock`.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

GRAPH_VARIANTS = ("fused", "fused-unpacked", "fused-default", "mha")
SESSION_VARIANTS = ("base", "extended", "no-mem-pattern", "no-spin", "parallel")
# Fusions of the optimizer's `unet` defaults whose ops have no CPU kernel in onnxruntime (checked at run time
# against the kernel registry, see cpu_kernel_gaps): GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv.
CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_bias_add",
                     "enable_nhwc_conv")
CLASSES = (("conv", ("Conv", "FusedConv", "NhwcConv")),
           ("matmul", ("MatMul", "FusedMatMul", "Gemm", "FusedGemm")),
           ("attention", ("MultiHeadAttention", "Attention", "Softmax")),
           ("norm", ("InstanceNormalization", "LayerNormalization", "SkipLayerNormalization", "GroupNorm",
                     "SkipGroupNorm", "GroupNormalization")),
           ("layout", ("Transpose", "Reshape", "ReorderInput", "ReorderOutput", "Concat", "Slice", "Split",
                       "Unsqueeze", "Squeeze", "Gather", "Expand", "Shape", "Resize", "Cast")))


def op_class(op: str, node: str) -> str:
    """The class of a profiled node; a MatMul inside attention (not a q/k/v/out projection) counts as attention."""
    if op in ("MatMul", "FusedMatMul") and "attn" in node and not any(p in node for p in ("to_q", "to_k", "to_v",
                                                                                          "to_out")):
        return "attention"
    for name, ops in CLASSES:
        if op in ops:
            return name
    return "elementwise/other"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def op_counts(path: Path) -> dict[str, int]:
    """Node types of an ONNX graph (without loading its external data)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def cpu_kernel_gaps(path: Path) -> list[str]:
    """Op types in the graph that the CPU execution provider of this onnxruntime has no kernel for (ONNX
    functions such as GroupNormalization excepted: ONNX Runtime expands those)."""
    import onnx
    import onnxruntime.capi.onnxruntime_pybind11_state as C

    have = {(d.domain or "ai.onnx", d.op_name) for d in C.get_all_opkernel_def()
            if d.provider == "CPUExecutionProvider"}
    model = onnx.load(str(path), load_external_data=False)
    missing = set()
    for n in model.graph.node:
        domain = n.domain or "ai.onnx"
        if (domain, n.op_type) not in have and not (domain == "ai.onnx" and n.op_type in ONNX_EXPANDED):
            missing.add(f"{n.op_type} ({domain})")
    return sorted(missing)


ONNX_EXPANDED = ("Constant", "GroupNormalization")  # folded into initializers / expanded by ONNX Runtime


def _const(g: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    for t in g.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def write_mha(source: Path, work: Path) -> dict[str, Any]:
    """A prototype rewrite (not the product): each attention core of sdengine's export (q, k, v projections ->
    Reshape -> Transpose -> Mul(d^-1/4) -> MatMul -> Softmax -> MatMul -> Transpose -> Reshape) becomes one
    com.microsoft MultiHeadAttention(q, k, v) with its default 1/sqrt(d) scale, which the CPU EP runs.
    onnxruntime's own FusionAttentionUnet does not match this export (an extra Cast before to_out, and a
    scale computed as Sqrt(Cast(Div)) where it expects Sqrt(Div)). The weights are not loaded: the graph
    is written beside a hard link to the export's external data."""
    import onnx
    from onnx import helper

    out = work / "mha" / source.name
    out.parent.mkdir(parents=True, exist_ok=True)
    for f in out.parent.iterdir():
        f.unlink()
    start = time.perf_counter()
    model = onnx.load(str(source), load_external_data=False)
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    users: dict[str, list[Any]] = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            users[i].append(n)

    def parent(node: Any, idx: int, op: str) -> Any:
        n = prod.get(node.input[idx])
        return n if n is not None and n.op_type == op else None

    def child(node: Any, op: str) -> Any:
        us = users.get(node.output[0], [])
        return us[0] if len(us) == 1 and us[0].op_type == op else None

    remove, added = [], []
    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        qk, av = parent(sm, 0, "MatMul"), child(sm, "MatMul")
        if qk is None or av is None:
            continue
        mq, mk = parent(qk, 0, "Mul"), parent(qk, 1, "Mul")
        tq, tk = mq and parent(mq, 0, "Transpose"), mk and parent(mk, 0, "Transpose")
        rq, rk = tq and parent(tq, 0, "Reshape"), tk and parent(tk, 0, "Reshape")
        tv = parent(av, 1, "Transpose")
        rv = tv and parent(tv, 0, "Reshape")
        to = child(av, "Transpose")
        ro = to and child(to, "Reshape")
        if not all((rq, rk, rv, ro)):
            continue
        shape = _const(g, rq.input[1])
        if shape is None or len(shape) != 4:
            continue
        heads = int(shape[2])
        node = helper.make_node("MultiHeadAttention", [rq.input[0], rk.input[0], rv.input[0]], [ro.output[0]],
                                name=sm.name.replace("Softmax", "MultiHeadAttention"), domain="com.microsoft",
                                num_heads=heads)
        added.append(node)
        remove += [qk, sm, av, mq, mk, tq, tk, tv, rq, rk, rv, to, ro]
    gone = {id(n) for n in remove}
    kept = [n for n in g.node if id(n) not in gone]
    # the scale's Sqrt/Div/Cast chain and shape constants are now dead: drop nodes nobody reads
    outputs = {o.name for o in g.output}
    nodes = kept + added
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        alive = [n for n in nodes if any(o in read for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    order = {id(n): i for i, n in enumerate(g.node)}
    anchor = {id(a): order[id(r)] for a, r in zip(added, remove[12::13])}  # at the output Reshape's place
    nodes.sort(key=lambda n: order.get(id(n), anchor.get(id(n), 0)))
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for t in g.initializer:  # external data stays where it is: link it beside the new graph
        for e in t.external_data:
            if e.key == "location" and not (out.parent / e.value).exists():
                try:
                    os.link(source.parent / e.value, out.parent / e.value)
                except OSError:
                    import shutil

                    shutil.copyfile(source.parent / e.value, out.parent / e.value)
    onnx.save(model, str(out))
    return {"path": str(out), "seconds": round(time.perf_counter() - start, 1),
            "fused": {"MultiHeadAttention": len(added)}, "ops": op_counts(out), "cpu_kernel_gaps": cpu_kernel_gaps(out)}


def fusion_options(variant: str) -> Any:
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("unet")
    if variant in ("fused", "fused-unpacked"):
        for flag in CUDA_ONLY_FUSIONS:
            setattr(options, flag, False)
    if variant == "fused-unpacked":
        options.enable_packed_qkv = options.enable_packed_kv = False
    return options


def write_fused(source: Path, variant: str, work: Path) -> dict[str, Any]:
    """optimize_model on `source` with `variant`'s fusion options, written to work/variant/denoise_step.onnx."""
    from onnxruntime.transformers.optimizer import optimize_model

    out = work / variant / source.name
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    opt = optimize_model(str(source), model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                         optimization_options=fusion_options(variant), use_gpu=False)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    external = any(f.name != source.name for f in source.parent.iterdir() if f.name.startswith(source.stem))
    for f in out.parent.iterdir():
        f.unlink()
    opt.save_model_to_file(str(out), use_external_data_format=external, all_tensors_to_one_file=True)
    del opt
    gc.collect()
    return {"path": str(out), "seconds": round(time.perf_counter() - start, 1), "fused": fused,
            "ops": op_counts(out), "cpu_kernel_gaps": cpu_kernel_gaps(out)}


@dataclass
class Variant:
    name: str
    path: Path


def session(path: Path, name: str, threads: int, profile_prefix: str | None = None) -> Any:
    """A CPU session of `path` with `name`'s session options at `threads` intra-op threads."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    if name == "extended":
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    elif name == "no-mem-pattern":
        o.enable_mem_pattern = False
    elif name == "no-spin":
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif name == "parallel":
        o.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        o.inter_op_num_threads = threads
    if profile_prefix:
        o.enable_profiling = True
        o.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def step_inputs(folder: Path, seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """One step's inputs drawn as export validation draws them (a real multistep sampler row) at the export's
    first validation point; and the output names."""
    from sdengine.manifest import Manifest
    from sdengine.specs import DENOISE_STEP, graph_specs, sample_inputs, validation_points

    m = Manifest.read(folder)
    spec = graph_specs(m.config)[DENOISE_STEP]
    dims = validation_points(m.config, m.ranges)[0]
    return sample_inputs(spec, m.config, dims, np.random.default_rng(seed)), list(spec.output_names)


def compare(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from sdengine.export.validate import rel_l2

    return {"max_abs": float(np.max(np.abs(got.astype(np.float64) - ref))), "rel_l2": rel_l2(got, ref),
            "ref_max_abs": float(np.max(np.abs(ref)))}


def time_group(variants: Sequence[Variant], threads: int, inputs: dict[str, np.ndarray], repeats: int,
               log: Any) -> dict[str, Any]:
    """Sessions of every variant, alive together; calls interleaved; outputs compared with the first (base)."""
    sessions, created, refused = {}, {}, {}
    for v in variants:
        sname = v.name if v.name in SESSION_VARIANTS else "base"
        start = time.perf_counter()
        try:
            sessions[v.name] = session(v.path, sname, threads)
        except Exception as exc:  # noqa: BLE001  onnxruntime's own exception types
            refused[v.name] = str(exc).strip().splitlines()[0][:400]
            log(f"  {v.name}: ONNX Runtime refuses the graph: {refused[v.name]}")
            continue
        created[v.name] = round(time.perf_counter() - start, 2)
    outputs = {name: s.run(None, inputs)[0] for name, s in sessions.items()}
    base = outputs.get(variants[0].name)
    for _ in range(1):  # second warm-up round
        for s in sessions.values():
            s.run(None, inputs)
    ms: dict[str, list[float]] = {name: [] for name in sessions}
    load_before = load_average()
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, inputs)
            ms[name].append(1000 * (time.perf_counter() - start))
    load_after = load_average()
    first = statistics.median(ms[variants[0].name]) if variants[0].name in ms else None
    rows = {}
    for name, values in ms.items():
        med = statistics.median(values)
        rows[name] = {"median_ms": round(med, 2), "min_ms": round(min(values), 2), "ms": [round(x, 2) for x in values],
                      "vs_base": round(med / first, 4) if first else None, "session_s": created[name]}
        if base is not None:
            rows[name]["output_vs_base"] = compare(outputs[name], base)
        log(f"  {name}: median {med:.1f} ms, min {min(values):.1f} ms"
            + (f", {med / first:.3f}x base" if first else "")
            + (f", max|diff| {rows[name]['output_vs_base']['max_abs']:.2e}" if base is not None else ""))
    for name, why in refused.items():
        rows[name] = {"refused": why}
    del sessions
    gc.collect()
    return {"threads": threads, "repeats": repeats, "load_before": load_before, "load_after": load_after,
            "variants": rows}


def profile(variant: Variant, threads: int, inputs: dict[str, np.ndarray], runs: int, work: Path) -> dict[str, Any]:
    """Per-op time of `runs` calls after one uncounted call, by op type and by class; node counts by op type."""
    sname = variant.name if variant.name in SESSION_VARIANTS else "base"
    s = session(variant.path, sname, threads, profile_prefix=str(work / f"profile-{variant.name}-{threads}t"))
    for _ in range(runs + 1):
        s.run(None, inputs)
    path = s.end_profiling()
    del s
    gc.collect()
    events = json.loads(Path(path).read_text())
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    by_op: dict[str, float] = collections.Counter()
    by_class: dict[str, float] = collections.Counter()
    nodes: dict[str, set[str]] = collections.defaultdict(set)
    first_run_end = runs_seen[0]["ts"] + runs_seen[0]["dur"] if runs_seen else 0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op, node = e["args"].get("op_name", "?"), e["name"][: -len("_kernel_time")]
        nodes[op].add(node)
        if e["ts"] >= first_run_end:  # the first call is a warm-up
            by_op[op] += e["dur"]
            by_class[op_class(op, node)] += e["dur"]
    total = sum(by_op.values()) or 1.0
    run_ms = [e["dur"] / 1000 for e in runs_seen[1:]]
    Path(path).unlink()
    return {"variant": variant.name, "threads": threads, "runs": runs,
            "run_ms_median": round(statistics.median(run_ms), 2) if run_ms else None,
            "kernel_ms_per_run": round(total / 1000 / max(runs, 1), 2),
            "by_class": {k: {"ms_per_run": round(v / 1000 / runs, 2), "share": round(v / total, 4)}
                         for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "by_op": {k: {"ms_per_run": round(v / 1000 / runs, 2), "share": round(v / total, 4),
                          "nodes": len(nodes[k])} for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "nodes_run": dict(sorted((k, len(v)) for k, v in nodes.items()))}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, required=True, help="an sdengine export folder (a static one is fastest)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--groups", nargs="+", default=["base,fused,fused-unpacked", "base,extended,no-mem-pattern",
                                                    "base,no-spin,parallel"],
                   help="comma-separated variants timed together (base first); variants: "
                        + ", ".join(SESSION_VARIANTS + GRAPH_VARIANTS))
    p.add_argument("--profile", nargs="*", default=["base", "fused"], help="variants to profile (none: no profile)")
    p.add_argument("--profile-runs", type=int, default=3)
    p.add_argument("--check-default", action="store_true",
                   help="also write the optimizer's default unet fusions and record which ops the CPU EP lacks")
    p.add_argument("--work", type=Path, default=None, help="where optimised graphs go (default: a temp folder)")
    p.add_argument("--reuse-graphs", action="store_true",
                   help="use optimised graphs already in --work (newer than the export) instead of rewriting them")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import onnxruntime as ort

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    source = args.export / "denoise_step.onnx"
    work = args.work or Path(tempfile.mkdtemp(prefix="ort-levers-"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = {v for g in args.groups for v in g.split(",")} | set(args.profile)
    unknown = wanted - set(SESSION_VARIANTS + GRAPH_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    doc: dict[str, Any] = {"export": str(args.export), "onnxruntime": ort.__version__, "numpy": np.__version__,
                           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                           "load_at_start": load_average(), "graphs": {"base": {"ops": op_counts(source)}},
                           "groups": [], "profiles": []}
    paths = {name: source for name in SESSION_VARIANTS}
    for name in GRAPH_VARIANTS:
        if name in wanted or (name == "fused-default" and args.check_default):
            log(f"writing the {name} graph ...")
            kept = work / name / source.name
            if args.reuse_graphs and kept.is_file() and kept.stat().st_mtime > source.stat().st_mtime:
                info = {"path": str(kept), "reused": True, "ops": op_counts(kept),
                        "cpu_kernel_gaps": cpu_kernel_gaps(kept), "fused": {}, "seconds": 0.0}
            else:
                info = write_mha(source, work) if name == "mha" else write_fused(source, name, work)
            doc["graphs"][name] = info
            log(f"  {info['seconds']} s; fused {info['fused']}; "
                f"ops the CPU EP lacks: {info['cpu_kernel_gaps'] or 'none'}")
            paths[name] = Path(info["path"])
            if info["cpu_kernel_gaps"]:  # never time a graph the CPU EP cannot run as if it were a result
                wanted.discard(name)
                doc["graphs"][name]["refused"] = (f"the CPU execution provider has no kernel for "
                                                  f"{', '.join(info['cpu_kernel_gaps'])}")
    inputs, _ = step_inputs(args.export, args.seed)
    for threads in args.threads:
        for group in args.groups:
            names = [n for n in group.split(",") if n in wanted]
            log(f"threads {threads}: {', '.join(names)} (load {load_average()})")
            doc["groups"].append({"group": names, **time_group([Variant(n, paths[n]) for n in names], threads,
                                                                inputs, args.repeats, log)})
    for name in args.profile:
        if name in wanted:
            log(f"profiling {name} at {args.threads[0]} thread(s) ...")
            doc["profiles"].append(profile(Variant(name, paths[name]), args.threads[0], inputs, args.profile_runs,
                                           work))
    doc["load_at_end"] = load_average()
    text = json.dumps(doc, indent=1)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
