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

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=input_ids).last_hidden_state
