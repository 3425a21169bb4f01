"""Frozen model configs for the SD 1.x / 2.x and SDXL families, read from diffusers config files.

No torch here: the runtime reads these too. Each config has `tiny()` for tests, and
`from_diffusers` / `to_diffusers` for a diffusers folder's `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ModelLoadError, UnsupportedModelError
from .schedulers import SchedulerConfig

# diffusers U-Net keys that sdengine does not implement, with the only value it accepts.
_UNET_FIXED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "reverse_transformer_layers_per_block": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_type": "default",
    "class_embeddings_concat": False,
    "time_embedding_dim": None,
}
_VAE_FIXED = {
    "act_fn": "silu",
    "in_channels": 3,
    "out_channels": 3,
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}
_TEXT_FIXED = {"model_type": "clip_text_model"}
# addition_embed_type values: None (SD 1.x/2.x) and SDXL's micro-conditioning; the rest are other families.
TEXT_TIME = "text_time"
_ADDITION_EMBED = (None, TEXT_TIME)
SDXL_TIME_IDS = 6  # original_size (h, w), crops_coords_top_left (top, left), target_size (h, w)
_UNET_ATTN, _UNET_PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"
_UNET_UP = {_UNET_ATTN: "CrossAttnUpBlock2D", _UNET_PLAIN: "UpBlock2D"}
# U-Net input channels (with SD's 4 latent channels): the kinds sdengine runs, and SD-shaped ones it refuses by name.
UNET_INPUT_KINDS = {4: "text-to-image", 9: "inpainting"}
OTHER_UNET_INPUTS = {5: "depth-to-image", 7: "x4 upscaler", 8: "instruct-pix2pix"}


def _check_fixed(component: str, d: Mapping[str, Any], fixed: Mapping[str, Any]) -> None:
    """Refuse config values that select features sdengine does not implement."""
    for key, allowed in fixed.items():
        value = d.get(key, allowed)
        if isinstance(value, list) and len(set(map(str, value))) == 1:
            value = value[0]
        if value != allowed:
            raise UnsupportedModelError(
                f"{component} config sets {key}={value!r}; sdengine implements only "
                f"{key}={allowed!r} (the Stable Diffusion 1.x/2.x architecture)"
            )


def _per_block(value: Any, n: int, name: str) -> tuple[int, ...]:
    """A diffusers per-block setting given as one int or a list of n ints."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n:
        raise ModelLoadError(f"U-Net config: {name} has {len(values)} entries for {n} blocks")
    return tuple(int(v) for v in values)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class UNetConfig:
    """The SD 1.x/2.x conditional U-Net (Rombach et al. 2022, appendix; diffusers UNet2DConditionModel)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention: tuple[bool, ...] = (True, True, True, False)  # cross-attention per down block
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    layers_per_block: int = 2
    cross_attention_dim: int = 768
    in_channels: int = 4
    out_channels: int = 4
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64
    time_cond_proj_dim: int | None = None  # LCM-distilled U-Nets: the guidance scale's embedding width
    # SDXL (Podell et al. 2023): transformer blocks per spatial transformer, per level (the mid block takes the
    # last level's); the "text_time" micro-conditioning embedding of pooled text and size/crop numbers.
    transformer_layers: tuple[int, ...] = ()  # empty: one per level (SD 1.x/2.x)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if not self.transformer_layers:
            object.__setattr__(self, "transformer_layers", (1,) * n)
        if n < 1 or len(self.attention) != n or len(self.num_heads) != n or len(self.transformer_layers) != n:
            raise ModelLoadError("U-Net config: block_out_channels, attention, num_heads and "
                                 "transformer_layers_per_block differ in length")
        if any(t < 1 for t in self.transformer_layers):
            raise ModelLoadError(f"U-Net config: transformer_layers_per_block {self.transformer_layers} must be >= 1")
        if self.addition_embed_type not in _ADDITION_EMBED:
            raise UnsupportedModelError(
                f"U-Net config sets addition_embed_type={self.addition_embed_type!r}; sdengine implements None "
                f"(SD 1.x/2.x) and {TEXT_TIME!r} (SDXL)")
        if self.text_time and (not self.addition_time_embed_dim or not self.projection_class_embeddings_input_dim):
            raise ModelLoadError("U-Net config: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                                 "projection_class_embeddings_input_dim")
        for ch, heads in zip(self.block_out_channels, self.num_heads):
            if ch % heads or ch % self.norm_num_groups:
                raise ModelLoadError(f"U-Net config: {ch} channels do not divide into {heads} heads "
                                     f"and {self.norm_num_groups} norm groups")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def text_time(self) -> bool:
        """SDXL's micro-conditioning: the U-Net also takes text_embeds [B, P] and time_ids [B, 6]."""
        return self.addition_embed_type == TEXT_TIME

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text embedding a text_time U-Net takes (0 for others)."""
        if not self.text_time:
            return 0
        return int(self.projection_class_embeddings_input_dim) - SDXL_TIME_IDS * int(self.addition_time_embed_dim)

    @classmethod
    def sd15(cls) -> "UNetConfig":
        return cls()

    @classmethod
    def sd21(cls) -> "UNetConfig":
        return cls(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                   upcast_attention=True, sample_size=96)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        return cls(block_out_channels=(32, 64, 64), attention=(True, True, False), num_heads=(2, 4, 4),
                   cross_attention_dim=32, norm_num_groups=8, sample_size=8)

    @classmethod
    def sdxl(cls) -> "UNetConfig":
        """stabilityai/stable-diffusion-xl-base-1.0's unet/config.json."""
        return cls(block_out_channels=(320, 640, 1280), attention=(False, True, True), num_heads=(5, 10, 20),
                   cross_attention_dim=2048, use_linear_projection=True, sample_size=128,
                   transformer_layers=(1, 2, 10), addition_embed_type=TEXT_TIME, addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816)

    @classmethod
    def tiny_sdxl(cls) -> "UNetConfig":
        """SDXL-shaped and tiny: no attention at the top level, 2 transformer layers below, text_time."""
        return cls(block_out_channels=(32, 64, 64), attention=(False, True, True), num_heads=(2, 4, 4),
                   cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8, sample_size=8,
                   transformer_layers=(1, 2, 2), addition_embed_type=TEXT_TIME, addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + 32)

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Read a diffusers `unet/config.json` dict, refusing unsupported features."""
        _check_fixed("U-Net", d, _UNET_FIXED)
        down = list(d.get("down_block_types", []))
        if not down or any(t not in _UNET_UP for t in down):
            raise UnsupportedModelError(f"U-Net config: down_block_types {down} are not SD 1.x/2.x blocks "
                                        f"({_UNET_ATTN}, {_UNET_PLAIN})")
        up = list(d.get("up_block_types", []))
        if up != [_UNET_UP[t] for t in reversed(down)]:
            raise UnsupportedModelError(f"U-Net config: up_block_types {up} do not mirror down_block_types {down}")
        n = len(down)
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # diffusers' legacy naming
        addition = d.get("addition_embed_type")
        if addition not in _ADDITION_EMBED:
            raise UnsupportedModelError(f"U-Net config sets addition_embed_type={addition!r}; sdengine implements "
                                        f"None (SD 1.x/2.x) and {TEXT_TIME!r} (SDXL)")
        text_time = addition == TEXT_TIME
        return cls(
            block_out_channels=_per_block(d["block_out_channels"], n, "block_out_channels"),
            attention=tuple(t == _UNET_ATTN for t in down),
            num_heads=_per_block(heads, n, "attention_head_dim"),
            layers_per_block=int(d.get("layers_per_block", 2)),
            cross_attention_dim=int(d.get("cross_attention_dim", 768)),
            in_channels=int(d.get("in_channels", 4)),
            out_channels=int(d.get("out_channels", 4)),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            upcast_attention=bool(d.get("upcast_attention", False)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=int(d.get("freq_shift", 0)),
            sample_size=int(d.get("sample_size", 64)),
            time_cond_proj_dim=None if d.get("time_cond_proj_dim") is None else int(d["time_cond_proj_dim"]),
            transformer_layers=_per_block(d.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"),
            addition_embed_type=addition,
            addition_time_embed_dim=_optional_int(d.get("addition_time_embed_dim")) if text_time else None,
            projection_class_embeddings_input_dim=(_optional_int(d.get("projection_class_embeddings_input_dim"))
                                                   if text_time else None),
        )

    def to_diffusers(self) -> dict[str, Any]:
        down = [_UNET_ATTN if a else _UNET_PLAIN for a in self.attention]
        return {
            "_class_name": "UNet2DConditionModel",
            "down_block_types": down,
            "up_block_types": [_UNET_UP[t] for t in reversed(down)],
            "block_out_channels": list(self.block_out_channels),
            "attention_head_dim": list(self.num_heads),
            "layers_per_block": self.layers_per_block,
            "cross_attention_dim": self.cross_attention_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "sample_size": self.sample_size,
            "time_cond_proj_dim": self.time_cond_proj_dim,
            "transformer_layers_per_block": list(self.transformer_layers),
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "act_fn": "silu",
            "center_input_sample": False,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
        }


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder of latent diffusion (Rombach et al. 2022, sec. 3.1; diffusers AutoencoderKL)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512
    # diffusers' flag that the VAE overflows in fp16 (SDXL's does): its SDXL pipeline then decodes in fp32.
    force_upcast: bool = True

    def __post_init__(self) -> None:
        if any(ch % self.norm_num_groups for ch in self.block_out_channels):
            raise ModelLoadError(f"VAE config: channels {self.block_out_channels} do not divide into "
                                 f"{self.norm_num_groups} norm groups")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ModelLoadError(f"VAE config: scaling_factor {self.scaling_factor} must be positive")

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        return cls(scaling_factor=0.13025, sample_size=1024)

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """Read a diffusers `vae/config.json` dict, refusing unsupported features."""
        _check_fixed("VAE", d, _VAE_FIXED)
        n = len(d["block_out_channels"])
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if list(d.get(key, [kind] * n)) != [kind] * n:
                raise UnsupportedModelError(f"VAE config: {key} {d[key]} are not all {kind}")
        return cls(
            block_out_channels=tuple(int(c) for c in d["block_out_channels"]),
            layers_per_block=int(d.get("layers_per_block", 2)),
            latent_channels=int(d.get("latent_channels", 4)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            scaling_factor=float(d.get("scaling_factor") or 0.18215),
            sample_size=int(d.get("sample_size", 512)),
            force_upcast=bool(d.get("force_upcast", True)),
        )

    def to_diffusers(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "sample_size": self.sample_size,
            "force_upcast": self.force_upcast,
            "in_channels": 3,
            "out_channels": 3,
            "act_fn": "silu",
        }


@dataclass(frozen=True)
class TextEncoderConfig:
    """The CLIP text transformer (Radford et al. 2021), as transformers' CLIPTextConfig holds it."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    @classmethod
    def sd21(cls) -> "TextEncoderConfig":
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=512)

    @classmethod
    def tiny(cls) -> "TextEncoderConfig":
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=32)

    @classmethod
    def sdxl_2(cls) -> "TextEncoderConfig":
        """SDXL's second encoder: OpenCLIP ViT-bigG/14's text tower (its text_encoder_2/config.json)."""
        return cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2)

    @classmethod
    def tiny_sdxl_2(cls) -> "TextEncoderConfig":
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                   hidden_act="gelu", projection_dim=32)

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> "TextEncoderConfig":
        """Read a `text_encoder/config.json` (transformers CLIPTextConfig) dict."""
        _check_fixed("text encoder", {k: v for k, v in d.items() if k in _TEXT_FIXED}, _TEXT_FIXED)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: d[k] for k in names if d.get(k) is not None})

    def to_diffusers(self, projection: bool = False) -> dict[str, Any]:
        """transformers' config.json; projection=True for a CLIPTextModelWithProjection (SDXL's text_encoder_2)."""
        arch = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
        return {"architectures": [arch], "model_type": "clip_text_model", **dataclasses.asdict(self)}

    def to_transformers(self) -> Any:
        """A transformers CLIPTextConfig (imports transformers)."""
        from transformers import CLIPTextConfig

        return CLIPTextConfig(**dataclasses.asdict(self))


@dataclass(frozen=True)
class ModelConfig:
    """The three networks and the training noise schedule of one latent diffusion model."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # SDXL: the second text encoder (with projection); its hidden states are concatenated to the first's.
    text_encoder_2: TextEncoderConfig | None = None
    # diffusers' SDXL pipeline flag: an absent negative prompt is zeros, not the encoding of "".
    force_zeros_for_empty_prompt: bool = True

    def __post_init__(self) -> None:
        width = self.text_encoder.hidden_size + (self.text_encoder_2.hidden_size if self.text_encoder_2 else 0)
        if width != self.unet.cross_attention_dim:
            what = "text encoders' widths together" if self.text_encoder_2 else "text encoder width"
            raise ModelLoadError(f"the {what} ({width}) differ from the U-Net's cross_attention_dim "
                                 f"{self.unet.cross_attention_dim}: the parts are of different models")
        if self.unet.text_time != (self.text_encoder_2 is not None):
            raise ModelLoadError("an SDXL model needs both a text_time U-Net and a second text encoder "
                                 "(text_encoder_2); this config has only one of them")
        if self.text_encoder_2 is not None and self.text_encoder_2.projection_dim != self.unet.pooled_dim:
            raise ModelLoadError(
                f"the U-Net's add_embedding takes {self.unet.projection_class_embeddings_input_dim} = "
                f"{SDXL_TIME_IDS} x {self.unet.addition_time_embed_dim} + {self.unet.pooled_dim} pooled values, but "
                f"text_encoder_2 projects to {self.text_encoder_2.projection_dim}: the parts are of different models")
        latent, unet_in = self.vae.latent_channels, self.unet.in_channels
        if unet_in not in (latent, 2 * latent + 1):
            what = (OTHER_UNET_INPUTS.get(unet_in) if latent == 4 else None) or "an unknown kind"
            raise UnsupportedModelError(
                f"the U-Net takes {unet_in} input channels ({what}): with the VAE's {latent} latent channels, "
                f"sdengine runs U-Nets of {latent} (text-to-image) or {2 * latent + 1} input channels (inpainting: "
                f"latent, mask, masked-image latent); otherwise the parts are of different models")
        if self.unet.out_channels != latent:
            raise ModelLoadError(f"the U-Net outputs {self.unet.out_channels} channels, not the VAE's {latent} latent "
                                 f"channels: the parts are of different models")

    @property
    def inpainting(self) -> bool:
        """True for an inpainting U-Net: its input is [latent, mask (1), masked-image latent] (9 channels in SD)."""
        return self.unet.in_channels == 2 * self.vae.latent_channels + 1

    @property
    def sdxl(self) -> bool:
        """Two text encoders and the text_time U-Net (Podell et al. 2023)."""
        return self.text_encoder_2 is not None

    @property
    def default_size(self) -> int:
        """The image side the model was trained at (512 for SD 1.5, 768 for SD 2.1)."""
        return self.unet.sample_size * self.vae.downscale

    def with_prediction_type(self, prediction_type: str | None) -> "ModelConfig":
        """This config with the scheduler's prediction type overridden (None or empty: unchanged)."""
        if not prediction_type:
            return self
        return dataclasses.replace(self, scheduler=dataclasses.replace(self.scheduler, prediction_type=prediction_type))

    @classmethod
    def sd15(cls) -> "ModelConfig":
        return cls()

    @classmethod
    def sd21(cls) -> "ModelConfig":
        return cls(unet=UNetConfig.sd21(), text_encoder=TextEncoderConfig.sd21(),
                   scheduler=SchedulerConfig(prediction_type="v_prediction"))

    @classmethod
    def tiny(cls) -> "ModelConfig":
        return cls(unet=UNetConfig.tiny(), vae=VAEConfig.tiny(), text_encoder=TextEncoderConfig.tiny())

    @classmethod
    def sdxl_base(cls) -> "ModelConfig":
        """SDXL base 1.0's shapes; its scheduler's betas, leading spacing and steps_offset 1 are the defaults."""
        return cls(unet=UNetConfig.sdxl(), vae=VAEConfig.sdxl(), text_encoder=TextEncoderConfig(
            hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2), text_encoder_2=TextEncoderConfig.sdxl_2())

    @classmethod
    def tiny_sdxl(cls) -> "ModelConfig":
        """A tiny SDXL-shaped model for tests: two text encoders (32 + 32 wide), the tiny SDXL U-Net."""
        return cls(unet=UNetConfig.tiny_sdxl(), vae=dataclasses.replace(VAEConfig.tiny(), scaling_factor=0.13025),
                   text_encoder=TextEncoderConfig.tiny(), text_encoder_2=TextEncoderConfig.tiny_sdxl_2())

    @classmethod
    def tiny_inpaint(cls) -> "ModelConfig":
        """The tiny config with an inpainting U-Net (2 * 4 + 1 = 9 input channels), for tests."""
        tiny = cls.tiny()
        unet = dataclasses.replace(tiny.unet, in_channels=2 * tiny.vae.latent_channels + 1)
        return dataclasses.replace(tiny, unet=unet)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (for manifests and exported folders)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of to_dict; a ModelLoadError names any unknown or missing field."""
        parts = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": TextEncoderConfig,
                 "scheduler": SchedulerConfig, "text_encoder_2": TextEncoderConfig}
        try:
            kwargs: dict[str, Any] = {}
            if "force_zeros_for_empty_prompt" in d:
                kwargs["force_zeros_for_empty_prompt"] = bool(d["force_zeros_for_empty_prompt"])
            for name, kind in parts.items():
                if name == "text_encoder_2" and d.get(name) is None:
                    continue  # SD 1.x/2.x, and manifests written before SDXL
                values = dict(d[name])
                for f in dataclasses.fields(kind):
                    if isinstance(values.get(f.name), list):
                        values[f.name] = tuple(values[f.name])
                kwargs[name] = kind(**values)
        except (KeyError, TypeError) as exc:
            raise ModelLoadError(f"model config is incomplete or of another sdengine version ({exc})") from None
        return cls(**kwargs)

    @classmethod
    def from_diffusers_folder(cls, root: str | Path) -> "ModelConfig":
        """Read the config files of a diffusers folder (unet/, vae/, text_encoder/, scheduler/; SDXL: text_encoder_2/)."""
        root = Path(root)
        files = {"unet": "unet/config.json", "vae": "vae/config.json",
                 "text_encoder": "text_encoder/config.json", "scheduler": "scheduler/scheduler_config.json"}
        parts = {name: read_json(root / rel) for name, rel in files.items()}
        second = root / "text_encoder_2" / "config.json"
        index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
        return cls(
            unet=UNetConfig.from_diffusers(parts["unet"]),
            vae=VAEConfig.from_diffusers(parts["vae"]),
            text_encoder=TextEncoderConfig.from_diffusers(parts["text_encoder"]),
            scheduler=SchedulerConfig.from_diffusers(parts["scheduler"]),
            text_encoder_2=TextEncoderConfig.from_diffusers(read_json(second)) if second.is_file() else None,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a ModelLoadError that names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: a diffusers model folder needs it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); restore it from the model's source") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data
