"""A host-memory stand-in for cuda-python's runtime module, and numpy executors that read and write by address.

Device memory is host memory; a stream runs work at once unless it is capturing, and a capture records
the work for a graph to replay. Executors enqueue through the same runtime, so captures record them too.
Used by tests/test_cuda_runtime.py and tests/test_gpu_check.py (monkeypatched in as sdengine.runtime.cuda._RT).
"""

from __future__ import annotations

import ctypes
import itertools
from types import SimpleNamespace

import numpy as np

from sdengine.config import ModelConfig
from sdengine.errors import InvalidInputError
from sdengine.specs import DENOISE_STEP, GRAPHS, TEXT_ENCODER, VAE_DECODER, VAE_ENCODER

from cuda.bindings import runtime as real_rt  # callers importorskip cuda-python first

OK = real_rt.cudaError_t.cudaSuccess
CONFIG = ModelConfig.tiny()


class FakeRuntime:
    """The part of cuda.bindings.runtime the runtime calls, over host memory; counts what is live."""

    def __init__(self, fail_malloc_at: int | None = None, invalidate_capture: bool = False) -> None:
        for name in ("cudaError_t", "cudaStreamCaptureMode", "cudaStreamCaptureStatus", "cudaMemcpyKind",
                     "cudaGetErrorName", "cudaGetErrorString", "cudaGraphInstantiateFlags"):
            setattr(self, name, getattr(real_rt, name))
        self.cudaStreamNonBlocking, self.cudaEventDefault, self.cudaEventDisableTiming = 1, 0, 2
        self.mem: dict[int, object] = {}
        self.host: dict[int, object] = {}
        self.streams, self.events, self.graphs, self.execs = set(), set(), {}, {}
        self.capturing: dict[int, list] = {}
        self.capture_modes: list = []        # the mode of every cudaStreamBeginCapture, in order
        self.instantiate_flags: list = []    # the flags of every cudaGraphInstantiateWithFlags
        self.last_error_reads = 0
        self.thread_mode = real_rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        self.mallocs, self.fail_malloc_at, self.invalidate = 0, fail_malloc_at, invalidate_capture
        self._ids = itertools.count(1000)

    def live(self) -> dict[str, int]:
        return {"device": len(self.mem), "pinned": len(self.host), "streams": len(self.streams),
                "events": len(self.events), "graphs": len(self.graphs), "execs": len(self.execs)}

    def enqueue(self, stream: int, op) -> tuple:
        """Run `op` now, or record it when `stream` is capturing."""
        if stream in self.capturing:
            self.capturing[stream].append(op)
        else:
            op()
        return (OK,)

    def _alloc(self, table: dict, n: int) -> tuple:
        buf = (ctypes.c_uint8 * n)()
        table[ctypes.addressof(buf)] = buf
        return OK, ctypes.addressof(buf)

    def cudaGetDeviceCount(self):
        return OK, 1

    def cudaGetDeviceProperties(self, i):
        return OK, SimpleNamespace(name=b"Fake GPU\x00\x00", major=9, minor=0, totalGlobalMem=80 << 30)

    def cudaSetDevice(self, i):
        return (OK,)

    def cudaMemGetInfo(self):
        return OK, (80 << 30) - sum(len(b) for b in self.mem.values()), 80 << 30

    def cudaMalloc(self, n):
        self.mallocs += 1
        if self.mallocs == self.fail_malloc_at or n > 1 << 36:
            return real_rt.cudaError_t.cudaErrorMemoryAllocation, None
        return self._alloc(self.mem, n)

    def cudaFree(self, p):
        return (OK,) if self.mem.pop(p, None) is not None else (real_rt.cudaError_t.cudaErrorInvalidValue,)

    def cudaMallocHost(self, n):
        return self._alloc(self.host, n)

    def cudaFreeHost(self, p):
        return (OK,) if self.host.pop(p, None) is not None else (real_rt.cudaError_t.cudaErrorInvalidValue,)

    def cudaStreamCreateWithFlags(self, flags):
        s = next(self._ids)
        self.streams.add(s)
        return OK, s

    def cudaStreamDestroy(self, s):
        self.streams.discard(s)
        return (OK,)

    def cudaStreamSynchronize(self, s):
        return (real_rt.cudaError_t.cudaErrorStreamCaptureUnsupported,) if s in self.capturing else (OK,)

    def cudaStreamIsCapturing(self, s):
        status = self.cudaStreamCaptureStatus
        return OK, status.cudaStreamCaptureStatusActive if s in self.capturing else status.cudaStreamCaptureStatusNone

    def cudaEventCreateWithFlags(self, flags):
        e = next(self._ids)
        self.events.add(e)
        return OK, e

    def cudaEventRecord(self, e, s):
        return (OK,)

    def cudaEventSynchronize(self, e):
        return (OK,)

    def cudaEventElapsedTime(self, a, b):
        return OK, 1.5

    def cudaEventDestroy(self, e):
        self.events.discard(e)
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, n, kind, s):
        return self.enqueue(s, lambda: ctypes.memmove(dst, src, n))

    def cudaMemsetAsync(self, p, value, n, s):
        return self.enqueue(s, lambda: ctypes.memset(p, value, n))

    def cudaThreadExchangeStreamCaptureMode(self, mode):
        old, self.thread_mode = self.thread_mode, mode
        return OK, old

    def cudaStreamBeginCapture(self, s, mode):
        modes = self.cudaStreamCaptureMode
        assert mode in (modes.cudaStreamCaptureModeThreadLocal, modes.cudaStreamCaptureModeRelaxed)
        self.capturing[s] = []
        self.capture_modes.append(mode)
        return (OK,)

    def cudaGetLastError(self):
        self.last_error_reads += 1
        return (OK,)

    def cudaStreamEndCapture(self, s):
        ops = self.capturing.pop(s)
        # invalidate: True fails every capture; a set of mode names ({"ThreadLocal"}) fails those modes only,
        # as a forbidden call (a sync, a plain cudaMalloc) does in thread-local mode and not in relaxed mode
        mode = self.capture_modes[-1].name.replace("cudaStreamCaptureMode", "")
        if self.invalidate is True or (isinstance(self.invalidate, (set, frozenset)) and mode in self.invalidate):
            return real_rt.cudaError_t.cudaErrorStreamCaptureInvalidated, None
        g = next(self._ids)
        self.graphs[g] = ops
        return OK, g

    def cudaGraphInstantiateWithFlags(self, g, flags):
        assert isinstance(flags, int), "cuda-bindings takes the flags as an unsigned long long"
        self.instantiate_flags.append(flags)
        e = next(self._ids)
        self.execs[e] = list(self.graphs[g])
        return OK, e

    def cudaGraphDestroy(self, g):
        self.graphs.pop(g, None)
        return (OK,)

    def cudaGraphLaunch(self, e, s):
        for op in self.execs[e]:
            self.enqueue(s, op)
        return (OK,)

    def cudaGraphExecDestroy(self, e):
        self.execs.pop(e, None)
        return (OK,)


def _view(ptr: int, shape, dtype=np.float32) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_uint8 * n).from_address(ptr), np.uint8).view(dtype).reshape(shape)


def model_output(x2: np.ndarray, t: float, ctx: np.ndarray) -> np.ndarray:
    """A stand-in U-Net: depends on the latent, the timestep and each row's text embedding."""
    return np.tanh(0.5 * x2 + t / 1000.0) + ctx.mean(axis=(1, 2))[:, None, None, None]


def text_encoder(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden = (ids[:, :, None] % 97).astype(np.float32) / 97 + np.arange(CONFIG.text_encoder.hidden_size) / 100
    return hidden.astype(np.float32), hidden[:, -1].astype(np.float32)


def vae_decoder(latent: np.ndarray) -> np.ndarray:
    f = CONFIG.vae.downscale
    return np.tanh(latent[:, :3]).repeat(f, axis=2).repeat(f, axis=3).astype(np.float32)


def guided_output(x: np.ndarray, t: float, ctx2: np.ndarray, g: float) -> np.ndarray:
    """m = m_u + g (m_c - m_u) of the stand-in U-Net over 2B text rows (unconditional first)."""
    mu, mc = np.split(model_output(np.concatenate([x, x]), t, ctx2), 2)
    return (mu + np.float32(g) * (mc - mu)).astype(np.float32)


def state_update(state: np.ndarray, m: np.ndarray, row: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A state + b m + c z over S slots, written out with numpy (the graphs' arithmetic)."""
    s = state.shape[0]
    a, b, c = row[: s * s].reshape(s, s), row[s * s: s * s + s], row[s * s + s:]
    out = np.einsum("ij,j...->i...", a, state) + b.reshape(-1, 1, 1, 1, 1) * m + c.reshape(-1, 1, 1, 1, 1) * z
    return out.astype(np.float32)


def blend_known(state: np.ndarray, mask, known, known_noise, blend) -> np.ndarray:
    """Slot 0 += (1 - mask) (p known + q known_noise - r slot 0): the inpainting blend, with numpy."""
    p, q, r = (np.float32(x) for x in blend)
    out = state.copy()
    out[0] = state[0] + (1 - mask) * (p * known + q * known_noise - r * state[0])
    return out.astype(np.float32)


def _step(v: dict) -> dict:
    state = v["state"]
    m = guided_output(state[0], float(v["timestep"][0]), v["text_embeddings"], v["guidance_scale"][0])
    nxt = state_update(state, m, v["coefficients"], v["noise"])
    return {"next_state": blend_known(nxt, v["mask"], v["known"], v["known_noise"], v["blend"])}


def vae_encoder(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in encoder: the image averaged over f x f cells, its 3 channels and their mean, std 0.1."""
    f = CONFIG.vae.downscale
    b, _, h, w = image.shape
    cells = image.reshape(b, 3, h // f, f, w // f, f).mean(axis=(3, 5))
    mean = np.concatenate([cells, cells.mean(axis=1, keepdims=True)], axis=1).astype(np.float32)
    return mean, np.full_like(mean, 0.1)


FUNCTIONS = {DENOISE_STEP: _step, VAE_DECODER: lambda v: {"image": vae_decoder(v["latent"])},
             VAE_ENCODER: lambda v: dict(zip(("latent_mean", "latent_std"), vae_encoder(v["image"]))),
             TEXT_ENCODER: lambda v: dict(zip(("last_hidden_state", "pooled_output"), text_encoder(v["input_ids"])))}


class NumpyExecutor:
    """An Executor reading and writing by address; it enqueues on the fake runtime (so captures record it)."""

    def __init__(self, name: str, rt: FakeRuntime, profile_batch: int | None = None) -> None:
        self.spec, self.rt, self.fn = GRAPHS[name], rt, FUNCTIONS[name]
        self.shapes: dict[str, tuple] = {}
        self.ptrs: dict[str, int] = {}
        self.runs, self.closed, self.profile_batch = 0, False, profile_batch

    def set_input_shape(self, name, shape):
        batch = shape[1] if name == "state" else shape[0]
        if self.profile_batch is not None and name in ("latent", "state") and batch > self.profile_batch:
            raise InvalidInputError(f"batch {shape[0]} is outside the profile")
        self.shapes[name] = tuple(shape)

    def output_shape(self, name):
        s, f = self.shapes, CONFIG.vae.downscale
        if self.spec.name == TEXT_ENCODER:
            rows = s["input_ids"][0]
            return (rows, s["input_ids"][1], CONFIG.text_encoder.hidden_size) if name == "last_hidden_state" \
                else (rows, CONFIG.text_encoder.hidden_size)
        if self.spec.name == DENOISE_STEP:
            return s["state"]
        if self.spec.name == VAE_ENCODER:
            b, _, h, w = s["image"]
            return (b, CONFIG.vae.latent_channels, h // f, w // f)
        b, _, h, w = s["latent"]
        return (b, 3, h * f, w * f)

    def set_address(self, name, ptr):
        self.ptrs[name] = ptr

    def execute(self, stream):
        ptrs, shapes = dict(self.ptrs), dict(self.shapes)  # what is bound now, as an engine reads it
        outs = {t.name: self.output_shape(t.name) for t in self.spec.outputs}

        def run():
            self.runs += 1
            values = {t.name: _view(ptrs[t.name], shapes[t.name], t.dtype) for t in self.spec.inputs}
            for name, value in self.fn(values).items():
                _view(ptrs[name], outs[name])[...] = value

        self.rt.enqueue(stream, run)

    def close(self):
        self.closed = True
