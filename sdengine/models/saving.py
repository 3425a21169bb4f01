"""Write the reference networks as a diffusers folder (safetensors, configs, tokenizer files)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import InvalidInputError
from ..files import temporary_folder
from .text_encoder import TextEncoder
from .unet import UNet
from .vae import AutoencoderKL

_CLIP_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip"
# The diffusers release whose folder layout these files follow (safetensors, to_q/to_k/to_v VAE attention).
# diffusers reads it from model_index.json: without it StableDiffusionInpaintPipeline.from_pretrained fails,
# and at 0.5.1 or older it would pick the legacy 4-channel inpainting pipeline.
DIFFUSERS_LAYOUT_VERSION = "0.21.0"


def model_index(inpainting: bool = False, sdxl: bool = False, force_zeros_for_empty_prompt: bool = True) -> dict:
    """model_index.json of a StableDiffusionPipeline (or, for an inpainting U-Net, a
    StableDiffusionInpaintPipeline) folder without safety checker; sdxl=True: a StableDiffusionXL(Inpaint)Pipeline."""
    if sdxl:
        return {
            "_class_name": "StableDiffusionXLInpaintPipeline" if inpainting else "StableDiffusionXLPipeline",
            "_diffusers_version": DIFFUSERS_LAYOUT_VERSION,
            "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    return {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_LAYOUT_VERSION,
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _tokenizer_files(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """The shipped CLIP vocabulary with the tokenizer configs transformers reads (SDXL's tokenizer_2 pads with '!')."""
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(_CLIP_DIR / name, folder / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                   "do_lower_case": True, **special})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_diffusers_folder(out: str | Path, config: ModelConfig, unet: UNet, vae: AutoencoderKL,
                          text_encoder: TextEncoder, dtype: torch.dtype = torch.float32,
                          overwrite: bool = False, text_encoder_2: TextEncoder | None = None) -> Path:
    """Write all parts into a temporary folder beside `out`, then rename it into place.

    An inpainting config (9-channel U-Net) is written as a StableDiffusionInpaintPipeline folder; an SDXL config
    (give text_encoder_2) as a StableDiffusionXL(Inpaint)Pipeline folder with text_encoder_2/ and tokenizer_2/.
    """
    if config.sdxl != (text_encoder_2 is not None):
        raise InvalidInputError("an SDXL config needs text_encoder_2, and only an SDXL config takes one")
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise InvalidInputError(f"{out} exists; choose another folder or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(out)
    try:
        _write_json(tmp / "model_index.json", model_index(config.inpainting, config.sdxl,
                                                          config.force_zeros_for_empty_prompt))
        parts = {"unet": (unet, config.unet.to_diffusers(), "diffusion_pytorch_model"),
                 "vae": (vae, config.vae.to_diffusers(), "diffusion_pytorch_model"),
                 "text_encoder": (text_encoder, config.text_encoder.to_diffusers(), "model")}
        if text_encoder_2 is not None:
            parts["text_encoder_2"] = (text_encoder_2, config.text_encoder_2.to_diffusers(projection=True), "model")
        for name, (module, cfg, stem) in parts.items():
            (tmp / name).mkdir()
            _write_json(tmp / name / "config.json", cfg)
            state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(tmp / name / f"{stem}.safetensors"), metadata={"format": "pt"})
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "scheduler" / "scheduler_config.json", config.scheduler.to_diffusers())
        _tokenizer_files(tmp / "tokenizer")
        if config.sdxl:
            _tokenizer_files(tmp / "tokenizer_2", pad_token="!")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_random_model(out: str | Path, config: ModelConfig | None = None, seed: int = 0,
                       overwrite: bool = False) -> Path:
    """A diffusers folder of randomly initialised networks (default: the tiny config), for tests and trials.

    Give ModelConfig.tiny_inpaint() (or any 9-channel config) for a StableDiffusionInpaintPipeline folder, and
    ModelConfig.tiny_sdxl() for a StableDiffusionXLPipeline folder.
    """
    config = config or ModelConfig.tiny()
    torch.manual_seed(seed)
    unet, vae, text = UNet(config.unet), AutoencoderKL(config.vae), TextEncoder(config.text_encoder)
    text_2 = TextEncoder(config.text_encoder_2, projection=True) if config.sdxl else None
    return save_diffusers_folder(out, config, unet, vae, text, overwrite=overwrite, text_encoder_2=text_2)
