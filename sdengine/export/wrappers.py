"""The torch modules each graph is traced from, with the inputs and outputs of sdengine.specs.

Each `GraphModule` says which of its children are the network body (fp16 in an fp16 export); the
ops outside them (guidance, the scheduler update, latent scaling) stay fp32. `reference` runs the
same computation the torch backend runs, to validate the graph against.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..models.loading import Components
from ..models.step import CachedStep, DenoiseStep
from ..specs import DENOISE_STEP, DENOISE_STEP_FULL, DENOISE_STEP_SHALLOW, GRAPHS, SDXL_GRAPHS, TEXT_ENCODER, \
    TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER, GraphSpec, spec_of


class TextEncoderGraph(nn.Module):
    """input_ids [R,77] int32, clip_skip [1] int32 -> (last_hidden_state [R,77,D], pooled_output [R,D]).

    last_hidden_state is layer -1-clip_skip's output through the final layer norm (diffusers' clip_skip; 0 gives
    CLIPTextModel's own last_hidden_state): every layer's output is stacked and one is gathered, so one graph
    serves every clip_skip.
    """

    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.net = text_model

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(input_ids=input_ids.long(), output_hidden_states=True)
        layers = torch.stack(out.hidden_states[1:])  # [L, R, 77, D]: each layer's output, before the final norm
        index = (layers.shape[0] - 1) - clip_skip.long().reshape(1)
        chosen = layers.index_select(0, index)[0]
        return self.net.final_layer_norm(chosen), out.pooler_output


class VaeDecoderGraph(nn.Module):
    """Scaled latent -> image: D(z / scaling_factor) (Rombach et al. 2022, sec. 3.1)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder
        self.scaling_factor = vae.cfg.scaling_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latent / self.scaling_factor))


class VaeEncoderGraph(nn.Module):
    """Image -> scaled mean and std of q(z|x), log-variance clamped to [-30, 20] as in LDM."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        self.scale, self.channels = vae.cfg.scaling_factor, vae.cfg.latent_channels

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.quant_conv(self.encoder(image))  # sliced by a constant: static channel dims
        mean, logvar = moments[:, :self.channels], moments[:, self.channels:]
        return mean * self.scale, torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * self.scale


@dataclass(frozen=True)
class GraphModule:
    """A module to trace, the children that form its body, and whether its attention stays fp32."""

    spec: GraphSpec
    module: nn.Module
    body: tuple[str, ...] | None    # child names of the fp16 body; None: the whole module
    fp32_attention: bool            # the reference upcasts attention (VAE, SD 2.x U-Net)
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class ShallowStepGraph(CachedStep):
    """Step caching's shallow step with the spec's inputs: the denoise step's, then the deep feature."""

    def forward(self, state: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                guidance_scale: torch.Tensor, coefficients: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                known: torch.Tensor, known_noise: torch.Tensor, blend: torch.Tensor,
                deep_feature: torch.Tensor) -> torch.Tensor:
        return super().forward(state, timestep, text_embeddings, guidance_scale, coefficients, noise, mask, known,
                               known_noise, blend, None, None, deep_feature)


def _cached_step(name: str, c: Components, branch: int | None) -> GraphModule:
    """Step caching's full or shallow step graph for `branch` (sdengine.stepcache)."""
    from ..stepcache import cache_split

    if branch is None:
        raise ValueError(f"the {name} graph needs step caching's branch (ExportSettings.step_cache)")
    split = cache_split(c.config.unet, branch)
    module = CachedStep(c.unet, split, False) if name == DENOISE_STEP_FULL else ShallowStepGraph(c.unet, split, True)
    spec = spec_of(name)
    return GraphModule(spec, module, ("unet",), c.config.unet.upcast_attention, _runner(spec, module))


def build(name: str, c: Components, cache_branch: int | None = None) -> GraphModule:
    """The GraphModule of graph `name` over loaded components (fp32, CPU); `cache_branch` for step caching's."""
    if name in (DENOISE_STEP_FULL, DENOISE_STEP_SHALLOW):
        return _cached_step(name, c, cache_branch)
    if c.config.sdxl:
        return build_sdxl(name, c)
    spec = GRAPHS[name]
    if name == TEXT_ENCODER:
        module = TextEncoderGraph(c.text_encoder.text_model)
        return GraphModule(spec, module, ("net",), False, _runner(spec, module))
    if name == DENOISE_STEP:
        module = DenoiseStep(c.unet)
        return GraphModule(spec, module, ("unet",), c.config.unet.upcast_attention, _runner(spec, module))
    if name == UNET:
        return GraphModule(spec, c.unet, None, c.config.unet.upcast_attention, _runner(spec, c.unet))
    if name == VAE_DECODER:
        module = VaeDecoderGraph(c.vae)
        return GraphModule(spec, module, ("post_quant_conv", "decoder"), True, _runner(spec, module))
    if name == VAE_ENCODER:
        module = VaeEncoderGraph(c.vae)
        return GraphModule(spec, module, ("encoder", "quant_conv"), True, _runner(spec, module))
    raise KeyError(name)


class SdxlTextEncoderGraph(nn.Module):
    """input_ids [R,77] int32, clip_skip [1] int32 -> (hidden_state [R,77,D], pooled [R,D] or text_embeds [R,P]).

    hidden_state is layer -2-clip_skip's output without the final layer norm (diffusers' StableDiffusionXLPipeline):
    the embeddings' and every layer's outputs are stacked and one is gathered, so one graph serves every clip_skip.
    The second output is the pooled output at EOS, through text_projection for SDXL's second encoder (its
    `text_embeds`); it does not depend on clip_skip.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.net = encoder.text_model
        self.projection = encoder.text_projection if encoder.projection else None

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(input_ids=input_ids.long(), output_hidden_states=True)
        layers = torch.stack(out.hidden_states)  # [L+1, R, 77, D]: the embeddings, then each layer's output
        index = (layers.shape[0] - 2) - clip_skip.long().reshape(1)
        hidden = layers.index_select(0, index)[0]
        pooled = out.pooler_output
        return hidden, pooled if self.projection is None else self.projection(pooled)


class SdxlUNetGraph(nn.Module):
    """The plain SDXL U-Net with its inputs in the spec's order: sample, timestep, context, text_embeds, time_ids."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, text_embeds: torch.Tensor,
                time_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, context, None, text_embeds, time_ids)


def build_sdxl(name: str, c: Components) -> GraphModule:
    """The GraphModule of an SDXL model's graph `name` (specs.SDXL_GRAPHS): both text encoders; the step and U-Net
    with text_embeds and time_ids (DenoiseStep takes them last, as the spec orders its inputs); the VAE graphs."""
    spec = SDXL_GRAPHS[name]
    upcast = c.config.unet.upcast_attention
    if name in (TEXT_ENCODER, TEXT_ENCODER_2):
        module = SdxlTextEncoderGraph(getattr(c, name))
        body = ("net",) if module.projection is None else ("net", "projection")
        return GraphModule(spec, module, body, False, _runner(spec, module))
    if name == DENOISE_STEP:
        module = DenoiseStep(c.unet)
        return GraphModule(spec, module, ("unet",), upcast, _runner(spec, module))
    if name == UNET:
        module = SdxlUNetGraph(c.unet)
        return GraphModule(spec, module, ("unet",), upcast, _runner(spec, module))
    if name == VAE_DECODER:
        module = VaeDecoderGraph(c.vae)
        return GraphModule(spec, module, ("post_quant_conv", "decoder"), True, _runner(spec, module))
    if name == VAE_ENCODER:
        module = VaeEncoderGraph(c.vae)
        return GraphModule(spec, module, ("encoder", "quant_conv"), True, _runner(spec, module))
    raise KeyError(name)


def _runner(spec: GraphSpec, module: nn.Module) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """numpy inputs by name -> numpy outputs by name, through the fp32 torch module."""

    @torch.inference_mode()
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = module(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in spec.input_names))
        out = out if isinstance(out, tuple) else (out,)
        return {n: t.float().numpy() for n, t in zip(spec.output_names, out)}

    return run


@contextlib.contextmanager
def export_mode(module: nn.Module) -> Iterator[None]:
    """Trace-friendly settings: eager (explicit-mask) attention in transformers' CLIP while exporting."""
    configs = [m.config for m in module.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    saved = [cfg._attn_implementation for cfg in configs]
    try:
        for cfg in configs:
            cfg._attn_implementation = "eager"
        yield
    finally:
        for cfg, value in zip(configs, saved):
            cfg._attn_implementation = value
