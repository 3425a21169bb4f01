"""Load the three reference networks from a diffusers folder or a single-file checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, read_json
from ..errors import ModelLoadError, UnsupportedModelError
from ..tokenizer import EOS_TOKEN, ClipTokenizer
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
# SDXL (Podell et al. 2023): a second text encoder (text_encoder_2, tokenizer_2) and the text_time U-Net.
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
REFINER_REFUSED = ("the SDXL refiner (only text_encoder_2, aesthetic-score conditioning) is not supported yet "
                   "(issue 15): load an SDXL base model (stable-diffusion-xl-base-1.0 or one of its fine-tunes)")
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
    text_encoder_2: TextEncoder | None = None  # SDXL
    tokenizer_2: ClipTokenizer | None = None   # SDXL: pads with '!' (id 0)


def load_components(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    prediction_type: str | None = None) -> Components:
    """Load a diffusers folder (model_index.json) or a single-file original-layout .safetensors.

    Text-to-image and inpainting models both load; `Components.config.inpainting` says which it is, and
    `Components.config.sdxl` whether it is an SDXL model (then text_encoder_2 and tokenizer_2 are set).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist: give a diffusers folder (with model_index.json) "
                             f"or a single-file .safetensors checkpoint")
    if path.is_dir():
        config, parts, tokenizer = _read_folder(path, dtype)
    else:
        config, parts, tokenizer = _read_single_file(path, dtype)
    config = config.with_prediction_type(prediction_type)
    builders = {"unet": lambda: UNet(config.unet), "vae": lambda: AutoencoderKL(config.vae),
                "text_encoder": lambda: TextEncoder(config.text_encoder)}
    if config.text_encoder_2 is not None:
        builders["text_encoder_2"] = lambda: TextEncoder(config.text_encoder_2, projection=True)
    modules = {}
    for name, build in builders.items():
        # Built without memory (meta tensors) and given the file's tensors, read as `dtype` (memory-mapped where the
        # file has it already, else cast one tensor at a time as they are read): the host never holds a second copy
        # of a network, nor spends time on random init.
        with torch.device("meta"):
            module = build()
        state = {k: v.to(dtype) if v.is_floating_point() else v
                 for k, v in parts.pop(name).items() if k not in _IGNORED_KEYS}
        load_strict(module, state, f"{name} weights of {path}", assign=True)
        del state
        _fill_buffers(module)
        modules[name] = module.to(device=device).eval().requires_grad_(False)
    tokenizer_2 = None
    if config.sdxl:
        tokenizer, tokenizer_2 = tokenizer
    return Components(config, modules["unet"], modules["vae"], modules["text_encoder"], tokenizer, path,
                      modules.get("text_encoder_2"), tokenizer_2)


def _fill_buffers(module: torch.nn.Module) -> None:
    """Buffers outside the state dict, left on the meta device: transformers' CLIP position ids (0..n-1)."""
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        owner = module.get_submodule(name.rpartition(".")[0])
        leaf = name.rpartition(".")[2]
        if leaf != "position_ids":
            raise ModelLoadError(f"{name}: a buffer sdengine cannot rebuild outside the weights file")
        owner.register_buffer(leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)


def _read_folder(root: Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, dict], ClipTokenizer]:
    """Configs, weights (floating-point ones as `dtype`) and tokenizer of a diffusers folder."""
    if not (root / "model_index.json").is_file():
        raise ModelLoadError(f"{root} is a folder without model_index.json: give a diffusers model folder "
                             f"or a single-file .safetensors checkpoint")
    index = read_json(root / "model_index.json")
    pipeline = index.get("_class_name", "")
    if pipeline not in _PIPELINES | SDXL_PIPELINES:
        raise UnsupportedModelError(f"{root} holds a {pipeline or 'unnamed'} model; sdengine runs Stable Diffusion "
                                    f"1.x/2.x and SDXL text-to-image and inpainting models "
                                    f"({', '.join(sorted(_PIPELINES | SDXL_PIPELINES))})")
    sdxl = pipeline in SDXL_PIPELINES
    if sdxl and (index.get("requires_aesthetics_score") or not _listed(index, "text_encoder")):
        raise UnsupportedModelError(f"{root}: {REFINER_REFUSED}")
    if sdxl and not (root / "text_encoder_2" / "config.json").is_file():
        raise ModelLoadError(f"{root} is an SDXL folder ({pipeline}) without text_encoder_2/config.json: the model "
                             f"folder is incomplete")
    config = ModelConfig.from_diffusers_folder(root)
    names = dict(_WEIGHT_FILES, **({"text_encoder_2": "model"} if sdxl else {}))
    parts = {name: _read_folder_weights(root / name, stem, dtype) for name, stem in names.items()}
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name] = _prefixed_text_keys(parts[name])
    parts["vae"] = convert.legacy_vae_names(parts["vae"])
    tokenizer = _folder_tokenizer(root / "tokenizer", EOS_TOKEN)
    if sdxl:
        return config, parts, (tokenizer, _folder_tokenizer(root / "tokenizer_2", "!"))
    return config, parts, tokenizer


def _listed(index: dict, name: str) -> bool:
    """Whether model_index.json lists a component (a refiner lists text_encoder as [null, null])."""
    entry = index.get(name)
    return isinstance(entry, list) and any(e is not None for e in entry)


def _folder_tokenizer(folder: Path, pad_token: str) -> ClipTokenizer:
    """A folder's CLIP tokenizer (its own pad token), else the shipped vocabulary padded with `pad_token`."""
    if (folder / "vocab.json").is_file():
        return ClipTokenizer.from_folder(folder)
    return ClipTokenizer.default(pad_token=pad_token)


def _read_folder_weights(folder: Path, stem: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One component's safetensors (plain, fp16 variant or sharded); pickle-only folders are refused."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.json"):
        if (folder / name).is_file():
            return read_safetensors(folder / name, dtype)
    for suffix in (".bin", ".ckpt", ".pt"):
        if (folder / f"{stem}{suffix}").is_file():
            refuse_pickle(folder / f"{stem}{suffix}")
    raise ModelLoadError(f"{folder} has no {stem}.safetensors: the model folder is incomplete")


def _prefixed_text_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 saves CLIPTextModel keys without the `text_model.` prefix; accept both."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in state.items()}


def _read_single_file(path: Path,
                      dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, dict], ClipTokenizer]:
    """Config inferred from tensor shapes, weights mapped from the original CompVis/Stability layout.

    v-prediction (SD 2.x 768-v) is not visible in the weights: pass prediction_type to load_components.
    """
    refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path} is not a .safetensors file or a diffusers folder")
    state = read_safetensors(path, dtype)
    family = convert.detect_family(state.keys())
    config = convert.infer_config(state)
    parts = convert.original_to_diffusers(state, config)  # the file's tensors, renamed (views, no copies)
    del state
    if family == "sdxl":
        return config, parts, (ClipTokenizer.default(), ClipTokenizer.default(pad_token="!"))
    tokenizer = ClipTokenizer.default() if family == "sd1" else ClipTokenizer.default(pad_token="!")
    return config, parts, tokenizer
