"""sdengine: a Stable Diffusion inference engine with a PyTorch reference, ONNX and TensorRT paths.

`import sdengine` stays light (no torch); the pipeline and models import torch when first used.
"""

from __future__ import annotations

from typing import Any

from .errors import (InvalidInputError, ModelLoadError, PickleCheckpointError, SDEngineError,
                     UnsupportedModelError, WeightsMismatchError)

__version__ = "0.1.0"

__all__ = ["__version__", "load_pipeline", "sampler_names", "SDEngineError", "InvalidInputError", "ModelLoadError",
           "PickleCheckpointError", "UnsupportedModelError", "WeightsMismatchError"]


def load_pipeline(path: Any = None, backend: str = "torch", device: str = "cpu", **options: Any) -> Any:
    """A txt2img pipeline: `load_pipeline(path)(prompt, ...)` (see sdengine.pipeline.Pipeline)."""
    from .pipeline import load_pipeline as _load

    return _load(path, backend=backend, device=device, **options)


def sampler_names() -> tuple[str, ...]:
    """The samplers `pipe(..., scheduler=NAME)` takes (A1111's display names are accepted too)."""
    from .samplers import sampler_names as names

    return names()
