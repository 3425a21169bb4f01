"""Request validation for POST /v1/images/generations (OpenAI's shape plus sdengine's extension fields).

Every refusal is a `RequestError` with the HTTP status and a message that names the field, the
value and the accepted range. 400: the body is not JSON; 413: the body is too large; 422: the JSON
is well formed but a field is unknown, of the wrong type or out of range.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InvalidInputError
from ..pipeline import MAX_SEED, check_size
from ..prompts import MAX_PROMPT_CHUNKS
from ..samplers import build_schedule, canonical_name
from ..samplers.table import fit_slots
from ..schedulers import SchedulerConfig

MAX_BODY_BYTES = 64 * 1024
SIZE_RE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# OpenAI's fields we implement or accept; `model`, `user`, `quality` and `style` are accepted and ignored
# (one model is served; OpenAI's quality and style select among its own models' settings).
IGNORED = ("model", "user", "quality", "style")
FIELDS = ("prompt", "n", "size", "response_format", "negative_prompt", "seed", "steps", "guidance_scale", "eta",
          "scheduler", "prompt_weighting", "clip_skip", "loras", *IGNORED)
EDIT_FIELDS = (*FIELDS, "strength")  # POST /v1/images/edits: these as form fields, and the files image and mask


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

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys share one denoise loop: the same sampler table (sampler, steps, eta,
        strength), guidance scale, size, for edits the same image and mask, and the same prompt reading (weighting,
        clip_skip, number of chunks: a prompt padded to more chunks than its own would give another image), and the same
        LoRA set (the weights are switched between batches, never within one)."""
        return (self.width, self.height, self.scheduler, self.steps, self.guidance_scale, self.eta, self.strength,
                self.inputs_key, self.prompt_weighting, self.clip_skip, self.chunks, self.loras)


def _invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(422, message, param)


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or RequestError(400)."""
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


def _int(data: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{name} must be an integer, got {json.dumps(value)}", name)
    if not lo <= value <= hi:
        raise _invalid(f"{name} must be between {lo} and {hi}, got {value}", name)
    return value


def _number(data: dict, name: str, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"{name} must be a number, got {json.dumps(value)}", name)
    if not math.isfinite(value):
        raise _invalid(f"{name} must be a finite number, got {value}", name)
    if value < 0:
        raise _invalid(f"{name} must be >= 0, got {value}", name)
    return float(value)


def _text(data: dict, name: str, limits: Limits, required: bool) -> str:
    value = data.get(name)
    if value is None:
        if required:
            raise _invalid(f"{name} is required: a non-empty string", name)
        return ""
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string, got {type(value).__name__}", name)
    if required and not value.strip():
        raise _invalid(f"{name} must not be empty", name)
    return value


def _chunks(value: str, name: str, limits: Limits, weighting: bool) -> int:
    """The prompt's chunks of 75 tokens; 422 beyond the server's limit or on text that is not valid Unicode."""
    try:
        chunks = limits.count_chunks(value, weighting)
    except InvalidInputError as exc:
        raise _invalid(f"{name}: {exc}", name) from None
    if chunks > limits.max_prompt_chunks:
        raise _invalid(f"{name} needs {chunks} chunks of 75 tokens; this server reads at most "
                       f"{limits.max_prompt_chunks} ({75 * limits.max_prompt_chunks} tokens): shorten it", name)
    return chunks


def _flag(data: dict, name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.lower() in ("true", "false"):  # a form field's text
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise _invalid(f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _side(name: str, value: int, limits: Limits, profile: tuple[int, int] | None) -> None:
    try:
        check_size(name, value, limits.factor)
    except InvalidInputError as exc:
        raise _invalid(f"size: {exc}", "size") from None
    if profile is not None and not profile[0] <= value <= profile[1]:
        raise _invalid(f"size: {name} {value} is outside the loaded engine's range {profile[0]}..{profile[1]}",
                       "size")


def _size(data: dict, limits: Limits, default: tuple[int, int] | None = None) -> tuple[int, int]:
    value = data.get("size")
    if value is None:
        if default is None:
            return limits.default_size
        value = f"{default[0]}x{default[1]}"
    match = SIZE_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise _invalid(f"size must be a string \"WIDTHxHEIGHT\" such as \"{limits.default_size[0]}x"
                       f"{limits.default_size[1]}\", got {json.dumps(value)}", "size")
    width, height = int(match.group(1)), int(match.group(2))
    _side("width", width, limits, limits.width_range)
    _side("height", height, limits, limits.height_range)
    if width * height > limits.max_pixels:
        raise _invalid(f"size {width}x{height} is {width * height} pixels; this server allows at most "
                       f"{limits.max_pixels}", "size")
    return width, height


def parse_generation(body: bytes, limits: Limits) -> GenerationRequest:
    """Validate a request body against `limits`; RequestError says what is wrong."""
    return validate(parse_json(body), limits)


def validate(data: dict, limits: Limits, edit: Any = None) -> GenerationRequest:
    """The fields of a generation (JSON) or an edit (form fields, with `edit` its checked image and mask)."""
    fields = EDIT_FIELDS if edit is not None else FIELDS
    if limits.inpainting and (edit is None or edit.mask is None):
        raise _invalid("this server runs an inpainting model: send an image and a mask to POST /v1/images/edits",
                       "mask" if edit is not None else None)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _invalid(f"unknown field(s): {', '.join(unknown)}; accepted: {', '.join(fields)}", unknown[0])
    fmt = data.get("response_format")
    if fmt is not None and fmt != "b64_json":
        raise _invalid(f"response_format {json.dumps(fmt)} is not supported; only \"b64_json\" is",
                       "response_format")
    for name in IGNORED:
        if data.get(name) is not None and not isinstance(data[name], str):
            raise _invalid(f"{name} must be a string (it is accepted and ignored)", name)
    prompt = _text(data, "prompt", limits, required=True)
    negative = _text(data, "negative_prompt", limits, required=False)
    weighting = _flag(data, "prompt_weighting", True)
    chunks = max(_chunks(prompt, "prompt", limits, weighting), _chunks(negative, "negative_prompt", limits, weighting))
    clip_skip = _int(data, "clip_skip", 0, 0, limits.clip_layers - 1)
    n = _int(data, "n", 1, 1, limits.max_images)
    width, height = _size(data, limits, None if edit is None else edit.default_size)
    steps = _int(data, "steps", limits.default_steps, 1, limits.max_steps)
    guidance = _number(data, "guidance_scale", 7.5)
    eta = _number(data, "eta", 0.0)
    seed = _int(data, "seed", None, 0, MAX_SEED - n + 1)
    strength = None if edit is None else _strength(data, edit.mask is not None)
    scheduler = _scheduler(data, limits, steps, eta, strength or 1.0)
    loras = _loras(data, limits)
    extra = {} if edit is None else dict(image=edit.image, mask=edit.mask, strength=strength, inputs_key=edit.key)
    return GenerationRequest(prompt=prompt, negative_prompt=negative, n=n, width=width, height=height, steps=steps,
                             guidance_scale=guidance, eta=eta,
                             seed=secrets.randbelow(2**32) if seed is None else seed, scheduler=scheduler,
                             prompt_weighting=weighting, clip_skip=clip_skip, chunks=chunks, loras=loras,
                             **extra)


def _loras(data: dict, limits: Limits) -> tuple[tuple[str, float], ...]:
    """`loras` {name: scale} (a JSON object, or its text in a form field) as the set's (name, scale) pairs in the
    server's order; absent: the server's default set; scale 0 leaves a LoRA out."""
    value = data.get("loras")
    if value is None:
        return limits.default_loras
    example = "{\"%s\": 0.8}" % (limits.loras[0] if limits.loras else "style")
    if isinstance(value, str):  # an edit's form field
        try:
            value = json.loads(value)
        except ValueError:
            raise _invalid(f"loras must be a JSON object such as {example}, got {value[:40]!r}", "loras") from None
    if not isinstance(value, dict):
        raise _invalid(f"loras must be an object mapping LoRA names to scales, such as {example}, got "
                       f"{json.dumps(value)[:40]}", "loras")
    available = ", ".join(limits.loras) if limits.loras else "none (the server was started without --lora)"
    scales: dict[str, float] = {}
    for name, scale in value.items():
        stem = name.removesuffix(".safetensors")
        if stem not in limits.loras:
            raise _invalid(f"loras: {json.dumps(name)[:80]} is not a LoRA of this server; available: {available}",
                           "loras")
        if stem in scales:
            raise _invalid(f"loras: {stem!r} is given twice", "loras")
        try:
            number = None if isinstance(scale, bool) or not isinstance(scale, (int, float)) else float(scale)
        except OverflowError:  # an integer beyond float's range
            number = None
        if number is None or not math.isfinite(number):
            raise _invalid(f"loras: the scale of {stem!r} must be a finite number, got {json.dumps(scale)[:40]}",
                           "loras")
        scales[stem] = number
    return tuple((name, scales[name]) for name in limits.loras if scales.get(name, 0.0) != 0.0)


def _strength(data: dict, masked: bool) -> float:
    value = _number(data, "strength", 1.0 if masked else 0.8)
    if not 0 < value <= 1:
        raise _invalid(f"strength must be in (0, 1], got {value}", "strength")
    return value


def _scheduler(data: dict, limits: Limits, steps: int, eta: float, strength: float = 1.0) -> str:
    """The canonical sampler name, checked against the model's schedule and the export's state slots."""
    value = data.get("scheduler", "ddim")
    if not isinstance(value, str):
        raise _invalid(f"scheduler must be a string such as \"dpmpp_2m_karras\", got {json.dumps(value)}",
                       "scheduler")
    try:
        name = canonical_name(value)
        if limits.scheduler is not None:  # the table's own limits: steps within the training steps, eta's range
            schedule = build_schedule(limits.scheduler, name, steps, eta, strength=strength)
            if limits.slots is not None:
                fit_slots(schedule, limits.slots, "re-export the model with sdengine export --state-slots {slots}")
    except InvalidInputError as exc:
        text = str(exc)
        param = "eta" if text.startswith("eta") else "strength" if text.startswith("strength") else \
            "steps" if "step" in text else "scheduler"
        raise _invalid(text, param) from None
    return name
