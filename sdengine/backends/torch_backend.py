"""The PyTorch reference backend: CPU fp32 or CUDA fp16, with an opt-in fast path (torch_fast.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import lora as sdlora
from ..errors import InvalidInputError
from ..lora import LoraFile
from ..models.loading import Components, load_components
from ..models.step import CachedStep, DenoiseStep
from ..samplers import Schedule
from ..stepcache import StepCache, cache_split
from . import AddedConditioning, ImageCondition, StepCallback, reject_unknown_options
from .torch_fast import OPTION_NAMES, FastOptions, FastPath, LoopInputs, parse_options, run_cached_loop, run_loop


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(value: Any) -> torch.dtype | None:
    """A torch dtype, or its name as given on a command line (--option dtype=float16)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.strip().lower() in _DTYPES:
        return _DTYPES[value.strip().lower()]
    raise InvalidInputError(f"torch backend option dtype must be one of {', '.join(_DTYPES)}, got {value!r}")


class TorchBackend:
    """Runs the reference modules; the whole loop stays on the device, one host copy in and out.

    With no fast-path option the loop below is the reference every other path is checked against;
    channels_last, compile and cuda_graph (torch_fast.py) only change how the same modules run.
    """

    def __init__(self, components: Components, device: str, options: FastOptions | None = None) -> None:
        self.components = components
        self.config = components.config
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2  # SDXL
        self.device = torch.device(device)
        self.dtype = next(components.unet.parameters()).dtype
        self.step = DenoiseStep(components.unet)
        self._cached_steps: dict[int, tuple[CachedStep, CachedStep]] = {}  # step caching: branch -> (full, shallow)
        self.options = options or FastOptions()
        self.fast = None
        self._vae_fp32: Any = None  # a float32 copy of the VAE, made on the first non-finite fp16 decode
        # SDXL's VAE overflows in fp16: diffusers' SDXL pipeline decodes in fp32 when the VAE config says force_upcast.
        self.upcast_vae = self.config.sdxl and self.config.vae.force_upcast and self.dtype != torch.float32
        self._lora_base: dict[str, torch.Tensor] = {}  # pristine CPU copies of the weights LoRAs now change
        if self.options.active:
            self.fast = FastPath(components.unet, components.vae, self.config.vae.scaling_factor, self.dtype,
                                 self.options)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             prediction_type: str | None = None, channels_last: Any = False, compile: Any = False,
             cuda_graph: Any = False, compile_backend: Any = "inductor", threads: int | None = None,
             **unknown: Any) -> "TorchBackend":
        """Load weights to `device`: fp32 on the CPU and fp16 on CUDA unless `dtype` says otherwise.

        channels_last, compile (True or a torch.compile mode) and cuda_graph select the fast path;
        threads sets torch's CPU threads for the whole process.
        """
        reject_unknown_options("torch", unknown, ("dtype", "prediction_type", "threads", *OPTION_NAMES))
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise InvalidInputError(f"torch backend option threads must be an integer >= 1, got {threads!r}")
            torch.set_num_threads(threads)  # process-wide: torch has one intra-op pool
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidInputError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
        if device != "cpu" and not device.startswith("cuda"):
            raise InvalidInputError(f"unknown device {device!r}; use cpu or cuda")
        options = parse_options(device, channels_last=channels_last, compile=compile, cuda_graph=cuda_graph,
                                compile_backend=compile_backend)
        dtype = _dtype(dtype) or (torch.float16 if device.startswith("cuda") else torch.float32)
        components = load_components(path, device=device, dtype=dtype, prediction_type=prediction_type)
        return cls(components, device, options)

    def _lora_params(self) -> dict[str, torch.nn.Parameter]:
        return {f"{component}.{name}": p for component in ("unet", "text_encoder", "text_encoder_2")
                if getattr(self.components, component) is not None
                for name, p in getattr(self.components, component).named_parameters()}

    def lora_targets(self) -> dict[str, tuple[int, ...]]:
        """{`unet.<parameter>` / `text_encoder.<parameter>`: shape} of the weights a LoRA may change."""
        return {name: tuple(p.shape) for name, p in self._lora_params().items()}

    @torch.inference_mode()
    def set_loras(self, loras: Sequence[tuple[LoraFile, float]]) -> None:
        """Merge `loras` (file, scale) into the weights in place, from kept copies of the pristine tensors:
        weights no LoRA of the new set touches get their base back; `[]` restores the model."""
        params = self._lora_params()
        for lora, _ in loras:
            for name in lora.targets - set(self._lora_base):
                self._lora_base[name] = params[name].detach().to("cpu", copy=True)
        base = {name: t.float().numpy() for name, t in self._lora_base.items()}
        merged = sdlora.merge(base, loras)
        for name in list(self._lora_base):
            if name not in merged:
                params[name].copy_(self._lora_base.pop(name))
        for name, array in merged.items():
            params[name].copy_(torch.from_numpy(array).to(params[name].dtype))

    def _tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype)

    @torch.inference_mode()
    def encode_text(self, input_ids: np.ndarray, clip_skip: int = 0) -> torch.Tensor:
        """Token ids [R, 77] -> embeddings [R, 77, D] (clip_skip: of layer -1-clip_skip, as diffusers)."""
        return self.components.text_encoder(self._tensor(input_ids, torch.long), clip_skip)

    @torch.inference_mode()
    def encode_text_sdxl(self, ids: np.ndarray, ids_2: np.ndarray,
                         clip_skip: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SDXL: token ids [R, 77] of each tokenizer -> both encoders' hidden states of layer -2-clip_skip
        ([R, 77, D1], [R, 77, D2]) and text_encoder_2's pooled, projected output [R, P], float32 on the host."""
        c = self.components
        hidden, _ = c.text_encoder.penultimate(self._tensor(ids, torch.long), clip_skip)
        hidden_2, pooled = c.text_encoder_2.penultimate(self._tensor(ids_2, torch.long), clip_skip)
        return tuple(t.float().cpu().numpy() for t in (hidden, hidden_2, pooled))

    @torch.inference_mode()
    def add_token_embeddings(self, vectors: np.ndarray, vectors_2: np.ndarray | None = None) -> Any:
        """Append textual inversion vectors [n, D] to the text encoder's token table; the first new row's id.
        SDXL: `vectors_2` [n, D2] to text_encoder_2's as well, and the first new row of each table."""
        from ..embeddings import extended_table

        encoders = [self.components.text_encoder] + ([self.components.text_encoder_2] if self.config.sdxl else [])
        given = [vectors, vectors_2][:len(encoders)]
        if any(v is None for v in given):
            raise InvalidInputError("an SDXL model takes two sets of textual inversion vectors, one per text encoder")
        embs = [encoder.text_model.embeddings.token_embedding for encoder in encoders]
        tables = [extended_table(e.weight.detach().float().cpu().numpy(), np.asarray(v, np.float32))
                  for e, v in zip(embs, given)]  # every width checked before any table changes
        starts = []
        for emb, table in zip(embs, tables):
            old = emb.weight.detach()
            starts.append(old.shape[0])
            emb.weight = torch.nn.Parameter(torch.from_numpy(table).to(old.device, old.dtype), requires_grad=False)
            emb.num_embeddings = table.shape[0]
        return tuple(starts) if self.config.sdxl else starts[0]

    def text_to_host(self, context: torch.Tensor) -> np.ndarray:
        """encode_text's output as float32 numpy [R, 77, D]."""
        return context.float().cpu().numpy()

    @torch.inference_mode()
    def denoise(self, latents: np.ndarray, context: Any, schedule: Schedule, guidance_scale: float,
                noise: np.ndarray | None, callback: StepCallback | None = None,
                condition: ImageCondition | None = None, added: AddedConditioning | None = None,
                cache: StepCache | None = None) -> torch.Tensor:
        """Every row of `schedule` from the initial latents [B,C,h,w]; the final latents on the device.

        `context`: encode_text's output, or host embeddings [R, 77k, D] (long or weighted prompts); `added`:
        an SDXL U-Net's pooled text and time ids; `cache`: step caching (sdengine.stepcache)."""
        if self.config.sdxl != (added is not None):
            raise InvalidInputError("an SDXL model needs text_embeds and time_ids (AddedConditioning), and only an "
                                    "SDXL model takes them")
        if isinstance(context, np.ndarray):
            context = self._tensor(context, self.dtype)
        state = np.zeros((schedule.slots, *np.shape(latents)), np.float32)
        state[0] = latents
        f32 = lambda a: None if a is None else self._tensor(a, torch.float32)  # noqa: E731
        c = condition
        inputs = LoopInputs(f32(state), context, f32(schedule.timesteps), f32(schedule.coefficients),
                            torch.tensor(guidance_scale, dtype=torch.float32, device=self.device), f32(noise),
                            *((None,) * 4 if c is None else (f32(c.mask), f32(c.known), f32(c.known_noise),
                                                             f32(c.blend))),
                            *((None, None) if added is None else (self._tensor(added.text_embeds, self.dtype),
                                                                  f32(added.time_ids))))
        if cache is not None:
            final = self._denoise_cached(inputs, cache, callback)
        else:
            final = run_loop(self.step, inputs, callback) if self.fast is None else self.fast.denoise(inputs, callback)
        return final[0]

    def _denoise_cached(self, inputs: LoopInputs, cache: StepCache, callback: StepCallback | None) -> torch.Tensor:
        """The loop alternating the full and shallow steps of `cache` (built once per branch)."""
        if self.fast is not None:
            return self.fast.denoise_cached(inputs, cache, callback)
        if cache.branch not in self._cached_steps:
            split = cache_split(self.config.unet, cache.branch)
            self._cached_steps[cache.branch] = (CachedStep(self.components.unet, split, shallow=False),
                                                CachedStep(self.components.unet, split, shallow=True))
        full, shallow = self._cached_steps[cache.branch]
        return run_cached_loop(full, shallow, inputs, cache, callback)

    @torch.inference_mode()
    def encode_image(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images [B,3,H,W] in [-1, 1] -> scaled mean and std of q(z|x) (Kingma & Welling 2014), on the host."""
        if self.upcast_vae:  # SDXL's force_upcast, as diffusers' SDXL img2img encodes
            mean, logvar = self._float_vae().encode(self._tensor(images, torch.float32))
        else:
            mean, logvar = self.components.vae.encode(self._tensor(images, self.dtype))
        sf = self.config.vae.scaling_factor
        return (mean.float() * sf).cpu().numpy(), (torch.exp(0.5 * logvar.float()) * sf).cpu().numpy()

    @property
    def can_decode_fp32(self) -> bool:
        """A float32 retry differs from the normal decode only when the VAE runs in a lower precision."""
        return self.dtype != torch.float32

    @property
    def fp32_advice(self) -> str:
        return "the VAE produced them in float32: the checkpoint's VAE weights are broken or overflow"

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, fp32: bool = False) -> np.ndarray:
        """fp32 (or an SDXL VAE whose config sets force_upcast, in a lower precision): decode in float32."""
        if (fp32 or self.upcast_vae) and self.can_decode_fp32:
            z = latents.float() / self.config.vae.scaling_factor
            return self._float_vae().decode(z).float().cpu().numpy()
        if self.fast is not None:
            return self.fast.decode(latents).float().cpu().numpy()
        z = latents / self.config.vae.scaling_factor
        return self.components.vae.decode(z.to(self.dtype)).float().cpu().numpy()

    def _float_vae(self) -> Any:
        """A float32 copy of the VAE, made once."""
        if self._vae_fp32 is None:
            self._vae_fp32 = copy.deepcopy(self.components.vae).float()
        return self._vae_fp32

    def close(self) -> None:
        """Release captured CUDA graphs and their memory pools (the modules stay loaded)."""
        if self.fast is not None:
            self.fast.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
