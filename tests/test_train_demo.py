"""The demo training recipe runs end to end and is reproducible from its seed (a few steps only)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from safetensors.numpy import load_file

from sdengine.demo import shapes
from sdengine.demo.train import Recipe, train

SMOKE = Recipe(num_samples=48, vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4)


def test_data_is_deterministic_and_captioned():
    a, b = shapes.sample(0, 17), shapes.sample(0, 17)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert a.image.shape == (shapes.SIZE, shapes.SIZE, 3) and a.image.dtype == np.uint8
    assert a.colour in a.caption and a.shape in a.caption
    kinds = {(s.colour, s.shape, s.background) for s in shapes.batch(0, 0, 600)}
    assert len(kinds) == len(shapes.COLOURS) * len(shapes.SHAPES) * len(shapes.BACKGROUNDS)


def test_training_smoke_run_is_reproducible(tmp_path):
    import sdengine

    outs = [train(tmp_path / name, SMOKE) for name in ("a", "b")]
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        first, second = (load_file(str(o / part)) for o in outs)
        assert all(np.array_equal(first[k], second[k]) for k in first)
    log = [json.loads(line) for line in (tmp_path / "a.train-log.jsonl").read_text().splitlines()]
    assert log[-1]["phase"] == "done" and log[-1]["recipe"] == dataclasses.asdict(SMOKE)
    image = sdengine.load_pipeline(outs[0])("a red circle", num_inference_steps=2, seed=0).images[0]
    assert image.size == (shapes.SIZE, shapes.SIZE)
