"""Export settings: precision, opset, shape ranges, graph selection. No torch: the CLI parses these first."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from .. import __version__
from ..config import ModelConfig
from ..errors import InvalidInputError
from ..specs import (ALL_GRAPHS, CACHE_GRAPHS, DENOISE_STEP, MAX_BATCH, STATE_SLOTS, UNET, VALIDATE_QUICK,
                     VALIDATION_MODES, Precision, Range, ShapeRanges)

DEFAULT_OPSET = 17
OPSETS = range(17, 21)  # LayerNormalization needs 17; the TorchScript exporter stops at 20
GRAPH_ORDER = ALL_GRAPHS  # text_encoder_2: SDXL models only
DEFAULT_GRAPHS = tuple(g for g in GRAPH_ORDER if g != UNET)  # the plain U-Net on request only (--unet-graph)
CACHE_GRAPH_ORDER = tuple(CACHE_GRAPHS)  # exported after the others, only with step_cache
# --int8: the op types whose weights ONNX Runtime's dynamic quantization stores as int8 (export/int8.py)
INT8_OPS = {"matmul": ("MatMul",), "matmul+conv": ("MatMul", "Conv")}
DEFAULT_INT8 = "matmul"
INT8_GRAPHS = (DENOISE_STEP, UNET) + tuple(CACHE_GRAPHS)  # the graphs holding the U-Net: the others stay fp32


def parse_range(text: str, what: str) -> tuple[int, ...]:
    """'N', 'MIN:MAX' or 'MIN:OPT:MAX' as a tuple of ints."""
    parts = str(text).split(":")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise InvalidInputError(f"--{what} takes N, MIN:MAX or MIN:OPT:MAX (integers), got {text!r}") from None
    if not 1 <= len(values) <= 3 or any(v <= 0 for v in values) or list(values) != sorted(values):
        raise InvalidInputError(f"--{what} takes N, MIN:MAX or MIN:OPT:MAX with 0 < MIN <= MAX, got {text!r}")
    return values


def _range(values: tuple[int, ...] | None, default: Range, what: str) -> Range:
    """A Range from parsed values; the opt point is the default's, clipped into [min, max]."""
    if values is None:
        return default
    if len(values) == 3:
        return Range(*values)
    lo, hi = values[0], values[-1]
    opt = lo if what == "batch" else min(max(default.opt, lo), hi)
    return Range(lo, opt, hi)


@dataclass(frozen=True)
class ExportSettings:
    """What `sdengine export` was asked for; shape ranges default to the model's (ShapeRanges.default)."""

    precision: Precision = Precision.FP32
    opset: int = DEFAULT_OPSET
    batch: tuple[int, ...] | None = None
    height: tuple[int, ...] | None = None
    width: tuple[int, ...] | None = None
    static: bool = False
    force: bool = False
    graphs: tuple[str, ...] = field(default=DEFAULT_GRAPHS)
    state_slots: int = STATE_SLOTS  # the denoise step's sampler state (README, "Samplers")
    max_prompt_chunks: int | None = None  # prompt chunks the step graph reads (None: 8, or 1 when static)
    step_cache: int | None = None  # step caching's branch: also export the full and shallow step graphs (README)
    int8: str | None = None  # a key of INT8_OPS: the U-Net graphs quantized to int8 for the CPU (README, "int8")
    validate: str = VALIDATE_QUICK  # shape points checked (specs.validation_points); not part of a graph's key

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision(self.precision))
        if self.opset not in OPSETS:
            raise InvalidInputError(f"--opset must be between {OPSETS.start} and {OPSETS.stop - 1}, got {self.opset}")
        unknown = [g for g in self.graphs if g not in ALL_GRAPHS]
        if unknown or not self.graphs:
            raise InvalidInputError(f"unknown graphs {unknown}; choose from {', '.join(ALL_GRAPHS)}")
        if self.batch is not None and self.batch[-1] > MAX_BATCH:
            raise InvalidInputError(f"--batch must be at most {MAX_BATCH}, got {self.batch[-1]}")
        for name in ("height", "width"):
            values = getattr(self, name)
            if values is not None and any(v % 8 for v in values):
                raise InvalidInputError(f"--{name} values must be multiples of 8 pixels, got {values}")
        if self.static and any(v is not None and len(set(v)) > 1 for v in (self.batch, self.height, self.width)):
            raise InvalidInputError("--static takes one value for --batch, --height and --width, not a range")
        if isinstance(self.state_slots, bool) or self.state_slots not in range(1, STATE_SLOTS + 1):
            raise InvalidInputError(f"--state-slots must be between 1 and {STATE_SLOTS}, got {self.state_slots!r}")
        if self.step_cache is not None and (isinstance(self.step_cache, bool) or not isinstance(self.step_cache, int)
                                            or self.step_cache < 0):
            raise InvalidInputError(f"--step-cache takes step caching's branch, an integer >= 0 (0: the shallowest, "
                                    f"deepcache's default), got {self.step_cache!r}")

        if self.validate not in VALIDATION_MODES:
            raise InvalidInputError(f"--validate takes {' or '.join(VALIDATION_MODES)}, got {self.validate!r}")
        if self.int8 is not None and self.int8 not in INT8_OPS:
            raise InvalidInputError(f"--int8 takes one of {', '.join(INT8_OPS)}, got {self.int8!r}")
        if self.int8 is not None and self.precision is not Precision.FP32:
            raise InvalidInputError("--int8 quantizes the fp32 U-Net for the CPU and cannot be combined with --fp16 "
                                    "(a GPU choice): drop one of them")

    def quantized(self, graph: str) -> str | None:
        """The --int8 op set `graph` is quantized with, or None (graphs without the U-Net stay fp32)."""
        return self.int8 if graph in INT8_GRAPHS else None

    def ranges(self, config: ModelConfig) -> ShapeRanges:
        """The shape ranges for `config`, checked against its latent factor."""
        default = ShapeRanges.default(config, self.static)
        if self.static:
            b, h, w = (default_value if given is None else given[0] for given, default_value in
                       ((self.batch, default.batch.opt), (self.height, default.height.opt),
                        (self.width, default.width.opt)))
            ranges = ShapeRanges(Range(b, b, b), Range(h, h, h), Range(w, w, w), static=True,
                                 slots=self.state_slots,
                                 chunks=1 if self.max_prompt_chunks is None else self.max_prompt_chunks)
        else:
            ranges = ShapeRanges(_range(self.batch, default.batch, "batch"),
                                 _range(self.height, default.height, "height"),
                                 _range(self.width, default.width, "width"), slots=self.state_slots,
                                 chunks=default.chunks if self.max_prompt_chunks is None else self.max_prompt_chunks)
        ranges.check_sides(config.vae.downscale)
        if self.int8 is not None and config.sdxl:
            raise InvalidInputError("--int8 is not supported for SDXL exports yet (its quality and the quantizer's "
                                    "memory on a 10 GB U-Net are unmeasured); export SDXL without --int8")
        if self.step_cache is not None:
            from ..stepcache import cache_split

            if config.sdxl:
                raise InvalidInputError("--step-cache: step caching's graphs for SDXL exports are not supported yet; "
                                        "SDXL caches on the torch backend (--backend torch --cache-interval N)")
            cache_split(config.unet, self.step_cache)  # InvalidInputError for a branch this U-Net lacks
            ranges = dataclasses.replace(ranges, cache_branch=self.step_cache)
        return ranges

    def wants(self, graph: str) -> bool:
        """Whether `graph` is exported: one of `graphs`, or a step caching graph when step_cache is given."""
        return graph in self.graphs or (graph in CACHE_GRAPHS and self.step_cache is not None)

    def key(self, graph: str, ranges: ShapeRanges, weights_sha256: str, tools: dict[str, str]) -> str:
        """sha256 of everything a graph depends on: it is up to date when this key is unchanged."""
        shapes = ranges.to_dict()
        if graph not in CACHE_GRAPHS:  # step caching's branch changes its own graphs only
            shapes.pop("cache_branch", None)
        stamp = {"graph": graph, "precision": self.precision.value, "opset": self.opset,
                 "shapes": shapes, "weights": weights_sha256, "sdengine": __version__, "tools": tools}
        if self.quantized(graph):  # an fp32 graph keeps its key, so adding or dropping --int8 re-exports the U-Net only
            stamp["int8"] = self.quantized(graph)
        return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()
