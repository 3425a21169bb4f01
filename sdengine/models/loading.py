"""Load the three reference networks from a diffusers folder or a single-file checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, read_json
from ..errors import ModelLoadError, UnsupportedModelError
from ..tokenizer import ClipTokenizer
from . import convert
from .text_encoder import TextEncoder
from .unet import UNet
from .vae import AutoencoderKL
from .weights import load_strict, read_safetensors, refuse_pickle

# Pipelines whose unet/vae/text_encoder are the SD 1.x/2.x networks. Whether the U-Net is a text-to-image
# (4 input channels) or an inpainting (9: latent, mask, masked-image latent) one is read from its config, not
# from the pipeline's name: ModelConfig.inpainting tells them apart.
_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionPipelineSafe",
              "StableDiffusionInpaintPipeline"}
_WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_IGNORED_KEYS = ("text_model.embeddings.position_ids",)  # a buffer older transformers saved


@dataclass(frozen=True)
class Components:
    """The loaded reference networks, in eval mode on one device and dtype."""

    config: ModelConfig
    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    tokenizer: ClipTokenizer
    source: Path


def load_components(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    prediction_type: str | None = None) -> Components:
    """Load a diffusers folder (model_index.json) or a single-file original-layout .safetensors.

    Text-to-image and inpainting models both load; `Components.config.inpainting` says which it is.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist: give a diffusers folder (with model_index.json) "
                             f"or a single-file .safetensors checkpoint")
    if path.is_dir():
        config, parts, tokenizer = _read_folder(path)
    else:
        config, parts, tokenizer = _read_single_file(path)
    config = config.with_prediction_type(prediction_type)
    modules = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae),
               "text_encoder": TextEncoder(config.text_encoder)}
    for name, module in modules.items():
        state = {k: v for k, v in parts[name].items() if k not in _IGNORED_KEYS}
        load_strict(module, state, f"{name} weights of {path}")
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Components(config, modules["unet"], modules["vae"], modules["text_encoder"], tokenizer, path)


def _read_folder(root: Path) -> tuple[ModelConfig, dict[str, dict], ClipTokenizer]:
    """Configs, weights and tokenizer of a diffusers folder."""
    if not (root / "model_index.json").is_file():
        raise ModelLoadError(f"{root} is a folder without model_index.json: give a diffusers model folder "
                             f"or a single-file .safetensors checkpoint")
    pipeline = read_json(root / "model_index.json").get("_class_name", "")
    if pipeline not in _PIPELINES:
        raise UnsupportedModelError(f"{root} holds a {pipeline or 'unnamed'} model; sdengine runs Stable Diffusion "
                                    f"1.x/2.x text-to-image and inpainting models ({', '.join(sorted(_PIPELINES))})")
    config = ModelConfig.from_diffusers_folder(root)
    parts = {name: _read_folder_weights(root / name, stem) for name, stem in _WEIGHT_FILES.items()}
    parts["text_encoder"] = _prefixed_text_keys(parts["text_encoder"])
    parts["vae"] = convert.legacy_vae_names(parts["vae"])
    tok_dir = root / "tokenizer"
    tokenizer = ClipTokenizer.from_folder(tok_dir) if (tok_dir / "vocab.json").is_file() else ClipTokenizer.default()
    return config, parts, tokenizer


def _read_folder_weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """One component's safetensors (plain, fp16 variant or sharded); pickle-only folders are refused."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.json"):
        if (folder / name).is_file():
            return read_safetensors(folder / name)
    for suffix in (".bin", ".ckpt", ".pt"):
        if (folder / f"{stem}{suffix}").is_file():
            refuse_pickle(folder / f"{stem}{suffix}")
    raise ModelLoadError(f"{folder} has no {stem}.safetensors: the model folder is incomplete")


def _prefixed_text_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 saves CLIPTextModel keys without the `text_model.` prefix; accept both."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def _read_single_file(path: Path) -> tuple[ModelConfig, dict[str, dict], ClipTokenizer]:
    """Config inferred from tensor shapes, weights mapped from the original CompVis/Stability layout.

    v-prediction (SD 2.x 768-v) is not visible in the weights: pass prediction_type to load_components.
    """
    refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path} is not a .safetensors file or a diffusers folder")
    state = read_safetensors(path)
    family = convert.detect_family(state.keys())
    config = convert.infer_config(state)
    parts = convert.original_to_diffusers(state, config)
    tokenizer = ClipTokenizer.default() if family == "sd1" else ClipTokenizer.default(pad_token="!")
    return config, parts, tokenizer
