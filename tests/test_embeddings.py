"""Textual inversion: A1111 and diffusers embedding files give the ids and embeddings diffusers' own loader gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import sdengine
from onnx_support import onnx_fp32_dir  # noqa: F401 - the exported tiny model, a fixture
from sdengine.embeddings import parse_spec, read_embedding
from sdengine.errors import InvalidInputError, ModelLoadError, PickleCheckpointError

WIDTH = 32  # the tiny text encoder's width


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, WIDTH)).astype(np.float32)


@pytest.fixture
def files(tmp_path):
    a1111 = tmp_path / "shiny-style.safetensors"
    save_file({"emb_params": vectors(3, 1)}, str(a1111))  # A1111: emb_params [n, D], trigger = the file name
    diff = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": vectors(1, 2)[0]}, str(diff))  # diffusers: one [D] tensor named after its token
    return a1111, diff


def test_formats_and_triggers(files, tmp_path):
    a1111, diff = files
    emb = read_embedding(a1111)
    assert emb.trigger == "shiny-style" and emb.tokens == ["shiny-style", "shiny-style_1", "shiny-style_2"]
    np.testing.assert_array_equal(emb.vectors, vectors(3, 1))
    assert read_embedding(a1111, "<shiny>").trigger == "<shiny>"
    d = read_embedding(diff)
    assert d.trigger == "<cat-toy>" and d.vectors.shape == (1, WIDTH)
    assert parse_spec("a/b.safetensors:<tok>") == ("a/b.safetensors", "<tok>")
    assert parse_spec("a/b.safetensors") == ("a/b.safetensors", None)


def test_pickles_and_other_files_are_refused(tmp_path):
    pt = tmp_path / "style.pt"
    pt.write_bytes(b"\x80\x04junk")
    with pytest.raises(PickleCheckpointError, match=r"pickle embedding.*string_to_param.*style\.safetensors"):
        read_embedding(pt)
    other = tmp_path / "two.safetensors"
    save_file({"a": vectors(1, 0), "b": vectors(1, 0)}, str(other))
    with pytest.raises(ModelLoadError, match="not a textual inversion embedding"):
        read_embedding(other)
    with pytest.raises(ModelLoadError, match="not found"):
        read_embedding(tmp_path / "missing.safetensors")


def _diffusers(tiny_model_dir):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_same_ids_and_embeddings_as_diffusers(files, tiny_model_dir, request, backend):
    """diffusers' load_textual_inversion on the same files: equal token ids; text embeddings within 1e-5."""
    a1111, diff = files
    ref = _diffusers(tiny_model_dir)
    ref.load_textual_inversion(str(a1111), token="shiny-style")
    ref.load_textual_inversion(str(diff))
    if backend == "torch":
        pipe = sdengine.load_pipeline(tiny_model_dir)
    else:
        pipe = sdengine.load_pipeline(request.getfixturevalue("onnx_fp32_dir"), backend="onnxruntime")
    assert pipe.load_textual_inversion(a1111) == ["shiny-style", "shiny-style_1", "shiny-style_2"]
    assert pipe.load_textual_inversion(diff) == ["<cat-toy>"]
    for prompt in ["a photo of shiny-style on a table", "<cat-toy> sitting, in shiny-style", "no trigger here"]:
        want = ref.tokenizer(ref.maybe_convert_prompt(prompt, ref.tokenizer), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        got = pipe.tokenizer([prompt])
        np.testing.assert_array_equal(got, want.numpy())
        with torch.no_grad():
            expected = ref.text_encoder(want)[0].numpy()
        hidden = pipe.backend.text_to_host(pipe.backend.encode_text(got))
        np.testing.assert_allclose(hidden, expected, atol=1e-5)
    image = pipe("(shiny-style:1.2) <cat-toy>", num_inference_steps=2, seed=1)
    assert image.infos[0].prompt == "(shiny-style:1.2) <cat-toy>"
    with pytest.raises(InvalidInputError, match="already in the vocabulary"):
        pipe.load_textual_inversion(diff)
    with pytest.raises(InvalidInputError, match="64 wide; this text encoder's tokens are 32 wide"):
        wide = a1111.with_name("too-wide-embedding.safetensors")
        save_file({"emb_params": np.zeros((1, 64), np.float32)}, str(wide))
        pipe.load_textual_inversion(wide)


def test_cli_embedding_option(files, tiny_model_dir, tmp_path):
    from cli_support import invoke

    a1111, diff = files
    out = tmp_path / "x.png"
    cmd = ["generate", "a <shiny> and a <cat-toy>", "--model", str(tiny_model_dir),
           "--steps", "1", "--out", str(out), "--embedding", f"{a1111}:<shiny>", "--embedding", str(diff)]
    r = invoke(*cmd)
    assert r.returncode == 0 and out.is_file(), r.stderr
    pt = tmp_path / "style.pt"
    pt.write_bytes(b"\x80\x04junk")
    r = invoke(*cmd[:-4], "--embedding", str(pt))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "pickle embedding" in r.stderr, r.stderr


def test_a_backend_without_a_token_table_says_so(files):
    from types import SimpleNamespace

    from sdengine.config import ModelConfig
    from sdengine.pipeline import Pipeline
    from sdengine.tokenizer import ClipTokenizer

    backend = SimpleNamespace(config=ModelConfig.tiny(), tokenizer=ClipTokenizer.default())  # as the CUDA backend
    with pytest.raises(InvalidInputError, match="use --backend torch or onnxruntime"):
        Pipeline(backend).load_textual_inversion(files[0])


def test_onnxruntime_embedding_without_torch(files, onnx_fp32_dir):
    import subprocess
    import sys

    from torch_block import BLOCK_TORCH

    code = BLOCK_TORCH + f"""
import sdengine
pipe = sdengine.load_pipeline({str(onnx_fp32_dir)!r}, backend="onnxruntime")
assert pipe.load_textual_inversion({str(files[0])!r}) == ["shiny-style", "shiny-style_1", "shiny-style_2"]
pipe("a (shiny-style:1.1) cat", num_inference_steps=1, seed=0)
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")], "torch was imported"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
