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
SHAPES = ("circle", "square", "triangle")  # the base model's shapes (its training data draws only these)
# Shapes the base model never saw: the shipped LoRA teaches "star" (sdengine/demo/lora_train.py).
EXTRA_SHAPES = ("star",)
STAR_INNER = 0.42  # a star's inner radius as a fraction of its outer radius (a regular pentagram: 0.38)
STAR_SCALE = 1.15  # a star's outer radius / r: its notches take area, so it is drawn larger than r
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


def star_polygon(cx: float, cy: float, r: float) -> np.ndarray:
    """The 10 vertices [10, 2] of an upright five-pointed star centred in its bounding box at (cx, cy):
    points at radius R = STAR_SCALE * r, notches at STAR_INNER * R (it spans 2.09 r high, 2.19 r wide)."""
    big = STAR_SCALE * r
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5  # the first point straight up (y grows downwards)
    radii = np.where(np.arange(10) % 2 == 0, big, STAR_INNER * big)
    centre_y = cy + big * (1 - np.cos(np.pi / 5)) / 2  # the top point reaches R up, the lower points 0.81 R down
    return np.stack([cx + radii * np.cos(angles), centre_y + radii * np.sin(angles)], 1)


def inside_polygon(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule: whether each point (x, y) lies inside the closed polygon [N, 2]."""
    inside = np.zeros(x.shape, bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, 0)):
        crosses = (y0 > y) != (y1 > y)  # the edge spans the point's row
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < at)
    return inside


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a circle, square, upright triangle or upright five-pointed star of
    half-size r at (cx, cy) (the triangle inscribed in the circle of radius r; the star see star_polygon)."""
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
    elif shape == "star":
        inside = inside_polygon(x, y, star_polygon(cx, cy, r))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES + EXTRA_SHAPES}")
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


def sample(seed: int, index: int, kinds: tuple[str, ...] = SHAPES) -> Sample:
    """Sample `index` of the data set with `seed`: the same arguments always give the same picture.

    `kinds` are the shapes to draw from: the base data set uses SHAPES (the default); the LoRA's data
    passes EXTRA_SHAPES. The random draws are the same sequence whatever `kinds` is."""
    rng = np.random.Generator(np.random.PCG64([seed, index]))
    shape = kinds[rng.integers(len(kinds))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    r = rng.uniform(0.2, 0.34) * SIZE  # half-size: the shape spans 40% to 68% of the side
    cx, cy = rng.uniform(r + 2, SIZE - r - 2, size=2)
    image = render(shape, colour, background, cx, cy, r, rng)
    caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(colour=colour, shape=shape, background=background)
    return Sample(image, caption, colour, shape, background)


def batch(seed: int, start: int, count: int, kinds: tuple[str, ...] = SHAPES) -> list[Sample]:
    """Samples start .. start+count-1."""
    return [sample(seed, i, kinds) for i in range(start, start + count)]
