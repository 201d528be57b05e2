"""SimMIM (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling"): raw-pixel regression.

Masked patches' embeddings are replaced by a learnable mask token (before the position embeddings),
every token goes through the encoder, and one linear layer per patch predicts its raw (normalised)
pixels; the loss is L1 on the hidden pixels only, averaged over hidden pixels x channels. SimMIM masks
random 32-pixel squares (``objective.mask_patch_size``) at ratio 0.6.

SimMIM's ViT head is a 1x1 conv to ``patch*patch*3`` channels followed by a pixel shuffle: the same
linear map per patch as ``head`` here, with its outputs in (c, p, q) order where ours are in the
(p, q, c) order of ``mae.patchify``; converting its weights means permuting those rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from largemim.compiled import eager_call
from largemim.config import Config
from largemim.models.vit import ViTEncoder, init_mim_weights
from largemim.objectives.mae import patchify, unpatchify
from largemim.objectives.mask_token import embed_with_mask_token
from largemim.objectives.masking import MaskGenerator
from largemim.objectives.pictures import rows, to_pixels


class SimMIM(nn.Module):
    def __init__(self, encoder: ViTEncoder, masks: MaskGenerator, init: bool = True):
        super().__init__()
        self.encoder, self.masks = encoder, masks
        self.patch_size, self.in_chans = encoder.patch_size, encoder.in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.width))
        self.head = nn.Linear(encoder.width, self.patch_size**2 * self.in_chans)
        if init:  # False when parameters are created partitioned (ZeRO-3): the builder inits them gathered
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        init_mim_weights(self)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token"}

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L1 over hidden pixels x channels (every patch has p*p*C of them), in fp32."""
        per_patch = (pred.float() - patchify(images.float(), self.patch_size)).abs().mean(dim=-1)
        m = mask.float()
        return (per_patch * m).sum() / m.sum()

    def forward(
        self, images: torch.Tensor, noise: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``mask`` (N, L) bool fixes the hidden patches; without it they are drawn (``noise`` as in MAE
        when the masking is random)."""
        mask = self.masks.resolve(images.shape[0], images.device, noise, mask)
        dtype = self.head.weight.dtype  # bf16/fp16 under a mixed-precision engine
        tokens = embed_with_mask_token(self.encoder, images.to(dtype), mask, self.mask_token)
        pred = self.head(self.encoder.forward_tokens(tokens)[:, 1:, :])
        return {"loss": self.loss(images, pred, mask), "pred": pred, "mask": mask.float()}

    @torch.no_grad()
    def picture(self, images: torch.Tensor, noise, mean, std) -> torch.Tensor:
        """original | masked | prediction | prediction pasted into the hidden patches, with masks from a
        fixed seed so that every picture of a run shows the same ones."""
        mask = self.masks(images.shape[0], torch.Generator().manual_seed(0))
        out = eager_call(self)(images, mask=mask)  # not compiled again (train.compile)
        p, c = self.patch_size, self.in_chans
        hide = unpatchify(out["mask"].float().cpu().unsqueeze(-1).expand(-1, -1, p * p * c), p, c)
        original = to_pixels(images, mean, std)
        predicted = to_pixels(unpatchify(out["pred"].float(), p, c), mean, std)
        return rows(original, original * (1 - hide) + 0.5 * hide, predicted, original * (1 - hide) + predicted * hide)


def build_simmim(cfg: Config, make_encoder: Callable[[], ViTEncoder], init: bool) -> SimMIM:
    return SimMIM(make_encoder(), MaskGenerator.from_config(cfg), init=init)
