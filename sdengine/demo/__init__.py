"""The embedded demo model: a captioned-shapes data set, its checker, and the training recipe."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo"
DEMO_LORA = Path(__file__).resolve().parent.parent / "assets" / "demo_lora" / "star.safetensors"


def embedded_model_path() -> Path:
    """The demo model shipped in the package (a diffusers folder), used when no model is given."""
    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        raise ModelLoadError(f"the embedded demo model is missing from {EMBEDDED_MODEL}; reinstall sdengine "
                             f"or pass a model path")
    return EMBEDDED_MODEL


def lora_path() -> Path:
    """The LoRA shipped with the demo model: it teaches the shape "star" (trained by `sdengine train-lora`)."""
    if not DEMO_LORA.is_file():
        raise ModelLoadError(f"the demo LoRA is missing from {DEMO_LORA}; reinstall sdengine or train it with "
                             f"`sdengine train-lora --out FILE`")
    return DEMO_LORA
