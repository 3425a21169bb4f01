"""Backends run the three networks; the pipeline drives them through this one small protocol.

Tensors that stay on the device between calls are opaque to the pipeline (`Any`): the pipeline only
hands host numpy arrays in and gets the decoded image back as numpy.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from ..config import ModelConfig
from ..errors import InvalidInputError
from ..schedulers import Schedule
from ..tokenizer import ClipTokenizer

StepCallback = Callable[[int, int], None]
BACKENDS = ("torch", "onnxruntime", "tensorrt")


class Backend(Protocol):
    """What the txt2img pipeline needs from an execution backend."""

    config: ModelConfig
    tokenizer: ClipTokenizer

    def encode_text(self, input_ids: np.ndarray) -> Any:
        """Token ids [R, 77] -> text embeddings [R, 77, D] on the device."""

    def denoise(self, latents: np.ndarray, context: Any, schedule: Schedule, guidance_scale: float,
                noise: np.ndarray | None, callback: StepCallback | None = None) -> Any:
        """Run every step of `schedule` from latents [B,C,h,w]; noise [N,B,C,h,w] when eta > 0."""

    def decode(self, latents: Any) -> np.ndarray:
        """Scaled latents -> float32 images [B, 3, H, W] in about [-1, 1], on the host."""


def load_backend(path: str | None, backend: str = "torch", device: str = "cpu", **options: Any) -> Backend:
    """The named backend over `path` (torch: a model; onnxruntime: an ONNX export; tensorrt: an engine set)."""
    if backend == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend.load(path, device=device, **options)
    if backend == "onnxruntime":  # an export folder (sdengine export); imports no torch
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend.load(path, device=device, **options)
    if backend == "tensorrt":  # an engine set (sdengine build) on a CUDA device; imports no torch
        from .tensorrt_backend import load

        return load(path, device=device, **options)
    raise InvalidInputError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
