"""Helpers for the pictures objectives draw of a fixed batch (``picture(images, noise, mean, std)``)."""

from __future__ import annotations

import torch
from torchvision.utils import make_grid


def to_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised (N, C, H, W) images back to [0, 1] pixels, in fp32 on the CPU."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.detach().float().cpu() * std_t + mean_t).clamp(0, 1)


def rows(*columns: torch.Tensor) -> torch.Tensor:
    """One row per sample, one column per (N, C, H, W) tensor of [0, 1] pixels: a (C, H', W') image."""
    stacked = torch.stack([c.float().cpu() for c in columns], dim=1).flatten(0, 1)
    return make_grid(stacked, nrow=len(columns), padding=1, pad_value=1.0)
