"""Export to ONNX: the reference networks traced, converted (fp16) and validated before they are written.

`export_model(model_path, out_dir, settings)` is the entry point (the `sdengine export` command and
`export/onnx_export.py` call it). Settings parsing (`settings.py`) imports no torch, so the command
line can validate its arguments before any model is loaded.
"""

from __future__ import annotations

from typing import Any

from .settings import ExportSettings

__all__ = ["ExportSettings", "export_model"]


def export_model(model: Any, out: Any, settings: ExportSettings | None = None, **kwargs: Any) -> Any:
    """Export, validate and write every graph of the model at `model` into `out` (see run.export_model)."""
    from .run import export_model as _export

    return _export(model, out, settings or ExportSettings(), **kwargs)
