"""A deterministic generator of captioned pictures of simple shapes (the demo model's training data)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 64  # image side in pixels
SUPERSAMPLE = 4  # anti-aliasing: shapes are rasterised at 4x and averaged down

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 215, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = (
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape}",
    "{colour} {shape} on {background}",
    "a {shape} in {colour} on a {background} background",
    "a {colour} {shape} against a {background} background",
    "a {background} background with a {colour} {shape}",
)
JITTER = 12  # per-channel colour jitter, so the model learns colour names, not exact values


@dataclass(frozen=True)
class Sample:
    """One picture, its caption and what it shows."""

    image: np.ndarray  # uint8 [SIZE, SIZE, 3]
    caption: str
    colour: str
    shape: str
    background: str


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a circle, square or upright triangle of half-size r at (cx, cy)."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":
        # Equilateral, apex up, inscribed in the circle of radius r around (cx, cy).
        top, base = cy - r, cy + r / 2
        half_width = (y - top) / (base - top) * r * np.sqrt(3) / 2
        inside = (y >= top) & (y <= base) & (np.abs(x - cx) <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(shape: str, colour: str, background: str, cx: float, cy: float, r: float,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """The picture as uint8 [SIZE, SIZE, 3]; `rng` jitters the two colours."""
    fg = np.array(COLOURS[colour], np.float32)
    bg = np.array(BACKGROUNDS[background], np.float32)
    if rng is not None:
        fg = fg + rng.integers(-JITTER, JITTER + 1, 3)
        bg = bg + rng.integers(-JITTER, JITTER + 1, 3)
    alpha = shape_mask(shape, cx, cy, r)[..., None]
    return np.clip(alpha * fg + (1 - alpha) * bg, 0, 255).round().astype(np.uint8)


def sample(seed: int, index: int) -> Sample:
    """Sample `index` of the data set with `seed`: the same arguments always give the same picture."""
    rng = np.random.Generator(np.random.PCG64([seed, index]))
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    r = rng.uniform(0.2, 0.34) * SIZE  # half-size: the shape spans 40% to 68% of the side
    cx, cy = rng.uniform(r + 2, SIZE - r - 2, size=2)
    image = render(shape, colour, background, cx, cy, r, rng)
    caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(colour=colour, shape=shape, background=background)
    return Sample(image, caption, colour, shape, background)


def batch(seed: int, start: int, count: int) -> list[Sample]:
    """Samples start .. start+count-1."""
    return [sample(seed, i) for i in range(start, start + count)]
