"""Key maps between the original CompVis/Stability single-file layout and diffusers/transformers names.

Pure functions over `Mapping[str, tensor]`: values are only sliced, indexed, reshaped or (for the
OpenCLIP q/k/v merge) concatenated, so torch tensors (any device, "meta" included) and numpy
arrays both work. Maps are built from loops over block indices as in stable-diffusion.cpp's
`model.cpp` and diffusers' `convert_original_stable_diffusion_to_diffusers.py`. Only names are
checked here; the loader's strict load checks shapes.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

from ..config import OTHER_UNET_INPUTS, UNET_INPUT_KINDS, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import UnsupportedModelError, WeightsMismatchError

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
CLIP, OPENCLIP = TEXT + "transformer.", TEXT + "model."
# SDXL (Stability's sgm layout): CLIP ViT-L under embedders.0 (HF names), OpenCLIP ViT-bigG under embedders.1.
CONDITIONER = "conditioner.embedders."
XL_CLIP, XL_OPENCLIP = CONDITIONER + "0.transformer.", CONDITIONER + "1.model."
XL_REFINER = CONDITIONER + "0.model."  # the refiner's only encoder is OpenCLIP bigG
FAMILIES = ("sd1", "sd2", "sdxl")
# Constant buffers some exporters save with the weights: not parameters, dropped on import.
_BUFFERS = ("embeddings.position_ids", "attn_mask")
_OPENCLIP_DROPPED = ("text_projection", "logit_scale")  # not used by SD 2.x (penultimate layer output)
_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
               ("nin_shortcut", "conv_shortcut"))
_VAE_ATTN = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_VAE_LINEAR = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")  # 1x1 convs in the original
_LEGACY_VAE = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OPENCLIP_LAYER = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                   ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"))
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")  # after the OpenCLIP prefix
_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
# Architectures that share a prefix with SD 1.x/2.x, as (key fragment, what it is).
_OTHER_FAMILIES = (("joint_blocks.", "SD3 (joint_blocks)"), ("double_blocks.", "Flux (double_blocks)"),
                   ("text_encoders.", "SD3 (text_encoders.*)"), ("control_model.", "ControlNet (control_model.*)"),
                   ("diffusion_model.label_emb.", "a class-conditioned U-Net (label_emb: SD upscaler/unCLIP, or an "
                    "SDXL U-Net without its text encoders)"),
                   ("transformer_blocks.1.", "a U-Net with several transformer layers per block (SDXL-like) "
                    "without SDXL's text encoders"))
REFINER_REFUSED = ("the SDXL refiner (only text_encoder_2, aesthetic-score conditioning) is not supported yet "
                   "(issue 15): load an SDXL base model")


def _resnet(pairs: list, orig: str, diff: str, inner: Iterable[tuple[str, str]] = _RESNET) -> None:
    """Append the pairs of one residual block (He et al. 2016) under its two prefixes."""
    pairs.extend((f"{orig}.{o}", f"{diff}.{d}") for o, d in inner)


def unet_key_map(cfg: UNetConfig) -> list[tuple[str, str]]:
    """(original, diffusers) prefix pairs of the U-Net, relative to `model.diffusion_model.`."""
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    pairs = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
             ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
             ("middle_block.1", "mid_block.attentions.0")]
    if cfg.text_time:  # SDXL's micro-conditioning embedding
        pairs += [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
    _resnet(pairs, "middle_block.0", "mid_block.resnets.0")
    _resnet(pairs, "middle_block.2", "mid_block.resnets.1")
    for i in range(n):
        for j in range(L):
            k = (L + 1) * i + j + 1
            _resnet(pairs, f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}")
            if cfg.attention[i]:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}"))
        if i < n - 1:
            pairs.append((f"input_blocks.{(L + 1) * (i + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
    for i in range(n):
        attn = cfg.attention[n - 1 - i]  # up block i mirrors down block n-1-i
        for j in range(L + 1):
            k = (L + 1) * i + j
            _resnet(pairs, f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}")
            if attn:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}"))
        if i < n - 1:
            k = (L + 1) * i + L
            pairs.append((f"output_blocks.{k}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
    return pairs


def vae_key_map(cfg: VAEConfig) -> list[tuple[str, str]]:
    """(original, diffusers) prefix pairs of the KL autoencoder, relative to `first_stage_model.`."""
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    pairs = [(name, name) for name in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_out", f"{part}.conv_out"),
                  (f"{part}.norm_out", f"{part}.conv_norm_out")]
        _resnet(pairs, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET)
        _resnet(pairs, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET)
        _resnet(pairs, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN)
    for i in range(n):
        for j in range(L):
            _resnet(pairs, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < n - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    for i in range(n):
        up = f"decoder.up.{n - 1 - i}"  # the original numbers decoder levels from the bottom
        for j in range(L + 1):
            _resnet(pairs, f"{up}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < n - 1:
            pairs.append((f"{up}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
    return pairs


def text_key_map(cfg: TextEncoderConfig, family: str) -> list[tuple[str, str]]:
    """(original, transformers) prefix pairs of the text encoder, relative to `cond_stage_model.`."""
    if family == "sd1":  # HF CLIP already; files older than transformers 4.x lack `text_model.`
        return [("transformer.text_model", "text_model"), ("transformer", "text_model")]
    pairs = [("model.token_embedding", "text_model.embeddings.token_embedding"),
             ("model.positional_embedding", "text_model.embeddings.position_embedding.weight"),
             ("model.ln_final", "text_model.final_layer_norm")]
    for i in range(cfg.num_hidden_layers):
        _resnet(pairs, f"model.transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", _OPENCLIP_LAYER)
    return pairs  # attn.in_proj_weight/bias (q, k, v stacked) are split in _openclip_qkv


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    """Replace the longest prefix of `key` (whole dotted parts) found in `table`, or None."""
    head, rest = key, ""
    while head not in table:
        cut = head.rfind(".")
        if cut < 0:
            return None
        head, rest = head[:cut], head[cut:] + rest
    return table[head] + rest


def _tables(config: ModelConfig, family: str) -> dict[str, dict[str, str]]:
    """Original -> diffusers prefix tables per part, with the top-level prefixes included."""
    maps = {"unet": (UNET, unet_key_map(config.unet)), "vae": (VAE, vae_key_map(config.vae))}
    if family == "sdxl":
        if config.text_encoder_2 is None:
            raise _refuse("an SDXL checkpoint needs an SDXL config (text_encoder_2): derive it with infer_config")
        maps["text_encoder"] = (CONDITIONER + "0.", text_key_map(config.text_encoder, "sd1"))
        maps["text_encoder_2"] = (CONDITIONER + "1.", text_key_map(config.text_encoder_2, "sd2") +
                                  [("model.text_projection", "text_projection.weight")])
    else:
        maps["text_encoder"] = (TEXT, text_key_map(config.text_encoder, family))
    return {part: {prefix + o: d for o, d in pairs} for part, (prefix, pairs) in maps.items()}


def part_prefixes(family: str) -> dict[str, str]:
    """The original layout's prefix of each part (SDXL: two text encoders under conditioner.embedders)."""
    if family == "sdxl":
        return {"unet": UNET, "vae": VAE, "text_encoder": XL_CLIP, "text_encoder_2": XL_OPENCLIP}
    return {"unet": UNET, "vae": VAE, "text_encoder": CLIP if family == "sd1" else OPENCLIP}


_FIX_FILE = ("the checkpoint and the config disagree: derive the config from the file with infer_config, "
             "or check that the file is an SD 1.x/2.x txt2img or inpainting checkpoint")
_FIX_PARTS = "the state dicts do not match the config: build them from the same ModelConfig"


def _mismatch(keys: list[str], what: str, fix: str = _FIX_FILE) -> WeightsMismatchError:
    """The strict-load error listing up to 20 offending keys, the count, and what to do."""
    shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
    return WeightsMismatchError(f"{len(keys)} {what}: {shown}. Fix: {fix}")


def _refuse(what: str) -> UnsupportedModelError:
    """The error for a model family or feature outside SD 1.x/2.x txt2img and inpainting."""
    return UnsupportedModelError(f"{what}: sdengine implements Stable Diffusion 1.x/2.x and SDXL base txt2img and "
                                 "inpainting models only")


def detect_family(state: Mapping[str, Any] | Iterable[str]) -> str:
    """The family of a single-file checkpoint: "sd1" (HF CLIP) or "sd2" (OpenCLIP); refuse other models.

    Text-to-image (4-channel) and inpainting (9-channel) U-Nets of both families are accepted.
    Given only keys (not a Mapping), the checks that need shapes (U-Net input channels) are skipped.
    """
    keys, shapes = list(state), state if isinstance(state, Mapping) else {}
    conditioner = [k for k in keys if k.startswith(CONDITIONER)]
    if conditioner:
        return _detect_sdxl(keys, conditioner, shapes)
    for fragment, what in _OTHER_FAMILIES:
        found = next((k for k in keys if fragment in k), None)
        if found is not None:
            raise _refuse(f"this checkpoint is {what}, found key {found!r}")
    if not any(k.startswith((UNET, VAE, TEXT)) for k in keys):
        if not keys:
            raise UnsupportedModelError("not a Stable Diffusion checkpoint: the file holds no tensors")
        hint = ("; it looks like one diffusers component: load the diffusers folder instead"
                if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys) else "")
        raise UnsupportedModelError(f"not a Stable Diffusion checkpoint (no {UNET}*, {VAE}* or {TEXT}* keys): "
                                    f"found keys like {', '.join(sorted(keys)[:5])}{hint}")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and int(conv_in.shape[1]) not in UNET_INPUT_KINDS:
        c = int(conv_in.shape[1])
        what = OTHER_UNET_INPUTS.get(c, "not a txt2img or inpainting model")
        raise _refuse(f"the U-Net takes {c} input channels ({what}); "
                      "only U-Nets with 4 (txt2img) or 9 (inpainting) input channels are supported")
    clip, openclip = (any(k.startswith(p) for k in keys) for p in (CLIP, OPENCLIP))
    if clip and openclip:
        raise _refuse(f"the checkpoint holds two text encoders ({CLIP}* and {OPENCLIP}*)")
    if clip or openclip:
        return "sd1" if clip else "sd2"
    to_k = shapes.get(UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    return "sd2" if to_k is not None and to_k.shape[1] == 1024 else "sd1"  # no text encoder in the file


def _detect_sdxl(keys: list[str], conditioner: list[str], shapes: Mapping[str, Any]) -> str:
    """SDXL base (CLIP under embedders.0, OpenCLIP under embedders.1); the refiner and others refused by name."""
    if any(k.startswith(XL_REFINER) for k in conditioner):
        raise UnsupportedModelError(f"this checkpoint is {REFINER_REFUSED} (found {XL_REFINER}*)")
    for fragment, what in _OTHER_FAMILIES:  # SD3/Flux/ControlNet keys beside a conditioner
        if fragment in ("diffusion_model.label_emb.", "transformer_blocks.1."):
            continue  # SDXL's own
        found = next((k for k in keys if fragment in k), None)
        if found is not None:
            raise _refuse(f"this checkpoint is {what}, found key {found!r}")
    unknown = sorted({k.split(".", 3)[2] for k in conditioner} - {"0", "1"})
    if unknown or not any(k.startswith(XL_CLIP) for k in conditioner) or \
            not any(k.startswith(XL_OPENCLIP) for k in conditioner):
        raise _refuse(f"the checkpoint's conditioner ({', '.join(sorted(conditioner)[:3])} ...) is not SDXL base's "
                      f"pair of text encoders ({XL_CLIP}*, {XL_OPENCLIP}*)")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and int(conv_in.shape[1]) not in UNET_INPUT_KINDS:
        c = int(conv_in.shape[1])
        raise _refuse(f"the SDXL U-Net takes {c} input channels ({OTHER_UNET_INPUTS.get(c, 'an unknown kind')}); "
                      "only U-Nets with 4 (txt2img) or 9 (inpainting) input channels are supported")
    return "sdxl"


def _openclip_qkv(key: str, value: Any, out: dict, layers: int, prefix: str = OPENCLIP) -> bool:
    """Split an OpenCLIP `attn.in_proj_*` (q, k, v stacked on dim 0) into HF CLIP q/k/v_proj; False if not one."""
    if not key.startswith(prefix):
        return False
    m = _IN_PROJ.fullmatch(key[len(prefix):])
    if m is None or int(m[1]) >= layers:
        return False
    width = value.shape[0] // 3
    for n, name in enumerate("qkv"):
        out[f"text_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = value[n * width:(n + 1) * width]
    return True


def _ignored(key: str, family: str, layers: int) -> bool:
    """Keys under the three prefixes that are known and unused: buffers, OpenCLIP's unused head."""
    if key.endswith(_BUFFERS):
        return True
    if family == "sdxl":
        return key == XL_OPENCLIP + "logit_scale"  # CLIP's contrastive temperature: unused
    if family == "sd2" and key.startswith(OPENCLIP):
        rest = key[len(OPENCLIP):]
        return rest in _OPENCLIP_DROPPED or rest.startswith(f"transformer.resblocks.{layers}.")
    return False


def original_to_diffusers(state: Mapping[str, Any], config: ModelConfig) -> dict[str, dict[str, Any]]:
    """Split a single-file checkpoint into diffusers-named "unet", "vae" and "text_encoder" dicts (SDXL: and
    "text_encoder_2"). Values are the file's tensors or views of them (no copies): the q/k/v split slices, the
    OpenCLIP text_projection is transposed (x @ P in OpenCLIP, a bias-free Linear of weight P^T in transformers)."""
    family = detect_family(state)
    tables, prefixes = _tables(config, family), part_prefixes(family)
    layers = (config.text_encoder_2 if family == "sdxl" else config.text_encoder).num_hidden_layers
    parts: dict[str, dict[str, Any]] = {part: {} for part in prefixes}
    tops = (UNET, VAE, CONDITIONER) if family == "sdxl" else (UNET, VAE, TEXT)
    openclip = {"sd2": ("text_encoder", OPENCLIP), "sdxl": ("text_encoder_2", XL_OPENCLIP)}.get(family)
    unmapped = []
    for key, value in state.items():
        if not key.startswith(tops) or _ignored(key, family, layers):
            continue  # training leftovers: model_ema.*, alphas_cumprod, betas, ...
        part = next((p for p, prefix in prefixes.items() if key.startswith(prefix)), None)
        if part is None:
            unmapped.append(key)
            continue
        if openclip and part == openclip[0] and _openclip_qkv(key, value, parts[part], layers, openclip[1]):
            continue
        new = _rename(key, tables[part])
        if new is None or new in parts[part]:
            unmapped.append(key)
            continue
        if part == "vae" and new.endswith(_VAE_LINEAR) and len(value.shape) == 4:
            value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv -> linear
        if new == "text_projection.weight":
            value = value.T
        parts[part][new] = value
    if unmapped:
        raise _mismatch(unmapped, f"checkpoint keys do not map onto the {family} layout")
    return parts


def _concat(values: list) -> Any:
    """Concatenate torch tensors or numpy arrays along dim 0 (torch imported only when given torch)."""
    if type(values[0]).__module__.startswith("torch"):
        import torch

        return torch.cat(values)
    import numpy as np

    return np.concatenate(values)


def _contiguous(value: Any) -> Any:
    """A contiguous copy of a transposed torch tensor or numpy array (safetensors writes contiguous tensors)."""
    if type(value).__module__.startswith("torch"):
        return value.contiguous()
    import numpy as np

    return np.ascontiguousarray(value)


def _merge_qkv(te: Mapping[str, Any], out: dict, prefix: str = OPENCLIP) -> None:
    """Stack HF CLIP q/k/v_proj into OpenCLIP's `attn.in_proj_weight/bias`."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in te.items():
        m = _QKV.match(key)
        if m:
            groups.setdefault((m[1], m[3]), {})[m[2]] = value
    for (layer, kind), qkv in groups.items():
        if len(qkv) != 3:
            raise _mismatch([f"text_model.encoder.layers.{layer}.self_attn.{c}_proj.{kind}"
                             for c in "qkv" if c not in qkv], "text encoder keys are missing", _FIX_PARTS)
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = _concat([qkv[c] for c in "qkv"])


def diffusers_to_original(parts: Mapping[str, Mapping[str, Any]], config: ModelConfig,
                          family: str = "sd1") -> dict[str, Any]:
    """One single-file checkpoint from diffusers-named parts (sd2: only the text layers given, no head; sdxl: with
    "text_encoder_2", its text_projection transposed back)."""
    if family not in FAMILIES:
        raise UnsupportedModelError(f"family {family!r} is not one of {FAMILIES}")
    inverse = {part: {d: o for o, d in reversed(table.items())}
               for part, table in _tables(config, family).items()}  # first pair wins on duplicates
    out: dict[str, Any] = {}
    unmapped = []
    fused = {"sd2": "text_encoder", "sdxl": "text_encoder_2"}.get(family)  # the OpenCLIP part
    for part in inverse:
        for key, value in parts.get(part, {}).items():
            if key.endswith(_BUFFERS) or (part == fused and _QKV.match(key)):
                continue
            new = _rename(key, inverse[part])
            if new is None:
                unmapped.append(f"{part}: {key}")
                continue
            if part == "vae" and key.endswith(_VAE_LINEAR) and len(value.shape) == 2:
                value = value.reshape(value.shape[0], value.shape[1], 1, 1)  # linear -> 1x1 conv
            if key == "text_projection.weight":
                value = _contiguous(value.T)
            out[new] = value
    if fused:
        _merge_qkv(parts.get(fused, {}), out, XL_OPENCLIP if family == "sdxl" else OPENCLIP)
    if unmapped:
        raise _mismatch(unmapped, "diffusers keys have no place in the original layout", _FIX_PARTS)
    return out


def legacy_vae_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename old diffusers VAE attention keys (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-3].isdigit():
            parts[-2] = _LEGACY_VAE.get(parts[-2], parts[-2])
            key = ".".join(parts)
            if key.endswith(_VAE_LINEAR) and len(value.shape) > 2:
                value = value.reshape(value.shape[0], value.shape[1])
        out[key] = value
    return out


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """The shape of one tensor, or an UnsupportedModelError naming the missing key."""
    if key not in state:
        raise UnsupportedModelError(f"cannot infer the model config: the checkpoint has no {key!r}; "
                                    "it is not a complete SD 1.x/2.x checkpoint")
    return tuple(int(d) for d in state[key].shape)


def _indices(keys: Iterable[str], prefix: str) -> set[int]:
    """The block numbers N of keys `prefix + "N." ...`."""
    found = (k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix))
    return {int(n) for n in found if n.isdigit()}


def _norm_groups(channels: Iterable[int]) -> int:
    """GroupNorm groups are not in the weights: SD uses 32; smaller only when widths do not divide."""
    return math.gcd(32, *channels)


def _infer_unet(state: Mapping[str, Any], family: str) -> UNetConfig:
    """The U-Net config from tensor shapes; heads are the family's convention (not in the weights).

    Sample size is not in the weights either: sd2 txt2img files are taken as 768 (96 latent), SD 2
    inpainting (9 input channels) was trained at 512 (64), as diffusers' single-file loader assumes.
    """
    n_in, n_out = len(_indices(state, UNET + "input_blocks.")), len(_indices(state, UNET + "output_blocks."))
    n = 1 + sum(f"{UNET}input_blocks.{k}.0.op.weight" in state for k in range(n_in))
    L = n_in // n - 1
    if n_in % n or n_out != n_in or L < 1:
        raise _refuse(f"the U-Net has {n_in} input and {n_out} output blocks for {n} resolutions, "
                      "not the SD layout")
    first = [(L + 1) * i + 1 for i in range(n)]
    channels = tuple(_shape(state, f"{UNET}input_blocks.{k}.0.in_layers.2.weight")[0] for k in first)
    proj_in = _shape(state, UNET + "middle_block.1.proj_in.weight")
    if _shape(state, UNET + "time_embed.0.weight")[0] != 4 * channels[0]:
        raise _refuse("the U-Net's time embedding is not 4x its first width")
    heads = tuple(max(1, c // 64) if family != "sd1" else 8 for c in channels)  # sd2, sdxl: head dim 64
    in_channels = _shape(state, UNET + "input_blocks.0.0.weight")[1]
    inpainting = UNET_INPUT_KINDS.get(in_channels) == "inpainting"
    if family == "sdxl":
        return _infer_sdxl_unet(state, channels, heads, L, in_channels, len(proj_in) == 2)
    return UNetConfig(
        block_out_channels=channels,
        attention=tuple(f"{UNET}input_blocks.{k}.1.proj_in.weight" in state for k in first),
        num_heads=heads, layers_per_block=L,
        cross_attention_dim=_shape(state, UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        in_channels=in_channels,
        out_channels=_shape(state, UNET + "out.2.weight")[0],
        use_linear_projection=len(proj_in) == 2, upcast_attention=family == "sd2",
        norm_num_groups=_norm_groups(channels), sample_size=96 if family == "sd2" and not inpainting else 64)


def _depth(state: Mapping[str, Any], block: str) -> int:
    """Transformer layers in the spatial transformer `block` (1 where the level has none)."""
    return max(1, len(_indices(state, f"{UNET}{block}.transformer_blocks.")))


def _infer_sdxl_unet(state: Mapping[str, Any], channels: tuple[int, ...], heads: tuple[int, ...], L: int,
                     in_channels: int, linear: bool) -> UNetConfig:
    """SDXL's U-Net: transformer layers per level counted from the weights; the text_time embedding's width
    split into 6 sinusoidal features per size/crop number and the pooled width of text_encoder_2's projection."""
    first = [(L + 1) * i + 1 for i in range(len(channels))]
    attention = tuple(f"{UNET}input_blocks.{k}.1.proj_in.weight" in state for k in first)
    depth = tuple(_depth(state, f"input_blocks.{k}.1") for k in first)
    if _depth(state, "middle_block.1") != depth[-1]:
        raise _refuse(f"the SDXL U-Net's mid block has {_depth(state, 'middle_block.1')} transformer layers and its "
                      f"last level {depth[-1]}: diffusers' layout ties them")
    label_in = _shape(state, UNET + "label_emb.0.0.weight")[1]
    pooled = _shape(state, XL_OPENCLIP + "text_projection")[1]
    if (label_in - pooled) % 6 or label_in <= pooled:
        raise _refuse(f"the SDXL U-Net's label_emb takes {label_in} values, not 6 x k + the pooled {pooled}")
    return UNetConfig(
        block_out_channels=channels, attention=attention, num_heads=heads, layers_per_block=L,
        cross_attention_dim=_shape(state, UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        in_channels=in_channels, out_channels=_shape(state, UNET + "out.2.weight")[0],
        use_linear_projection=linear, norm_num_groups=_norm_groups(channels), sample_size=128,
        transformer_layers=depth, addition_embed_type="text_time", addition_time_embed_dim=(label_in - pooled) // 6,
        projection_class_embeddings_input_dim=label_in)


def _infer_vae(state: Mapping[str, Any]) -> VAEConfig:
    """The VAE config from tensor shapes (latent channels: quant_conv outputs mean and log-variance)."""
    n = len(_indices(state, VAE + "encoder.down."))
    channels = tuple(_shape(state, f"{VAE}encoder.down.{i}.block.0.conv1.weight")[0] for i in range(n))
    moments = _shape(state, VAE + "quant_conv.weight")[0]
    if n < 1 or moments % 2:
        raise _refuse(f"the VAE has {n} levels and {moments} quant_conv outputs, not a KL autoencoder")
    return VAEConfig(block_out_channels=channels, layers_per_block=len(_indices(state, VAE + "encoder.down.0.block.")),
                     latent_channels=moments // 2, norm_num_groups=_norm_groups(channels))


def _infer_text(state: Mapping[str, Any], family: str, clip: str = CLIP) -> TextEncoderConfig:
    """The CLIP text config from shapes; sd2 keeps the layers below OpenCLIP's last (penultimate output)."""
    if family == "sd1":
        p = clip + ("text_model." if any(k.startswith(clip + "text_model.") for k in state) else "")
        vocab, hidden = _shape(state, p + "embeddings.token_embedding.weight")
        positions = _shape(state, p + "embeddings.position_embedding.weight")[0]
        layers = len(_indices(state, p + "encoder.layers."))
        inner = _shape(state, p + "encoder.layers.0.mlp.fc1.weight")[0]
    else:
        vocab, hidden = _shape(state, OPENCLIP + "token_embedding.weight")
        positions = _shape(state, OPENCLIP + "positional_embedding")[0]
        layers = len(_indices(state, OPENCLIP + "transformer.resblocks."))
        if OPENCLIP + "text_projection" in state:  # a complete tower: SD 2.x skips its last layer
            layers -= 1
        inner = _shape(state, OPENCLIP + "transformer.resblocks.0.mlp.c_fc.weight")[0]
    return TextEncoderConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=positions,
        hidden_act="quick_gelu" if family == "sd1" else "gelu", projection_dim=768 if family == "sd1" else 512)


def infer_config(state: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig from a single-file checkpoint's shapes; scheduler stays epsilon (v-models: override)."""
    family = detect_family(state)
    if family == "sdxl":
        return _infer_sdxl(state)
    return ModelConfig(unet=_infer_unet(state, family), vae=_infer_vae(state), text_encoder=_infer_text(state, family))


def _infer_sdxl(state: Mapping[str, Any]) -> ModelConfig:
    """SDXL base's config from shapes. Its text encoder configs carry the legacy eos_token_id 2 (pooled output at
    the argmax of the ids, as transformers reads SDXL's files); the VAE's scaling factor is SDXL's 0.13025."""
    import dataclasses

    text = dataclasses.replace(_infer_text(state, "sd1", XL_CLIP), bos_token_id=0, eos_token_id=2)
    vocab, hidden = _shape(state, XL_OPENCLIP + "token_embedding.weight")
    text_2 = TextEncoderConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_shape(state, XL_OPENCLIP + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=len(_indices(state, XL_OPENCLIP + "transformer.resblocks.")),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=_shape(state, XL_OPENCLIP + "positional_embedding")[0], hidden_act="gelu",
        projection_dim=_shape(state, XL_OPENCLIP + "text_projection")[1], bos_token_id=0, eos_token_id=2)
    vae = dataclasses.replace(_infer_vae(state), scaling_factor=0.13025, sample_size=1024)
    return ModelConfig(unet=_infer_unet(state, "sdxl"), vae=vae, text_encoder=text, text_encoder_2=text_2)
