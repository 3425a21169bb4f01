"""An engine set on disk without TensorRT: given plan bytes, the layout and manifest `sdengine build` writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sdengine import engine_manifest as em
from sdengine.config import ModelConfig
from sdengine.specs import ShapeRanges

GPU = ("NVIDIA H100 80GB HBM3", "9.0")
TRT_VERSION = "10.8.0.43"


def make_engine_set(folder: Path, plans: dict[str, bytes], source: str = "/data/onnx/tiny-fp16",
                    ranges: ShapeRanges | None = None, builder: em.BuilderSettings | None = None,
                    trt_version: str = TRT_VERSION, gpu: tuple[str, str] = GPU) -> em.EngineManifest:
    """Write `plans` as an engine set in `folder` (tiny model config) and return its manifest."""
    config = ModelConfig.tiny()
    ranges = ranges or ShapeRanges.default(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    shapes = em.profiles(config, ranges, tuple(plans))
    entries = {}
    for name, data in plans.items():
        (folder / em.plan_file(name)).write_bytes(data)
        entries[name] = em.GraphEntry(em.plan_file(name), hashlib.sha256(data).hexdigest(), len(data),
                                      hashlib.sha256(name.encode()).hexdigest(), shapes[name], 1.5)
    manifest = em.EngineManifest(folder, trt_version, gpu[0], gpu[1], ranges, builder or em.BuilderSettings(),
                                 source, "ab" * 32, config, entries)
    em.write(manifest)
    return manifest
