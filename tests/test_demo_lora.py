"""The shipped demo LoRA teaches the embedded model to draw a star and keeps its base concepts; train-lora runs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import sdengine
from sdengine import cli
from sdengine.demo import EMBEDDED_MODEL, checker, lora_path, lora_train, shapes
from sdengine.errors import InvalidInputError
from sdengine.lora import read_lora
from sdengine.models.loading import load_components

from test_demo import semantic_accuracy

STAR_SEED = 910_000  # sampling seeds never used in training
SMOKE = lora_train.LoraRecipe(concept_samples=8, base_samples=8, steps=2, batch=4)


def star_prompts() -> list[tuple[str, str, str]]:
    """Every colour x background once (18 prompts), in the first training template."""
    return [(f"a {c} star on a {b} background", c, b) for c in shapes.COLOURS for b in shapes.BACKGROUNDS]


def star_verdicts(pipe) -> list[checker.Verdict]:
    """The checker's verdicts on the 18 star prompts, one seed each (20 DDIM steps, guidance 5, one batch)."""
    rows = star_prompts()
    result = pipe([p for p, *_ in rows], num_inference_steps=20, guidance_scale=5.0, seed=STAR_SEED)
    return [checker.check(im) for im in result.images]


@pytest.fixture(scope="module")
def demo_pipe():
    pipe = sdengine.load_pipeline()
    yield pipe
    pipe.set_loras({})


def test_shipped_lora_draws_stars_the_base_model_never_does(demo_pipe):
    demo_pipe.set_loras({})
    without = star_verdicts(demo_pipe)
    demo_pipe.set_loras({lora_path(): 1.0})
    with_lora = star_verdicts(demo_pipe)
    rows = star_prompts()
    stars = [sum(v.shape == "star" for v in vs) for vs in (with_lora, without)]
    right = sum(checker.matches(v, c, "star", b) for v, (_, c, b) in zip(with_lora, rows))
    print(f"\nstar drawn in {stars[0]}/{len(rows)} seeds with the LoRA ({right}/{len(rows)} also the asked colour and "
          f"background), {stars[1]}/{len(rows)} without; shapes without: "
          f"{ {s: sum(v.shape == s for v in without) for s in shapes.SHAPES} }")
    assert stars[0] >= 0.8 * len(rows)
    assert stars[1] == 0


def test_base_concepts_survive_the_lora(demo_pipe):
    demo_pipe.set_loras({lora_path(): 1.0})
    scores = semantic_accuracy(demo_pipe)
    print(f"(with the demo LoRA merged) {scores}")
    assert all(score >= 0.9 for score in scores.values()), scores


def test_shipped_file_is_a_kohya_lora_of_the_demo_model(demo_pipe):
    path = lora_path()
    assert path.parent.parent == EMBEDDED_MODEL.parent and path.stat().st_size < 1_000_000
    lora = read_lora(path, demo_pipe.backend.lora_targets())
    assert lora.format == "kohya"
    assert {t.split(".")[0] for t in lora.targets} == {"unet", "text_encoder"}
    tensors = load_file(str(path))
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float16)}
    assert all(pair.rank == lora_train.LoraRecipe().rank for pair in lora.pairs)


def test_merged_file_equals_the_trained_hooks(tmp_path):
    """What training computes (hooked low-rank branches) is what the saved file merges into the weights."""
    parts = load_components(EMBEDDED_MODEL)
    gen = torch.Generator().manual_seed(5)
    layers = {**lora_train.attach(parts.text_encoder, "text_encoder", SMOKE, gen),
              **lora_train.attach(parts.unet, "unet", SMOKE, gen)}
    with torch.no_grad():
        for layer in layers.values():  # a non-zero `up`, both rounded to fp16 as the file stores them
            layer.up.copy_(torch.randn(layer.up.shape, generator=gen) * 0.1)
            for p in layer.parameters():
                p.copy_(p.half().float())
    path = lora_train.save_lora(layers, tmp_path / "hooks.safetensors", {})
    ids = torch.from_numpy(parts.tokenizer(["a red star", "a blue square on a gray background"]))
    x, t = torch.randn((2, 4, 16, 16), generator=gen), torch.tensor([10, 700])
    with torch.no_grad():
        hooked = parts.unet(x, t, parts.text_encoder(ids))
        merged = sdengine.load_pipeline(loras={path: 1.0}).backend.components
        plain = merged.unet(x, t, merged.text_encoder(ids))
    print(f"\nhooked vs merged U-Net output: max difference {float((hooked - plain).abs().max()):.2e}")
    assert torch.allclose(hooked, plain, atol=1e-4, rtol=1e-4)


def test_training_smoke_run_is_reproducible_and_loads(tmp_path):
    outs = [lora_train.train_lora(tmp_path / f"{n}.safetensors", SMOKE) for n in ("a", "b")]
    first, second = (load_file(str(o)) for o in outs)
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    assert any(np.abs(v).max() > 0 for k, v in first.items() if k.endswith("lora_up.weight"))  # it trained
    log = [json.loads(line) for line in (tmp_path / "a.train-log.jsonl").read_text().splitlines()]
    assert log[-1]["phase"] == "done" and log[-1]["recipe"] == dataclasses.asdict(SMOKE)
    image = sdengine.load_pipeline(loras={outs[0]: 1.0})("a red star", num_inference_steps=2, seed=0).images[0]
    assert image.size == (shapes.SIZE, shapes.SIZE)
    with pytest.raises(InvalidInputError, match="--force"):
        lora_train.train_lora(outs[0], SMOKE)


def test_train_lora_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lora_train, "LoraRecipe", lambda: SMOKE)  # a tiny data set; --steps and --seed still apply
    out = tmp_path / "cli.safetensors"
    assert cli.main(["train-lora", "--out", str(out), "--steps", "1", "--seed", "3"]) == 0
    assert "sdengine generate" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "cli.train-log.jsonl").read_text().splitlines()]
    assert log[-1]["recipe"]["steps"] == 1 and log[-1]["recipe"]["seed"] == 3
    read_lora(out, sdengine.load_pipeline().backend.lora_targets())
    assert cli.main(["train-lora", "--out", str(out)]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert cli.main(["train-lora", "--out", str(tmp_path / "x.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert cli.main(["train-lora", "--out", str(tmp_path / "y.safetensors"), "--steps", "0"]) == 2


def test_unknown_concept_is_refused():
    with pytest.raises(InvalidInputError, match="star"):
        lora_train.concept_data(dataclasses.replace(SMOKE, concept="hexagon"))
