"""A stand-in `tensorrt` module for the CI tests of sdengine's own TensorRT logic (no GPU, no TensorRT here).

It is NOT TensorRT and proves nothing about TensorRT: it implements only the calls sdengine makes,
with the return conventions the TensorRT Python docs give (None from `build_serialized_network` and
`deserialize_cuda_engine` on failure, bool from `set_input_shape`, `set_tensor_address`,
`execute_async_v3`, `set_timing_cache`, `parse_from_file`). Which names exist in the real API is
checked separately, against the bindings wheel (test_tensorrt_api.py).

A "plan" is the bytes MAGIC + JSON of the network's IO (name -> mode, dtype, shape with -1 for
dynamic dimensions, min/opt/max profile), so a fake build and a fake load round-trip through real
files. The fake ONNX parser reads the graph's real inputs and outputs with the `onnx` package.
"""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path

MAGIC = b"FAKEPLAN"
WEIGHTS_KEY = "__weights__"  # in a fake plan's JSON: the refittable weights of a refittable build
_ONNX_TYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16"}


class DataType(enum.Enum):
    float32 = "float32"
    int32 = "int32"
    int64 = "int64"
    float16 = "float16"


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class Logger:
    VERBOSE, INFO, WARNING, ERROR = range(4)

    def __init__(self, severity: int = 2) -> None:
        self.min_severity = severity


class Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self.name, self.shape, self.dtype = name, shape, DataType(dtype)


class Network:
    def __init__(self, flags: int) -> None:
        self.flags, self.inputs, self.outputs, self.weights = flags, [], [], {}

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i: int) -> Tensor:
        return self.inputs[i]

    def get_output(self, i: int) -> Tensor:
        return self.outputs[i]


class OnnxParser:
    """Reads the graph's declared IO (dim_param -> -1); `fail` makes every parse fail with one error."""

    fail = False

    def __init__(self, network: Network, logger: Logger) -> None:
        self.network, self.errors = network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        if self.fail:
            self.errors.append(types.SimpleNamespace(desc=lambda: "unsupported operator", node_name=lambda: "n0"))
            return False
        graph = onnx.load(path, load_external_data=False).graph

        def tensor(v) -> Tensor:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
            return Tensor(v.name, dims, _ONNX_TYPES[v.type.tensor_type.elem_type])

        self.network.inputs = [tensor(v) for v in graph.input]
        self.network.outputs = [tensor(v) for v in graph.output]
        # As TensorRT's ONNX parser: weights are named after their ONNX initializers (refittable ones, in a
        # refittable build, are what a Refitter lists).
        self.network.weights = {t.name: [list(t.dims), _ONNX_TYPES.get(t.data_type, str(t.data_type))]
                                for t in graph.initializer}
        return True

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i: int):
        return self.errors[i]


class Profile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi) -> None:
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data) or b"cache"

    def serialize(self) -> bytes:
        return self.data + b"+"


class BuilderConfig:
    def __init__(self) -> None:
        self.profiles, self.flags, self.pools, self.cache = [], [], {}, None
        self.builder_optimization_level, self.progress_monitor = 3, None

    def add_optimization_profile(self, profile: Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.pools[pool] = size

    def set_flag(self, flag) -> None:
        self.flags.append(flag)

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(data)

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> TimingCache:
        return self.cache


class Builder:
    """`fail_on`: graph output names whose build returns None (as TensorRT does on a failed build)."""

    fail_on: set[str] = set()
    built: list[BuilderConfig] = []

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> Network:
        return Network(flags)

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def build_serialized_network(self, network: Network, config: BuilderConfig):
        if {t.name for t in network.outputs} & self.fail_on:
            return None
        Builder.built.append(config)
        if config.progress_monitor is not None:
            config.progress_monitor.phase_start("Building engine", None, 1)
            config.progress_monitor.step_complete("Building engine", 0)
            config.progress_monitor.phase_finish("Building engine")
        shapes = config.profiles[0].shapes if config.profiles else {}
        io = {t.name: {"mode": "INPUT", "dtype": t.dtype.value, "shape": list(t.shape),
                       "profile": shapes.get(t.name)} for t in network.inputs}
        io.update({t.name: {"mode": "OUTPUT", "dtype": t.dtype.value, "shape": list(t.shape)}
                   for t in network.outputs})
        if "refit" in config.flags:
            io[WEIGHTS_KEY] = network.weights
        return memoryview(MAGIC + json.dumps(io).encode())


class Engine:
    def __init__(self, io: dict) -> None:
        io = dict(io)
        # refittable weights {name: [shape, dtype]} (a refittable build only), their refitted values, each refit
        self.weights, self.values, self.refits = io.pop(WEIGHTS_KEY, {}), {}, []
        self.io = io
        self.names = list(io)
        self.device_memory_size_v2 = 1 << 20
        self.contexts = []

    refittable = property(lambda self: bool(self.weights))

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode[self.io[name]["mode"]]

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType(self.io[name]["dtype"])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.io[name]["shape"])

    def get_tensor_profile_shape(self, name: str, index: int):
        if index != 0 or self.io[name].get("profile") is None:
            raise RuntimeError("no profile")  # TensorRT also fails here; sdengine must not ask
        return [tuple(s) for s in self.io[name]["profile"]]

    def create_execution_context(self, strategy) -> "Context":
        context = Context(self, strategy)
        self.contexts.append(context)
        return context


class Context:
    """Records what sdengine asked; `result` is what the set_*/execute calls return."""

    def __init__(self, engine: Engine, strategy) -> None:
        self.engine, self.strategy, self.result = engine, strategy, True
        self.shapes, self.addresses, self.memory, self.launches = {}, {}, None, []

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = (ptr, size)

    def set_input_shape(self, name: str, shape) -> bool:
        self.shapes[name] = tuple(shape)
        return self.result

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes.get(name, self.engine.get_tensor_shape(name))

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return self.result

    def execute_async_v3(self, stream: int) -> bool:
        self.launches.append(stream)
        return self.result


class Runtime:
    deserialized: list[bytes] = []

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes):
        Runtime.deserialized.append(bytes(data[:16]))
        if not bytes(data).startswith(MAGIC):
            return None
        return Engine(json.loads(bytes(data)[len(MAGIC):]))


class Weights:
    """trt.Weights(numpy array): wraps the array without copying (as TensorRT's host weights)."""

    def __init__(self, a) -> None:
        self.array = a


class Refitter:
    """Records every set_named_weights; `missing` names what get_missing_weights reports; `refuse` makes
    refit_cuda_engine return False. A name the engine does not list, or a wrong element count or dtype, is
    refused with False, as TensorRT documents."""

    created: list["Refitter"] = []
    missing: list[str] = []
    refuse = False

    def __init__(self, engine: Engine, logger: Logger) -> None:
        self.engine, self.logger, self.named = engine, logger, {}
        Refitter.created.append(self)

    def get_all_weights(self) -> list[str]:
        return list(self.engine.weights)

    def set_named_weights(self, name: str, weights: Weights, location=None) -> bool:
        import numpy as np

        if name not in self.engine.weights:
            return False
        shape, dtype = self.engine.weights[name]
        a = weights.array
        if a.size != int(np.prod(shape, dtype=np.int64)) or a.dtype != np.dtype(dtype):
            return False
        self.named[name] = np.array(a, copy=True)
        return True

    def get_missing_weights(self) -> list[str]:
        return list(Refitter.missing)

    def refit_cuda_engine(self) -> bool:
        if Refitter.refuse or Refitter.missing:
            return False
        self.engine.refits.append(dict(self.named))
        self.engine.values.update(self.named)
        return True


class IProgressMonitor:
    def __init__(self) -> None:
        pass


def module(version: str = "10.8.0.43") -> types.ModuleType:
    """A fresh fake `tensorrt` module (class-level records reset)."""
    Builder.fail_on, Builder.built, Runtime.deserialized, OnnxParser.fail = set(), [], [], False
    Refitter.created, Refitter.missing, Refitter.refuse = [], [], False
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    m.__file__ = str(Path(__file__))
    m.Logger, m.Builder, m.Runtime, m.OnnxParser, m.IProgressMonitor = Logger, Builder, Runtime, OnnxParser, \
        IProgressMonitor
    m.DataType, m.TensorIOMode, m.Refitter, m.Weights = DataType, TensorIOMode, Refitter, Weights
    m.float32, m.int32, m.int64, m.float16 = DataType.float32, DataType.int32, DataType.int64, DataType.float16
    m.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    m.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    m.BuilderFlag = types.SimpleNamespace(REFIT="refit")
    m.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user_managed")
    return m


def write_plan(path: Path, io: dict) -> Path:
    """A fake plan file with the given IO description."""
    path.write_bytes(MAGIC + json.dumps(io).encode())
    return path
