"""diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) on the same weights, eager or compiled:
the comparison subject.

diffusers is not a dependency of sdengine; it is imported here only, when a comparison is asked for.
The pipeline is built as tests/test_pipeline.py builds it for the parity test: from the same diffusers
folder, DDIMScheduler from the folder's scheduler config (the same schedule as ours), no safety
checker; fp32 on the CPU and fp16 on CUDA, as the torch backend loads. Stages mirror the pipeline's
own code (tokenizer, text encoder on 2 rows, its denoise loop, vae.decode + copy to the host); e2e is
the pipeline call itself, prompt to PIL images.

Compiled (a GPU only): channels_last U-Net, then torch.compile on the U-Net alone (diffusers'
documented recipe). The mode defaults to "reduce-overhead": Inductor's default kernels (about 83 s to
compile the SD 1.5 U-Net on an H100, issue 6) plus CUDA graphs, i.e. the "compiled with CUDA graphs"
bar of issue 6; max-autotune takes several times longer to compile and is a --compile-mode away.
The compile happens in the first calls: it shows as the warm-up excess. Unverified on a GPU here.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, InvalidInputError
from .settings import BenchSettings
from .stages import Stages, sample_pixels

INSTALL = "the diffusers comparison needs diffusers: pip install diffusers (and transformers)"


def require_diffusers() -> None:
    """BackendUnavailableError unless diffusers can be imported here."""
    if importlib.util.find_spec("diffusers") is None:
        raise BackendUnavailableError(INSTALL)


def diffusers_folder(path: str | Path) -> Path:
    """The model as a diffusers folder (what from_pretrained reads), or an error saying what to give."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise InvalidInputError(f"--compare diffusers needs the model as a diffusers folder (with model_index.json); "
                                f"{path} is not one")
    return path


def dtype_argument(version: str, dtype: Any) -> dict[str, Any]:
    """from_pretrained's precision argument: `dtype` from diffusers 0.36, `torch_dtype` before (an older
    diffusers ignores `dtype=` with a warning and would load float32: a GPU comparison would then run fp32)."""
    major_minor = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    return {"dtype": dtype} if major_minor >= (0, 36) else {"torch_dtype": dtype}


class DiffusersStages(Stages):
    """Stage and end-to-end calls over diffusers' StableDiffusionPipeline."""

    def __init__(self, model: str | Path, settings: BenchSettings, compiled: bool) -> None:
        super().__init__()
        require_diffusers()
        import diffusers
        import torch
        import transformers

        if settings.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        self.torch, self.s, self.device = torch, settings, torch.device(settings.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        folder = diffusers_folder(model)
        self.sdxl = (folder / "text_encoder_2").is_dir()  # SDXL: StableDiffusionXLPipeline (no safety checker)
        dtype = dtype_argument(diffusers.__version__, self.dtype)
        if self.sdxl:
            pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, **dtype)
            if self.dtype == torch.float16 and pipe.vae.config.force_upcast:
                pipe.vae.to(torch.float32)  # its pipeline upcasts the VAE so, as sdengine's torch backend does
        else:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                folder, safety_checker=None, requires_safety_checker=False, **dtype)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.recipe = "eager"
        if compiled:
            self._compile()
        self.height = settings.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.width = settings.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.rows = [settings.prompt] if settings.guidance == 1.0 else ["", settings.prompt]
        f, c = pipe.vae_scale_factor, pipe.unet.config.in_channels
        noise = torch.randn((1, c, self.height // f, self.width // f), generator=self._generator(), dtype=self.dtype)
        self.latents = noise.to(self.device) * pipe.scheduler.init_noise_sigma

    def _compile(self) -> None:
        mode = self.s.effective_compile_mode
        if self.device.type == "cuda":
            self.pipe.unet.to(memory_format=self.torch.channels_last)
        self.pipe.unet = self.torch.compile(self.pipe.unet, mode=mode)
        self.recipe = f"torch.compile(unet, mode={mode!r})" + (" on a channels_last U-Net"
                                                                if self.device.type == "cuda" else "")

    def wait(self, _value: Any) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _generator(self) -> Any:
        return self.torch.Generator("cpu").manual_seed(self.s.seed)

    def e2e(self, batch: int) -> Any:
        s = self.s
        return self.pipe(s.prompt, negative_prompt="" if s.guidance != 1.0 else None, height=self.height,
                         width=self.width, num_inference_steps=s.steps, guidance_scale=s.guidance,
                         num_images_per_prompt=batch, generator=self._generator(), output_type="pil").images

    def tokenize(self) -> Any:
        toks = (self.pipe.tokenizer, self.pipe.tokenizer_2) if self.sdxl else (self.pipe.tokenizer,)
        ids = tuple(tok(self.rows, padding="max_length", max_length=tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids for tok in toks)
        return ids if self.sdxl else ids[0]

    def encode(self) -> Any:
        with self.torch.no_grad():
            if self.sdxl:
                return self._encode_sdxl()
            return self.pipe.text_encoder(self.ids.to(self.device))[0]

    def _encode_sdxl(self) -> Any:
        """As StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate hidden states concatenated, the
        second's projected pooled output, and _get_add_time_ids' default (h, w, 0, 0, h, w)."""
        pipe, hidden = self.pipe, []
        for ids, encoder in zip(self.ids, (pipe.text_encoder, pipe.text_encoder_2)):
            out = encoder(ids.to(self.device), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        time_ids = self.torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]] * len(self.rows),
                                     dtype=self.dtype, device=self.device)
        return self.torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}

    def denoise(self) -> Any:
        """The pipeline's loop (DDIM, eta 0, guidance), as in StableDiffusionPipeline.__call__."""
        pipe, g = self.pipe, self.s.guidance
        with self.torch.no_grad():
            pipe.scheduler.set_timesteps(self.s.steps, device=self.device)
            latents = self.latents
            for t in pipe.scheduler.timesteps:
                x = self.torch.cat([latents] * 2) if g != 1.0 else latents
                x = pipe.scheduler.scale_model_input(x, t)
                if self.sdxl:
                    context, added = self.context
                    out = pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]
                else:
                    out = pipe.unet(x, t, encoder_hidden_states=self.context, return_dict=False)[0]
                if g != 1.0:
                    uncond, cond = out.chunk(2)
                    out = uncond + g * (cond - uncond)
                latents = pipe.scheduler.step(out, t, latents, return_dict=False)[0]
        return latents

    def decode(self) -> Any:
        vae = self.pipe.vae
        with self.torch.no_grad():
            latents = (self.final / vae.config.scaling_factor).to(vae.dtype)
            return vae.decode(latents, return_dict=False)[0].float().cpu()

    def encode_image(self) -> Any:
        vae = self.pipe.vae
        pixels = self.torch.from_numpy(sample_pixels(self.height, self.width)).to(self.device, vae.dtype)
        with self.torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            scale = vae.config.scaling_factor
            return (dist.mean * scale).float().cpu(), (dist.std * scale).float().cpu()

    def info(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "text_rows": len(self.rows), "recipe": self.recipe,
                "scheduler": type(self.pipe.scheduler).__name__, "dtype": str(self.dtype).replace("torch.", "")}
