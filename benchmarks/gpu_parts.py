"""The parts of benchmarks/gpu_check.py (see its docstring). numpy at import; torch and CUDA inside the parts.

Every part returns a JSON-ready dict with `ok` (or `skipped`) and a one-line `summary`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
# (images, steps, guidance, eta, height, width): odd and even step counts, noise, guidance 1 (B text rows)
TINY_CASES = ((1, 7, 7.5, 0.0, 64, 64), (2, 8, 7.5, 1.0, 64, 80), (1, 5, 1.0, 0.0, 72, 64))
MAX_PIXEL_DIFF, MAX_MEAN_PIXEL_DIFF = 16, 2.0   # fp16 arithmetic vs fp32 over a whole loop, out of 255
GRAPH_TOLERANCE = 1e-5                           # replayed graph vs uncaptured loop, relative (0 expected)
MIB = 1 << 20


def compare(got: Any, ref: Any) -> dict[str, Any]:
    """Bit-identical (NaN where the other has NaN counts as equal)?, max |difference|, relative L2, finite?"""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return {"identical": bool(np.array_equal(got, ref, equal_nan=True)), "max_abs": float(np.abs(got - ref).max()),
            "rel_l2": float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-30)),
            "finite": bool(np.isfinite(got).all())}


def within_graph_tolerance(c: dict[str, Any], ref: Any) -> bool:
    return c["identical"] or c["max_abs"] <= GRAPH_TOLERANCE * max(1.0, float(np.abs(ref).max()))


def image_diff(got: Any, ref: Any) -> dict[str, Any]:
    """uint8 pixel differences (max, mean, out of 255) and PSNR of float images in [-1, 1]."""
    from sdengine.pipeline import to_uint8

    d = np.abs(to_uint8(got).astype(np.int16) - to_uint8(ref).astype(np.int16))
    a, b = (np.clip(np.asarray(x, np.float64) / 2 + 0.5, 0, 1) for x in (got, ref))
    mse = float(np.mean((a - b) ** 2))
    return {"max_255": int(d.max()), "mean_255": float(d.mean()), "ref_std_255": float(to_uint8(ref).std()),
            "psnr_db": 200.0 if mse == 0 else 10 * math.log10(1 / mse) if math.isfinite(mse) else None}


def image_ok(d: dict[str, Any]) -> bool:
    return d["max_255"] <= MAX_PIXEL_DIFF and d["mean_255"] < MAX_MEAN_PIXEL_DIFF


def timed(device: Any, fn: Callable[[], Any]) -> dict[str, float]:
    """GPU time (CUDA events on the device's stream) and host time of `fn`'s work, waited for."""
    from sdengine.runtime.cuda import Event

    start, end = Event(), Event()
    try:
        start.record(device.stream)
        t0 = time.perf_counter()
        fn()
        end.record(device.stream)
        end.synchronize()
        return {"gpu_ms": start.elapsed_ms(end), "host_ms": (time.perf_counter() - t0) * 1e3}
    finally:
        start.destroy()
        end.destroy()


def eager_step_ms(loop: Any, device: Any, prepared: Any) -> tuple[list[float], Any]:
    """Per-step GPU times of an uncaptured loop (an event after each step), and the result buffer."""
    from sdengine.runtime.cuda import Event

    events = [Event() for _ in range(prepared.key.steps + 1)]
    try:
        events[0].record(device.stream)
        out = loop.launch(prepared, lambda i, _: events[i].record(device.stream), graph=False)
        events[-1].synchronize()
        return [events[i].elapsed_ms(events[i + 1]) for i in range(len(events) - 1)], out
    finally:
        for e in events:
            e.destroy()


class NoiseRowStep:
    """A torch-free Executor of the denoise-step spec: slot 0 of next_state = this row's noise (one device copy)."""

    def __init__(self) -> None:
        from sdengine.specs import DENOISE_STEP, GRAPHS

        self.spec = GRAPHS[DENOISE_STEP]
        self.latent, self.noise, (self.out,) = "state", "noise", self.spec.output_names
        self.shape: tuple[int, ...] = ()
        self.ptrs: dict[str, int] = {}
        self.calls, self.fail_at = 0, None

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if name == self.latent:
            self.shape = tuple(shape)

    def output_shape(self, name: str) -> tuple[int, ...]:
        return self.shape

    def set_address(self, name: str, ptr: int) -> None:
        self.ptrs[name] = ptr

    def execute(self, stream: int) -> None:
        from sdengine.runtime import cuda

        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("planned failure inside the capture")
        rt = cuda.import_cudart()
        cuda.check(rt.cudaMemcpyAsync(self.ptrs[self.out], self.ptrs[self.noise], int(np.prod(self.shape[1:])) * 4,
                                      rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync")

    def close(self) -> None:
        pass


# --- buffers: the CUDA layer alone ------------------------------------------------------------------------------

def _copies(device: Any, rng: np.random.Generator) -> dict[str, Any]:
    from sdengine.errors import CudaError
    from sdengine.runtime import cuda

    n = 16 * MIB  # floats: 64 MiB buffers
    data = rng.standard_normal(n, dtype=np.float32)
    a, b = device.empty((n,)), device.empty((4, n // 4))
    device.upload(a, data)
    r = {"upload_download": bool(np.array_equal(device.download(a), data))}
    stage = device.memory.pinned((n,), np.float32)  # the copy alone: pinned host -> device, 64 MiB
    stage.array[:] = data
    up = timed(device, lambda: cuda.copy_async(a.ptr, stage.ptr, a.nbytes, "HostToDevice", device.stream))
    r["pinned_h2d_gib_s"] = a.nbytes / 2**30 / (up["gpu_ms"] / 1e3)
    stage.free()
    device.copy(b.ptr, a.ptr, a.nbytes)
    r["device_copy"] = bool(np.array_equal(device.download(b).ravel(), data))
    r["row_address"] = b.row(2) == b.ptr + 2 * (n // 4) * 4 and bool(np.array_equal(device.download(b)[2],
                                                                                     data[n // 2:3 * n // 4]))
    device.zero(b)
    r["memset"] = not device.download(b).any()
    pinned = device.memory.pinned((1024,), np.float32)
    pinned.array[:] = np.arange(1024, dtype=np.float32)
    cuda.copy_async(a.ptr, pinned.ptr, pinned.nbytes, "HostToDevice", device.stream)
    r["pinned_copy"] = bool(np.array_equal(device.download(a, rows=1024), np.arange(1024, dtype=np.float32)))
    live = device.memory.live
    try:
        device.empty((1 << 46,), np.uint8)  # 64 TiB: must fail
        r["oom_error"] = None
    except CudaError as exc:
        r["oom_error"] = str(exc)
    r["oom_leaves_no_buffer"] = device.memory.live == live
    r["ok"] = all(r[k] for k in ("upload_download", "device_copy", "row_address", "memset", "pinned_copy",
                                 "oom_error", "oom_leaves_no_buffer"))
    return r


def _graph_replay(device: Any, rng: np.random.Generator) -> dict[str, Any]:
    a, b = device.empty((MIB,)), device.empty((MIB,))
    x1, x2 = rng.standard_normal(MIB, dtype=np.float32), rng.standard_normal(MIB, dtype=np.float32)
    device.upload(a, x1)
    graph = device.capture(lambda: device.copy(b.ptr, a.ptr, a.nbytes))
    device.zero(b)
    graph.launch()
    r = {"replay": bool(np.array_equal(device.download(b), x1))}
    device.upload(a, x2)
    graph.launch()
    r["replay_reads_new_data"] = bool(np.array_equal(device.download(b), x2))
    r["ten_launches_ms"] = timed(device, lambda: [graph.launch() for _ in range(10)])["gpu_ms"]

    def failing() -> None:
        device.zero(b)
        raise RuntimeError("planned failure inside the capture")

    try:
        device.capture(failing)
        r["failed_capture_raised"] = False
    except RuntimeError:
        r["failed_capture_raised"] = True
    r["stream_left_capturing"] = device.stream.is_capturing()
    r["ok"] = r["replay"] and r["replay_reads_new_data"] and r["failed_capture_raised"] and not r["stream_left_capturing"]
    return r


def _loop_checks(device: Any, rng: np.random.Generator) -> dict[str, Any]:
    """The loop over a torch-free step: step i writes noise row i, so the result must be the last row."""
    from sdengine.config import ModelConfig
    from sdengine.errors import InvalidInputError
    from sdengine.runtime.loop import DenoiseLoop, TextEmbeddings
    from sdengine.samplers import build_schedule

    def ddim_schedule(cfg: Any, n: int, eta: float = 0.0) -> Any:
        return build_schedule(cfg, "ddim", n, eta)

    cfg, step = ModelConfig.sd15(), NoiseRowStep()
    loop, r = DenoiseLoop(device, step, cfg), {}
    x = rng.standard_normal((1, 4, 16, 16), dtype=np.float32)
    emb = TextEmbeddings(device.empty((2, 77, 768)), 2)
    device.zero(emb.buffer)
    dl = device.download
    try:
        for n in (5, 6):
            s = ddim_schedule(cfg.scheduler, n, eta=1.0)
            z1, z2 = (rng.standard_normal((n, *x.shape), dtype=np.float32) for _ in range(2))
            eager = dl(loop.launch(loop.prepare(x, emb, s, 7.5, z1), graph=False))
            graph = dl(loop.launch(loop.prepare(x, emb, s, 7.5, z1), graph=True))
            replay = dl(loop.launch(loop.prepare(x, emb, s, 7.5, z2), graph=True))
            r[f"steps_{n}"] = all(np.array_equal(a, b) for a, b in ((eager, z1[-1]), (graph, z1[-1]), (replay, z2[-1])))
        r["no_noise_gives_zeros"] = not dl(loop.run(x, emb, ddim_schedule(cfg.scheduler, 3), 7.5, None)).any()
        s4 = ddim_schedule(cfg.scheduler, 4, eta=1.0)
        step.fail_at = step.calls + 3  # warm-up step, then the second step of the capture
        try:
            loop.run(x, emb, s4, 7.5, rng.standard_normal((4, *x.shape), dtype=np.float32))
            r["failed_capture_raised"] = False
        except RuntimeError:
            r["failed_capture_raised"] = True
        r["failed_capture_cleaned"] = not device.stream.is_capturing() and not any(k.steps == 4 for k in loop.graphs)
        step.fail_at = None
        try:
            loop.run(x, emb, s4, 7.5, np.zeros((3, *x.shape), np.float32))
            r["bad_noise_error"] = None
        except InvalidInputError as exc:
            r["bad_noise_error"] = str(exc)
    finally:
        loop.close()
    r["ok"] = all(bool(v) for v in r.values())
    return r


def _buffer_checks(device: Any, rng: np.random.Generator) -> dict[str, Any]:
    return {"copies": _copies(device, rng), "graph": _graph_replay(device, rng), "loop": _loop_checks(device, rng)}


def part_buffers(args: Any) -> dict[str, Any]:
    from sdengine.runtime import cuda
    from sdengine.runtime.device import CudaDevice

    rng = np.random.default_rng(0)
    with CudaDevice() as warm:  # a first round: what the driver sets up once (modules, graph support) is no leak
        _buffer_checks(warm, rng)
    free_before = cuda.memory_info()[0]
    device = CudaDevice()
    try:
        r = _buffer_checks(device, rng)
        r["allocations"] = {"allocated": device.memory.allocated, "freed_before_close": device.memory.freed,
                            "live_before_close": device.memory.live}
    finally:
        device.close()
    r["allocations"]["live_after_close"] = live = device.memory.live
    r["leaked_bytes"] = free_before - cuda.memory_info()[0]
    r["ok"] = all(r[k]["ok"] for k in ("copies", "graph", "loop")) and live == 0 and r["leaked_bytes"] < 2 * MIB
    r["summary"] = (f"copies/pinned/memset/graph replay/loop rows {'pass' if r['ok'] else 'see buffers.json'}; "
                    f"pinned H2D {r['copies']['pinned_h2d_gib_s']:.1f} GiB/s; {r['allocations']['allocated']} "
                    f"allocations, {live} live after close; cudaMemGetInfo difference {r['leaked_bytes']} bytes")
    return r
