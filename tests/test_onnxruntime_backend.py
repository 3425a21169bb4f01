"""The ONNX Runtime backend against the torch reference, without torch, and on bad export folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffusers_support import pixels
from onnx_support import (copy_export, onnx_fp16_dir, onnx_fp32_dir, ort_pipeline,  # noqa: F401
                          run_cli, BLOCK_TORCH)

import onnx
import onnxruntime as ort

import sdengine
from sdengine.errors import InvalidInputError, ModelLoadError
from sdengine.manifest import file_record

PROMPT = "a photo of a red cat"


def _same_call(pipe_a, pipe_b, **kwargs):
    return pixels(pipe_a(PROMPT, **kwargs)), pixels(pipe_b(PROMPT, **kwargs))


@pytest.mark.parametrize("eta, guidance", [(0.0, 7.5), (0.7, 7.5), (0.0, 1.0)])
def test_pipeline_matches_torch(ort_pipeline, tiny_pipeline, eta, guidance):
    """Same seed and latents, 20 steps: within 2/255 per pixel at fp32 (eta > 0: the same seeded noise)."""
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    got, ref = _same_call(ort_pipeline, tiny_pipeline, negative_prompt="blurry", num_inference_steps=20,
                          guidance_scale=guidance, eta=eta, seed=5, num_images_per_prompt=2, latents=latents)
    diff = np.abs(got - ref)
    print(f"\nparity onnxruntime vs torch, eta {eta}, guidance {guidance}: max pixel difference {diff.max()}/255, "
          f"mean {diff.mean():.2e}")
    assert ref.std() > 5 and diff.max() <= 2


def test_pipeline_matches_torch_at_odd_size_and_prompt_lists(ort_pipeline, tiny_pipeline):
    kwargs = dict(negative_prompt=["", "blurry"], num_inference_steps=6, seed=9, height=72, width=120, eta=1.0)
    got = pixels(ort_pipeline(["a cat", "a dog"], **kwargs))
    ref = pixels(tiny_pipeline(["a cat", "a dog"], **kwargs))
    assert got.shape == (2, 72, 120, 3) and np.abs(got - ref).max() <= 2


def test_fp16_generation_close_to_fp32(onnx_fp16_dir, onnx_fp32_dir, tiny_pipeline, caplog):
    """fp16 network bodies against the fp32 reference, 20 steps. Measured on the tiny model: max 1/255, mean
    0.03/255 (ONNX Runtime's CPU provider computes fp16 nodes in fp32: the weights are what differs here).
    Loading an fp16 export on the CPU says once that fp16 is for GPUs; an fp32 export says nothing."""
    with caplog.at_level("WARNING", logger="sdengine"):
        sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime")
    assert not [r for r in caplog.records if "fp16" in r.getMessage()]
    with caplog.at_level("WARNING", logger="sdengine"):
        fp16 = sdengine.load_pipeline(onnx_fp16_dir, backend="onnxruntime")
    warned = [r.getMessage() for r in caplog.records if "fp16 is for GPUs" in r.getMessage()]
    assert len(warned) == 1 and "export without --fp16" in warned[0], caplog.text
    got, ref = _same_call(fp16, tiny_pipeline, num_inference_steps=20, seed=3, num_images_per_prompt=2)
    diff = np.abs(got - ref)
    print(f"\nparity onnxruntime fp16 vs torch fp32: max pixel difference {diff.max()}/255, mean {diff.mean():.2f}")
    assert diff.mean() < 1 and diff.max() <= 8


def test_buffers_and_sessions_are_reused(ort_pipeline):
    backend = ort_pipeline.backend
    sessions = {name: g.session for name, g in backend.graphs.items()}
    ort_pipeline("a cat", num_inference_steps=3, seed=1, eta=0.5)
    first = dict(backend._buffers)
    ort_pipeline("a dog", num_inference_steps=5, seed=2)
    assert backend._buffers == first  # same shapes: the same buffers, nothing new allocated
    assert {name: g.session for name, g in backend.graphs.items()} == sessions


def test_spinning_off_sets_the_session_option_and_keeps_the_image(onnx_fp32_dir, ort_pipeline):
    """spinning=False (`--option spinning=false`): every session's intra-op threads sleep between calls; the
    image is the default session's (same kernels, same thread count)."""
    from sdengine.runtime.onnxruntime import SPINNING

    spin = sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime", threads=2)
    quiet = sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime", threads=2, spinning=False)
    assert {g.session.get_session_options().get_session_config_entry(SPINNING)
            for g in quiet.backend.graphs.values()} == {"0"}
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default: spinning
        spin.backend.graphs["denoise_step"].session.get_session_options().get_session_config_entry(SPINNING)
    got, ref = _same_call(quiet, spin, num_inference_steps=4, seed=3)
    assert ref.std() > 5 and np.abs(got - ref).max() == 0
    with pytest.raises(InvalidInputError, match="spinning must be true or false"):
        sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime", spinning="no")

def test_generate_in_a_process_without_torch(onnx_fp32_dir, ort_pipeline):
    code = BLOCK_TORCH + f"""
import numpy as np, sdengine
result = sdengine.load_pipeline({str(onnx_fp32_dir)!r}, backend="onnxruntime")("a cat", num_inference_steps=4,
                                                                                seed=8, eta=0.3)
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")], "torch was imported"
assert "transformers" not in sys.modules
print(int(np.asarray(result.images[0]).astype(np.int64).sum()))
"""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    expected = pixels(ort_pipeline("a cat", num_inference_steps=4, seed=8, eta=0.3)).astype(np.int64).sum()
    assert int(r.stdout.strip()) == expected


def test_cli_generate_onnxruntime_without_torch(onnx_fp16_dir, tmp_path):
    out = tmp_path / "cat.png"
    r = run_cli("generate", "a cat", "--backend", "onnxruntime", "--model", str(onnx_fp16_dir), "--steps", "3",
                "--seed", "4", "--num-images", "2", "--height", "72", "--out", str(out), torch_blocked=True)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(tmp_path / "cat-1.png").size == (64, 72)


@pytest.mark.parametrize("args, match", [
    (["--height", "256"], "height 256 is outside this ONNX export's range 64..128"),
    (["--num-images", "5"], "images 5 is outside"),
])
def test_cli_generate_refuses_shapes_outside_the_export(onnx_fp32_dir, tmp_path, args, match):
    r = run_cli("generate", "a cat", "--backend", "onnxruntime", "--model", str(onnx_fp32_dir),
                "--out", str(tmp_path / "x.png"), *args, torch_blocked=True)
    assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_backend_options_are_checked(onnx_fp32_dir, tmp_path):
    """Every backend names the options it takes: a torch option on onnxruntime is one line, exit 2."""
    r = run_cli("generate", "a cat", "--backend", "onnxruntime", "--model", str(onnx_fp32_dir), "--steps", "2",
                "--out", str(tmp_path / "x.png"), "--option", "compile=true", torch_blocked=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "does not take the option(s) compile; it takes: providers, threads, prediction_type" in r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("backend, options, match", [
    ("onnxruntime", {"compile": True}, "onnxruntime backend does not take the option\\(s\\) compile"),
    ("onnxruntime", {"threads": 0}, "threads must be an integer >= 1"),
    ("tensorrt", {"channels_last": True}, "tensorrt backend does not take the option\\(s\\) channels_last; "
                                          "it takes: prediction_type, use_graph"),
    ("torch", {"providers": ["CPUExecutionProvider"]}, "torch backend does not take the option\\(s\\) providers"),
])
def test_backend_options_are_checked_first(onnx_fp32_dir, backend, options, match):
    from sdengine.backends import load_backend

    with pytest.raises(InvalidInputError, match=match):
        load_backend(str(onnx_fp32_dir), backend=backend, device="cuda" if backend == "tensorrt" else "cpu",
                     **options)


def test_shape_outside_range_is_refused(ort_pipeline):
    with pytest.raises(InvalidInputError, match="height 256 is outside.*--height"):
        ort_pipeline("a cat", num_inference_steps=2, height=256)
    with pytest.raises(InvalidInputError, match="images 5 is outside"):
        ort_pipeline("a cat", num_inference_steps=2, num_images_per_prompt=5, guidance_scale=1.0)


def _load(folder):
    return sdengine.load_pipeline(folder, backend="onnxruntime")


def _rewrite_manifest(folder, name):
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    record = file_record(folder / f"{name}.onnx")
    data["graphs"][name]["sha256"] = record.pop("sha256")
    data["graphs"][name]["files"][f"{name}.onnx"] = record
    path.write_text(json.dumps(data))


def test_missing_graph(onnx_fp32_dir, tmp_path):
    folder = copy_export(onnx_fp32_dir, tmp_path / "m")
    (folder / "unet.onnx").unlink()  # the plain U-Net: no backend uses it, so no load reads or checks it
    _load(folder)
    (folder / "vae_encoder.onnx").unlink()  # image inputs only, but checked at load (no failure mid-request)
    with pytest.raises(ModelLoadError, match="vae_encoder.onnx is missing.*re-export"):
        _load(folder)


def test_graph_of_another_model(onnx_fp32_dir, tmp_path):
    folder = copy_export(onnx_fp32_dir, tmp_path / "m")
    model = onnx.load(str(folder / "text_encoder.onnx"))
    for prop in model.metadata_props:
        if prop.key == "sdengine.source_sha256":
            prop.value = "0" * 64  # as if exported from other weights
    onnx.save(model, str(folder / "text_encoder.onnx"))
    with pytest.raises(ModelLoadError, match="exported from another model"):
        _load(folder)


def test_graph_of_other_export_settings(onnx_fp32_dir, onnx_fp16_dir, tmp_path):
    folder = copy_export(onnx_fp32_dir, tmp_path / "m")
    shutil.copyfile(onnx_fp16_dir / "denoise_step.onnx", folder / "denoise_step.onnx")
    with pytest.raises(ModelLoadError, match="denoise_step.onnx differs from the graph recorded"):
        _load(folder)


def test_load_checks_fingerprints_and_verify_reads_everything(onnx_fp32_dir, tmp_path):
    """A load compares sizes and a fingerprint of 16 slices of 64 KiB; a byte changed between the slices of
    a file larger than 1 MiB is caught by the full sha256 of `sdengine verify` only."""
    from cli_support import invoke

    from sdengine.manifest import _SAMPLE, _SAMPLES, fingerprint

    folder = copy_export(onnx_fp32_dir, tmp_path / "m")
    graphs = json.loads((folder / "manifest.json").read_text())["graphs"]
    r = invoke("verify", str(folder))
    assert r.returncode == 0 and f"{len(graphs)} file(s)" in r.stdout and "each as exported" in r.stdout, r.stderr
    name = "denoise_step"
    path = folder / graphs[name]["file"]
    size = path.stat().st_size
    assert size > _SAMPLES * _SAMPLE, size  # the tiny step graph spans more than the sampled slices
    record = graphs[name]["files"][path.name]
    assert record == {"size": size, "fingerprint": fingerprint(path)}
    data = bytearray(path.read_bytes())
    gap = _SAMPLE + ((size - _SAMPLE) // (_SAMPLES - 1) - _SAMPLE) // 2  # between the first two slices
    data[gap] ^= 0xFF
    path.write_bytes(bytes(data))
    assert fingerprint(path) == record["fingerprint"]  # what a fingerprint trades for speed
    r = invoke("verify", str(folder))
    assert r.returncode == 2 and f"{path.name} differs from the graph recorded" in r.stderr, r.stderr
    data[gap] ^= 0xFF
    data[-1] ^= 0xFF  # the last byte changed: inside the last slice
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=f"{path.name} differs from the graph recorded"):
        _load(folder)


def test_external_data_outside_the_folder_is_refused(onnx_fp32_dir, tmp_path):
    folder = copy_export(onnx_fp32_dir, tmp_path / "m")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    model = onnx.load(str(folder / "vae_decoder.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../secret.bin")
    onnx.save(model, str(folder / "vae_decoder.onnx"))
    _rewrite_manifest(folder, "vae_decoder")  # a crafted folder: the manifest agrees with the graph
    with pytest.raises(ModelLoadError, match="'../secret.bin', outside the model folder.*refusing to read it"):
        _load(folder)
    tensor.external_data[0].value = str(secret)  # an absolute path
    onnx.save(model, str(folder / "vae_decoder.onnx"))
    _rewrite_manifest(folder, "vae_decoder")
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        _load(folder)


def test_corrupt_graph(onnx_fp32_dir, tmp_path):
    folder = copy_export(onnx_fp32_dir, tmp_path / "m")
    path = folder / "denoise_step.onnx"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ModelLoadError, match="denoise_step.onnx differs .*corrupted"):
        _load(folder)
    path.write_bytes(b"\x08\xff\xff\xff garbage" * 100)
    _rewrite_manifest(folder, "denoise_step")
    with pytest.raises(ModelLoadError, match="denoise_step.onnx is not a valid ONNX graph"):
        _load(folder)


def test_not_an_export_folder(tiny_model_dir, tmp_path, onnx_fp32_dir):
    with pytest.raises(ModelLoadError, match="diffusers model folder: export it first"):
        _load(tiny_model_dir)
    with pytest.raises(ModelLoadError, match="does not exist"):
        _load(tmp_path / "nowhere")
    folder = copy_export(onnx_fp32_dir, tmp_path / "m")
    data = json.loads((folder / "manifest.json").read_text())
    data["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="format version 99"):
        _load(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        _load(folder)


def test_backend_registered_and_unknown_device(onnx_fp32_dir):
    from sdengine.backends import BACKENDS

    assert "onnxruntime" in BACKENDS
    with pytest.raises(InvalidInputError, match="unknown device"):
        sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime", device="tpu")
    with pytest.raises(InvalidInputError, match="lacks NoSuchExecutionProvider"):
        sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime", providers=["NoSuchExecutionProvider"])


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA EP present")
def test_cuda_device_without_the_provider_is_a_clear_error(onnx_fp32_dir):
    with pytest.raises(InvalidInputError, match="lacks CUDAExecutionProvider.*onnxruntime-gpu"):
        sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime", device="cuda")


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with the CUDA execution provider (not installable here)")
@pytest.mark.parametrize("folder", ["onnx_fp32_dir", "onnx_fp16_dir"])
def test_cuda_provider_matches_cpu(request, folder, ort_pipeline):
    gpu = sdengine.load_pipeline(request.getfixturevalue(folder), backend="onnxruntime", device="cuda")
    got, ref = _same_call(gpu, ort_pipeline, num_inference_steps=10, seed=3, eta=0.5)
    assert np.abs(got - ref).mean() < 2


@pytest.mark.skipif("TensorrtExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with the TensorRT execution provider (not installable here)")
def test_tensorrt_provider_matches_cpu(onnx_fp16_dir, ort_pipeline):
    gpu = sdengine.load_pipeline(onnx_fp16_dir, backend="onnxruntime", device="cuda",
                                 providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    got, ref = _same_call(gpu, ort_pipeline, num_inference_steps=10, seed=3)
    assert np.abs(got - ref).mean() < 2


LONG_PROMPT = " ".join(["cat"] * 75) + " a (red:1.3) [square] " + " ".join(["blue"] * 70)  # 2 chunks, weighted


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_long_weighted_prompt_matches_torch(ort_pipeline, tiny_pipeline, guidance):
    """A 2-chunk prompt with emphasis against a short negative: the step graph's context axis is 154 long here."""
    kwargs = dict(negative_prompt="blurry", num_inference_steps=8, seed=4, guidance_scale=guidance)
    got, ref = pixels(ort_pipeline(LONG_PROMPT, **kwargs)), pixels(tiny_pipeline(LONG_PROMPT, **kwargs))
    short = pixels(tiny_pipeline(" ".join(["cat"] * 75), **kwargs))
    diff = np.abs(got - ref)
    print(f"\nparity onnxruntime vs torch, 2-chunk weighted prompt, guidance {guidance}: max pixel difference "
          f"{diff.max()}/255, mean {diff.mean():.2e}")
    assert diff.max() <= 2 and np.abs(ref - short).max() > 0


def test_prompt_longer_than_the_export_is_refused(onnx_fp32_dir, tmp_path):
    from sdengine.export import ExportSettings, export_model

    out = tmp_path / "one-chunk"
    folder = copy_export(onnx_fp32_dir, out)
    data = json.loads((folder / "manifest.json").read_text())
    assert data["shapes"]["chunks"] == 8  # the default export reads 8 chunks
    data["shapes"]["chunks"] = 1  # the ranges say one chunk (the graphs are dynamic either way)
    (folder / "manifest.json").write_text(json.dumps(data))
    pipe = sdengine.load_pipeline(folder, backend="onnxruntime")
    pipe("a cat", num_inference_steps=1)
    with pytest.raises(InvalidInputError, match=r"the prompt needs 2 chunks of 75 tokens .* this export reads 1\.\.1: "
                                                r"re-export with sdengine export --max-prompt-chunks 2"):
        pipe(LONG_PROMPT, num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="--max-prompt-chunks must be between 1 and 8"):
        ExportSettings(max_prompt_chunks=9).ranges(sdengine.config.ModelConfig.tiny())
    with pytest.raises(InvalidInputError, match="a static export reads one prompt chunk"):
        ExportSettings(static=True, max_prompt_chunks=2).ranges(sdengine.config.ModelConfig.tiny())
    del export_model


def test_clip_skip_matches_torch(ort_pipeline, tiny_pipeline):
    """The text encoder graph gathers layer -1-clip_skip: the same embeddings and image as the torch backend."""
    ids = tiny_pipeline.tokenizer(["a photo of a red cat", ""])
    for skip in (0, 1):
        got = ort_pipeline.backend.text_to_host(ort_pipeline.backend.encode_text(ids, clip_skip=skip))
        ref = tiny_pipeline.backend.text_to_host(tiny_pipeline.backend.encode_text(ids, clip_skip=skip))
        np.testing.assert_allclose(got, ref, atol=1e-5)
    kwargs = dict(negative_prompt="blurry", num_inference_steps=8, seed=2, clip_skip=1)
    got, ref = _same_call(ort_pipeline, tiny_pipeline, **kwargs)
    assert np.abs(got - ref).max() <= 2
    assert "Clip skip: 2" in ort_pipeline(PROMPT, **kwargs).infos[0].infotext()
