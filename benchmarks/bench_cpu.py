#!/usr/bin/env python3
"""CPU benchmark: the torch reference against ONNX Runtime, in one run (recorded in benchmarks/RESULTS.md).

    python benchmarks/bench_cpu.py --model PATH [--onnx DIR] [--steps 20] [--repeats 5] [--sd15-step]
                                   [--threads N] [--json OUT.json]

Rows:
- `pipeline`: seconds per image for the model at PATH (default: the embedded demo model): txt2img,
  `--steps` DDIM steps, guidance 7.5, one image per call, the model's own size. The model is exported
  to ONNX first (fp32, into --onnx DIR or a temporary folder; export time not counted).
- `sd15-step`: one SD 1.5-shaped U-Net denoise step (random weights, 860M parameters) at a 32x32 latent
  (256x256 pixels) with guidance (2 U-Net rows): the step graph, exported static, >2 GB with external data.

Each (row, backend) runs in its own child process, so its peak memory (VmHWM) is its own; the ONNX
Runtime child runs with torch made unimportable. Times are the median of --repeats runs after one
warm-up run. Both backends use the same thread count (--threads, default: all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in the onnxruntime benchmark child")
sys.meta_path.insert(0, _Block())
"""
PROMPT, SD15_LATENT = "a red circle on a blue background", 32


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: sessions, allocations, oneDNN/MLAS kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def child_pipeline(args: argparse.Namespace) -> list[float]:
    import sdengine

    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
        pipe = sdengine.load_pipeline(args.model)
    else:
        pipe = sdengine.load_pipeline(args.onnx, backend="onnxruntime", threads=args.threads)
    return _timed(lambda: pipe(PROMPT, num_inference_steps=args.steps, seed=0), args.repeats)


def child_sd15_step(args: argparse.Namespace) -> list[float]:
    import numpy as np

    from sdengine.config import ModelConfig
    from sdengine.specs import DENOISE_STEP, GRAPHS, point_dims, sample_inputs

    config = ModelConfig.sd15()
    inputs = sample_inputs(GRAPHS[DENOISE_STEP], config, point_dims(config, 1, SD15_LATENT, SD15_LATENT),
                           np.random.default_rng(0))
    if args.backend == "torch":
        import torch

        from sdengine.models.step import DenoiseStep
        from sdengine.models.unet import UNet

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        step = DenoiseStep(UNet(config.unet).eval().requires_grad_(False))
        tensors = [torch.from_numpy(inputs[n]) for n in GRAPHS[DENOISE_STEP].input_names]

        def run() -> None:
            with torch.inference_mode():
                step(*tensors)
    else:
        from sdengine.runtime.onnxruntime import Buffer, Graph

        graph = Graph(Path(args.onnx) / "denoise_step.onnx", GRAPHS[DENOISE_STEP], ["CPUExecutionProvider"], "cpu",
                      args.threads)
        buffers = {n: Buffer.holding(v, "cpu") for n, v in inputs.items()}
        out = Buffer(inputs["latent"].shape, np.float32)
        for name, buf in buffers.items():
            graph.bind_buffer(name, buf)
        graph.bind_output("next_latent", out)
        run = graph.run
    return _timed(run, args.repeats)


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would include the parent's, kept across exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(kind: str, backend: str, args: argparse.Namespace, onnx_dir: Path) -> dict:
    """One (row, backend) measurement in a fresh process; its timings and peak RSS."""
    argv = [__file__, "--child", kind, "--backend", backend, "--steps", str(args.steps), "--repeats",
            str(args.repeats), "--threads", str(args.threads), "--onnx", str(onnx_dir)]
    if args.model:
        argv += ["--model", str(args.model)]
    prelude = BLOCK_TORCH if backend == "onnxruntime" else ""
    code = prelude + f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path({__file__!r}, run_name='__main__')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{kind}/{backend} failed:\n{r.stderr}")
    data = json.loads(r.stdout.strip().splitlines()[-1])
    data.update(row=kind, backend=backend)
    return data


def embedded_model() -> Path | None:
    """The embedded demo model (what sdengine.load_pipeline() uses without a path), if it is installed."""
    from sdengine.demo import embedded_model_path
    from sdengine.errors import ModelLoadError

    try:
        return embedded_model_path()
    except ModelLoadError:
        return None


def export_pipeline_graphs(model: Path, out: Path) -> None:
    from sdengine.export import ExportSettings, export_model

    export_model(model, out, ExportSettings(), log=lambda line: None)


def export_sd15_step(out: Path) -> dict:
    """The SD 1.5-shaped step graph (random weights), static at one image and a 32x32 latent."""
    import types

    import torch

    from sdengine.config import ModelConfig
    from sdengine.export import ExportSettings
    from sdengine.export.run import export_graph
    from sdengine.models.unet import UNet

    config = ModelConfig.sd15()
    torch.manual_seed(0)
    parts = types.SimpleNamespace(config=config, unet=UNet(config.unet).eval().requires_grad_(False))
    side = SD15_LATENT * config.vae.downscale
    settings = ExportSettings(static=True, batch=(1,), height=(side,), width=(side,), graphs=("denoise_step",))
    out.mkdir(parents=True, exist_ok=True)
    result, entry = export_graph("denoise_step", parts, settings, settings.ranges(config), out, "bench", "bench", 0)
    if entry is None:
        raise SystemExit(f"the SD 1.5-shaped step graph failed validation: {result.error}")
    return {"max_rel_l2": result.max_rel_l2, "external_data": list(entry["external_data"])}


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "numpy": numpy.__version__, "cpu": cpu, "cores": os.cpu_count(),
            "platform": platform.platform()}


def table(rows: list[dict]) -> str:
    lines = [f"{'row':<10} {'backend':<12} {'median s':>9} {'min s':>8} {'peak RSS MiB':>13} {'speed-up':>9}"]
    torch_median = {r["row"]: r["median_s"] for r in rows if r["backend"] == "torch"}
    for r in rows:
        speed = torch_median.get(r["row"], 0) / r["median_s"]
        lines.append(f"{r['row']:<10} {r['backend']:<12} {r['median_s']:>9.3f} {r['min_s']:>8.3f} "
                     f"{r['peak_rss_mib']:>13.0f} {speed:>8.2f}x")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model for the pipeline row (default: the embedded demo model)")
    p.add_argument("--onnx", type=Path, help="its ONNX export folder (default: exported to a temporary folder)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--sd15-step", action="store_true", help="add the SD 1.5-shaped U-Net step row")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results-cpu.json")
    p.add_argument("--child", choices=("pipeline", "sd15-step"), help=argparse.SUPPRESS)
    p.add_argument("--backend", choices=("torch", "onnxruntime"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        times = (child_pipeline if args.child == "pipeline" else child_sd15_step)(args)
        peak = peak_rss_mib()
        print(json.dumps({"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
                          "peak_rss_mib": peak}))
        return 0
    if args.model is None:
        args.model = embedded_model()
    if not args.model and not args.sd15_step:
        raise SystemExit("the embedded demo model is not installed: give --model PATH and/or --sd15-step")
    rows, notes = [], {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sdengine-bench-") as tmp:
        if args.model:
            onnx_dir = args.onnx or Path(tmp) / "pipeline"
            export_pipeline_graphs(args.model, onnx_dir)
            rows += [run_child("pipeline", b, args, onnx_dir) for b in ("torch", "onnxruntime")]
        if args.sd15_step:
            notes["sd15_step_export"] = export_sd15_step(Path(tmp) / "sd15")
            rows += [run_child("sd15-step", b, args, Path(tmp) / "sd15") for b in ("torch", "onnxruntime")]
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "versions": versions(),
              "threads": args.threads, "steps": args.steps, "repeats": args.repeats, "model": str(args.model),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows, **notes}
    print(table(rows))
    print(f"load average before/after: {load_before[0]:.2f} / {result['loadavg_after'][0]:.2f} "
          f"on {os.cpu_count()} cores")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
