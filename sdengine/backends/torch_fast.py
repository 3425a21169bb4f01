"""The torch backend's fast path: channels_last, torch.compile, and the whole denoise loop as one CUDA graph.

Options are plain keyword arguments of TorchBackend.load, so `load_backend(path, "torch", **options)` passes
them through unchanged:

- channels_last: U-Net and VAE weights in channels_last (NHWC) memory format: cuDNN runs NHWC tensor-core
  convolutions, and the spatial transformers' [B,C,H,W] -> [B,HW,C] token reshape becomes a view.
- compile: torch.compile (dynamic=False) of the denoise step (U-Net + guidance + sampler update, so the
  update fuses into the U-Net's last kernels; GroupNorm+SiLU fuse too) and of the VAE decoder. True means
  mode "default"; or name a mode of COMPILE_MODES. Every new shape compiles again (a minute or more for
  SD 1.5 on a GPU): warm up the shapes you serve at start-up.
- cuda_graph (CUDA only): the whole N-step loop captured once per shape (batch, latent size, steps,
  guidance rows, noise or not) with torch.cuda.graph over static input buffers, and replayed per call
  after the new inputs are copied in: one launch per batch of images. Inductor's own CUDA graphs
  ("reduce-overhead", "max-autotune") would nest inside that capture, so with cuda_graph those modes run
  as their no-cudagraph twins. The step callback runs for every step after the replay (no mid-loop
  progress or cancellation).

Attention is F.scaled_dot_product_attention over [B, heads, N, d] views whose last dim is contiguous, so
with fp16 and no upcast (SD 1.x: head dims 40, 80, 160) CUDA can run the flash kernel; SD 2.x's upcast and
the VAE's fp32 attention take the memory-efficient kernel. benchmarks/gpu_fastpath.py checks both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import BackendUnavailableError, CudaError, InvalidInputError
from ..models.step import CachedStep, DenoiseStep
from ..stepcache import StepCache, cache_split
from . import StepCallback

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_NO_INNER_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
OPTION_NAMES = ("channels_last", "compile", "cuda_graph", "compile_backend")
MAX_GRAPHS = 4  # captured loops kept (least recently used dropped): each holds one step's activations
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "none", "")


def _flag(name: str, value: Any) -> bool:
    """A boolean option given as a bool or as text from a command line (true/false, 1/0, on/off)."""
    if isinstance(value, bool) or value is None or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidInputError(f"torch backend option {name} must be true or false, got {value!r}")


def _compile_mode(value: Any) -> str | None:
    """None (no compile), or the torch.compile mode named by `value` (True: 'default')."""
    if isinstance(value, str) and value.strip().lower() in COMPILE_MODES:
        return value.strip().lower()
    try:
        return "default" if _flag("compile", value) else None
    except InvalidInputError:
        raise InvalidInputError(f"torch backend option compile must be true, false or a torch.compile mode "
                                f"({', '.join(COMPILE_MODES)}), got {value!r}") from None


@dataclass(frozen=True)
class FastOptions:
    """What the fast path does; all off is the reference path."""

    channels_last: bool = False
    compile_mode: str | None = None
    cuda_graph: bool = False
    compile_backend: str = "inductor"

    @property
    def active(self) -> bool:
        return self.channels_last or self.compile_mode is not None or self.cuda_graph

    @property
    def effective_mode(self) -> str | None:
        """The mode torch.compile gets: no inductor CUDA graphs inside our own loop capture."""
        if self.cuda_graph and self.compile_mode in _NO_INNER_GRAPHS:
            return _NO_INNER_GRAPHS[self.compile_mode]
        return self.compile_mode


def parse_options(device: str, channels_last: Any = False, compile: Any = False, cuda_graph: Any = False,
                  compile_backend: Any = "inductor") -> FastOptions:
    """Validate the fast-path options for `device` (raises InvalidInputError saying what to change)."""
    if not isinstance(compile_backend, str) or not compile_backend.strip():
        raise InvalidInputError(f"torch backend option compile_backend must name a torch.compile backend "
                                f"(inductor, aot_eager, eager), got {compile_backend!r}")
    options = FastOptions(_flag("channels_last", channels_last), _compile_mode(compile),
                          _flag("cuda_graph", cuda_graph), compile_backend.strip())
    if options.cuda_graph and not str(device).startswith("cuda"):
        raise InvalidInputError(f"cuda_graph captures the denoise loop as a CUDA graph and needs device 'cuda' "
                                f"(got {device!r}); use --device cuda on an NVIDIA GPU, or drop cuda_graph")
    return options


class GraphStep(nn.Module):
    """The denoise step with its output in the standard layout, so every step sees the same strides."""

    def __init__(self, step: DenoiseStep) -> None:
        super().__init__()
        self.step = step

    def forward(self, state: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                guidance_scale: torch.Tensor, coefficients: torch.Tensor, noise: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, known: torch.Tensor | None = None,
                known_noise: torch.Tensor | None = None, blend: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.step(state, timestep, context, guidance_scale, coefficients, noise, mask, known, known_noise,
                         blend, text_embeds, time_ids).contiguous()


class CachedGraphStep(nn.Module):
    """GraphStep for step caching's full and shallow steps (models.step.CachedStep): outputs in the standard
    layout; the shallow step takes the deep feature as its last argument."""

    def __init__(self, step: CachedStep) -> None:
        super().__init__()
        self.step = step

    def forward(self, *args: torch.Tensor | None) -> Any:
        out = self.step(*args)
        return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()


class LatentDecoder(nn.Module):
    """Scaled latents -> float32 images in about [-1, 1] (the reference backend's decode, as one module)."""

    def __init__(self, vae: nn.Module, scaling_factor: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.vae, self.scaling_factor, self.dtype = vae, scaling_factor, dtype

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor
        return self.vae.decode(z.to(self.dtype)).float().contiguous()


@dataclass(frozen=True)
class LoopInputs:
    """Device tensors of one denoise call; a captured loop reads a static copy of them."""

    state: torch.Tensor  # [S,B,C,h,w] fp32: slot 0 the latent, the rest the sampler's history
    context: torch.Tensor  # [R,77,D], R = 2B with guidance
    timesteps: torch.Tensor  # [N] fp32 (fractional for sigma samplers)
    rows: torch.Tensor  # [N, S(S+2)] fp32 coefficient rows
    scale: torch.Tensor  # [] fp32 guidance scale
    noise: torch.Tensor | None = None  # [N,B,C,h,w] fp32 for stochastic samplers
    mask: torch.Tensor | None = None         # image-to-image and inpainting (backends.ImageCondition): [B,1,h,w]
    known: torch.Tensor | None = None        # [B,C,h,w]
    known_noise: torch.Tensor | None = None  # [B,C,h,w]
    blend: torch.Tensor | None = None        # [N,3] per-row (p, q, r)
    text_embeds: torch.Tensor | None = None  # SDXL: [R,P] pooled text, in the context's row order
    time_ids: torch.Tensor | None = None     # SDXL: [R,6] fp32 micro-conditioning

    def key(self) -> tuple:
        """What a captured loop is specialised to: shapes, dtypes, row count, noise or not, condition or not."""
        return (tuple(self.state.shape), tuple(self.context.shape), self.context.dtype,
                int(self.timesteps.shape[0]), self.noise is not None, self.mask is not None,
                self.text_embeds is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def cloned(self) -> "LoopInputs":
        return dataclasses.replace(self, **{name: t.clone() for name, t in self.tensors().items()})


def run_loop(step: Callable[..., torch.Tensor], inputs: LoopInputs,
             callback: StepCallback | None = None) -> torch.Tensor:
    """Every row of the schedule from inputs.state, each binding its own timestep, row and noise; the final
    state (its slot 0 is the latent)."""
    x, n = inputs.state, int(inputs.timesteps.shape[0])
    for i in range(n):
        x = step(x, inputs.timesteps[i], inputs.context, inputs.scale, inputs.rows[i],
                 None if inputs.noise is None else inputs.noise[i], inputs.mask, inputs.known, inputs.known_noise,
                 None if inputs.blend is None else inputs.blend[i], inputs.text_embeds, inputs.time_ids)
        if callback is not None:
            callback(i + 1, n)
    return x


def run_cached_loop(full: Callable[..., tuple[torch.Tensor, torch.Tensor]], shallow: Callable[..., torch.Tensor],
                    inputs: LoopInputs, cache: StepCache, callback: StepCallback | None = None) -> torch.Tensor:
    """run_loop with step caching (sdengine.stepcache): row i runs `full` (which also returns the deep feature)
    when cache.full(i), else `shallow` with the feature of the last full row."""
    x, n, feature = inputs.state, int(inputs.timesteps.shape[0]), None
    for i in range(n):
        args = (x, inputs.timesteps[i], inputs.context, inputs.scale, inputs.rows[i],
                None if inputs.noise is None else inputs.noise[i], inputs.mask, inputs.known, inputs.known_noise,
                None if inputs.blend is None else inputs.blend[i], inputs.text_embeds, inputs.time_ids)
        if cache.full(i):
            x, feature = full(*args)
        else:
            x = shallow(*args, feature)
        if callback is not None:
            callback(i + 1, n)
    return x


Replay = Callable[[], None]
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Replay, torch.Tensor, Callable[[], None]]]


def cuda_capture(fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor, Callable[[], None]]:
    """Warm `fn` up on a side stream, capture it as a CUDA graph: (replay, its output buffer, release)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, cuBLAS/cuDNN handles and workspaces before capture (torch docs)
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except RuntimeError as exc:
        raise CudaError(f"torch.cuda.graph capture of the denoise loop failed ({exc}); "
                        f"load the torch backend without cuda_graph") from exc

    def release() -> None:
        torch.cuda.synchronize()  # no replay may still be writing the pool that is handed back
        graph.reset()

    return graph.replay, out, release


@dataclass
class _Captured:
    static: LoopInputs
    replay: Replay
    out: torch.Tensor
    release: Callable[[], None]


class LoopGraphs:
    """Captured denoise loops keyed by LoopInputs.key(); least recently used released past `capacity`."""

    def __init__(self, step: Callable[..., torch.Tensor], capture: Capture = cuda_capture,
                 capacity: int = MAX_GRAPHS, loop: Callable[[LoopInputs], torch.Tensor] | None = None) -> None:
        """`loop` runs the whole loop over static inputs (default: run_loop over `step`)."""
        self.step, self._capture, self.capacity = step, capture, capacity
        self._loop = loop or (lambda static: run_loop(self.step, static))
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._lock = threading.Lock()
        self.captures = 0
        self.capture_seconds = 0.0

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, inputs: LoopInputs) -> torch.Tensor:
        """Copy `inputs` into the static buffers of their shape's graph (captured on first use), replay it."""
        with self._lock:
            entry = self._entry(inputs)
            static = entry.static.tensors()
            for name, tensor in inputs.tensors().items():
                static[name].copy_(tensor)
            entry.replay()
            return entry.out.clone()  # the graph overwrites `out` on its next replay

    def _entry(self, inputs: LoopInputs) -> _Captured:
        key = inputs.key()
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        while len(self._graphs) >= self.capacity:
            self._graphs.popitem(last=False)[1].release()
        static = inputs.cloned()
        start = time.perf_counter()
        replay, out, release = self._capture(lambda: self._loop(static))
        self.capture_seconds += time.perf_counter() - start
        self.captures += 1
        self._graphs[key] = _Captured(static, replay, out, release)
        return self._graphs[key]

    def close(self) -> None:
        """Release every captured graph and its memory pool."""
        with self._lock:
            while self._graphs:
                self._graphs.popitem(last=False)[1].release()


def _compile_errors() -> tuple[type[BaseException], ...]:
    import torch._dynamo.exc as dynamo_exc

    kinds = [dynamo_exc.BackendCompilerFailed]
    try:
        from torch._inductor.exc import InductorError

        kinds.append(InductorError)
    except ImportError:
        pass
    return tuple(kinds)


class FastPath:
    """The denoise loop and VAE decode under FastOptions (modules already on their device and dtype)."""

    def __init__(self, unet: nn.Module, vae: nn.Module, scaling_factor: float, dtype: torch.dtype,
                 options: FastOptions) -> None:
        self.options = options
        if options.channels_last:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
        self.step = self._compiled(GraphStep(DenoiseStep(unet)))
        self.decoder = self._compiled(LatentDecoder(vae, scaling_factor, dtype))
        self.graphs = LoopGraphs(self.step) if options.cuda_graph else None
        self.unet = unet
        self._cached: dict[StepCache, tuple[Any, Any, LoopGraphs | None]] = {}  # step caching's steps and graphs

    def _compiled(self, module: nn.Module) -> Callable[..., torch.Tensor]:
        o = self.options
        if o.compile_mode is None:
            return module
        if o.compile_backend == "inductor":
            return torch.compile(module, mode=o.effective_mode, dynamic=False)
        return torch.compile(module, backend=o.compile_backend, dynamic=False)

    def denoise(self, inputs: LoopInputs, callback: StepCallback | None = None) -> torch.Tensor:
        """The final latents: one graph replay with cuda_graph, else the step loop."""
        with _compile_guard(self.options):
            if self.graphs is None:
                return run_loop(self.step, inputs, callback)
            out = self.graphs.run(inputs)
        if callback is not None:
            n = int(inputs.timesteps.shape[0])
            for i in range(n):
                callback(i + 1, n)
        return out

    def denoise_cached(self, inputs: LoopInputs, cache: StepCache,
                       callback: StepCallback | None = None) -> torch.Tensor:
        """denoise with step caching: the full and shallow steps compiled like the plain one, and with
        cuda_graph the whole alternating loop captured once per shape and StepCache (unverified on a GPU)."""
        if cache not in self._cached:
            split = cache_split(self.unet.cfg, cache.branch)
            full = self._compiled(CachedGraphStep(CachedStep(self.unet, split, shallow=False)))
            shallow = self._compiled(CachedGraphStep(CachedStep(self.unet, split, shallow=True)))
            graphs = None if not self.options.cuda_graph else LoopGraphs(
                full, loop=lambda static: run_cached_loop(full, shallow, static, cache))
            self._cached[cache] = (full, shallow, graphs)
        full, shallow, graphs = self._cached[cache]
        with _compile_guard(self.options):
            if graphs is None:
                return run_cached_loop(full, shallow, inputs, cache, callback)
            out = graphs.run(inputs)
        if callback is not None:
            n = int(inputs.timesteps.shape[0])
            for i in range(n):
                callback(i + 1, n)
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with _compile_guard(self.options):
            return self.decoder(latents)

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.close()
        for _, _, graphs in self._cached.values():
            if graphs is not None:
                graphs.close()


@contextlib.contextmanager
def _compile_guard(options: FastOptions) -> Iterator[None]:
    """Turn a torch.compile failure into BackendUnavailableError saying what to install or drop."""
    try:
        yield
    except Exception as exc:
        if options.compile_mode is None or not isinstance(exc, _compile_errors()):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailableError(
            f"torch.compile (backend {options.compile_backend}, mode {options.effective_mode}) failed: {first}. "
            f"Inductor needs a C++ compiler on the CPU and Triton on CUDA; install them or load without compile"
        ) from exc
