#!/usr/bin/env python3
"""GPU check of the lean CUDA runtime (issue 5): one command, a few minutes on an H100.

    python benchmarks/gpu_check.py [--out DIR] [--quick]

Runs from the repository root without installing (it puts the root on sys.path); the parts themselves
are in benchmarks/gpu_parts.py and gpu_models.py. Each part runs in its own Python process with a time
limit (PART_SECONDS), so a crash, a sticky CUDA error or a hang in one part cannot take the others with
it; it writes DIR/<part>.json as soon as it ends (the parent writes it when the child died first), and
DIR/summary.txt holds the printed lines.
  env       Python, torch, CUDA, cuda-python versions, GPU name; which optional modules are installed
  buffers   the CUDA layer alone (no torch): copies, memset, pinned memory, a graph replayed over new data,
            the loop with a torch-free step (each step copies its own noise row), error paths, live
            allocations and cudaMemGetInfo before and after a second, measured round (no leak)
  tiny      tiny random model, runtime + PyTorch stand-in executors (fp16 bodies): replayed whole-loop
            graph vs uncaptured loop, a cached graph over new inputs, CUDA fp16 latent and image vs the CPU
            fp32 torch reference, a shape outside the ranges, frees at close
  sd15      SD 1.5-shaped U-Net, random fp16 weights, 512x512, one image with guidance: per-step time
            without and with the whole-loop graph (CUDA events, median), and a --full-steps loop
            (default 20; skipped, and said so, when the part's deadline leaves too little time for it)
  tensorrt  where TensorRT is importable: tiny fp16 export -> sdengine build -> TensorRT backend vs ONNX
            Runtime and the reference; else skipped by the parent without starting a process
--quick runs env and tiny only. Without a GPU it says why and exits 2; a failed part makes it exit 1.

Budget: --budget-s (default 120) for all parts. Each part gets its own deadline: at most PART_SECONDS,
less what the parts after it are promised (RESERVE_S), never past the budget; the child is told its
deadline (--deadline) and is killed with its process group when it passes (benchmarks/procs.py, which
also kills it when this parent is killed).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

MODULES = ("numpy", "torch", "cuda.bindings", "transformers", "regex", "safetensors", "PIL", "onnx",
           "onnxruntime", "tensorrt", "cupy")
DISTRIBUTIONS = {"PIL": ("pillow",), "cuda.bindings": ("cuda-bindings", "cuda-python")}
PARTS = ("buffers", "tiny", "sd15", "tensorrt")
# a part's most seconds (about 2x its expected time on an H200: imports ~10 s, tiny ~25 s, sd15 ~40 s)
PART_SECONDS = {"buffers": 40, "tiny": 60, "sd15": 90, "tensorrt": 300}
RESERVE_S = {"tiny": 30, "sd15": 35}  # what the parts before them leave them, at the least
MIN_SECONDS = {"buffers": 10, "tiny": 20, "sd15": 25, "tensorrt": 60}  # fewer seconds left: skipped


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU check of sdengine's CUDA runtime (issue 5)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="results folder (default $OUT)")
    p.add_argument("--quick", action="store_true", help="the tiny-model part only")
    p.add_argument("--timing-steps", type=int, default=20, help="steps timed per mode for the SD 1.5 U-Net")
    p.add_argument("--full-steps", type=int, default=20, help="steps of the full SD 1.5 loop (0: none)")
    p.add_argument("--budget-s", type=float, default=120.0, help="seconds for all parts together")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # internal: the part's end
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
        found[name] = None
        for dist in DISTRIBUTIONS.get(name, (name,)) if spec else ():
            try:
                found[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                found[name] = "installed"
    return found


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


def part_functions() -> dict[str, Callable[[argparse.Namespace], dict]]:
    from gpu_models import part_sd15, part_tensorrt, part_tiny
    from gpu_parts import part_buffers

    return {"buffers": part_buffers, "tiny": part_tiny, "sd15": part_sd15, "tensorrt": part_tensorrt}


def run_part(out: Path, name: str, fn: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> dict:
    """One part in this process, in a try/except; its JSON written as soon as it ends."""
    start = time.perf_counter()
    try:
        data = fn(args)
    except Exception as exc:
        data = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                "traceback": traceback.format_exc(limit=12)}
    data["seconds"] = round(time.perf_counter() - start, 2)
    write_part(out, name, data)
    return data


def run_child(out: Path, name: str, command: Sequence[str], timeout: float) -> dict:
    """Run `command` (one part in a child process) and read the JSON it wrote; a failure JSON if it wrote none."""
    import procs

    (out / f"{name}.json").unlink(missing_ok=True)
    start = time.perf_counter()
    err_path = out / f".{name}.stderr"
    with open(err_path, "w") as err:
        rc = procs.wait(procs.start(list(command), stdout=subprocess.DEVNULL, stderr=err), timeout)
    stderr = err_path.read_text(errors="replace")
    err_path.unlink(missing_ok=True)
    if rc == "timeout":
        died = f"stopped after the part's {timeout:.0f} s limit"
    else:
        died = f"exit code {rc}" if rc >= 0 else f"killed by signal {-rc}"
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        data = {"ok": False, "error": f"the {name} part wrote no result: {died}", "stderr_tail": stderr[-3000:],
                "seconds": round(time.perf_counter() - start, 2)}
        write_part(out, name, data)
        return data


def tensorrt_importable() -> bool:
    """Whether `import tensorrt` works, asked of a short child (a broken install can crash the importer)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    r = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True, timeout=60)
    return r.returncode == 0


def part_slot(name: str, later: Sequence[str], left: float) -> float:
    """A part's seconds: PART_SECONDS at most, less what the later parts are promised, never more than is left."""
    reserve = sum(RESERVE_S.get(n, 0) for n in later)
    return min(PART_SECONDS[name], max(left - reserve, MIN_SECONDS[name]), left)


def run_parts(out: Path, names: Sequence[str], args: argparse.Namespace) -> dict[str, dict]:
    """Each part in its own process with its own deadline; one line printed (and added to summary.txt) as it ends."""
    results, start = {}, time.monotonic()
    names = list(names)
    if "tensorrt" in names and not tensorrt_importable():
        names.remove("tensorrt")
        results["tensorrt"] = {"skipped": "TensorRT not installed: skipped (no process started)", "seconds": 0.0}
        write_part(out, "tensorrt", results["tensorrt"])
    for i, name in enumerate(names):
        left = args.budget_s - (time.monotonic() - start)
        if left < MIN_SECONDS[name]:
            data = {"skipped": f"{left:.0f} s of --budget-s left, the part needs {MIN_SECONDS[name]}", "seconds": 0.0}
            write_part(out, name, data)
        else:
            slot = part_slot(name, names[i + 1:], left)
            command = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--out", str(out),
                       "--part", name, "--timing-steps", str(args.timing_steps), "--full-steps", str(args.full_steps),
                       "--deadline", str(time.time() + slot - 3)]
            data = run_child(out, name, command, slot)
            data["slot_s"] = round(slot, 1)
        line = summary_line(name, data)
        print(line, flush=True)
        with open(out / "summary.txt", "a") as f:
            f.write(line + "\n")
        results[name] = data
    for name in ("tensorrt",) if "tensorrt" in results and "tensorrt" not in names else ():
        line = summary_line(name, results[name])
        print(line, flush=True)
        with open(out / "summary.txt", "a") as f:
            f.write(line + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        data = run_part(out, args.part, part_functions()[args.part], args)
        return 0 if data.get("ok") or data.get("skipped") else 1
    (out / "summary.txt").write_text("")
    env = environment()
    write_part(out, "env", env)
    print(f"env: {env.get('gpu', 'no GPU')}, torch {env.get('torch')}, CUDA driver {env.get('cuda_driver')}", flush=True)
    if "error" in env:
        print(f"gpu_check: {env['error']}; nothing was run (results in {out})", file=sys.stderr)
        return 2
    results = run_parts(out, ["tiny"] if args.quick else PARTS, args)
    write_part(out, "summary", {n: {k: r.get(k) for k in ("ok", "skipped", "summary", "error", "seconds")}
                                for n, r in results.items()})
    return 0 if all(r.get("ok") or r.get("skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
