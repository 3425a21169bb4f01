"""One subject measured in its own process: `python -m sdengine.bench.worker JOB.json RESULT.json`.

A fresh process per subject gives each its own peak memory, thread pools, allocator and compile
caches. The worker imports torch only when its subject does (the ONNX Runtime path stays torch-free:
`torch_imported` in the result says so). The result (or the error) is written atomically to RESULT.json.

Order: load (timed), then e2e at one image, the stages, and throughput per batch size, each series
after its own --warmup uncounted calls. Host and GPU peaks are read after load and again at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, SDEngineError
from ..files import write_json_atomic
from .memory import GpuPeak, HostPeak, device_name
from .settings import STAGES, BenchSettings, Subject
from .stages import SdengineStages
from .timing import Summary, measure

THREAD_OPTIONS = {"onnxruntime": "threads"}  # backends whose load() takes a CPU thread count, and its name


def log(subject: Subject, message: str) -> None:
    print(f"[{subject.label}] {message}", file=sys.stderr, flush=True)


def load_subject(subject: Subject, settings: BenchSettings, model: str) -> Any:
    """The Stages of `subject` over `model` (a backend's folder, or the diffusers folder)."""
    if subject.kind == "diffusers":
        from .diffusers_stages import DiffusersStages

        return DiffusersStages(model, settings, subject.compiled)
    from ..backends import load_backend

    options = dict(subject.options)
    if settings.threads and subject.backend in THREAD_OPTIONS:
        options.setdefault(THREAD_OPTIONS[subject.backend], settings.threads)
    try:
        backend = load_backend(model, backend=subject.backend, device=settings.device, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise InvalidInputError(f"backend {subject.backend} does not take that --option ({exc}); "
                                f"its options are the keyword arguments of its load()") from None
    return SdengineStages(backend, settings)


def set_torch_threads(threads: int | None) -> None:
    torch = sys.modules.get("torch")  # only where the subject itself imported torch
    if torch is not None and threads:
        torch.set_num_threads(threads)


def memory(host: HostPeak, gpu: GpuPeak) -> dict[str, Any]:
    return {"host_peak_mib": host.peak_mib(), **gpu.report()}


def measure_series(stages: Any, subject: Subject, s: BenchSettings, result: dict[str, Any]) -> None:
    """e2e, the stages and throughput, as selected by s.parts, stored into `result` as each one ends."""
    series, p50 = result.setdefault("series", {}), result.setdefault("stages_p50_s", {})
    e2e = None
    if "e2e" in s.parts:
        e2e = measure(lambda: stages.e2e(1), s.runs, s.warmup, stages.wait)
        series["e2e"] = e2e.to_dict()
        log(subject, f"e2e p50 {e2e.p50_s:.3f} s, p95 {e2e.p95_s:.3f} s")
    calls = stages.calls()
    for stage in (st for st in STAGES if st in s.parts):
        name = "denoise_loop" if stage == "denoise_step" else stage
        summary = measure(calls[name], s.runs, s.warmup, stages.wait)
        series[name] = summary.to_dict()
        p50[stage] = summary.p50_s / s.steps if stage == "denoise_step" else summary.p50_s
        log(subject, f"{name} p50 {summary.p50_s * 1000:.2f} ms")
    if "throughput" in s.parts:
        rows = result.setdefault("throughput", [])
        for batch in s.batches:
            rows.append(throughput(stages, subject, s, batch, e2e))


def throughput(stages: Any, subject: Subject, s: BenchSettings, batch: int, e2e: Summary | None) -> dict[str, Any]:
    """Images per second at `batch` images per call (from the p50 call time); batch 1 reuses e2e."""
    if batch == 1 and e2e is not None:
        summary, source = e2e, "e2e"
    else:
        summary, source = measure(lambda: stages.e2e(batch), s.throughput_runs, s.warmup, stages.wait), "measured"
    row = {"batch": batch, "images_per_s": batch / summary.p50_s, "seconds_per_call": summary.to_dict(),
           "source": source}
    log(subject, f"batch {batch}: {row['images_per_s']:.2f} images/s")
    return row


def run(subject: Subject, s: BenchSettings, model: str, result: dict[str, Any]) -> None:
    """Load and measure one subject into `result` (what was measured stays there if a later part fails)."""
    result.update(subject.to_dict(), model_path=str(model), device=s.device)
    host, gpu = HostPeak(), GpuPeak(s.device)
    log(subject, f"loading {model} ({s.device})")
    start = time.perf_counter()
    stages = load_subject(subject, s, model)
    result["load_s"] = time.perf_counter() - start
    set_torch_threads(s.threads)
    result["memory"] = {"after_load": memory(host, gpu), "host_method": host.method}
    host.reset()
    gpu.reset()
    result["shape"] = stages.info()
    measure_series(stages, subject, s, result)
    first = next(iter(result["series"].values()))
    result["warmup_excess_s"] = sum(max(0.0, w - first["p50_s"]) for w in first["warmup_s"])
    result["memory"]["runs"] = memory(host, gpu)
    host.stop()
    gpu.close()
    result["runtime"] = runtime_info(stages, s.device)


def runtime_info(stages: Any, device: str) -> dict[str, Any]:
    """What ran: GPU name, torch/CUDA build when torch was used, execution providers when present."""
    info: dict[str, Any] = {"torch_imported": "torch" in sys.modules, "gpu": device_name(device), "pid": os.getpid()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, torch_threads=torch.get_num_threads())
    providers = getattr(getattr(stages, "backend", None), "providers", None)
    if providers:
        info["providers"] = list(providers)
    return info


def settings_from(job: dict[str, Any]) -> tuple[Subject, BenchSettings, str]:
    subject = Subject(**{**job["subject"], "options": tuple(sorted(job["subject"]["options"].items()))})
    fields = {k: v for k, v in job["settings"].items() if k in BenchSettings.__dataclass_fields__}
    fields.update(batches=tuple(fields["batches"]), parts=tuple(fields["parts"]), subjects=(subject,))
    return subject, BenchSettings(**fields), job["model"]


def main(argv: list[str] | None = None) -> int:
    job_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    subject, settings, model = settings_from(json.loads(Path(job_path).read_text()))
    result: dict[str, Any] = {"label": subject.label}
    try:
        run(subject, settings, model, result)
        code = 0
    except SDEngineError as exc:
        result.update(error=str(exc), error_type=type(exc).__name__)
        code = 2
    except Exception as exc:  # anything else: the traceback for the log, one line for the report
        traceback.print_exc()
        result.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500], error_type=type(exc).__name__)
        code = 1
    write_json_atomic(Path(result_path), result)
    return code


if __name__ == "__main__":
    sys.exit(main())
