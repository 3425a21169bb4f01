"""SDXL through ONNX: the tiny SDXL-shaped model exported (both text encoders, the step graph with text_embeds and
time_ids, the VAE graphs) and run by the ONNX Runtime backend against the torch reference."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from diffusers_support import pixels
from torch_block import BLOCK_TORCH

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

import sdengine  # noqa: E402
from sdengine.errors import InvalidInputError  # noqa: E402
from sdengine.manifest import Manifest  # noqa: E402
from sdengine.specs import ALL_GRAPHS, SDXL_GRAPHS, TEXT_ENCODER_2, VAE_DECODER  # noqa: E402
from sdengine.tokenizer import ClipTokenizer  # noqa: E402

PROMPT = "a photo of a red cat"
MICRO = dict(original_size=(512, 768), crops_coords_top_left=(16, 32), target_size=(64, 64),
             negative_original_size=(256, 256), negative_crops_coords_top_left=(0, 8), negative_target_size=(96, 64))


@pytest.fixture(scope="module")
def small_sdxl_dir(tmp_path_factory):
    """The tiny SDXL model with one resnet per level and 1/1/2 transformer layers: its export traces half the U-Net
    ops of ModelConfig.tiny_sdxl() (11 s instead of 22 s on one core), still SDXL-shaped (no attention at the top
    level, a 2-deep transformer, text_time)."""
    from sdengine.config import ModelConfig
    from sdengine.models.saving import write_random_model

    tiny = ModelConfig.tiny_sdxl()
    config = dataclasses.replace(tiny, unet=dataclasses.replace(tiny.unet, layers_per_block=1,
                                                                transformer_layers=(1, 1, 2)))
    return write_random_model(tmp_path_factory.mktemp("models") / "small-sdxl", config, seed=1)


@pytest.fixture(scope="module")
def sdxl_torch(small_sdxl_dir):
    return sdengine.load_pipeline(small_sdxl_dir)


@pytest.fixture(scope="module")
def sdxl_onnx_dir(small_sdxl_dir, tmp_path_factory):
    """That model exported at fp32 (1-2 images, 64-128 px, 2 prompt chunks)."""
    from sdengine.export import ExportSettings, export_model

    out = tmp_path_factory.mktemp("onnx") / "sdxl"
    export_model(small_sdxl_dir, out, ExportSettings(batch=(1, 2), max_prompt_chunks=2), log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def sdxl_ort(sdxl_onnx_dir):
    return sdengine.load_pipeline(sdxl_onnx_dir, backend="onnxruntime", threads=1)


def test_export_validates_every_graph(sdxl_onnx_dir, sdxl_torch):
    """Five graphs (the plain U-Net only with --unet-graph), each validated against torch at two shapes before it
    was written; both tokenizers carried."""
    report = json.loads((sdxl_onnx_dir / "export-report.json").read_text())
    results = {g["graph"]: g for g in report["graphs"]}
    exported = [g for g in ALL_GRAPHS if g != "unet"]
    assert list(results) == exported and all(g["status"] == "passed" for g in results.values())
    print("\nparity SDXL export fp32, max relative L2 per graph: "
          + ", ".join(f"{name} {g['max_rel_l2']:.1e}" for name, g in results.items()))
    manifest = Manifest.read(sdxl_onnx_dir)
    assert manifest.config.sdxl and set(manifest.graphs) == set(exported)
    step = onnx.load(str(manifest.graph_path("denoise_step")), load_external_data=False)
    assert [i.name for i in step.graph.input] == SDXL_GRAPHS["denoise_step"].input_names
    assert [i.name for i in step.graph.input][-2:] == ["text_embeds", "time_ids"]
    second = ClipTokenizer.from_folder(sdxl_onnx_dir / "tokenizer_2")
    assert second.pad_id == 0 and (second(PROMPT) == sdxl_torch.tokenizer_2(PROMPT)).all()


@pytest.mark.parametrize("case", [
    dict(negative_prompt="blurry", scheduler="dpmpp_2m", guidance_scale=7.5, num_images_per_prompt=2, **MICRO),
    dict(negative_prompt=None, scheduler="euler_a", guidance_scale=5.0, clip_skip=1),
    dict(negative_prompt="", guidance_scale=1.0, prompt=", ".join(["a (red:1.3) cat on a blue mat"] * 10)),
], ids=["negative-micro-2images", "zeros-negative-euler_a-clip_skip", "guidance1-long-weighted"])
def test_onnxruntime_matches_torch(sdxl_ort, sdxl_torch, case):
    """Same seed, 6 steps: within 2/255 per pixel of the torch backend (fp32). Covers the second encoder's pooled
    output, the micro-conditioning, zeros for a None negative, a stochastic sampler's noise, clip_skip, two prompt
    chunks with emphasis, and guidance 1 (B rows, duplicated in the step graph)."""
    case = dict(case)
    prompt = case.pop("prompt", PROMPT)
    kw = dict(num_inference_steps=6, seed=4, **case)
    got, ref = pixels(sdxl_ort(prompt, **kw)), pixels(sdxl_torch(prompt, **kw))
    diff = np.abs(got - ref)
    print(f"\nparity SDXL onnxruntime vs torch ({', '.join(f'{k}={v}' for k, v in case.items() if k not in MICRO)}): "
          f"max {diff.max()}/255, mean {diff.mean():.2e}")
    assert ref.std() > 5 and diff.max() <= 2


def test_without_torch(sdxl_onnx_dir, sdxl_ort):
    """The ONNX Runtime path generates SDXL in a process where importing torch fails."""
    code = BLOCK_TORCH + f"""
import numpy as np, sdengine
pipe = sdengine.load_pipeline({str(sdxl_onnx_dir)!r}, backend="onnxruntime", threads=1)
image = pipe({PROMPT!r}, num_inference_steps=3, seed=2, negative_prompt="blurry", original_size=(128, 96)).images[0]
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")], "torch was imported"
np.save(sys.argv[1], np.asarray(image))
"""
    out = sdxl_onnx_dir.parent / "no-torch.npy"
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = np.asarray(sdxl_ort(PROMPT, num_inference_steps=3, seed=2, negative_prompt="blurry",
                              original_size=(128, 96)).images[0]).astype(np.int16)
    assert np.abs(np.load(out).astype(np.int16) - ref).max() <= 1


def test_bad_calls_refused(sdxl_ort):
    from sdengine.samplers import build_schedule

    backend = sdxl_ort.backend
    with pytest.raises(InvalidInputError, match="encode_text_sdxl"):
        backend.encode_text(np.zeros((1, 77), np.int32))
    schedule = build_schedule(sdxl_ort.config.scheduler, "ddim", 2)
    with pytest.raises(InvalidInputError, match="text_embeds and time_ids"):
        backend.denoise(np.zeros((1, 4, 8, 8), np.float32), np.zeros((2, 77, 64), np.float32), schedule, 5.0, None)
    with pytest.raises(InvalidInputError, match="textual inversion"):
        backend.add_token_embeddings(np.zeros((1, 32), np.float32))


def test_fp16_export_keeps_a_force_upcast_vae_fp32(small_sdxl_dir, tmp_path):
    """--fp16 on SDXL: the text encoders go fp16 (validated), the VAE stays fp32 when its config sets force_upcast
    (SDXL's VAE overflows in fp16), and the manifest says so per graph."""
    from sdengine.export import ExportSettings, export_model

    settings = ExportSettings(precision="fp16", graphs=(TEXT_ENCODER_2, VAE_DECODER), batch=(1, 2))
    results = export_model(small_sdxl_dir, tmp_path, settings, log=lambda line: None)
    assert {r.graph: (r.status, r.precision) for r in results} == {TEXT_ENCODER_2: ("passed", "fp16"),
                                                                   VAE_DECODER: ("passed", "fp32")}
    entries = json.loads((tmp_path / "manifest.json").read_text())["graphs"]
    assert entries[VAE_DECODER]["precision"] == "fp32" and "precision" not in entries[TEXT_ENCODER_2]

    def float_types(name):
        model = onnx.load(str(tmp_path / f"{name}.onnx"))
        return {t.data_type for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT,
                                                                              onnx.TensorProto.FLOAT16)}
    assert float_types(VAE_DECODER) == {onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.FLOAT16 in float_types(TEXT_ENCODER_2)


def test_lora_swapped_into_the_sdxl_graphs(sdxl_ort, sdxl_torch, tmp_path):
    """A LoRA on the U-Net and both text encoders (diffusers/PEFT keys, text_encoder_2.* included) merged into the
    exported graphs' initializers: within 2/255 of torch with the same LoRA; it changes the image."""
    pytest.importorskip("safetensors")
    from lora_support import low_rank, write_peft

    modules = {"unet": ("down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k",
                        "mid_block.attentions.0.proj_in"),
               "text_encoder": ("text_model.encoder.layers.0.mlp.fc2",),
               "text_encoder_2": ("text_model.encoder.layers.2.mlp.fc1", "text_projection")}
    assert {f"{c}.{m}.weight" for c, names in modules.items() for m in names} <= set(sdxl_ort.backend.lora_targets())
    path = write_peft(tmp_path / "xl.safetensors", low_rank(sdxl_torch.backend.lora_targets(), modules, 4, 3))
    kw = dict(num_inference_steps=4, seed=6, negative_prompt="blurry")
    base = pixels(sdxl_ort(PROMPT, **kw))
    try:
        sdxl_ort.set_loras({path: 0.8})
        sdxl_torch.set_loras({path: 0.8})
        got, ref = pixels(sdxl_ort(PROMPT, **kw)), pixels(sdxl_torch(PROMPT, **kw))
    finally:
        sdxl_ort.set_loras({})
        sdxl_torch.set_loras({})
    diff = np.abs(got - ref)
    print(f"\nparity SDXL LoRA onnxruntime vs torch: max {diff.max()}/255 (the LoRA moves pixels by up to "
          f"{np.abs(got - base).max()}/255)")
    assert diff.max() <= 2 and np.abs(got - base).max() > 4


def test_textual_inversion_in_both_encoders(sdxl_onnx_dir, small_sdxl_dir, tmp_path):
    """An SDXL embedding (`clip_l`, `clip_g`) swapped into both text encoder sessions' token tables (no
    re-export): within 2/255 of the torch backend with the same embedding."""
    from safetensors.numpy import save_file

    config = sdengine.load_pipeline(small_sdxl_dir).config
    rng = np.random.default_rng(5)
    path = tmp_path / "xl-style.safetensors"
    save_file({key: rng.standard_normal((2, te.hidden_size)).astype(np.float32) * 0.5
               for key, te in (("clip_l", config.text_encoder), ("clip_g", config.text_encoder_2))}, str(path))
    ort_pipe = sdengine.load_pipeline(sdxl_onnx_dir, backend="onnxruntime", threads=1)
    torch_pipe = sdengine.load_pipeline(small_sdxl_dir)
    for pipe in (ort_pipe, torch_pipe):
        pipe.load_textual_inversion(path)
    kw = dict(negative_prompt="blurry", num_inference_steps=4, seed=2)
    got, ref = pixels(ort_pipe("a xl-style cat", **kw)), pixels(torch_pipe("a xl-style cat", **kw))
    diff = np.abs(got - ref)
    print(f"\nparity SDXL onnxruntime vs torch, textual inversion: max {diff.max()}/255, mean {diff.mean():.2e}")
    # The new token ids lie past the exported tables: only the extended tables can encode them, and torch's
    # use of the vectors is checked against diffusers (test_sdxl_pipeline.py).
    assert ref.std() > 5 and diff.max() <= 2
