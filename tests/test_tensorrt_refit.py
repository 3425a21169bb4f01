"""LoRA on TensorRT engine sets by refit (TensorRTBackend.set_loras), over the stand-in `tensorrt` module.

The tiny model is exported at fp16 and "built" refittable by tests/fake_tensorrt.py, whose parser names the
engine's weights after the ONNX initializers (as TensorRT's ONNX parser does) and whose Refitter records
what sdengine sets. This tests sdengine's names, merges, transposes, casts and error paths, not TensorRT:
the refit has not run on hardware.
"""

from __future__ import annotations

import dataclasses
import sys

import fake_tensorrt
import numpy as np
import pytest
from lora_support import TEXT_MODULES, UNET_MODULES, low_rank, write_peft
from onnx_support import onnx_fp16_dir  # noqa: F401  (fixture)

from sdengine import engine_build
from sdengine import lora as sdlora
from sdengine.cli import main
from sdengine.errors import EngineMismatchError, LoraError, SDEngineError
from sdengine.manifest import Manifest
from sdengine.specs import DENOISE_STEP, TEXT_ENCODER

pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
from fake_cuda import FakeRuntime  # noqa: E402

FAKE_GPU = ("Fake GPU", "9.0")
RANK = 2


@pytest.fixture
def fake_trt(monkeypatch):
    module = fake_tensorrt.module()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(engine_build, "gpu_identity", lambda: FAKE_GPU)
    from sdengine.runtime import cuda

    monkeypatch.setattr(cuda, "_RT", FakeRuntime())
    return module


def _build(onnx_dir, out, refittable=True):
    args = ["build", "--onnx", str(onnx_dir), "--out", str(out), "--batch", "1:2"]
    assert main(args + (["--refittable"] if refittable else [])) == 0
    return out


def _backend(out, trt, **kw):
    from sdengine.backends.tensorrt_backend import TensorRTBackend
    from sdengine.runtime.device import CudaDevice
    from sdengine.runtime.tensorrt import load_engine_set
    from sdengine.tokenizer import ClipTokenizer

    manifest, engines = load_engine_set(out, gpu_name=FAKE_GPU[0], compute_capability=FAKE_GPU[1], trt=trt)
    manifest = kw.pop("manifest", lambda m: m)(manifest)
    return TensorRTBackend(manifest, manifest.config, ClipTokenizer.from_folder(manifest.tokenizer_dir), engines,
                           CudaDevice(), manifest.ranges, **kw)


@pytest.fixture
def refit_set(onnx_fp16_dir, tmp_path, fake_trt):  # noqa: F811
    return _build(onnx_fp16_dir, tmp_path / "engines")


def _pristine(onnx_dir, graph):
    """{initializer name: array} of the export's graph, read with onnx directly."""
    import onnx
    from onnx import numpy_helper

    m = Manifest.read(onnx_dir)
    model = onnx.load(str(m.graph_path(graph)))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _expected(onnx_dir, loras, graph, names):
    """{initializer: array} the refit must send for parameters `names` of `graph` under `loras`."""
    params = Manifest.read(onnx_dir).graphs[graph]["parameters"]
    inits = _pristine(onnx_dir, graph)
    base = {}
    for name in names:
        init, transposed = params[name]["initializers"][0]
        base[name] = inits[init].T if transposed else inits[init]
    merged = {**base, **sdlora.merge(base, loras, only=set(names))}
    out = {}
    for name in names:
        for init, transposed in params[name]["initializers"]:
            a = merged[name].astype(base[name].dtype)
            out[init] = a.T if transposed else a
    return out


@pytest.fixture
def lora_files(refit_set, fake_trt, tmp_path):
    targets = _backend(refit_set, fake_trt).lora_targets()
    a = write_peft(tmp_path / "a.safetensors", low_rank(targets, {"unet": UNET_MODULES[:4],
                                                                  "text_encoder": TEXT_MODULES}, RANK, 1))
    b = write_peft(tmp_path / "b.safetensors", low_rank(targets, {"unet": UNET_MODULES[3:]}, RANK, 2))
    return targets, sdlora.read_lora(a, targets), sdlora.read_lora(b, targets)


def _last(backend, graph):
    return backend.executors[graph]._engine.refits[-1]


def test_build_carries_the_weight_map_only_when_refittable(onnx_fp16_dir, tmp_path, fake_trt):  # noqa: F811
    from sdengine.engine_manifest import read

    onnx = Manifest.read(onnx_fp16_dir)
    m = read(_build(onnx_fp16_dir, tmp_path / "r"))
    assert m.builder.refittable and m.weights == {g: onnx.graphs[g]["parameters"] for g in (TEXT_ENCODER,
                                                                                             DENOISE_STEP)}
    assert read(_build(onnx_fp16_dir, tmp_path / "n", refittable=False)).weights is None


def test_refit_sends_merged_fp16_weights_by_initializer_name(refit_set, fake_trt, onnx_fp16_dir,  # noqa: F811
                                                             lora_files):
    targets, a, _ = lora_files
    backend = _backend(refit_set, fake_trt)
    backend.set_loras([(a, 0.8)])
    onnx = Manifest.read(onnx_fp16_dir)
    transposed = False
    for graph in (TEXT_ENCODER, DENOISE_STEP):
        params = onnx.graphs[graph]["parameters"]
        mine = sorted(a.targets & set(params))
        assert mine
        want = _expected(onnx_fp16_dir, [(a, 0.8)], graph, mine)
        sent = _last(backend, graph)
        assert sorted(sent) == sorted(want)
        for init, array in want.items():
            assert sent[init].dtype == np.float16 and np.array_equal(sent[init], array)
        pristine = _pristine(onnx_fp16_dir, graph)
        assert any(not np.array_equal(sent[i], pristine[i]) for i in sent)
        transposed |= any(t for name in mine for _, t in params[name]["initializers"])
        refitter = fake_tensorrt.Refitter.created[-1 if graph == DENOISE_STEP else -2]
        assert refitter.engine is backend.executors[graph]._engine
    assert transposed  # the map's transposed initializers (MatMul weights) were exercised


def test_a_b_a_is_bit_identical_and_empty_restores_pristine(refit_set, fake_trt, onnx_fp16_dir,  # noqa: F811
                                                            lora_files):
    _, a, b = lora_files
    backend = _backend(refit_set, fake_trt)
    backend.set_loras([(a, 0.7)])
    first = {g: _last(backend, g) for g in (TEXT_ENCODER, DENOISE_STEP)}
    backend.set_loras([(b, 1.0)])
    # B touches no text encoder weight: A's get their pristine values back
    te_pristine = _pristine(onnx_fp16_dir, TEXT_ENCODER)
    assert all(np.array_equal(v, te_pristine[k]) for k, v in _last(backend, TEXT_ENCODER).items())
    assert set(_last(backend, DENOISE_STEP)) >= set(first[DENOISE_STEP])  # A's weights restored or re-merged
    backend.set_loras([(a, 0.7)])
    for g, sent in first.items():
        again = _last(backend, g)
        assert {k: v.tobytes() for k, v in again.items() if k in sent} == {k: v.tobytes() for k, v in sent.items()}
    backend.set_loras([])
    for g in (TEXT_ENCODER, DENOISE_STEP):
        engine, pristine = backend.executors[g]._engine, _pristine(onnx_fp16_dir, g)
        assert engine.values and all(np.array_equal(v, pristine[k]) for k, v in engine.values.items())
    assert backend._lora_base == {TEXT_ENCODER: {}, DENOISE_STEP: {}}  # no kept copies without a LoRA
    count = len(fake_tensorrt.Refitter.created)
    backend.set_loras([])
    assert len(fake_tensorrt.Refitter.created) == count  # nothing to restore: no refit


def test_refit_drops_captured_loop_graphs(refit_set, fake_trt, lora_files):
    _, a, _ = lora_files
    backend = _backend(refit_set, fake_trt)

    class Graph:
        destroyed = False

        def destroy(self):
            self.destroyed = True

    g = Graph()
    backend.loop.graphs["key"] = g
    backend.set_loras([(a, 1.0)])
    assert backend.loop.graphs == {} and g.destroyed


def test_pipeline_set_loras_over_the_tensorrt_backend(refit_set, fake_trt, lora_files, tmp_path):
    from sdengine.pipeline import Pipeline

    targets, a, _ = lora_files
    pipe = Pipeline(_backend(refit_set, fake_trt))
    pipe.set_loras({a.path: 0.5})
    assert [info.name for info in pipe.loras] == ["a"]
    assert _last(pipe.backend, DENOISE_STEP)


def test_non_refittable_set_is_refused_naming_the_build_option(onnx_fp16_dir, tmp_path, fake_trt,  # noqa: F811
                                                               lora_files):
    from sdengine.pipeline import Pipeline

    _, a, _ = lora_files
    backend = _backend(_build(onnx_fp16_dir, tmp_path / "plain", refittable=False), fake_trt)
    with pytest.raises(LoraError, match=r"without --refittable.*sdengine build --refittable"):
        backend.set_loras([(a, 1.0)])
    with pytest.raises(LoraError, match="sdengine build --refittable"):
        Pipeline(backend).set_loras({a.path: 1.0})
    backend.set_loras([])  # nothing to undo: fine


def test_missing_weights_and_failed_refit_are_clear_errors(refit_set, fake_trt, lora_files, onnx_fp16_dir):  # noqa: F811,E501
    _, a, _ = lora_files
    backend = _backend(refit_set, fake_trt)
    fake_tensorrt.Refitter.missing = ["w_combined"]
    with pytest.raises(EngineMismatchError, match=r"needs weights \['w_combined'\]"):
        backend.set_loras([(a, 1.0)])
    fake_tensorrt.Refitter.missing = []
    fake_tensorrt.Refitter.refuse = True
    with pytest.raises(SDEngineError, match="failed to refit the text_encoder engine"):
        backend.set_loras([(a, 1.0)])
    fake_tensorrt.Refitter.refuse = False
    backend.set_loras([])  # the weights a failed refit may have touched are rewritten
    pristine = _pristine(onnx_fp16_dir, TEXT_ENCODER)
    sent = _last(backend, TEXT_ENCODER)
    assert sent and all(np.array_equal(v, pristine[k]) for k, v in sent.items())


def test_unknown_weight_name_is_refused(refit_set, fake_trt, lora_files):
    _, a, _ = lora_files
    backend = _backend(refit_set, fake_trt)
    backend.executors[TEXT_ENCODER]._engine.weights.clear()  # an engine whose weights are not named so
    with pytest.raises(EngineMismatchError, match="TensorRT refused new weights"):
        backend.set_loras([(a, 1.0)])


def test_pristine_weights_need_the_source_export(refit_set, fake_trt, lora_files, tmp_path):
    _, a, _ = lora_files
    backend = _backend(refit_set, fake_trt,
                       manifest=lambda m: dataclasses.replace(m, source_folder=str(tmp_path / "gone")))
    with pytest.raises(LoraError, match="reads the pristine weights from the ONNX export"):
        backend.set_loras([(a, 1.0)])
