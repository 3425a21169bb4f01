"""The embedded demo model draws what the prompt asks for, through the whole pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdengine
from sdengine.demo import checker, shapes

GOLDEN = Path(__file__).parent / "data" / "golden_demo.png"
GOLDEN_PROMPT, GOLDEN_SEED = "a red circle on a white background", 2024
SEED_BASE = 900_000  # sampling seeds: never used in training (the data set is drawn from seed 0)


def semantic_prompts() -> list[tuple[str, str, str, str]]:
    """Every colour x shape x background once (54 prompts), captions from the training templates."""
    rows = []
    for i, (colour, shape, background) in enumerate(
            (c, s, b) for c in shapes.COLOURS for s in shapes.SHAPES for b in shapes.BACKGROUNDS):
        rows.append((f"a {colour} {shape} on a {background} background", colour, shape, background))
    return rows


def semantic_accuracy(pipe, steps: int = 20, guidance: float = 5.0, rows: list | None = None) -> dict[str, float]:
    """Colour, shape and background accuracy of the checker over the 54 prompts (one batch each 18)."""
    rows = semantic_prompts() if rows is None else rows
    verdicts = []
    for start in range(0, len(rows), 18):
        chunk = rows[start:start + 18]
        result = pipe([p for p, *_ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      seed=SEED_BASE + start)
        verdicts += [checker.check(im) for im in result.images]
    scores = {name: np.mean([getattr(v, name) == want[k] for v, want in zip(verdicts, [r[1:] for r in rows])])
              for k, name in enumerate(("colour", "shape", "background"))}
    print(f"\nsemantic accuracy over {len(rows)} prompts: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()))
    return scores


@pytest.fixture(scope="module")
def demo_pipe():
    return sdengine.load_pipeline()


def test_embedded_model_is_the_default(demo_pipe):
    assert demo_pipe.config.default_size == 64
    assert demo_pipe("a blue square", num_inference_steps=2, seed=1).images[0].size == (64, 64)


def test_draws_the_asked_colour_and_shape(demo_pipe):
    scores = semantic_accuracy(demo_pipe)
    assert scores["colour"] >= 0.90
    assert scores["shape"] >= 0.80


def test_golden_image(demo_pipe):
    """A fixed prompt and seed stay within a small mean distance of the committed reference."""
    image = np.asarray(demo_pipe(GOLDEN_PROMPT, num_inference_steps=20, guidance_scale=5.0,
                                 seed=GOLDEN_SEED).images[0]).astype(np.float32)
    reference = np.asarray(Image.open(GOLDEN)).astype(np.float32)
    distance = np.abs(image - reference).mean()
    print(f"\ngolden image: mean pixel distance {distance:.3f}/255")
    assert distance < 2.0
