"""txt2img on the torch backend, against diffusers' StableDiffusionPipeline on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from diffusers_support import pixels
from sdengine.errors import InvalidInputError


@pytest.mark.parametrize("steps", [20, 7])
def test_matches_diffusers_pipeline(tiny_pipeline, diffusers_pipe, steps):
    """Same weights, same initial latents, DDIM, guidance 7.5: within 2/255 per pixel."""
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kwargs = dict(negative_prompt="blurry, low quality", num_inference_steps=steps, guidance_scale=7.5,
                  num_images_per_prompt=2)
    ref = diffusers_pipe("a photo of a red cat", latents=torch.from_numpy(latents), output_type="np", **kwargs)
    expected = (ref.images * 255).round().astype(np.int16)
    got = pixels(tiny_pipeline("a photo of a red cat", latents=latents, **kwargs))
    diff = np.abs(got - expected).max()
    print(f"\nparity pipeline vs diffusers, {steps} steps: max pixel difference {diff}/255, "
          f"mean {np.abs(got - expected).mean():.2e}")
    assert expected.std() > 5  # the images are not flat
    assert diff <= 2


# Image i of a batch against the same seed alone: the batch changes which CPU kernels (oneDNN, MKL) run and
# how they split sums, so the floats differ by rounding. Measured worst, in [0, 1] image units, over 12 seeds
# each in batches of 2, 3 and 4, 1 and 2 threads, AVX-512, AVX2 and SSE4.1 kernels, the tiny and the demo
# model: 1.5e-5 (RESULTS.md, "Batch against alone"); uint8 pixels then differ by at most 1 level.
# Bound: 1e-3 (65x the worst seen).
BATCH_FLOAT_TOL = 1e-3


def test_same_seed_same_image_and_seeds_reported(tiny_pipeline):
    a = tiny_pipeline("a cat", num_inference_steps=5, seed=42, num_images_per_prompt=2)
    b = tiny_pipeline("a cat", num_inference_steps=5, seed=42, num_images_per_prompt=2)
    c = tiny_pipeline("a cat", num_inference_steps=5, seed=43)
    assert a.seeds == [42, 43] and c.seeds == [43]
    assert np.array_equal(pixels(a), pixels(b))  # the same call in the same process: the same kernels
    assert not np.array_equal(pixels(a)[0], pixels(a)[1])
    # Image i of a batch uses seed + i, so it can be reproduced alone (up to the batch's rounding).
    assert np.abs(pixels(a)[1] - pixels(c)[0]).max() <= 1
    batch = tiny_pipeline("a cat", num_inference_steps=5, seed=42, num_images_per_prompt=2, output_type="np")
    alone = tiny_pipeline("a cat", num_inference_steps=5, seed=43, output_type="np")
    assert batch.images.shape == (2, 64, 64, 3) and batch.images.dtype == np.float32
    assert np.abs(batch.images[1] - alone.images[0]).max() < BATCH_FLOAT_TOL


def test_eta_uses_seeded_noise(tiny_pipeline):
    a = tiny_pipeline("a dog", num_inference_steps=6, seed=7, eta=1.0)
    b = tiny_pipeline("a dog", num_inference_steps=6, seed=7, eta=1.0)
    d = tiny_pipeline("a dog", num_inference_steps=6, seed=7, eta=0.0)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(d))


def test_random_seed_when_none(tiny_pipeline):
    r = tiny_pipeline("a dog", num_inference_steps=2)
    assert len(r.seeds) == 1 and 0 <= r.seeds[0] < 2**32
    again = tiny_pipeline("a dog", num_inference_steps=2, seed=r.seeds[0])
    assert np.array_equal(pixels(r), pixels(again))


def test_guidance_one_skips_unconditional_pass(tiny_pipeline):
    """g = 1 gives m = m_c exactly; the pipeline then runs the conditional batch alone (and for g < 1, as
    diffusers does)."""
    seen = []
    backend = tiny_pipeline.backend
    original = backend.encode_text

    def spy(ids):
        seen.append(ids.shape[0])
        return original(ids)

    backend.encode_text = spy
    try:
        tiny_pipeline("a dog", negative_prompt="cat", num_inference_steps=3, guidance_scale=1.0, seed=1)
        tiny_pipeline("a dog", negative_prompt="cat", num_inference_steps=3, guidance_scale=2.0, seed=1)
        tiny_pipeline("a dog", negative_prompt="cat", num_inference_steps=3, guidance_scale=0.5, seed=1)
    finally:
        del backend.encode_text
    assert seen == [1, 2, 1]  # as diffusers: guidance only above 1


def test_size_and_prompt_lists(tiny_pipeline):
    r = tiny_pipeline(["a cat", "a dog"], negative_prompt=["", "blurry"], num_inference_steps=2, seed=0,
                      height=72, width=96, num_images_per_prompt=2)
    assert [im.size for im in r.images] == [(96, 72)] * 4
    assert r.seeds == [0, 1, 2, 3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=65), "height must be a multiple of 8 \\(this model's VAE factor\\)"),
    (dict(width=56), "width"),
    (dict(width=2056), "width"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=1001), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance"),
    (dict(guidance_scale=float("inf")), "guidance"),
    (dict(guidance_scale=-1.0), "guidance"),
    (dict(eta=-0.5), "eta"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(num_images_per_prompt=17), "num_images_per_prompt"),
    (dict(seed=-1), "seed"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "latents"),
    (dict(negative_prompt=["a", "b"]), "negative prompts"),
    (dict(output_type="latent"), "output_type"),
    (dict(negative_prompt="blurry \udcff"), "negative_prompt: U\\+DCFF at position 7 is a lone surrogate"),
])
def test_bad_parameters_are_refused(tiny_pipeline, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        tiny_pipeline("a cat", **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 torch path)")
def test_cuda_fp16_close_to_cpu_fp32(tiny_model_dir, tiny_pipeline):
    import sdengine

    gpu = sdengine.load_pipeline(tiny_model_dir, device="cuda")
    a = pixels(gpu("a cat", num_inference_steps=10, seed=3))
    b = pixels(tiny_pipeline("a cat", num_inference_steps=10, seed=3))
    assert np.abs(a - b).mean() < 3


def test_seed_per_image(tiny_pipeline):
    """A list of seeds (one per image) reproduces the images those seeds give alone."""
    both = tiny_pipeline(["a cat", "a dog"], num_inference_steps=3, seed=[5, 9])
    dog = tiny_pipeline("a dog", num_inference_steps=3, seed=9)
    assert both.seeds == [5, 9]
    # Batched with another prompt, float sums may round differently (see BATCH_FLOAT_TOL).
    assert np.abs(pixels(both)[1] - pixels(dog)[0]).max() <= 1
    with pytest.raises(InvalidInputError, match="2 seeds given for 1 images"):
        tiny_pipeline("a cat", seed=[1, 2])


def test_seeds_are_none_when_given_latents_made_the_image(tiny_pipeline):
    """With latents= and no per-step noise, no seed drew anything: report None, in the metadata too."""
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    plain = tiny_pipeline("a cat", num_inference_steps=3, latents=latents, seed=5)
    assert plain.seeds == [None] and plain.images[0].info["seed"] == ""
    assert "Seed:" not in plain.images[0].info["parameters"]
    noisy = tiny_pipeline("a cat", num_inference_steps=3, latents=latents, seed=5, eta=1.0)
    assert noisy.seeds == [5]  # the seed drew the per-step noise


def test_images_carry_their_parameters_and_save_writes_them(tiny_pipeline, tmp_path):
    from a1111_infotext import parse

    r = tiny_pipeline(["a cat", "a dog"], negative_prompt="blurry", num_inference_steps=3, seed=8,
                      guidance_scale=6.0)
    assert [parse(im.info["parameters"])["Prompt"] for im in r.images] == ["a cat", "a dog"]
    fields = parse(r.images[1].info["parameters"])
    assert (fields["Seed"], fields["Steps"], fields["CFG scale"], fields["Negative prompt"]) == ("9", "3", "6",
                                                                                                  "blurry")
    paths = r.save(tmp_path / "pets.png")
    assert [p.name for p in paths] == ["pets-0.png", "pets-1.png"]
    assert Image.open(paths[1]).text["parameters"] == r.images[1].info["parameters"]
    with pytest.raises(InvalidInputError, match=".png"):
        r.save(tmp_path / "pets.jpg")


def overflowing_fp16_vae(model_dir, out):
    """A copy of `model_dir` whose VAE decoder's first conv weights are scaled up to 30000 at most: still
    representable in float16 (max 65504), but their sums overflow it; in float32 the next GroupNorm
    normalises them away. (Weights that are finite in fp16 with activations that are not: the failure of
    real fp16 VAEs.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    path = out / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    weight = state["decoder.conv_in.weight"]
    state["decoder.conv_in.weight"] = weight * (30000.0 / weight.abs().max())
    save_file(state, path)
    return out


def test_non_finite_fp16_decode_is_decoded_again_in_fp32(tiny_model_dir, tmp_path, caplog):
    """An fp16 VAE that overflows gives NaN; the pipeline decodes again in float32 with one warning line."""
    model = overflowing_fp16_vae(tiny_model_dir, tmp_path / "overflow")
    fp16 = sdengine.load_pipeline(model, dtype="float16")
    assert not np.isfinite(fp16.backend.decode(torch.ones(1, 4, 8, 8))).all()  # the fp16 decoder overflows
    with caplog.at_level("WARNING", logger="sdengine"):
        r = fp16("a cat", num_inference_steps=3, seed=2, output_type="np")
    assert r.vae_fp32_fallback and np.isfinite(r.images).all() and r.images.std() > 0.01
    assert [rec.getMessage() for rec in caplog.records if "float32" in rec.getMessage()] == [
        "the VAE decoder produced NaN or infinite values in float16; decoding again in float32"]
    fp32 = sdengine.load_pipeline(model)
    ref = fp32("a cat", num_inference_steps=3, seed=2, output_type="np")
    assert not ref.vae_fp32_fallback
    assert np.abs(r.images - ref.images).mean() < 0.05  # fp16 U-Net, fp32 decoder: close to the fp32 image


def test_non_finite_without_an_fp32_decoder_is_an_error(tiny_pipeline, monkeypatch):
    from sdengine.errors import NonFiniteOutputError

    backend = tiny_pipeline.backend
    monkeypatch.setattr(backend, "decode", lambda latents, fp32=False: np.full((1, 3, 64, 64), np.nan, np.float32))
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite"):
        tiny_pipeline("a cat", num_inference_steps=2, seed=1)
