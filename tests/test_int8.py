"""`sdengine export --int8`: an int8 denoise step (ONNX Runtime dynamic quantization) beside fp32 graphs,
recorded in the manifest and checked at load; images near fp32's; combinations that make no sense refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import sdengine
from onnx_support import copy_export, onnx_fp32_dir, report, run_cli  # noqa: F401  (session fixtures)
from sdengine.config import ModelConfig
from sdengine.errors import InvalidInputError, LoraError, ModelLoadError
from sdengine.export.settings import ExportSettings
from sdengine.specs import DENOISE_STEP, TEXT_ENCODER, VAE_DECODER

PROMPT, STEPS = "a photo of a red cat", 8
# Pixel levels (/255) between the int8 (matmul) and fp32 images of the tiny random model below: measured mean
# 1.3, max 11 (onnxruntime 1.32, AVX2, the tiny fixture's weights); the bounds leave room for other CPUs' kernels.
MAX_MEAN_DIFF, MAX_DIFF = 3.0, 40


@pytest.fixture(scope="module")
def int8_dir(onnx_fp32_dir, tmp_path_factory):
    """The fp32 export re-exported with --int8: only the U-Net graphs change (their key holds the op set)."""
    out = copy_export(onnx_fp32_dir, tmp_path_factory.mktemp("int8") / "int8")
    model = json.loads((out / "manifest.json").read_text())["source"]["path"]
    r = run_cli("export", "--model", model, "--out", str(out), "--int8")
    assert r.returncode == 0, r.stderr + r.stdout
    return out


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_int8_quantizes_the_step_graph_only(int8_dir, onnx_fp32_dir):
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    assert manifest["int8"] == "matmul" and manifest["precision"] == "fp32"
    entry = manifest["graphs"][DENOISE_STEP]
    assert entry["int8"]["ops"] == "matmul" and entry["int8"]["integer_ops"]["MatMulInteger"] > 0
    assert "parameters" not in entry  # no LoRA map: the weights are int8 initializers
    step_ops = _ops(int8_dir / "denoise_step.onnx")
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= step_ops and "ConvInteger" not in step_ops
    assert "MatMulInteger" not in _ops(onnx_fp32_dir / "denoise_step.onnx")
    for graph in (TEXT_ENCODER, VAE_DECODER):  # untouched: reused as up to date, still float
        assert "int8" not in manifest["graphs"][graph]
        assert manifest["graphs"][graph]["sha256"] == json.loads(
            (onnx_fp32_dir / "manifest.json").read_text())["graphs"][graph]["sha256"]
    rows = {g["graph"]: g for g in report(int8_dir)["graphs"]}
    assert rows[DENOISE_STEP]["status"] == "passed" and rows[DENOISE_STEP]["precision"] == "int8 (matmul)"
    assert rows[DENOISE_STEP]["checks"]["fp32_before_int8"].startswith("max rel L2")
    assert rows[TEXT_ENCODER]["status"] == "up to date"
    assert (int8_dir / "denoise_step.onnx").stat().st_size < (onnx_fp32_dir / "denoise_step.onnx").stat().st_size


def test_int8_images_stay_near_fp32(int8_dir, onnx_fp32_dir):
    images = {}
    for name, folder in (("fp32", onnx_fp32_dir), ("int8", int8_dir)):
        pipe = sdengine.load_pipeline(str(folder), backend="onnxruntime", threads=1)
        if name == "int8":
            assert pipe.backend.int8 == "matmul"
        result = pipe([PROMPT, "a blue house"], num_inference_steps=STEPS, seed=5, scheduler="ddim")
        images[name] = np.stack([np.asarray(im, dtype=np.int16) for im in result.images])
    diff = np.abs(images["int8"] - images["fp32"])
    print(f"int8 vs fp32 pixel levels: mean {diff.mean():.3f}, max {diff.max()}")
    assert diff.max() > 0  # quantization changed something
    assert diff.mean() <= MAX_MEAN_DIFF and diff.max() <= MAX_DIFF, (diff.mean(), diff.max())


def test_manifest_record_is_checked_at_load(int8_dir, tmp_path):
    folder = copy_export(int8_dir, tmp_path / "edited")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["graphs"][DENOISE_STEP]["int8"]  # the graph's metadata still says int8
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="denoise_step"):
        sdengine.load_pipeline(str(folder), backend="onnxruntime")


def test_int8_backend_refuses_lora_and_the_gpu(int8_dir):
    from sdengine.backends.onnxruntime_backend import OnnxRuntimeBackend
    from sdengine.manifest import Manifest

    pipe = sdengine.load_pipeline(str(int8_dir), backend="onnxruntime")
    with pytest.raises(LoraError, match="int8"):
        pipe.backend.lora_targets()
    with pytest.raises(InvalidInputError, match="--device cpu"):
        OnnxRuntimeBackend(Manifest.read(int8_dir), "cuda", ["CPUExecutionProvider"], None)


def test_bad_int8_combinations(tmp_path):
    with pytest.raises(InvalidInputError, match="--fp16"):
        ExportSettings(precision="fp16", int8="matmul")
    with pytest.raises(InvalidInputError, match="--int8 takes"):
        ExportSettings(int8="gemm")
    with pytest.raises(InvalidInputError, match="SDXL"):
        ExportSettings(int8="matmul").ranges(ModelConfig.tiny_sdxl())
    r = run_cli("export", "--out", str(tmp_path / "x"), "--int8", "--fp16")
    assert r.returncode != 0 and "--fp16" in r.stderr and not (tmp_path / "x").exists()
    r = run_cli("export", "--out", str(tmp_path / "x"), "--int8", "gemm")
    assert r.returncode != 0 and "invalid choice" in r.stderr


def test_int8_changes_the_key_of_unet_graphs_only():
    from sdengine.specs import Range, ShapeRanges

    ranges = ShapeRanges(Range(1, 1, 1), Range(64, 64, 64), Range(64, 64, 64), static=True)
    plain, int8 = ExportSettings(), ExportSettings(int8="matmul")
    assert plain.key(TEXT_ENCODER, ranges, "w", {}) == int8.key(TEXT_ENCODER, ranges, "w", {})
    assert plain.key(DENOISE_STEP, ranges, "w", {}) != int8.key(DENOISE_STEP, ranges, "w", {})
    assert int8.key(DENOISE_STEP, ranges, "w", {}) != ExportSettings(int8="matmul+conv").key(
        DENOISE_STEP, ranges, "w", {})
