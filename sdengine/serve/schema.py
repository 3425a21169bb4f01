"""The HTTP API's bodies as pydantic models: what FastAPI's OpenAPI document shows and what requests are
validated against (OpenAI's image API shape plus sdengine's extension fields).

The loaded model's own limits (its VAE factor, engine profile, text encoder depth, the server's --max-batch,
--max-steps, --max-pixels, its LoRAs) are known only once it has loaded: they reach the validators as the
validation `context` (a `Limits`). Every refusal is a `RequestError` with the HTTP status, a message that
names the field, the value and the accepted range, and the field (`param`). 400: the body is not JSON;
413: the body is too large; 422: the JSON is well formed but a field is unknown, of the wrong type or out of
range. Pydantic's own error list never reaches a client: `refusal` turns its first error into that message.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from ..errors import InvalidInputError
from ..pipeline import MAX_IMAGES_PER_PROMPT, MAX_SEED, MAX_SIDE, MIN_SIDE, check_size
from ..prompts import MAX_PROMPT_CHUNKS
from ..samplers import build_schedule, canonical_name
from ..samplers.table import fit_slots
from ..schedulers import SchedulerConfig
from .settings import MAX_STEPS

MAX_BODY_BYTES = 64 * 1024
SIZE_RE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# OpenAI's fields we accept and ignore: one model is served; OpenAI's quality and style choose among its own
# models' settings.
IGNORED = ("model", "user", "quality", "style")
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_unavailable", 504: "timeout_error"}


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and the offending field when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class Limits:
    """What the loaded model, its engine profile and the server's settings accept."""

    factor: int                      # VAE downscale: sides are multiples of it
    default_size: tuple[int, int]    # (width, height) when `size` is absent
    width_range: tuple[int, int] | None = None   # an engine profile's width min..max, if any
    height_range: tuple[int, int] | None = None
    max_pixels: int = 512 * 512
    max_images: int = 4              # n: 1..max_images (= the server's --max-batch)
    default_steps: int = 20
    max_steps: int = 100
    max_prompt_chunks: int = MAX_PROMPT_CHUNKS  # chunks of 75 tokens (README, "Prompts"); an export's own limit
    count_chunks: Callable[[str, bool], int] = lambda text, weighting: 1  # (text, prompt_weighting) -> chunks
    clip_layers: int = 12            # the text encoder's layers: clip_skip is 0 .. clip_layers - 1
    scheduler: SchedulerConfig | None = None
    slots: int | None = None         # an export's denoise-step state: samplers needing more are refused
    inpainting: bool = False         # a 9-channel U-Net: every request needs an image and a mask (edits)
    loras: tuple[str, ...] = ()      # the LoRAs requests may choose (the server's --lora files, by name)
    default_loras: tuple[tuple[str, float], ...] = ()  # the set of a request without `loras`
    sdxl: bool = False               # an SDXL model: the micro-conditioning fields (MICRO_FIELDS) are taken
    max_cache_branch: int = 11       # step caching: cache_branch 0 .. 3 x the U-Net's blocks - 1
    cache_branches: tuple[int, ...] | None = None  # the branches the backend runs (an export's); None: any


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: one prompt, `n` images of `width` x `height`, seeds seed .. seed+n-1."""

    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    eta: float
    seed: int
    scheduler: str = "ddim"  # canonical sampler name
    image: bytes | None = None       # an edit's image, as uploaded (checked)
    mask: Any = None                 # an edit's mask: [H, W] floats, 1 where the image is repainted
    strength: float | None = None
    inputs_key: str = ""             # sha256 of the image and mask: edits batch only with the same ones
    prompt_weighting: bool = True    # A1111's emphasis syntax; False reads brackets as text
    clip_skip: int = 0
    chunks: int = 1                  # prompt chunks of the longer of prompt and negative prompt
    loras: tuple[tuple[str, float], ...] = ()  # the LoRA set: (name, scale), in the server's --lora order
    micro: tuple[tuple[str, tuple[int, int]], ...] = ()  # SDXL: the micro-conditioning fields given, by name
    cache_interval: int = 1          # step caching (sdengine.stepcache): 1 is off
    cache_branch: int = 0

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys share one denoise loop: the same sampler table (sampler, steps, eta,
        strength), guidance scale, size, for edits the same image and mask, and the same prompt reading (weighting,
        clip_skip, number of chunks: a prompt padded to more chunks than its own would give another image), and the same
        LoRA set (the weights are switched between batches, never within one), and the same step caching."""
        return (self.width, self.height, self.scheduler, self.steps, self.guidance_scale, self.eta, self.strength,
                self.inputs_key, self.prompt_weighting, self.clip_skip, self.chunks, self.loras, self.micro,
                self.cache_interval, self.cache_branch)


# SDXL's micro-conditioning fields (diffusers' names), each an integer pair; MICRO_MAX bounds every number.
MICRO_FIELDS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                "negative_crops_coords_top_left", "negative_target_size")
MICRO_MAX = 16384


# ---- refusals --------------------------------------------------------------------------------------------------
def refuse(message: str, param: str | None) -> PydanticCustomError:
    """A validator's refusal: our own message and field, carried through pydantic to `refusal`."""
    return PydanticCustomError("sdengine", "{message}", {"message": message, "param": param})


def _limits(info: ValidationInfo) -> Limits:
    context = info.context or {}
    if "limits" not in context:
        raise TypeError("validate bodies with context={'limits': Limits(...)}: see sdengine.serve.schema.validate")
    return context["limits"]


def _between(name: str, lo: int, hi: int, value: int) -> PydanticCustomError:
    return refuse(f"{name} must be between {lo} and {hi}, got {value}", name)


# ---- request bodies --------------------------------------------------------------------------------------------
class GenerationBody(BaseModel):
    """POST /v1/images/generations: OpenAI's fields and sdengine's. Absent and null fields take their default.
    The ranges shown are the widest any server allows; a server's own (its --max-batch, --max-steps,
    --max-pixels, its model's VAE factor and text encoder, an engine's profile) are checked too: GET /v1/models
    and the 422 messages name them."""

    model_config = ConfigDict(extra="forbid", strict=True, title="ImageGenerationRequest",
                              json_schema_extra={"examples": [{"prompt": "a red circle", "n": 2, "size": "512x512",
                                                               "steps": 20, "seed": 7}]})

    response_format: Optional[Literal["b64_json"]] = Field(
        None, description="only \"b64_json\": base64 PNGs carrying their generation parameters (A1111's text)")
    model: Optional[str] = Field(None, description="accepted and ignored (one model is served)")
    user: Optional[str] = Field(None, description="accepted and ignored")
    quality: Optional[str] = Field(None, description="accepted and ignored (OpenAI's choice among its models)")
    style: Optional[str] = Field(None, description="accepted and ignored (OpenAI's choice among its models)")
    prompt: str = Field(..., description="the text to draw: a non-empty string, at most the server's prompt chunks "
                        f"of 75 tokens (default {MAX_PROMPT_CHUNKS}; an export may allow fewer)")
    negative_prompt: str = Field("", description="what to steer away from; the same length limit as prompt")
    prompt_weighting: bool = Field(True, description="read A1111's (word:1.2) emphasis syntax; false reads "
                                   "brackets as text")
    clip_skip: int = Field(0, ge=0, description="text encoder layers to skip: 0 .. the model's layers - 1")
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_PROMPT, description="images to generate: 1 .. the server's "
                   "--max-batch (seeds seed .. seed+n-1)")
    size: Optional[str] = Field(None, pattern=SIZE_RE.pattern, description="\"WIDTHxHEIGHT\": sides multiples of "
                                f"the VAE factor (8) within {MIN_SIDE}..{MAX_SIDE} (an engine: its profile's range), "
                                "width x height at most the server's --max-pixels (default: the model's size)")
    steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS, description="denoise steps: 1 .. the server's "
                                 "--max-steps (default: its --default-steps)")
    guidance_scale: float = Field(7.5, ge=0, allow_inf_nan=False, description="classifier-free guidance, >= 0")
    eta: float = Field(0.0, ge=0, allow_inf_nan=False, description="DDIM's eta (ancestral samplers: their noise), "
                       ">= 0 within the sampler's own range")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="the first image's seed, 0 .. 2**63 - n "
                                "(default: drawn at random and returned)")
    scheduler: str = Field("ddim", description="the sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ... "
                           "or A1111's names such as \"DPM++ 2M Karras\"; the README lists them")
    loras: Optional[dict[str, float]] = Field(None, description="the LoRA set {NAME: scale}: NAME a --lora of the "
                                              "server (GET /v1/models lists them); {} is none; scale 0 leaves one "
                                              "out; absent: the server's default set")
    cache_interval: int = Field(1, ge=1, le=MAX_STEPS, description="step caching (DeepCache): the whole U-Net every "
                                "N steps, its shallow branch in between; 1 (default) is off")
    cache_branch: Optional[int] = Field(None, ge=0, description="step caching's branch, as the deepcache package's "
                                        "cache_branch_id (default 0, the shallowest); needs cache_interval >= 2")

    original_size: Optional[list[int]] = Field(None, description="SDXL only: [height, width] the U-Net is told the "
                                               "training image had (default: the image's size)")
    crops_coords_top_left: Optional[list[int]] = Field(None, description="SDXL only: [top, left] of the crop the U-Net "
                                                       "is told was taken (default [0, 0])")
    target_size: Optional[list[int]] = Field(None, description="SDXL only: [height, width] of the target (default: "
                                             "the image's size)")
    negative_original_size: Optional[list[int]] = Field(None, description="SDXL only: original_size of the "
                                                        "unconditional rows (default: original_size)")
    negative_crops_coords_top_left: Optional[list[int]] = Field(None, description="SDXL only: crops_coords_top_left "
                                                                "of the unconditional rows (default: its positive)")
    negative_target_size: Optional[list[int]] = Field(None, description="SDXL only: target_size of the "
                                                      "unconditional rows (default: target_size)")

    _chunks: int = PrivateAttr(1)  # prompt chunks of the longer prompt, counted once by the validator

    @model_validator(mode="before")
    @classmethod
    def _absent(cls, data: Any, info: ValidationInfo) -> Any:
        """Null is absent; an inpainting model takes only edits with a mask."""
        edit = (info.context or {}).get("edit")
        if _limits(info).inpainting and (edit is None or edit.mask is None):
            raise refuse("this server runs an inpainting model: send an image and a mask to POST "
                         "/v1/images/edits", "mask" if edit is not None else None)
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise refuse("prompt must not be empty", "prompt")
        return value

    @field_validator("prompt_weighting", mode="before")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        """A form field's text "true" or "false" (any case) as the boolean."""
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value

    @field_validator("clip_skip")
    @classmethod
    def _clip_skip(cls, value: int, info: ValidationInfo) -> int:
        layers = _limits(info).clip_layers
        if value > layers - 1:
            raise _between("clip_skip", 0, layers - 1, value)
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: int, info: ValidationInfo) -> int:
        if value > _limits(info).max_images:
            raise _between("n", 1, _limits(info).max_images, value)
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: int, info: ValidationInfo) -> int:
        if value > _limits(info).max_steps:
            raise _between("steps", 1, _limits(info).max_steps, value)
        return value

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any, info: ValidationInfo) -> str:
        limits = _limits(info)
        match = SIZE_RE.match(value) if isinstance(value, str) else None
        if match is None:
            raise refuse(f"size must be a string \"WIDTHxHEIGHT\" such as \"{limits.default_size[0]}x"
                         f"{limits.default_size[1]}\", got {json.dumps(value)}", "size")
        width, height = int(match.group(1)), int(match.group(2))
        _side("width", width, limits, limits.width_range)
        _side("height", height, limits, limits.height_range)
        if width * height > limits.max_pixels:
            raise refuse(f"size {width}x{height} is {width * height} pixels; this server allows at most "
                         f"{limits.max_pixels}", "size")
        return value

    @field_validator(*MICRO_FIELDS, mode="before")
    @classmethod
    def _pair(cls, value: Any, info: ValidationInfo) -> list[int]:
        """Two integers in 0..MICRO_MAX ([height, width], or [top, left] for a crop); an edit's form text as JSON."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        what = "[top, left]" if "crops" in info.field_name else "[height, width]"
        if not isinstance(value, list) or len(value) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MICRO_MAX for v in value):
            raise refuse(f"{info.field_name} must be {what}: two integers in 0..{MICRO_MAX}, got "
                         f"{json.dumps(value)[:60]}", info.field_name)
        return value

    @field_validator("loras", mode="before")
    @classmethod
    def _loras(cls, value: Any, info: ValidationInfo) -> dict[str, float]:
        """Names of this server's LoRAs (with or without .safetensors, each once), finite scales."""
        limits = _limits(info)
        example = "{\"%s\": 0.8}" % (limits.loras[0] if limits.loras else "style")
        if isinstance(value, str):  # an edit's form field
            try:
                value = json.loads(value)
            except ValueError:
                raise refuse(f"loras must be a JSON object such as {example}, got {value[:40]!r}", "loras") from None
        if not isinstance(value, dict):
            raise refuse(f"loras must be an object mapping LoRA names to scales, such as {example}, got "
                         f"{json.dumps(value)[:40]}", "loras")
        available = ", ".join(limits.loras) if limits.loras else "none (the server was started without --lora)"
        scales: dict[str, float] = {}
        for name, scale in value.items():
            stem = name.removesuffix(".safetensors")
            if stem not in limits.loras:
                raise refuse(f"loras: {json.dumps(name)[:80]} is not a LoRA of this server; available: "
                             f"{available}", "loras")
            if stem in scales:
                raise refuse(f"loras: {stem!r} is given twice", "loras")
            try:
                number = None if isinstance(scale, bool) or not isinstance(scale, (int, float)) else float(scale)
            except OverflowError:  # an integer beyond float's range
                number = None
            if number is None or not math.isfinite(number):
                raise refuse(f"loras: the scale of {stem!r} must be a finite number, got {json.dumps(scale)[:40]}",
                             "loras")
            scales[stem] = number
        return scales

    @model_validator(mode="after")
    def _together(self, info: ValidationInfo) -> "GenerationBody":
        """What depends on several fields: the prompts' chunks (weighting), the last seed (n), the sampler's table
        (steps, eta, an edit's strength) and the export's state slots."""
        limits, edit = _limits(info), (info.context or {}).get("edit")
        for name in ("prompt", "negative_prompt"):
            try:
                chunks = limits.count_chunks(getattr(self, name), self.prompt_weighting)
            except InvalidInputError as exc:
                raise refuse(f"{name}: {exc}", name) from None
            if chunks > limits.max_prompt_chunks:
                raise refuse(f"{name} needs {chunks} chunks of 75 tokens; this server reads at most "
                             f"{limits.max_prompt_chunks} ({75 * limits.max_prompt_chunks} tokens): shorten it", name)
            self._chunks = max(self._chunks, chunks)
        if self.seed is not None and self.seed > MAX_SEED - self.n + 1:
            raise _between("seed", 0, MAX_SEED - self.n + 1, self.seed)
        self._check_cache(limits)
        try:
            name = canonical_name(self.scheduler)
            if limits.scheduler is not None:  # the table's own limits: steps within the training steps, eta's range
                steps = limits.default_steps if self.steps is None else self.steps
                schedule = build_schedule(limits.scheduler, name, steps, self.eta,
                                          strength=self.effective_strength(edit))
                if limits.slots is not None:
                    fit_slots(schedule, limits.slots, "re-export the model with sdengine export --state-slots {slots}")
        except InvalidInputError as exc:
            text = str(exc)
            param = "eta" if text.startswith("eta") else "strength" if text.startswith("strength") else \
                "steps" if "step" in text else "scheduler"
            raise refuse(text, param) from None
        return self

    def _check_cache(self, limits: Limits) -> None:
        """cache_branch within the U-Net's and with cache_interval >= 2; a branch the backend runs."""
        if self.cache_branch is not None:
            if self.cache_interval == 1:
                raise refuse("cache_branch takes effect only with step caching: give cache_interval >= 2 too",
                             "cache_branch")
            if self.cache_branch > limits.max_cache_branch:
                raise _between("cache_branch", 0, limits.max_cache_branch, self.cache_branch)
        branch = self.cache_branch or 0
        if self.cache_interval > 1 and limits.cache_branches is not None and branch not in limits.cache_branches:
            runs = f"cache_branch {', '.join(map(str, limits.cache_branches))} only" if limits.cache_branches \
                else "no step caching (an export without --step-cache, or a TensorRT engine set)"
            raise refuse(f"this server runs {runs}: change cache_branch or leave out cache_interval",
                         "cache_branch" if limits.cache_branches else "cache_interval")

    def effective_strength(self, edit: Any) -> float:
        """1 for a generation; an edit's strength, by default 1 with a mask and 0.8 without."""
        strength = getattr(self, "strength", None)
        if edit is None or strength is not None:
            return 1.0 if strength is None else strength
        return 1.0 if edit.mask is not None else 0.8


class EditBody(GenerationBody):
    """POST /v1/images/edits: the generation fields as form fields, plus `strength` (and the files image, mask).
    Form fields are text: numbers, true/false and the loras object (as JSON) are read from it first."""

    model_config = ConfigDict(title="ImageEditFields")

    strength: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False, description="how much of the image "
                                      "is repainted, in (0, 1] (default 1 with a mask, else 0.8)")


FIELDS = tuple(GenerationBody.model_fields)
EDIT_FIELDS = tuple(EditBody.model_fields)


def _side(name: str, value: int, limits: Limits, profile: tuple[int, int] | None) -> None:
    try:
        check_size(name, value, limits.factor)
    except InvalidInputError as exc:
        raise refuse(f"size: {exc}", "size") from None
    if profile is not None and not profile[0] <= value <= profile[1]:
        raise refuse(f"size: {name} {value} is outside the loaded engine's range {profile[0]}..{profile[1]}", "size")


def refusal(exc: ValidationError, data: dict, limits: Limits, fields: tuple[str, ...]) -> RequestError:
    """Pydantic's first error as the server's 422: unknown fields first, then in the order of the fields."""
    errors = exc.errors(include_url=False)
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if not errors[0]["loc"] and errors[0]["type"] != "sdengine":  # the body itself: a key that is not text
        unknown = sorted(str(key) for key in data if key not in fields) or unknown
        if not unknown:
            return RequestError(422, f"request body: {errors[0]['msg']}")
    if unknown:
        return RequestError(422, f"unknown field(s): {', '.join(unknown)}; accepted: {', '.join(fields)}", unknown[0])
    error = errors[0]
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "sdengine":
        return RequestError(422, ctx["message"], ctx["param"])
    name, value = str(error["loc"][0]), error["input"]
    shown = json.dumps(value) if isinstance(value, (int, float, str, bool, list, dict, type(None))) else repr(value)
    if kind == "missing":
        return RequestError(422, f"{name} is required: a non-empty string", name)
    if name in IGNORED:
        return RequestError(422, f"{name} must be a string (it is accepted and ignored)", name)
    if name == "response_format":
        return RequestError(422, f"response_format {shown} is not supported; only \"b64_json\" is", name)
    if name == "scheduler":
        return RequestError(422, f"scheduler must be a string such as \"dpmpp_2m_karras\", got {shown}", name)
    if kind == "string_type":
        return RequestError(422, f"{name} must be a string, got {type(value).__name__}", name)
    if kind == "bool_type":
        return RequestError(422, f"{name} must be true or false, got {shown}", name)
    if kind == "int_type":
        return RequestError(422, f"{name} must be an integer, got {shown}", name)
    if kind == "float_type":
        return RequestError(422, f"{name} must be a number, got {shown}", name)
    if kind == "finite_number":
        return RequestError(422, f"{name} must be a finite number, got {value}", name)
    if name == "strength":
        return RequestError(422, f"strength must be in (0, 1], got {float(value)}", name)
    if name in ("guidance_scale", "eta"):
        return RequestError(422, f"{name} must be >= 0, got {float(value)}", name)
    n = data.get("n") if isinstance(data.get("n"), int) else 1
    ranges = {"n": (1, limits.max_images), "steps": (1, limits.max_steps), "clip_skip": (0, limits.clip_layers - 1),
              "seed": (0, MAX_SEED - n + 1)}
    if name in ranges:
        return RequestError(422, f"{name} must be between {ranges[name][0]} and {ranges[name][1]}, got {value}", name)
    return RequestError(422, f"{name}: {error['msg']}", name)  # not reached by the fields above; kept readable


# ---- entry points ----------------------------------------------------------------------------------------------
def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or RequestError(400/413)."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    if not body.strip():
        raise RequestError(400, "request body is empty; send a JSON object such as {\"prompt\": \"a cat\"}")
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"request body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise RequestError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer too long to convert
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def parse_generation(body: bytes, limits: Limits) -> GenerationRequest:
    """Validate a request body against `limits`; RequestError says what is wrong."""
    return validate(parse_json(body), limits)


def validate(data: dict, limits: Limits, edit: Any = None) -> GenerationRequest:
    """The fields of a generation (JSON) or an edit (form fields, with `edit` its checked image and mask)."""
    model, fields = (EditBody, EDIT_FIELDS) if edit is not None else (GenerationBody, FIELDS)
    try:
        body = model.model_validate(data, context={"limits": limits, "edit": edit})
    except ValidationError as exc:
        raise refusal(exc, data, limits, fields) from None
    width, height = limits.default_size if edit is None else edit.default_size
    if body.size is not None:
        width, height = (int(side) for side in body.size.split("x"))
    micro = tuple((name, tuple(getattr(body, name))) for name in MICRO_FIELDS if getattr(body, name) is not None)
    if micro and not limits.sdxl:
        raise RequestError(422, f"{', '.join(name for name, _ in micro)}: SDXL's micro-conditioning; this server's "
                                f"model is not SDXL: leave the field(s) out", micro[0][0])
    loras = limits.default_loras if body.loras is None else \
        tuple((name, body.loras[name]) for name in limits.loras if body.loras.get(name, 0.0) != 0.0)
    extra = {} if edit is None else dict(image=edit.image, mask=edit.mask, strength=body.effective_strength(edit),
                                         inputs_key=edit.key)
    return GenerationRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n, width=width,
                             height=height, steps=limits.default_steps if body.steps is None else body.steps,
                             guidance_scale=body.guidance_scale, eta=body.eta,
                             seed=secrets.randbelow(2**32) if body.seed is None else body.seed,
                             scheduler=canonical_name(body.scheduler), prompt_weighting=body.prompt_weighting,
                             clip_skip=body.clip_skip, chunks=body._chunks, loras=loras, micro=micro,
                             cache_interval=body.cache_interval, cache_branch=body.cache_branch or 0, **extra)


# ---- response bodies -------------------------------------------------------------------------------------------
class ImageData(BaseModel):
    b64_json: str = Field(..., description="a base64 PNG; its `parameters` text chunk holds the generation "
                          "parameters (A1111's format), its `loras` chunk the LoRA set")
    seed: int = Field(..., description="this image's seed: the request's seed + its index")


class ImagesResponse(BaseModel):
    """OpenAI's images response, each image with its seed."""

    created: int = Field(..., description="Unix time of the response")
    data: list[ImageData]


class ErrorDetail(BaseModel):
    message: str = Field(..., description="what is wrong and what to do")
    type: str = Field(..., description="invalid_request_error, rate_limit_error, server_unavailable, "
                      "timeout_error, not_found_error or server_error")
    param: Optional[str] = Field(None, description="the offending field, when there is one")
    code: int = Field(..., description="the HTTP status")


class ErrorBody(BaseModel):
    """OpenAI's error shape: every refusal and failure of this server."""

    error: ErrorDetail


class LoraCard(BaseModel):
    name: str = Field(..., description="what a request's `loras` calls it")
    default_scale: float = Field(..., description="its scale in the default set (0: not in it)")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sdengine"
    loras: list[LoraCard]


class ModelList(BaseModel):
    """OpenAI's model list: the one model this server holds."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    state: Literal["loading", "ready", "failed", "draining"]


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON of an error response."""
    return ErrorBody(error=ErrorDetail(message=message, type=ERROR_TYPES.get(status, "error"), param=param,
                                       code=status)).model_dump()


def edit_form_schema() -> dict[str, Any]:
    """The multipart form of POST /v1/images/edits for the OpenAPI document: the fields and the two files."""
    schema = EditBody.model_json_schema()
    schema["properties"] = {
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP, at most the server's "
                  "--max-pixels; its transparency is the mask when no mask is sent"},
        "mask": {"type": "string", "format": "binary", "description": "the image's size; fully transparent "
                 "pixels are repainted (OpenAI's convention)"},
        **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    return schema
