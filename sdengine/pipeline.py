"""Text-to-image: tokenize, encode, the sampler's loop with classifier-free guidance, decode (DESIGN.md).

The call follows diffusers' StableDiffusionPipeline names. Initial latents and per-step noise come
from numpy generators seeded per image, so a seed gives the same noise on every backend.
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends import AddedConditioning, Backend, ImageCondition, StepCallback, load_backend
from .errors import InvalidInputError, NonFiniteOutputError
from .images import ImageInputs, prepare
from .lora import LoraInfo, lora_specs, read_lora
from .metadata import GenerationInfo, save_png
from .prompts import MAX_PROMPT_CHUNKS, apply_emphasis, check_clip_skip, prompt_batch
from .samplers import Schedule, build_schedule
from .specs import MAX_SIDE, MIN_SIDE  # one set of image-side limits for every path
from .stepcache import StepCache, check_step_cache
from .tokenizer import check_text

LORA_FILES_KEPT = 8  # parsed LoRA files a pipeline keeps for set switches

MAX_IMAGES_PER_PROMPT = 16
MAX_SEED = 2**63 - 1
OUTPUT_TYPES = ("pil", "np")
log = logging.getLogger("sdengine")


@dataclass(frozen=True)
class PipelineResult:
    """Generated images (PIL, or float arrays with output_type="np"), each one's seed and parameters.

    `seeds[i]` is None when given latents made image i (no seed was used). `vae_fp32_fallback` is True
    when the decoder's output held NaN or infinity and the images were decoded again in float32.
    """

    images: Any
    seeds: list[int | None]
    infos: list[GenerationInfo] = field(default_factory=list)
    vae_fp32_fallback: bool = False

    def save(self, path: str | Path) -> list[Path]:
        """Write the images as PNGs carrying their parameters: `path` for one image, else stem-0, stem-1 ..."""
        paths = output_paths(path, len(self.infos))
        if not all(hasattr(image, "save") for image in self.images):
            raise InvalidInputError('save() writes PIL images; call the pipeline with output_type="pil"')
        return [save_png(image, p, info) for image, p, info in zip(self.images, paths, self.infos)]


def output_paths(path: str | Path, count: int) -> list[Path]:
    """PNG paths for `count` images: the path itself for one, else with -0, -1 ... before the suffix."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidInputError(f"images are saved as PNG: give a path ending in .png, got {str(path)!r}")
    if not path.parent.is_dir():
        raise InvalidInputError(f"the folder {path.parent} does not exist; create it first")
    return [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def check_size(name: str, value: int, factor: int) -> int:
    """An image side: an int in [64, 2048] divisible by the model's VAE factor (8 for SD, 4 for the demo)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an integer number of pixels, got {value!r}")
    if not MIN_SIDE <= value <= MAX_SIDE or value % factor:
        raise InvalidInputError(f"{name} must be a multiple of {factor} (this model's VAE factor) between "
                                f"{MIN_SIDE} and {MAX_SIDE}, got {value}")
    return int(value)


def uses_guidance(config: Any, guidance_scale: float) -> bool:
    """Classifier-free guidance runs (two U-Net rows per image) when g > 1, as in diffusers; an LCM U-Net
    takes g as an embedding instead."""
    return guidance_scale > 1.0 and config.unet.time_cond_proj_dim is None


def check_guidance(guidance_scale: float) -> float:
    """Classifier-free guidance scale: finite and >= 0 (at most 1: the conditional pass alone, as in diffusers)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.number)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InvalidInputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    return float(guidance_scale)


def _prompt_pairs(prompt: Any, negative_prompt: Any) -> tuple[list[str], list[str]]:
    prompts = _prompt_list(prompt, "prompt")
    negatives = _prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives *= len(prompts)
    if len(negatives) != len(prompts):
        raise InvalidInputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return prompts, negatives


def _check_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_IMAGES_PER_PROMPT:
        raise InvalidInputError(f"num_images_per_prompt must be an integer in [1, {MAX_IMAGES_PER_PROMPT}], "
                                f"got {n!r}")
    return int(n)


def _check_strength(strength: Any, inputs: Any) -> float:
    """In (0, 1]; by default 0.8 for image to image and 1.0 for inpainting, as diffusers."""
    if inputs is None:
        if strength not in (None, 1, 1.0):
            raise InvalidInputError("strength needs image: how much of the given image is repainted")
        return 1.0
    if strength is None:
        return 1.0 if inputs.mask is not None else 0.8
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.number)) \
            or not math.isfinite(strength) or not 0 < strength <= 1:
        raise InvalidInputError(f"strength must be a number in (0, 1], got {strength!r}")
    return float(strength)


def _prompt_list(prompt: str | Sequence[str], what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidInputError(f"{what} must be a string or a non-empty list of strings")
    for text in prompts:
        try:
            check_text(text)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{what}: {exc}") from None
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
    """Unit Gaussian initial noise [B,*shape] and, for a stochastic sampler, per-row noise [R,B,*shape]: one
    PCG64 generator per image, so an image's noise is its seed's on every backend and in every batch."""
    gens = [np.random.Generator(np.random.PCG64(s)) for s in seeds]
    latents = np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens])
    if not schedule.needs_noise:
        return latents, None
    noise = np.stack([g.standard_normal((schedule.num_rows, *shape), dtype=np.float32) for g in gens], axis=1)
    return latents, noise


def posterior_noise(seeds: list, shape: tuple[int, ...]) -> np.ndarray:
    """Unit noise [B,*shape] for drawing from the VAE posterior, one stream per image apart from its latents'."""
    return np.stack([np.random.Generator(np.random.PCG64([0 if s is None else s, 1])).standard_normal(
        shape, dtype=np.float32) for s in seeds])


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3], rounding as diffusers does."""
    x = np.clip(images.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


class Pipeline:
    """txt2img over any backend; `model_name` goes into the images' metadata."""

    def __init__(self, backend: Backend, model_name: str = "", embedded: bool = False) -> None:
        self.backend = backend
        self.config = backend.config
        self.tokenizer = backend.tokenizer
        self.tokenizer_2 = getattr(backend, "tokenizer_2", None)  # SDXL's second tokenizer (pads with '!')
        if self.config.sdxl and not hasattr(backend, "encode_text_sdxl"):
            raise InvalidInputError(f"SDXL on the {type(backend).__name__} backend is not supported yet (issue 15): "
                                    f"use --backend torch")
        self.model_name = model_name or "model"
        self.embedded = embedded  # the demo model: prompts outside its vocabulary get a warning
        self.loras: tuple[LoraInfo, ...] = ()  # the active LoRAs, in the order they were merged
        self._lora_files: dict[tuple, Any] = {}  # (path, size, mtime, strict) -> parsed LoraFile, most recent last

    def set_loras(self, loras: Any = None, strict: bool = True) -> float:
        """Make `loras` ({path: scale}) the active set, merged into the weights; {} or None removes all.

        The weights are recomputed from the pristine base for every call, so a set gives the same weights
        whatever was active before. Returns the seconds it took (reading, merging, swapping).
        """
        start = time.perf_counter()
        specs = lora_specs(loras)
        if not hasattr(self.backend, "set_loras"):
            if specs:
                raise InvalidInputError(f"the {type(self.backend).__name__} backend does not take LoRAs; use the "
                                        f"torch or onnxruntime backend")
            return time.perf_counter() - start
        targets = self.backend.lora_targets() if specs else {}
        files = [(self._read_lora(path, targets, strict), scale) for path, scale in specs]
        self.backend.set_loras(files)
        self.loras = tuple(LoraInfo(f.name, scale, f.sha256) for f, scale in files)
        return time.perf_counter() - start

    def _read_lora(self, path: Any, targets: dict, strict: bool) -> Any:
        """A LoRA file parsed once and kept while unchanged (size and mtime), for the last LORA_FILES_KEPT files:
        a server switching between its sets reads and hashes nothing again."""
        try:
            found = Path(path).expanduser().resolve()
            stat = found.stat()
        except OSError:
            return read_lora(path, targets, strict=strict)  # its own message for a missing file
        key = (str(found), stat.st_size, stat.st_mtime_ns, strict)
        parsed = self._lora_files.pop(key, None) or read_lora(path, targets, strict=strict)
        self._lora_files[key] = parsed
        while len(self._lora_files) > LORA_FILES_KEPT:
            del self._lora_files[next(iter(self._lora_files))]
        return parsed

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0,
                 seed: int | Sequence[int] | None = None, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, latents: np.ndarray | None = None,
                 callback: StepCallback | None = None, output_type: str = "pil",
                 scheduler: str = "ddim", image: Any = None, mask_image: Any = None, strength: float | None = None,
                 mask_blur: float = 0.0, keep_unmasked: bool = False, sample_posterior: bool = False,
                 prompt_weighting: bool = True, clip_skip: int | None = None,
                 original_size: Sequence[int] | None = None, crops_coords_top_left: Sequence[int] = (0, 0),
                 target_size: Sequence[int] | None = None, negative_original_size: Sequence[int] | None = None,
                 negative_crops_coords_top_left: Sequence[int] | None = None,
                 negative_target_size: Sequence[int] | None = None, cache_interval: int | None = None,
                 cache_branch: int | None = None) -> PipelineResult:
        """Generate images; parameters as in diffusers' StableDiffusion(Img2Img|Inpaint)Pipeline.

        `scheduler` names the sampler (sdengine.sampler_names(); A1111's names too); `latents` is unit
        Gaussian noise, scaled by the sampler's initial sigma as diffusers does; guidance_scale > 1 runs
        classifier-free guidance (an LCM U-Net takes it as an embedding instead). With `image`, the image is
        encoded and noised to where `strength` of the schedule remains (default 0.8; 1.0 with a mask);
        `mask_image` repaints its white (or transparent) part: re-imposing the rest at every row with a plain
        U-Net, as extra input channels with an inpainting U-Net.

        Prompts take A1111's syntax (README, "Prompts"): any length up to MAX_PROMPT_CHUNKS chunks of 75 tokens,
        BREAK, and emphasis `(word)`, `[word]`, `(word:1.3)` unless prompt_weighting=False. `clip_skip` = n
        conditions on layer -1-n of the text encoder, as diffusers (A1111's "Clip skip: n+1"; SDXL: layer -2-n
        of both encoders, as diffusers' StableDiffusionXLPipeline).

        SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2), with diffusers' names, each an (h, w) or
        (top, left) pair: original_size and target_size default to (height, width), crops_coords_top_left to
        (0, 0); the negative_* values condition the unconditional rows and default to their positive
        counterparts. Without a negative prompt (None) the unconditional rows are zeros when the model's
        force_zeros_for_empty_prompt says so (SDXL's default), as in diffusers.

        Step caching (DeepCache, README "Step caching"): cache_interval=N runs the whole U-Net every N steps and
        only its shallow branch `cache_branch` (default 0, the shallowest) in between, reusing the deep features
        of the last full step; both mean what they mean in the `deepcache` package. None or 1: no caching.
        """
        zero_negative = negative_prompt is None and self.config.sdxl and self.config.force_zeros_for_empty_prompt
        prompts, negatives = _prompt_pairs(prompt, negative_prompt)
        if not isinstance(prompt_weighting, bool):
            raise InvalidInputError(f"prompt_weighting must be True or False, got {prompt_weighting!r}")
        layers = self.config.text_encoder.num_hidden_layers
        if self.config.sdxl:
            layers = min(layers, self.config.text_encoder_2.num_hidden_layers)
        clip_skip = check_clip_skip(clip_skip, layers)
        micro = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                     target_size=target_size, negative_original_size=negative_original_size,
                     negative_crops_coords_top_left=negative_crops_coords_top_left,
                     negative_target_size=negative_target_size)
        if not self.config.sdxl:
            given = [k for k, v in micro.items() if v is not None and not (
                k == "crops_coords_top_left" and isinstance(v, (tuple, list)) and tuple(v) == (0, 0))]
            if given:
                raise InvalidInputError(f"{', '.join(given)}: SDXL's micro-conditioning; this model is not SDXL")
        n = _check_count(num_images_per_prompt)
        cache = check_step_cache(cache_interval, cache_branch, self.config.unet)
        cached = {} if cache is None else {"cache": self._step_cache(cache)}
        if output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        factor = self.config.vae.downscale
        inputs = self._image_inputs(image, mask_image, factor, width, height, mask_blur)
        if inputs is not None:
            width, height = inputs.size
        height = check_size("height", self.config.default_size if height is None else height, factor)
        width = check_size("width", self.config.default_size if width is None else width, factor)
        guidance = check_guidance(guidance_scale)
        strength = _check_strength(strength, inputs)
        schedule = build_schedule(self.config.scheduler, scheduler, num_inference_steps, eta, strength=strength)
        batch = len(prompts) * n
        shape = (self.config.vae.latent_channels, height // factor, width // factor)
        seeds: list[int | None] = list(image_seeds(seed, batch))
        unit, noise = initial_noise(seeds, shape, schedule)
        if latents is not None:
            unit = self._given_latents(latents, (batch, *shape), factor)
            if noise is None and not sample_posterior:  # the seeds drew nothing that made these images
                seeds = [None] * batch
        init, condition = self._start(inputs, schedule, unit, seeds, sample_posterior)
        rows = [p for p in prompts for _ in range(n)]
        guided = uses_guidance(self.config, guidance)
        time_ids = sdxl_time_ids(height, width, **micro) if self.config.sdxl else None
        if self.config.sdxl:
            context, added = self._condition_sdxl(rows, [p for p in negatives for _ in range(n)] if guided else None,
                                                  zero_negative, prompt_weighting, clip_skip, time_ids)
            final = self.backend.denoise(init, context, schedule, guidance, noise, callback, condition, added=added,
                                         **cached)
        else:
            if guided:  # unconditional rows first, as DenoiseStep expects
                rows = [p for p in negatives for _ in range(n)] + rows
            context = self._encode_prompts(rows, prompt_weighting, clip_skip)
            if self.embedded:
                _warn_outside_demo_vocabulary(prompts)
            final = self.backend.denoise(init, context, schedule, guidance, noise, callback, condition, **cached)
        images, fallback = self._decode(final)
        if keep_unmasked and inputs is not None and inputs.soft_mask is not None:
            soft = inputs.soft_mask[None, None]
            images = (soft * images + (1 - soft) * inputs.pixels).astype(np.float32)
        extra = {} if inputs is None else dict(strength=strength, source=inputs.source, mask=inputs.mask_sha256,
                                               mask_blur=float(mask_blur))
        if time_ids is not None:  # SDXL: the micro-conditioning as used, recorded in the PNG (sdengine.metadata)
            extra["time_ids"] = tuple(float(v) for v in np.concatenate(time_ids))
        infos = [GenerationInfo(prompt=p, negative_prompt=neg, steps=schedule.steps, sampler=schedule.label,
                                guidance_scale=guidance, seed=s, width=width, height=height, model=self.model_name,
                                eta=float(eta), loras=self.loras, clip_skip=clip_skip,
                                cache_interval=1 if cache is None else cache.interval,
                                cache_branch=0 if cache is None else cache.branch, **extra)
                 for (p, neg), s in zip([(p, q) for p, q in zip(prompts, negatives) for _ in range(n)], seeds)]
        if output_type == "np":
            return PipelineResult(to_unit_float(images), seeds, infos, fallback)
        return PipelineResult(_pil_images(to_uint8(images), infos), seeds, infos, fallback)

    def _step_cache(self, cache: StepCache) -> StepCache:
        """`cache` when the backend's denoise takes it (which then checks what it can run), else a refusal."""
        if "cache" not in inspect.signature(self.backend.denoise).parameters:
            raise InvalidInputError(f"step caching (cache_interval) is not supported on the "
                                    f"{type(self.backend).__name__} backend yet: use the torch or onnxruntime backend")
        return cache

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> list[str]:
        """Add a textual inversion embedding (A1111 or diffusers safetensors; README, "Prompts"): its trigger (`token`,
        else the file's token name or file name) then reads as its n vectors in prompts. The tokens added."""
        from .embeddings import read_embedding

        emb = read_embedding(path, token)
        add = getattr(self.backend, "add_token_embeddings", None)
        if add is None:
            raise InvalidInputError("this backend cannot add textual inversion embeddings (a TensorRT engine's token "
                                    "table is fixed): use --backend torch or onnxruntime")
        sdxl = self.config.sdxl
        if sdxl and emb.vectors_2 is None:
            raise InvalidInputError(f"{path} is an SD 1.x/2.x embedding (one set of vectors); an SDXL model needs "
                                    "an SDXL embedding, with 'clip_l' and 'clip_g' vectors (one per text encoder)")
        if not sdxl and emb.vectors_2 is not None:
            raise InvalidInputError(f"{path} is an SDXL embedding ('clip_l' and 'clip_g'); this model is not SDXL: "
                                    "use an embedding trained for it")
        tokenizers = [self.tokenizer, self.tokenizer_2] if sdxl else [self.tokenizer]
        taken = [t for t in emb.tokens for tok in tokenizers if tok.has_token(t)]
        if taken:
            raise InvalidInputError(f"the token {taken[0]!r} is already in the vocabulary: give the embedding another "
                                    "token (--embedding FILE:TOKEN, or token=...)")
        starts = add(emb.vectors, emb.vectors_2) if sdxl else (add(emb.vectors),)
        for start, tok in zip(starts, tokenizers):
            if start != tok.vocab_size:
                raise InvalidInputError(f"a text encoder's token table had {start} rows and its tokenizer "
                                        f"{tok.vocab_size} tokens: embeddings were added to one without the "
                                        "other; load the pipeline again")
        for tok in tokenizers:
            tok.add_tokens(emb.tokens)
        return emb.tokens

    def _encode_prompts(self, rows: list[str], weighting: bool, clip_skip: int) -> Any:
        """Text embeddings of `rows`: [R, 77, D] on the device for one unweighted chunk each, else every chunk index
        encoded on its own, weighted and concatenated on the host to [R, 77k, D] (sdengine.prompts)."""
        ids, weights = prompt_batch(self.tokenizer, rows, weighting, MAX_PROMPT_CHUNKS)
        encode = self.backend.encode_text
        run = (lambda x: encode(x)) if not clip_skip else (lambda x: encode(x, clip_skip=clip_skip))
        if ids.shape[1] == 1 and (weights == 1).all():
            return run(ids[:, 0])
        hidden = np.stack([self.backend.text_to_host(run(ids[:, c])) for c in range(ids.shape[1])], axis=1)
        return apply_emphasis(hidden, weights)

    def _condition_sdxl(self, rows: list[str], negatives: list[str] | None, zero_negative: bool, weighting: bool,
                        clip_skip: int, time_ids: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, AddedConditioning]:
        """SDXL's context [R, 77k, D1 + D2], pooled text [R, P] and time ids [R, 6], unconditional rows first when
        `negatives` is given (zeros for them with zero_negative, as diffusers' force_zeros_for_empty_prompt)."""
        positive, negative = time_ids
        if negatives is None:
            context, pooled = self._encode_sdxl(rows, weighting, clip_skip)
            return context, AddedConditioning(pooled, np.tile(positive, (len(rows), 1)))
        if zero_negative:
            context, pooled = self._encode_sdxl(rows, weighting, clip_skip)
            context = np.concatenate([np.zeros_like(context), context])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        else:
            context, pooled = self._encode_sdxl(negatives + rows, weighting, clip_skip)
        ids = np.concatenate([np.tile(negative, (len(rows), 1)), np.tile(positive, (len(rows), 1))])
        return context, AddedConditioning(pooled, ids)

    def _encode_sdxl(self, rows: list[str], weighting: bool, clip_skip: int) -> tuple[np.ndarray, np.ndarray]:
        """Both encoders on every chunk of 75 tokens (each tokenizer's own padding), each encoder's hidden states
        weighted on its own (A1111's SDXL), concatenated on the channel axis; the pooled output of the first chunk
        (A1111; diffusers reads one chunk only)."""
        ids, weights = prompt_batch(self.tokenizer, rows, weighting, MAX_PROMPT_CHUNKS)
        ids_2, weights_2 = prompt_batch(self.tokenizer_2, rows, weighting, MAX_PROMPT_CHUNKS)
        if ids.shape != ids_2.shape:
            raise InvalidInputError(f"the two tokenizers cut the prompts into {ids.shape[1]} and {ids_2.shape[1]} "
                                    "chunks: their vocabularies differ; check the model's tokenizer_2 folder")
        encoded = [self.backend.encode_text_sdxl(ids[:, c], ids_2[:, c], clip_skip) for c in range(ids.shape[1])]
        first = apply_emphasis(np.stack([e[0] for e in encoded], axis=1), weights)
        second = apply_emphasis(np.stack([e[1] for e in encoded], axis=1), weights_2)
        return np.concatenate([first, second], axis=-1), encoded[0][2].astype(np.float32)

    def _image_inputs(self, image: Any, mask_image: Any, factor: int, width: int | None, height: int | None,
                      mask_blur: Any) -> ImageInputs | None:
        if isinstance(mask_blur, bool) or not isinstance(mask_blur, (int, float)) or not 0 <= mask_blur <= 256:
            raise InvalidInputError(f"mask_blur must be a number of pixels in [0, 256], got {mask_blur!r}")
        if image is None:
            if mask_image is not None:
                raise InvalidInputError("mask_image needs image: the picture whose masked part is repainted")
            if self.config.inpainting:
                raise InvalidInputError("this is an inpainting model (a 9-channel U-Net): pass image= and "
                                        "mask_image=")
            return None
        if self.config.inpainting and mask_image is None:
            raise InvalidInputError("this is an inpainting model (a 9-channel U-Net): pass mask_image= with image=")
        return prepare(image, mask_image, factor, width, height, float(mask_blur))

    def _start(self, inputs: ImageInputs | None, schedule: Schedule, unit: np.ndarray, seeds: list,
               sample_posterior: bool) -> tuple[np.ndarray, ImageCondition | None]:
        """The first latents and the loop's image condition: text to image, image to image or inpainting."""
        pure = (unit * np.float32(schedule.init_scale)).astype(np.float32)
        if inputs is None:
            return pure, None
        batch, f = unit.shape[0], self.config.vae.downscale
        x0 = self._encode(inputs.pixels, batch, seeds, sample_posterior)
        a, s = schedule.levels[0]
        noised = (np.float32(a) * x0 + np.float32(s) * unit).astype(np.float32)
        if inputs.mask is None:
            return noised, None
        init = pure if schedule.strength >= 1.0 else noised  # diffusers: pure noise at full strength
        mask = np.repeat(inputs.latent_mask(f), batch, axis=0)
        if self.config.inpainting:  # the U-Net reads the mask and the masked image's latent
            known = self._encode(inputs.masked_pixels(), batch, seeds, sample_posterior)
            return init, ImageCondition(mask, known, unit, np.zeros((schedule.num_rows, 3), np.float32))
        blend = np.concatenate([schedule.levels[1:], np.ones((schedule.num_rows, 1))], axis=1).astype(np.float32)
        return init, ImageCondition(mask, x0, unit, blend)

    def _encode(self, pixels: np.ndarray, batch: int, seeds: list, sample_posterior: bool) -> np.ndarray:
        """The image's scaled latent for each of `batch` images: the posterior's mean, or a draw from it."""
        mean, std = self.backend.encode_image(pixels)
        x0 = np.repeat(mean, batch, axis=0)
        if sample_posterior:
            x0 = x0 + np.repeat(std, batch, axis=0) * posterior_noise(seeds, mean.shape[1:])
        return x0.astype(np.float32)

    def _decode(self, final: Any) -> tuple[np.ndarray, bool]:
        """Decode; NaN or infinity (an fp16 VAE overflowing) is decoded again in float32, as A1111 does."""
        images = self.backend.decode(final)
        if np.isfinite(images).all():
            return images, False
        if not getattr(self.backend, "can_decode_fp32", False):
            raise NonFiniteOutputError(
                "the VAE decoder produced NaN or infinite values and this backend has no float32 decoder to retry "
                "with; " + getattr(self.backend, "fp32_advice", "the model's weights overflow even in float32"))
        log.warning("the VAE decoder produced NaN or infinite values in float16; decoding again in float32")
        images = self.backend.decode(final, fp32=True)
        if not np.isfinite(images).all():
            raise NonFiniteOutputError("the image holds NaN or infinite values even when decoded in float32: the "
                                       "denoise loop's latents overflowed; try the CPU in float32 (--device cpu) "
                                       "or fewer steps, a lower guidance scale")
        return images, True

    @staticmethod
    def _given_latents(latents: Any, shape: tuple[int, ...], factor: int) -> np.ndarray:
        arr = np.asarray(latents, dtype=np.float32)
        if arr.shape != shape:
            raise InvalidInputError(f"latents must have shape {list(shape)} (images, channels, height/{factor}, "
                                    f"width/{factor}: {factor} is this model's VAE factor), got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise InvalidInputError("latents contain NaN or infinite values")
        return arr


def _pair(name: str, value: Any, default: tuple[int, int]) -> tuple[float, float]:
    """An (h, w) or (top, left) pair of finite numbers >= 0 (None: the default)."""
    if value is None:
        return default
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2 or not all(
            not isinstance(v, bool) and isinstance(v, (int, float, np.number)) and math.isfinite(v) and 0 <= v <= 1e6
            for v in value):
        raise InvalidInputError(f"{name} must be a pair of numbers >= 0 ((height, width) or (top, left)), "
                                f"got {value!r}")
    return float(value[0]), float(value[1])


def sdxl_time_ids(height: int, width: int, original_size: Any = None, crops_coords_top_left: Any = (0, 0),
                  target_size: Any = None, negative_original_size: Any = None,
                  negative_crops_coords_top_left: Any = None,
                  negative_target_size: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """SDXL's add_time_ids [6] for the conditional and the unconditional rows: original_size + crops_coords_top_left
    + target_size (diffusers' _get_add_time_ids); each negative value defaults to its positive one."""
    size = (float(height), float(width))
    original = _pair("original_size", original_size, size)
    crops = _pair("crops_coords_top_left", crops_coords_top_left, (0.0, 0.0))
    target = _pair("target_size", target_size, size)
    negative = (_pair("negative_original_size", negative_original_size, original)
                + _pair("negative_crops_coords_top_left", negative_crops_coords_top_left, crops)
                + _pair("negative_target_size", negative_target_size, target))
    return np.array(original + crops + target, np.float32), np.array(negative, np.float32)


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """Float images [B,3,H,W] in [-1,1] -> float32 [B,H,W,3] in [0,1] (diffusers' output_type="np")."""
    return np.clip(images.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def _pil_images(pixels: np.ndarray, infos: list[GenerationInfo]) -> list:
    """PIL images carrying their parameters in `info` (what PipelineResult.save writes to the PNG)."""
    from PIL import Image

    images = []
    for p, info in zip(pixels, infos):
        image = Image.fromarray(p)
        image.info.update(info.text_chunks())
        images.append(image)
    return images


def _warn_outside_demo_vocabulary(prompts: list[str]) -> None:
    """The demo model knows six colours and three shapes: say so when a prompt names none of them."""
    from .demo.shapes import COLOURS, SHAPES

    known = set(COLOURS) | set(SHAPES) | {f"{s}s" for s in SHAPES}
    for prompt in dict.fromkeys(prompts):
        words = set(prompt.lower().replace(",", " ").split())
        if not words & known:
            log.warning("the embedded demo model only draws a %s in %s; %r names none of them, so the shape and "
                        "colour are left to chance", ", ".join(SHAPES[:-1]) + " or " + SHAPES[-1],
                        ", ".join(COLOURS), prompt[:60])


def load_pipeline(path: str | None = None, backend: str = "torch", device: str = "cpu", loras: Any = None,
                  lora_strict: bool = True, **options: Any) -> Pipeline:
    """A txt2img pipeline over the model at `path` (a diffusers folder or a single .safetensors file).

    With no path, the embedded demo model (64x64 pictures of coloured shapes) is used. `loras`
    ({path: scale}) are merged into the weights (Pipeline.set_loras); lora_strict=False skips their keys
    that match no weight instead of refusing the file.
    """
    from .demo import EMBEDDED_MODEL, embedded_model_path

    if path is None:
        path = embedded_model_path()
    embedded = Path(path).expanduser().resolve() == EMBEDDED_MODEL
    name = "sdengine-demo" if embedded else model_name(path)
    pipe = Pipeline(load_backend(path, backend=backend, device=device, **options), name, embedded)
    if loras:
        pipe.set_loras(loras, strict=lora_strict)
    return pipe


def model_name(path: str | Path) -> str:
    """A model's name for metadata, as A1111 names checkpoints: the file or folder name without extension."""
    p = Path(path)
    return p.stem if p.suffix.lower() == ".safetensors" else p.name or str(p)
