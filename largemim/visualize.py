"""Reconstruction pictures: original | masked input | reconstruction | reconstruction + visible."""

from __future__ import annotations

import torch
from torchvision.utils import make_grid

from largemim.objectives.mae import patchify, unpatchify


@torch.no_grad()
def reconstruction_grid(images, pred, mask, patch: int, mean, std, norm_pix_loss: bool) -> torch.Tensor:
    """A (3, H, W) float image in [0, 1]: one row per sample, four columns."""
    images = images.float().cpu()
    pred, mask = pred.float().cpu(), mask.float().cpu()
    target = patchify(images, patch)
    if norm_pix_loss:  # predictions are per-patch normalised pixels: put the patch statistics back
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    c = images.shape[1]
    recon = unpatchify(pred, patch, c)
    m = unpatchify(mask.unsqueeze(-1).expand(-1, -1, patch * patch * c), patch, c)
    masked = images * (1 - m) + m * images.amin()  # hidden patches drawn dark
    pasted = images * (1 - m) + recon * m
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    rows = torch.stack([images, masked, recon, pasted], dim=1).flatten(0, 1) * std_t + mean_t
    return make_grid(rows.clamp(0, 1), nrow=4, padding=1, pad_value=1.0)
