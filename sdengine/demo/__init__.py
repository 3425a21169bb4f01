"""The embedded demo model: a captioned-shapes data set, its checker, and the training recipe."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo"


def embedded_model_path() -> Path:
    """The demo model shipped in the package (a diffusers folder), used when no model is given."""
    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        raise ModelLoadError(f"the embedded demo model is missing from {EMBEDDED_MODEL}; reinstall sdengine "
                             f"or pass a model path")
    return EMBEDDED_MODEL
