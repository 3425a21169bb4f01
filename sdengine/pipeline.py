"""Text-to-image: tokenize, encode, DDIM loop with classifier-free guidance, decode (DESIGN.md, data flow).

The call follows diffusers' StableDiffusionPipeline names. Initial latents and per-step noise come
from numpy generators seeded per image, so a seed gives the same noise on every backend.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .backends import Backend, StepCallback, load_backend
from .errors import InvalidInputError
from .schedulers import Schedule, ddim_schedule
from .specs import MAX_SIDE, MIN_SIDE  # one set of image-side limits for every path

MAX_IMAGES_PER_PROMPT = 16
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class PipelineResult:
    """Generated images (PIL) and the seed each one used."""

    images: list
    seeds: list[int]


def check_size(name: str, value: int, multiple: int) -> int:
    """An image side: an int in [64, 2048] divisible by the latent factor."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an integer number of pixels, got {value!r}")
    if not MIN_SIDE <= value <= MAX_SIDE or value % multiple:
        raise InvalidInputError(f"{name} must be a multiple of {multiple} between {MIN_SIDE} and {MAX_SIDE}, "
                                f"got {value}")
    return int(value)


def check_guidance(guidance_scale: float) -> float:
    """Classifier-free guidance scale: finite and >= 0 (1 disables the unconditional pass)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.number)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InvalidInputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    return float(guidance_scale)


def _prompt_list(prompt: str | Sequence[str], what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidInputError(f"{what} must be a string or a non-empty list of strings")
    return prompts


def _check_seed(seed: Any, top: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= top:
        raise InvalidInputError(f"seed must be an integer in [0, {top}], got {seed!r}")
    return int(seed)


def image_seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
    """Per-image seeds: seed, seed+1, ... (a random base when None), or one given seed per image."""
    if seed is None:
        seed = secrets.randbelow(2**32)
    if isinstance(seed, (list, tuple, np.ndarray)):
        if len(seed) != count:
            raise InvalidInputError(f"{len(seed)} seeds given for {count} images; give one per image or one in all")
        return [_check_seed(s, MAX_SEED) for s in seed]
    return [_check_seed(seed, MAX_SEED - count) + i for i in range(count)]


def initial_noise(seeds: list[int], shape: tuple[int, ...], schedule: Schedule) -> tuple[np.ndarray, np.ndarray | None]:
    """Initial latents [B,*shape] and, when eta > 0, per-step noise [N,B,*shape], one generator per image."""
    gens = [np.random.Generator(np.random.PCG64(s)) for s in seeds]
    latents = np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens]) * schedule.init_noise_sigma
    if not schedule.needs_noise:
        return latents.astype(np.float32), None
    noise = np.stack([g.standard_normal((schedule.num_steps, *shape), dtype=np.float32) for g in gens], axis=1)
    return latents.astype(np.float32), noise


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3], rounding as diffusers does."""
    x = np.clip(images.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


class Pipeline:
    """txt2img over any backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.config = backend.config
        self.tokenizer = backend.tokenizer

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0,
                 seed: int | Sequence[int] | None = None, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, latents: np.ndarray | None = None,
                 callback: StepCallback | None = None) -> PipelineResult:
        """Generate images; parameters as in diffusers' StableDiffusionPipeline."""
        from PIL import Image

        prompts = _prompt_list(prompt, "prompt")
        negatives = _prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives *= len(prompts)
        if len(negatives) != len(prompts):
            raise InvalidInputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        n = num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_IMAGES_PER_PROMPT:
            raise InvalidInputError(f"num_images_per_prompt must be an integer in [1, {MAX_IMAGES_PER_PROMPT}], "
                                    f"got {n!r}")
        factor = self.config.vae.downscale
        height = check_size("height", self.config.default_size if height is None else height, factor)
        width = check_size("width", self.config.default_size if width is None else width, factor)
        guidance = check_guidance(guidance_scale)
        schedule = ddim_schedule(self.config.scheduler, num_inference_steps, eta)
        batch = len(prompts) * n
        shape = (self.config.unet.in_channels, height // factor, width // factor)
        seeds = image_seeds(seed, batch)
        init, noise = initial_noise(seeds, shape, schedule)
        if latents is not None:
            init = self._given_latents(latents, (batch, *shape))
        rows = [p for p in prompts for _ in range(n)]
        if guidance != 1.0:  # unconditional rows first, as DenoiseStep expects
            rows = [p for p in negatives for _ in range(n)] + rows
        context = self.backend.encode_text(self.tokenizer(rows))
        final = self.backend.denoise(init, context, schedule, guidance, noise, callback)
        pixels = to_uint8(self.backend.decode(final))
        return PipelineResult(images=[Image.fromarray(p) for p in pixels], seeds=seeds)

    @staticmethod
    def _given_latents(latents: Any, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.asarray(latents, dtype=np.float32)
        if arr.shape != shape:
            raise InvalidInputError(f"latents must have shape {list(shape)} (images, channels, height/8, width/8), "
                                    f"got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise InvalidInputError("latents contain NaN or infinite values")
        return arr


def load_pipeline(path: str | None = None, backend: str = "torch", device: str = "cpu", **options: Any) -> Pipeline:
    """A txt2img pipeline over the model at `path` (a diffusers folder or a single .safetensors file).

    With no path, the embedded demo model (64x64 pictures of coloured shapes) is used.
    """
    if path is None:
        from .demo import embedded_model_path

        path = embedded_model_path()
    return Pipeline(load_backend(path, backend=backend, device=device, **options))
