"""SDXL's networks against diffusers and transformers on the same weights (independent implementations)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffusers_support import perturbed, rel_l2
from sdengine.config import ModelConfig, TextEncoderConfig, UNetConfig
from sdengine.errors import ModelLoadError, UnsupportedModelError
from sdengine.models.text_encoder import TextEncoder
from sdengine.models.unet import UNet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # relative L2, fp32


def _kwargs(cfg: UNetConfig) -> dict:
    d = cfg.to_diffusers()
    d.pop("_class_name")
    return d


def _unet_inputs(cfg: UNetConfig, size: tuple[int, int], batch: int = 2, seed: int = 1) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *size, generator=gen)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=gen)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 32.0, 0.0, 640.0, 896.0]])
    return x, torch.tensor([981, 21])[:batch], ctx, pooled, time_ids[:batch]


TINY_DEEP = dataclasses.replace(UNetConfig.tiny_sdxl(), transformer_layers=(1, 2, 3))


@pytest.mark.parametrize("cfg", [UNetConfig.tiny_sdxl(), TINY_DEEP], ids=["tiny-sdxl", "deeper-mid"])
def test_sdxl_unet_matches_diffusers(cfg):
    """transformer_layers_per_block per level, no attention at level 0, linear projections and the text_time
    embedding: diffusers' keys load 1:1 and the outputs agree."""
    ref = perturbed(diffusers.UNet2DConditionModel(**_kwargs(cfg)), seed=0)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx, pooled, time_ids = _unet_inputs(cfg, (8, 8))
    with torch.no_grad():
        expected = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(x, t, ctx, text_embeds=pooled, time_ids=time_ids)
        other = ours(x, t, ctx, text_embeds=pooled, time_ids=time_ids.flip(0))
    assert expected.abs().mean() > 1e-3
    assert (other - got).abs().max() > 1e-4  # the micro-conditioning reaches the output
    assert rel_l2(got, expected, f"tiny SDXL U-Net {cfg.transformer_layers}") < TOL


def test_sdxl_config_reads_diffusers_names():
    """SDXL base's unet/config.json values (diffusers' names) give the SDXL config, and back."""
    d = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
         "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
         "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
         "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
         "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                            "CrossAttnDownBlock2D"],
         "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
         "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
         "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
         "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
         "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
         "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
         "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
         "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
         "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
         "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
         "use_linear_projection": True}
    cfg = UNetConfig.from_diffusers(d)
    assert cfg == UNetConfig.sdxl()
    assert cfg.pooled_dim == 1280 and cfg.text_time
    assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert ModelConfig.sdxl_base().default_size == 1024


@pytest.mark.parametrize("change, match", [
    ({"addition_embed_type": "text_image"}, "addition_embed_type='text_image'"),
    ({"reverse_transformer_layers_per_block": [[1, 1, 1], [2, 2, 2], [1, 1, 1]]}, "reverse_transformer_layers"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"transformer_layers_per_block": [1, 2]}, "transformer_layers_per_block has 2 entries"),
])
def test_unsupported_sdxl_options_are_refused_by_name(change, match):
    d = {**UNetConfig.tiny_sdxl().to_diffusers(), **change}
    with pytest.raises((UnsupportedModelError, ModelLoadError), match=match):
        UNetConfig.from_diffusers(d)


def test_model_config_checks_the_parts_fit():
    tiny = ModelConfig.tiny_sdxl()
    with pytest.raises(ModelLoadError, match="widths together"):
        dataclasses.replace(tiny, text_encoder_2=dataclasses.replace(tiny.text_encoder_2, hidden_size=64))
    with pytest.raises(ModelLoadError, match="projects to"):
        dataclasses.replace(tiny, text_encoder_2=dataclasses.replace(tiny.text_encoder_2, projection_dim=16))
    with pytest.raises(ModelLoadError, match="only one of them"):
        dataclasses.replace(tiny, text_encoder_2=None, unet=dataclasses.replace(tiny.unet, cross_attention_dim=32))
    assert ModelConfig.from_dict(tiny.to_dict()) == tiny
    assert ModelConfig.from_dict(ModelConfig.tiny().to_dict()) == ModelConfig.tiny()


def _ids(cfg: TextEncoderConfig, pad: int) -> torch.Tensor:
    """Two prompts: BOS, tokens, EOS, padding (SDXL's second tokenizer pads with '!', id 0)."""
    ids = torch.full((2, 77), pad, dtype=torch.long)
    ids[0, :5] = torch.tensor([49406, 320, 1125, 539, 49407])
    ids[1, :3] = torch.tensor([49406, 2368, 49407])
    return ids


@pytest.mark.parametrize("eos", [49407, 2], ids=["eos-49407", "legacy-eos-2-argmax"])
@pytest.mark.parametrize("clip_skip", [0, 1])
def test_second_encoder_matches_transformers_with_projection(eos, clip_skip):
    """CLIPTextModelWithProjection: pooled output at EOS (first EOS id, or argmax of the ids when the config's
    eos_token_id is the legacy 2, as in SDXL's files), projected without bias; hidden state -2-clip_skip."""
    cfg = dataclasses.replace(TextEncoderConfig.tiny_sdxl_2(), eos_token_id=eos, bos_token_id=0 if eos == 2 else 49406)
    torch.manual_seed(0)
    ref = transformers.CLIPTextModelWithProjection(cfg.to_transformers()).eval()
    ours = TextEncoder(cfg, projection=True).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.text_projection.bias is None
    ids = _ids(cfg, pad=0)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hidden, pooled = ours.penultimate(ids, clip_skip)
    assert rel_l2(pooled, out.text_embeds, "text_encoder_2 pooled+projected") < TOL
    assert rel_l2(hidden, out.hidden_states[-(clip_skip + 2)], f"text_encoder_2 hidden clip_skip={clip_skip}") < TOL


def test_first_encoder_penultimate_matches_transformers():
    cfg = TextEncoderConfig.tiny()
    torch.manual_seed(1)
    ref = transformers.CLIPTextModel(cfg.to_transformers()).eval()
    ours = TextEncoder(cfg).eval()
    state = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    ids = _ids(cfg, pad=49407)
    with torch.no_grad():
        hidden, pooled = ours.penultimate(ids)
        expected = ref(ids, output_hidden_states=True).hidden_states[-2]
    assert pooled is None
    assert rel_l2(hidden, expected, "text_encoder penultimate") < TOL
