"""`export_model`: every graph traced, converted, validated and only then written, with its manifest entry.

Each graph is built in a temporary folder inside the output folder and renamed into place after it
passes; a graph that fails is not written. A rerun skips graphs whose key (weights hash and export
settings) and file hashes are unchanged. The report is printed and saved as export-report.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from .. import __version__
from ..errors import SDEngineError
from ..files import umask_mode, write_json_atomic
from ..manifest import (FORMAT, FORMAT_VERSION, MANIFEST, META_GRAPH, META_INT8, META_KEY, META_SOURCE, REPORT,
                        TOKENIZER_2_DIR, file_record, sha256_file)
from ..models.loading import load_components
from ..specs import VAE_DECODER, VAE_ENCODER, ShapeRanges, graph_specs, profile, spec_of, trace_point
from .settings import CACHE_GRAPH_ORDER, GRAPH_ORDER, INT8_OPS, ExportSettings
from .tokenizer_files import write_tokenizer
from .validate import GraphResult, compare, format_table, references, structural_checks


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shape the graphs (part of each graph's key)."""
    import onnx
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__}


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _old_manifest(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("graphs"), dict)
    return data if ok else None


def _files_match(out: Path, entry: dict[str, Any]) -> bool:
    files = {entry.get("file", ""): entry.get("sha256"), **(entry.get("external_data") or {})}
    return all((out / f).is_file() and sha256_file(out / f) == digest for f, digest in files.items())


def _up_to_date(old: dict[str, Any] | None, out: Path, name: str, key: str) -> bool:
    entry = (old or {}).get("graphs", {}).get(name)
    return bool(entry) and entry.get("key") == key and _files_match(out, entry)


def _previous_results(out: Path) -> dict[str, dict[str, Any]]:
    """The last report's record of each graph (an up-to-date graph keeps its figures)."""
    try:
        graphs = json.loads((out / REPORT).read_text(encoding="utf-8"))["graphs"]
        return {g["graph"]: g for g in graphs if isinstance(g, dict) and "graph" in g}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _up_to_date_result(record: dict[str, Any] | None, name: str, settings: ExportSettings) -> GraphResult:
    int8 = settings.quantized(name)
    result = GraphResult(name, settings.precision.value if int8 is None else f"int8 ({int8})", file=f"{name}.onnx")
    for key, value in (record or {}).items():
        if hasattr(result, key) and key not in ("graph", "precision", "seconds", "error"):
            setattr(result, key, value)
    result.status, result.seconds = "up to date", 0.0
    return result


def _remove_stale(out: Path, old: dict[str, Any] | None, name: str) -> None:
    """Delete a graph (and its external data) that an earlier export wrote with other settings."""
    entry = (old or {}).get("graphs", {}).get(name) or {}
    for f in [entry.get("file"), *(entry.get("external_data") or {})]:
        if f and Path(f).name == f:
            (out / f).unlink(missing_ok=True)


def _install(tmp: Path, out: Path, file: str, location: str | None, key: str) -> dict[str, Any]:
    """Move a validated graph (external data first) into `out`; its manifest entry."""
    records = {f: file_record(tmp / f) for f in (file, location) if f}  # hashed once, here
    external = {location: records[location]["sha256"]} if location else {}
    entry = {"file": file, "sha256": records[file]["sha256"], "external_data": external, "key": key,
             "files": {f: {"size": r["size"], "fingerprint": r["fingerprint"]} for f, r in records.items()}}
    for f in records:  # what open() gives (umask applied): some writers (onnx's external data) create files 0o600
        (tmp / f).chmod(umask_mode(0o666))
    if location:
        (tmp / location).replace(out / location)
    (tmp / file).replace(out / file)
    return entry


def export_graph(name: str, c: Any, settings: ExportSettings, ranges: ShapeRanges, out: Path, source: str,
                 key: str, seed: int, release: Callable[[], None] | None = None) -> tuple[GraphResult, dict[str, Any] | None]:
    """Trace, convert, validate and install one graph; failures are reported, not raised.

    `c` needs `config` and the modules the graph is built from (a Components, or any object with them).
    `release`, if given, is called once the torch reference outputs are computed, before any ONNX Runtime session
    is opened: it drops the caller's hold on the graph's torch module (no later graph needs it), so the module
    and the session are never in memory together.
    """
    from .fp16 import to_fp16
    from .int8 import WEIGHT_TYPE, quantize, quantized_ops
    from .onnx_io import save, set_metadata, trace
    from .params import LORA_COMPONENTS, parameter_map
    from .wrappers import build

    start, entry = time.perf_counter(), None
    precision = graph_precision(name, c.config, settings)
    int8 = settings.quantized(name)
    result = GraphResult(name, precision if int8 is None else f"int8 ({int8})", file=spec_of(name, c.config).file)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    try:
        gm = build(name, c, ranges.cache_branch)
        spec = gm.spec
        traced = trace(gm, trace_point(c.config, ranges), settings.opset, ranges.static)
        if precision == "fp16":
            traced = to_fp16(traced, spec, gm.body, gm.fp32_attention)
        set_metadata(traced.model, {META_GRAPH: name, META_SOURCE: source, META_KEY: key,
                                    "sdengine.precision": precision, "sdengine.version": __version__,
                                    **({META_INT8: int8} if int8 else {})})
        component = spec.component
        params = parameter_map(traced, component, getattr(c, component)) if component in LORA_COMPONENTS else None
        points = references(gm, c.config, ranges, seed, settings.validate)
        del gm  # with `release`, the torch module is freed here
        if release is not None:
            release()
        path = tmp / spec.file
        if int8:  # the fp32 graph passes first, then goes through the quantizer (its weights get other names)
            (tmp / "fp32").mkdir()
            save(traced, tmp / "fp32" / spec.file)
            del traced
            compare(tmp / "fp32" / spec.file, spec, points, settings.precision, result, settings.validate)
            if result.status != "passed":
                raise RuntimeError(f"the fp32 graph before quantization: {result.error}")
            result.checks["fp32_before_int8"] = f"max rel L2 {result.max_rel_l2:.2e}"
            result.points.clear()
            location, params = quantize(tmp / "fp32" / spec.file, path, int8), None
            shutil.rmtree(tmp / "fp32")
        else:
            location = save(traced, path)
            del traced
        result.checks.update(structural_checks(path, spec, c.config, ranges))
        compare(path, spec, points, settings.precision, result, settings.validate, int8=int8 is not None)
        if result.status == "passed":
            entry = _install(tmp, out, spec.file, location, key)
            if precision != settings.precision.value:  # an SDXL VAE kept fp32 (force_upcast)
                entry["precision"] = precision
            if params is not None:  # where LoRA merges go (sdengine.lora, the onnxruntime backend)
                entry["parameters"] = params
            if int8:  # the backend reads it (no LoRA on int8 weights); quantized_ops is what the graph holds
                entry["int8"] = {"ops": int8, "op_types": list(INT8_OPS[int8]), "weight_type": WEIGHT_TYPE,
                                 "method": "onnxruntime.quantization.quantize_dynamic",
                                 "integer_ops": quantized_ops(out / spec.file)}
    except Exception as exc:  # any failure of one graph is reported, and the others still export
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        result.seconds = time.perf_counter() - start
    return result, entry


def export_model(model: str | Path, out: str | Path, settings: ExportSettings,
                 log: Callable[[str], None] = print, seed: int = 0) -> list[GraphResult]:
    """Export the graphs of `settings` for the model at `model` into folder `out` (see module docstring)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise SDEngineError(f"--out {out} is a file; give a folder")
    # The loaded networks, held where each can be dropped after the last graph built from it (export_graph's release)
    loaded = load_components(model)
    c = SimpleNamespace(**{f.name: getattr(loaded, f.name) for f in fields(loaded)})
    del loaded
    ranges = settings.ranges(c.config)
    tools = tool_versions()
    weights = {"text_encoder": state_sha256(c.text_encoder), "unet": state_sha256(c.unet),
               "vae": state_sha256(c.vae)}
    if c.config.sdxl:
        weights["text_encoder_2"] = state_sha256(c.text_encoder_2)
    specs = graph_specs(c.config)
    source = hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    old, previous = _old_manifest(out), _previous_results(out)
    entries: dict[str, Any] = {}
    results: list[GraphResult] = []
    todo: list[tuple[str, str, bool]] = []  # (graph, key, up to date): the graphs to export, in order
    order = [n for n in GRAPH_ORDER + CACHE_GRAPH_ORDER if n in specs or n in CACHE_GRAPH_ORDER]
    for name in order:
        key = settings.key(name, ranges, weights[spec_of(name, c.config).component], tools)
        if graph_precision(name, c.config, settings) != settings.precision.value:
            key = hashlib.sha256(f"{key}|vae fp32 (force_upcast)".encode()).hexdigest()
        wanted, current = settings.wants(name), _up_to_date(old, out, name, key)
        if current and not (settings.force and wanted):
            entries[name] = old["graphs"][name]
            if wanted:
                results.append(_up_to_date_result(previous.get(name), name, settings))
            continue
        if not current:
            _remove_stale(out, old, name)
        if wanted:
            todo.append((name, key, current))
    for i, (name, key, current) in enumerate(todo):
        component = spec_of(name, c.config).component
        last = component not in {spec_of(n, c.config).component for n, _, _ in todo[i + 1:]}
        int8 = settings.quantized(name)
        log(f"exporting {name} ({settings.precision.value if int8 is None else f'int8, {int8}'}) ...")
        result, entry = export_graph(name, c, settings, ranges, out, source, key, seed,
                                     release=(lambda part=component: setattr(c, part, None)) if last else None)
        results.append(result)
        if entry is not None or current:  # a forced re-export that fails leaves the valid graph
            entries[name] = entry or old["graphs"][name]
    results.sort(key=lambda r: order.index(r.graph))
    write_tokenizer(out, c)
    if c.config.sdxl:
        write_tokenizer(out, c, TOKENIZER_2_DIR)
    write_json_atomic(out / MANIFEST, _manifest(c, settings, ranges, tools, weights, source, entries))
    report = {"sdengine_version": __version__, "model": str(c.source), "tools": tools,
              "graphs": [r.to_dict() for r in results]}
    write_json_atomic(out / REPORT, report)
    log(format_table(results))
    failed = [r.graph for r in results if r.status == "failed"]
    if failed:
        raise SDEngineError(f"{len(failed)} graph(s) failed validation and were not written: {', '.join(failed)}; "
                            f"see {out / REPORT}")
    return results


def graph_precision(name: str, config: Any, settings: ExportSettings) -> str:
    """The graph's body precision: the export's, except an SDXL VAE whose config sets force_upcast, kept fp32 in an
    fp16 export (its decoder overflows in fp16 on real weights; diffusers' SDXL pipeline upcasts it too)."""
    precision = settings.precision.value
    if precision == "fp16" and config.sdxl and config.vae.force_upcast and name in (VAE_DECODER, VAE_ENCODER):
        return "fp32"
    return precision


def _manifest(c: Any, settings: ExportSettings, ranges: ShapeRanges, tools: dict[str, str],
              weights: dict[str, str], source: str, entries: dict[str, Any]) -> dict[str, Any]:
    """The manifest.json contents (sdengine.manifest reads it)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "sdengine_version": __version__,
        "model_config": c.config.to_dict(), "precision": settings.precision.value, "opset": settings.opset,
        "shapes": ranges.to_dict(),
        "profiles": {name: {k: [list(s) for s in v]
                            for k, v in profile(spec_of(name, c.config), c.config, ranges).items()}
                     for name in entries},
        "source": {"path": str(c.source), "sha256": source, "weights_sha256": weights},
        "tools": tools, "exporter": "torch.onnx TorchScript (dynamo=False)", "int8": settings.int8,
        "graphs": {name: entries[name] for name in GRAPH_ORDER + CACHE_GRAPH_ORDER if name in entries},
    }
