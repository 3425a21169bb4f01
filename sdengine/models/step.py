"""The denoise step as one module: U-Net, classifier-free guidance, the sampler's update and the inpainting blend.

This is the graph the ONNX and TensorRT paths export, so every backend does the same arithmetic.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..stepcache import CacheSplit
from .unet import UNet, guidance_embedding


def guide(unet: UNet, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
          guidance_scale: torch.Tensor, text_embeds: torch.Tensor | None = None,
          time_ids: torch.Tensor | None = None, call: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """The guided model output m = m_u + g (m_c - m_u) in fp32 (Ho & Salimans 2022, eq. 6).

    context holds 2B rows (unconditional first) for guidance, or B rows for the conditional output
    alone; an LCM U-Net gets g through its guidance embedding instead. `x` is the U-Net's whole input
    (an inpainting U-Net's 9 channels included). `call` runs in the U-Net's place, with its arguments (step
    caching's full and shallow passes).
    """
    guided = context.shape[0] == 2 * x.shape[0]
    rows = torch.cat([x, x]) if guided else x
    dtype = next(unet.parameters()).dtype
    cond = None
    if unet.takes_guidance:
        scale = guidance_scale.reshape(-1)[:1].expand(rows.shape[0])
        cond = guidance_embedding(scale, unet.cfg.time_cond_proj_dim)
    added = {} if text_embeds is None else {"text_embeds": text_embeds.to(dtype), "time_ids": time_ids}
    out = (unet if call is None else call)(rows.to(dtype), timestep, context.to(dtype), cond, **added).float()
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


def blend_known(state: torch.Tensor, mask: torch.Tensor, known: torch.Tensor, known_noise: torch.Tensor,
                blend: torch.Tensor) -> torch.Tensor:
    """Inpainting with a plain U-Net: slot 0 += (1 - mask) (p x0 + q z0 - r slot 0), the known region
    re-imposed at the level of the next row (diffusers' StableDiffusionInpaintPipeline, 4 channels)."""
    x = state[0]
    delta = (1.0 - mask) * (blend[0] * known + blend[1] * known_noise - blend[2] * x)
    first = torch.zeros((state.shape[0],) + (1,) * (state.dim() - 1), dtype=state.dtype, device=state.device)
    first[0] = 1.0
    return state + first * delta.unsqueeze(0)


class DenoiseStep(nn.Module):
    """state [S,B,C,h,w] -> A state + b m + c z with m the guided U-Net output on slot 0 (DESIGN.md), then
    the inpainting blend when `blend` is given. An inpainting U-Net (9 input channels) reads slot 0, the
    mask and the masked image's latent (`known`) concatenated, as diffusers does."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet
        self.inpainting = unet.cfg.in_channels != unet.cfg.out_channels

    def forward(self, state: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                guidance_scale: torch.Tensor, coefficients: torch.Tensor, noise: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, known: torch.Tensor | None = None,
                known_noise: torch.Tensor | None = None, blend: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """state fp32, context [2B,77,D] (unconditional rows first) or [B,77,D] for no guidance; SDXL: text_embeds
        [R,P] and time_ids [R,6] in the context's row order."""
        x = state[0]
        if self.inpainting:
            x = torch.cat([x, mask, known], dim=1)
        m = guide(self.unet, x, timestep, context, guidance_scale, text_embeds, time_ids)
        nxt = update(state, m, coefficients, noise)
        if blend is None:
            return nxt
        return blend_known(nxt, mask, known, known_noise, blend)


class CachedStep(nn.Module):
    """Step caching's two step graphs (sdengine.stepcache): DenoiseStep with the full U-Net returning
    (next_state, deep feature [R,C,h',w'] fp32), or (`shallow`) with the shallow branch reading that feature
    as its last input. The same guidance, sampler update and inpainting blend as DenoiseStep."""

    def __init__(self, unet: UNet, split: CacheSplit, shallow: bool) -> None:
        super().__init__()
        self.unet, self.split, self.shallow = unet, split, shallow
        self.inpainting = unet.cfg.in_channels != unet.cfg.out_channels

    def forward(self, state: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                guidance_scale: torch.Tensor, coefficients: torch.Tensor, noise: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, known: torch.Tensor | None = None,
                known_noise: torch.Tensor | None = None, blend: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                feature: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = state[0]
        if self.inpainting:
            x = torch.cat([x, mask, known], dim=1)
        kept: list[torch.Tensor] = []
        if self.shallow:
            if feature is None:
                raise ValueError("the shallow step needs the feature of the last full step")

            def call(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
                return self.unet(*args, split=self.split, feature=feature, **kwargs)
        else:
            def call(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
                out, deep = self.unet(*args, split=self.split, **kwargs)
                kept.append(deep)
                return out
        m = guide(self.unet, x, timestep, context, guidance_scale, text_embeds, time_ids, call)
        nxt = update(state, m, coefficients, noise)
        if blend is not None:
            nxt = blend_known(nxt, mask, known, known_noise, blend)
        return nxt if self.shallow else (nxt, kept[0].float())
