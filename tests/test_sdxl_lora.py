"""SDXL LoRAs on the torch backend: kohya's SDXL keys (lora_te1_/lora_te2_, the U-Net under its original layout's
names) and diffusers/PEFT keys (text_encoder_2.*), against diffusers' load_lora_weights + fuse_lora."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdengine
from sdengine.errors import LoraError
from sdengine.lora import read_lora

from lora_support import low_rank, write_peft

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

RANK = 4
# Attention in a 2-deep spatial transformer, the mid block, an up block, a resnet and SDXL's add_embedding.
UNET = ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "mid_block.attentions.0.proj_in",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.1.conv1",
        "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2")
# The original (sgm) names kohya's sd-scripts gives those modules in SDXL LoRAs.
ORIGINAL = {"down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k":
            "input_blocks_4_1_transformer_blocks_1_attn2_to_k",
            "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
            "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q":
            "output_blocks_1_1_transformer_blocks_0_attn1_to_q",
            "down_blocks.0.resnets.1.conv1": "input_blocks_2_0_in_layers_2",
            "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2": "output_blocks_5_1_transformer_blocks_1_ff_net_2"}
TEXT = ("text_model.encoder.layers.0.mlp.fc2", "text_model.encoder.layers.1.mlp.fc1")
MODULES = {"unet": UNET, "text_encoder": TEXT, "text_encoder_2": TEXT + ("text_model.encoder.layers.2.mlp.fc1",)}
# diffusers infers a PEFT file's text-encoder layout from its attention keys: that file holds one
# (kohya's text attention keys it renames wrongly with transformers 5, see lora_support.py).
ATTN = ("text_model.encoder.layers.0.self_attn.q_proj",)
PEFT_MODULES = {"unet": UNET, "text_encoder": TEXT + ATTN, "text_encoder_2": TEXT + ATTN}


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    return sdengine.load_pipeline(tiny_sdxl_dir)


def write_kohya_sdxl(path, pairs, alpha: float):
    from safetensors.numpy import save_file

    tensors = {}
    for key, (up, down) in pairs.items():
        component, _, module = key.partition(".")
        name = {"text_encoder": "lora_te1_" + module.replace(".", "_"),
                "text_encoder_2": "lora_te2_" + module.replace(".", "_"),
                "unet": "lora_unet_" + ORIGINAL.get(module, module.replace(".", "_"))}[component]
        tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = up, down
        tensors[f"{name}.alpha"] = np.array(alpha, np.float32)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def weights(c) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder", "text_encoder_2")
            for k, v in getattr(c, name).state_dict().items()}


def diffusers_weights(d) -> dict[str, torch.Tensor]:
    fix = lambda sd: {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v  # noqa: E731
                      for k, v in sd.items()}
    return {**{f"unet.{k}": v for k, v in d.unet.state_dict().items()},
            **{f"text_encoder.{k}": v for k, v in fix(d.text_encoder.state_dict()).items()},
            **{f"text_encoder_2.{k}": v for k, v in fix(d.text_encoder_2.state_dict()).items()}}


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_sdxl_lora_matches_diffusers_fuse_lora(tiny_sdxl_dir, pipe, tmp_path, layout):
    targets = pipe.backend.lora_targets()
    modules = MODULES if layout == "kohya" else PEFT_MODULES
    pairs = low_rank(targets, modules, RANK, 3)
    path = (write_kohya_sdxl(tmp_path / "xl.safetensors", pairs, 2.0) if layout == "kohya"
            else write_peft(tmp_path / "xl.safetensors", pairs))
    parsed = read_lora(path, targets)
    assert parsed.targets == {f"{c}.{m}.weight" for c, ms in modules.items() for m in ms}
    base = weights(pipe.backend.components)
    pipe.set_loras({path: 0.7})
    try:
        ours = weights(pipe.backend.components)
    finally:
        pipe.set_loras({})
    d = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    d.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="xl")
    d.set_adapters(["xl"], adapter_weights=[0.7])
    d.fuse_lora(adapter_names=["xl"])
    d.unload_lora_weights()
    theirs = diffusers_weights(d)
    touched = parsed.targets
    assert all(not torch.equal(ours[k], base[k]) for k in touched)
    assert all(torch.equal(ours[k], base[k]) for k in ours if k not in touched)
    worst = max(((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item() for k in touched)
    print(f"\nparity SDXL lora {layout} vs diffusers fuse_lora: merged weights max relative difference {worst:.2e}")
    assert worst <= 1e-6
    assert torch.equal(weights(pipe.backend.components)["unet.conv_in.weight"], base["unet.conv_in.weight"])


def test_sdxl_lora_refused_on_sd15_and_sd15_lora_keys_on_sdxl(tmp_path, tiny_model_dir, pipe):
    sd = sdengine.load_pipeline(tiny_model_dir)
    xl = write_kohya_sdxl(tmp_path / "xl.safetensors", low_rank(pipe.backend.lora_targets(),
                                                                {"text_encoder_2": TEXT}, RANK, 1), 1.0)
    with pytest.raises(LoraError, match="made for SDXL and this model is SD 1.x/2.x"):
        sd.set_loras({xl: 1.0})
    from lora_support import write_kohya

    sd15 = write_kohya(tmp_path / "sd15.safetensors", low_rank(sd.backend.lora_targets(),
                                                                 {"unet": ("down_blocks.0.attentions.0.proj_in",)},
                                                                 RANK, 1), 1.0)
    with pytest.raises(LoraError, match="match no weight|another model"):
        pipe.set_loras({sd15: 1.0})
