"""Masked input for objectives whose encoder sees every position (SimMIM, BEiT, data2vec's student)."""

from __future__ import annotations

import torch
from torch import nn

from largemim.models.vit import ViTEncoder


def embed_with_mask_token(
    encoder: ViTEncoder, images: torch.Tensor, mask: torch.Tensor, mask_token: nn.Parameter
) -> torch.Tensor:
    """(N, L, D) patch tokens in which the hidden patches' embeddings (``mask`` (N, L), True = hidden) are
    replaced by the learnable ``mask_token`` before the position embeddings are added, as in SimMIM and
    BEiT: the encoder still knows where each hidden patch is, not what it shows."""
    tokens = encoder.patch_embed(images)
    w = mask.unsqueeze(-1).to(tokens.dtype)
    tokens = tokens * (1 - w) + mask_token.to(tokens.dtype) * w
    return tokens + encoder.pos_embed[:, 1:, :]
