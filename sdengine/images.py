"""Image and mask inputs: paths, bytes, PIL images or numpy arrays, any mode, checked before decoding.

A picture's size is read from its header and refused above `max_pixels` before any pixel is decoded
(PIL's own decompression-bomb guard, MAX_IMAGE_PIXELS, at a limit of ours). numpy and Pillow only.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInputError

MAX_INPUT_PIXELS = 8192 * 8192  # larger inputs are refused before decoding (they could not be used anyway)
log = logging.getLogger("sdengine")


@dataclass(frozen=True)
class Picture:
    """A decoded input: RGB (or grayscale) pixels as float32 in [0, 1], and the sha256 of what was given."""

    pixels: np.ndarray   # [H, W, C] float32 in [0, 1]
    mode: str            # PIL's mode as given
    sha256: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.pixels.shape[1], self.pixels.shape[0]


def _open(source: Any, what: str, max_pixels: int) -> tuple[Any, str]:
    """A PIL image (not yet decoded for files and bytes) and the sha256 of the source's bytes or pixels."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image = source
        digest = hashlib.sha256(image.tobytes()).hexdigest()
    elif isinstance(source, np.ndarray):
        image = _from_array(source, what)
        digest = hashlib.sha256(np.ascontiguousarray(source).tobytes()).hexdigest()
    else:
        if isinstance(source, (str, Path)):
            try:
                data = Path(source).expanduser().read_bytes()
            except OSError as exc:
                raise InvalidInputError(f"{what} {source}: {exc.strerror or exc}") from None
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:
            raise InvalidInputError(f"{what} must be a path, bytes, a PIL image or a numpy array, "
                                    f"got {type(source).__name__}")
        if not data:
            raise InvalidInputError(f"{what} is empty")
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError:  # PIL's own guard, far above ours
            raise InvalidInputError(f"{what}'s header claims more pixels than PIL decodes; the limit is "
                                    f"{max_pixels}") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidInputError(f"{what} is not a readable image ({exc}); give a PNG, JPEG or WebP") from None
        digest = hashlib.sha256(data).hexdigest()
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInputError(f"{what} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidInputError(f"{what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(f"{what} cannot be decoded ({exc})") from None
    return image, digest


def _from_array(array: np.ndarray, what: str) -> Any:
    """uint8/uint16/float arrays ([H,W], [H,W,1|3|4]) as a PIL image; floats are taken in [0, 1]."""
    from PIL import Image

    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise InvalidInputError(f"{what} as an array must be [H, W], [H, W, 3] or [H, W, 4], got {list(a.shape)}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InvalidInputError(f"{what} holds NaN or infinite values")
        a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
    else:
        raise InvalidInputError(f"{what} as an array must be uint8, uint16 or float in [0, 1], got {a.dtype}")
    return Image.fromarray(a)


def _rgb(image: Any) -> np.ndarray:
    """Any mode as RGB floats in [0, 1] (16-bit grayscale kept at full precision)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(image, dtype=np.float32) / (65535.0 if image.mode.startswith("I;16") else 2**32 - 1)
        return np.repeat(np.clip(gray, 0, 1)[:, :, None], 3, axis=2)
    if image.mode == "F":
        return np.repeat(np.clip(np.asarray(image, np.float32), 0, 1)[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_image(source: Any, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Picture:
    """An input image as RGB floats in [0, 1] (alpha dropped, palettes and 16-bit converted)."""
    image, digest = _open(source, what, max_pixels)
    return Picture(_rgb(image), image.mode, digest)


def load_mask(source: Any, size: tuple[int, int], what: str = "mask_image", alpha_repaints: bool = False,
              max_pixels: int = MAX_INPUT_PIXELS) -> Picture:
    """A mask as one channel in [0, 1], 1 where the image is repainted, of exactly `size` (width, height).

    Grayscale masks (L, 1, 16-bit, or RGB with equal channels): white is repainted, as in diffusers.
    Masks with an alpha channel (LA, RGBA, PA): transparent is repainted, as OpenAI's edits endpoint says;
    with `alpha_repaints` that holds for any mask (the server's /v1/images/edits).
    """
    image, digest = _open(source, what, max_pixels)
    if image.size != tuple(size):
        raise InvalidInputError(f"{what} is {image.size[0]}x{image.size[1]} but the image is {size[0]}x{size[1]}: "
                                "give a mask of the image's size")
    bands = image.getbands()
    if "A" in bands:
        alpha = np.asarray(image.getchannel("A"), np.float32) / 255.0
        return Picture((1.0 - alpha)[:, :, None], image.mode, digest)
    if alpha_repaints:
        raise InvalidInputError(f"{what} has no alpha channel: transparent pixels mark what to edit (OpenAI's "
                                "convention); give a PNG with transparency")
    if image.mode == "P":
        image = image.convert("RGB")
    rgb = _rgb(image)
    if image.mode not in ("L", "1", "I;16", "I;16B", "I;16L", "I", "F") and \
            not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
        raise InvalidInputError(f"{what} is a colour image ({image.mode}); a mask is grayscale (white repaints) or "
                                "has an alpha channel (transparent repaints)")
    return Picture(rgb[:, :, :1], image.mode, digest)


def fit_size(size: tuple[int, int], factor: int, width: int | None, height: int | None) -> tuple[int, int]:
    """The (width, height) to generate at: as asked, else the image's sides rounded down to the VAE factor."""
    w, h = size
    out = (width or w - w % factor, height or h - h % factor)
    if width is None and height is None and out != (w, h):
        log.warning("the image is %dx%d; its sides are not multiples of %d (the VAE factor): resized to %dx%d",
                    w, h, factor, *out)
    return out


def resized(picture: Picture, size: tuple[int, int], resample: str = "lanczos") -> np.ndarray:
    """The picture's pixels at `size` (width, height), float32 [H, W, C]; unchanged when already that size."""
    from PIL import Image

    if picture.size == tuple(size):
        return picture.pixels
    mode = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}[resample]
    channels = [Image.fromarray(picture.pixels[:, :, c]).resize(size, mode) for c in range(picture.pixels.shape[2])]
    return np.stack([np.asarray(c, np.float32) for c in channels], axis=2)


def blurred(mask: np.ndarray, radius: float) -> np.ndarray:
    """A Gaussian blur of a [H, W, 1] mask in pixels (PIL's GaussianBlur, as diffusers' mask_processor.blur)."""
    from PIL import Image, ImageFilter

    if radius <= 0:
        return mask
    image = Image.fromarray((np.clip(mask[:, :, 0], 0, 1) * 255).round().astype(np.uint8))
    return (np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255.0)[:, :, None]


@dataclass(frozen=True)
class ImageInputs:
    """An image (and mask) ready for the pipeline, at the generation size."""

    pixels: np.ndarray             # [1, 3, H, W] float32 in [-1, 1]
    mask: np.ndarray | None        # [H, W] in {0, 1}: 1 repaints (binarized at 0.5, as diffusers)
    soft_mask: np.ndarray | None   # [H, W] in [0, 1]: the blurred mask, for pasting the original back
    source: str                    # "WxH sha256" of the input image as given
    mask_sha256: str | None

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[3], self.pixels.shape[2]

    def latent_mask(self, factor: int) -> np.ndarray:
        """[1, 1, h, w]: the mask at latent size, nearest neighbour as diffusers' F.interpolate."""
        return self.mask[::factor, ::factor][None, None].astype(np.float32)

    def masked_pixels(self) -> np.ndarray:
        """The image with the repainted region zeroed (grey), as an inpainting U-Net's input is made."""
        return (self.pixels * (self.mask < 0.5)[None, None]).astype(np.float32)


def prepare(image: Any, mask_image: Any, factor: int, width: int | None, height: int | None,
            mask_blur: float = 0.0, alpha_repaints: bool = False, max_pixels: int = MAX_INPUT_PIXELS) -> ImageInputs:
    """Load, check and resize an image and its mask to the generation size (the image's, floored to `factor`)."""
    picture = load_image(image, "image", max_pixels)
    size = fit_size(picture.size, factor, width, height)
    pixels = resized(picture, size)
    mask = soft = None
    mask_sha = None
    if mask_image is not None:
        m = load_mask(mask_image, picture.size, "mask_image", alpha_repaints, max_pixels)
        mask_sha = m.sha256
        blurred_mask = blurred(m.pixels, mask_blur)
        soft = resized(Picture(blurred_mask, m.mode, m.sha256), size)[:, :, 0].clip(0, 1)
        mask = (soft >= 0.5).astype(np.float32)
    chw = (pixels.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)
    w, h = picture.size
    return ImageInputs(chw, mask, soft, f"{w}x{h} {picture.sha256}", mask_sha)
