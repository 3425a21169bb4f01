"""The embedded demo model's semantic checks through ONNX Runtime, at fp32 and fp16."""

from __future__ import annotations

import pytest

from onnx_support import run_cli  # noqa: F401  (skips the module when onnx / onnxruntime are absent)
from test_demo import semantic_accuracy, semantic_prompts

import sdengine
from sdengine.demo import embedded_model_path


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_demo_semantics_through_onnxruntime(tmp_path, precision):
    out = tmp_path / precision
    args = ["export", "--model", str(embedded_model_path()), "--out", str(out), "--batch", "1:18"]
    r = run_cli(*args, *(["--fp16"] if precision == "fp16" else []))
    assert r.returncode == 0, r.stderr + r.stdout
    # fp16 runs slower than fp32 on the CPU: one batch of 18 prompts, each colour and shape once, the
    # backgrounds in turn (the prompts run colour, shape, background innermost).
    rows = semantic_prompts()
    rows = rows if precision == "fp32" else [rows[3 * k + k % 3] for k in range(len(rows) // 3)]
    scores = semantic_accuracy(sdengine.load_pipeline(out, backend="onnxruntime"), rows=rows)
    assert scores["colour"] >= 0.90
    assert scores["shape"] >= 0.80
