"""The command line, run as a user runs it: a subprocess, one-line errors, no partial PNG."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdengine


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdengine", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sdengine {sdengine.__version__}"


def test_generate_writes_png_with_metadata(tiny_model_dir, tmp_path):
    out = tmp_path / "cat.png"
    r = run("generate", "a photo of a cat", "--model", str(tiny_model_dir), "--steps", "4", "--seed", "11",
            "--negative-prompt", "blurry", "--num-images", "2", "--out", str(out), "--height", "64",
            "--width", "80", "--eta", "0.5", "--guidance", "5")
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["cat-0.png", "cat-1.png"]
    image = Image.open(tmp_path / "cat-1.png")
    assert image.size == (80, 64)
    assert image.text["prompt"] == "a photo of a cat"
    assert image.text["seed"] == "12" and image.text["steps"] == "4" and image.text["negative_prompt"] == "blurry"


def test_tiny_model_command(tmp_path):
    r = run("tiny-model", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model_index.json").is_file()
    again = run("tiny-model", str(tmp_path / "m"))
    assert again.returncode != 0 and "exists" in again.stderr


BAD = [
    (["--height", "100"], "multiple of 8"),
    (["--width", "56"], "between 64 and 2048"),
    (["--width", "4096"], "between 64 and 2048"),
    (["--steps", "0"], "--steps"),
    (["--steps", "1001"], "--steps"),
    (["--guidance", "nan"], "guidance"),
    (["--guidance", "inf"], "guidance"),
    (["--guidance", "-2"], "guidance"),
    (["--num-images", "0"], "--num-images"),
    (["--num-images", "17"], "--num-images"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--out", "x.jpg"], ".png"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_one_line_error_and_no_png(tiny_model_dir, tmp_path, extra, message):
    args = ["generate", "a cat", "--model", str(tiny_model_dir), "--steps", "2", "--out", str(tmp_path / "o.png")]
    r = run(*args, *extra, cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("kind", ["truncated", "pickle", "other-family"])
def test_bad_checkpoints_one_line_error(tmp_path, kind):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / ("model.ckpt" if kind == "pickle" else "model.safetensors")
    if kind == "pickle":
        torch.save({"w": torch.zeros(1)}, path)
    else:
        save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}, path)
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:-10])
    r = run("generate", "a cat", "--model", str(path), "--out", str(tmp_path / "o.png"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {"truncated": "truncated", "pickle": "pickle", "other-family": "SDXL"}[kind] in r.stderr
    assert not list(tmp_path.glob("*.png"))


def test_first_readme_command_uses_the_embedded_model(tmp_path):
    """`sdengine generate "a red circle on a white background"` with no --model draws that picture."""
    from sdengine.demo import checker

    r = run("generate", "a red circle on a white background", "--steps", "20", "--guidance", "5", "--seed", "3",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    image = Image.open(tmp_path / "image.png")
    assert image.text["model"] == "embedded demo model"
    verdict = checker.check(image)
    assert (verdict.colour, verdict.shape, verdict.background) == ("red", "circle", "white")


def test_generate_passes_backend_options(tiny_model_dir, tmp_path):
    """--option reaches the backend: channels_last draws the same picture; an unknown option is one line."""
    common = ["generate", "a photo of a cat", "--model", str(tiny_model_dir), "--steps", "3", "--seed", "5"]
    plain, fast = tmp_path / "plain.png", tmp_path / "fast.png"
    assert run(*common, "--out", str(plain)).returncode == 0
    r = run(*common, "--out", str(fast), "--option", "channels_last=true")
    assert r.returncode == 0, r.stderr
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (plain, fast))
    assert np.abs(a - b).max() <= 1
    bad = run(*common, "--out", str(tmp_path / "bad.png"), "--option", "no_such_option=1")
    assert bad.returncode == 2 and "no_such_option" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.png").exists()
