"""The command line: one-line errors, no partial PNG. Most tests call `main(argv)` in this process
(cli_support.invoke); those that need a real process (the end-to-end PNG, --version and the bare help, argv
bytes, torch absent, --threads) run `python -m sdengine` as a user does."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdengine
from a1111_infotext import parse
from cli_support import invoke
from torch_block import BLOCK_TORCH


def process(*args, cwd=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "sdengine", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, **kwargs)


run = invoke


def one_line_error(r, text: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], r.stderr


def test_version():
    r = process("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sdengine {sdengine.__version__}"


def test_generate_writes_png_with_metadata(tiny_model_dir, tmp_path):
    out = tmp_path / "cat.png"
    r = process("generate", "a photo of a cat", "--model", str(tiny_model_dir), "--steps", "4", "--seed", "11",
            "--negative-prompt", "blurry", "--num-images", "2", "--out", str(out), "--height", "64",
            "--width", "80", "--eta", "0.5", "--guidance", "5")
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["cat-0.png", "cat-1.png"]
    image = Image.open(tmp_path / "cat-1.png")
    assert image.size == (80, 64)
    assert image.text["prompt"] == "a photo of a cat"
    assert image.text["seed"] == "12" and image.text["steps"] == "4" and image.text["negative_prompt"] == "blurry"
    fields = parse(image.text["parameters"])  # as A1111's PNG-info tab reads it
    assert (fields["Prompt"], fields["Negative prompt"], fields["Steps"], fields["Sampler"]) == (
        "a photo of a cat", "blurry", "4", "DDIM")
    assert (fields["CFG scale"], fields["Seed"], fields["Size-1"], fields["Size-2"], fields["Eta DDIM"]) == (
        "5", "12", "80", "64", "0.5")
    assert fields["Model"] == tiny_model_dir.name


def test_scheduler_option_and_its_label(tiny_model_dir, tmp_path):
    out = tmp_path / "e.png"
    r = run("generate", "a cat", "--model", str(tiny_model_dir), "--steps", "3", "--scheduler", "DPM++ 2M Karras",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert parse(Image.open(out).text["parameters"])["Sampler"] == "DPM++ 2M Karras"
    help_text = run("generate", "--help").stdout
    assert all(name in help_text for name in sdengine.sampler_names())


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_png_permissions_follow_the_umask(tiny_model_dir, tmp_path, umask):
    out = tmp_path / "p.png"
    r = run("generate", "a cat", "--model", str(tiny_model_dir), "--steps", "1", "--out", str(out), umask=umask)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_tiny_model_command(tmp_path):
    r = run("tiny-model", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model_index.json").is_file()
    again = run("tiny-model", str(tmp_path / "m"))
    one_line_error(again, "exists; pass --force to replace it")


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
    (["--out", "no/such/dir/x.png"], "does not exist; create it first"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--scheduler", "nope"], "unknown sampler 'nope'; choose one of: ddim, ddpm, euler"),
    (["--scheduler", "euler", "--eta", "0.5"], "eta is DDIM's setting"),
    (["--steps", "1000"], "(--scheduler ddim, --steps 1000, --eta 0)"),
    (["--height", "66"], "--height must be a multiple of 8 (this model's VAE factor) between 64 and 2048, got 66"),
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
    assert image.text["model"] == "sdengine-demo"
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


def test_no_arguments_prints_the_help():
    r = process()
    assert r.returncode == 0 and "usage: sdengine" in r.stdout and "generate" in r.stdout and not r.stderr


def test_prompt_that_is_not_utf8_is_one_line(tmp_path):
    """argv bytes that are not UTF-8 arrive as surrogate escapes: one line, exit 2, no PNG."""
    r = subprocess.run([sys.executable.encode(), b"-m", b"sdengine", b"generate", b"a red \xff circle", b"--out",
                        str(tmp_path / "x.png").encode()], capture_output=True, timeout=300)
    r.stderr = r.stderr.decode("utf-8", "replace")
    one_line_error(r, "the prompt is not valid UTF-8: byte 0xff at character 6")
    assert not list(tmp_path.iterdir())


def test_torch_backend_without_torch_is_one_line(tmp_path):
    """In an install without torch, the default backend says so and names --backend onnxruntime."""
    code = BLOCK_TORCH + f"""
from sdengine.cli import main
sys.exit(main(["generate", "a red circle", "--steps", "2", "--out", {str(tmp_path / "x.png")!r}]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    one_line_error(r, "the torch backend needs PyTorch, which is not installed")
    assert "--backend onnxruntime" in r.stderr


def test_steps_are_checked_before_the_weights_load(tiny_model_dir, tmp_path):
    """--steps past the schedule is refused from the config files: broken weights are never read."""
    model = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    r = run("generate", "a cat", "--model", str(model), "--steps", "1000", "--out", str(tmp_path / "x.png"))
    one_line_error(r, "outside the trained range 0..999")


def test_long_prompts_are_read_in_chunks_and_too_long_is_one_short_line(tiny_model_dir, tmp_path):
    """A 2-chunk prompt runs without a warning (nothing is dropped); over 8 chunks is a one-line error."""
    r = run("generate", "a cat " + "in a very detailed garden " * 20, "--model", str(tiny_model_dir), "--steps",
            "1", "--out", str(tmp_path / "x.png"), "--clip-skip", "1", "--no-prompt-weighting")
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    r = run("generate", "a cat " + "in a very detailed garden " * 400, "--model", str(tiny_model_dir), "--steps",
            "1", "--out", str(tmp_path / "x.png"))
    one_line_error(r, "prompt needs 27 chunks of 75 tokens (2002 tokens); at most 8 are read (600 tokens): shorten it")


def test_demo_model_warns_about_prompts_outside_its_vocabulary(tmp_path):
    r = run("generate", "a dog", "--steps", "2", "--out", str(tmp_path / "dog.png"))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "demo model only draws a circle, square or triangle" in lines[0], r.stderr
    quiet = run("generate", "a purple triangle on a gray background", "--steps", "2", "--out",
                str(tmp_path / "t.png"))
    assert quiet.returncode == 0 and not quiet.stderr.strip(), quiet.stderr


@pytest.mark.parametrize("cores, threads", [({0}, 1), ({0, 1}, 1), ({0, 1, 2, 3}, 3), (set(range(16)), 15)])
def test_default_threads_leave_one_core(monkeypatch, cores, threads):
    from sdengine.backends import default_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: cores, raising=False)
    assert default_threads() == threads


def test_threads_option(tiny_model_dir, tmp_path):
    """--threads N reaches torch."""
    code = f"""
import torch
from sdengine.cli import main
assert main(["generate", "a cat", "--model", {str(tiny_model_dir)!r}, "--steps", "1", "--threads", "1",
             "--out", {str(tmp_path / "x.png")!r}]) == 0
print(torch.get_num_threads())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "1", r.stderr


def test_export_suggests_a_prompt_the_model_knows():
    from sdengine.cli import _example_prompt
    from sdengine.demo.shapes import COLOURS, SHAPES

    words = set(_example_prompt(None).split())
    assert words & set(COLOURS) and words & set(SHAPES)


def test_image_to_image_and_inpainting_from_the_command_line(tmp_path):
    """--image, --strength, --mask, --mask-blur on the demo model; the PNG records the source and the mask."""
    from sdengine.demo import checker, shapes

    red = tmp_path / "red.png"
    Image.fromarray(shapes.render("circle", "red", "white", 32, 32, 16)).save(red)
    mask = tmp_path / "mask.png"
    Image.fromarray((np.pad(np.full((32, 32), 255), 16)).astype(np.uint8)).save(mask)
    out = tmp_path / "blue.png"
    r = run("generate", "a blue circle on a white background", "--image", str(red), "--strength", "0.8",
            "--steps", "20", "--guidance", "5", "--seed", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert checker.check(Image.open(out)).colour == "blue"
    fields = parse(Image.open(out).text["parameters"])
    assert fields["Denoising strength"] == "0.8" and fields["Source image"].startswith("64x64 ")
    r = run("generate", "a green square on a white background", "--image", str(red), "--mask", str(mask),
            "--mask-blur", "2", "--keep-unmasked", "--steps", "5", "--seed", "1", "--out", str(tmp_path / "i.png"))
    assert r.returncode == 0, r.stderr
    fields = parse(Image.open(tmp_path / "i.png").text["parameters"])
    assert fields["Denoising strength"] == "1" and fields["Mask blur"] == "2" and len(fields["Mask hash"]) == 10


@pytest.mark.parametrize("extra, message", [
    (["--mask", "m.png"], "--mask needs --image"),
    (["--strength", "0.5"], "--strength needs --image"),
    (["--image", "nope.png"], "--image nope.png: No such file"),
    (["--image", "red.png", "--strength", "2"], "--strength must be in (0, 1]"),
    (["--image", "red.png", "--strength", "0.01", "--steps", "10"], "strength"),
    (["--image", "red.png", "--mask", "small.png"], "give a mask of the image's size"),
    (["--image", "red.png", "--mask", "red.png"], "is a colour image"),
    (["--image", "text.png"], "not a readable image"),
])
def test_bad_image_options_are_one_line(tmp_path, extra, message):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + np.array([200, 0, 0], np.uint8)).save(tmp_path / "red.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "text.png").write_text("not a picture")
    r = run("generate", "a cat", "--out", str(tmp_path / "o.png"), *extra, cwd=tmp_path)
    one_line_error(r, message)
    assert not (tmp_path / "o.png").exists()
