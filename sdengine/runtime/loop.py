"""The denoise loop over any Executor: fixed buffers, per-row coefficients, ping-pong states, one CUDA graph.

For one call of N rows (a sampler's table, sdengine.samplers): the initial state [S,B,C,h,w] (slot 0
the latent, the history slots zero), the timesteps [N,1], the coefficient rows [N,S(S+2)], the guidance
scale and, for a stochastic sampler, the noise [N,B,C,h,w] are uploaded once into buffers allocated
once per shape; the text embeddings are copied into a loop-owned [2B,77k,D] buffer (k prompt chunks) (B rows are
duplicated: guidance 1, as the ONNX Runtime backend does). Row i binds row i of each array, reads state
buffer i % 2 and writes the other, so the result of N rows is in buffer N % 2. Every address a row binds
therefore depends only on (shape, N, noise or not): the whole loop is captured once per such key as one
CUDA graph and replayed; later calls re-upload their data into the same buffers before the launch. Every
sampler runs this way: none needs the host between rows. An SDXL step graph's text_embeds [2B,P] and time_ids
[2B,6] are uploaded into loop-owned buffers per call (B rows twice at guidance 1) and bound once, with the text
embeddings: the captured graph reads them from the same addresses on every replay.

An executor whose graphs depend on its own state (`graphs_follow_shapes = True`: a TensorRT engine, whose one
execution context serves every shape; TensorRT documents replaying a graph after that context's shapes or
addresses changed as undefined) keeps one graph only: when a call binds another key, the graphs of earlier
keys are destroyed before the executor is rebound, and that key is captured again when it comes back.

The device is injected (`device`): sdengine.runtime.device.CudaDevice on a GPU; the tests run the same
loop over a host-memory stand-in. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import EngineMismatchError, InvalidInputError
from ..samplers.table import Schedule, fit_slots
from ..specs import ADDED_INPUTS, DEEP_FEATURE, DENOISE_STEP, DENOISE_STEP_FULL, DENOISE_STEP_SHALLOW, point_dims, \
    shapes
from ..stepcache import StepCache, cache_split
from .executor import Executor

StepCallback = Callable[[int, int], None]


class Graph(Protocol):
    def launch(self) -> None: ...


class Device(Protocol):
    """What the loop needs from a device: sdengine.runtime.device.CudaDevice, or a test stand-in."""

    handle: int

    def empty(self, shape: Sequence[int], dtype: Any = np.float32) -> Any: ...
    def upload(self, dst: Any, array: np.ndarray) -> None: ...
    def download(self, src: Any, rows: int | None = None) -> np.ndarray: ...
    def copy(self, dst: int, src: int, nbytes: int) -> None: ...
    def zero(self, buf: Any) -> None: ...
    def capture(self, enqueue: Callable[[], None]) -> Graph: ...
    def synchronize(self) -> None: ...


@dataclass(frozen=True)
class TextEmbeddings:
    """Text encoder output on the device: the first `rows` rows of `buffer` are valid."""

    buffer: Any
    rows: int


@dataclass(frozen=True)
class LatentView:
    """Slot 0 of a state buffer seen as latents [B,C,h,w]: an address, a shape and a dtype, no copy."""

    base: Any
    shape: tuple[int, ...]

    @property
    def ptr(self) -> int:
        return self.base.ptr

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class LoopKey:
    """What fixes every address of a loop, so one captured graph serves every call with the same key."""

    shape: tuple[int, ...]  # the state's [S,B,C,h,w]
    steps: int              # rows
    noise: bool
    context: int = 77       # the text embeddings' length: 77 x prompt chunks


@dataclass(frozen=True)
class Prepared:
    """A call's data uploaded into the key's buffers, ready to launch."""

    key: LoopKey
    latents: tuple[Any, Any]  # the two state buffers
    timesteps: Any
    coefficients: Any
    noise: Any            # [N,B,C,h,w] rows, or the zeros buffer (c = 0)
    context: Any
    scale: Any
    condition: tuple[Any, Any, Any]  # mask, known, known_noise (zeros for text to image)
    blend: Any            # [N,3] rows
    added: tuple[Any, ...] = ()  # SDXL: text_embeds [2B,P] and time_ids [2B,6], bound once per call


def bind_shapes(executor: Executor, values: Mapping[str, tuple[int, ...]]) -> None:
    """Set every input's shape and check the executor's output shapes agree with the spec's."""
    spec = executor.spec
    for name in spec.input_names:
        executor.set_input_shape(name, values[name])
    for name in spec.output_names:
        got = tuple(executor.output_shape(name))
        if got != values[name]:
            raise EngineMismatchError(f"the {spec.name} engine gives {name} shape {got} where {values[name]} was "
                                      f"expected: it was built from another export; rebuild it with sdengine build")


class DenoiseLoop:
    """N denoise steps over one step executor, eager or as one cached CUDA graph per LoopKey."""

    STEP = DENOISE_STEP  # the graph this loop runs

    def __init__(self, device: Device, step: Executor, config: ModelConfig, use_graph: bool = True,
                 slots: int | None = None) -> None:
        """`slots`: the step graph's fixed state size (an engine's), or None for a step that takes any."""
        if step.spec.name != self.STEP:
            raise InvalidInputError(f"the denoise loop runs the {self.STEP} graph, not {step.spec.name}")
        self.device, self.step, self.config, self.use_graph = device, step, config, use_graph
        self.slots = slots
        (self._state, self._timestep, self._text, self._scale, self._coefficients, self._noise,
         *self._condition, self._blend) = [n for n in step.spec.input_names if n not in ADDED_INPUTS]
        self._added = tuple(n for n in step.spec.input_names if n in ADDED_INPUTS)  # SDXL's step only
        self._next = step.spec.output_names[0]  # step caching's full step also writes the deep feature
        self._buffers: dict[tuple, Any] = {}
        self.graphs: dict[LoopKey, Graph] = {}
        self._bound: LoopKey | None = None  # the key the step's shapes and addresses were last bound for

    def buffer(self, role: str, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        """The buffer for `role` at `shape`, allocated on first use and kept (its address never changes)."""
        key = (role, tuple(shape), np.dtype(dtype).str)
        if key not in self._buffers:
            self._buffers[key] = self.device.empty(shape, dtype)
            if role == "zeros":
                self.device.zero(self._buffers[key])
        return self._buffers[key]

    def _shapes(self, state_shape: tuple[int, ...], context: int | None = None) -> dict[str, tuple[int, ...]]:
        slots, b, _, lh, lw = state_shape
        return shapes(self.step.spec, point_dims(self.config, b, lh, lw, slots=slots, context=context))

    def prepare(self, latents: np.ndarray, context: TextEmbeddings, schedule: Schedule, guidance_scale: float,
                noise: np.ndarray | None, condition: Any = None, added: Any = None) -> Prepared:
        """Upload one call's data into the buffers of its key (enqueued on the device's stream).

        `condition` (sdengine.backends.ImageCondition) for image-to-image and inpainting; its buffers are the
        same for text to image (zeroed), so one captured graph serves both. `added`
        (sdengine.backends.AddedConditioning): an SDXL step's text_embeds and time_ids, one row per text row.
        """
        if bool(self._added) != (added is not None):
            raise InvalidInputError("an SDXL step graph needs text_embeds and time_ids (AddedConditioning), and only "
                                    "an SDXL step graph takes them")
        x = np.ascontiguousarray(latents, dtype=np.float32)
        if self.slots is not None:
            schedule = fit_slots(schedule, self.slots, "rebuild the engines from an export with --state-slots "
                                                       "{slots} or more (the default, 4, runs every sampler)")
        n, b = schedule.num_rows, x.shape[0]
        state = np.zeros((schedule.slots, *x.shape), np.float32)
        state[0] = x
        length = int(context.buffer.shape[1])
        key = LoopKey(state.shape, n, noise is not None, length)
        shp = self._shapes(state.shape, length)
        dev = self.device
        bufs = (self.buffer("state_a", state.shape), self.buffer("state_b", state.shape))
        dev.upload(bufs[0], state)
        ts = self.buffer("timesteps", (n, *shp[self._timestep]))
        dev.upload(ts, schedule.timesteps.astype(np.float32).reshape(ts.shape))
        rows = self.buffer("coefficients", (n, *shp[self._coefficients]))
        dev.upload(rows, schedule.coefficients.astype(np.float32).reshape(rows.shape))
        if noise is None:
            steps_noise = self.buffer("zeros", x.shape)
        else:
            steps_noise = self.buffer("noise", (n, *x.shape))
            if np.shape(noise) != steps_noise.shape:
                raise InvalidInputError(f"noise has shape {list(np.shape(noise))}; {n} rows of latents "
                                        f"{list(x.shape)} need {list(steps_noise.shape)}")
            dev.upload(steps_noise, noise)
        scale = self.buffer("guidance_scale", shp[self._scale])
        dev.upload(scale, np.full(scale.shape, guidance_scale, np.float32))
        ctx = self.buffer("text_embeddings", shp[self._text])
        self._copy_context(ctx, context, b)
        cond = tuple(self.buffer(name, shp[name]) for name in self._condition)
        blend = self.buffer("blend", (n, *shp[self._blend]))
        if condition is None:
            for buf in (*cond, blend):
                dev.zero(buf)
        else:
            for buf, name in zip(cond, self._condition):
                dev.upload(buf, getattr(condition, name))
            dev.upload(blend, np.asarray(condition.blend, np.float32).reshape(blend.shape))
        extra = tuple(self._upload_added(name, getattr(added, name), shp[name], b) for name in self._added)
        return Prepared(key, bufs, ts, rows, steps_noise, ctx, scale, cond, blend, extra)

    def _upload_added(self, name: str, array: Any, shape: tuple[int, ...], batch: int) -> Any:
        """SDXL's [2B, n] text_embeds or time_ids into the loop's own buffer (B rows, guidance 1: twice, as the
        text embeddings are)."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 2 and array.shape[0] == batch:
            array = np.concatenate([array, array])
        if array.shape != tuple(shape):
            raise InvalidInputError(f"{name} has shape {list(array.shape)}; {batch} latents need {list(shape)} "
                                    f"(or {batch} rows)")
        buf = self.buffer(name, shape)
        self.device.upload(buf, array)
        return buf

    def _copy_context(self, dst: Any, context: TextEmbeddings, batch: int) -> None:
        """[2B,77k,D] into the loop's own buffer: 2B rows as given, or B rows twice (guidance 1)."""
        src = context.buffer
        if tuple(src.shape[1:]) != tuple(dst.shape[1:]) or src.dtype != dst.dtype:
            raise InvalidInputError(f"text embeddings {src.shape} do not fit this model's {dst.shape}")
        row = dst.nbytes // dst.shape[0]
        if context.rows == 2 * batch and src.shape[0] >= 2 * batch:
            self.device.copy(dst.ptr, src.ptr, 2 * batch * row)
        elif context.rows == batch and src.shape[0] >= batch:
            self.device.copy(dst.ptr, src.ptr, batch * row)
            self.device.copy(dst.ptr + batch * row, src.ptr, batch * row)
        else:
            raise InvalidInputError(f"{context.rows} text rows for {batch} latents: give B or 2B rows")

    def _executors(self) -> tuple[Executor, ...]:
        return (self.step,)

    def _bind(self, p: Prepared) -> None:
        """Bind the step's shapes for p's key and the addresses every row shares."""
        bind_shapes(self.step, self._shapes(p.key.shape, p.key.context))
        self._bound = p.key
        self._bind_fixed(p)

    def _bind_fixed(self, p: Prepared) -> None:
        """Bind the addresses every step shares: the text embeddings, the scale, the condition, SDXL's text_embeds
        and time_ids and (no noise) the zeros."""
        self.step.set_address(self._text, p.context.ptr)
        self.step.set_address(self._scale, p.scale.ptr)
        for name, buf in zip(self._condition, p.condition):
            self.step.set_address(name, buf.ptr)
        for name, buf in zip(self._added, p.added):
            self.step.set_address(name, buf.ptr)
        if not p.key.noise:
            self.step.set_address(self._noise, p.noise.ptr)

    def _enqueue_step(self, p: Prepared, i: int) -> None:
        """Bind step i's own addresses (latent i % 2 -> the other, row i of each array) and enqueue it."""
        s = self.step
        s.set_address(self._state, p.latents[i % 2].ptr)
        s.set_address(self._timestep, p.timesteps.row(i))
        s.set_address(self._coefficients, p.coefficients.row(i))
        if p.key.noise:
            s.set_address(self._noise, p.noise.row(i))
        s.set_address(self._blend, p.blend.row(i))
        s.set_address(self._next, p.latents[(i + 1) % 2].ptr)
        s.execute(self.device.handle)

    def launch(self, p: Prepared, callback: StepCallback | None = None, graph: bool | None = None) -> LatentView:
        """Enqueue the N rows (eagerly, or by launching the key's graph); a view of the final latents.

        The result is the loop's own state buffer's slot 0: valid until the next call with the same state
        shape. With the graph, `callback` is called once, with (N, N), after the launch is enqueued.
        """
        n = p.key.steps
        if p.key != self._bound and any(getattr(e, "graphs_follow_shapes", False) for e in self._executors()):
            self.drop_graphs()  # a graph captured under the context's old shapes must never replay
        self._bind(p)
        if self.use_graph if graph is None else graph:
            cached = self.graphs.get(p.key)
            if cached is None:
                self._warm_up(p)  # as TensorRT asks before a capture; leaves buffer 0 as is
                cached = self.graphs[p.key] = self.device.capture(lambda: self._enqueue_steps(p))
            cached.launch()
            if callback is not None:
                callback(n, n)
        else:
            self._enqueue_steps(p, callback)
        return LatentView(p.latents[n % 2], p.key.shape[1:])

    def _warm_up(self, p: Prepared) -> None:
        """Row 0 once: it reads buffer 0 and writes buffer 1, which the captured row 0 writes again."""
        self._enqueue_step(p, 0)

    def _enqueue_steps(self, p: Prepared, callback: StepCallback | None = None) -> None:
        for i in range(p.key.steps):
            self._enqueue_step(p, i)
            if callback is not None:
                callback(i + 1, p.key.steps)

    def run(self, latents: np.ndarray, context: TextEmbeddings, schedule: Schedule, guidance_scale: float,
            noise: np.ndarray | None, callback: StepCallback | None = None, condition: Any = None,
            added: Any = None) -> LatentView:
        """prepare + launch: every row of `schedule` from `latents`; a view of the final latents."""
        return self.launch(self.prepare(latents, context, schedule, guidance_scale, noise, condition, added),
                           callback)

    def drop_graphs(self) -> None:
        """Destroy the cached graphs, keeping the buffers: after the step's weights change in place (a TensorRT
        refit), since a captured graph may hold what the engine had set up when it was captured; the next
        launch captures again."""
        graphs, self.graphs = list(self.graphs.values()), {}
        for g in graphs:
            if hasattr(g, "destroy"):
                g.destroy()

    def close(self) -> None:
        """Destroy the cached graphs and free the loop's buffers (the executor is the caller's)."""
        buffers, self._buffers = list(self._buffers.values()), {}
        self.drop_graphs()
        for b in buffers:
            b.free()


class CachedDenoiseLoop(DenoiseLoop):
    """DenoiseLoop with step caching (sdengine.stepcache): row i runs the full step executor when cache.full(i),
    which also writes the deep feature into a loop-owned buffer, else the shallow one, which reads it. Every
    address still depends only on the LoopKey (the pattern of full rows is fixed by `cache`), so the whole
    alternating loop is captured as one CUDA graph like the plain one. Tested on the host-memory stand-in only."""

    STEP = DENOISE_STEP_FULL

    def __init__(self, device: Device, full: Executor, shallow: Executor, config: ModelConfig, cache: StepCache,
                 use_graph: bool = True, slots: int | None = None) -> None:
        super().__init__(device, full, config, use_graph, slots)
        if shallow.spec.name != DENOISE_STEP_SHALLOW:
            raise InvalidInputError(f"step caching's shallow step is the {DENOISE_STEP_SHALLOW} graph, not "
                                    f"{shallow.spec.name}")
        self.shallow, self.cache, self.split = shallow, cache, cache_split(config.unet, cache.branch)
        self._feature: Any = None

    def _executors(self) -> tuple[Executor, ...]:
        return (self.step, self.shallow)

    def _shapes(self, state_shape: tuple[int, ...], context: int | None = None,
                spec: Any = None) -> dict[str, tuple[int, ...]]:
        slots, b, _, lh, lw = state_shape
        dims = point_dims(self.config, b, lh, lw, slots=slots, context=context, branch=self.cache.branch)
        return shapes(spec or self.step.spec, dims)

    def _bind(self, p: Prepared) -> None:
        for executor in self._executors():
            bind_shapes(executor, self._shapes(p.key.shape, p.key.context, executor.spec))
        self._bound = p.key
        _, b, _, lh, lw = p.key.shape
        self._feature = self.buffer(DEEP_FEATURE, self.split.feature_shape(2 * b, lh, lw))
        plain = self.step
        try:
            for executor in self._executors():
                self.step = executor
                self._bind_fixed(p)
        finally:
            self.step = plain
        self.step.set_address(DEEP_FEATURE, self._feature.ptr)
        self.shallow.set_address(DEEP_FEATURE, self._feature.ptr)

    def _enqueue_step(self, p: Prepared, i: int, shallow: bool | None = None) -> None:
        """Row i on the full or (`shallow`, by default as the cache says) the shallow executor, with row i's
        own addresses."""
        if not ((not self.cache.full(i)) if shallow is None else shallow):
            super()._enqueue_step(p, i)
            return
        plain = self.step
        self.step = self.shallow
        try:
            super()._enqueue_step(p, i)
        finally:
            self.step = plain

    def _warm_up(self, p: Prepared) -> None:
        """Both executors once on row 0's addresses (the shallow one reads a feature not yet written: its output,
        buffer 1, is written again by the captured row 0)."""
        self._enqueue_step(p, 0, shallow=False)
        self._enqueue_step(p, 0, shallow=True)
