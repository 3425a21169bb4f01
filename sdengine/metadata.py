"""Generation parameters carried by every image: A1111's `parameters` text plus one PNG text chunk per field.

The `parameters` chunk is written exactly in AUTOMATIC1111's infotext format, so image viewers and A1111's
PNG-info tab read it:

    PROMPT
    Negative prompt: NEGATIVE            (only when there is one)
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: NAME, Version: sdengine 0.1.0

A value holding a comma, a colon or a newline is written as a JSON string, as A1111 quotes it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .files import write_bytes_atomic

PARAMETERS = "parameters"  # the PNG text key A1111 reads


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class GenerationInfo:
    """What produced one image; `seed` is None when given latents (and no per-step noise) made it."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    guidance_scale: float
    seed: int | None
    width: int
    height: int
    model: str
    eta: float = 0.0
    strength: float | None = None        # image to image and inpainting (A1111's "Denoising strength")
    source: str | None = None            # the input image: "WxH sha256"
    mask: str | None = None              # the mask: its sha256
    mask_blur: float = 0.0
    loras: tuple = ()                    # active LoRAs: objects with name, scale, sha256 (sdengine.lora.LoraInfo)
    clip_skip: int = 0                   # diffusers' clip_skip; A1111 writes "Clip skip: clip_skip + 1"
    # SDXL's micro-conditioning as it reached the U-Net: the 6 add_time_ids of the conditional rows (original_size
    # h, w; crops_coords_top_left top, left; target_size h, w), then the 6 of the unconditional rows; () for SD 1.x/2.x
    time_ids: tuple = ()
    cache_interval: int = 1              # step caching (sdengine.stepcache): a full U-Net pass every N steps
    cache_branch: int = 0                # ... and the shallow branch of the other steps (deepcache's meaning)

    def infotext(self) -> str:
        """The A1111 `parameters` text."""
        fields: dict[str, Any] = {"Steps": self.steps, "Sampler": self.sampler,
                                  "CFG scale": _number(self.guidance_scale)}
        if self.seed is not None:
            fields["Seed"] = self.seed
        fields["Size"] = f"{self.width}x{self.height}"
        fields["Model"] = self.model
        if self.clip_skip:
            fields["Clip skip"] = self.clip_skip + 1
        if self.eta:
            fields["Eta DDIM"] = _number(self.eta)
        if self.cache_interval > 1:
            fields["DeepCache interval"] = self.cache_interval
            fields["DeepCache branch"] = self.cache_branch
        if self.strength is not None:
            fields["Denoising strength"] = _number(self.strength)
            fields["Source image"] = self.source
        if self.mask is not None:
            fields["Mask blur"] = _number(self.mask_blur)
            fields["Mask hash"] = self.mask[:10]
        if self.loras:  # A1111's field; the scale is in the per-field `loras` chunk
            fields["Lora hashes"] = ", ".join(f"{lo.name}: {lo.sha256[:10]}" for lo in self.loras)
        fields.update(self._micro_fields())
        fields["Version"] = f"sdengine {__version__}"
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
        return "\n".join(lines)

    def _micro_fields(self) -> dict[str, str]:
        """SDXL's micro-conditioning where it differs from its default, in A1111's style: sizes as WxH like "Size",
        crops as A1111's SDXL settings name them (sdxl_crop_top, sdxl_crop_left); the negative rows' values where
        they differ from the positive ones."""
        if len(self.time_ids) != 12:
            return {}
        pos, neg = [_micro_values(self.time_ids[:6]), _micro_values(self.time_ids[6:])]
        size = (float(self.height), float(self.width))
        out: dict[str, str] = {}
        for prefix, values, defaults in (("", pos, (size, (0.0, 0.0), size)), ("Negative ", neg, pos)):
            (original, crop, target), (d_original, d_crop, d_target) = values, defaults
            if original != d_original:
                out[f"{prefix}Original size".capitalize()] = _wxh(original)
            if crop != d_crop:
                out[f"{prefix}Crop top".capitalize()] = _number(crop[0])
                out[f"{prefix}Crop left".capitalize()] = _number(crop[1])
            if target != d_target:
                out[f"{prefix}Target size".capitalize()] = _wxh(target)
        return out

    def text_chunks(self) -> dict[str, str]:
        """PNG text chunks: `parameters` (A1111) and one chunk per field for programs that read them."""
        fields = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "steps": self.steps,
                  "sampler": self.sampler, "guidance_scale": _number(self.guidance_scale), "eta": _number(self.eta),
                  "seed": "" if self.seed is None else self.seed, "width": self.width, "height": self.height,
                  "model": self.model, "software": f"sdengine {__version__}"}
        if self.clip_skip:
            fields["clip_skip"] = self.clip_skip
        if self.cache_interval > 1:
            fields.update(cache_interval=self.cache_interval, cache_branch=self.cache_branch)
        if self.strength is not None:
            fields.update(strength=_number(self.strength), source_image=self.source)
        if self.mask is not None:
            fields.update(mask_sha256=self.mask, mask_blur=_number(self.mask_blur))
        if len(self.time_ids) == 12:  # diffusers' names and (h, w) / (top, left) order, every value as used
            for prefix, values in (("", self.time_ids[:6]), ("negative_", self.time_ids[6:])):
                for name, pair in zip(MICRO_NAMES, _micro_values(values)):
                    fields[f"{prefix}{name}"] = json.dumps([_int_or_float(v) for v in pair])
        if self.loras:
            fields.update(loras=json.dumps([{"name": lo.name, "scale": lo.scale, "sha256": lo.sha256}
                                            for lo in self.loras]))
        return {PARAMETERS: self.infotext(), **{k: str(v) for k, v in fields.items()}}


MICRO_NAMES = ("original_size", "crops_coords_top_left", "target_size")  # SDXL's, in add_time_ids order


def _micro_values(ids: Any) -> tuple[tuple[float, float], ...]:
    """6 add_time_ids -> ((h, w), (top, left), (h, w))."""
    v = [float(x) for x in ids]
    return (v[0], v[1]), (v[2], v[3]), (v[4], v[5])


def _int_or_float(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _wxh(pair: tuple[float, float]) -> str:
    """An (h, w) pair as A1111 writes sizes: WxH."""
    return f"{_number(pair[1])}x{_number(pair[0])}"


def png_bytes(image: Any, info: GenerationInfo | None = None) -> bytes:
    """A PIL image as PNG bytes, with the generation parameters as international text chunks."""
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    for key, value in (info.text_chunks() if info is not None else {}).items():
        chunks.add_itxt(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=chunks)
    return buf.getvalue()


def save_png(image: Any, path: str | Path, info: GenerationInfo | None = None) -> Path:
    """Write a PNG whole or not at all (temporary name, then rename), with ordinary file permissions."""
    path = Path(path)
    write_bytes_atomic(path, png_bytes(image, info))
    return path
