"""How far image i of a batch is from the same seed generated alone (float rounding of batched CPU kernels).

    python benchmarks/batch_vs_alone.py                  # this machine's kernels, at its thread count
    OMP_NUM_THREADS=1 python benchmarks/batch_vs_alone.py
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/batch_vs_alone.py

The environment variables make oneDNN, MKL and ATen use the kernels of an older CPU. Reports the largest
absolute difference in [0, 1] image units (output_type="np") and in uint8 levels, over 12 seeds in
batches of 2, 3 and 4, on the tiny random model and the embedded demo model, 5 DDIM steps.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch

import sdengine
from sdengine.config import ModelConfig
from sdengine.models.saving import write_random_model


def worst(pipe) -> tuple[float, int]:
    floats, levels = 0.0, 0
    for batch in (2, 3, 4):
        for base in range(0, 12, batch):
            b = pipe("a red circle", num_inference_steps=5, seed=base, num_images_per_prompt=batch, output_type="np")
            for i in range(batch):
                a = pipe("a red circle", num_inference_steps=5, seed=base + i, output_type="np")
                floats = max(floats, float(np.abs(a.images[0] - b.images[i]).max()))
                to8 = lambda x: (x * 255).round().astype(np.int16)  # noqa: E731 - what to_uint8 does
                levels = max(levels, int(np.abs(to8(a.images[0]) - to8(b.images[i])).max()))
    return floats, levels


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_random_model(os.path.join(tmp, "tiny"), ModelConfig.tiny(), seed=0)
        out = {name: worst(sdengine.load_pipeline(path)) for name, path in (("tiny", tiny), ("demo", None))}
    env = {k: v for k, v in os.environ.items() if k.startswith(("ATEN", "ONEDNN", "MKL", "OMP"))}
    print(json.dumps({"threads": torch.get_num_threads(), "env": env,
                      "max_abs_float": {k: v[0] for k, v in out.items()},
                      "max_uint8_levels": {k: v[1] for k, v in out.items()}}))


if __name__ == "__main__":
    main()
