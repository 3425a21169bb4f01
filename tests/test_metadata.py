"""Generation parameters in every image: A1111's `parameters` text, read back the way A1111 reads it."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

import sdengine
from a1111_infotext import parse
from sdengine.metadata import GenerationInfo, save_png

INFO = GenerationInfo(prompt="a cat, (masterpiece:1.2), by: someone", negative_prompt="blurry, low quality",
                      steps=20, sampler="DDIM", guidance_scale=7.5, seed=1234, width=512, height=768,
                      model="v1-5-pruned-emaonly", eta=0.0)


def test_infotext_is_a1111s_format():
    text = INFO.infotext()
    assert text.splitlines() == [
        "a cat, (masterpiece:1.2), by: someone",
        "Negative prompt: blurry, low quality",
        f"Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x768, Model: v1-5-pruned-emaonly, "
        f"Version: sdengine {sdengine.__version__}"]
    got = parse(text)
    assert got["Prompt"] == INFO.prompt and got["Negative prompt"] == INFO.negative_prompt
    assert (got["Steps"], got["Sampler"], got["CFG scale"], got["Seed"]) == ("20", "DDIM", "7.5", "1234")
    assert (got["Size-1"], got["Size-2"], got["Model"]) == ("512", "768", "v1-5-pruned-emaonly")


@pytest.mark.parametrize("changes", [
    dict(negative_prompt=""),
    dict(eta=0.5, guidance_scale=1.0, seed=None),
    dict(prompt="line one\nline two", model="odd, name: with colon"),
    dict(prompt="ünïcödé 猫 🐱", negative_prompt="\"quoted\""),
])
def test_infotext_round_trips(changes):
    import dataclasses

    info = dataclasses.replace(INFO, **changes)
    got = parse(info.infotext())
    assert got["Prompt"] == info.prompt and got["Negative prompt"] == info.negative_prompt
    assert got["Model"] == info.model and got["CFG scale"] == f"{info.guidance_scale:g}"
    assert got.get("Seed") == (None if info.seed is None else str(info.seed))
    assert got.get("Eta DDIM") == (f"{info.eta:g}" if info.eta else None)


def test_save_png_is_complete_with_ordinary_permissions(tmp_path):
    """The PNG holds every chunk, and gets open()'s permissions under the umask (not mkstemp's 0600)."""
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    old = os.umask(0o022)
    try:
        path = save_png(image, tmp_path / "a.png", INFO)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*"))
    read = Image.open(path)
    assert read.text["parameters"] == INFO.infotext() and read.text["seed"] == "1234"
    assert np.array_equal(np.asarray(read), np.asarray(image))
