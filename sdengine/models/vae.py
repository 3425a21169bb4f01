"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3.1, app. G).

Attribute names follow diffusers' AutoencoderKL. `decode` maps scaled latents' inverse to images in
[-1, 1]; `encode` maps images to the latent Gaussian's mean and log-variance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .layers import Downsample, ResnetBlock, Upsample, VAEAttention

_EPS = 1e-6


class VAEBlock(nn.Module):
    """Resnets then an optional resampler (diffusers DownEncoderBlock2D / UpDecoderBlock2D)."""

    def __init__(self, in_chs: list[int], out_ch: int, groups: int, resample: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, out_ch, groups, _EPS) for c in in_chs])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_ch, asymmetric_pad=True)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class VAEMidBlock(nn.Module):
    """Resnet, single-head self-attention, resnet."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups, _EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    """Image [B,3,H,W] in [-1,1] -> Gaussian moments [B,2C,H/f,W/f]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs, n, groups = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(3, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            VAEBlock([chs[max(i - 1, 0)]] + [chs[i]] * (cfg.layers_per_block - 1), chs[i], groups,
                     "down" if i < n - 1 else None) for i in range(n))
        self.mid_block = VAEMidBlock(chs[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latent [B,C,h,w] -> image [B,3,h*f,w*f] in about [-1,1]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        rev, n, groups = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rev[0], groups)
        self.up_blocks = nn.ModuleList(
            VAEBlock([rev[max(i - 1, 0)]] + [rev[i]] * cfg.layers_per_block, rev[i], groups,
                     "up" if i < n - 1 else None) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(rev[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Encoder and decoder with their 1x1 quant convs; latents here are unscaled."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x), log-variance clamped to [-30, 20] as in LDM."""
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)
