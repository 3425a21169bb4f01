"""Every sampler end to end: the torch pipeline against diffusers' StableDiffusionPipeline with that
scheduler class (same tiny weights, latents and noise), and every backend against torch.

The tables themselves are checked step by step against diffusers' classes in test_samplers.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import sdengine
from diffusers_support import fed_noise, pixels
from sdengine.pipeline import initial_noise
from sdengine.samplers import build_schedule, sampler_names

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# name -> (diffusers scheduler class, from_config overrides)
DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun_karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lcm": ("LCMScheduler", {}),
}
PROMPT, NEGATIVE, SEEDS = "a photo of a red cat", "blurry", [5, 6]
# Full pipelines in fp32 on the CPU: the images differ only by float rounding (diffusers keeps its tables in
# float32 and runs its own update). Bound: 2/255 per pixel, as for DDIM (test_pipeline.py).
MAX_PIXEL_DIFF = 2


def test_every_listed_sampler_is_compared():
    assert set(sampler_names()) == set(DIFFUSERS)


def diffusers_images(pipe, base_config, name: str, steps: int, latents: np.ndarray, noise, guidance: float = 7.5):
    cls, overrides = DIFFUSERS[name]
    pipe.scheduler = getattr(diffusers, cls).from_config(base_config, **overrides)
    with fed_noise(pipe.scheduler, noise) as calls:
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                   num_images_per_prompt=len(SEEDS), latents=torch.from_numpy(latents), output_type="np")
    return (out.images * 255).round().astype(np.int16), calls["row"] + 1


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("name", sorted(DIFFUSERS))
def test_pipeline_matches_diffusers(tiny_pipeline, diffusers_pipe, name, steps):
    """The same tiny weights, latents and noise: within 2/255 per pixel."""
    if name == "lcm" and steps > 7:
        steps = 4  # LCM runs few steps (its timesteps come from 50 original ones)
    base = dict(diffusers_pipe.scheduler.config)
    schedule = build_schedule(tiny_pipeline.config.scheduler, name, steps)
    unit, noise = initial_noise(SEEDS, (4, 8, 8), schedule)
    ours = tiny_pipeline(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                         seed=SEEDS[0], num_images_per_prompt=2, scheduler=name)
    expected, rows = diffusers_images(diffusers_pipe, base, name, steps, unit, noise)
    diffusers_pipe.scheduler = diffusers.DDIMScheduler.from_config(base)
    got = pixels(ours)
    diff = np.abs(got - expected)
    print(f"\nparity pipeline {name} {steps} steps vs diffusers: max {diff.max()}/255, mean {diff.mean():.2e}")
    assert rows == schedule.num_rows  # one model evaluation per table row
    assert expected.std() > 5
    assert diff.max() <= MAX_PIXEL_DIFF


def test_names_aliases_and_metadata(tiny_pipeline):
    r = tiny_pipeline("a cat", num_inference_steps=4, seed=1, scheduler="DPM++ 2M Karras")
    assert "Sampler: DPM++ 2M Karras" in r.images[0].info["parameters"]
    with pytest.raises(sdengine.InvalidInputError, match="dpmpp_2m_karras"):
        tiny_pipeline("a cat", num_inference_steps=4, scheduler="no_such_sampler")
    with pytest.raises(sdengine.InvalidInputError, match="eta"):
        tiny_pipeline("a cat", num_inference_steps=4, scheduler="euler", eta=0.5)


@pytest.fixture(scope="module")
def lcm_model_dir(tmp_path_factory):
    """The tiny model with an LCM-distilled U-Net's guidance embedding (time_cond_proj_dim)."""
    import dataclasses

    from sdengine.config import ModelConfig
    from sdengine.models.saving import write_random_model

    tiny = ModelConfig.tiny()
    config = dataclasses.replace(tiny, unet=dataclasses.replace(tiny.unet, time_cond_proj_dim=16))
    return write_random_model(tmp_path_factory.mktemp("lcm") / "tiny-lcm", config, seed=1)


def test_lcm_unet_with_guidance_embedding_matches_diffusers(lcm_model_dir):
    """An LCM U-Net takes w = g - 1 through its embedding and runs one pass per image (no negative rows)."""
    pipe = sdengine.load_pipeline(lcm_model_dir)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(lcm_model_dir, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    assert ref.unet.config.time_cond_proj_dim == 16
    base = dict(ref.scheduler.config)
    schedule = build_schedule(pipe.config.scheduler, "lcm", 4)
    unit, noise = initial_noise(SEEDS, (4, 8, 8), schedule)
    seen = []
    original = pipe.backend.encode_text
    pipe.backend.encode_text = lambda ids: seen.append(ids.shape[0]) or original(ids)
    try:
        ours = pixels(pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.0,
                           seed=SEEDS[0], num_images_per_prompt=2, scheduler="lcm"))
    finally:
        del pipe.backend.encode_text
    assert seen == [2]  # two images, no unconditional rows
    expected, _ = diffusers_images(ref, base, "lcm", 4, unit, noise, guidance=6.0)
    kwargs = dict(num_inference_steps=4, seed=SEEDS[0], scheduler="lcm", output_type="np")
    low, high = (pipe(PROMPT, guidance_scale=g, **kwargs).images for g in (1.5, 6.0))
    diff = np.abs(ours - expected)
    print(f"\nparity pipeline lcm (guidance embedding) vs diffusers: max {diff.max()}/255")
    assert expected.std() > 5 and diff.max() <= MAX_PIXEL_DIFF
    assert np.abs(low - high).max() > 1e-3  # the guidance scale reaches the U-Net (rounding noise is ~1e-6)


# --- every backend runs every sampler through its one step graph -------------------------------------------------
onnx_support = pytest.importorskip("onnx_support")
from onnx_support import onnx_fp16_dir, onnx_fp32_dir, ort_pipeline  # noqa: E402,F401


def _steps(name: str) -> int:
    return 4 if name == "lcm" else 7


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
def test_onnxruntime_fp32_equals_torch(ort_pipeline, tiny_pipeline, name):
    kwargs = dict(negative_prompt=NEGATIVE, num_inference_steps=_steps(name), seed=SEEDS[0],
                  num_images_per_prompt=2, scheduler=name)
    diff = np.abs(pixels(ort_pipeline(PROMPT, **kwargs)) - pixels(tiny_pipeline(PROMPT, **kwargs)))
    print(f"\nparity onnxruntime fp32 {name}: max {diff.max()}/255")
    assert diff.max() <= 2


@pytest.fixture(scope="module")
def ort_fp16(onnx_fp16_dir):
    return sdengine.load_pipeline(onnx_fp16_dir, backend="onnxruntime")


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
def test_onnxruntime_fp16_close_to_torch(ort_fp16, tiny_pipeline, name):
    """fp16 U-Net body, fp32 update: the bounds of the fp16 DDIM test (test_onnxruntime_backend.py)."""
    kwargs = dict(negative_prompt=NEGATIVE, num_inference_steps=_steps(name), seed=SEEDS[0],
                  num_images_per_prompt=2, scheduler=name)
    diff = np.abs(pixels(ort_fp16(PROMPT, **kwargs)) - pixels(tiny_pipeline(PROMPT, **kwargs)))
    print(f"\nparity onnxruntime fp16 {name}: max {diff.max()}/255, mean {diff.mean():.2f}")
    assert diff.mean() < 1 and diff.max() <= 8


def test_an_export_with_fewer_slots_refuses_multistep_samplers(tiny_model_dir, tmp_path, tiny_pipeline):
    """--state-slots 1 exports today's DDIM-sized step: single-step samplers run, multistep ones are refused."""
    from sdengine.export import ExportSettings, export_model

    out = tmp_path / "one-slot"
    export_model(tiny_model_dir, out, ExportSettings(state_slots=1, graphs=("text_encoder", "denoise_step", "unet",
                                                                             "vae_decoder", "vae_encoder")),
                 log=lambda line: None)
    pipe = sdengine.load_pipeline(out, backend="onnxruntime")
    kwargs = dict(num_inference_steps=5, seed=3, scheduler="euler_a")
    assert np.abs(pixels(pipe("a cat", **kwargs)) - pixels(tiny_pipeline("a cat", **kwargs))).max() <= 2
    with pytest.raises(sdengine.InvalidInputError, match="needs 2 state slots and this graph has 1.*--state-slots 2"):
        pipe("a cat", num_inference_steps=5, scheduler="dpmpp_2m")


def test_lcm_unet_exports_and_runs_on_onnxruntime(lcm_model_dir, tmp_path):
    """The guidance embedding is part of the exported step: ONNX Runtime equals torch, and g reaches it."""
    from sdengine.export import ExportSettings, export_model

    out = tmp_path / "lcm-onnx"
    export_model(lcm_model_dir, out, ExportSettings(), log=lambda line: None)
    ort = sdengine.load_pipeline(out, backend="onnxruntime")
    ref = sdengine.load_pipeline(lcm_model_dir)
    kwargs = dict(num_inference_steps=4, seed=SEEDS[0], num_images_per_prompt=2, scheduler="lcm", output_type="np")
    for g in (1.5, 6.0):
        got, want = ort(PROMPT, guidance_scale=g, **kwargs).images, ref(PROMPT, guidance_scale=g, **kwargs).images
        assert np.abs(got - want).max() < 2 / 255
    low = ort(PROMPT, guidance_scale=1.5, **kwargs).images
    assert np.abs(low - ort(PROMPT, guidance_scale=6.0, **kwargs).images).max() > 1e-3
