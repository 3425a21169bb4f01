"""TensorRT engines over caller-owned device memory: deserialize once, bind shapes and addresses, enqueue. No torch.

Written against the TensorRT 10.1+/11 Python API (name-based tensors only: `set_input_shape`,
`set_tensor_address`, `execute_async_v3`; no binding indices). Every context is created with
user-managed activation memory (`ExecutionContextAllocationStrategy.USER_MANAGED`): the backend
allocates one block of `max(device_memory_size)` and gives it to every context with
`set_device_memory`, since the engines of a pipeline never run at the same time. Both
`device_memory_size_v2` and `set_device_memory(ptr, size)` exist from TensorRT 10.1 on and are the
only forms left in 11.x, so older TensorRT is refused at import.

`tests/test_tensorrt_api.py` checks every TensorRT name used here against the names a TensorRT
11.4 bindings wheel defines; this module has not yet run against a real TensorRT.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine_manifest import ENGINE_GRAPHS, EngineManifest, check, check_source, engine_graphs, read, verify_plans
from ..errors import (BackendUnavailableError, CudaError, EngineMismatchError, InvalidInputError, ModelLoadError,
                      SDEngineError)
from ..specs import GraphSpec, graph_specs

if TYPE_CHECKING:
    import tensorrt as trt

MIN_VERSION = (10, 1)
INSTALL_HINT = ("pip install 'sdengine[tensorrt]' on a host with an NVIDIA GPU, or use --backend onnxruntime")
_LOGGERS: dict[tuple[int, bool], Any] = {}


def import_tensorrt() -> Any:
    """The tensorrt module (10.1 or newer), or a BackendUnavailableError saying what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the bindings are there but libnvinfer is not
        detail = "" if isinstance(exc, ModuleNotFoundError) else f" ({exc})"
        raise BackendUnavailableError(f"TensorRT is not installed{detail}: {INSTALL_HINT}") from None
    if version_tuple(tensorrt.__version__)[:2] < MIN_VERSION:
        wanted = ".".join(map(str, MIN_VERSION))
        raise BackendUnavailableError(f"TensorRT {tensorrt.__version__} is too old: sdengine needs {wanted} or "
                                      f"newer; pip install -U 'sdengine[tensorrt]'")
    return tensorrt


def version_tuple(text: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); non-numeric parts end the tuple."""
    parts = []
    for p in str(text).split("."):
        m = re.match(r"\d+", p)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(name, compute capability 'major.minor') of CUDA device `device`, from cuda-python's runtime API."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise BackendUnavailableError(f"cuda-python is not installed: {INSTALL_HINT}") from None
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        raise BackendUnavailableError(f"no usable NVIDIA GPU here (cudaGetDeviceCount: {getattr(err, 'name', err)}); "
                                      f"TensorRT engines need one: use --backend onnxruntime")
    err, prop = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaError(f"cudaGetDeviceProperties({device}) failed: {getattr(err, 'name', err)}")
    name = prop.name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name, f"{prop.major}.{prop.minor}"


def logger(trt: Any, verbose: bool = False) -> trt.ILogger:
    """One TensorRT logger per process and verbosity (TensorRT keeps a single logger)."""
    key = (id(trt), verbose)
    if key not in _LOGGERS:
        _LOGGERS[key] = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    return _LOGGERS[key]


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


class TrtEngine:
    """One deserialized engine and its execution context: the Executor protocol of runtime/executor.py."""

    # One context serves every shape, and a CUDA graph replayed after its context's shapes or addresses changed
    # is undefined (TensorRT's developer guide, "CUDA Graphs"): the denoise loop keeps a graph for the key it
    # last bound only (sdengine.runtime.loop).
    graphs_follow_shapes = True

    def __init__(self, path: Path, spec: GraphSpec, rebuild: str, trt: Any = None) -> None:
        trt = import_tensorrt() if trt is None else trt
        self.spec, self.path, self._rebuild, self._trt = spec, Path(path), rebuild, trt
        self._runtime = trt.Runtime(logger(trt))
        self._engine = _deserialize(self._runtime, self.path, rebuild)
        self._check_io(trt)
        self._profile = {t.name: self._input_profile(t.name) for t in spec.inputs}
        context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise SDEngineError(f"TensorRT could not create an execution context for {self.path}; "
                                f"rerun with a free GPU or rebuild with {rebuild}")
        self._context = context

    def _check_io(self, trt: Any) -> None:
        """The engine's IO tensors are the spec's: names, input/output mode and element types."""
        engine = self._engine
        found = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            found[name] = (mode, _dtype_name(trt, engine.get_tensor_dtype(name)))
        want = {t.name: ("input", t.dtype) for t in self.spec.inputs}
        want.update({t.name: ("output", t.dtype) for t in self.spec.outputs})
        if found != want:
            raise EngineMismatchError(f"{self.path} has IO tensors {sorted(found.items())}; the {self.spec.name} graph "
                                      f"of this sdengine has {sorted(want.items())}: rebuild with {self._rebuild}")

    def _input_profile(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) of input `name` in profile 0; a fixed-shape input's own shape thrice."""
        shape = _dims(self._engine.get_tensor_shape(name))
        if all(d >= 0 for d in shape):
            return shape, shape, shape
        lo, opt, hi = self._engine.get_tensor_profile_shape(name, 0)
        return _dims(lo), _dims(opt), _dims(hi)

    def _live(self) -> trt.IExecutionContext:
        if self._context is None:
            raise SDEngineError(f"the {self.spec.name} engine was closed")
        return self._context

    @property
    def device_memory_size(self) -> int:
        """Bytes of activation memory the context needs at any shape of its profile."""
        if self._engine is None:
            raise SDEngineError(f"the {self.spec.name} engine was closed")
        return int(self._engine.device_memory_size_v2)

    def set_device_memory(self, ptr: int, size: int) -> None:
        """Give the context its activation memory (shared with the other engines, which never run at once)."""
        need = self.device_memory_size
        if size < need:
            raise SDEngineError(f"the {self.spec.name} engine needs {need} bytes of device memory, got {size}")
        self._live().set_device_memory(int(ptr), int(size))

    def profile(self, name: str) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes of input `name` as built."""
        return self._profile[name]

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Shape of input `name`; InvalidInputError (before TensorRT sees it) outside the built profile."""
        if name not in self._profile:
            raise InvalidInputError(f"{name!r} is not an input of the {self.spec.name} engine "
                                    f"(inputs: {', '.join(self._profile)})")
        shape = tuple(int(d) for d in shape)
        lo, _, hi = self._profile[name]
        if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi)):
            raise InvalidInputError(f"{self.spec.name} input {name} of shape {shape} is outside the engine's profile "
                                    f"{lo}..{hi}; rebuild with sdengine build --batch/--height/--width MIN:OPT:MAX "
                                    f"covering it (was: {self._rebuild})")
        if not self._live().set_input_shape(name, shape):
            raise InvalidInputError(f"TensorRT refused shape {shape} for {self.spec.name} input {name}")

    def output_shape(self, name: str) -> tuple[int, ...]:
        """Shape of output `name` under the input shapes set so far."""
        shape = _dims(self._live().get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise SDEngineError(f"the shape of {self.spec.name} output {name} is unknown ({shape}): set every input "
                                f"shape first")
        return shape

    def set_address(self, name: str, ptr: int) -> None:
        if not self._live().set_tensor_address(name, int(ptr)):
            raise SDEngineError(f"TensorRT refused the address of {self.spec.name} tensor {name}")

    def execute(self, stream: int) -> None:
        """Enqueue one run on `stream` (execute_async_v3: no host sync, capturable into a CUDA graph)."""
        if not self._live().execute_async_v3(int(stream)):
            raise CudaError(f"TensorRT execute_async_v3 failed for the {self.spec.name} engine ({self.path}); "
                            f"see the TensorRT log above")

    def refit(self, weights: dict[str, Any]) -> None:
        """Replace the named weights (ONNX initializer names; C-contiguous numpy arrays in the engine's weight
        dtype) in place through TensorRT's Refitter; the engine must be built refittable (sdengine build
        --refittable). Per TensorRT's docs the new weights take effect for enqueues after refit_cuda_engine
        returns; the caller waits for earlier work first and drops any CUDA graph captured before.

        Host arrays: `trt.Weights(array)` does not copy, so every array is kept alive until the refit returns."""
        trt = self._trt
        if self._engine is None:
            raise SDEngineError(f"the {self.spec.name} engine was closed")
        refitter = trt.Refitter(self._engine, logger(trt))
        held = []
        for name, array in weights.items():
            w = trt.Weights(array)
            held.append((array, w))
            if not refitter.set_named_weights(name, w):
                raise EngineMismatchError(f"TensorRT refused new weights {name!r} {tuple(array.shape)} "
                                          f"{array.dtype} for the {self.spec.name} engine ({self.path}): the engine "
                                          f"has no refittable weight of that name and size; rebuild with "
                                          f"{self._rebuild}")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise EngineMismatchError(f"the {self.spec.name} engine ({self.path}) needs weights {missing[:5]} "
                                      f"({len(missing)} in all) set together with the ones a LoRA changes (TensorRT "
                                      f"combined them when it built the engine), which sdengine does not map; "
                                      f"use --backend onnxruntime for this LoRA")
        if not refitter.refit_cuda_engine():
            raise SDEngineError(f"TensorRT failed to refit the {self.spec.name} engine ({self.path}); see the "
                                f"TensorRT log above")
        del held

    def close(self) -> None:
        """Drop the context, engine and runtime (in that order); the caller's buffers are untouched."""
        self._context = None
        self._engine = None
        self._runtime = None


def _deserialize(runtime: trt.Runtime, path: Path, rebuild: str) -> trt.ICudaEngine:
    """The engine in `path`; ModelLoadError when TensorRT cannot deserialize it."""
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ModelLoadError(f"TensorRT cannot deserialize {path}: it is corrupt or was built by another TensorRT "
                             f"version (see the TensorRT log above); rebuild with {rebuild}")
    return engine


def _dtype_name(trt: Any, dtype: Any) -> str:
    """The spec's name of a TensorRT DataType ('float32' or 'int32'; any other type by its own name)."""
    for name, value in (("float32", trt.float32), ("int32", trt.int32)):
        if dtype == value:
            return name
    return str(dtype)


def load_engine_set(folder: str | Path, graphs: tuple[str, ...] = ENGINE_GRAPHS, gpu_name: str | None = None,
                    compute_capability: str | None = None,
                    trt: Any = None) -> tuple[EngineManifest, dict[str, TrtEngine]]:
    """The set's manifest and one engine per graph, after every check (host, source, plan hashes) passes (an SDXL
    set's text_encoder_2 with its text_encoder)."""
    manifest = read(folder)
    graphs = engine_graphs(manifest.config, tuple(graphs))
    trt = import_tensorrt() if trt is None else trt
    if gpu_name is None or compute_capability is None:
        gpu_name, compute_capability = gpu_identity()
    check(manifest, str(trt.__version__), gpu_name, compute_capability)
    check_source(manifest)
    paths = verify_plans(manifest, graphs)
    engines: dict[str, TrtEngine] = {}
    try:
        for name in graphs:
            engines[name] = TrtEngine(paths[name], graph_specs(manifest.config)[name], manifest.rebuild_command(),
                                      trt)
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    return manifest, engines
