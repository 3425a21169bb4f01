"""The runtime side of sdengine imports and tokenizes with torch made unimportable."""

from __future__ import annotations

import subprocess
import sys

from torch_block import BLOCK_TORCH


def test_runtime_imports_without_torch():
    code = BLOCK_TORCH + """
import sdengine, sdengine.runtime, sdengine.config, sdengine.schedulers, sdengine.samplers, sdengine.tokenizer
import sdengine.errors, sdengine.lora, sdengine.metadata, sdengine.prompts, sdengine.embeddings
import sdengine.runtime.cuda, sdengine.runtime.device, sdengine.runtime.loop, sdengine.backends.cuda_backend
import sdengine.backends.tensorrt_backend
from sdengine.config import ModelConfig
from sdengine.samplers import build_schedule
from sdengine.tokenizer import ClipTokenizer
assert ClipTokenizer.default()("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
assert build_schedule(ModelConfig().scheduler, "ddim", 20).num_rows == 20
from sdengine.prompts import prompt_batch
assert prompt_batch(ClipTokenizer.default(), ["a (red:1.2) cat " * 30, ""])[0].shape == (2, 2, 77)
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("the blocker did not work")
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_tensorrt_side_imports_without_torch():
    code = BLOCK_TORCH + """
import sdengine.engine_manifest, sdengine.engine_build, sdengine.runtime.tensorrt, sdengine.build_cli, sdengine.cli
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
assert "tensorrt" not in sys.modules, "tensorrt is imported only when a build or a load starts"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
