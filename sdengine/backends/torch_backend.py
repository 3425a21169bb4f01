"""The PyTorch reference backend: CPU fp32 or CUDA fp16."""

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


class TorchBackend:
    """Runs the reference modules; the whole loop stays on the device, one host copy in and out."""

    def __init__(self, components: Components, device: str) -> None:
        self.components = components
        self.config = components.config
        self.tokenizer = components.tokenizer
        self.device = torch.device(device)
        self.dtype = next(components.unet.parameters()).dtype
        self.step = DenoiseStep(components.unet)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             prediction_type: str | None = None) -> "TorchBackend":
        """Load weights to `device`: fp32 on the CPU and fp16 on CUDA unless `dtype` says otherwise."""
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidInputError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
        if device != "cpu" and not device.startswith("cuda"):
            raise InvalidInputError(f"unknown device {device!r}; use cpu or cuda")
        dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        return cls(load_components(path, device=device, dtype=dtype, prediction_type=prediction_type), device)

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
        for i in range(schedule.num_steps):
            x = self.step(x, timesteps[i], context, scale, rows[i], None if steps_noise is None else steps_noise[i])
            if callback is not None:
                callback(i + 1, schedule.num_steps)
        return x

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        z = latents / self.config.vae.scaling_factor
        return self.components.vae.decode(z.to(self.dtype)).float().cpu().numpy()
