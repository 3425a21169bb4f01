"""LoRA files written by tests: kohya/A1111 and diffusers/PEFT layouts over the tiny model's modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# U-Net attention (self and cross), feed-forward, 1x1 convolutions (proj_in, conv_shortcut), a 3x3
# convolution (LoCon), a time-embedding projection; text encoder attention and MLP.
UNET_MODULES = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "mid_block.resnets.0.time_emb_proj",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
)
TEXT_MODULES = ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1")
# diffusers 0.42 with transformers 5 drops kohya text-encoder self-attention LoRAs (it renames them to
# `to_q_lora` keys its CLIPTextModel then reports as unexpected), so the kohya file compared with it holds
# text-encoder MLP LoRAs; test_lora checks the kohya self-attention mapping against the formula instead.
KOHYA_TEXT_MODULES = ("text_model.encoder.layers.0.mlp.fc2", "text_model.encoder.layers.1.mlp.fc1")


def low_rank(targets: dict[str, tuple[int, ...]], modules: dict[str, tuple[str, ...]], rank: int, seed: int,
             std: float = 0.35) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{component.module: (up, down)} with conv shapes for 4-d weights (up [out,r,1,1], down [r,in,kh,kw])."""
    rng = np.random.default_rng(seed)
    out = {}
    for component, names in modules.items():
        for module in names:
            shape = targets[f"{component}.{module}.weight"]
            up_shape = (shape[0], rank, *([1, 1] if len(shape) == 4 else []))
            out[f"{component}.{module}"] = (rng.normal(0, std, up_shape).astype(np.float32),
                                            rng.normal(0, std, (rank, *shape[1:])).astype(np.float32))
    return out


def write_kohya(path: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float,
                dtype: str = "float32") -> Path:
    from safetensors.numpy import save_file

    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    tensors = {}
    for key, (up, down) in pairs.items():
        component, _, module = key.partition(".")
        name = prefix[component] + module.replace(".", "_")
        tensors[f"{name}.lora_up.weight"] = up.astype(dtype)
        tensors[f"{name}.lora_down.weight"] = down.astype(dtype)
        tensors[f"{name}.alpha"] = np.array(alpha, np.float32)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def write_peft(path: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """diffusers' save_lora_weights layout (no alpha: alpha = rank)."""
    from safetensors.numpy import save_file

    tensors = {}
    for key, (up, down) in pairs.items():
        tensors[f"{key}.lora_A.weight"] = down
        tensors[f"{key}.lora_B.weight"] = up
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
