"""Backends run the three networks; the pipeline drives them through this one small protocol.

Tensors that stay on the device between calls are opaque to the pipeline (`Any`): the pipeline only
hands host numpy arrays in and gets the decoded image back as numpy.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np

from ..config import ModelConfig
from ..errors import BackendUnavailableError, InvalidInputError
from ..samplers.table import Schedule
from ..tokenizer import ClipTokenizer

StepCallback = Callable[[int, int], None]
BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class ImageCondition:
    """What image-to-image and inpainting add to the denoise loop (host numpy, float32).

    The step graph reads `mask` and `known` as an inpainting U-Net's extra input channels, and for a plain
    U-Net re-imposes the known region after every row: slot 0 += (1 - mask) (p known + q known_noise - r slot 0)
    with (p, q, r) = blend[i] (0, 0, 0 where nothing is blended).
    """

    mask: np.ndarray         # [B,1,h,w]: 1 where the image is repainted
    known: np.ndarray        # [B,C,h,w]: the image's latent (blend) or the masked image's latent (9-channel U-Net)
    known_noise: np.ndarray  # [B,C,h,w]: the initial noise the known latent is re-noised with
    blend: np.ndarray        # [R,3]: per row (p, q, r)


@dataclass(frozen=True)
class AddedConditioning:
    """SDXL's extra U-Net inputs (host numpy, float32), one row per context row (unconditional rows first)."""

    text_embeds: np.ndarray  # [R, P]: text_encoder_2's pooled, projected output
    time_ids: np.ndarray     # [R, 6]: original_size (h, w), crops_coords_top_left (top, left), target_size (h, w)


class Backend(Protocol):
    """What the txt2img pipeline needs from an execution backend."""

    config: ModelConfig
    tokenizer: ClipTokenizer

    def encode_text(self, input_ids: np.ndarray) -> Any:
        """Token ids [R, 77] -> text embeddings [R, 77, D] on the device."""

    def denoise(self, latents: np.ndarray, context: Any, schedule: Schedule, guidance_scale: float,
                noise: np.ndarray | None, callback: StepCallback | None = None,
                condition: ImageCondition | None = None) -> Any:
        """Run every row of `schedule` from latents [B,C,h,w]; noise [R,B,C,h,w] for stochastic samplers;
        `condition` for image-to-image and inpainting (None: text to image)."""

    def encode_image(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images [B,3,H,W] in [-1, 1] -> scaled latent mean and std [B,C,h,w] of q(z|x), on the host."""

    def decode(self, latents: Any, fp32: bool = False) -> np.ndarray:
        """Scaled latents -> float32 images [B, 3, H, W] in about [-1, 1], on the host.

        fp32=True decodes in float32 whatever the backend's precision (the pipeline asks for it when the
        normal decode gave NaN or infinity); a backend that cannot raises NonFiniteOutputError.
        """


def reject_unknown_options(backend: str, given: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """InvalidInputError naming the options a backend does not take and the ones it does."""
    if given:
        raise InvalidInputError(f"the {backend} backend does not take the option(s) {', '.join(sorted(given))}; "
                                f"it takes: {', '.join(accepted)}")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """CPU threads for the command line and the server: the usable cores less one, at least 1.

    A thread team as large as the machine stalls whenever anything else takes a core: on the 2-core
    machine, beside one busy process, the demo model's 20 steps took 1.1-1.8 s at 2 threads against
    0.3-0.4 s at 1 thread (benchmarks/RESULTS.md, "CPU threads under contention").
    """
    return max(1, usable_cores() - 1)


def _require_torch() -> None:
    """One line instead of a ModuleNotFoundError when the torch backend is asked for without torch."""
    try:
        found = importlib.util.find_spec("torch") is not None
    except ImportError:  # a broken install, or an import hook refusing it
        found = False
    if not found:
        raise BackendUnavailableError(
            "the torch backend needs PyTorch, which is not installed: pip install torch (see the README's set-up) "
            "and pip install 'sdengine[torch]', or run an exported folder without torch: "
            "--backend onnxruntime --model DIR (sdengine export)")


def load_backend(path: str | None, backend: str = "torch", device: str = "cpu", **options: Any) -> Backend:
    """The named backend over `path` (torch: a model; onnxruntime: an ONNX export; tensorrt: an engine set)."""
    if backend == "torch":
        _require_torch()
        from .torch_backend import TorchBackend

        return TorchBackend.load(path, device=device, **options)
    if backend == "onnxruntime":  # an export folder (sdengine export); imports no torch
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend.load(path, device=device, **options)
    if backend == "tensorrt":  # an engine set (sdengine build) on a CUDA device; imports no torch
        from .tensorrt_backend import load

        return load(path, device=device, **options)
    raise InvalidInputError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
