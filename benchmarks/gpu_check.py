#!/usr/bin/env python3
"""GPU check of the lean CUDA runtime (issue 5): one command, a few minutes on an H100.

    python benchmarks/gpu_check.py [--out DIR] [--quick]

Runs from the repository root without installing (it puts the root on sys.path); the parts themselves
are in benchmarks/gpu_parts.py. Each part runs in its own try/except and writes DIR/<part>.json as soon
as it ends; DIR/summary.txt holds the printed lines.
  env       Python, torch, CUDA, cuda-python versions, GPU name; which optional modules are installed
  buffers   the CUDA layer alone (no torch): copies, memset, pinned memory, a graph replayed over new data,
            the loop with a torch-free step (each step copies its own noise row), error paths, and
            cudaMemGetInfo before and after (no leak)
  tiny      tiny random model, runtime + PyTorch stand-in executors (fp16 bodies): replayed whole-loop
            graph vs uncaptured loop, a cached graph over new inputs, CUDA fp16 latent and image vs the CPU
            fp32 torch reference, a shape outside the ranges, frees at close
  sd15      SD 1.5-shaped U-Net, random fp16 weights, 512x512, one image with guidance: per-step time
            without and with the whole-loop graph (CUDA events, median), and a full 50-step loop
  tensorrt  where TensorRT is importable: tiny fp16 export -> sdengine build -> TensorRT backend vs ONNX
            Runtime and the reference; else "TensorRT not installed: skipped"
--quick runs env and tiny only. Without a GPU it says why and exits 2; a failed part makes it exit 1.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODULES = ("numpy", "torch", "cuda.bindings", "transformers", "regex", "safetensors", "PIL", "onnx",
           "onnxruntime", "tensorrt", "cupy")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU check of sdengine's CUDA runtime (issue 5)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="results folder (default $OUT)")
    p.add_argument("--quick", action="store_true", help="the tiny-model part only")
    p.add_argument("--timing-steps", type=int, default=20, help="steps timed per mode for the SD 1.5 U-Net")
    p.add_argument("--full-steps", type=int, default=50, help="steps of the full SD 1.5 loop")
    return p.parse_args(argv)


def write_part(out: Path, name: str, data: dict[str, Any]) -> None:
    """DIR/<name>.json, written to a temporary name then renamed."""
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, out / f"{name}.json")


def module_report() -> dict[str, str | None]:
    """Version of each optional module, None when it is not installed."""
    found: dict[str, str | None] = {}
    for name in MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        dist = {"PIL": "pillow", "cuda.bindings": "cuda-python"}.get(name, name)
        try:
            found[name] = importlib.metadata.version(dist) if spec else None
        except importlib.metadata.PackageNotFoundError:
            found[name] = "installed" if spec else None
    return found


def ensure_regex() -> bool:
    """True when `regex` is installed; else an ASCII-exact `re` stand-in for CLIP's split pattern (this script only)."""
    if importlib.util.find_spec("regex") is not None:
        return True
    import re
    import types

    def compile_(pattern: str, flags: int = 0) -> re.Pattern:
        for prop, plain in ((r"[\p{L}]+", r"[^\W\d_]+"), (r"[\p{N}]", r"\d"), (r"[^\s\p{L}\p{N}]+", r"(?:[^\s\w]|_)+")):
            pattern = pattern.replace(prop, plain)
        return re.compile(pattern, flags)

    sys.modules["regex"] = types.SimpleNamespace(compile=compile_, IGNORECASE=re.IGNORECASE)
    return False


def summary_line(name: str, data: dict[str, Any]) -> str:
    status = "skipped" if data.get("skipped") else "ok" if data.get("ok") else "FAILED"
    text = data.get("summary") or data.get("skipped") or data.get("error", "")
    return f"{name}: {status} ({data.get('seconds', 0):.1f} s) {text}".rstrip()


def environment() -> dict[str, Any]:
    """Versions and the GPU; `error` says why there is no usable GPU."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "modules": module_report()}
    try:
        from sdengine.runtime import cuda

        rt = cuda.import_cudart()
        gpu = cuda.set_device(0)
        info.update(gpu=gpu.name, compute_capability=gpu.compute_capability, gpu_memory_gib=gpu.total_memory / 2**30,
                    cuda_driver=cuda.check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion"),
                    cuda_runtime=cuda.check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
    except Exception as exc:  # BackendUnavailableError without GPU or driver; anything else is reported too
        info["error"] = f"no usable CUDA GPU: {exc}"
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, torch_sees_gpu=torch.cuda.is_available())
    except Exception as exc:
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    return info


def run_parts(out: Path, parts: list[tuple[str, Callable[[argparse.Namespace], dict]]],
              args: argparse.Namespace) -> dict[str, dict]:
    """Each part in its own try/except; its JSON written and one line printed as soon as it ends."""
    results = {}
    for name, fn in parts:
        start = time.perf_counter()
        try:
            data = fn(args)
        except Exception as exc:
            data = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                    "traceback": traceback.format_exc(limit=12)}
        data["seconds"] = round(time.perf_counter() - start, 2)
        write_part(out, name, data)
        line = summary_line(name, data)
        print(line, flush=True)
        with open(out / "summary.txt", "a") as f:
            f.write(line + "\n")
        results[name] = data
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text("")
    env = environment()
    env["regex_installed"] = ensure_regex()
    write_part(out, "env", env)
    print(f"env: {env.get('gpu', 'no GPU')}, torch {env.get('torch')}, CUDA driver {env.get('cuda_driver')}", flush=True)
    if "error" in env:
        print(f"gpu_check: {env['error']}; nothing was run (results in {out})", file=sys.stderr)
        return 2
    from gpu_models import part_sd15, part_tensorrt, part_tiny
    from gpu_parts import part_buffers

    parts = [("tiny", part_tiny)] if args.quick else [
        ("buffers", part_buffers), ("tiny", part_tiny), ("sd15", part_sd15), ("tensorrt", part_tensorrt)]
    results = run_parts(out, parts, args)
    write_part(out, "summary", {n: {k: r.get(k) for k in ("ok", "skipped", "summary", "error", "seconds")}
                                for n, r in results.items()})
    return 0 if all(r.get("ok") or r.get("skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
