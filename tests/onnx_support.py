"""Fixtures shared by the ONNX tests: the tiny model exported once per session (fp32 through the CLI,
fp16 through the API). Test modules import the fixtures they use from here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch_block import BLOCK_TORCH

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def run_cli(*args: str, torch_blocked: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m sdengine ARGS`, optionally in a process where importing torch fails."""
    if torch_blocked:
        code = BLOCK_TORCH + "from sdengine.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "sdengine", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def report(folder: Path) -> dict:
    return json.loads((folder / "export-report.json").read_text())


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def onnx_fp32_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model exported at fp32 by `sdengine export` (default ranges: 1-4 images, 64-128 px), with the
    plain U-Net graph (--unet-graph) so that every graph is exported somewhere; fp16 has the default graphs."""
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    r = run_cli("export", "--model", str(tiny_model_dir), "--out", str(out), "--unet-graph")
    assert r.returncode == 0, r.stderr + r.stdout
    return out


@pytest.fixture(scope="session")
def onnx_fp16_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model exported at fp16 through the Python API."""
    from sdengine.export import ExportSettings, export_model

    out = tmp_path_factory.mktemp("onnx") / "fp16"
    export_model(tiny_model_dir, out, ExportSettings(precision="fp16"), log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def ort_pipeline(onnx_fp32_dir):
    import sdengine

    return sdengine.load_pipeline(onnx_fp32_dir, backend="onnxruntime")


@pytest.fixture(scope="session")
def tiny_components(tiny_model_dir):
    from sdengine.models.loading import load_components

    return load_components(tiny_model_dir)
