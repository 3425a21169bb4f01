"""The denoise step as one module: U-Net, classifier-free guidance and the scheduler update.

This is the graph the ONNX and TensorRT paths export, so every backend does the same arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import UNet


class DenoiseStep(nn.Module):
    """x' = a x + b m + c noise with m = m_u + g (m_c - m_u) (Ho & Salimans 2022, eq. 6; DESIGN.md)."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                guidance_scale: torch.Tensor, coefficients: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """latent [B,C,h,w] fp32, context [2B,77,D] (unconditional rows first) or [B,77,D] for no guidance."""
        guided = context.shape[0] == 2 * latent.shape[0]
        x = torch.cat([latent, latent]) if guided else latent
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(x.to(dtype), timestep, context.to(dtype)).float()
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale.float() * (cond - uncond)
        nxt = coefficients[0] * latent + coefficients[1] * out
        return nxt if noise is None else nxt + coefficients[2] * noise
