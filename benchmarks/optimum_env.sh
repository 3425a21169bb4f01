#!/usr/bin/env bash
# Create the separate virtual environment for optimum's ONNX Runtime pipeline (issue 18).
# optimum-onnx cannot be installed beside diffusers 0.42 (sdengine's test oracle), so the
# comparison runs optimum in its own venv. Usage: benchmarks/optimum_env.sh [VENV_DIR]
# (default .venv-optimum, git-ignored). Never touches any other venv.
set -euo pipefail
VENV="${1:-.venv-optimum}"
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# CPU torch first (the version sdengine's venv has; a CPU wheel from PyPI or pip's find-links), then the
# pinned optimum stack.
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet \
  optimum-onnx==0.1.0 optimum==2.1.0 diffusers==0.35.2 transformers==4.57.6 onnxruntime==1.32.0
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "optimum-onnx", "optimum", "diffusers", "transformers", "onnxruntime", "onnx", "numpy"):
    print(name, md.version(name))
from optimum.onnxruntime import ORTStableDiffusionPipeline  # noqa: F401  (the import the benchmark needs)
print("ORTStableDiffusionPipeline import ok")
PY
