"""The CUDA layer of the lean runtime on cuda-python (`cuda.bindings.runtime`): buffers, streams, events, graphs.

Every call's cudaError_t goes through `check`, which raises CudaError naming the call and the error
(BackendUnavailableError when there is no GPU or driver). Every allocation belongs to an `Allocations`
that frees whatever is still live at close, so error paths leak nothing. No torch here.

Choices:
- `__cuda_array_interface__` (v3) says `stream: None`: all work on a runtime buffer is ordered on the one
  stream of its `CudaDevice`, and a consumer (PyTorch, CuPy) must enqueue on that stream too (the torch
  executor does, through torch.cuda.ExternalStream), so no cross-stream synchronisation is asked for.
- Captures use cudaStreamCaptureModeThreadLocal: an unsafe call (a sync, a plain cudaMalloc) from the
  capturing thread still invalidates the capture, so a mistake in the loop cannot pass silently, while
  other threads of the process (a server's) stay free to allocate; Global mode would fail them too.
- Graphs are instantiated with cudaGraphInstantiateWithFlags(graph, cudaGraphInstantiateFlagAutoFreeOnLaunch),
  whose signature is the same in cuda-python 11.4+, 12 and 13 (cudaGraphInstantiate's changed between 11
  and 12): a graph that captured a stream-ordered allocation (cudaMallocAsync inside the capture, which
  a library may do) frees it before each relaunch, where flags 0 would make the relaunch fail. The
  template graph is destroyed right after, the executable graph at close.
- A capture that fails with a CUDA error is retried once in relaxed mode (`capture`): the error's
  name is kept (CudaGraph.capture_errors, or the raised CudaError's), so a call that thread-local
  capture forbids (the retry succeeds: the graph says so) is told apart from a kernel fault or a
  failed launch (the retry fails too).
- Uploads go through pinned staging buffers (one per size, guarded by an event, so a staging
  buffer is never rewritten while its last copy is in flight); downloads through pinned buffers too.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import BackendUnavailableError, CudaError, InvalidInputError, SDEngineError

_NO_GPU = ("cudaErrorInsufficientDriver", "cudaErrorNoDevice")
_INSTALL = ("install cuda-python (pip install 'sdengine[tensorrt]' or pip install cuda-python), "
            "or use --backend onnxruntime")
_RT: Any = None


def import_cudart() -> Any:
    """The cuda-python runtime module (cuda.bindings.runtime; cuda.cudart in older 12.x layouts)."""
    global _RT
    if _RT is None:
        try:
            from cuda.bindings import runtime
        except ImportError:
            try:
                from cuda import cudart as runtime
            except ImportError:
                raise BackendUnavailableError(f"cuda-python is not installed: {_INSTALL}") from None
        _RT = runtime
    return _RT


def native_handle(obj: Any) -> int:
    """The address behind a cuda-python handle (int(obj) is deprecated from cuda-bindings 12.9 on)."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def _text(value: Any) -> str:
    return value.decode(errors="replace").rstrip("\x00") if isinstance(value, bytes) else str(value)


def error_text(err: Any) -> tuple[str, str]:
    """(name, description) of a cudaError_t, from cudaGetErrorName / cudaGetErrorString."""
    rt = import_cudart()
    name, text = getattr(err, "name", str(err)), "no description"
    try:
        got = rt.cudaGetErrorName(err)
        if got[0] == rt.cudaError_t.cudaSuccess:
            name = _text(got[1])
        got = rt.cudaGetErrorString(err)
        if got[0] == rt.cudaError_t.cudaSuccess:
            text = _text(got[1])
    except Exception:  # the error is being reported already; keep the enum's own name
        pass
    return name, text


def cuda_error(err: Any, call: str) -> SDEngineError:
    """The exception for a failed call: BackendUnavailableError without GPU or driver, CudaError otherwise."""
    name, text = error_text(err)
    if name in _NO_GPU:
        return BackendUnavailableError(f"{call} failed: {name} ({text}): no usable NVIDIA GPU and driver here; "
                                       f"install the NVIDIA driver on a GPU machine, or use --backend onnxruntime")
    return CudaError(f"{call} failed: {name} ({text})")


def check(result: Any, call: str) -> Any:
    """Unwrap a cuda-python result tuple (err, *values): raise on any error, else the value(s) (None if none)."""
    rt = import_cudart()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        raise cuda_error(err, call)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class DeviceInfo:
    """What the engine manifest stamps: name, compute capability, memory."""

    index: int
    name: str
    major: int
    minor: int
    total_memory: int

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"


def device_count() -> int:
    """Visible CUDA devices; BackendUnavailableError without a driver or a GPU."""
    rt = import_cudart()
    count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not count:
        raise BackendUnavailableError("cudaGetDeviceCount found no CUDA device; run on an NVIDIA GPU machine, "
                                      "or use --backend onnxruntime")
    return int(count)


def device_properties(index: int = 0) -> DeviceInfo:
    """Name, compute capability and total memory of device `index`."""
    count = device_count()
    if not 0 <= index < count:
        raise InvalidInputError(f"CUDA device {index} does not exist here ({count} device(s): 0..{count - 1})")
    prop = check(import_cudart().cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    return DeviceInfo(index, _text(prop.name), int(prop.major), int(prop.minor), int(prop.totalGlobalMem))


def set_device(index: int = 0) -> DeviceInfo:
    """Make device `index` current for this thread (creating its primary context); its properties."""
    info = device_properties(index)
    check(import_cudart().cudaSetDevice(index), f"cudaSetDevice({index})")
    return info


def memory_info() -> tuple[int, int]:
    """(free, total) bytes of the current device (cudaMemGetInfo)."""
    free, total = check(import_cudart().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


def cuda_array_interface(ptr: int, shape: Sequence[int], dtype: Any) -> dict[str, Any]:
    """A v3 __cuda_array_interface__ for a C-contiguous tensor at `ptr` (stream None: see the module doc)."""
    return {"shape": tuple(int(s) for s in shape), "typestr": np.dtype(dtype).str, "data": (int(ptr), False),
            "version": 3, "strides": None, "stream": None}


class _Buffer:
    """A C-contiguous tensor's memory: shape, dtype, address; freed once (free is idempotent)."""

    _kind = "buffer"

    def __init__(self, shape: Sequence[int], dtype: Any, owner: "Allocations | None" = None) -> None:
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        if any(s < 0 for s in self.shape):
            raise InvalidInputError(f"a {self._kind} cannot have a negative dimension: {self.shape}")
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._ptr = self._allocate(max(self.nbytes, 1))
        self._owner = owner
        if owner is not None:
            owner._track(self)

    def _allocate(self, nbytes: int) -> int:
        raise NotImplementedError

    def _release(self, ptr: int) -> None:
        raise NotImplementedError

    @property
    def ptr(self) -> int:
        if not self._ptr:
            raise SDEngineError(f"this {self._kind} {self.shape} was freed and cannot be used")
        return self._ptr

    @property
    def freed(self) -> bool:
        return not self._ptr

    def row(self, i: int) -> int:
        """Address of row i along the first axis."""
        if not 0 <= i < (self.shape[0] if self.shape else 0):
            raise InvalidInputError(f"row {i} is outside this {self._kind} of shape {self.shape}")
        return self.ptr + i * (self.nbytes // self.shape[0])

    def free(self) -> None:
        """Release the memory (a second call does nothing)."""
        ptr, self._ptr = self._ptr, 0
        if ptr:
            if self._owner is not None:
                self._owner._forget(self)
            self._release(ptr)

    def __enter__(self) -> "_Buffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.free()


class DeviceBuffer(_Buffer):
    """cudaMalloc'd device memory; PyTorch and CuPy can wrap it through __cuda_array_interface__."""

    _kind = "device buffer"

    def _allocate(self, nbytes: int) -> int:
        return int(check(import_cudart().cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)"))

    def _release(self, ptr: int) -> None:
        check(import_cudart().cudaFree(ptr), "cudaFree")

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return cuda_array_interface(self.ptr, self.shape, self.dtype)


class PinnedBuffer(_Buffer):
    """Page-locked host memory (cudaMallocHost), seen as the numpy array `array`."""

    _kind = "pinned buffer"

    def __init__(self, shape: Sequence[int], dtype: Any, owner: "Allocations | None" = None) -> None:
        super().__init__(shape, dtype, owner)
        raw = (ctypes.c_uint8 * max(self.nbytes, 1)).from_address(self._ptr)
        self.array: np.ndarray | None = np.frombuffer(raw, np.uint8)[:self.nbytes].view(self.dtype).reshape(self.shape)

    def _allocate(self, nbytes: int) -> int:
        return int(check(import_cudart().cudaMallocHost(nbytes), f"cudaMallocHost({nbytes} bytes)"))

    def _release(self, ptr: int) -> None:
        self.array = None
        check(import_cudart().cudaFreeHost(ptr), "cudaFreeHost")


class Allocations:
    """Every buffer a backend holds: counts them, and frees what is still live at close."""

    def __init__(self) -> None:
        self._live: dict[int, _Buffer] = {}
        self.allocated = self.freed = 0

    def _track(self, buf: _Buffer) -> None:
        self._live[id(buf)] = buf
        self.allocated += 1

    def _forget(self, buf: _Buffer) -> None:
        if self._live.pop(id(buf), None) is not None:
            self.freed += 1

    def device(self, shape: Sequence[int], dtype: Any) -> DeviceBuffer:
        return DeviceBuffer(shape, dtype, self)

    def pinned(self, shape: Sequence[int], dtype: Any) -> PinnedBuffer:
        return PinnedBuffer(shape, dtype, self)

    @property
    def live(self) -> int:
        return len(self._live)

    def close(self) -> None:
        """Free every live buffer; the first failure is raised after all were tried."""
        run_all([buf.free for buf in self._live.values()])


class Stream:
    """A non-blocking stream (cudaStreamNonBlocking: no implicit sync with the legacy default stream)."""

    def __init__(self) -> None:
        rt = import_cudart()
        self.raw = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    def _live(self) -> Any:
        if self.raw is None:  # never let None reach a call: it would mean the legacy default stream
            raise SDEngineError("this CUDA stream was destroyed")
        return self.raw

    @property
    def handle(self) -> int:
        """The raw cudaStream_t as an int (for TensorRT's execute_async_v3 and torch.cuda.ExternalStream)."""
        return native_handle(self._live())

    def synchronize(self) -> None:
        check(import_cudart().cudaStreamSynchronize(self._live()), "cudaStreamSynchronize")

    def is_capturing(self) -> bool:
        rt = import_cudart()
        status = check(rt.cudaStreamIsCapturing(self._live()), "cudaStreamIsCapturing")
        return status != rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone

    def destroy(self) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            check(import_cudart().cudaStreamDestroy(raw), "cudaStreamDestroy")


class Event:
    """A CUDA event: record on a stream, wait for it, time between two of them."""

    def __init__(self, timing: bool = True) -> None:
        rt = import_cudart()
        flags = rt.cudaEventDefault if timing else rt.cudaEventDisableTiming
        self.raw = check(rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
        self.recorded = False

    def record(self, stream: Stream) -> None:
        check(import_cudart().cudaEventRecord(self.raw, stream._live()), "cudaEventRecord")
        self.recorded = True

    def synchronize(self) -> None:
        if self.recorded:
            check(import_cudart().cudaEventSynchronize(self.raw), "cudaEventSynchronize")

    def elapsed_ms(self, end: "Event") -> float:
        """Milliseconds from this event to `end` (both recorded; waits for `end`)."""
        end.synchronize()
        return float(check(import_cudart().cudaEventElapsedTime(self.raw, end.raw), "cudaEventElapsedTime"))

    def destroy(self) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            check(import_cudart().cudaEventDestroy(raw), "cudaEventDestroy")


def copy_async(dst: int, src: int, nbytes: int, kind: str, stream: Stream) -> None:
    """cudaMemcpyAsync of `nbytes`; kind is 'HostToDevice', 'DeviceToHost' or 'DeviceToDevice'."""
    rt = import_cudart()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, getattr(rt.cudaMemcpyKind, f"cudaMemcpy{kind}"), stream._live()),
          f"cudaMemcpyAsync({kind}, {nbytes} bytes)")


def memset_async(ptr: int, value: int, nbytes: int, stream: Stream) -> None:
    check(import_cudart().cudaMemsetAsync(ptr, value, nbytes, stream._live()), f"cudaMemsetAsync({nbytes} bytes)")


class CudaGraph:
    """An instantiated CUDA graph (cudaGraphExec_t), launched on the stream it was captured from."""

    def __init__(self, exec_: Any, stream: Stream) -> None:
        self.exec, self.stream = exec_, stream
        self.mode = "ThreadLocal"            # the capture mode that succeeded
        self.capture_errors: list[str] = []  # the CUDA error of a failed first try (see `capture`)

    def launch(self) -> None:
        if self.exec is None:
            raise SDEngineError("this CUDA graph was destroyed")
        check(import_cudart().cudaGraphLaunch(self.exec, self.stream._live()), "cudaGraphLaunch")

    def destroy(self) -> None:
        exec_, self.exec = self.exec, None
        if exec_ is not None:
            check(import_cudart().cudaGraphExecDestroy(exec_), "cudaGraphExecDestroy")


CAPTURE_MODES = ("ThreadLocal", "Relaxed")  # the first try, then the one retry


def instantiate_flags() -> int:
    """cudaGraphInstantiateFlagAutoFreeOnLaunch, as the int cudaGraphInstantiateWithFlags takes."""
    rt = import_cudart()
    return int(rt.cudaGraphInstantiateFlags.cudaGraphInstantiateFlagAutoFreeOnLaunch)


def error_name(exc: BaseException) -> str:
    """The CUDA error an exception names (cudaError...), else its type: what a capture attempt records."""
    found = re.search(r"cuda(?:Error|_ERROR)\w*", str(exc))
    return found.group() if found else type(exc).__name__


def _capture_error(exc: BaseException) -> bool:
    """Whether a failure inside a capture may be the capture's own (worth one relaxed retry)."""
    return isinstance(exc, CudaError) or "cudaError" in str(exc) or "capturing" in str(exc)


def capture(stream: Stream, enqueue: Callable[[], None]) -> CudaGraph:
    """Record everything `enqueue` issues on `stream` as one instantiated graph; an error ends the capture.

    Thread-local mode first. If that fails with a CUDA error, the error's name is recorded and the capture is
    tried once more in relaxed mode: a success means the loop made a call thread-local capture forbids
    (`graph.mode == "Relaxed"`, `graph.capture_errors` names it); a second failure raises a CudaError naming
    both errors (`.capture_errors`), which points at a kernel fault or a failed launch instead.
    Any other exception (an executor's own) is raised at once.
    """
    errors: list[str] = []
    for mode in CAPTURE_MODES:
        try:
            graph = _capture_once(stream, enqueue, mode)
        except BaseException as exc:
            if not _capture_error(exc):
                raise
            errors.append(error_name(exc))
            _clear_last_error()
            if mode == CAPTURE_MODES[-1]:
                err = CudaError(f"CUDA graph capture failed in thread-local mode ({errors[0]}) and again in relaxed "
                                f"mode ({errors[-1]}): not only a call capture forbids but a failed launch or a "
                                f"kernel fault; rerun with use_graph=False to see the failing call ({exc})")
                err.capture_errors = list(errors)  # type: ignore[attr-defined]
                raise err from exc
            continue
        graph.mode, graph.capture_errors = mode, list(errors)
        return graph
    raise AssertionError("unreachable")


def _capture_once(stream: Stream, enqueue: Callable[[], None], mode: str) -> CudaGraph:
    rt = import_cudart()
    check(rt.cudaStreamBeginCapture(stream._live(), getattr(rt.cudaStreamCaptureMode, f"cudaStreamCaptureMode{mode}")),
          "cudaStreamBeginCapture")
    try:
        enqueue()
    except BaseException:
        _abandon_capture(stream)
        raise
    graph = check(rt.cudaStreamEndCapture(stream.raw), "cudaStreamEndCapture")
    try:
        result = CudaGraph(check(rt.cudaGraphInstantiateWithFlags(graph, instantiate_flags()),
                                 "cudaGraphInstantiateWithFlags"), stream)
    except BaseException:
        rt.cudaGraphDestroy(graph)  # the instantiate error is the one to report
        raise
    try:
        check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
    except BaseException:
        result.destroy()
        raise
    return result


def _clear_last_error() -> None:
    """Reset the runtime's last (non-sticky) error after a failed capture, so the retry starts clean."""
    with contextlib.suppress(Exception):
        getattr(import_cudart(), "cudaGetLastError", lambda: None)()


@contextlib.contextmanager
def relaxed_capture_mode() -> Iterator[None]:
    """Let this thread make calls a thread-local capture forbids (a pointer query, a cudaMalloc) for a moment."""
    rt = import_cudart()
    relaxed = rt.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed
    old = check(rt.cudaThreadExchangeStreamCaptureMode(relaxed), "cudaThreadExchangeStreamCaptureMode")
    try:
        yield
    finally:
        check(rt.cudaThreadExchangeStreamCaptureMode(old), "cudaThreadExchangeStreamCaptureMode")


def _abandon_capture(stream: Stream) -> None:
    """End a failed capture and drop its graph, ignoring errors (the original one is being raised)."""
    rt = import_cudart()
    try:
        result = rt.cudaStreamEndCapture(stream.raw)
        graph = result[1] if len(result) > 1 else None
        if graph is not None and native_handle(graph):
            rt.cudaGraphDestroy(graph)
    except Exception:
        pass


def run_all(steps: Iterable[Callable[[], None]]) -> None:
    """Call every step even when some fail (a close path frees all it can), then raise the first error."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first
