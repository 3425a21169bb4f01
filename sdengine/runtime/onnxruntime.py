"""ONNX Runtime sessions with IO binding over buffers at fixed addresses. No torch here.

The CPU execution provider always; CUDA and TensorRT when onnxruntime-gpu provides them. A `Buffer`
is a numpy array on the CPU and an OrtValue in GPU memory; graphs read and write buffers in place
through IO binding, so a loop binds addresses and never copies through the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InvalidInputError, ModelLoadError
from ..specs import GraphSpec

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
DEVICE_PROVIDERS = {"cpu": (CPU,), "cuda": (CUDA, CPU)}
SPINNING = "session.intra_op.allow_spinning"  # ONNX Runtime's session config key
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int32": "tensor(int32)",
              "int64": "tensor(int64)"}


def import_ort() -> Any:
    """The onnxruntime module, or a ModelLoadError that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelLoadError("onnxruntime is not installed: pip install 'sdengine[onnx]' "
                             "(onnxruntime-gpu for the CUDA and TensorRT execution providers)") from None
    return onnxruntime


def available_providers() -> list[str]:
    return list(import_ort().get_available_providers())


def resolve_providers(device: str, providers: Sequence[str] | None) -> list[str]:
    """Execution providers for `device` (or as given), each checked against this onnxruntime install."""
    if device not in DEVICE_PROVIDERS:
        raise InvalidInputError(f"unknown device {device!r} for the onnxruntime backend; use cpu or cuda")
    wanted = list(providers) if providers else list(DEVICE_PROVIDERS[device])
    have = available_providers()
    missing = [p for p in wanted if p not in have]
    if missing:
        raise InvalidInputError(f"ONNX Runtime here lacks {', '.join(missing)} (available: {', '.join(have)}); "
                                f"install onnxruntime-gpu for CUDA/TensorRT, or use --device cpu")
    if device == "cuda" and CUDA not in wanted and TENSORRT not in wanted:
        raise InvalidInputError("device 'cuda' needs the CUDA or TensorRT execution provider")
    return wanted


def tensorrt_options(profile: Mapping[str, tuple[tuple[int, ...], ...]], fp16: bool, cache: Path) -> dict[str, Any]:
    """TensorRT EP options: the spec's min/opt/max profile, fp16, and an engine cache beside the graphs."""
    def fmt(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, shapes[which]))}" for name, shapes in profile.items())

    return {"trt_fp16_enable": fp16, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_profile_min_shapes": fmt(0), "trt_profile_opt_shapes": fmt(1), "trt_profile_max_shapes": fmt(2)}


class Buffer:
    """A tensor at a fixed address: numpy on the CPU, an OrtValue on the GPU (`device` 'cpu' or 'cuda')."""

    def __init__(self, shape: Sequence[int], dtype: Any, device: str = "cpu", array: np.ndarray | None = None):
        self.shape, self.dtype, self.device = tuple(int(s) for s in shape), np.dtype(dtype), device
        if device == "cpu":
            self.array = np.zeros(self.shape, self.dtype) if array is None else array
            self.value = None
        else:
            ort = import_ort()
            self.array = None
            self.value = ort.OrtValue.ortvalue_from_shape_and_type(self.shape, self.dtype, "cuda", 0)
            self.write(np.zeros(self.shape, self.dtype) if array is None else array)

    @classmethod
    def holding(cls, array: np.ndarray, device: str) -> "Buffer":
        """A buffer with `array`'s contents (on the CPU, the array itself: no copy)."""
        array = np.ascontiguousarray(array)
        return cls(array.shape, array.dtype, device, array)

    @property
    def ptr(self) -> int:
        return int(self.array.ctypes.data) if self.value is None else int(self.value.data_ptr())

    def first(self, shape: Sequence[int]) -> "BufferView":
        """The leading elements of this buffer seen as `shape` (slot 0 of a state), without a copy."""
        return BufferView(self, tuple(int(s) for s in shape))

    def row(self, i: int) -> int:
        """Address of row i along the first axis."""
        return self.ptr + i * int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def write(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype).reshape(self.shape)
        if self.value is None:
            np.copyto(self.array, array)
        else:
            self.value.update_inplace(array)

    def read(self) -> np.ndarray:
        """A host copy of the contents."""
        return self.array.copy() if self.value is None else self.value.numpy()


class BufferView:
    """A view of a Buffer's leading elements: what binding needs (ptr, shape, dtype) and a host read."""

    def __init__(self, base: Buffer, shape: tuple[int, ...]) -> None:
        if int(np.prod(shape)) > int(np.prod(base.shape)):
            raise ValueError(f"a view {shape} is larger than its buffer {base.shape}")
        self.base, self.shape, self.dtype, self.device = base, shape, base.dtype, base.device

    @property
    def ptr(self) -> int:
        return self.base.ptr

    def read(self) -> np.ndarray:
        return self.base.read().reshape(-1)[: int(np.prod(self.shape))].reshape(self.shape)


class Graph:
    """One session, created once, with an IO binding whose addresses the caller sets per run."""

    def __init__(self, path: Path, spec: GraphSpec, providers: Sequence[str], device: str, threads: int | None,
                 provider_options: Mapping[str, dict[str, Any]] | None = None,
                 initializers: Mapping[str, np.ndarray] | None = None, external: frozenset[str] = frozenset(),
                 model_bytes: bytes | None = None, spinning: bool = True) -> None:
        """`spinning` False: the intra-op threads sleep between calls instead of spinning (ONNX Runtime's
        session.intra_op.allow_spinning 0), which keeps a team of threads from collapsing on a machine whose cores
        are shared (benchmarks/RESULTS.md, "ONNX Runtime's own levers"). `initializers` replace the graph's own
        of those names (LoRA-merged weights) in this session; those named in `external` are stored as external
        data in the graph file. `model_bytes`: the graph (`path`) serialized with some initializers already
        replaced (sdengine.backends.onnxruntime_backend)."""
        ort = import_ort()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry(SPINNING, "0")
        self.initializers: dict[str, Any] = {}  # the OrtValues given: they must outlive the session
        inline = {k: v for k, v in (initializers or {}).items() if k not in external}
        if inline:
            # ORT_ENABLE_ALL's CPU layout and fp16 passes read some weights from the graph's own initializers and
            # ignore add_initializer's (measured with onnxruntime 1.32: a LoRA on a Conv, or on an fp16 graph's
            # MatMul, changed nothing); at ORT_ENABLE_EXTENDED they all take effect. Weights stored as external
            # data are replaced as the graph loads (add_external_initializers), so every optimisation stays;
            # so do weights replaced in `model_bytes`.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        for name, array in (initializers or {}).items():
            self.initializers[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            if name in inline:
                options.add_initializer(name, self.initializers[name])
        outside = [name for name in self.initializers if name not in inline]
        if outside:
            options.add_external_initializers(outside, [self.initializers[name] for name in outside])
        self.optimization_level = options.graph_optimization_level
        opts = [dict((provider_options or {}).get(p, {})) for p in providers]
        try:
            self.session = ort.InferenceSession(str(path) if model_bytes is None else model_bytes, options,
                                                providers=list(providers), provider_options=opts)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"ONNX Runtime cannot load {path} ({str(exc).strip().splitlines()[0][:300]}); "
                                 f"re-export it with sdengine export --force") from None
        self.spec, self.device, self.path = spec, device, path
        self._check_io()
        self.binding = self.session.io_binding()

    def _check_io(self) -> None:
        """The session's inputs and outputs are the spec's (names, element types, ranks)."""
        for kind, declared, wanted in (("inputs", self.session.get_inputs(), self.spec.inputs),
                                       ("outputs", self.session.get_outputs(), self.spec.outputs)):
            got = [(d.name, d.type, len(d.shape)) for d in declared]
            want = [(t.name, _ORT_TYPES[t.dtype], len(t.dims)) for t in wanted]
            if got != want:
                raise ModelLoadError(f"{self.path} has {kind} {got}; this sdengine expects {want}: it was exported "
                                     f"by another sdengine version: re-export it")

    def metadata(self) -> dict[str, str]:
        try:
            return dict(self.session.get_modelmeta().custom_metadata_map)
        except UnicodeDecodeError:  # a graph damaged where a load's fingerprint does not look
            raise ModelLoadError(f"{self.path} has unreadable metadata: it is damaged; check the folder with "
                                 f"sdengine verify and re-export it with sdengine export --force") from None

    def bind(self, name: str, ptr: int, shape: Sequence[int], dtype: Any = np.float32) -> None:
        """Bind input `name` to the tensor at `ptr`."""
        self.binding.bind_input(name, self.device, 0, np.dtype(dtype), list(shape), ptr)

    def bind_buffer(self, name: str, buf: Buffer | BufferView) -> None:
        self.bind(name, buf.ptr, buf.shape, buf.dtype)

    def bind_output(self, name: str, buf: Buffer) -> None:
        self.binding.bind_output(name, self.device, 0, buf.dtype, list(buf.shape), buf.ptr)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)
