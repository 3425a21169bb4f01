"""The bench's result document (machine, versions, command, settings, subjects) and its Markdown tables."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
from pathlib import Path
from typing import Any

from .. import __version__
from .settings import STAGES, BenchSettings

SCHEMA = "sdengine-bench/1"
PACKAGES = ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "diffusers", "transformers", "numpy", "cuda-python",
            "tensorrt")
STAGE_TITLES = {"tokenizer": "tokenizer ms", "text_encoder": "text encoder ms", "denoise_step": "denoise step ms",
                "vae_decode": "VAE decode ms", "vae_encode": "VAE encode ms"}
DEFINITIONS = {
    "e2e": "one pipeline call, prompt to PIL images, one image, guidance as set",
    "tokenizer": "CLIP BPE of the 2 prompt rows (negative, positive), host",
    "text_encoder": "text encoder on the 2 rows, until the device has finished",
    "denoise_step": "the whole DDIM loop (every step, guidance and update), until the device has finished, "
                    "divided by the steps",
    "vae_decode": "VAE decoder, latents to float images on the host",
    "vae_encode": "VAE encoder (image to image, inpainting): one image in [-1, 1] to the latent mean and std on "
                  "the host",
    "throughput": "images per call / p50 seconds per call, at each batch size",
    "load_s": "in the subject's process: importing its libraries and loading the model (whatever the backend "
              "does at load: weights to the device, sessions, engines)",
    "prepared.export_s": "onnxruntime only, in the parent: sdengine export of the source model (trace, convert, "
                         "validate against torch, write)",
    "warmup_excess_s": "sum over the first series' warm-up calls of (call - p50): compile, autotune, "
                       "CUDA-graph capture, lazy initialisation",
    "memory.after_load": "peak through imports and load",
    "memory.runs": "peak during warm-up and measured runs (host peak reset after load)",
}


def versions() -> dict[str, str | None]:
    """Installed versions (package metadata: nothing is imported), sdengine's own included."""
    out: dict[str, str | None] = {"python": platform.python_version(), "sdengine": __version__}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {"platform": platform.platform(), "cpu": cpu_name(), "cores": os.cpu_count(), "memory_gib": mem,
            "gpu": None, "loadavg_before": list(os.getloadavg())}


def document(s: BenchSettings, command: list[str]) -> dict[str, Any]:
    """The result document before any subject has run."""
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(command), "machine": machine(), "versions": versions(),
            "settings": s.to_dict(), "definitions": DEFINITIONS, "subjects": []}


def finish(doc: dict[str, Any]) -> None:
    """Fill what is known once subjects have run: the GPU's name, the load average now."""
    doc["machine"]["loadavg_after"] = list(os.getloadavg())
    gpus = {r.get("runtime", {}).get("gpu") for r in doc["subjects"]} - {None}
    doc["machine"]["gpu"] = ", ".join(sorted(gpus)) or None


def _metric(subjects: list[dict[str, Any]]) -> str | None:
    """What the speed-up compares: e2e p50 when measured, else a stage (the denoise step first)."""
    if any("e2e" in r["series"] for r in subjects):
        return "e2e"
    order = ("denoise_step", "vae_decode", "text_encoder", "tokenizer")
    return next((name for name in order for r in subjects if name in r["stages_p50_s"]), None)


def _value(result: dict[str, Any], metric: str | None) -> float | None:
    if metric == "e2e":
        return result["series"].get("e2e", {}).get("p50_s")
    return result["stages_p50_s"].get(metric) if metric else None


def _baseline(subjects: list[dict[str, Any]], metric: str | None) -> dict[str, Any] | None:
    """diffusers eager when it measured the metric, else the first subject that did."""
    ok = [r for r in subjects if _value(r, metric)]
    return next((r for r in ok if r["label"] == "diffusers"), ok[0] if ok else None)


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows), ""]


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _latency_rows(subjects: list[dict[str, Any]], metric: str | None) -> list[list[Any]]:
    base = _baseline(subjects, metric)
    rows = []
    for r in subjects:
        e2e, value = r["series"].get("e2e"), _value(r, metric)
        speed = f"{_value(base, metric) / value:.2f}x" if value and base else "-"
        shape = r.get("shape", {})
        rows.append([r["label"], f"{shape.get('width', '-')}x{shape.get('height', '-')}",
                     _fmt(r.get("prepared", {}).get("export_s"), digits=1), _fmt(r.get("load_s"), digits=2),
                     _fmt(r.get("warmup_excess_s"), digits=2), _fmt(e2e and e2e["p50_s"]),
                     _fmt(e2e and e2e["p95_s"]), speed])
    return rows


def tables(doc: dict[str, Any]) -> str:
    """Markdown: latency, stages, throughput, memory of every subject that measured something; then errors."""
    subjects = [r for r in doc["subjects"] if r.get("series")]
    failed = [f"failed: {r['label']}: {r['error']}" for r in doc["subjects"] if "error" in r]
    if not subjects:
        return "".join(line + "\n" for line in failed)
    metric = _metric(subjects)
    base = _baseline(subjects, metric)
    cfg = doc["settings"]
    out = [f"model {doc.get('model', {}).get('path', '-')}; {cfg['steps']} DDIM steps, guidance {cfg['guidance']:g}, "
           f"device {cfg['device']} ({doc['machine']['gpu'] or doc['machine']['cpu']}); p50/p95 of {cfg['runs']} runs "
           f"after {cfg['warmup']} warm-up", ""]
    speed = f"speed-up vs {base['label']}" + ("" if metric == "e2e" else f" ({metric})") if base else "speed-up"
    out += _table(["subject", "size", "export s", "load s", "warm-up excess s", "e2e p50 s", "e2e p95 s", speed],
                  _latency_rows(subjects, metric))
    stages = [name for name in STAGES if any(name in r["stages_p50_s"] for r in subjects)]
    if stages:
        out += _table(["subject", *(STAGE_TITLES[name] for name in stages)],
                      [[r["label"], *(_fmt(r["stages_p50_s"].get(name), 1000, 2) for name in stages)]
                       for r in subjects])
    if any("throughput" in r for r in subjects):
        out += _table(["subject", *(f"images/s at {b}" for b in cfg["batches"])],
                      [[r["label"], *(_fmt(_images_per_s(r, b), digits=2) for b in cfg["batches"])] for r in subjects])
    out += _table(["subject", "host peak MiB (load)", "host peak MiB (runs)", "GPU peak MiB"],
                  [[r["label"], _fmt(r["memory"]["after_load"]["host_peak_mib"], digits=0),
                    _fmt(r["memory"].get("runs", {}).get("host_peak_mib"), digits=0),
                    _gpu_cell(r["memory"].get("runs", {}))] for r in subjects])
    out += failed
    return "\n".join(out).rstrip() + "\n"


def _images_per_s(result: dict[str, Any], batch: int) -> float | None:
    return next((t["images_per_s"] for t in result.get("throughput", []) if t["batch"] == batch), None)


def _gpu_cell(mem: dict[str, Any]) -> str:
    if "torch_max_allocated_mib" in mem:
        return f"{mem['torch_max_allocated_mib']:.0f} (torch)"
    if "device_used_peak_mib" in mem:
        return f"{mem['device_used_peak_mib']:.0f} (device)"
    return "-"
