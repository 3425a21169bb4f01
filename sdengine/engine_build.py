"""`sdengine build`: the fp16 ONNX graphs of an export compiled to TensorRT engines, written as one engine set.

Raw TensorRT builder API rather than polygraphy: it needs no extra dependency, and every call is a
name that tests/test_tensorrt_api.py checks against the TensorRT bindings. Per graph: a strongly
typed network (precision comes from the fp16 graph's own types; the flag is required on 10.x and
ignored by 11.x, where every network is strongly typed), `OnnxParser.parse_from_file` (external
data read from beside the graph), one optimisation profile from specs.profile, the workspace
limit, optimisation level, refit flag and a shared timing cache, then `build_serialized_network`.

The set is built in a temporary folder beside `--out` and renamed into place only when every
engine, the tokenizer and the manifest are written: a failed build leaves no half-written set and
keeps the previous one. No torch here; tensorrt is imported only when a build starts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .engine_manifest import ENGINE_GRAPHS, FORMAT, BuilderSettings, EngineManifest, GraphEntry, engine_graphs, \
    plan_file, profiles, write
from .errors import InvalidInputError, ModelLoadError, SDEngineError
from .files import umask_mode, write_bytes_atomic
from .manifest import MANIFEST, TOKENIZER_2_DIR, TOKENIZER_DIR, Manifest, sha256_file
from .runtime.tensorrt import gpu_identity, import_tensorrt, logger
from .specs import ALL_GRAPHS, DENOISE_STEP, TEXT_ENCODER, TEXT_ENCODER_2, GraphSpec, Precision, Range, ShapeRanges, \
    graph_specs

if TYPE_CHECKING:
    import tensorrt as trt

Log = Callable[[str], None]
_DIMS = ("batch", "height", "width")


@dataclass(frozen=True)
class BuildSettings:
    """What `sdengine build` was asked for; shape values are parsed `N`, `MIN:MAX` or `MIN:OPT:MAX` tuples."""

    static: bool = False
    batch: tuple[int, ...] | None = None
    height: tuple[int, ...] | None = None
    width: tuple[int, ...] | None = None
    builder: BuilderSettings = field(default_factory=BuilderSettings)
    verbose: bool = False
    graphs: tuple[str, ...] = ENGINE_GRAPHS

    def __post_init__(self) -> None:
        unknown = [g for g in self.graphs if g not in ALL_GRAPHS]
        if unknown or not self.graphs:
            raise InvalidInputError(f"unknown graphs {unknown}; choose from {', '.join(ALL_GRAPHS)}")
        if self.static and any(v is not None and len(set(v)) > 1 for v in (self.batch, self.height, self.width)):
            raise InvalidInputError("--static takes one value for --batch, --height and --width, not a range")


def _narrow(values: tuple[int, ...] | None, default: Range) -> Range:
    """A Range from parsed values; a MIN:MAX range keeps the export's opt point, clipped into it."""
    if values is None:
        return default
    if len(values) == 3:
        return Range(*values)
    lo, hi = values[0], values[-1]
    return Range(lo, min(max(default.opt, lo), hi), hi)


def build_ranges(onnx_ranges: ShapeRanges, factor: int, settings: BuildSettings) -> ShapeRanges:
    """The engines' shape ranges: the ONNX export's, or narrower ones inside them (one value each when static)."""
    given = {name: getattr(settings, name) for name in _DIMS}
    static = settings.static or onnx_ranges.static
    if static:
        if any(v is not None and len(set(v)) > 1 for v in given.values()):
            raise InvalidInputError(f"the ONNX export is static ({_describe(onnx_ranges)}): its engines take one value "
                                    f"for --batch, --height and --width")
        values = {n: getattr(onnx_ranges, n).opt if v is None else v[0] for n, v in given.items()}
        ranges = ShapeRanges(*(Range(values[n], values[n], values[n]) for n in _DIMS), static=True,
                             slots=onnx_ranges.slots, chunks=1)  # a static engine reads one prompt chunk
    else:
        ranges = ShapeRanges(*(_narrow(given[n], getattr(onnx_ranges, n)) for n in _DIMS), slots=onnx_ranges.slots,
                             chunks=onnx_ranges.chunks)
    ranges.check_sides(factor)
    for name in _DIMS:
        r, o = getattr(ranges, name), getattr(onnx_ranges, name)
        if r.min < o.min or r.max > o.max:
            raise InvalidInputError(f"--{name} {r.text()} lies outside the ONNX export's range {o.text()}; build "
                                    f"within it, or re-export with sdengine export --{name} MIN:MAX covering it")
    return ranges


def _describe(r: ShapeRanges) -> str:
    return f"batch {r.batch.text()}, {r.height.text()}x{r.width.text()} px"


def read_fp16_export(onnx_dir: str | Path) -> Manifest:
    """The export's manifest; InvalidInputError unless it holds fp16 graphs (engines are strongly typed)."""
    onnx = Manifest.read(onnx_dir)
    if onnx.precision != Precision.FP16:
        raise InvalidInputError(f"{onnx.folder} is an {onnx.precision.value} ONNX export; TensorRT engines are built "
                                f"strongly typed from fp16 graphs: re-export with sdengine export --fp16 "
                                f"--model MODEL --out DIR and build from DIR")
    return onnx


def check_out(out: str | Path) -> Path:
    """The absolute output folder: new, or an engine set that the build replaces; never another folder's files."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is a file; give a folder for the engine set")
    if out.is_dir() and any(out.iterdir()) and not _is_engine_set(out):
        raise InvalidInputError(f"--out {out} exists and is not an sdengine engine set; give a new folder "
                                f"(an existing engine set is replaced)")
    return out


def _is_engine_set(folder: Path) -> bool:
    """Whether `folder` holds an engine-set manifest (readable or not, any version): safe to replace."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def build_engines(onnx_dir: str | Path, out: str | Path, settings: BuildSettings, log: Log = print,
                  trt: Any = None, gpu: tuple[str, str] | None = None) -> EngineManifest:
    """Build every engine of `settings.graphs` from the fp16 export `onnx_dir` into the engine set `out`."""
    onnx = read_fp16_export(onnx_dir)
    settings = replace(settings, graphs=engine_graphs(onnx.config, settings.graphs))  # SDXL: both text encoders
    ranges = build_ranges(onnx.ranges, onnx.config.vae.downscale, settings)
    out = check_out(out)
    cache = settings.builder.timing_cache
    if cache is not None and not Path(cache).parent.is_dir():
        raise InvalidInputError(f"--timing-cache {cache}: its folder does not exist")
    trt = import_tensorrt() if trt is None else trt
    gpu_name, capability = gpu_identity() if gpu is None else gpu
    graph_paths = {name: onnx.graph_path(name) for name in settings.graphs}  # listed, present, sha256 as exported
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        entries = _build_all(trt, onnx, graph_paths, ranges, settings, tmp, log)
        _copy_tokenizer(onnx.folder, tmp, onnx.config.sdxl)
        manifest = EngineManifest(out, str(trt.__version__), gpu_name, capability, ranges, settings.builder,
                                  str(onnx.folder.absolute()), onnx.source_sha256, onnx.config, entries,
                                  weights=refit_weights(onnx, settings))
        write(replace(manifest, folder=tmp))
        tmp.chmod(umask_mode(0o777))
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{out}: {len(entries)} engine(s) built (TensorRT {manifest.tensorrt_version}, {gpu_name}, "
        f"{_describe(ranges)})")
    return manifest


def refit_weights(onnx: Manifest, settings: BuildSettings) -> dict[str, dict] | None:
    """For a refittable build, the export's weight map of each built graph a LoRA changes (None otherwise).

    Copied into the engine set's manifest so the set itself names the weights a refit sets (the ONNX
    parser keeps initializer names as weight names); the pristine values are read from the export at refit
    time, after its graphs' sha256 are checked against the ones these engines were built from."""
    if not settings.builder.refittable:
        return None
    return {g: dict(onnx.graphs[g]["parameters"]) for g in (TEXT_ENCODER, TEXT_ENCODER_2, DENOISE_STEP)
            if g in settings.graphs and onnx.graphs.get(g, {}).get("parameters") is not None}


def _build_all(trt: Any, onnx: Manifest, graph_paths: dict[str, Path], ranges: ShapeRanges, settings: BuildSettings,
               folder: Path, log: Log) -> dict[str, GraphEntry]:
    """Build and write each plan into `folder`; its manifest entries."""
    builder = trt.Builder(logger(trt, settings.verbose))
    shapes = profiles(onnx.config, ranges, settings.graphs)
    cache = None
    entries = {}
    for i, name in enumerate(settings.graphs, 1):
        step = f"[{i}/{len(settings.graphs)}] {name}"
        log(f"{step}: building from {graph_paths[name].name} ...")
        start = time.perf_counter()
        plan, cache, profile = _build_one(trt, builder, graph_specs(onnx.config)[name], graph_paths[name],
                                          shapes[name], settings, cache, log)
        seconds = time.perf_counter() - start
        path = folder / plan_file(name)
        write_bytes_atomic(path, plan)
        del plan
        size = path.stat().st_size
        entries[name] = GraphEntry(path.name, sha256_file(path), size, onnx.graphs[name]["sha256"], profile, seconds)
        log(f"{step}: {size / 2**20:.1f} MiB in {seconds:.1f} s")
    return entries


def _build_one(trt: Any, builder: trt.Builder, spec: GraphSpec, path: Path, shapes: dict[str, list],
               settings: BuildSettings, cache: trt.ITimingCache | None,
               log: Log) -> tuple[trt.IHostMemory, trt.ITimingCache, dict[str, list]]:
    """One serialized engine, the timing cache (shared by every engine of the set) and the engine's profile."""
    name = spec.name
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = _parse(trt, network, path, settings.verbose)  # the parser owns weights the network uses: keep it
    _check_io(network, spec, path)
    config = builder.create_builder_config()
    effective = _add_profile(builder, network, config, name, shapes)
    if settings.builder.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.builder.workspace_gb * (1 << 30)))
    config.builder_optimization_level = settings.builder.opt_level
    if settings.builder.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = _attach_cache(config, cache, settings.builder.timing_cache, log)
    monitor = _progress_monitor(trt, name, log)
    if monitor is not None:
        config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SDEngineError(f"TensorRT could not build the {name} engine from {path} (see its log above); "
                            f"rerun with --verbose for TensorRT's full log")
    if settings.builder.timing_cache is not None:
        write_bytes_atomic(Path(settings.builder.timing_cache), config.get_timing_cache().serialize())
    del parser, monitor
    return plan, cache, effective


def _parse(trt: Any, network: trt.INetworkDefinition, path: Path, verbose: bool) -> trt.OnnxParser:
    """Parse the ONNX graph at `path` into `network`; ModelLoadError listing the parser's errors."""
    parser = trt.OnnxParser(network, logger(trt, verbose))
    if not parser.parse_from_file(str(path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        text = "; ".join(f"{e.desc()} (node {e.node_name()})" for e in errors[:5]) or "no error recorded"
        raise ModelLoadError(f"TensorRT's ONNX parser rejected {path}: {text}; rerun with --verbose for the full "
                             f"log, or re-export with sdengine export --fp16 --force")
    return parser


def _check_io(network: trt.INetworkDefinition, spec: GraphSpec, path: Path) -> None:
    """The parsed network's inputs and outputs are the spec's."""
    name = spec.name
    inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    outputs = sorted(network.get_output(i).name for i in range(network.num_outputs))
    if inputs != sorted(spec.input_names) or outputs != sorted(spec.output_names):
        raise ModelLoadError(f"{path} has inputs {inputs} and outputs {outputs}; the {name} graph of this sdengine "
                             f"has {sorted(spec.input_names)} and {sorted(spec.output_names)}: re-export it with "
                             f"sdengine export --fp16 --force")


def _add_profile(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig, name: str,
                 shapes: dict[str, list]) -> dict[str, list]:
    """One optimisation profile over the dynamic inputs; the profile the engine really has (fixed dims fixed)."""
    profile = builder.create_optimization_profile()
    dynamic, effective = False, {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(int(d) for d in tensor.shape)
        lo, opt, hi = (tuple(s) for s in shapes[tensor.name])
        if len(dims) != len(lo) or any(d >= 0 and not a <= d <= b for d, a, b in zip(dims, lo, hi)):
            raise ModelLoadError(f"{name} input {tensor.name} has shape {dims} in the ONNX graph, the build asks for "
                                 f"{lo}..{hi}: build within the export's ranges, or re-export")
        if any(d < 0 for d in dims):
            profile.set_shape(tensor.name, lo, opt, hi)
            dynamic = True
        effective[tensor.name] = [[a if d < 0 else d for d, a in zip(dims, s)] for s in (lo, opt, hi)]
    if dynamic and config.add_optimization_profile(profile) < 0:  # -1: TensorRT found the profile invalid
        raise ModelLoadError(f"TensorRT rejected the {name} optimisation profile {effective}; rerun with --verbose "
                             f"for its log, and build within the export's ranges")
    return effective


def _attach_cache(config: trt.IBuilderConfig, cache: trt.ITimingCache | None, path: str | None,
                  log: Log) -> trt.ITimingCache:
    """Share one timing cache across the set's builds, loaded from `path` when that file exists."""
    if cache is None:
        data = Path(path).read_bytes() if path is not None and Path(path).is_file() else b""
        cache = config.create_timing_cache(data)
        if data and (cache is None or not config.set_timing_cache(cache, False)):
            log(f"timing cache {path} is unreadable or from another TensorRT/GPU: starting a new one")
            cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise SDEngineError("TensorRT refused a new timing cache; rerun with --verbose to see why")
    return cache


def _progress_monitor(trt: Any, name: str, log: Log) -> Any:
    """A trt.IProgressMonitor that logs the builder's top-level phases and their times (None if absent)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self) -> None:
            base.__init__(self)
            self.started: dict[str, float] = {}
            self.top: set[str] = set()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                self.top.add(phase_name)
                self.started[phase_name] = time.perf_counter()
                log(f"  {name}: {phase_name} ({num_steps} step(s)) ...")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            if phase_name in self.top:
                log(f"  {name}: {phase_name} done in {time.perf_counter() - self.started[phase_name]:.1f} s")

    return Monitor()


def _copy_tokenizer(onnx_folder: Path, folder: Path, sdxl: bool = False) -> None:
    for name in (TOKENIZER_DIR, TOKENIZER_2_DIR) if sdxl else (TOKENIZER_DIR,):  # SDXL: both tokenizers
        src = onnx_folder / name
        if not (src / "vocab.json").is_file():
            raise ModelLoadError(f"{src} is missing or incomplete; re-export the ONNX folder with sdengine export "
                                 f"--force")
        shutil.copytree(src, folder / name)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished set to `out`; an existing set there is moved aside first and removed after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
