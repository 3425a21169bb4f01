"""SDXL on the torch backend against diffusers' StableDiffusionXLPipeline on the same tiny SDXL-shaped weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import sdengine
from diffusers_support import fed_noise
from sdengine.errors import InvalidInputError, UnsupportedModelError
from sdengine.pipeline import initial_noise, sdxl_time_ids
from sdengine.samplers import build_schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of a red cat"
MAX_PIXEL_DIFF = 2  # per pixel of 255, as for SD 1.x (test_pipeline.py)
# Micro-conditioning away from the defaults: sizes and crops reach the U-Net through add_time_ids.
MICRO = dict(original_size=(512, 768), crops_coords_top_left=(16, 32), target_size=(64, 64),
             negative_original_size=(256, 256), negative_crops_coords_top_left=(0, 8), negative_target_size=(96, 64))


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im) for im in result.images]).astype(np.int16)


@pytest.fixture(scope="module")
def diffusers_xl(tiny_sdxl_dir):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt
    return pipe


def _compare(ours: np.ndarray, expected: np.ndarray, label: str) -> None:
    diff = np.abs(ours - expected)
    print(f"\nparity SDXL pipeline {label} vs diffusers: max {diff.max()}/255, mean {diff.mean():.2e}")
    assert expected.std() > 5  # the images are not flat
    assert diff.max() <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("negative, micro", [("blurry", {}), (None, {}), ("blurry", MICRO)],
                         ids=["negative", "no-negative-zeros", "micro-conditioning"])
def test_matches_diffusers_ddim(tiny_sdxl_pipeline, diffusers_xl, negative, micro):
    """Same weights and latents, DDIM, guidance 7.5, 2 images: within 2/255 per pixel. Without a negative prompt
    the unconditional rows are zeros (force_zeros_for_empty_prompt)."""
    # One image with distinct negative time ids: diffusers 0.42 repeats [negative, positive] time ids per image
    # ([n, p, n, p]) against its context rows [n, n, p, p], so with several images its rows do not line up.
    count = 1 if micro else 2
    latents = np.random.default_rng(0).standard_normal((count, 4, 8, 8)).astype(np.float32)
    kwargs = dict(negative_prompt=negative, num_inference_steps=8, guidance_scale=7.5, num_images_per_prompt=count,
                  **micro)
    diffusers_xl.scheduler = diffusers.DDIMScheduler.from_config(diffusers_xl.scheduler.config)
    ref = diffusers_xl(PROMPT, latents=torch.from_numpy(latents), output_type="np", **kwargs)
    expected = (ref.images * 255).round().astype(np.int16)
    got = pixels(tiny_sdxl_pipeline(PROMPT, latents=latents, **kwargs))
    _compare(got, expected, f"ddim negative={negative!r} micro={bool(micro)}")


def test_matches_diffusers_dpmpp_2m_seeded(tiny_sdxl_pipeline, diffusers_xl):
    """A multistep sampler from a seed (sdengine's noise fed to diffusers): within 2/255 per pixel."""
    seeds, steps = [5, 6], 9
    base = dict(diffusers_xl.scheduler.config)
    schedule = build_schedule(tiny_sdxl_pipeline.config.scheduler, "dpmpp_2m", steps)
    unit, noise = initial_noise(seeds, (4, 8, 8), schedule)
    ours = tiny_sdxl_pipeline(PROMPT, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=5.0,
                              seed=seeds[0], num_images_per_prompt=2, scheduler="dpmpp_2m")
    diffusers_xl.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(base)
    try:
        with fed_noise(diffusers_xl.scheduler, noise):
            ref = diffusers_xl(PROMPT, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=5.0,
                               num_images_per_prompt=2, latents=torch.from_numpy(unit), output_type="np")
    finally:
        diffusers_xl.scheduler = diffusers.DDIMScheduler.from_config(base)
    _compare(pixels(ours), (ref.images * 255).round().astype(np.int16), "dpmpp_2m seeded")


def test_conditioning_inputs_change_the_image(tiny_sdxl_pipeline):
    """Zeros for a None negative differ from encoding "", and the micro-conditioning reaches the U-Net."""
    kw = dict(num_inference_steps=4, seed=3, output_type="np", guidance_scale=5.0)
    none = tiny_sdxl_pipeline(PROMPT, **kw).images
    empty = tiny_sdxl_pipeline(PROMPT, negative_prompt="", **kw).images
    cropped = tiny_sdxl_pipeline(PROMPT, crops_coords_top_left=(32, 0), **kw).images
    assert np.abs(none - empty).max() > 1e-3
    assert np.abs(none - cropped).max() > 1e-3


def test_default_size_and_time_ids(tiny_sdxl_pipeline):
    r = tiny_sdxl_pipeline(PROMPT, num_inference_steps=2, seed=0)
    assert r.images[0].size == (64, 64)  # the tiny U-Net's sample_size 8 x the VAE factor 8
    pos, neg = sdxl_time_ids(1024, 768)
    assert pos.tolist() == neg.tolist() == [1024, 768, 0, 0, 1024, 768]
    pos, neg = sdxl_time_ids(64, 64, original_size=(10, 20), crops_coords_top_left=(1, 2), negative_target_size=(5, 6))
    assert pos.tolist() == [10, 20, 1, 2, 64, 64] and neg.tolist() == [10, 20, 1, 2, 5, 6]
    with pytest.raises(InvalidInputError, match="original_size must be a pair"):
        tiny_sdxl_pipeline(PROMPT, num_inference_steps=2, original_size=(1, 2, 3))
    with pytest.raises(InvalidInputError, match="crops_coords_top_left must be a pair"):
        tiny_sdxl_pipeline(PROMPT, num_inference_steps=2, crops_coords_top_left=(-1, 0))


def test_long_weighted_prompts_and_clip_skip(tiny_sdxl_pipeline):
    """Prompts beyond 75 tokens are chunked for both encoders; emphasis and clip_skip change the image."""
    kw = dict(num_inference_steps=3, seed=1, output_type="np")
    long = ", ".join(["a red cat on a blue mat"] * 20)
    plain = tiny_sdxl_pipeline(long, **kw).images
    weighted = tiny_sdxl_pipeline(long.replace("red cat", "(red cat:1.4)", 1), **kw).images
    skip = tiny_sdxl_pipeline(long, clip_skip=1, **kw).images
    assert np.abs(plain - weighted).max() > 1e-4
    assert np.abs(plain - skip).max() > 1e-4
    with pytest.raises(InvalidInputError, match="clip_skip"):
        tiny_sdxl_pipeline(PROMPT, clip_skip=2, **kw)  # the tiny first encoder has 2 layers


def test_micro_conditioning_refused_on_sd(tiny_pipeline):
    with pytest.raises(InvalidInputError, match="original_size: SDXL's micro-conditioning"):
        tiny_pipeline(PROMPT, num_inference_steps=2, original_size=(512, 512))


def test_image_to_image_and_inpainting_run(tiny_sdxl_pipeline):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    a = tiny_sdxl_pipeline(PROMPT, image=image, strength=0.5, num_inference_steps=4, seed=0)
    b = tiny_sdxl_pipeline(PROMPT, image=image, mask_image=mask, num_inference_steps=4, seed=0)
    assert a.images[0].size == b.images[0].size == (64, 64)


def test_refiner_and_incomplete_folders_refused(tiny_sdxl_dir, tmp_path):
    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl_dir, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None],
                 requires_aesthetics_score=True)
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="SDXL refiner"):
        sdengine.load_pipeline(refiner)
    shutil.rmtree(refiner / "text_encoder_2")
    index.update(_class_name="StableDiffusionXLPipeline", text_encoder=["transformers", "CLIPTextModel"],
                 requires_aesthetics_score=False)
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(sdengine.errors.ModelLoadError, match="text_encoder_2"):
        sdengine.load_pipeline(refiner)


def test_tokenizers_pad_as_sdxl(tiny_sdxl_pipeline):
    assert tiny_sdxl_pipeline.tokenizer.pad_id == 49407
    assert tiny_sdxl_pipeline.tokenizer_2.pad_id == 0  # '!'


def test_cli_tiny_model_generate(tmp_path):
    """`sdengine tiny-model --sdxl`, then `generate` at the model's default size (the ONNX export: test_sdxl_onnx.py)."""
    from PIL import Image

    from sdengine.cli import main

    model = tmp_path / "xl"
    assert main(["tiny-model", str(model), "--sdxl"]) == 0
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--model", str(model), "--steps", "2", "--seed", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


def test_turbo_settings_match_diffusers(tiny_sdxl_dir, tmp_path):
    """SDXL-Turbo's settings on SDXL-shaped weights: its scheduler file (Euler a, trailing spacing, as
    stabilityai/sdxl-turbo ships it), guidance 0 (one text pass, no negative rows), 1 and 4 steps, seeded:
    within 2/255 of diffusers' StableDiffusionXLPipeline with sdengine's noise fed to it."""
    folder = tmp_path / "turbo"
    shutil.copytree(tiny_sdxl_dir, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    path.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    ours = sdengine.load_pipeline(folder)
    assert ours.config.scheduler.timestep_spacing == "trailing"
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    for steps in (1, 4):
        schedule = build_schedule(ours.config.scheduler, "euler_a", steps)
        unit, noise = initial_noise([3], (4, 8, 8), schedule)
        got = ours(PROMPT, num_inference_steps=steps, guidance_scale=0.0, seed=3, scheduler="euler_a")
        with fed_noise(ref.scheduler, noise):
            expected = ref(PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=torch.from_numpy(unit),
                           output_type="np")
        _compare(pixels(got), (expected.images * 255).round().astype(np.int16), f"turbo euler_a {steps} step(s)")


def test_textual_inversion_matches_diffusers(tiny_sdxl_dir, tmp_path, tiny_pipeline):
    """An A1111 SDXL embedding (`clip_l` and `clip_g`, 2 vectors each) read into both text encoders: the image
    within 2/255 of diffusers' pipeline given the same vectors through its two load_textual_inversion calls."""
    from safetensors.numpy import save_file

    from sdengine.config import ModelConfig

    config = ModelConfig.tiny_sdxl()
    rng = np.random.default_rng(3)
    vectors = {key: rng.standard_normal((2, te.hidden_size)).astype(np.float32) * 0.5
               for key, te in (("clip_l", config.text_encoder), ("clip_g", config.text_encoder_2))}
    path = tmp_path / "xl-style.safetensors"
    save_file(vectors, str(path))
    ours = sdengine.load_pipeline(tiny_sdxl_dir)  # its own: the session pipeline keeps its vocabulary
    assert ours.load_textual_inversion(path) == ["xl-style", "xl-style_1"]
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(torch.from_numpy(vectors["clip_l"]), token="xl-style", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(torch.from_numpy(vectors["clip_g"]), token="xl-style",
                               text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    prompt = "a photo of xl-style cat"
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    kwargs = dict(negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5)
    expected = ref(prompt, latents=torch.from_numpy(latents), output_type="np", **kwargs)
    got = ours(prompt, latents=latents, **kwargs)
    _compare(pixels(got), (expected.images * 255).round().astype(np.int16), "textual inversion (2 vectors)")
    plain = pixels(ours("a photo of cat", latents=latents, **kwargs))
    assert np.abs(pixels(got) - plain).max() > 10  # the vectors change the picture
    with pytest.raises(InvalidInputError, match="is an SDXL embedding .* this model is not SDXL"):
        tiny_pipeline.load_textual_inversion(path)
    single = tmp_path / "sd15.safetensors"
    save_file({"emb_params": vectors["clip_l"]}, str(single))
    with pytest.raises(InvalidInputError, match="an SDXL model needs an SDXL embedding, with 'clip_l' and 'clip_g'"):
        ours.load_textual_inversion(single)
