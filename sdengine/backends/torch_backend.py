"""The PyTorch reference backend: CPU fp32 or CUDA fp16, with an opt-in fast path (torch_fast.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from ..models.loading import Components, load_components
from ..models.step import DenoiseStep
from ..schedulers import Schedule
from . import StepCallback
from .torch_fast import OPTION_NAMES, FastOptions, FastPath, LoopInputs, parse_options, run_loop


class TorchBackend:
    """Runs the reference modules; the whole loop stays on the device, one host copy in and out.

    With no fast-path option the loop below is the reference every other path is checked against;
    channels_last, compile and cuda_graph (torch_fast.py) only change how the same modules run.
    """

    def __init__(self, components: Components, device: str, options: FastOptions | None = None) -> None:
        self.components = components
        self.config = components.config
        self.tokenizer = components.tokenizer
        self.device = torch.device(device)
        self.dtype = next(components.unet.parameters()).dtype
        self.step = DenoiseStep(components.unet)
        self.options = options or FastOptions()
        self.fast = None
        if self.options.active:
            self.fast = FastPath(components.unet, components.vae, self.config.vae.scaling_factor, self.dtype,
                                 self.options)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             prediction_type: str | None = None, channels_last: Any = False, compile: Any = False,
             cuda_graph: Any = False, compile_backend: Any = "inductor", **unknown: Any) -> "TorchBackend":
        """Load weights to `device`: fp32 on the CPU and fp16 on CUDA unless `dtype` says otherwise.

        channels_last, compile (True or a torch.compile mode) and cuda_graph select the fast path.
        """
        if unknown:
            raise InvalidInputError(f"unknown torch backend option(s) {', '.join(sorted(unknown))}; it takes "
                                    f"dtype, prediction_type, {', '.join(OPTION_NAMES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidInputError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
        if device != "cpu" and not device.startswith("cuda"):
            raise InvalidInputError(f"unknown device {device!r}; use cpu or cuda")
        options = parse_options(device, channels_last=channels_last, compile=compile, cuda_graph=cuda_graph,
                                compile_backend=compile_backend)
        dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        components = load_components(path, device=device, dtype=dtype, prediction_type=prediction_type)
        return cls(components, device, options)

    def _tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype)

    @torch.inference_mode()
    def encode_text(self, input_ids: np.ndarray) -> torch.Tensor:
        return self.components.text_encoder(self._tensor(input_ids, torch.long))

    @torch.inference_mode()
    def denoise(self, latents: np.ndarray, context: Any, schedule: Schedule, guidance_scale: float,
                noise: np.ndarray | None, callback: StepCallback | None = None) -> torch.Tensor:
        x = self._tensor(latents, torch.float32)
        timesteps = self._tensor(schedule.timesteps)
        rows = self._tensor(schedule.coefficients, torch.float32)
        steps_noise = None if noise is None else self._tensor(noise, torch.float32)
        scale = torch.tensor(guidance_scale, dtype=torch.float32, device=self.device)
        inputs = LoopInputs(x, context, timesteps, rows, scale, steps_noise)
        if self.fast is not None:
            return self.fast.denoise(inputs, callback)
        return run_loop(self.step, inputs, callback)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        if self.fast is not None:
            return self.fast.decode(latents).cpu().numpy()
        z = latents / self.config.vae.scaling_factor
        return self.components.vae.decode(z.to(self.dtype)).float().cpu().numpy()

    def close(self) -> None:
        """Release captured CUDA graphs and their memory pools (the modules stay loaded)."""
        if self.fast is not None:
            self.fast.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
