"""LoRA on the ONNX Runtime backend: merged tensors swapped into the sessions' initializers, no re-export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from diffusers_support import pixels
from onnx_support import copy_export, onnx_fp16_dir, onnx_fp32_dir, BLOCK_TORCH  # noqa: F401

import sdengine
from sdengine.errors import LoraError
from sdengine.manifest import Manifest
from sdengine.specs import DENOISE_STEP, TEXT_ENCODER

from lora_support import KOHYA_TEXT_MODULES, TEXT_MODULES, UNET_MODULES, low_rank, write_kohya, write_peft

PROMPTS = ["a photo of a red cat", "a blue square"]


@pytest.fixture(scope="module")
def torch_pipe(tiny_model_dir):
    return sdengine.load_pipeline(tiny_model_dir)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, torch_pipe):
    targets, folder = torch_pipe.backend.lora_targets(), tmp_path_factory.mktemp("lora")
    kohya = write_kohya(folder / "style.safetensors",
                        low_rank(targets, {"unet": UNET_MODULES, "text_encoder": KOHYA_TEXT_MODULES}, 4, 1), 2.0)
    peft = write_peft(folder / "detail.safetensors",
                      low_rank(targets, {"unet": UNET_MODULES, "text_encoder": TEXT_MODULES}, 4, 2))
    return kohya, peft


def _images(pipe, **kwargs):
    return pixels(pipe(PROMPTS, negative_prompt="blurry", num_inference_steps=20, seed=4, **kwargs))


def test_export_maps_every_weight(onnx_fp32_dir, onnx_fp16_dir, torch_pipe):
    """Every U-Net and text-encoder weight (ndim >= 2) is found in the graphs, transposed where folded."""
    want = {k for k, shape in torch_pipe.backend.lora_targets().items() if len(shape) >= 2}
    for folder in (onnx_fp32_dir, onnx_fp16_dir):
        graphs = json.loads((folder / "manifest.json").read_text())["graphs"]
        unet, text = graphs[DENOISE_STEP]["parameters"], graphs[TEXT_ENCODER]["parameters"]
        assert set(unet) | set(text) == want
        if folder == onnx_fp32_dir:  # exported with --unet-graph; the fp16 folder has the default graphs
            assert graphs["unet"]["parameters"].keys() == unet.keys()
        else:
            assert "unet" not in graphs and not (folder / "unet.onnx").exists()
        assert any(t for v in text.values() for _, t in v["initializers"])  # Linear weights folded into MatMuls


def test_swapped_initializers_match_torch(onnx_fp32_dir, torch_pipe, lora_files):
    """Two LoRAs (kohya and PEFT) with their scales: ONNX Runtime equals torch within 2/255."""
    kohya, peft = lora_files
    loras = {kohya: 0.8, peft: -0.5}
    ort_pipe = sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime")
    plain = _images(ort_pipe)
    seconds = ort_pipe.set_loras(loras)
    torch_seconds = torch_pipe.set_loras(loras)
    try:
        got, ref = _images(ort_pipe), _images(torch_pipe)
    finally:
        torch_pipe.set_loras({})
    diff = np.abs(got - ref).max()
    print(f"\nparity lora onnxruntime vs torch, kohya 0.8 + peft -0.5: max pixel difference {diff}/255 (the LoRAs move "
          f"pixels by up to {np.abs(got - plain).max()}/255); set_loras took {seconds * 1e3:.0f} ms on onnxruntime "
          f"(two sessions re-created), {torch_seconds * 1e3:.0f} ms on torch, tiny model")
    assert diff <= 2 and np.abs(got - plain).max() > 20
    ort_pipe.set_loras({})
    assert np.array_equal(_images(ort_pipe), plain)  # the exported initializers again


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_external_data_graphs_keep_every_optimisation(request, precision, tiny_model_dir, torch_pipe, lora_files,
                                                     tmp_path, monkeypatch):
    """Weights stored as external data (graphs over 2 GB) are replaced as the graph loads
    (add_external_initializers): the sessions keep ORT_ENABLE_ALL, Conv LoRAs included. Inline weights go
    through a copy of the graph's proto with the tensors replaced: every optimisation stays too."""
    import onnxruntime as ort

    from sdengine.export import ExportSettings, export_model, onnx_io

    exported = request.getfixturevalue(f"onnx_{precision}_dir")
    folder = copy_export(exported, tmp_path / "external")
    monkeypatch.setattr(onnx_io, "PROTO_LIMIT", 0)  # every graph counts as "over 2 GB"
    export_model(tiny_model_dir, folder, ExportSettings(precision=precision, force=True,
                                                        graphs=(TEXT_ENCODER, DENOISE_STEP)), log=lambda line: None)
    assert all(Manifest.read(folder).graphs[g]["external_data"] for g in (TEXT_ENCODER, DENOISE_STEP))
    kohya, peft = lora_files
    pipe = sdengine.load_pipeline(folder, backend="onnxruntime", loras={kohya: 0.8, peft: -0.5})
    inline = sdengine.load_pipeline(exported, backend="onnxruntime", loras={kohya: 0.8, peft: -0.5})
    for p in (pipe, inline):
        graphs = [p.backend.graphs[g] for g in (TEXT_ENCODER, DENOISE_STEP)]
        assert {g.optimization_level for g in graphs} == {ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    assert all(pipe.backend.graphs[g].initializers for g in (TEXT_ENCODER, DENOISE_STEP))  # external: OrtValues
    torch_pipe.set_loras({kohya: 0.8, peft: -0.5})
    try:
        got, ref = _images(pipe), _images(torch_pipe)
    finally:
        torch_pipe.set_loras({})
    diff = np.abs(got - ref)
    print(f"\nparity lora onnxruntime {precision} (external-data graphs, ORT_ENABLE_ALL) vs torch fp32: max pixel "
          f"difference {diff.max()}/255, mean {diff.mean():.2f}")
    assert diff.max() <= 2 if precision == "fp32" else (diff.mean() < 1 and diff.max() <= 8)


@pytest.fixture
def given(monkeypatch):
    """The merged tensors each new session receives: [(graph file name, {initializer: array})] in order."""
    from sdengine.backends import onnxruntime_backend

    calls, original = [], onnxruntime_backend.with_initializers

    def spy(path, arrays):
        calls.append((path.name, {k: v.copy() for k, v in arrays.items()}))
        return original(path, arrays)

    monkeypatch.setattr(onnxruntime_backend, "with_initializers", spy)
    return calls


def test_set_changes_are_bit_identical(onnx_fp32_dir, lora_files, given):
    kohya, peft = lora_files
    pipe = sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime", loras={kohya: 0.7})
    image = pipe("a cat", num_inference_steps=4, seed=1, output_type="np").images
    pipe.set_loras({peft: 1.0})
    pipe.set_loras({kohya: 0.7})
    (te, unet), (te_b, _), (te_again, unet_again) = ([a for _, a in given[i:i + 2]] for i in (0, 2, 4))
    assert [name for name, _ in given] == ["text_encoder.onnx", "denoise_step.onnx"] * 3
    assert te.keys() == te_again.keys() and all(np.array_equal(te[k], te_again[k]) for k in te)
    assert unet.keys() == unet_again.keys() and all(np.array_equal(unet[k], unet_again[k]) for k in unet)
    assert te.keys() != te_b.keys() and any(not np.array_equal(te[k], te_b[k]) for k in te.keys() & te_b.keys())
    assert np.array_equal(image, pipe("a cat", num_inference_steps=4, seed=1, output_type="np").images)
    levels = {pipe.backend.graphs[g].optimization_level for g in (TEXT_ENCODER, DENOISE_STEP)}
    import onnxruntime as ort

    assert levels == {ort.GraphOptimizationLevel.ORT_ENABLE_ALL}  # inline graphs: replaced in the proto


def test_fp16_graphs_receive_fp16_tensors(onnx_fp16_dir, torch_pipe, lora_files, given):
    import onnx

    kohya, _ = lora_files
    pipe = sdengine.load_pipeline(onnx_fp16_dir, backend="onnxruntime", loras={kohya: 0.8})
    for file, arrays in given:
        proto = onnx.load(str(onnx_fp16_dir / file), load_external_data=False)
        types = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in proto.graph.initializer}
        assert arrays and all(a.dtype == types[k] for k, a in arrays.items())
        fp16 = sum(a.dtype == np.float16 for a in arrays.values())
        assert fp16 >= len(arrays) - 1  # a time-embedding projection stays fp32 (export/fp16.py)
    torch_pipe.set_loras({kohya: 0.8})
    try:
        got, ref = _images(pipe), _images(torch_pipe)
    finally:
        torch_pipe.set_loras({})
    diff = np.abs(got - ref)
    print(f"\nparity lora onnxruntime fp16 vs torch fp32: max pixel difference {diff.max()}/255, "
          f"mean {diff.mean():.2f}")
    assert diff.mean() < 1 and diff.max() <= 8


def test_export_without_a_weight_map_is_refused(onnx_fp32_dir, tmp_path, lora_files):
    folder = copy_export(onnx_fp32_dir, tmp_path / "old")
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["graphs"].values():
        entry.pop("parameters", None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pipe = sdengine.load_pipeline(folder, backend="onnxruntime")
    pipe.set_loras({})  # nothing to swap: fine
    with pytest.raises(LoraError, match="re-export it with sdengine export --force"):
        pipe.set_loras({lora_files[0]: 1.0})


def test_lora_on_onnxruntime_without_torch(onnx_fp32_dir, lora_files):
    code = BLOCK_TORCH + f"""
import sdengine
pipe = sdengine.load_pipeline({str(onnx_fp32_dir)!r}, backend="onnxruntime", loras={{{str(lora_files[1])!r}: 0.5}})
info = pipe("a cat", num_inference_steps=2, seed=1).infos[0]
assert "Lora hashes" in info.infotext()
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_add_initializer_fallback_takes_effect(onnx_fp16_dir):
    """Inline tensors of an external-data graph go through add_initializer at ORT_ENABLE_EXTENDED: an fp16
    MatMul weight given that way changes the output (at ORT_ENABLE_ALL, ONNX Runtime 1.32 ignored it)."""
    import onnx
    import onnxruntime as ort

    from sdengine.runtime.onnxruntime import CPU, Graph
    from sdengine.specs import GRAPHS

    path = onnx_fp16_dir / GRAPHS[TEXT_ENCODER].file
    params = json.loads((onnx_fp16_dir / "manifest.json").read_text())["graphs"][TEXT_ENCODER]["parameters"]
    init = params["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"]["initializers"][0][0]
    proto = onnx.load(str(path), load_external_data=False)
    (tensor,) = [t for t in proto.graph.initializer if t.name == init]
    zeros = np.zeros(tuple(tensor.dims), onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    ids = {"input_ids": np.array([[49406, 320, 2368, 49407] + [49407] * 73], np.int32),
           "clip_skip": np.zeros(1, np.int32)}
    plain = Graph(path, GRAPHS[TEXT_ENCODER], [CPU], "cpu", 1)
    swapped = Graph(path, GRAPHS[TEXT_ENCODER], [CPU], "cpu", 1, initializers={init: zeros})
    assert swapped.optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    a, b = (g.session.run(["last_hidden_state"], ids)[0] for g in (plain, swapped))
    assert np.abs(a - b).max() > 1e-2


def test_lora_and_textual_inversion_together(onnx_fp32_dir, tiny_model_dir, lora_files, tmp_path):
    """The text encoder session holds the LoRA-merged weights and the extended token table at once, whichever
    came first, and keeps the table when the LoRAs are removed: ONNX Runtime equals torch."""
    from safetensors.numpy import save_file

    kohya, peft = lora_files
    width = Manifest.read(onnx_fp32_dir).config.text_encoder.hidden_size
    embedding = tmp_path / "shiny-style.safetensors"
    save_file({"emb_params": np.random.default_rng(5).standard_normal((2, width)).astype(np.float32)}, str(embedding))
    prompt = ["a photo of shiny-style on a table"]
    ref = sdengine.load_pipeline(tiny_model_dir)
    ort_pipe = sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime")
    ref.load_textual_inversion(embedding)
    ort_pipe.set_loras({kohya: 0.8, peft: 0.6})  # LoRA first, then the embedding
    ort_pipe.load_textual_inversion(embedding)
    ref.set_loras({kohya: 0.8, peft: 0.6})

    def hidden(pipe):
        return pipe.backend.text_to_host(pipe.backend.encode_text(pipe.tokenizer(prompt)))

    try:
        both = hidden(ref)
        np.testing.assert_allclose(hidden(ort_pipe), both, atol=1e-4)
        ort_pipe.set_loras({})
        ref.set_loras({})
        embedding_only = hidden(ref)
        np.testing.assert_allclose(hidden(ort_pipe), embedding_only, atol=1e-4)
        assert np.abs(both - embedding_only).max() > 1e-2  # the LoRA does change the text encoder
        ort_pipe.set_loras({kohya: 0.8, peft: 0.6})  # the embedding first, then the LoRA
        np.testing.assert_allclose(hidden(ort_pipe), both, atol=1e-4)
    finally:
        ref.set_loras({})
