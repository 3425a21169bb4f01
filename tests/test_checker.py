"""The shapes checker reads the generator's own pictures, VAE-like degraded ones, other sizes and captions."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdengine.demo import shapes
from sdengine.demo.checker import STAR_SOLIDITY, Verdict, check, matches, parse_caption

SEED = 12345  # not the training seed (0)
COUNT = 600
FIELDS = ("background", "colour", "shape")
# (fill ratio range, corner count) of clean pictures; a circle's hull keeps 5 or more corners
PROTOTYPE_RANGES = {"square": (0.95, 1.01, 4), "circle": (0.72, 0.85, None), "triangle": (0.45, 0.6, 3)}


@functools.lru_cache(maxsize=None)
def samples() -> tuple[shapes.Sample, ...]:
    """The evaluation samples, made once."""
    return tuple(shapes.batch(SEED, 0, COUNT))


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an [H, W, C] image (edges replicated), as float64."""
    radius = max(1, int(3 * sigma + 0.5))
    kernel = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(kernel))
    return out


def vae_like(image: np.ndarray, rng: np.random.Generator, sigma: float = 1.2, noise: float = 6.0):
    """The picture blurred and noised roughly the way a small VAE's decoder would leave it."""
    degraded = gaussian_blur(image, sigma) + rng.normal(0.0, noise, image.shape)
    return np.clip(degraded, 0, 255).round().astype(np.uint8)


def accuracies(images, truths) -> dict[str, float]:
    """Fraction of pictures whose background, colour and shape the checker gets right."""
    verdicts = [check(im) for im in images]
    right = {f: [getattr(v, f) == getattr(t, f) for v, t in zip(verdicts, truths)] for f in FIELDS}
    return {f: float(np.mean(r)) for f, r in right.items()}


def test_accuracy_on_generator_images():
    acc = accuracies([s.image for s in samples()], samples())
    print(f"\nclean accuracy over {COUNT} samples: {acc}")
    assert all(a >= 0.98 for a in acc.values()), acc


def test_robust_to_vae_like_blur_and_noise():
    rng = np.random.default_rng(7)
    acc = accuracies([vae_like(s.image, rng) for s in samples()], samples())
    print(f"\nblur 1.2 px + noise 6/255 accuracy over {COUNT} samples: {acc}")
    assert acc["colour"] >= 0.90 and acc["shape"] >= 0.90, acc


def test_robust_to_colour_cast_and_uneven_background():
    rng = np.random.default_rng(3)
    ramp = np.linspace(-15, 15, 64)[None, :, None]  # a left-to-right brightness ramp over the whole picture
    images = []
    for s in samples()[:150]:
        shifted = vae_like(s.image, rng, sigma=1.5) + ramp + rng.uniform(-15, 15, 3)  # plus a colour cast
        images.append(np.clip(shifted, 0, 255).astype(np.uint8))
    acc = accuracies(images, samples()[:150])
    print(f"\nblur 1.5 px + noise + colour cast +-15 + ramp +-15 accuracy over 150 samples: {acc}")
    assert all(a >= 0.95 for a in acc.values()), acc


@functools.lru_cache(maxsize=None)
def star_samples() -> tuple[shapes.Sample, ...]:
    """Pictures of the LoRA's shape (the base data set has none), made once."""
    return tuple(shapes.batch(SEED, 0, 150, shapes.EXTRA_SHAPES))


def test_reads_stars_clean_and_blurred():
    rng = np.random.default_rng(11)
    clean = accuracies([s.image for s in star_samples()], star_samples())
    blurred = accuracies([vae_like(s.image, rng) for s in star_samples()], star_samples())
    print(f"\nstars, 150 samples: clean {clean}, blur 1.2 px + noise {blurred}")
    assert all(a == 1.0 for a in clean.values()), clean
    assert all(a >= 0.95 for a in blurred.values()), blurred


def test_solidity_separates_stars_from_the_convex_shapes():
    rng = np.random.default_rng(5)
    stars = [check(vae_like(s.image, rng)).solidity for s in star_samples()[:60]]
    base = [check(vae_like(s.image, rng)).solidity for s in samples()[:200]]
    print(f"\nsolidity, blurred: stars {min(stars):.3f} .. {max(stars):.3f}, base shapes {min(base):.3f} .. "
          f"{max(base):.3f}, threshold {STAR_SOLIDITY}")
    assert max(stars) < STAR_SOLIDITY < min(base)


def test_star_outline():
    polygon = shapes.star_polygon(32, 32, 10)
    radii = np.hypot(*(polygon - polygon.mean(0)).T)
    assert len(polygon) == 10 and np.allclose(radii[::2], shapes.STAR_SCALE * 10)
    assert np.allclose(radii[1::2], shapes.STAR_INNER * shapes.STAR_SCALE * 10)
    ys = polygon[:, 1]
    assert np.isclose((ys.min() + ys.max()) / 2, 32)  # centred in its bounding box
    mask = shapes.shape_mask("star", 32, 32, 10)
    assert 0.3 < mask.sum() / (np.pi * (shapes.STAR_SCALE * 10) ** 2) < 0.5  # notched: well under its circle


def test_shape_statistics_match_their_prototypes():
    for s in samples()[:60]:
        v = check(s.image)
        assert isinstance(v, Verdict) and 0.05 < v.area_fraction < 0.6
        expected = PROTOTYPE_RANGES[s.shape]
        assert expected[0] <= v.fill_ratio <= expected[1], (s.shape, v)
        assert v.corners == expected[2] if expected[2] else v.corners >= 5, (s.shape, v)
        assert np.abs(np.subtract(v.foreground_rgb, shapes.COLOURS[s.colour])).max() <= shapes.JITTER + 1


@pytest.mark.parametrize("background", list(shapes.BACKGROUNDS))
def test_blank_picture_has_no_shape(background):
    rng = np.random.default_rng(1)
    blank = np.full((64, 64, 3), shapes.BACKGROUNDS[background], np.float64) + rng.normal(0, 6, (64, 64, 3))
    v = check(np.clip(blank, 0, 255).astype(np.uint8))
    assert (v.background, v.colour, v.shape) == (background, "none", "none"), v
    assert not matches(v, "red", "circle")


def render_at(sample_index: int, size: int) -> tuple[np.ndarray, shapes.Sample]:
    """Sample `sample_index` drawn afresh at `size` pixels (the generator itself renders only 64)."""
    s = samples()[sample_index]
    rng = np.random.default_rng(sample_index)
    shape = s.shape
    r = rng.uniform(0.2, 0.34) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
    alpha = shapes.shape_mask(shape, cx, cy, r, size=size)[..., None]
    fg, bg = np.array(shapes.COLOURS[s.colour]), np.array(shapes.BACKGROUNDS[s.background])
    return (alpha * fg + (1 - alpha) * bg).round().astype(np.uint8), s


def test_small_pictures():
    for i in range(30):
        image, s = render_at(i, 32)
        v = check(image)
        assert matches(v, s.colour, s.shape, s.background), (i, s.caption, v)


def test_large_pictures_as_pil_images():
    for i, s in enumerate(samples()[:30]):
        image = Image.fromarray(s.image).resize((128, 128), Image.BICUBIC)
        v = check(image)
        assert matches(v, s.colour, s.shape, s.background), (i, s.caption, v)
    image, s = render_at(0, 128)
    assert matches(check(image), s.colour, s.shape, s.background)


def test_matches():
    v = check(samples()[0].image)
    s = samples()[0]
    assert matches(v, s.colour, s.shape) and matches(v, s.colour, s.shape, s.background)
    other = next(b for b in shapes.BACKGROUNDS if b != s.background)
    assert not matches(v, s.colour, s.shape, other)
    assert not matches(v, next(c for c in shapes.COLOURS if c != s.colour), s.shape)


@pytest.mark.parametrize("template", shapes.TEMPLATES)
def test_parse_caption_reads_every_template(template):
    for colour, shape, background in [("red", "circle", "white"), ("purple", "triangle", "gray"),
                                      ("orange", "square", "black"), ("yellow", "circle", "black")]:
        prompt = template.format(colour=colour, shape=shape, background=background)
        expected_background = background if "{background}" in template else None
        assert parse_caption(prompt) == (colour, shape, expected_background), prompt


def test_parse_caption_edge_cases():
    assert parse_caption("A Blue Square on a grey background") == ("blue", "square", "gray")
    assert parse_caption("a green thing") == ("green", None, None)
    assert parse_caption("a gray background with a red star") == ("red", "star", "gray")
    assert all(parse_caption(s.caption)[:2] == (s.colour, s.shape) for s in samples()[:50])


def test_checker_needs_no_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from sdengine.demo import checker, shapes\n"
        "print(checker.check(shapes.sample(1, 0).image).shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() in shapes.SHAPES, r.stderr
