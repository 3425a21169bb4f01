"""The parts of benchmarks/gpu_fastpath.py, each run in its own child process; results go out as JSON lines.

Every part appends to results.jsonl as it goes (one object per line, flushed), so a part killed at its
time limit still leaves what it measured. Outputs compared across parts (final latents and the uint8
image of one seed) are kept as .npz files in the work folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

PROMPT, NEGATIVE, SEED, GUIDANCE = "a photograph of an astronaut riding a horse on the moon", "", 1, 7.5
NO_GPU = "no CUDA GPU: torch.cuda.is_available() is False (this part needs an NVIDIA GPU)"


class Part:
    """One part's context: settings, deadline, device, and the results file it appends to."""

    def __init__(self, name: str, state: dict, deadline: float) -> None:
        import torch

        self.name, self.state, self.deadline = name, state, deadline
        self.results, self.work = Path(state["results"]), Path(state["work"])
        self.quick, self.steps, self.runs = state["quick"], state["steps"], state["runs"]
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.float16 if self.cuda else torch.float32
        if not self.cuda:  # CPU smoke run: OpenMP threads on shared cores wait on each other
            torch.set_num_threads(1)
        from sdengine.config import ModelConfig

        self.config = ModelConfig.tiny() if self.quick else ModelConfig.sd15()
        self.side = self.config.default_size
        self.folder = self.work / ("tiny-random" if self.quick else "sd15-random")
        sync = self.work / "sync"
        sync.mkdir(exist_ok=True)
        (sync / f"started-{name}").touch()

    def record(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"part": self.name, "kind": kind, "time": round(time.time(), 3), **fields}, default=str)
        with self.results.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def left(self) -> float:
        return self.deadline - time.time()

    @contextlib.contextmanager
    def gpu_turn(self, peers: tuple[str, ...] = ("ours-compiled", "diffusers-compiled"), poll: float = 0.5):
        """Wait until every other part of `peers` has compiled (entered its turn) or ended, then hold the GPU lock.

        Parts started together compile at once and time one at a time: a part's timed runs never overlap another
        part's compile or runs. Alone (no peer started), the wait ends at once. Records the seconds waited."""
        sync = self.work / "sync"
        sync.mkdir(exist_ok=True)
        (sync / f"ready-{self.name}").touch()
        start = time.time()
        others = [p for p in peers if p != self.name and (sync / f"started-{p}").exists()]
        while others and time.time() < self.deadline - 10:
            if all((sync / f"ready-{p}").exists() or (sync / f"ended-{p}").exists() for p in others):
                break
            time.sleep(poll)
        with open(sync / "gpu.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.record("gpu-turn", waited_s=round(time.time() - start, 2), peers=others)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)

    def initial_latents(self, batch: int = 1) -> np.ndarray:
        from sdengine.pipeline import initial_noise
        from sdengine.samplers import build_schedule

        f = self.config.vae.downscale
        schedule = build_schedule(self.config.scheduler, "ddim", self.steps)
        shape = (self.config.vae.latent_channels, self.side // f, self.side // f)
        return initial_noise([SEED + i for i in range(batch)], shape, schedule)[0]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def timed(part: Part, fn: Callable[[], Any], runs: int) -> dict:
    """Wall times of `fn` between CUDA syncs, stopping early when the part's deadline is near."""
    times: list[float] = []
    for _ in range(runs):
        if times and part.left() < 1.5 * max(times) + 5:
            break
        part.sync()
        start = time.perf_counter()
        fn()
        part.sync()
        times.append(time.perf_counter() - start)
    t = np.asarray(times)
    return {"runs": len(times), "runs_asked": runs, "median_s": round(float(np.median(t)), 5),
            "p95_s": round(float(np.percentile(t, 95)), 5), "min_s": round(float(t.min()), 5),
            "times_s": [round(x, 5) for x in times]}


def first_call(part: Part, fn: Callable[[], Any]) -> float:
    part.sync()
    start = time.perf_counter()
    fn()
    part.sync()
    return round(time.perf_counter() - start, 3)


def save_output(part: Part, name: str, latents: np.ndarray, image: np.ndarray) -> None:
    """Keep one seed's final latents and uint8 image; compare them with the references already kept."""
    folder = part.work / "compare"
    folder.mkdir(exist_ok=True)
    np.savez(folder / f"{name}.npz", latents=latents.astype(np.float32), image=image)
    for path in sorted(folder.glob("*.npz")):  # every pair once, when its later half is kept
        other = path.stem
        if other != name:
            ref = np.load(path)
            diff = np.abs(image.astype(int) - ref["image"].astype(int))
            rel = np.linalg.norm(latents - ref["latents"]) / max(np.linalg.norm(ref["latents"]), 1e-30)
            part.record("agreement", a=name, b=other, latents_rel_l2=float(rel), max_pixel_diff=int(diff.max()),
                        mean_pixel_diff=round(float(diff.mean()), 4),
                        pixels_over_8_levels=round(float((diff > 8).mean()), 5),
                        saturated_fraction=round(float(np.isin(image, (0, 255)).mean()), 4),
                        finite=bool(np.isfinite(latents).all()))


# --- ours ------------------------------------------------------------------------------------------------


def ours_outputs(part: Part, backend: Any) -> tuple[np.ndarray, np.ndarray]:
    """The final latents and image the pipeline makes for SEED (same noise as Pipeline(seed=SEED))."""
    from sdengine.pipeline import to_uint8
    from sdengine.samplers import build_schedule

    schedule = build_schedule(part.config.scheduler, "ddim", part.steps)
    context = backend.encode_text(backend.tokenizer([NEGATIVE, PROMPT]))
    final = backend.denoise(part.initial_latents(), context, schedule, GUIDANCE, None)
    return final.float().cpu().numpy()[0], to_uint8(backend.decode(final))[0]


def measure_ours(part: Part, name: str, backend: Any, runs: int, batch: int = 1, keep: bool = True) -> None:
    from sdengine.pipeline import Pipeline

    pipe = Pipeline(backend)

    def call() -> None:
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=part.steps, guidance_scale=GUIDANCE, seed=SEED,
             height=part.side, width=part.side, num_images_per_prompt=batch)

    graphs = getattr(backend.fast, "graphs", None)
    captured_before = 0.0 if graphs is None else graphs.capture_seconds
    part.reset_peak()
    first = first_call(part, call)
    stats = timed(part, call, runs)
    part.record("timing", variant=name, batch=batch, first_call_s=first, **stats,
                images_per_s=round(batch / stats["median_s"], 3), peak_gpu_mib=part.peak_mib(),
                config=ours_config(backend.options, part.dtype), graph_captures=None if graphs is None else graphs.captures,
                warmup_and_capture_s=None if graphs is None else round(graphs.capture_seconds - captured_before, 3))
    if keep and batch == 1 and part.left() > 3 * stats["median_s"] + 5:
        save_output(part, name, *ours_outputs(part, backend))
        stage_times(part, name, backend)


def stage_times(part: Part, name: str, backend: Any, reps: int = 3) -> None:
    """Median seconds of text encoding, the denoise loop and the VAE decode (each between syncs)."""
    from sdengine.samplers import build_schedule

    schedule, ids = build_schedule(part.config.scheduler, "ddim", part.steps), backend.tokenizer([NEGATIVE, PROMPT])
    init, spans = part.initial_latents(), {"encode_text_s": [], "denoise_s": [], "decode_s": []}
    for _ in range(reps):
        if part.left() < 10:
            break
        marks = [time.perf_counter()]
        context = backend.encode_text(ids)
        part.sync()
        marks.append(time.perf_counter())
        final = backend.denoise(init, context, schedule, GUIDANCE, None)
        part.sync()
        marks.append(time.perf_counter())
        backend.decode(final)  # ends with the copy to the host
        marks.append(time.perf_counter())
        for key, a, b in zip(spans, marks, marks[1:]):
            spans[key].append(b - a)
    if spans["decode_s"]:
        part.record("stages", variant=name, reps=len(spans["decode_s"]),
                    **{k: round(float(np.median(v)), 5) for k, v in spans.items()})


def load_ours(part: Part) -> Any:
    from sdengine.models.loading import load_components

    start = time.perf_counter()
    components = load_components(part.folder, device=part.device, dtype=part.dtype)
    part.record("load", what="ours", seconds=round(time.perf_counter() - start, 3))
    return components


def ours_config(options: Any, dtype: Any = "float16") -> dict:
    """Exactly what an ours row compiles and captures (FastOptions of sdengine.backends.torch_fast)."""
    compiled = options.compile_mode is not None
    return {"channels_last": options.channels_last, "dtype": str(dtype).replace("torch.", ""),
            "torch_compile": ({"targets": ["denoise step (U-Net + guidance + sampler update)", "VAE decoder"],
                               "mode": options.effective_mode, "backend": options.compile_backend, "dynamic": False}
                              if compiled else None),
            "cuda_graph": "whole 50-step loop, one graph per shape" if options.cuda_graph else None,
            "text_encoder": "eager"}


def fast_options(channels_last: bool = False, compile_mode: str | None = None, cuda_graph: bool = False,
                 compile_backend: str = "inductor") -> Any:
    from sdengine.backends.torch_fast import FastOptions

    return FastOptions(channels_last=channels_last, compile_mode=compile_mode, cuda_graph=cuda_graph,
                       compile_backend=compile_backend)


def compile_backend(part: Part) -> str:
    """Inductor on a GPU; on a CPU smoke run dynamo alone ('eager'), so the compiled rows' code runs in seconds."""
    return "inductor" if part.cuda else "eager"


def warm_compiled(part: Part, name: str, backend: Any) -> None:
    """First denoise (compile + warm-up + capture) and first decode (compile), timed apart."""
    from sdengine.samplers import build_schedule

    import torch._dynamo.utils as dynamo_utils

    schedule = build_schedule(part.config.scheduler, "ddim", part.steps)
    part.record("compile-start", variant=name, mode=backend.options.effective_mode)
    context = backend.encode_text(backend.tokenizer([NEGATIVE, PROMPT]))
    part.sync()
    start = time.perf_counter()
    final = backend.denoise(part.initial_latents(), context, schedule, GUIDANCE, None)
    part.sync()
    loop_s = time.perf_counter() - start
    backend.decode(final)
    decode_s = time.perf_counter() - start - loop_s
    breaks = sum(dynamo_utils.counters["graph_break"].values())
    part.record("compile", variant=name, mode=backend.options.effective_mode,
                step_compile_warmup_capture_s=round(loop_s, 3), decoder_compile_s=round(decode_s, 3),
                graph_breaks=breaks, unique_graphs=dynamo_utils.counters["stats"].get("unique_graphs"))


def sdpa_check(part: Part, components: Any) -> None:
    """Which fused attention kernels the U-Net and VAE can run (sdpa_kernel refuses what cannot run)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sdengine.models.step import DenoiseStep

    cfg, step, h, dev = part.config, DenoiseStep(components.unet), part.side // part.config.vae.downscale, part.device
    x = torch.randn(1, cfg.unet.in_channels, h, h, device=dev)
    ctx = torch.randn(2, 77, cfg.unet.cross_attention_dim, device=dev, dtype=part.dtype)
    t, scale, row = torch.tensor(501, device=dev), torch.tensor(GUIDANCE, device=dev), torch.ones(3, device=dev)
    checks = {"unet_flash_only": (step, [SDPBackend.FLASH_ATTENTION]),
              "unet_efficient_only": (step, [SDPBackend.EFFICIENT_ATTENTION]),
              "vae_efficient_only": (None, [SDPBackend.EFFICIENT_ATTENTION]),
              "vae_flash_only": (None, [SDPBackend.FLASH_ATTENTION])}
    found: dict[str, str] = {}
    with torch.inference_mode():
        for label, (module, kinds) in checks.items():
            try:
                with sdpa_kernel(kinds):
                    (module(x, t, ctx, scale, row) if module else components.vae.decode(x.to(part.dtype)))
                part.sync()
                found[label] = "ran"
            except RuntimeError as exc:
                found[label] = "refused: " + first_line(exc)
        try:
            found["default_attention_kernels"] = attention_kernels(lambda: step(x, t, ctx, scale, row))
        except Exception as exc:  # the profiler is a nicety: never lose the checks above to it
            found["default_attention_kernels"] = "profiler failed: " + first_line(exc)
    part.record("sdpa", upcast_attention=cfg.unet.upcast_attention, **found)


def attention_kernels(fn: Callable[[], Any]) -> list[str]:
    """Names of the CUDA attention kernels one call launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    names = {e.key for e in prof.key_averages() if any(k in e.key.lower() for k in ("flash", "fmha", "attention"))}
    return sorted(n[:120] for n in names)[:12]


# --- diffusers -------------------------------------------------------------------------------------------


def load_diffusers(part: Part) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(part.folder), torch_dtype=part.dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(part.device)
    keys = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample", "prediction_type", "beta_schedule")
    part.record("load", what="diffusers", seconds=round(time.perf_counter() - start, 3),
                scheduler=type(pipe.scheduler).__name__,
                scheduler_config={k: pipe.scheduler.config.get(k) for k in keys},
                attention_processor=sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}))
    return pipe


def diffusers_call(part: Part, pipe: Any, batch: int = 1, **extra: Any) -> Any:
    import torch

    latents = torch.from_numpy(part.initial_latents(batch)).to(part.device, part.dtype)
    return pipe([PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, num_inference_steps=part.steps,
                guidance_scale=GUIDANCE, eta=0.0, latents=latents, height=part.side, width=part.side, **extra)


def diffusers_outputs(part: Part, pipe: Any) -> tuple[np.ndarray, np.ndarray]:
    kept: dict[str, Any] = {}

    def grab(p: Any, i: int, t: Any, kwargs: dict) -> dict:
        kept["latents"] = kwargs["latents"]
        return kwargs

    out = diffusers_call(part, pipe, output_type="np", callback_on_step_end=grab,
                         callback_on_step_end_tensor_inputs=["latents"])
    image = (np.asarray(out.images[0]) * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil rounding
    return kept["latents"].float().cpu().numpy()[0], image


# diffusers' speed guide for text-to-image ("Accelerate inference of text-to-image diffusion models", and the
# torch.compile section of "Accelerate inference"): SDPA (the default), channels_last U-Net and VAE, fused QKV
# projections, these inductor settings, and torch.compile(fullgraph=True) of the U-Net and of vae.decode.
GUIDE_INDUCTOR = {"conv_1x1_as_mm": True, "epilogue_fusion": False}
GUIDE_LEFT_OUT = {
    "mode max-autotune": "its kernel autotuning takes minutes per model, past the device budget; reduce-overhead "
                         "(default kernels + CUDA graphs, the guide's own torch.compile example) instead",
    "coordinate_descent_tuning": "benchmarks every kernel's block sizes at compile: minutes more of compile time",
    "bfloat16": "both sides run the same fp16 weights (SD 1.5 is published and served in fp16)",
    "dynamic int8 quantization (torchao)": "torchao is not on the device, and it changes the numerics against ours",
}


def compile_diffusers(pipe: Any, fullgraph: bool = True, backend: str = "inductor") -> dict:
    """The best diffusers configuration its own speed guide gives, within the device budget; what was done and
    what was left out (and why) is returned for the record.

    U-Net and VAE channels_last (as ours-compiled), QKV projections fused where the pipeline offers it, the
    guide's inductor settings, and torch.compile of the U-Net and of vae.decode: mode reduce-overhead (inductor
    kernels replayed as CUDA graphs) on a GPU; on a CPU smoke run dynamo alone (`backend`, no CUDA graphs).
    The text encoder stays eager, as in the guide."""
    import torch

    fused = None
    if hasattr(pipe, "fuse_qkv_projections"):
        try:
            pipe.fuse_qkv_projections()
            fused = True
        except Exception as exc:  # the attention processors in use cannot be fused: say so
            fused = f"refused: {first_line(exc)}"
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    how: dict[str, Any] = {"fullgraph": fullgraph, "channels_last": ["unet", "vae"], "fused_qkv": fused,
                           "dtype": str(next(unet.parameters()).dtype).replace("torch.", ""),
                           "text_encoder": "eager"}
    if backend == "inductor":
        import torch._inductor.config as inductor_config

        for key, value in GUIDE_INDUCTOR.items():
            setattr(inductor_config, key, value)
        kwargs: dict[str, Any] = {"mode": "reduce-overhead", "fullgraph": fullgraph}
        how.update(inductor=dict(GUIDE_INDUCTOR), cuda_graphs="inductor's, per U-Net call and per vae.decode call")
    else:
        kwargs = {"backend": backend, "fullgraph": fullgraph}
        how.update(cuda_graphs=None)
    pipe.unet = torch.compile(unet, **kwargs)
    pipe.vae.decode = torch.compile(pipe.vae.decode, **kwargs)
    how.update(torch_compile={"targets": ["unet", "vae.decode"], **{k: v for k, v in kwargs.items()
                                                                     if k != "fullgraph"}},
               left_out=GUIDE_LEFT_OUT if fused is True else {**GUIDE_LEFT_OUT, "fused QKV": str(fused)})
    return how


def diffusers_eager_config(dtype: Any = "float16") -> dict:
    return {"channels_last": None, "torch_compile": None, "cuda_graphs": None, "fused_qkv": None,
            "dtype": str(dtype).replace("torch.", ""), "note": "the pipeline as loaded: NCHW, SDPA attention, no compile"}


def measure_diffusers(part: Part, name: str, pipe: Any, runs: int, batch: int = 1, keep: bool = True,
                      config: dict | None = None) -> None:
    part.reset_peak()
    first = first_call(part, lambda: diffusers_call(part, pipe, batch))
    stats = timed(part, lambda: diffusers_call(part, pipe, batch), runs)
    part.record("timing", variant=name, batch=batch, first_call_s=first, **stats,
                images_per_s=round(batch / stats["median_s"], 3), peak_gpu_mib=part.peak_mib(),
                config=diffusers_eager_config(part.dtype) if config is None else config)
    if keep and batch == 1 and part.left() > 3 * stats["median_s"] + 5:
        save_output(part, name, *diffusers_outputs(part, pipe))


def versions() -> dict:
    import torch
    import transformers

    import sdengine

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:  # the diffusers rows are skipped and say so; the rest still runs
        diffusers_version = None
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "diffusers": diffusers_version,
            "transformers": transformers.__version__, "numpy": np.__version__, "sdengine": sdengine.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info
