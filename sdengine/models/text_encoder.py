"""The CLIP text transformer tau(y) (Radford et al. 2021): token ids [B,77] -> hidden states [B,77,D].

transformers' CLIPTextModel is the implementation; keys are `text_model.*` as in diffusers folders.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextEncoderConfig


class TextEncoder(nn.Module):
    """CLIPTextModel returning the last hidden state (after the final layer norm) that SD conditions on."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        from transformers import CLIPTextModel

        self.cfg = cfg
        model = CLIPTextModel(cfg.to_transformers())
        # transformers 4 nests the transformer under .text_model; transformers 5 flattens it.
        self.text_model = getattr(model, "text_model", model)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """The last hidden state; with clip_skip = n, layer -1-n's output through the final layer norm (diffusers)."""
        if not clip_skip:
            return self.text_model(input_ids=input_ids).last_hidden_state
        out = self.text_model(input_ids=input_ids, output_hidden_states=True)
        return self.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
