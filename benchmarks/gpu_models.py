"""The model parts of benchmarks/gpu_check.py: tiny model, SD 1.5-shaped U-Net timings, TensorRT (if installed).

torch is imported inside the parts. The tiny model is built in memory with random weights (no files).
"""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from gpu_parts import (NEGATIVE, PROMPT, ROOT, TINY_CASES, compare, eager_step_ms, image_diff, image_ok, timed,
                       within_graph_tolerance)


def tiny_components() -> tuple[Any, Any]:
    """The tiny model's networks (random, seed 0): fp32 on the CPU, and an fp16 copy on the GPU."""
    import torch

    from sdengine.config import ModelConfig
    from sdengine.models.loading import Components
    from sdengine.models.text_encoder import TextEncoder
    from sdengine.models.unet import UNet
    from sdengine.models.vae import AutoencoderKL
    from sdengine.tokenizer import ClipTokenizer

    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    nets = [UNet(cfg.unet), AutoencoderKL(cfg.vae), TextEncoder(cfg.text_encoder)]
    for net in nets:
        net.eval().requires_grad_(False)
    tok, source = ClipTokenizer.default(), Path("random tiny model")
    gpu = [copy.deepcopy(net).to("cuda", torch.float16) for net in nets]
    return Components(cfg, *nets, tok, source), Components(cfg, *gpu, tok, source)


def _inputs(config: Any, case: tuple, seed: int) -> tuple[Any, np.ndarray, np.ndarray | None, list[str]]:
    from sdengine.pipeline import initial_noise
    from sdengine.samplers import build_schedule

    b, n, g, eta, h, w = case
    f = config.vae.downscale
    schedule = build_schedule(config.scheduler, "ddim", n, eta)
    init, noise = initial_noise([seed + i for i in range(b)], (config.vae.latent_channels, h // f, w // f), schedule)
    init = init * np.float32(schedule.init_scale)
    rows = [PROMPT] * b if g <= 1.0 else [NEGATIVE] * b + [PROMPT] * b
    return schedule, init, noise, rows


def tiny_case(cb: Any, ref: Any, case: tuple, seed: int) -> dict[str, Any]:
    """One request through the runtime (eager, captured, replayed, new inputs) and through the CPU reference."""
    guidance = case[2]
    schedule, init, noise, rows = _inputs(cb.config, case, seed)
    ids = cb.tokenizer(rows)
    emb, loop, dl = cb.encode_text(ids), cb.loop, cb.device.download

    def run(x: np.ndarray, z: np.ndarray | None, graph: bool) -> Any:
        return loop.launch(loop.prepare(x, emb, schedule, guidance, z), graph=graph)

    eager = dl(run(init, noise, False))
    first = dl(run(init, noise, True))  # warm-up step, capture, launch
    out = run(init, noise, True)        # the cached graph
    replay, image = dl(out), cb.decode(out)
    _, init2, noise2, _ = _inputs(cb.config, case, seed + 1000)
    replay2 = dl(run(init2, noise2, True))
    eager2 = dl(run(init2, noise2, False))
    latent_ref = ref.denoise(init, ref.encode_text(ids), schedule, guidance, noise)
    image_ref = ref.decode(latent_ref)
    r = {"case": dict(zip(("images", "steps", "guidance", "eta", "height", "width"), case)),
         "graph_vs_eager": compare(first, eager), "replay_vs_first": compare(replay, first),
         "cached_graph_new_inputs_vs_eager": compare(replay2, eager2),
         "latent_vs_cpu_fp32": compare(eager, latent_ref.numpy()), "image_vs_cpu_fp32": image_diff(image, image_ref)}
    r["ok"] = (within_graph_tolerance(r["graph_vs_eager"], eager)
               and within_graph_tolerance(r["replay_vs_first"], first)
               and within_graph_tolerance(r["cached_graph_new_inputs_vs_eager"], eager2)
               and r["graph_vs_eager"]["finite"] and image_ok(r["image_vs_cpu_fp32"]))
    return r


def _outside_range(cb: Any) -> dict[str, Any]:
    """A 256-pixel request to a backend built for 64..128: a clear error, and no buffer allocated for it."""
    from sdengine.errors import InvalidInputError
    from sdengine.samplers import build_schedule

    emb = cb.encode_text(cb.tokenizer([NEGATIVE, PROMPT]))
    live = cb.device.memory.live
    try:
        cb.denoise(np.zeros((1, 4, 32, 32), np.float32), emb, build_schedule(cb.config.scheduler, "ddim", 3), 7.5,
                   None)
        return {"ok": False, "error": None}
    except InvalidInputError as exc:
        return {"ok": cb.device.memory.live == live, "error": str(exc)}


def part_tiny(args: Any) -> dict[str, Any]:
    from sdengine.backends.cuda_backend import CudaBackend
    from sdengine.backends.torch_backend import TorchBackend
    from sdengine.backends.torch_executor import torch_executors
    from sdengine.runtime.device import CudaDevice
    from sdengine.specs import ShapeRanges

    cpu, gpu = tiny_components()
    ref, device, cb = TorchBackend(cpu, "cpu"), CudaDevice(), None
    try:
        cb = CudaBackend(gpu.config, gpu.tokenizer, torch_executors(gpu), device, ShapeRanges.default(gpu.config))
        cases = [tiny_case(cb, ref, case, seed=10 * i) for i, case in enumerate(TINY_CASES)]
        outside = _outside_range(cb)
        graphs = len(cb.loop.graphs)
        modes = sorted({(g.mode, *g.capture_errors) for g in cb.loop.graphs.values()})
    finally:
        cb.close() if cb is not None else device.close()
    worst = max((c["image_vs_cpu_fp32"] for c in cases), key=lambda d: d["max_255"])
    identical = sum(c["graph_vs_eager"]["identical"] and c["cached_graph_new_inputs_vs_eager"]["identical"]
                    for c in cases)
    r = {"cases": cases, "outside_range": outside, "graphs_cached": graphs, "capture_modes": modes,
         "live_buffers_after_close": device.memory.live}
    r["ok"] = all(c["ok"] for c in cases) and outside["ok"] and device.memory.live == 0
    r["summary"] = (f"graph vs uncaptured loop bit-identical in {identical}/{len(cases)} cases; CUDA fp16 image vs "
                    f"CPU fp32: worst max {worst['max_255']}/255, mean {worst['mean_255']:.2f}/255, "
                    f"PSNR {worst['psnr_db']:.1f} dB")
    return r


# --- SD 1.5-shaped U-Net timings --------------------------------------------------------------------------------

def _sd15_loop() -> tuple[Any, Any, Any, int]:
    """A DenoiseLoop over the SD 1.5-shaped U-Net with random weights, built on the GPU in fp16."""
    import torch

    from sdengine.backends.torch_executor import TorchExecutor, with_fp16_body
    from sdengine.config import ModelConfig
    from sdengine.models.step import DenoiseStep
    from sdengine.models.unet import UNet
    from sdengine.runtime.device import CudaDevice
    from sdengine.runtime.loop import DenoiseLoop
    from sdengine.specs import DENOISE_STEP, GRAPHS

    cfg = ModelConfig.sd15()
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet(cfg.unet)
    unet = unet.half().eval().requires_grad_(False)
    torch.cuda.synchronize()  # the weights were made on torch's stream
    params = sum(p.numel() for p in unet.parameters())
    device = CudaDevice()
    step = TorchExecutor(GRAPHS[DENOISE_STEP], with_fp16_body(DenoiseStep(unet), ("unet",)), cfg)
    return cfg, device, DenoiseLoop(device, step, cfg), params


def _sd15_timings(args: Any, cfg: Any, device: Any, loop: Any) -> dict[str, Any]:
    from sdengine.runtime.loop import TextEmbeddings
    from sdengine.samplers import build_schedule

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 64, 64), dtype=np.float32)
    emb = TextEmbeddings(device.empty((2, 77, cfg.text_encoder.hidden_size)), 2)
    device.upload(emb.buffer, rng.standard_normal(emb.buffer.shape, dtype=np.float32))
    n = build_schedule(cfg.scheduler, "ddim", args.timing_steps)

    def prep(s: Any) -> Any:
        return loop.prepare(x, emb, s, 7.5, None)

    loop.launch(prep(n), graph=False)  # warm-up: cuDNN/cuBLAS setup, the allocator's pool
    steps_ms, out = eager_step_ms(loop, device, prep(n))
    eager = device.download(out)
    loop.launch(prep(n), graph=True)  # warm-up step, capture, first launch
    outs: list = []
    runs = [timed(device, lambda p=prep(n): outs.append(loop.launch(p, graph=True))) for _ in range(5)]
    graph = device.download(outs[-1])
    per_step_graph = statistics.median(r["gpu_ms"] for r in runs) / n.num_steps
    same = compare(graph, eager)
    r = {"steps_timed": n.num_steps, "eager_step_ms": steps_ms, "eager_step_ms_median": statistics.median(steps_ms),
         "graph_launches": runs, "graph_step_ms": per_step_graph, "graph_vs_eager": same,
         "graph_ok": same["finite"] and within_graph_tolerance(same, eager), "full_steps": args.full_steps}
    # the full loop: one uncaptured run, a capture (one step + the loop) and 3 replays, about 5.5 loops of host time
    need_s = 5.5 * args.full_steps * max(statistics.median(steps_ms), per_step_graph) / 1e3 + 5.0
    deadline = getattr(args, "deadline", None)
    if args.full_steps <= 0 or (deadline is not None and time.time() + need_s > deadline):
        r["full_skipped"] = (f"{args.full_steps} steps need about {need_s:.0f} s, past the part's deadline"
                             if args.full_steps > 0 else "--full-steps 0")
        return r
    full = build_schedule(cfg.scheduler, "ddim", args.full_steps)
    p = prep(full)
    eager_full = timed(device, lambda: loop.launch(p, graph=False))
    loop.launch(prep(full), graph=True)
    graph_full = [timed(device, lambda p=prep(full): loop.launch(p, graph=True)) for _ in range(3)]
    r.update(full_steps=full.num_steps, full_eager=eager_full, full_graph=graph_full,
             full_graph_ms_median=statistics.median(g["gpu_ms"] for g in graph_full))
    return r


def part_sd15(args: Any) -> dict[str, Any]:
    import torch

    cfg, device, loop, params = _sd15_loop()
    try:
        r = _sd15_timings(args, cfg, device, loop)
    finally:
        loop.close()
        loop.step.close()
        device.close()
    r.update(parameters=params, image="512x512, 1 image, guidance 7.5 (2 U-Net rows)",
             torch_max_allocated_gib=torch.cuda.max_memory_allocated() / 2**30)
    r["ok"] = r["graph_ok"]
    full = (f"{r['full_steps']} steps: {r['full_eager']['gpu_ms']:.0f} ms uncaptured, "
            f"{r['full_graph_ms_median']:.0f} ms graph" if "full_eager" in r else f"full loop skipped ({r['full_skipped']})")
    r["summary"] = (f"per step: {r['eager_step_ms_median']:.2f} ms uncaptured, {r['graph_step_ms']:.2f} ms with the "
                    f"whole-loop graph; {full}; graph==uncaptured: {r['graph_vs_eager']['identical']}, "
                    f"finite: {r['graph_vs_eager']['finite']}")
    return r


# --- TensorRT (written against the engine API; not yet run) -----------------------------------------------------

def _generate(backend: Any, case: tuple, seed: int) -> np.ndarray:
    """One request through any backend's encode_text / denoise / decode: the float image."""
    schedule, init, noise, rows = _inputs(backend.config, case, seed)
    context = backend.encode_text(backend.tokenizer(rows))
    return backend.decode(backend.denoise(init, context, schedule, case[2], noise))


def part_tensorrt(args: Any) -> dict[str, Any]:
    try:
        from sdengine.runtime.tensorrt import import_tensorrt

        trt = import_tensorrt()
    except Exception as exc:
        return {"skipped": "TensorRT not installed: skipped", "detail": str(exc)}
    from sdengine.backends import load_backend
    from sdengine.export import ExportSettings, export_model
    from sdengine.models.saving import write_random_model

    work = Path(tempfile.mkdtemp(prefix="sdengine-gpu-check-"))
    model = write_random_model(work / "tiny")
    onnx_dir, engines = work / "onnx-fp16", work / "engines"
    export_model(model, onnx_dir, ExportSettings(precision="fp16"), log=lambda line: None)
    build = subprocess.run([sys.executable, "-m", "sdengine", "build", "--onnx", str(onnx_dir), "--out", str(engines)],
                           capture_output=True, text=True, timeout=400, cwd=ROOT)
    if build.returncode:
        return {"ok": False, "error": "sdengine build failed", "stderr": build.stderr[-3000:]}
    case = TINY_CASES[0]
    trt_backend = load_backend(str(engines), backend="tensorrt", device="cuda")
    try:
        got = _generate(trt_backend, case, seed=1)
        loop, p = trt_backend.loop, None
        emb = trt_backend.encode_text(trt_backend.tokenizer([NEGATIVE, PROMPT]))
        schedule, init, _, _ = _inputs(trt_backend.config, case, 1)
        times = {}
        for graph in (False, True):
            loop.launch(loop.prepare(init, emb, schedule, 7.5, None), graph=graph)  # warm-up / capture
            p = loop.prepare(init, emb, schedule, 7.5, None)
            times["graph" if graph else "eager"] = timed(trt_backend.device, lambda: loop.launch(p, graph=graph))
    finally:
        trt_backend.close()
    ort = _generate(load_backend(str(onnx_dir), backend="onnxruntime"), case, seed=1)
    ref = _generate(load_backend(str(model), backend="torch"), case, seed=1)
    r = {"tensorrt": str(trt.__version__), "vs_onnxruntime": image_diff(got, ort), "vs_reference": image_diff(got, ref),
         "loop_ms": times}
    r["ok"] = image_ok(r["vs_onnxruntime"]) and image_ok(r["vs_reference"])
    r["summary"] = (f"TensorRT {r['tensorrt']} vs ONNX Runtime max {r['vs_onnxruntime']['max_255']}/255, vs reference "
                    f"max {r['vs_reference']['max_255']}/255")
    return r
