"""SDXL's single-file layout (Stability's sgm: conditioner.embedders.0/1) <-> diffusers names, with diffusers'
own single-file converters as the oracle, on tiny and on full-size shapes (meta tensors)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sdengine.config import ModelConfig, TextEncoderConfig
from sdengine.errors import UnsupportedModelError
from sdengine.models.convert import detect_family, diffusers_to_original, infer_config, original_to_diffusers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from test_convert import assert_same, standins  # noqa: E402

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
XL_OPENCLIP = "conditioner.embedders.1.model."


def _kwargs(cfg) -> dict:
    d = cfg.to_diffusers()
    d.pop("_class_name")
    return d


def sdxl_parts(cfg: ModelConfig, meta: bool = False) -> dict[str, dict]:
    """Random (or meta) diffusers/transformers state dicts of the four SDXL networks."""
    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        unet = diffusers.UNet2DConditionModel(**_kwargs(cfg.unet)).state_dict()
        vae = diffusers.AutoencoderKL(**_kwargs(cfg.vae)).state_dict()
        text = transformers.CLIPTextModel(cfg.text_encoder.to_transformers()).state_dict()
        text_2 = transformers.CLIPTextModelWithProjection(cfg.text_encoder_2.to_transformers()).state_dict()
    fix = lambda sd: {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v  # noqa: E731
                      for k, v in sd.items() if not k.endswith("position_ids")}
    return {"unet": dict(unet), "vae": dict(vae), "text_encoder": fix(text), "text_encoder_2": fix(text_2)}


def oracle(orig: dict, cfg: ModelConfig) -> dict[str, dict]:
    """diffusers' single-file converters on an SDXL original-layout checkpoint (as from_single_file calls them)."""
    model = type("M", (), {"config": type("C", (), {"hidden_size": cfg.text_encoder_2.hidden_size})})()
    return {"unet": sfu.convert_ldm_unet_checkpoint(orig, cfg.unet.to_diffusers()),
            "vae": sfu.convert_ldm_vae_checkpoint(orig, cfg.vae.to_diffusers()),
            "text_encoder": sfu.convert_ldm_clip_checkpoint(orig),
            "text_encoder_2": sfu.convert_open_clip_checkpoint(model, orig, prefix=XL_OPENCLIP)}


@pytest.fixture(scope="module")
def tiny_xl_file(tmp_path_factory):
    cfg = ModelConfig.tiny_sdxl()
    parts = sdxl_parts(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sdxl.safetensors"
    orig = diffusers_to_original(parts, cfg, "sdxl")
    orig[XL_OPENCLIP + "logit_scale"] = torch.tensor(4.6052)  # in Stability's files; unused
    safetensors_torch.save_file(orig, str(path))
    return cfg, parts, safetensors_torch.load_file(str(path)), path


def test_tiny_round_trip_and_diffusers_oracle(tiny_xl_file):
    cfg, parts, orig, _ = tiny_xl_file
    assert detect_family(orig) == detect_family(list(orig)) == "sdxl"
    assert orig[XL_OPENCLIP + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)  # fused q, k, v
    assert torch.equal(orig[XL_OPENCLIP + "text_projection"], parts["text_encoder_2"]["text_projection.weight"].T)
    assert "model.diffusion_model.label_emb.0.0.weight" in orig
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" in orig
    back, got = original_to_diffusers(orig, cfg), oracle(orig, cfg)
    for name in PARTS:
        assert_same(back[name], parts[name], name)
        assert_same(got[name], parts[name], f"diffusers oracle {name}")


def test_tiny_infer_config(tiny_xl_file):
    cfg, _, orig, _ = tiny_xl_file
    got = infer_config(orig)
    legacy = dict(bos_token_id=0, eos_token_id=2)  # SDXL's text encoder configs (argmax pooling)
    # Heads (64 channels each) and norm groups (32) are SDXL's conventions, not in the weights.
    assert got.unet == dataclasses.replace(cfg.unet, sample_size=128, num_heads=(1, 1, 1), norm_num_groups=32)
    assert got.text_encoder == dataclasses.replace(cfg.text_encoder, num_attention_heads=1, projection_dim=768,
                                                   **legacy)  # CLIP-L's projection: unused, not in the file
    assert got.text_encoder_2 == dataclasses.replace(cfg.text_encoder_2, num_attention_heads=1, **legacy)
    assert got.vae == dataclasses.replace(cfg.vae, sample_size=1024, norm_num_groups=16)


def test_single_file_loads_the_folder_tensors(tiny_sdxl_dir, tmp_path):
    """A file written in the original layout loads to exactly the tensors of the diffusers folder, and generates.
    (Its images differ from the folder's: heads and norm groups are inferred as SDXL's, 64 channels per head and
    32 groups, where the tiny folder's config says otherwise.)"""
    import sdengine
    from sdengine.models.loading import load_components

    folder = load_components(tiny_sdxl_dir)
    parts = {name: getattr(folder, name).state_dict() for name in PARTS}
    path = tmp_path / "tiny-sdxl.safetensors"
    safetensors_torch.save_file(diffusers_to_original(parts, folder.config, "sdxl"), str(path))
    single = load_components(path)
    assert single.config.sdxl and single.tokenizer_2.pad_id == 0 and single.tokenizer.pad_id == 49407
    for name in PARTS:
        a, b = getattr(single, name).state_dict(), parts[name]
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in b), name
    pipe = sdengine.load_pipeline(path)
    assert pipe.config.default_size == 1024  # SDXL's, for a file without a config
    images = pipe("a red cat", num_inference_steps=2, seed=4, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01


def test_full_size_shapes_round_trip_oracle_and_infer():
    """SDXL base 1.0's key names and shapes (meta tensors; U-Net and VAE as cheap distinct stand-ins): the written
    file has Stability's keys, reads back, diffusers' converters agree, and the config is inferred exactly."""
    cfg = ModelConfig.sdxl_base()
    parts = standins(sdxl_parts(cfg, meta=True))
    orig = diffusers_to_original(parts, cfg, "sdxl")
    assert len(orig) == sum(map(len, parts.values())) - 4 * 32  # q, k, v weights and biases fused: 6 -> 2 per layer
    expect = {"model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
              "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
              "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
              "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
              "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
              XL_OPENCLIP + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
              XL_OPENCLIP + "text_projection": (1280, 1280), XL_OPENCLIP + "positional_embedding": (77, 1280),
              "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3)}
    for key, shape in expect.items():
        assert tuple(orig[key].shape) == shape, key
    back, got = original_to_diffusers(orig, cfg), oracle(orig, cfg)
    for name in PARTS:
        assert_same(back[name], parts[name], name)
        assert_same(got[name], parts[name], f"diffusers oracle {name}")
    assert infer_config(orig) == cfg


T = torch.empty(1)


@pytest.mark.parametrize("state, match", [
    ({"conditioner.embedders.0.model.ln_final.weight": T, "model.diffusion_model.input_blocks.0.0.weight": T},
     "SDXL refiner"),
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": T,
      "conditioner.embedders.1.model.ln_final.weight": T, "conditioner.embedders.2.foo": T}, "SDXL base's pair"),
])
def test_refiner_and_unknown_conditioners_refused(state, match):
    with pytest.raises(UnsupportedModelError, match=match):
        detect_family(state)


def test_unmapped_sdxl_keys_are_listed(tiny_xl_file):
    cfg, _, orig, _ = tiny_xl_file
    from sdengine.errors import WeightsMismatchError

    with pytest.raises(WeightsMismatchError, match="conditioner.embedders.1.model.bogus"):
        original_to_diffusers({**orig, XL_OPENCLIP + "bogus": T}, cfg)
    assert TextEncoderConfig.sdxl_2().projection_dim == 1280
