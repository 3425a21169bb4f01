"""IO contracts of the exported graphs: the only place tensor names are spelled (DESIGN.md, layout).

One `GraphSpec` per graph: names, dtypes, symbolic dimensions, min/opt/max shape profiles, a
sample-input builder and tolerances. Export, validation, the ONNX Runtime backend and (later) the
TensorRT engine build all read it. numpy and the standard library only: the runtime imports this.

Conventions every graph shares:
- inputs and outputs are float32 at every precision (fp16 graphs cast at their edges); token ids
  are int32 (TensorRT's native index type; ids < 2**31);
- `timestep` is float32 [1]: the U-Net only ever reads it as a float (its sinusoidal embedding),
  every training step 0..999 is exact in float32, and TensorRT and ONNX Runtime both take it as is;
- latents are the scaled latents of the diffusion (`scaling_factor * z`): the VAE graphs apply the
  scaling inside, so a loop never touches it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .config import SDXL_TIME_IDS, ModelConfig
from .errors import InvalidInputError
from .prompts import MAX_PROMPT_CHUNKS
from .samplers.table import row_width

MIN_SIDE, MAX_SIDE, MAX_BATCH = 64, 2048, 64
STATE_SLOTS = 4  # the denoise step's state by default: enough for every sampler (sdengine.samplers.SLOTS_MAX)
TEXT_ENCODER, DENOISE_STEP, UNET, VAE_DECODER, VAE_ENCODER = (
    "text_encoder", "denoise_step", "unet", "vae_decoder", "vae_encoder")
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second text encoder (sdxl_graphs)
# step caching (sdengine.stepcache): exported only when asked (sdengine export --step-cache BRANCH)
DENOISE_STEP_FULL, DENOISE_STEP_SHALLOW, DEEP_FEATURE = "denoise_step_full", "denoise_step_shallow", "deep_feature"


class Precision(str, enum.Enum):
    """Precision of the network bodies; graph inputs, outputs and the scheduler update stay fp32."""

    FP32 = "fp32"
    FP16 = "fp16"


# Relative L2 error allowed against the fp32 PyTorch reference, and the decoded-image PSNR floor.
TOLERANCE = {Precision.FP32: 1e-4, Precision.FP16: 5e-3}
MIN_PSNR_DB = {Precision.FP32: 35.0, Precision.FP16: 35.0}
# An --int8 U-Net graph's relative L2 error against the fp32 reference, one call on random inputs (its fp32 graph
# passes TOLERANCE first): it catches a broken quantization, not a small loss. Measured 0.018-0.049 on the tiny, demo
# and SD 1.5-shaped step graphs (matmul and matmul+conv); images: README, "int8 on the CPU".
INT8_TOLERANCE = 0.15


@dataclass(frozen=True)
class Range:
    """min / opt / max of one dimension (a TensorRT optimisation profile entry)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 < self.min <= self.opt <= self.max:
            raise InvalidInputError(f"a shape range needs 0 < min <= opt <= max, got {self}")

    def scaled(self, k: int) -> "Range":
        return Range(self.min * k, self.opt * k, self.max * k)

    def divided(self, k: int) -> "Range":
        return Range(self.min // k, self.opt // k, self.max // k)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, (int, np.integer)) and self.min <= value <= self.max

    def text(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}..{self.max}"


@dataclass(frozen=True)
class ShapeRanges:
    """Images per prompt batch and image sides in pixels that an export accepts, and its state slots.

    `slots` is the denoise step's state size S (latent + S-1 history slots): 1 runs the single-step
    samplers (DDIM, DDPM, Euler, Euler a, LCM), 2 adds Heun and DPM++ 2M, 4 every sampler.
    `chunks` is the most prompt chunks the step graph's text embeddings hold: their length is 77 x k for
    k in 1..chunks (README, "Prompts"); a static export reads one chunk.
    """

    batch: Range
    height: Range
    width: Range
    static: bool = False
    slots: int = STATE_SLOTS
    chunks: int | None = None  # None: MAX_PROMPT_CHUNKS, or 1 when static
    cache_branch: int | None = None  # step caching's branch of the export's full/shallow step graphs, if any

    def __post_init__(self) -> None:
        if self.chunks is None:
            object.__setattr__(self, "chunks", 1 if self.static else MAX_PROMPT_CHUNKS)

    @classmethod
    def default(cls, config: ModelConfig, static: bool = False) -> "ShapeRanges":
        """1..4 images; sides from half to twice the training size (clipped to 64..2048); opt at training size."""
        size, f = config.default_size, config.vae.downscale
        lo = max(MIN_SIDE, _round_up(size // 2, f))
        hi = min(MAX_SIDE, size * 2)
        side = Range(size, size, size) if static else Range(lo, size, hi)
        batch = Range(1, 1, 1) if static else Range(1, 1, 4)
        return cls(batch, side, side, static)

    def check_sides(self, factor: int) -> None:
        """Sides must be multiples of the latent factor within 64..2048; static means one value each."""
        for name in ("height", "width"):
            r = getattr(self, name)
            if r.min < MIN_SIDE or r.max > MAX_SIDE or any(v % factor for v in (r.min, r.opt, r.max)):
                raise InvalidInputError(f"{name} range {r.text()} must be multiples of {factor} within "
                                        f"{MIN_SIDE}..{MAX_SIDE}")
        if not 1 <= self.batch.min <= self.batch.max <= MAX_BATCH:
            raise InvalidInputError(f"batch range {self.batch.text()} must lie within 1..{MAX_BATCH}")
        if self.static and any(r.min != r.max for r in (self.batch, self.height, self.width)):
            raise InvalidInputError("a static export takes one value for batch, height and width, not a range")
        if not isinstance(self.slots, int) or not 1 <= self.slots <= STATE_SLOTS:
            raise InvalidInputError(f"state slots must be between 1 and {STATE_SLOTS}, got {self.slots!r}")
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) \
                or not 1 <= self.chunks <= MAX_PROMPT_CHUNKS:
            raise InvalidInputError(f"--max-prompt-chunks must be between 1 and {MAX_PROMPT_CHUNKS}, "
                                    f"got {self.chunks!r}")
        if self.static and self.chunks != 1:
            raise InvalidInputError("a static export reads one prompt chunk (77 tokens): leave out --max-prompt-chunks "
                                    "or export without --static")

    def request(self, batch: int, height: int, width: int) -> tuple[tuple[str, str, int, Range], ...]:
        """(what, option, value, range) of each dimension of a request: images, height, width."""
        return (("images", "batch", batch, self.batch), ("height", "height", height, self.height),
                ("width", "width", width, self.width))

    def check(self, batch: int, height: int, width: int) -> None:
        """InvalidInputError unless the request lies inside the exported ranges."""
        for what, option, value, r in self.request(batch, height, width):
            check_dim(value, r, what, f"re-export with sdengine export --{option} MIN:MAX covering it")

    def to_dict(self) -> dict[str, Any]:
        out = {"batch": _range_list(self.batch), "height": _range_list(self.height),
               "width": _range_list(self.width), "static": self.static, "slots": self.slots, "chunks": self.chunks}
        if self.cache_branch is not None:
            out["cache_branch"] = self.cache_branch
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ShapeRanges":
        return cls(Range(*d["batch"]), Range(*d["height"]), Range(*d["width"]), bool(d["static"]), int(d["slots"]),
                   None if d.get("chunks") is None else int(d["chunks"]),
                   None if d.get("cache_branch") is None else int(d["cache_branch"]))

    def check_context(self, length: int, sequence: int, hint: str) -> None:
        """InvalidInputError unless text embeddings of `length` tokens (k chunks of `sequence`) fit the export."""
        chunks = length // sequence
        if length % sequence or not 1 <= chunks <= self.chunks:
            raise InvalidInputError(f"the prompt needs {chunks} chunks of {sequence - 2} tokens (text embeddings of "
                                    f"{length}); this export reads 1..{self.chunks}: "
                                    + hint.format(chunks=max(chunks, 1)))


def check_dim(value: int, r: Range, what: str, hint: str, where: str = "this ONNX export's range {}") -> None:
    """InvalidInputError unless `value` lies within `r` (`where` names the range; {} stands for it)."""
    if value not in r:
        raise InvalidInputError(f"{what} {value} is outside {where.format(r.text())}; {hint}")


def _range_list(r: Range) -> list[int]:
    return [r.min, r.opt, r.max]


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, dimensions (symbols or ints), sample kind."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]
    sample: str = "normal"
    doc: str = ""


@dataclass(frozen=True)
class GraphSpec:
    """The contract of one exported graph (optimum's OnnxConfig, the TensorRT demo's BaseModel)."""

    name: str
    component: str                       # the weights it is built from: text_encoder, unet or vae
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str
    fp32_inputs: tuple[str, ...] = ()    # inputs whose own subgraph stays fp32 in an fp16 export
    image_output: str | None = None      # output compared by PSNR as an image in [-1, 1]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(name)


# Symbols of the dynamic dimensions. `rows` is B, or 2B with guidance (unconditional rows first); `context` is the
# text embeddings' length in the step graphs: 77 x k for a prompt of k chunks.
DYNAMIC_DIMS = ("batch", "batch_x2", "rows", "latent_height", "latent_width", "height", "width", "context",
                "feature_height", "feature_width")
_LATENT = ("batch", "channels", "latent_height", "latent_width")
_STATE = ("slots", *_LATENT)

GRAPHS: dict[str, GraphSpec] = {
    TEXT_ENCODER: GraphSpec(
        TEXT_ENCODER, "text_encoder",
        inputs=(TensorSpec("input_ids", "int32", ("rows", "sequence"), "token_ids", "CLIP token ids"),
                TensorSpec("clip_skip", "int32", (1,), "clip_skip",
                           "layers skipped from the end: 0 reads the last layer (diffusers' clip_skip)")),
        outputs=(TensorSpec("last_hidden_state", "float32", ("rows", "sequence", "hidden"),
                            doc="layer -1-clip_skip's output after the final layer norm: what the U-Net attends to"),
                 TensorSpec("pooled_output", "float32", ("rows", "hidden"), doc="hidden state at the EOS token")),
        doc="CLIP text transformer: token ids -> text embeddings"),
    DENOISE_STEP: GraphSpec(
        DENOISE_STEP, "unet",
        inputs=(TensorSpec("state", "float32", _STATE, "state", "slot 0: x_t; slots 1..S-1: the sampler's history"),
                TensorSpec("timestep", "float32", (1,), "timestep", "the row's (possibly fractional) timestep"),
                TensorSpec("text_embeddings", "float32", ("batch_x2", "context", "hidden"),
                           doc="unconditional rows first, then conditional; 77 x k tokens for k prompt chunks"),
                TensorSpec("guidance_scale", "float32", (1,), "guidance", "g"),
                TensorSpec("coefficients", "float32", ("row",), "coefficients",
                           "the row's A (S x S, row-major), b (S), c (S)"),
                TensorSpec("noise", "float32", _LATENT, doc="z (zeros when c = 0)"),
                TensorSpec("mask", "float32", ("batch", 1, "latent_height", "latent_width"), "mask",
                           "1 where the image is repainted (inpainting), else 0"),
                TensorSpec("known", "float32", _LATENT,
                           doc="the image's latent x0 (4-channel blend) or the masked image's (9-channel U-Net)"),
                TensorSpec("known_noise", "float32", _LATENT, doc="the noise x0 is re-noised with (the initial z)"),
                TensorSpec("blend", "float32", (3,), "blend",
                           "the row's (p, q, r): slot 0 += (1 - mask) (p known + q known_noise - r slot 0)")),
        outputs=(TensorSpec("next_state", "float32", _STATE,
                            doc="A state + b (m_u + g (m_c - m_u)) + c z, then the inpainting blend, in fp32"),),
        doc="U-Net on 2B rows + classifier-free guidance + the sampler's update (DESIGN.md)",
        fp32_inputs=("timestep", "guidance_scale")),
    UNET: GraphSpec(
        UNET, "unet",
        inputs=(TensorSpec("sample", "float32", ("rows", "unet_channels", "latent_height", "latent_width")),
                TensorSpec("timestep", "float32", (1,), "timestep"),
                TensorSpec("text_embeddings", "float32", ("rows", "context", "hidden"))),
        outputs=(TensorSpec("model_output", "float32", ("rows", "channels", "latent_height", "latent_width"),
                            doc="eps or v, by the model's prediction type"),),
        doc="the plain U-Net, for loops of your own", fp32_inputs=("timestep",)),
    VAE_DECODER: GraphSpec(
        VAE_DECODER, "vae",
        inputs=(TensorSpec("latent", "float32", _LATENT, doc="scaled latent; divided by scaling_factor inside"),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "height", "width"), doc="RGB in about [-1, 1]"),),
        doc="VAE decoder: latent -> image", image_output="image"),
    VAE_ENCODER: GraphSpec(
        VAE_ENCODER, "vae",
        inputs=(TensorSpec("image", "float32", ("batch", 3, "height", "width"), "image", "RGB in [-1, 1]"),),
        outputs=(TensorSpec("latent_mean", "float32", _LATENT, doc="scaling_factor * mean of q(z|x)"),
                 TensorSpec("latent_std", "float32", _LATENT, doc="scaling_factor * std of q(z|x)")),
        doc="VAE encoder: image -> scaled latent Gaussian (sample = mean + std * noise)"),
}

_FEATURE = TensorSpec(DEEP_FEATURE, "float32", ("batch_x2", "feature_channels", "feature_height", "feature_width"),
                      doc="step caching's deep feature: the input of the up-path layer where the shallow branch joins")
CACHE_GRAPHS: dict[str, GraphSpec] = {
    DENOISE_STEP_FULL: GraphSpec(
        DENOISE_STEP_FULL, "unet", inputs=GRAPHS[DENOISE_STEP].inputs,
        outputs=GRAPHS[DENOISE_STEP].outputs + (_FEATURE,),
        doc="the denoise step, also returning the deep feature step caching reuses (sdengine.stepcache)",
        fp32_inputs=GRAPHS[DENOISE_STEP].fp32_inputs),
    DENOISE_STEP_SHALLOW: GraphSpec(
        DENOISE_STEP_SHALLOW, "unet", inputs=GRAPHS[DENOISE_STEP].inputs + (_FEATURE,),
        outputs=GRAPHS[DENOISE_STEP].outputs,
        doc="the denoise step through the U-Net's shallow branch only, reading the last full step's deep feature",
        fp32_inputs=GRAPHS[DENOISE_STEP].fp32_inputs),
}

# SDXL (Podell et al. 2023): two text encoders whose hidden states of layer -2-clip_skip (no final layer norm) are
# concatenated into the context, the second's pooled projection `text_embeds`, and the micro-conditioning `time_ids`
# (sdengine.config.SDXL_TIME_IDS numbers per row) that the step and U-Net graphs take besides. Symbols: `hidden_2` is
# the second encoder's width, `pooled` its projection's, `cross_attention` the context width (hidden + hidden_2).
ADDED_INPUTS = ("text_embeds", "time_ids")  # the SDXL step's extra inputs, bound once per call (runtime.loop)
_SDXL_HIDDEN_DOC = "layer -2-clip_skip's output, without the final layer norm (SDXL's conditioning)"
_TEXT_EMBEDS = TensorSpec("text_embeds", "float32", ("batch_x2", "pooled"),
                          doc="text_encoder_2's pooled, projected output, in the text rows' order")
_TIME_IDS = TensorSpec("time_ids", "float32", ("batch_x2", SDXL_TIME_IDS), "time_ids",
                       "original_size (h, w), crops_coords_top_left (top, left), target_size (h, w) per text row")


def _sdxl_rows(t: TensorSpec, rows: str) -> TensorSpec:
    return dataclasses.replace(t, dims=(rows, *t.dims[1:]))


def _sdxl_context(spec: GraphSpec) -> tuple[TensorSpec, ...]:
    """The spec's inputs with the text embeddings [rows, context, cross_attention], and the two added inputs."""
    rows = spec.tensor("text_embeddings").dims[0]
    inputs = tuple(dataclasses.replace(t, dims=(*t.dims[:2], "cross_attention")) if t.name == "text_embeddings" else t
                   for t in spec.inputs)
    return inputs + (_sdxl_rows(_TEXT_EMBEDS, rows), _sdxl_rows(_TIME_IDS, rows))


SDXL_GRAPHS: dict[str, GraphSpec] = {
    TEXT_ENCODER: GraphSpec(
        TEXT_ENCODER, "text_encoder", inputs=GRAPHS[TEXT_ENCODER].inputs,
        outputs=(TensorSpec("hidden_state", "float32", ("rows", "sequence", "hidden"), doc=_SDXL_HIDDEN_DOC),
                 TensorSpec("pooled_output", "float32", ("rows", "hidden"), doc="hidden state at the EOS token")),
        doc="SDXL's first CLIP text transformer (ViT-L): token ids -> hidden states of layer -2-clip_skip"),
    TEXT_ENCODER_2: GraphSpec(
        TEXT_ENCODER_2, "text_encoder_2",
        inputs=(TensorSpec("input_ids", "int32", ("rows", "sequence"), "token_ids_2", "the second tokenizer's ids"),
                TensorSpec("clip_skip", "int32", (1,), "clip_skip_2", "layers skipped: 0 reads layer -2")),
        outputs=(TensorSpec("hidden_state", "float32", ("rows", "sequence", "hidden_2"), doc=_SDXL_HIDDEN_DOC),
                 TensorSpec("text_embeds", "float32", ("rows", "pooled"),
                            doc="the pooled output at EOS through text_projection (no bias)")),
        doc="SDXL's second text transformer (OpenCLIP ViT-bigG, with projection)"),
    DENOISE_STEP: dataclasses.replace(GRAPHS[DENOISE_STEP], inputs=_sdxl_context(GRAPHS[DENOISE_STEP]),
                                      doc=GRAPHS[DENOISE_STEP].doc + "; SDXL: text_embeds and time_ids added",
                                      fp32_inputs=("timestep", "guidance_scale", "time_ids")),
    UNET: dataclasses.replace(GRAPHS[UNET], inputs=_sdxl_context(GRAPHS[UNET]), fp32_inputs=("timestep", "time_ids")),
    VAE_DECODER: GRAPHS[VAE_DECODER],
    VAE_ENCODER: GRAPHS[VAE_ENCODER],
}
# Every graph name an export may hold, in export order (SD 1.x/2.x have no text_encoder_2).
ALL_GRAPHS = (TEXT_ENCODER, TEXT_ENCODER_2, DENOISE_STEP, UNET, VAE_DECODER, VAE_ENCODER)


def graph_specs(config: ModelConfig) -> dict[str, GraphSpec]:
    """The graphs of a model: GRAPHS, or SDXL_GRAPHS for an SDXL model."""
    return SDXL_GRAPHS if config.sdxl else GRAPHS


def sdxl_fixed_dims(config: ModelConfig) -> dict[str, int]:
    """The widths SDXL's graphs add: the second encoder's, its projection's and the context's."""
    te2 = config.text_encoder_2
    return {"hidden_2": te2.hidden_size, "pooled": te2.projection_dim, "cross_attention": config.unet.cross_attention_dim}


def spec_of(name: str, config: ModelConfig | None = None) -> GraphSpec:
    """The spec of any graph an export may hold: the model's (graph_specs; GRAPHS without a config), or step
    caching's CACHE_GRAPHS (SD 1.x/2.x exports only)."""
    if name in CACHE_GRAPHS:
        return CACHE_GRAPHS[name]
    return (GRAPHS if config is None else graph_specs(config))[name]


def _cache_split(config: ModelConfig, branch: int) -> Any:
    from .stepcache import cache_split

    return cache_split(config.unet, branch)


def fixed_dims(config: ModelConfig, slots: int | None = None, branch: int | None = None) -> dict[str, int]:
    """The dimensions a model fixes: CLIP's sequence, the text width, the latent channels; with `slots`
    (an export's state size) also the state's slots and the coefficient row's width."""
    out = {"sequence": config.text_encoder.max_position_embeddings,
           "hidden": config.text_encoder.hidden_size, "channels": config.vae.latent_channels,
           "unet_channels": config.unet.in_channels}
    if config.sdxl:
        out.update(sdxl_fixed_dims(config))
    if slots is not None:
        out.update(slots=slots, row=row_width(slots))
    if branch is not None:
        out["feature_channels"] = _cache_split(config, branch).channels
    return out


def dim_ranges(config: ModelConfig, ranges: ShapeRanges) -> dict[str, Range]:
    """min/opt/max of every dimension symbol under `ranges`."""
    f, b = config.vae.downscale, ranges.batch
    out = {"batch": b, "batch_x2": b.scaled(2), "rows": Range(b.min, 2 * b.opt, 2 * b.max),
           "height": ranges.height, "width": ranges.width,
           "latent_height": ranges.height.divided(f), "latent_width": ranges.width.divided(f)}
    out.update({k: Range(v, v, v) for k, v in fixed_dims(config, ranges.slots, ranges.cache_branch).items()})
    seq = out["sequence"].min
    out["context"] = Range(seq, seq, seq * ranges.chunks)
    if ranges.cache_branch is not None:
        split = _cache_split(config, ranges.cache_branch)
        for side in ("height", "width"):
            r = out[f"latent_{side}"]
            out[f"feature_{side}"] = Range(split.side(r.min), split.side(r.opt), split.side(r.max))
    return out


def profile(spec: GraphSpec, config: ModelConfig, ranges: ShapeRanges) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per input: (min_shape, opt_shape, max_shape), as a TensorRT optimisation profile takes them."""
    dims = dim_ranges(config, ranges)

    def shape(t: TensorSpec, which: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else getattr(dims[d], which) for d in t.dims)

    return {t.name: (shape(t, "min"), shape(t, "opt"), shape(t, "max")) for t in spec.inputs}


def point_dims(config: ModelConfig, batch: int, latent_height: int, latent_width: int,
               rows: int | None = None, slots: int | None = None, context: int | None = None,
               branch: int | None = None) -> dict[str, int]:
    """Values of every symbol at one shape point (`rows` defaults to 2B, the guided case; `slots`, the
    state size, is needed for the denoise step only; `context` defaults to one prompt chunk, 77; `branch`, step
    caching's, for its full and shallow step graphs only)."""
    f = config.vae.downscale
    fixed = fixed_dims(config, slots, branch)
    out = {"batch": batch, "batch_x2": 2 * batch, "rows": 2 * batch if rows is None else rows,
           "latent_height": latent_height, "latent_width": latent_width,
           "height": latent_height * f, "width": latent_width * f,
           "context": fixed["sequence"] if context is None else context, **fixed}
    if branch is not None:
        split = _cache_split(config, branch)
        out.update(feature_height=split.side(latent_height), feature_width=split.side(latent_width))
    return out


def shapes(spec: GraphSpec, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every input and output at one point (from point_dims)."""
    missing = sorted({d for t in spec.inputs + spec.outputs for d in t.dims if isinstance(d, str)} - set(dims))
    if missing:
        raise ValueError(f"the {spec.name} graph's shapes need {', '.join(missing)} (point_dims(..., slots=S))")
    return {t.name: tuple(d if isinstance(d, int) else int(dims[d]) for d in t.dims)
            for t in spec.inputs + spec.outputs}


VALIDATE_QUICK, VALIDATE_FULL = "quick", "full"
VALIDATION_MODES = (VALIDATE_QUICK, VALIDATE_FULL)  # `sdengine export --validate`


def _side(r: Range, base: int, offsets: tuple[int, ...], avoid: tuple[int, ...] = ()) -> int:
    """The first `base + offset` inside `r` and not in `avoid` (else the first inside `r`, else `base`)."""
    inside = [base + o for o in offsets if base + o in r]
    return next((v for v in inside if v not in avoid), inside[0] if inside else base)


def trace_point(config: ModelConfig, ranges: ShapeRanges) -> dict[str, int]:
    """The shape point a graph is traced at: the smallest of the range (guided rows, one prompt chunk)."""
    d = dim_ranges(config, ranges)
    return point_dims(config, d["batch"].min, d["latent_height"].min, d["latent_width"].min, slots=ranges.slots,
                      branch=ranges.cache_branch)


def validation_points(config: ModelConfig, ranges: ShapeRanges, mode: str = VALIDATE_QUICK) -> list[dict[str, int]]:
    """The shape points ONNX Runtime is checked at against the reference.

    quick (the default): the trace point (the smallest shape), and a point that moves every dynamic axis away
    from it: one more image, an odd row count, two prompt chunks where the export reads them, and odd,
    non-square sides other than the trace point's (264x280 on SD 1.5 against 256x256). Both are cheap: the
    networks run at the bottom of the range. full adds the opt shape and the largest (every axis at its max).
    A static export has one shape: the trace point twice, with other random inputs.
    """
    if mode not in VALIDATION_MODES:
        raise InvalidInputError(f"validation mode must be one of {', '.join(VALIDATION_MODES)}, got {mode!r}")
    d = dim_ranges(config, ranges)
    b, lh, lw = d["batch"], d["latent_height"], d["latent_width"]
    first = trace_point(config, ranges)
    h2 = _side(lh, lh.min, (1, 3, 2))
    w2 = _side(lw, lw.min, (3, 1, 5, 2), avoid=(h2,))
    b2 = min(b.max, b.min + 1)
    rows2 = 2 * b2 if ranges.static else min(d["rows"].max, max(d["rows"].min, 2 * b2 - 1))  # an odd row count
    context2 = d["context"].min * min(2, ranges.chunks)
    other = point_dims(config, b2, h2, w2, rows=rows2, slots=ranges.slots, context=context2,
                       branch=ranges.cache_branch)
    points = [first, other]
    if mode == VALIDATE_FULL:
        opt = point_dims(config, b.opt, lh.opt, lw.opt, slots=ranges.slots, branch=ranges.cache_branch)
        top = point_dims(config, b.max, lh.max, lw.max, rows=d["rows"].max, slots=ranges.slots,
                         context=d["context"].max, branch=ranges.cache_branch)
        points += [p for p in (opt, top) if p not in points]
    return points


def sample_inputs(spec: GraphSpec, config: ModelConfig, dims: Mapping[str, int],
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh random inputs at one shape point, drawn like real ones (a real sampler row, real token rows).

    The denoise step gets a row of a multistep sampler that reads every history slot it has, and a
    state whose history slots are filled too, so validation exercises the whole update.
    """
    shp = shapes(spec, dims)
    sched = _validation_schedule(config, dims.get("slots", 1))
    step = int(rng.integers(sched.num_rows))
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        kind, shape = t.sample, shp[t.name]
        if kind in ("token_ids", "token_ids_2"):
            value = _token_rows(shape, config.text_encoder_2 if kind == "token_ids_2" else config.text_encoder, rng)
        elif kind in ("clip_skip", "clip_skip_2"):
            te = config.text_encoder_2 if kind == "clip_skip_2" else config.text_encoder
            value = rng.integers(0, te.num_hidden_layers, size=shape)
        elif kind == "time_ids":  # (h, w) sizes on the 8-pixel grid and crops, as SDXL's micro-conditioning
            value = np.concatenate([rng.integers(32, 257, (shape[0], 2)) * 8, rng.integers(0, 33, (shape[0], 2)) * 8,
                                    rng.integers(32, 257, (shape[0], 2)) * 8], axis=1)
        elif kind == "timestep":
            value = np.full(shape, sched.timesteps[step], np.float32)
        elif kind == "coefficients":
            value = sched.coefficients[step].reshape(shape)
        elif kind == "mask":
            value = (rng.uniform(0.0, 1.0, shape) > 0.5).astype(np.float32)
        elif kind == "blend":
            value = np.array([rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0), 1.0])
        elif kind == "guidance":
            value = np.full(shape, rng.uniform(1.0, 10.0), np.float32)
        elif kind == "image":
            value = rng.uniform(-1.0, 1.0, shape)
        else:
            value = rng.standard_normal(shape)
        out[t.name] = np.ascontiguousarray(value, dtype=t.dtype)
    return out


def _validation_schedule(config: ModelConfig, slots: int) -> Any:
    """50 rows of the sampler that uses the most of `slots` (noise included where it can), padded to them."""
    from .samplers import build_schedule

    for name, eta in (("unipc", 0.0), ("dpmpp_2m_sde", 0.0), ("ddim", 1.0)):
        sched = build_schedule(config.scheduler, name, 50, eta)
        if sched.slots <= slots:
            return sched.padded(slots)
    raise ValueError(f"no sampler fits {slots} state slots")


def _token_rows(shape: tuple[int, ...], te: Any, rng: np.random.Generator) -> np.ndarray:
    """BOS, random ids, EOS, then EOS padding, like tokenizer output. A config with SDXL's legacy ids (BOS 0, EOS
    2: the pooled output is read at the largest id) gets CLIP's real ids 49406 and 49407, as its tokenizer gives."""
    bos, eos = (te.bos_token_id, te.eos_token_id) if te.eos_token_id > 2 else (49406, 49407)
    rows, length = shape
    ids = rng.integers(0, min(te.vocab_size, bos), size=shape)
    for r in range(rows):
        end = int(rng.integers(2, length))
        ids[r, 0], ids[r, end] = bos, eos
        ids[r, end + 1:] = eos
    return ids
