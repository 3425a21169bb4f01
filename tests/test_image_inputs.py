"""Image to image and inpainting: parity with diffusers' pipelines, every backend, inputs and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdengine
from diffusers_support import diffusers_pipeline, fed_noise, fed_start, pixels
from sdengine.errors import InvalidInputError
from sdengine.pipeline import initial_noise
from sdengine.samplers import build_schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE, SEED = "a photo of a red cat", "blurry", 11
CLASSES = {"ddim": ("DDIMScheduler", {}), "dpmpp_2m": ("DPMSolverMultistepScheduler", {})}
# Full pipelines in fp32 on the CPU, same latents and noise: float rounding only. Bound as for text to image.
MAX_PIXEL_DIFF = 2


def input_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A smooth picture with an edge, so the VAE sees structure."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x), 0.5 + 0.4 * np.cos(5 * y), (x + y > 1.0) * 0.8 + 0.1], axis=2)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def square_mask(size: int = 64, lo: int = 16, hi: int = 48) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = 255
    return Image.fromarray(m)


def reference(pipe, base: dict, name: str, steps: int, strength: float, schedule, unit, noise, **kwargs):
    cls, overrides = CLASSES[name]
    pipe.scheduler = getattr(diffusers, cls).from_config(base, **overrides)
    with fed_start(pipe, unit), fed_noise(pipe.scheduler, noise):
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                   strength=strength, output_type="np", **kwargs)
    return (out.images * 255).round().astype(np.int16)


@pytest.fixture(scope="module")
def img2img_pipe(tiny_model_dir):
    return diffusers_pipeline("StableDiffusionImg2ImgPipeline", tiny_model_dir)


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_model_dir):
    return diffusers_pipeline("StableDiffusionInpaintPipeline", tiny_model_dir)


def ours_and_noise(pipe, name: str, steps: int, strength: float, **kwargs):
    schedule = build_schedule(pipe.config.scheduler, name, steps, strength=strength)
    unit, noise = initial_noise([SEED], (4, 8, 8), schedule)
    got = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, seed=SEED,
               scheduler=name, strength=strength, **kwargs)
    return pixels(got), schedule, unit, noise


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(tiny_pipeline, img2img_pipe, name, strength):
    base = dict(img2img_pipe.scheduler.config)
    got, schedule, unit, noise = ours_and_noise(tiny_pipeline, name, 10, strength, image=input_image())
    want = reference(img2img_pipe, base, name, 10, strength, schedule, unit, noise, image=input_image())
    diff = np.abs(got - want)
    print(f"\nparity img2img {name} strength {strength} vs diffusers: max {diff.max()}/255")
    assert want.std() > 5 and diff.max() <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpaint_4_channels_matches_diffusers(tiny_pipeline, inpaint_pipe, name, strength):
    base = dict(inpaint_pipe.scheduler.config)
    kwargs = dict(image=input_image(), mask_image=square_mask())
    got, schedule, unit, noise = ours_and_noise(tiny_pipeline, name, 10, strength, **kwargs)
    want = reference(inpaint_pipe, base, name, 10, strength, schedule, unit, noise, **kwargs)
    diff = np.abs(got - want)
    print(f"\nparity inpaint (4 channels) {name} strength {strength} vs diffusers: max {diff.max()}/255")
    assert want.std() > 5 and diff.max() <= MAX_PIXEL_DIFF


@pytest.fixture(scope="module")
def inpaint_model_dir(tmp_path_factory):
    """The tiny model with a 9-channel inpainting U-Net (mask and masked image latent as extra inputs)."""
    from sdengine.config import ModelConfig
    from sdengine.models.saving import write_random_model

    return write_random_model(tmp_path_factory.mktemp("inpaint") / "tiny-inpaint", ModelConfig.tiny_inpaint(), seed=2)


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpaint_9_channels_matches_diffusers(inpaint_model_dir, name, strength):
    pipe = sdengine.load_pipeline(inpaint_model_dir)
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(inpaint_model_dir, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    assert pipe.config.inpainting and ref.unet.config.in_channels == 9
    kwargs = dict(image=input_image(), mask_image=square_mask())
    got, schedule, unit, noise = ours_and_noise(pipe, name, 10, strength, **kwargs)
    want = reference(ref, dict(ref.scheduler.config), name, 10, strength, schedule, unit, noise, **kwargs)
    diff = np.abs(got - want)
    print(f"\nparity inpaint (9 channels) {name} strength {strength} vs diffusers: max {diff.max()}/255")
    assert want.std() > 5 and diff.max() <= MAX_PIXEL_DIFF


# --- every backend ----------------------------------------------------------------------------------------------
onnx_support = pytest.importorskip("onnx_support")
from onnx_support import onnx_fp32_dir, ort_pipeline  # noqa: E402,F401


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m_sde"])
def test_onnxruntime_equals_torch(ort_pipeline, tiny_pipeline, kind, name):
    kwargs = dict(image=input_image(), strength=0.7, num_inference_steps=8, seed=3, scheduler=name,
                  num_images_per_prompt=2)
    if kind == "inpaint":
        kwargs["mask_image"] = square_mask()
    diff = np.abs(pixels(ort_pipeline(PROMPT, **kwargs)) - pixels(tiny_pipeline(PROMPT, **kwargs)))
    print(f"\nparity onnxruntime {kind} {name}: max {diff.max()}/255")
    assert diff.max() <= 2


def test_onnxruntime_inpainting_model_equals_torch(inpaint_model_dir, tmp_path):
    from sdengine.export import ExportSettings, export_model

    out = tmp_path / "inpaint-onnx"
    export_model(inpaint_model_dir, out, ExportSettings(), log=lambda line: None)
    ort = sdengine.load_pipeline(out, backend="onnxruntime")
    ref = sdengine.load_pipeline(inpaint_model_dir)
    kwargs = dict(image=input_image(), mask_image=square_mask(), num_inference_steps=8, seed=4, scheduler="unipc")
    diff = np.abs(pixels(ort(PROMPT, **kwargs)) - pixels(ref(PROMPT, **kwargs)))
    print(f"\nparity onnxruntime inpainting U-Net: max {diff.max()}/255")
    assert diff.max() <= 2
    with pytest.raises(InvalidInputError, match="inpainting model"):
        ort(PROMPT, num_inference_steps=2)
