"""TensorRT without TensorRT: the static API conformance test, and sdengine's engine logic over a fake module.

1. Conformance: every attribute sdengine/runtime/tensorrt.py and sdengine/engine_build.py use on the
   `tensorrt` module and on TensorRT objects (collected from their AST by tests/tensorrt_usage.py)
   must be a name the TensorRT 11.4 bindings define (tests/data/tensorrt_api_names.txt, derived from
   the bindings wheel by tests/tensorrt_names.py), and no removed API may appear at all.
2. TrtEngine logic (profile checks, IO checks, failure returns, cleanup) over tests/fake_tensorrt.py:
   the fakes are minimal and follow the documented return conventions; they test sdengine's logic,
   not TensorRT. Running real engines is left to the GPU check scripts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fake_tensorrt
import pytest
from engine_support import GPU, TRT_VERSION, make_engine_set
from tensorrt_usage import identifiers, tensorrt_uses

from sdengine.errors import (BackendUnavailableError, CudaError, EngineMismatchError, InvalidInputError,
                             ModelLoadError, SDEngineError)
from sdengine.runtime import tensorrt as rt
from sdengine.specs import DENOISE_STEP, GRAPHS, TEXT_ENCODER

ROOT = Path(__file__).resolve().parent.parent
NAMES_FILE = Path(__file__).parent / "data" / "tensorrt_api_names.txt"
MODULES = [ROOT / "sdengine" / "runtime" / "tensorrt.py", ROOT / "sdengine" / "engine_build.py"]
REMOVED = {"execute_async_v2", "get_binding_shape", "get_binding_index", "binding_is_input",
           "num_bindings", "set_binding_shape", "get_binding_dtype", "max_workspace_size", "build_engine",
           "device_memory_size", "create_execution_context_without_device_memory", "EXPLICIT_BATCH",
           "platform_has_fast_fp16", "FP16"}
# Calls the runtime and the builder cannot work without: the collector must find them all.
CORE = {"deserialize_cuda_engine", "create_execution_context", "set_input_shape", "set_tensor_address",
        "execute_async_v3", "get_tensor_profile_shape", "num_io_tensors", "get_tensor_name", "get_tensor_mode",
        "get_tensor_dtype", "device_memory_size_v2", "set_device_memory", "USER_MANAGED", "build_serialized_network",
        "parse_from_file", "create_network", "STRONGLY_TYPED", "set_shape", "add_optimization_profile",
        "set_memory_pool_limit", "WORKSPACE", "builder_optimization_level", "REFIT", "create_timing_cache",
        "set_timing_cache", "get_timing_cache", "serialize", "IProgressMonitor", "phase_start", "step_complete",
        "phase_finish", "Refitter", "Weights", "set_named_weights", "get_missing_weights", "refit_cuda_engine"}


def api_names() -> set[str]:
    return {line.strip() for line in NAMES_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")}


# --- 1. conformance ---------------------------------------------------------------------------------

def test_names_file_comes_from_the_wheel_and_lacks_removed_apis():
    header = NAMES_FILE.read_text().splitlines()[:2]
    assert header[0].startswith("# TensorRT 11.4") and "tensorrt_cu12_bindings" in header[0]
    assert "tests/tensorrt_names.py" in header[1]
    names = api_names()
    assert len(names) > 1000 and {"execute_async_v3", "set_tensor_address", "IExecutionContext"} <= names
    assert not REMOVED & names  # so the list is not "every identifier": removed APIs are absent from it


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_every_tensorrt_name_used_exists(module):
    used = tensorrt_uses(module.read_text())
    missing = sorted(used - api_names())
    assert not missing, f"{module.name} uses TensorRT names the 11.4 bindings do not define: {missing}"


def test_the_collector_sees_the_core_calls():
    used = set().union(*(tensorrt_uses(m.read_text()) for m in MODULES))
    assert CORE <= used, f"not collected: {sorted(CORE - used)}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_no_removed_api_appears(module):
    source = module.read_text()
    assert not tensorrt_uses(source) & REMOVED
    # Anywhere in the module, as an attribute, name or string, but for two names sdengine has itself:
    # TrtEngine.device_memory_size (read from TensorRT's device_memory_size_v2) and specs.Precision.FP16.
    found = identifiers(source) & (REMOVED - {"device_memory_size", "FP16"})
    assert not found, f"{module.name} mentions removed TensorRT APIs: {sorted(found)}"


@pytest.mark.parametrize("module, old, new", [
    (MODULES[0], ".execute_async_v3(", ".execute_async_v2("),
    (MODULES[0], "._engine.device_memory_size_v2", "._engine.device_memory_size"),
    (MODULES[1], ".build_serialized_network(", ".build_engine("),
    (MODULES[1], "trt.MemoryPoolType.WORKSPACE", "trt.MemoryPoolType.WORKSPACES"),
], ids=lambda v: v if isinstance(v, str) else v.name)
def test_an_old_name_in_the_real_modules_would_be_caught(module, old, new):
    source = module.read_text()
    assert old in source
    unknown = tensorrt_uses(source.replace(old, new)) - api_names()
    assert new.strip(".(").split(".")[-1] in unknown


SNIPPET = '''
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import tensorrt as trt

def load(path, spec: "x") -> trt.ICudaEngine:
    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger())
    return runtime.deserialize_cuda_engine(path.read_bytes())

class Engine:
    def __init__(self, path):
        self._engine = load(path, None)
        self._ctx = self._engine.create_execution_context()
        self.plain = path.stem

    def run(self, stream):
        self._ctx.execute_async_v2([], stream)
        n = self._engine.num_bindings
        shape = self._engine.get_binding_shape(0)
        return self.plain.upper()

def build(trt, network: trt.INetworkDefinition):
    for tensor in [network.get_input(i) for i in range(network.num_inputs)]:
        tensor.made_up_field
    return getattr(trt, "MadeUpClass", None)

def monitor(trt):
    class M(trt.IProgressMonitor):
        def phase_begin(self, name):
            self.started = name
    return M()
'''


def test_the_collector_flags_removed_and_unknown_names():
    used = tensorrt_uses(SNIPPET)
    assert {"execute_async_v2", "num_bindings", "get_binding_shape", "made_up_field", "MadeUpClass",
            "phase_begin"} <= used
    assert {"Runtime", "Logger", "deserialize_cuda_engine", "create_execution_context", "ICudaEngine",
            "INetworkDefinition", "get_input", "num_inputs", "IProgressMonitor"} <= used
    assert not {"read_bytes", "stem", "upper", "plain", "started"} & used  # non-TensorRT values stay out
    unknown = used - api_names()
    assert {"execute_async_v2", "num_bindings", "get_binding_shape", "made_up_field", "MadeUpClass",
            "phase_begin"} <= unknown
    assert identifiers(SNIPPET) & REMOVED == {"execute_async_v2", "num_bindings", "get_binding_shape"}


# --- 2. sdengine's logic over the fake module ------------------------------------------------------

def _input(dtype, shape, lo=None, hi=None):
    return {"mode": "INPUT", "dtype": dtype, "shape": shape, "profile": None if lo is None else [lo, lo, hi]}


def _output(rank):
    return {"mode": "OUTPUT", "dtype": "float32", "shape": [-1] * rank}


IO = {  # fake plans' IO, as a build from the tiny model's dynamic fp16 export would give
    TEXT_ENCODER: {"input_ids": _input("int32", [-1, 77], [1, 77], [8, 77]), "clip_skip": _input("int32", [1]),
                   "last_hidden_state": _output(3), "pooled_output": _output(2)},
    DENOISE_STEP: {"state": _input("float32", [4, -1, 4, -1, -1], [4, 1, 4, 8, 8], [4, 4, 4, 32, 32]),
                   "timestep": _input("float32", [1]),
                   "text_embeddings": _input("float32", [-1, -1, 32], [2, 77, 32], [8, 616, 32]),
                   "guidance_scale": _input("float32", [1]), "coefficients": _input("float32", [24]),
                   "noise": _input("float32", [-1, 4, -1, -1], [1, 4, 8, 8], [4, 4, 32, 32]),
                   "mask": _input("float32", [-1, 1, -1, -1], [1, 1, 8, 8], [4, 1, 32, 32]),
                   "known": _input("float32", [-1, 4, -1, -1], [1, 4, 8, 8], [4, 4, 32, 32]),
                   "known_noise": _input("float32", [-1, 4, -1, -1], [1, 4, 8, 8], [4, 4, 32, 32]),
                   "blend": _input("float32", [3]),
                   "next_state": _output(5)},
}


def io_of(graph: str) -> dict:
    return json.loads(json.dumps(IO[graph]))  # a deep copy to edit


@pytest.fixture
def trt(monkeypatch):
    module = fake_tensorrt.module()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def engine(tmp_path, trt, graph=TEXT_ENCODER, io=None) -> rt.TrtEngine:
    path = fake_tensorrt.write_plan(tmp_path / f"{graph}.plan", io or io_of(graph))
    return rt.TrtEngine(path, GRAPHS[graph], "sdengine build --onnx o --out e", trt)


def test_import_tensorrt_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as where it is not installed
    with pytest.raises(BackendUnavailableError, match=r"pip install 'sdengine\[tensorrt\]'.*--backend onnxruntime"):
        rt.import_tensorrt()


def test_import_tensorrt_refuses_versions_before_10_1(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.module("10.0.1.6"))
    with pytest.raises(BackendUnavailableError, match="TensorRT 10.0.1.6 is too old.*10.1 or newer"):
        rt.import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.module("11.4.0.106"))
    assert rt.import_tensorrt().__version__ == "11.4.0.106"


def test_corrupt_plan_is_a_load_error(tmp_path, trt):
    (tmp_path / "text_encoder.plan").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="cannot deserialize.*rebuild with sdengine build --onnx o --out e"):
        rt.TrtEngine(tmp_path / "text_encoder.plan", GRAPHS[TEXT_ENCODER], "sdengine build --onnx o --out e", trt)


def test_io_mismatch_is_an_engine_mismatch(tmp_path, trt):
    io = io_of(TEXT_ENCODER)
    io["input_ids"]["dtype"] = "int64"
    with pytest.raises(EngineMismatchError, match="input_ids.*int64.*rebuild with"):
        engine(tmp_path, trt, io=io)
    io = io_of(TEXT_ENCODER)
    io["renamed"] = io.pop("pooled_output")
    with pytest.raises(EngineMismatchError, match="renamed"):
        engine(tmp_path, trt, io=io)


def test_context_gets_user_managed_memory(tmp_path, trt):
    e = engine(tmp_path, trt)
    ctx = e._engine.contexts[0]
    assert ctx.strategy == "user_managed" and e.device_memory_size == 1 << 20
    e.set_device_memory(0x1000, 2 << 20)
    assert ctx.memory == (0x1000, 2 << 20)
    with pytest.raises(SDEngineError, match="needs 1048576 bytes"):
        e.set_device_memory(0x1000, 10)


def test_shapes_are_checked_against_the_profile_before_tensorrt(tmp_path, trt):
    e = engine(tmp_path, trt, DENOISE_STEP)
    ctx = e._engine.contexts[0]
    e.set_input_shape("state", (4, 2, 4, 12, 8))
    e.set_input_shape("timestep", (1,))  # a fixed-shape input: its own shape is the profile
    assert ctx.shapes == {"state": (4, 2, 4, 12, 8), "timestep": (1,)}
    for name, shape in (("state", (4, 5, 4, 8, 8)), ("state", (4, 1, 4, 8)), ("state", (2, 1, 4, 8, 8)),
                        ("timestep", (2,)), ("coefficients", (3,)), ("text_embeddings", (2, 77, 64))):
        with pytest.raises(InvalidInputError, match=r"outside the engine's profile.*sdengine build "
                                                    r"--batch/--height/--width"):
            e.set_input_shape(name, shape)
    with pytest.raises(InvalidInputError, match="not an input"):
        e.set_input_shape("next_state", (4, 1, 4, 8, 8))
    assert set(ctx.shapes) == {"state", "timestep"}  # nothing out of range reached TensorRT
    assert e.profile("state") == ((4, 1, 4, 8, 8), (4, 1, 4, 8, 8), (4, 4, 4, 32, 32))


def test_failed_calls_raise(tmp_path, trt):
    e = engine(tmp_path, trt)
    ctx = e._engine.contexts[0]
    with pytest.raises(SDEngineError, match="unknown.*set every input shape"):
        e.output_shape("last_hidden_state")
    e.set_address("input_ids", 0x2000)
    e.execute(7)
    assert ctx.addresses == {"input_ids": 0x2000} and ctx.launches == [7]
    ctx.result = False
    with pytest.raises(InvalidInputError, match="TensorRT refused shape"):
        e.set_input_shape("input_ids", (2, 77))
    with pytest.raises(SDEngineError, match="refused the address"):
        e.set_address("input_ids", 0x2000)
    with pytest.raises(CudaError, match="execute_async_v3 failed for the text_encoder engine"):
        e.execute(7)
    e.close()
    with pytest.raises(SDEngineError, match="closed"):
        e.execute(7)


def plans() -> dict[str, bytes]:
    return {name: fake_tensorrt.MAGIC + json.dumps(IO[name]).encode() for name in (TEXT_ENCODER, DENOISE_STEP)}


def test_load_engine_set_checks_the_host_before_deserializing(tmp_path, trt):
    m = make_engine_set(tmp_path / "e", plans())
    graphs = (TEXT_ENCODER, DENOISE_STEP)
    with pytest.raises(EngineMismatchError, match=r"built for compute capability 9\.0, this GPU has 8\.9.*"
                                                  r"rebuild with sdengine build"):
        rt.load_engine_set(m.folder, graphs, gpu_name=GPU[0], compute_capability="8.9", trt=trt)
    trt.__version__ = "10.9.0.34"
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.8.0.43, this host has 10.9.0.34"):
        rt.load_engine_set(m.folder, graphs, gpu_name=GPU[0], compute_capability=GPU[1], trt=trt)
    assert fake_tensorrt.Runtime.deserialized == []
    trt.__version__ = TRT_VERSION
    manifest, engines = rt.load_engine_set(m.folder, graphs, gpu_name=GPU[0], compute_capability=GPU[1], trt=trt)
    assert manifest == m and [e.spec.name for e in engines.values()] == list(graphs)
    assert len(fake_tensorrt.Runtime.deserialized) == 2


def test_a_failed_load_closes_the_engines_already_loaded(tmp_path, trt, monkeypatch):
    data = plans()
    data[DENOISE_STEP] = b"not a plan"  # recorded in the manifest as built, so only deserialization fails
    m = make_engine_set(tmp_path / "e", data)
    opened = []
    real_init = rt.TrtEngine.__init__

    def init(self, *args, **kwargs):
        opened.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(rt.TrtEngine, "__init__", init)
    with pytest.raises(ModelLoadError, match="cannot deserialize .*denoise_step.plan"):
        rt.load_engine_set(m.folder, (TEXT_ENCODER, DENOISE_STEP), gpu_name=GPU[0], compute_capability=GPU[1],
                           trt=trt)
    assert len(opened) == 2 and opened[0]._context is None and opened[0]._engine is None  # closed


def test_gpu_identity_without_a_driver():
    pytest.importorskip("cuda.bindings")
    from cuda.bindings import runtime as cudart

    err, count = cudart.cudaGetDeviceCount()
    if err == cudart.cudaError_t.cudaSuccess and count:
        pytest.skip("a GPU is usable here")
    with pytest.raises(BackendUnavailableError, match="no usable NVIDIA GPU.*--backend onnxruntime"):
        rt.gpu_identity()
