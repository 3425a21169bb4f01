"""Reads a generated shapes picture and reports its background, colour and shape (numpy only, no torch).

Method, step by step:
1. background = median of the border pixels, named by the nearest BACKGROUNDS colour;
2. a rough foreground mask (colour distance from the background > ROUGH_THRESHOLD), largest connected
   component, eroded by one pixel; its median colour is the foreground colour, named by the nearest COLOURS
   colour in CIELAB with lightness down-weighted (hue and chroma matter more than brightness);
3. the final mask = pixels more than half-way from the background colour to the foreground colour (the
   50% coverage contour, so blur does not grow or shrink the shape), largest connected component;
4. shape = nearest prototype in a weighted space of three mask features:
   - fill ratio = area / bounding-box area: square 1, circle pi/4, triangle 1/2;
   - taper = mean width of the top third of rows / mean width of the bottom third: triangle 1/5 (its width
     grows linearly from the apex), circle and square 1 (symmetric);
   - corners of the convex hull after dropping near-straight vertices and collapsing edges much shorter than
     their neighbours (corners that blur cut off, replaced by where the sides either side meet): triangle 3,
     square 4, circle "many" (5 to 9, counted as 6).
   Blur rounds a square's corners (its fill ratio falls towards a circle's) and eats a triangle's apex, but
   the taper and the corner count hardly move, so the three together stay right where one alone would not.
5. before that, solidity = mask area / area of its convex hull: a star (the shipped LoRA's concept, not the
   base model's) has deep notches between its points: 0.53 to 0.60 for the generator's stars, under 0.7
   blurred by 1.2 px, while the three convex base shapes stay above 0.86 also when blurred (the hull is
   taken around whole pixels, so small digitised shapes lose a little); below STAR_SOLIDITY it is a star.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sdengine.demo.shapes import BACKGROUNDS, COLOURS, EXTRA_SHAPES, SHAPES

ROUGH_THRESHOLD = 40.0  # RGB distance from the background that certainly is not background noise
MIN_AREA_FRACTION = 0.005  # a foreground smaller than this is treated as "no shape"
LIGHTNESS_WEIGHT = 0.5  # weight of CIELAB L against a and b in the colour distance
# Shape prototypes as (fill ratio, taper, corners); a circle's hull keeps "many" corners, counted as 6.
PROTOTYPES = {"square": (1.0, 1.0, 4), "circle": (np.pi / 4, 1.0, 6), "triangle": (0.5, 0.2, 3)}
FEATURE_WEIGHTS = (1.0, 0.5, 0.1)  # fill spans 0.5 .. 1, taper 0.2 .. 1, corners 3 .. 6: bring to one scale
COLLINEAR_TOLERANCE = 0.03  # a hull vertex this close (x perimeter) to its neighbours' chord lies on a side
SHORT_EDGE = 0.1  # a hull edge shorter than this fraction of the perimeter ...
CUT_RATIO = 0.5  # ... and than this fraction of its longer neighbour is a corner cut off by blur
STAR_SOLIDITY = 0.8  # a mask filling less than this of its convex hull is a star (clean stars: 0.53-0.60)


@dataclass(frozen=True)
class Verdict:
    """What a picture shows, and the statistics the decision used."""

    background: str
    colour: str
    shape: str
    background_rgb: tuple[float, float, float]
    foreground_rgb: tuple[float, float, float]
    fill_ratio: float
    corners: int
    area_fraction: float
    taper: float = 0.0
    solidity: float = 1.0


def to_array(image) -> np.ndarray:
    """A PIL image or array as float64 [H, W, 3] in 0..255."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return a[..., :3]


def srgb_to_lab(rgb) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in 0..255, shape [..., 3]."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def nearest_colour(rgb) -> str:
    """The COLOURS name nearest to `rgb` in lightness-down-weighted CIELAB."""
    weights = np.array([LIGHTNESS_WEIGHT, 1.0, 1.0])
    lab, refs = srgb_to_lab(rgb), srgb_to_lab(list(COLOURS.values()))
    return list(COLOURS)[int(np.argmin((((refs - lab) * weights) ** 2).sum(-1)))]


def nearest_background(rgb) -> str:
    """The BACKGROUNDS name nearest to `rgb` in RGB."""
    refs = np.array(list(BACKGROUNDS.values()), np.float64)
    return list(BACKGROUNDS)[int(np.argmin(((refs - np.asarray(rgb)) ** 2).sum(-1)))]


def border_median(a: np.ndarray) -> np.ndarray:
    """Per-channel median of the one-pixel frame around the picture."""
    frame = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    return np.median(frame, axis=0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (breadth-first search on the flat, padded grid)."""
    h, w = mask.shape
    free = np.pad(mask, 1).ravel().tolist()  # plain lists: far faster than indexing numpy scalars
    stride, best = w + 2, []
    for start in np.flatnonzero(free).tolist():
        if not free[start]:
            continue
        free[start], queue, k = False, [start], 0
        while k < len(queue):
            p = queue[k]
            k += 1
            for q in (p - stride, p + stride, p - 1, p + 1):
                if free[q]:  # the padding is never free, so q stays on the grid
                    free[q] = False
                    queue.append(q)
        if len(queue) > len(best):
            best = queue
    out = np.zeros((h + 2) * stride, bool)
    out[best] = True
    return out.reshape(h + 2, stride)[1:-1, 1:-1]


def erode(mask: np.ndarray) -> np.ndarray:
    """The mask less every pixel with a 4-neighbour outside it."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of [N, 2] points, counter-clockwise, no repeated end."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.array(pts, np.float64)

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (
                    out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]), np.float64)


def mask_hull(mask: np.ndarray) -> np.ndarray:
    """Convex hull of the mask's pixels as squares (the outer pixel edges of each row's two ends)."""
    ys = np.nonzero(mask.any(1))[0]
    left, right = mask[ys].argmax(1), mask.shape[1] - mask[ys, ::-1].argmax(1)  # pixel-edge x of row ends
    return convex_hull(np.concatenate([np.stack([x, ys + dy], 1) for x in (left, right) for dy in (0, 1)]))


def solidity(mask: np.ndarray) -> float:
    """Mask area / area of its convex hull (shoelace formula): about 1 for a convex shape."""
    hull = mask_hull(mask)
    x, y = hull[:, 0], hull[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return float(mask.sum() / area) if area > 0 else 1.0


def corner_count(mask: np.ndarray) -> int:
    """Corners of the mask's convex hull once near-straight vertices are dropped and short edges collapsed."""
    hull = mask_hull(mask)
    perimeter = np.linalg.norm(np.roll(hull, -1, 0) - hull, axis=1).sum()
    while len(hull) > 3:
        prev, nxt = np.roll(hull, 1, 0), np.roll(hull, -1, 0)
        chord, to_vertex = nxt - prev, hull - prev
        cross = chord[:, 0] * to_vertex[:, 1] - chord[:, 1] * to_vertex[:, 0]
        offset = np.abs(cross) / np.linalg.norm(chord, axis=1)  # distance from the neighbours' chord
        lengths = np.linalg.norm(nxt - hull, axis=1)
        relative = lengths / np.maximum(np.roll(lengths, 1), np.roll(lengths, -1))  # ~1 all round a circle
        relative[lengths >= SHORT_EDGE * perimeter] = np.inf
        i, j = int(np.argmin(offset)), int(np.argmin(relative))
        if offset[i] < COLLINEAR_TOLERANCE * perimeter:  # a step of a digitised straight side
            hull = np.delete(hull, i, 0)
        elif relative[j] < CUT_RATIO:  # a corner that blur cut off
            hull = collapse_edge(hull, j)
        else:
            break
    return len(hull)


def collapse_edge(hull: np.ndarray, i: int) -> np.ndarray:
    """The polygon with edge i -> i+1 replaced by the meeting point of the edges either side of it."""
    n = len(hull)
    a, b, c, d = hull[i - 1], hull[i], hull[(i + 1) % n], hull[(i + 2) % n]
    d1, d2 = b - a, d - c
    den = d1[0] * d2[1] - d1[1] * d2[0]
    hull = hull.copy()
    t = ((c - a)[0] * d2[1] - (c - a)[1] * d2[0]) / den if abs(den) > 1e-9 else np.inf
    reach = (t - 1) * np.linalg.norm(d1)  # how far beyond b the two sides meet
    hull[i] = a + t * d1 if 0 <= reach <= 2 * np.linalg.norm(c - b) else (b + c) / 2
    return np.delete(hull, (i + 1) % n, 0)


def geometry(mask: np.ndarray) -> tuple[float, float]:
    """(fill ratio against the bounding box, taper = top-third / bottom-third mean row width)."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    widths = mask[rows[0]:rows[-1] + 1].sum(1).astype(np.float64)
    height, width = len(widths), cols[-1] - cols[0] + 1
    third = max(1, height // 3)
    taper = widths[:third].mean() / max(widths[-third:].mean(), 1.0)
    return float(mask.sum() / (height * width)), float(taper)


def classify_shape(fill: float, taper: float, corners: int, solid: float = 1.0) -> str:
    """"star" below STAR_SOLIDITY, else the prototype nearest to (fill, taper, corners clipped to 3 .. 6) in
    the weighted feature space."""
    if solid < STAR_SOLIDITY:
        return "star"
    x, w = np.array([fill, taper, min(max(corners, 3), 6)]), np.array(FEATURE_WEIGHTS)
    dist = {s: float((((x - np.array(p)) * w) ** 2).sum()) for s, p in PROTOTYPES.items()}
    return min(dist, key=dist.get)


def check(image) -> Verdict:
    """Read a picture (PIL image or uint8 [H, W, 3] array) and report what it shows."""
    a = to_array(image)
    bg = border_median(a)
    bg_t = tuple(float(v) for v in bg)
    rough = largest_component(np.linalg.norm(a - bg, axis=-1) > ROUGH_THRESHOLD)
    if rough.sum() < MIN_AREA_FRACTION * rough.size:  # nothing but background (foreground_rgb = background's)
        return Verdict(nearest_background(bg), "none", "none", bg_t, bg_t, 0.0, 0, float(rough.mean()))
    core = erode(rough) if erode(rough).any() else rough
    fg = np.median(a[core], axis=0)
    axis = fg - bg
    alpha = (a - bg) @ axis / max(float(axis @ axis), 1e-9)  # 0 at the background colour, 1 at the shape's
    mask = largest_component(alpha > 0.5)
    if not mask.any():
        mask = rough
    fill, taper = geometry(mask)
    corners, solid = corner_count(mask), solidity(mask)
    return Verdict(nearest_background(bg), nearest_colour(fg), classify_shape(fill, taper, corners, solid), bg_t,
                   tuple(float(v) for v in fg), fill, corners, float(mask.mean()), taper, solid)


def matches(verdict: Verdict, colour: str, shape: str, background: str | None = None) -> bool:
    """Whether the verdict shows `colour` `shape` (on `background`, when given)."""
    return (verdict.colour == colour and verdict.shape == shape
            and (background is None or verdict.background == background))


def _find(names, text: str) -> str | None:
    """The first of `names` that occurs in `text` as a whole word."""
    hits = [(m.start(), n) for n in names for m in [re.search(rf"\b{n}\b", text)] if m]
    return min(hits)[1] if hits else None


def parse_caption(prompt: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, background) that a prompt names; None for any it does not name."""
    text = re.sub(r"\bgrey\b", "gray", prompt.lower())
    return _find(COLOURS, text), _find(SHAPES + EXTRA_SHAPES, text), _find(BACKGROUNDS, text)
