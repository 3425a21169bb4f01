"""Engine sets: their folder layout, their manifest, and the checks a set passes before any plan is deserialized.

An engine set is one folder (by convention `engines/NAME`), written by `sdengine build`:

    manifest.json       format "sdengine-engines", version 1 (this module)
    text_encoder.plan   one serialized TensorRT engine per graph of specs.GRAPHS
    denoise_step.plan
    vae_decoder.plan
    tokenizer/          copied from the ONNX export, so a set runs without the export folder

The manifest stamps the set with what makes it stale (DESIGN.md, rules of thumb): the TensorRT
version, GPU name and compute capability, precision, the optimisation profile of every engine,
the builder settings, the sha256 of every source ONNX graph and of every plan, the ONNX folder's
source hash, the sdengine version and the model config. A mismatch names the difference and the
exact `sdengine build` command that rebuilds the set. No torch and no tensorrt here.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import __version__
from .config import ModelConfig
from .errors import EngineMismatchError, InvalidInputError, ModelLoadError, UnsupportedModelError
from .files import write_json_atomic
from .manifest import MANIFEST, TOKENIZER_DIR, Manifest, sha256_file
from .specs import DENOISE_STEP, TEXT_ENCODER, TEXT_ENCODER_2, VAE_DECODER, VAE_ENCODER, Precision, ShapeRanges, \
    check_dim, graph_specs, profile

FORMAT, FORMAT_VERSION = "sdengine-engines", 3  # 2: the denoise step takes a sampler state; 3: prompt chunks
PLAN_SUFFIX = ".plan"
ENGINE_GRAPHS = (TEXT_ENCODER, DENOISE_STEP, VAE_DECODER, VAE_ENCODER)  # txt2img, and image inputs
OPT_LEVELS = range(0, 6)


def plan_file(graph: str) -> str:
    """The plan's file name inside an engine set."""
    return f"{graph}{PLAN_SUFFIX}"


def engine_graphs(config: ModelConfig, graphs: tuple[str, ...] = ENGINE_GRAPHS) -> tuple[str, ...]:
    """`graphs` for `config`: an SDXL model's second text encoder goes with its first."""
    if config.sdxl and TEXT_ENCODER in graphs and TEXT_ENCODER_2 not in graphs:
        i = graphs.index(TEXT_ENCODER) + 1
        return (*graphs[:i], TEXT_ENCODER_2, *graphs[i:])
    return tuple(g for g in graphs if config.sdxl or g != TEXT_ENCODER_2)


def profiles(config: ModelConfig, ranges: ShapeRanges, graphs: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """Per graph, per input: [min, opt, max] shapes (specs.profile over `ranges`), JSON-ready."""
    specs = graph_specs(config)
    return {g: {name: [list(s) for s in shapes] for name, shapes in profile(specs[g], config, ranges).items()}
            for g in graphs}


@dataclass(frozen=True)
class BuilderSettings:
    """TensorRT builder options recorded with a set (and repeated in its rebuild command)."""

    workspace_gb: float | None = None   # None: TensorRT's default (the device's memory)
    opt_level: int = 3                  # builder_optimization_level, TensorRT's default
    refittable: bool = False
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if self.opt_level not in OPT_LEVELS:
            raise InvalidInputError(f"--opt-level must be between {OPT_LEVELS.start} and {OPT_LEVELS.stop - 1}, "
                                    f"got {self.opt_level}")
        if self.workspace_gb is not None and not (math.isfinite(self.workspace_gb) and self.workspace_gb > 0):
            raise InvalidInputError(f"--workspace-gb must be a number > 0, got {self.workspace_gb}")

    def args(self) -> list[str]:
        """The `sdengine build` options that reproduce these settings."""
        out = [] if self.workspace_gb is None else ["--workspace-gb", f"{self.workspace_gb:g}"]
        out += ["--opt-level", str(self.opt_level)]
        out += ["--timing-cache", self.timing_cache] if self.timing_cache else []
        return out + (["--refittable"] if self.refittable else [])

    def to_dict(self) -> dict[str, Any]:
        return {"workspace_gb": self.workspace_gb, "opt_level": self.opt_level, "refittable": self.refittable,
                "timing_cache": self.timing_cache}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuilderSettings":
        return cls(d["workspace_gb"], int(d["opt_level"]), bool(d["refittable"]), d["timing_cache"])


@dataclass(frozen=True)
class GraphEntry:
    """One engine of a set: its plan, the ONNX graph it was built from, its profile and build time."""

    file: str
    sha256: str
    size: int
    onnx_sha256: str
    profile: Mapping[str, list]
    build_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "size": self.size, "onnx_sha256": self.onnx_sha256,
                "profile": dict(self.profile), "build_seconds": round(self.build_seconds, 3)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GraphEntry":
        return cls(str(d["file"]), str(d["sha256"]), int(d["size"]), str(d["onnx_sha256"]), dict(d["profile"]),
                   float(d["build_seconds"]))


@dataclass(frozen=True)
class EngineManifest:
    """A parsed engine-set manifest."""

    folder: Path
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    ranges: ShapeRanges
    builder: BuilderSettings
    source_folder: str          # the ONNX export the set was built from (absolute path)
    source_sha256: str          # that export's source hash (its manifest's source.sha256)
    config: ModelConfig
    graphs: Mapping[str, GraphEntry]
    precision: Precision = Precision.FP16
    sdengine_version: str = __version__
    # Refittable sets only: per graph, the export's weight map {`unet.<param>`: {"shape", "initializers":
    # [[ONNX initializer name, transposed], ...]}}. TensorRT's ONNX parser names every refittable weight after
    # its ONNX initializer, so these are the names a LoRA refit sets (TensorRTBackend.set_loras).
    weights: Mapping[str, Mapping[str, Any]] | None = None

    @property
    def static(self) -> bool:
        return self.ranges.static

    def plan_path(self, graph: str) -> Path:
        return self.folder / plan_file(graph)

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / TOKENIZER_DIR

    def rebuild_command(self) -> str:
        """The exact `sdengine build` command that rebuilds this set with its recorded options."""
        return rebuild_command(self.source_folder, self.folder, self.ranges, self.builder)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "sdengine_version": self.sdengine_version,
            "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": self.gpu_name, "compute_capability": self.compute_capability},
            "precision": self.precision.value, "static": self.static, "shapes": self.ranges.to_dict(),
            "builder": self.builder.to_dict(),
            "source": {"onnx_folder": self.source_folder, "sha256": self.source_sha256},
            "model_config": self.config.to_dict(),
            "graphs": {name: entry.to_dict() for name, entry in self.graphs.items()},
            **({} if self.weights is None else {"weights": {g: dict(m) for g, m in self.weights.items()}}),
        }

    @classmethod
    def from_dict(cls, folder: Path, d: Mapping[str, Any]) -> "EngineManifest":
        return cls(folder, str(d["tensorrt_version"]), str(d["gpu"]["name"]), str(d["gpu"]["compute_capability"]),
                   ShapeRanges.from_dict(d["shapes"]), BuilderSettings.from_dict(d["builder"]),
                   str(d["source"]["onnx_folder"]), str(d["source"]["sha256"]),
                   ModelConfig.from_dict(d["model_config"]),
                   {name: GraphEntry.from_dict(e) for name, e in dict(d["graphs"]).items()},
                   Precision(d["precision"]), str(d["sdengine_version"]),
                   None if d.get("weights") is None else {g: dict(m) for g, m in dict(d["weights"]).items()})


def range_args(ranges: ShapeRanges) -> list[str]:
    """`--static --batch N ...` or `--batch MIN:OPT:MAX ...`: the build options that give `ranges`."""
    if ranges.static:
        return ["--static", "--batch", str(ranges.batch.min), "--height", str(ranges.height.min),
                "--width", str(ranges.width.min)]
    out = []
    for name in ("batch", "height", "width"):
        r = getattr(ranges, name)
        out += [f"--{name}", f"{r.min}:{r.opt}:{r.max}"]
    return out


def rebuild_command(onnx_folder: str | Path, out: str | Path, ranges: ShapeRanges, builder: BuilderSettings) -> str:
    args = ["sdengine", "build", "--onnx", str(onnx_folder), "--out", str(out), *range_args(ranges), *builder.args()]
    return shlex.join(args)


def _generic_rebuild(folder: Path, data: Any = None) -> str:
    """A rebuild hint for a manifest that cannot be parsed (the recorded source folder when readable)."""
    source = "ONNX_DIR"
    if isinstance(data, dict) and isinstance(data.get("source"), dict):
        source = str(data["source"].get("onnx_folder") or source)
    return shlex.join(["sdengine", "build", "--onnx", source, "--out", str(folder)])


def write(manifest: EngineManifest) -> Path:
    """Write manifest.json into the set's folder (temporary file, then rename)."""
    path = manifest.folder / MANIFEST
    write_json_atomic(path, manifest.to_dict())
    return path


def read(folder: str | Path) -> EngineManifest:
    """Parse an engine set's manifest; ModelLoadError (with the rebuild command) when missing, corrupt or incomplete."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ModelLoadError(f"engine set {folder} does not exist: build one with {_generic_rebuild(folder)}")
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no {MANIFEST}, so it is not an sdengine engine set (or its build did "
                             f"not finish): build it with {_generic_rebuild(folder)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); rebuild the set with "
                             f"{_generic_rebuild(folder)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is not an sdengine engine-set manifest; rebuild with {_generic_rebuild(folder)}")
    if data.get("format_version") != FORMAT_VERSION:
        raise UnsupportedModelError(f"{path} has format version {data.get('format_version')!r}; this sdengine reads "
                                    f"version {FORMAT_VERSION}: rebuild with {_generic_rebuild(folder, data)}")
    try:
        return EngineManifest.from_dict(folder, data)
    except (KeyError, TypeError, ValueError, AttributeError, ModelLoadError, InvalidInputError) as exc:
        raise ModelLoadError(f"{path} is incomplete ({exc!r}); rebuild the set with "
                             f"{_generic_rebuild(folder, data)}") from None


def check(manifest: EngineManifest, trt_version: str, gpu_name: str, compute_capability: str) -> None:
    """EngineMismatchError naming every difference between the set's build host and this one."""
    diffs = []
    if manifest.tensorrt_version != trt_version:
        diffs.append(f"built with TensorRT {manifest.tensorrt_version}, this host has {trt_version}")
    if manifest.gpu_name != gpu_name:
        diffs.append(f"built on a {manifest.gpu_name}, this host has a {gpu_name}")
    if manifest.compute_capability != compute_capability:
        diffs.append(f"built for compute capability {manifest.compute_capability}, this GPU has "
                     f"{compute_capability}")
    if diffs:
        raise EngineMismatchError(f"engine set {manifest.folder} does not match this host: {'; '.join(diffs)}. "
                                  f"TensorRT engines run only with the TensorRT version and GPU model they were "
                                  f"built for: rebuild with {manifest.rebuild_command()}")


def check_source(manifest: EngineManifest) -> None:
    """EngineMismatchError when the set's ONNX export (if it still exists) has been re-exported since the build."""
    try:
        onnx = Manifest.read(manifest.source_folder)
    except ModelLoadError:
        return  # moved or removed: the engine set stands on its own
    for name, entry in manifest.graphs.items():
        now = (onnx.graphs.get(name) or {}).get("sha256")
        if now is not None and now != entry.onnx_sha256:
            raise EngineMismatchError(f"the {name} engine of {manifest.folder} was built from an ONNX graph that "
                                      f"{manifest.source_folder} no longer holds (sha256 {entry.onnx_sha256[:12]}, "
                                      f"now {now[:12]}: it was re-exported): rebuild with {manifest.rebuild_command()}")


def verify_plans(manifest: EngineManifest, graphs: tuple[str, ...] = ENGINE_GRAPHS) -> dict[str, Path]:
    """Paths of the wanted plans, each listed, present and with its recorded size and sha256; the tokenizer present."""
    cmd = manifest.rebuild_command()
    out = {}
    for name in graphs:
        entry = manifest.graphs.get(name)
        if entry is None:
            raise ModelLoadError(f"engine set {manifest.folder} has no {name} engine; rebuild with {cmd}")
        path = manifest.plan_path(name)
        if entry.file != path.name:
            raise ModelLoadError(f"{manifest.folder / MANIFEST} names {entry.file!r} for {name}; expected "
                                 f"{path.name}: rebuild with {cmd}")
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing from the engine set; rebuild with {cmd}")
        size = path.stat().st_size
        if size != entry.size:
            raise ModelLoadError(f"{path} has {size} bytes, {entry.size} were built: it is truncated or corrupt; "
                                 f"rebuild with {cmd}")
        if sha256_file(path) != entry.sha256:
            raise ModelLoadError(f"{path} differs from the engine that was built (sha256 mismatch): it was changed "
                                 f"or corrupted; rebuild with {cmd}")
        out[name] = path
    if not (manifest.tokenizer_dir / "vocab.json").is_file():
        raise ModelLoadError(f"{manifest.tokenizer_dir} is missing or incomplete; rebuild with {cmd}")
    return out


def check_shape(manifest: EngineManifest, batch: int, height: int, width: int) -> None:
    """InvalidInputError unless the request lies inside the profiles the set was built with."""
    for what, option, value, r in manifest.ranges.request(batch, height, width):
        check_dim(value, r, what, f"rebuild {manifest.folder} with sdengine build --{option} MIN:OPT:MAX covering it "
                  f"(within the ONNX export's range)", "the range {} that this engine set was built for")
