"""The SD 1.x/2.x and SDXL conditional U-Net eps_theta(z_t, t, tau(y)) (Rombach et al. 2022, sec. 3.3;
Podell et al. 2023, sec. 2.1-2.2: several transformer layers per block, no attention at the top level, and the
"text_time" embedding of the pooled text and the size/crop micro-conditioning added to the timestep embedding).

Attribute names follow diffusers' UNet2DConditionModel, so its checkpoints load by a strict match.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from ..stepcache import CacheSplit
from .layers import Attention, Downsample, ResnetBlock, Upsample


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017, sec. 3.5; DDPM's time input)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): proj to 2x width, x * gelu(gate)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width (keys net.0.proj, net.2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, feed-forward (LDM's BasicTransformerBlock)."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, transformer blocks over the H*W tokens, project out, residual."""

    def __init__(self, ch: int, heads: int, cfg: UNetConfig, depth: int = 1) -> None:
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(ch, heads, cfg.cross_attention_dim, cfg.upcast_attention) for _ in range(depth)])
        self.proj_out = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)
        if not self.linear:
            t = self.proj_in(t)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)
        if self.linear:
            t = self.proj_out(t)
        t = t.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not self.linear:
            t = self.proj_out(t)
        return x + t


class UNetBlock(nn.Module):
    """One down or up level: resnets, each optionally followed by a spatial transformer, then a resampler."""

    def __init__(self, in_chs: list[int], out_ch: int, heads: int, cfg: UNetConfig, attention: bool,
                 resample: str | None, depth: int = 1) -> None:
        super().__init__()
        groups, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nn.ModuleList([ResnetBlock(c, out_ch, groups, eps, temb) for c in in_chs])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_ch, heads, cfg, depth) for _ in in_chs] if attention else [])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_ch)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[i](x, temb)
        return self.attentions[i](x, context) if len(self.attentions) else x


class MidBlock(nn.Module):
    """Resnet, spatial transformer, resnet at the lowest resolution."""

    def __init__(self, ch: int, heads: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(ch, ch, cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(ch, heads, cfg, cfg.transformer_layers[-1])])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


def guidance_embedding(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's embedding of the guidance scale w = g - 1: sin/cos of 1000 w at geometric frequencies
    (Luo et al. 2023, after VDM's timestep embedding), [B, dim]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=scale.device) * -(math.log(10000.0) / (half - 1)))
    args = ((scale.float().reshape(-1) - 1.0) * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """Two linear layers with SiLU on the sinusoidal timestep features (keys linear_1, linear_2); LCM's
    U-Nets add a projection of the guidance embedding first (cond_proj)."""

    def __init__(self, dim: int, out: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, out)
        self.linear_2 = nn.Linear(out, out)
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet(nn.Module):
    """eps_theta(latent [B,C,h,w], timestep [B] or scalar, text [B,77,D]) -> eps or v [B,C,h,w]."""

    @property
    def takes_guidance(self) -> bool:
        """An LCM-distilled U-Net: the guidance scale goes in as an embedding, not as two passes."""
        return self.cfg.time_cond_proj_dim is not None

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chs, n, layers = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], cfg.time_embed_dim, cfg.time_cond_proj_dim)
        if cfg.text_time:  # SDXL: [pooled text, sinusoidal features of the 6 size/crop numbers] -> temb
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            in_ch = chs[max(i - 1, 0)]
            self.down_blocks.append(UNetBlock([in_ch] + [chs[i]] * (layers - 1), chs[i], cfg.num_heads[i], cfg,
                                              cfg.attention[i], "down" if i < n - 1 else None,
                                              cfg.transformer_layers[i]))
        self.mid_block = MidBlock(chs[-1], cfg.num_heads[-1], cfg)
        self.up_blocks = nn.ModuleList()
        rev, rev_heads, rev_attn = chs[::-1], cfg.num_heads[::-1], cfg.attention[::-1]
        rev_depth = cfg.transformer_layers[::-1]
        for i in range(n):
            prev, out, skip_in = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)]
            in_chs = [(prev if j == 0 else out) + (skip_in if j == layers else out) for j in range(layers + 1)]
            self.up_blocks.append(UNetBlock(in_chs, out, rev_heads[i], cfg, rev_attn[i],
                                            "up" if i < n - 1 else None, rev_depth[i]))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                timestep_cond: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, split: CacheSplit | None = None,
                feature: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """timestep_cond: an LCM U-Net's guidance embedding [B, time_cond_proj_dim] (guidance_embedding);
        text_embeds [B, P] and time_ids [B, 6]: an SDXL U-Net's pooled text and micro-conditioning. With `split`
        (step caching): forward_full, or forward_shallow given the `feature`, called through the module so that
        tracing names their nodes as the U-Net's (an fp16 export finds its body by that name)."""
        if split is not None:
            if feature is None:
                return self.forward_full(sample, timestep, context, timestep_cond, text_embeds, time_ids, split=split)
            return self.forward_shallow(sample, timestep, context, timestep_cond, text_embeds, time_ids, split=split,
                                        feature=feature)
        temb = self._embedding(sample, timestep, timestep_cond, text_embeds, time_ids)
        skips = self._down(self.conv_in(sample), temb, context)
        x, _ = self._up(self.mid_block(skips[-1], temb, context), skips, temb, context)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forward_full(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                     timestep_cond: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                     time_ids: torch.Tensor | None = None, *, split: CacheSplit) -> tuple[torch.Tensor, torch.Tensor]:
        """forward, and the deep feature step caching keeps: the input of up-path op split.up_start
        (sdengine.stepcache; DeepCache's full step)."""
        temb = self._embedding(sample, timestep, timestep_cond, text_embeds, time_ids)
        skips = self._down(self.conv_in(sample), temb, context)
        x = self.mid_block(skips[-1], temb, context)
        x, feature = self._up(x, skips, temb, context, capture=split.up_start)
        return self.conv_out(F.silu(self.conv_norm_out(x))), feature

    def forward_shallow(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                        timestep_cond: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                        time_ids: torch.Tensor | None = None, *, split: CacheSplit,
                        feature: torch.Tensor) -> torch.Tensor:
        """The shallow branch: conv_in, the first split.down_ops down layers, then the up path from op
        split.up_start on, reading the cached `feature` where the deeper layers' output would be."""
        temb = self._embedding(sample, timestep, timestep_cond, text_embeds, time_ids)
        skips = self._down(self.conv_in(sample), temb, context, split.down_ops)
        x, _ = self._up(feature.to(sample.dtype), skips, temb, context, start=split.up_start)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def _embedding(self, sample: torch.Tensor, timestep: torch.Tensor, timestep_cond: torch.Tensor | None,
                   text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> torch.Tensor:
        """The timestep embedding (plus LCM's guidance and SDXL's added embedding) every resnet reads."""
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        t = timestep_embedding(timestep, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos,
                               self.cfg.freq_shift)
        cond = None if timestep_cond is None else timestep_cond.to(sample.dtype)
        temb = self.time_embedding(t.to(sample.dtype), cond)
        if self.cfg.text_time:
            temb = temb + self.added_embedding(text_embeds, time_ids, sample.dtype)
        return temb

    def _down(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
              count: int | None = None) -> list[torch.Tensor]:
        """conv_in's output and each down layer's (resnet+attention, or downsampler): the skips; only the
        first `count` down layers when given. The last skip is the mid block's input."""
        skips = [x]
        for block in self.down_blocks:
            for i in range(len(block.resnets)):
                if count is not None and len(skips) > count:
                    return skips
                x = block.layer(i, x, temb, context)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                if count is not None and len(skips) > count:
                    return skips
                x = block.downsamplers[0](x)
                skips.append(x)
        return skips

    def _up(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
            start: int = 0, capture: int = -1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The up path from op `start` on (earlier ops are skipped, their skips not read), popping `skips`;
        with `capture`, also the input of op number `capture`."""
        index, feature = 0, None
        for block in self.up_blocks:
            for i in range(len(block.resnets)):
                if index == capture:
                    feature = x
                if index >= start:
                    x = block.layer(i, torch.cat([x, skips.pop()], dim=1), temb, context)
                index += 1
            if hasattr(block, "upsamplers"):
                if index == capture:
                    feature = x
                if index >= start:
                    x = block.upsamplers[0](x, size=tuple(skips[-1].shape[-2:]))
                index += 1
        return x, feature

    def added_embedding(self, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None,
                        dtype: torch.dtype) -> torch.Tensor:
        """SDXL's add_embedding of [text_embeds, sinusoidal(time_ids) per number] (diffusers' "text_time")."""
        if text_embeds is None or time_ids is None:
            raise ValueError("an SDXL (text_time) U-Net needs text_embeds and time_ids")
        b = time_ids.shape[0]
        feats = timestep_embedding(time_ids.reshape(-1), self.cfg.addition_time_embed_dim, self.cfg.flip_sin_to_cos,
                                   self.cfg.freq_shift).reshape(b, -1)
        return self.add_embedding(torch.cat([text_embeds.to(dtype), feats.to(dtype)], dim=-1))
