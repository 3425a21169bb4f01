"""The denoise step as one module: U-Net, classifier-free guidance and the sampler's update.

This is the graph the ONNX and TensorRT paths export, so every backend does the same arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import UNet, guidance_embedding


def guide(unet: UNet, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
          guidance_scale: torch.Tensor) -> torch.Tensor:
    """The guided model output m = m_u + g (m_c - m_u) in fp32 (Ho & Salimans 2022, eq. 6).

    context holds 2B rows (unconditional first) for guidance, or B rows for the conditional output
    alone; an LCM U-Net gets g through its guidance embedding instead.
    """
    guided = context.shape[0] == 2 * x.shape[0]
    rows = torch.cat([x, x]) if guided else x
    dtype = next(unet.parameters()).dtype
    cond = None
    if unet.takes_guidance:
        scale = guidance_scale.reshape(-1)[:1].expand(rows.shape[0])
        cond = guidance_embedding(scale, unet.cfg.time_cond_proj_dim)
    out = unet(rows.to(dtype), timestep, context.to(dtype), cond).float()
    if not guided:
        return out
    uncond, cond_out = out.chunk(2)
    return uncond + guidance_scale.float() * (cond_out - uncond)


def update(state: torch.Tensor, m: torch.Tensor, coefficients: torch.Tensor,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """state' = A state + b m + c z over S slots (sdengine.samplers.table), in fp32."""
    s = state.shape[0]
    a = coefficients[: s * s].reshape(s, s)
    b, c = coefficients[s * s: s * s + s], coefficients[s * s + s:]
    flat = state.reshape(s, -1)
    nxt = a @ flat + b[:, None] * m.reshape(1, -1)
    if noise is not None:
        nxt = nxt + c[:, None] * noise.reshape(1, -1)
    return nxt.reshape(state.shape)


class DenoiseStep(nn.Module):
    """state [S,B,C,h,w] -> A state + b m + c z with m the guided U-Net output on slot 0 (DESIGN.md)."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, state: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                guidance_scale: torch.Tensor, coefficients: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """state fp32, context [2B,77,D] (unconditional rows first) or [B,77,D] for no guidance."""
        m = guide(self.unet, state[0], timestep, context, guidance_scale)
        return update(state, m, coefficients, noise)
