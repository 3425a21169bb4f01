"""POST /v1/images/edits: OpenAI's multipart form (image, mask, prompt, n, size, response_format) plus
sdengine's fields (strength, steps, guidance_scale, seed, scheduler, negative_prompt, eta).

OpenAI's mask convention: the mask's fully transparent pixels are edited; without a mask, the image's own
transparency is the mask; without either, the image is changed as a whole (image to image, an sdengine
extension). Images are checked before decoding against the server's --max-pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..images import load_image, load_mask
from .schema import GenerationRequest, Limits, RequestError, validate

MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # a multipart body: the image, the mask and the fields
_INTS, _FLOATS = ("n", "steps", "seed", "clip_skip", "cache_interval", "cache_branch"), \
    ("guidance_scale", "eta", "strength")


@dataclass(frozen=True)
class EditImage:
    """An edit's checked inputs: the image bytes, the mask (1 repaints) and the size to generate by default."""

    image: bytes
    mask: np.ndarray | None
    default_size: tuple[int, int]
    key: str


def _invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(422, message, param)


def _number(name: str, text: str) -> Any:
    """A form field's text as the number a JSON body would carry (OpenAI's clients send numbers as text)."""
    try:
        return int(text) if name in _INTS else float(text)
    except ValueError:
        kind = "an integer" if name in _INTS else "a number"
        raise _invalid(f"{name} must be {kind}, got {text!r}", name) from None


def form_fields(form: Any) -> tuple[dict[str, Any], bytes | None, bytes | None]:
    """The text fields (numbers converted), the image's bytes and the mask's bytes of a parsed form."""
    data: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for name, value in form.multi_items():
        if name in data or name in files:
            raise _invalid(f"field {name} is given twice", name)
        if hasattr(value, "read"):  # an UploadFile
            if name not in ("image", "mask"):
                raise _invalid(f"{name} must be a text field; only image and mask are files", name)
            files[name] = value.file.read()
        elif name in ("image", "mask"):
            raise _invalid(f"{name} must be a file (multipart/form-data with a filename)", name)
        else:
            data[name] = _number(name, value) if name in _INTS + _FLOATS else value
    return data, files.get("image"), files.get("mask")


def check_images(image: bytes | None, mask: bytes | None, limits: Limits) -> EditImage:
    """Decode-checked image and mask (422 naming the field); the default size: the image's, floored."""
    if not image:
        raise _invalid("image is required: a PNG, JPEG or WebP file", "image")
    try:
        picture = load_image(image, "image", limits.max_pixels)
    except InvalidInputError as exc:
        raise _invalid(str(exc), "image") from None
    repaint = None
    if mask is not None:
        try:
            repaint = load_mask(mask, picture.size, "mask", alpha_repaints=True, max_pixels=limits.max_pixels).pixels
        except InvalidInputError as exc:
            raise _invalid(str(exc), "mask") from None
    elif picture.mode in ("RGBA", "LA", "PA"):  # OpenAI: the image's own transparency is the mask
        repaint = load_mask(image, picture.size, "image", alpha_repaints=True, max_pixels=limits.max_pixels).pixels
    w, h = picture.size
    f = limits.factor
    key = hashlib.sha256(image + (b"" if mask is None else mask)).hexdigest()
    return EditImage(image, None if repaint is None else repaint[:, :, 0], (w - w % f, h - h % f), key)


async def parse_edit(request: Any, limits: Limits, read_body: Any) -> GenerationRequest:
    """Validate an edit request (multipart/form-data) against `limits`; RequestError says what is wrong."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise RequestError(400, f"POST /v1/images/edits takes multipart/form-data (image, mask, prompt, ...), "
                                f"got {kind or 'no content type'}")
    request._body = await read_body(request, MAX_UPLOAD_BYTES)  # the form parser reads the checked body
    try:
        form = await request.form(max_files=2, max_fields=len(_INTS) + len(_FLOATS) + 16)
    except Exception as exc:  # noqa: BLE001 - the multipart parser's own errors
        raise RequestError(400, f"the multipart body cannot be parsed: {exc}") from None
    try:
        data, image, mask = form_fields(form)
    finally:
        await form.close()
    edit = check_images(image, mask, limits)
    return validate(data, limits, edit)
