"""The parent of a bench run: prepare the model (random weights, ONNX export), one worker per subject.

What each subject loads: torch and diffusers the source model (a diffusers folder, or the embedded demo
model); onnxruntime an export folder, made here from the source model with `sdengine export` and
timed (or --model when it is an export folder already); any other backend the source model unless
--backend-model LABEL=PATH names its folder. Results are written to --json after every subject, so a
run that is cut short keeps what it measured.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import InvalidInputError, ModelLoadError, SDEngineError
from ..files import write_json_atomic
from ..manifest import MANIFEST, Manifest
from . import report
from .settings import BenchSettings, Subject

Log = Callable[[str], None]


def is_export(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def source_model(s: BenchSettings, tmp: Path, log: Log) -> tuple[Path, dict[str, Any]]:
    """The model every torch-side subject loads, and how it was obtained."""
    if s.random_model:
        from ..config import ModelConfig
        from ..models.saving import write_random_model

        log(f"writing a random-weight {s.random_model} model (seed {s.seed}) ...")
        start = time.perf_counter()
        factory = {"sdxl": ModelConfig.sdxl_base}.get(s.random_model) or getattr(ModelConfig, s.random_model)
        path = write_random_model(tmp / f"random-{s.random_model}", factory(), s.seed)
        return path, {"random_model": s.random_model, "seed": s.seed, "write_s": time.perf_counter() - start}
    if s.model is None:
        from ..demo import embedded_model_path

        return embedded_model_path(), {"embedded_demo_model": True}
    path = Path(s.model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--model {s.model} does not exist: give a diffusers folder, a .safetensors file or "
                             f"a folder from sdengine export")
    if is_export(path):
        recorded = Path(json.loads((path / MANIFEST).read_text()).get("source", {}).get("path", ""))
        return recorded, {"export_folder": str(path), "source_from_manifest": str(recorded)}
    return path, {}


def export_settings(s: BenchSettings) -> Any:
    """Shapes the bench runs: 1..max batch (static at one image), the asked size or the default ranges."""
    from ..export.settings import ExportSettings

    top = max(s.batches) if "throughput" in s.parts else 1
    sides = {"height": None if s.height is None else (s.height,), "width": None if s.width is None else (s.width,)}
    return ExportSettings(precision=s.export_precision, batch=(1,) if top == 1 else (1, top), static=top == 1,
                          **sides)


def export_onnx(s: BenchSettings, source: Path, tmp: Path, log: Log) -> tuple[Path, dict[str, Any]]:
    """Export `source` for the onnxruntime backend (timed: trace, convert, validate against torch, write)."""
    from ..export import export_model

    settings = export_settings(s)
    out = Path(s.onnx_dir).expanduser() if s.onnx_dir else tmp / "onnx"
    log(f"exporting {source} to ONNX ({settings.precision.value}) in {out} ...")
    start = time.perf_counter()
    results = export_model(source, out, settings, log=log)
    info = {"what": "sdengine export: trace, convert, validate against torch, write", "export_s":
            time.perf_counter() - start, "graphs_written": sum(r.status == "passed" for r in results),
            "folder": str(out), "precision": settings.precision.value,
            "shapes": Manifest.read(out).ranges.to_dict()}
    return out, info


def subject_model(subject: Subject, source: Path, origin: dict[str, Any], s: BenchSettings, tmp: Path,
                  cache: dict[str, Any], log: Log) -> tuple[str, dict[str, Any]]:
    """(what `subject` loads, how it was prepared)."""
    if subject.model:
        return subject.model, {"what": "given with --backend-model"}
    if subject.kind == "backend" and subject.backend == "onnxruntime":
        if "export_folder" in origin:
            return origin["export_folder"], {"what": "none: --model is an export folder"}
        if "onnx" in cache:
            return str(cache["onnx"]), {"what": "the export made for an earlier subject", "folder": str(cache["onnx"])}
        path, info = export_onnx(s, source, tmp, log)
        cache["onnx"] = path
        return str(path), info
    if not source.exists():
        raise InvalidInputError(f"{subject.label} needs the source model; the export folder's manifest names "
                                f"{source}, which is not here: give --model SOURCE and --onnx-dir EXPORT")
    return str(source), {"what": "none"}


def run_worker(job: dict[str, Any], tmp: Path, index: int, log: Log) -> dict[str, Any]:
    """One subject in a child process; its result (or its error) as a dict."""
    job_path, result_path = tmp / f"job-{index}.json", tmp / f"result-{index}.json"
    write_json_atomic(job_path, job)
    cmd = [sys.executable, "-m", "sdengine.bench.worker", str(job_path), str(result_path)]
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            log(line.rstrip("\n"))
            tail.append(line)
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {"label": job["subject"]["label"], "error_type": "WorkerDied",
            "error": f"the worker exited with status {proc.returncode} before writing a result: "
                     f"{''.join(tail).strip()[-300:]}"}


def run_bench(s: BenchSettings, command: list[str], json_path: Path | None, log: Log) -> dict[str, Any]:
    """Every subject of `s`, in order; the result document (also written to json_path as it grows)."""
    doc = report.document(s, command)
    with tempfile.TemporaryDirectory(prefix="sdengine-bench-") as tmp_name:
        tmp = Path(tmp_name)
        source, origin = source_model(s, tmp, log)
        doc["model"] = {"path": str(source), **origin}
        cache: dict[str, Any] = {}
        for index, subject in enumerate(s.subjects):
            try:
                model, prepared = subject_model(subject, source, origin, s, tmp, cache, log)
            except SDEngineError as exc:  # this subject cannot run; the others still do
                result = {"label": subject.label, "error": str(exc), "error_type": type(exc).__name__}
            else:
                job = {"subject": subject.to_dict(), "settings": s.to_dict(), "model": model}
                result = {**run_worker(job, tmp, index, log), "prepared": prepared}
            doc["subjects"].append(result)
            report.finish(doc)
            if json_path is not None:
                write_json_atomic(json_path, doc)
    return doc
