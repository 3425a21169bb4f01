"""The CLIP text transformer tau(y) (Radford et al. 2021): token ids [B,77] -> hidden states [B,77,D].

transformers' CLIPTextModel is the implementation; keys are `text_model.*` as in diffusers folders. SDXL's
second encoder (OpenCLIP ViT-bigG) adds `text_projection` (CLIPTextModelWithProjection): the pooled output at
the end-of-text token, projected without bias, is its `text_embeds` conditioning.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextEncoderConfig


class TextEncoder(nn.Module):
    """CLIPTextModel returning the last hidden state (after the final layer norm) that SD conditions on;
    with projection=True also CLIPTextModelWithProjection's `text_projection` (SDXL's text_encoder_2)."""

    def __init__(self, cfg: TextEncoderConfig, projection: bool = False) -> None:
        super().__init__()
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        self.cfg = cfg
        self.projection = projection
        if projection:
            model = CLIPTextModelWithProjection(cfg.to_transformers())
            self.text_model = model.text_model
            self.text_projection = model.text_projection
        else:
            model = CLIPTextModel(cfg.to_transformers())
            # transformers 4 nests the transformer under .text_model; transformers 5 flattens it.
            self.text_model = getattr(model, "text_model", model)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """The last hidden state; with clip_skip = n, layer -1-n's output through the final layer norm (diffusers)."""
        if not clip_skip:
            return self.text_model(input_ids=input_ids).last_hidden_state
        out = self.text_model(input_ids=input_ids, output_hidden_states=True)
        return self.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])

    def penultimate(self, input_ids: torch.Tensor, clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SDXL's conditioning (diffusers' StableDiffusionXLPipeline.encode_prompt): the output of layer
        -2-clip_skip without the final layer norm, and for a projecting encoder the projected pooled output."""
        out = self.text_model(input_ids=input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-(clip_skip + 2)]
        pooled = self.text_projection(out.pooler_output) if self.projection else None
        return hidden, pooled
