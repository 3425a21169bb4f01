"""`sdengine bench` on an SDXL model: every stage of sdengine's backend runs in process on the tiny SDXL weights;
diffusers' StableDiffusionXLPipeline stages opt-in (SDENGINE_SLOW_TESTS=1: about 5 s more). The whole command
(workers, export, tables): README, "SDXL"."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sdengine.bench.settings import RANDOM_MODELS, BenchSettings, Subject

SETTINGS = BenchSettings(subjects=(Subject("torch", "backend", "torch"),), steps=2, prompt="a red cat").check()


def _run_stages(stages) -> None:
    out = {name: call() for name, call in stages.calls().items()}
    image = np.asarray(out["vae_decode"])
    assert image.shape == (1, 3, 64, 64) and np.isfinite(image).all()
    assert len(out["tokenizer"]) == 2  # both tokenizers' ids


def test_bench_stages_run_on_sdxl(tiny_sdxl_pipeline):
    from sdengine.bench.stages import SdengineStages

    assert {"tiny_sdxl", "sdxl"} <= set(RANDOM_MODELS)
    stages = SdengineStages(tiny_sdxl_pipeline.backend, SETTINGS)
    _run_stages(stages)
    assert stages.e2e(1)[0].size == (64, 64)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SDENGINE_SLOW_TESTS") != "1", reason="set SDENGINE_SLOW_TESTS=1 (about 5 s)")
def test_bench_diffusers_sdxl_stages(tiny_sdxl_dir):
    pytest.importorskip("diffusers")
    from sdengine.bench.diffusers_stages import DiffusersStages

    _run_stages(DiffusersStages(tiny_sdxl_dir, SETTINGS, False))
