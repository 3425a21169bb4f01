"""Single-file (CompVis/Stability) <-> diffusers key maps, with diffusers' own converters as the oracle.

Source weights come from diffusers' UNet2DConditionModel / AutoencoderKL and transformers'
CLIPTextModel, so the diffusers side is real by construction; diffusers' single-file converters
then show independently that what `diffusers_to_original` writes is the real original layout.
"""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from sdengine.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdengine.errors import UnsupportedModelError, WeightsMismatchError
from sdengine.models.convert import (detect_family, diffusers_to_original, infer_config, legacy_vae_names,
                                     original_to_diffusers, unet_key_map, vae_key_map)
from sdengine.schedulers import SchedulerConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

TINY = {
    "sd1": ModelConfig.tiny(),
    "sd2": ModelConfig(
        unet=dataclasses.replace(UNetConfig.tiny(), use_linear_projection=True, upcast_attention=True),
        vae=VAEConfig.tiny(), text_encoder=dataclasses.replace(TextEncoderConfig.tiny(), hidden_act="gelu")),
}
PARTS = ("unet", "vae", "text_encoder")


def inpainting(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with a 9-channel (latent, mask, masked-image latent) inpainting U-Net."""
    return dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, in_channels=9))


# Tiny single files: (family, config) per fixture id.
FILES = {"sd1": ("sd1", TINY["sd1"]), "sd2": ("sd2", TINY["sd2"]),
         "sd1-inpaint": ("sd1", inpainting(TINY["sd1"])), "sd2-inpaint": ("sd2", inpainting(TINY["sd2"]))}


def _kwargs(cfg) -> dict:
    d = cfg.to_diffusers()
    d.pop("_class_name")
    return d


def diffusers_parts(cfg: ModelConfig, meta: bool = False) -> dict[str, dict]:
    """Random (or meta) diffusers/transformers state dicts for the three networks of `cfg`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        unet = UNet2DConditionModel(**_kwargs(cfg.unet)).state_dict()
        vae = AutoencoderKL(**_kwargs(cfg.vae)).state_dict()
        text = CLIPTextModel(cfg.text_encoder.to_transformers()).state_dict()
    # transformers 5 dropped the `text_model.` wrapper module; checkpoints on disk still carry it.
    text = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text.items()
            if not k.endswith("position_ids")}
    return {"unet": dict(unet), "vae": dict(vae), "text_encoder": text}


def standins(parts: dict[str, dict]) -> dict[str, dict]:
    """Replace U-Net/VAE meta tensors by cheap expanded int tensors that differ per key and per row."""
    out = {}
    for name, sd in parts.items():
        if name == "text_encoder":  # OpenCLIP's q/k/v merge would materialise these: keep them meta
            out[name] = dict(sd)
            continue
        out[name] = {}
        for n, (key, t) in enumerate(sorted(sd.items())):
            rows = torch.arange(t.shape[0], dtype=torch.int64) + 100_000 * (n + 1)
            out[name][key] = rows.reshape(-1, *[1] * (t.dim() - 1)).expand(t.shape)
    return out


def assert_same(got: dict, want: dict, what: str) -> None:
    """Same keys; same values (meta tensors: same shapes)."""
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want))[:10])
    for key, w in want.items():
        g = got[key]
        assert tuple(g.shape) == tuple(w.shape), (what, key, g.shape, w.shape)
        if w.device.type != "meta":
            assert torch.equal(g, w), (what, key)


def oracle(orig: dict, cfg: ModelConfig, family: str) -> dict[str, dict]:
    """diffusers' single-file converters applied to an original-layout checkpoint."""
    if family == "sd1":
        text = sfu.convert_ldm_clip_checkpoint(orig)
    else:
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=cfg.text_encoder.hidden_size))
        text = sfu.convert_open_clip_checkpoint(model, orig)
    return {"unet": sfu.convert_ldm_unet_checkpoint(orig, cfg.unet.to_diffusers()),
            "vae": sfu.convert_ldm_vae_checkpoint(orig, cfg.vae.to_diffusers()),
            "text_encoder": text}


@pytest.fixture(scope="module", params=list(FILES))
def tiny_file(request, tmp_path_factory):
    """(family, config, source parts, original-layout dict read back from a .safetensors file)."""
    family, cfg = FILES[request.param]
    parts = diffusers_parts(cfg)
    path = tmp_path_factory.mktemp("ckpt") / f"tiny-{request.param}.safetensors"
    safetensors_torch.save_file(diffusers_to_original(parts, cfg, family), str(path))
    return family, cfg, parts, safetensors_torch.load_file(str(path))


def test_round_trip_through_a_file(tiny_file):
    family, cfg, parts, orig = tiny_file
    assert detect_family(orig) == detect_family(orig.keys()) == detect_family(list(orig)) == family
    back = original_to_diffusers(orig, cfg)
    for name in PARTS:
        assert_same(back[name], parts[name], name)


def test_written_layout_matches_diffusers_converters(tiny_file):
    family, cfg, parts, orig = tiny_file
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in orig)
    got = oracle(orig, cfg, family)
    for name in PARTS:
        assert_same(got[name], parts[name], name)


def test_infer_config_on_the_tiny_file(tiny_file):
    family, cfg, _, orig = tiny_file
    got = infer_config(orig)
    fields = {"unet": ("block_out_channels", "attention", "layers_per_block", "cross_attention_dim", "in_channels",
                       "out_channels", "use_linear_projection", "upcast_attention"),
              "vae": ("block_out_channels", "layers_per_block", "latent_channels"),
              "text_encoder": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "max_position_embeddings", "hidden_act")}
    for part, names in fields.items():
        for name in names:
            assert getattr(getattr(got, part), name) == getattr(getattr(cfg, part), name), (part, name)
    assert got.scheduler == SchedulerConfig()


def test_numpy_values_work(tiny_file):
    family, cfg, parts, orig = tiny_file
    arrays = {k: v.numpy() for k, v in orig.items()}
    back = original_to_diffusers(arrays, cfg)
    for name in PARTS:
        assert sorted(back[name]) == sorted(parts[name])
        for key, value in back[name].items():
            np.testing.assert_array_equal(value, parts[name][key].numpy())
    again = diffusers_to_original(back, cfg, family)
    assert sorted(again) == sorted(orig)
    for key, value in again.items():
        np.testing.assert_array_equal(value, arrays[key])


def test_training_leftovers_and_buffers_are_ignored(tiny_file):
    family, cfg, parts, orig = tiny_file
    extra = {"alphas_cumprod": torch.ones(1000), "betas": torch.ones(1000), "lvlb_weights": torch.ones(1000),
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1),
             "model_ema.diffusion_modelinput_blocks00weight": torch.ones(1), "posterior_variance": torch.ones(1)}
    if family == "sd1":
        extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    back = original_to_diffusers({**orig, **extra}, cfg)
    for name in PARTS:
        assert_same(back[name], parts[name], name)


def test_old_sd1_text_layout_without_text_model():
    cfg = TINY["sd1"]
    parts = diffusers_parts(cfg)
    orig = diffusers_to_original(parts, cfg, "sd1")
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in orig.items()}
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in old
    assert_same(original_to_diffusers(old, cfg)["text_encoder"], parts["text_encoder"], "text")
    assert infer_config(old).text_encoder.num_hidden_layers == cfg.text_encoder.num_hidden_layers


def _sd_file(cfg: ModelConfig, family: str) -> tuple[dict, dict]:
    parts = standins(diffusers_parts(cfg, meta=True))
    return parts, diffusers_to_original(parts, cfg, family)


def _openclip_head(orig: dict) -> dict:
    """What a real SD 2.x file adds: OpenCLIP's 24th layer, text_projection and logit_scale."""
    p = "cond_stage_model.model."
    last = {k.replace("resblocks.22.", "resblocks.23."): v for k, v in orig.items()
            if k.startswith(p + "transformer.resblocks.22.")}
    return {**last, p + "text_projection": torch.empty(1024, 1024, device="meta"),
            p + "logit_scale": torch.empty((), device="meta")}


def test_sd15_shapes_round_trip_oracle_and_infer():
    cfg = ModelConfig.sd15()
    parts, orig = _sd_file(cfg, "sd1")
    assert len(orig) == sum(map(len, parts.values()))
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in orig  # diffusers' v1 marker
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in orig  # upsampler without attention
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in orig  # upsampler after attention
    back, got = original_to_diffusers(orig, cfg), oracle(orig, cfg, "sd1")
    for name in PARTS:
        assert_same(back[name], parts[name], name)
        assert_same(got[name], parts[name], name)
    assert infer_config(orig) == cfg


@pytest.mark.parametrize("complete_tower", [False, True])
def test_sd21_shapes_round_trip_oracle_and_infer(complete_tower):
    cfg = ModelConfig.sd21()
    parts, orig = _sd_file(cfg, "sd2")
    assert orig["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    if complete_tower:
        orig.update(_openclip_head(orig))
    back, got = original_to_diffusers(orig, cfg), oracle(orig, cfg, "sd2")
    for name in PARTS:
        assert_same(back[name], parts[name], name)
        assert_same(got[name], parts[name], name)
    # v-prediction is not in the weights: the inferred scheduler stays epsilon.
    assert infer_config(orig) == dataclasses.replace(cfg, scheduler=SchedulerConfig())


def test_inpainting_u_nets_are_accepted_by_shape():
    conv_in = {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 9, 3, 3, device="meta")}
    assert detect_family({**conv_in, "cond_stage_model.transformer.text_model.final_layer_norm.weight": T}) == "sd1"
    assert detect_family({**conv_in, "cond_stage_model.model.ln_final.weight": T}) == "sd2"


def test_sd15_inpainting_shapes_round_trip_oracle_and_infer():
    """sd-v1-5-inpainting: the SD 1.5 U-Net with 9 input channels, CLIP text encoder."""
    cfg = inpainting(ModelConfig.sd15())
    parts, orig = _sd_file(cfg, "sd1")
    assert orig["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 9, 3, 3)
    assert sfu.infer_diffusers_model_type(orig) == "inpainting"
    back, got = original_to_diffusers(orig, cfg), oracle(orig, cfg, "sd1")
    for name in PARTS:
        assert_same(back[name], parts[name], name)
        assert_same(got[name], parts[name], name)
    inferred = infer_config(orig)
    assert inferred == cfg and inferred.inpainting and inferred.default_size == 512


@pytest.mark.parametrize("complete_tower", [False, True])
def test_sd2_inpainting_shapes_round_trip_oracle_and_infer(complete_tower):
    """stable-diffusion-2-inpainting: SD 2 widths and OpenCLIP, 9 input channels, trained at 512 (epsilon)."""
    sd21 = ModelConfig.sd21()
    cfg = ModelConfig(unet=dataclasses.replace(sd21.unet, in_channels=9, sample_size=64),
                      text_encoder=sd21.text_encoder)
    parts, orig = _sd_file(cfg, "sd2")
    if complete_tower:
        orig.update(_openclip_head(orig))
    assert sfu.infer_diffusers_model_type(orig) == "inpainting_v2"
    back, got = original_to_diffusers(orig, cfg), oracle(orig, cfg, "sd2")
    for name in PARTS:
        assert_same(back[name], parts[name], name)
        assert_same(got[name], parts[name], name)
    inferred = infer_config(orig)
    assert inferred == cfg and inferred.inpainting and inferred.default_size == 512


def test_sd21_extra_layer_beyond_the_dropped_one_is_reported():
    cfg = ModelConfig.sd21()
    _, orig = _sd_file(cfg, "sd2")
    head = _openclip_head(orig)
    orig.update(head)
    orig.update({k.replace("resblocks.23.", "resblocks.24."): v for k, v in head.items() if "resblocks" in k})
    with pytest.raises(WeightsMismatchError, match="resblocks.24"):
        original_to_diffusers(orig, cfg)


def test_key_maps_follow_the_block_arithmetic():
    unet = dict(unet_key_map(UNetConfig.sd15()))
    assert unet["input_blocks.4.0.in_layers.2"] == "down_blocks.1.resnets.0.conv1"
    assert unet["input_blocks.8.1"] == "down_blocks.2.attentions.1"
    assert unet["input_blocks.9.0.op"] == "down_blocks.2.downsamplers.0.conv"
    assert unet["output_blocks.8.2.conv"] == "up_blocks.2.upsamplers.0.conv"
    assert unet["middle_block.2.skip_connection"] == "mid_block.resnets.1.conv_shortcut"
    assert "input_blocks.10.1" not in unet  # the last down block has no attention
    vae = dict(vae_key_map(VAEConfig()))
    assert vae["decoder.up.3.block.2.nin_shortcut"] == "decoder.up_blocks.0.resnets.2.conv_shortcut"
    assert vae["decoder.up.1.upsample.conv"] == "decoder.up_blocks.2.upsamplers.0.conv"
    assert vae["encoder.mid.attn_1.proj_out"] == "encoder.mid_block.attentions.0.to_out.0"
    for pairs in (unet_key_map(UNetConfig.sd21()), vae_key_map(VAEConfig())):
        assert len({o for o, _ in pairs}) == len({d for _, d in pairs}) == len(pairs)


T = torch.empty(1)


@pytest.mark.parametrize("state, match", [
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": T,
      "model.diffusion_model.input_blocks.0.0.weight": T}, "SDXL"),
    ({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": T}, "SD3"),
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": T}, "Flux"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": T}, "Flux"),
    ({"model.diffusion_model.label_emb.0.0.weight": T, "first_stage_model.quant_conv.weight": T}, "label_emb"),
    ({}, "holds no tensors"),
    ({"foo.weight": T, "bar.bias": T}, "not a Stable Diffusion checkpoint.*bar.bias, foo.weight"),
    ({"down_blocks.0.resnets.0.conv1.weight": T}, "diffusers folder"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 8, 3, 3, device="meta")},
     r"8 input channels \(instruct-pix2pix\).*4 \(txt2img\) or 9 \(inpainting\) input channels"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 5, 3, 3, device="meta")},
     r"5 input channels \(depth-to-image\)"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 7, 3, 3, device="meta")},
     r"7 input channels \(x4 upscaler\)"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 6, 3, 3, device="meta")},
     r"6 input channels \(not a txt2img or inpainting model\)"),
    ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": T,
      "cond_stage_model.model.ln_final.weight": T}, "two text encoders"),
])
def test_other_families_are_refused(state, match):
    with pytest.raises(UnsupportedModelError, match=match):
        detect_family(state)
    if "input channels" not in match:  # keys alone carry no shapes
        with pytest.raises(UnsupportedModelError, match=match):
            detect_family(state.keys())
    with pytest.raises(UnsupportedModelError, match=match):
        original_to_diffusers(state, ModelConfig.tiny())


def test_unmapped_keys_are_listed(tiny_file):
    family, cfg, _, orig = tiny_file
    bad = {"model.diffusion_model.input_blocks.1.0.bogus.weight": T, "first_stage_model.encoder.down.9.x": T}
    bad.update({f"model.diffusion_model.extra_{i}": T for i in range(25)})
    with pytest.raises(WeightsMismatchError) as err:
        original_to_diffusers({**orig, **bad}, cfg)
    message = str(err.value)
    assert "27 checkpoint keys" in message and "7 more" in message
    assert "model.diffusion_model.input_blocks.1.0.bogus.weight" in message


def test_config_that_disagrees_with_the_file_is_reported(tiny_file):
    family, cfg, _, orig = tiny_file
    fewer = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, layers_per_block=1))
    with pytest.raises(WeightsMismatchError, match="input_blocks"):
        original_to_diffusers(orig, fewer)


def test_infer_config_names_a_missing_tensor(tiny_file):
    _, _, _, orig = tiny_file
    state = {k: v for k, v in orig.items() if k != "first_stage_model.quant_conv.weight"}
    with pytest.raises(UnsupportedModelError, match="quant_conv.weight"):
        infer_config(state)


def test_diffusers_to_original_refuses_unknown_keys_and_families(tiny_file):
    family, cfg, parts, _ = tiny_file
    with pytest.raises(WeightsMismatchError, match="unet: nope.weight"):
        diffusers_to_original({**parts, "unet": {**parts["unet"], "nope.weight": T}}, cfg, family)
    with pytest.raises(UnsupportedModelError, match="sd3"):
        diffusers_to_original(parts, cfg, "sd3")
    with pytest.raises(UnsupportedModelError, match="needs an SDXL config"):
        diffusers_to_original(parts, cfg, "sdxl")
    if family == "sd2":
        text = {k: v for k, v in parts["text_encoder"].items() if "layers.0.self_attn.k_proj.weight" not in k}
        with pytest.raises(WeightsMismatchError, match="k_proj.weight"):
            diffusers_to_original({**parts, "text_encoder": text}, cfg, family)


def test_legacy_vae_attention_names():
    vae = diffusers_parts(TINY["sd1"])["vae"]
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in vae.items():
        for new, old in new_to_old.items():
            if f"attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.dim() == 2 else value  # older 1x1 conv shapes
        legacy[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert_same(legacy_vae_names(legacy), vae, "legacy")
    assert_same(legacy_vae_names(vae), vae, "identity")
