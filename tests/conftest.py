"""Shared fixtures: tiny random models written as diffusers folders."""

from __future__ import annotations

import os

import pytest

from sdengine.config import ModelConfig

# The server fixtures (tests/serve_support.py) live here so that every test module shares them: one standalone
# and one Ray Serve server for the whole session's HTTP suite.
from serve_support import server, start_server  # noqa: E402,F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built here; never reach for a hub


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A diffusers folder holding the tiny random-weight model."""
    from sdengine.models.saving import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny", ModelConfig.tiny(), seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    import sdengine

    return sdengine.load_pipeline(tiny_model_dir)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_model_dir):
    """diffusers' StableDiffusionPipeline on the tiny model with DDIM (one per module: tests swap its scheduler)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers_support import diffusers_pipeline

    pipe = diffusers_pipeline("StableDiffusionPipeline", tiny_model_dir)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A StableDiffusionXLPipeline folder holding the tiny SDXL-shaped random-weight model."""
    from sdengine.models.saving import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", ModelConfig.tiny_sdxl(), seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tiny_sdxl_dir):
    import sdengine

    return sdengine.load_pipeline(tiny_sdxl_dir)
