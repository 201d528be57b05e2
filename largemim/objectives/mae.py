"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners"): pixel reconstruction.

The encoder sees only the visible patches; a light decoder with a mask token and its own fixed
position embeddings predicts every patch's pixels; the loss is the MSE on masked patches only, against
pixels normalised per patch (``norm_pix_loss``). Parameter names match the reference code's
(``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.N``, ``decoder_norm``,
``decoder_pred``) so its checkpoints convert by renaming the encoder prefix only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from largemim.models.pos_embed import sincos_2d
from largemim.models.vit import LayerNorm, ViTEncoder, init_mim_weights, make_blocks
from largemim.objectives.masking import random_masking_ids


@dataclass(frozen=True)
class MAEDecoderSpec:
    dim: int = 512
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), each patch flattened as (p, q, c): the reference MAE layout."""
    n, c, h, w = images.shape
    gh, gw = h // p, w // p
    x = images.reshape(n, c, gh, p, gw, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, p: int, c: int) -> torch.Tensor:
    n, length, _ = patches.shape
    g = int(length**0.5)
    x = patches.reshape(n, g, g, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, g * p, g * p)


class MAE(nn.Module):
    def __init__(
        self,
        encoder: ViTEncoder,
        decoder: MAEDecoderSpec = MAEDecoderSpec(),
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        init: bool = True,
    ):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_size, self.in_chans = encoder.patch_size, encoder.in_chans
        num_patches = encoder.num_patches
        self.decoder_embed = nn.Linear(encoder.width, decoder.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder.dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, decoder.dim), requires_grad=False)
        self.decoder_blocks = make_blocks(decoder.dim, decoder.depth, decoder.heads, decoder.mlp_ratio)
        self.decoder_norm = LayerNorm(decoder.dim)
        self.decoder_pred = nn.Linear(decoder.dim, self.patch_size**2 * self.in_chans)
        if init:  # False when parameters are created partitioned (ZeRO-3): the builder inits them gathered
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        init_mim_weights(self)
        self.decoder_pos_embed.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], self.encoder.grid_size).unsqueeze(0))

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor):
        tokens = self.encoder.embed_patches(images)
        ids_keep, mask, ids_restore = random_masking_ids(noise, self.mask_ratio)
        # One batched gather of the visible tokens; no per-sample Python loop.
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.encoder.forward_tokens(visible), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        fill = self.mask_token.expand(n, length + 1 - x.shape[1], -1).to(x.dtype)
        shuffled = torch.cat([x[:, 1:, :], fill], dim=1)  # visible first, then mask tokens
        unshuffled = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1, :], unshuffled], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch, averaged over masked patches only; computed in fp32 whatever the precision."""
        per_patch = ((pred.float() - self.targets(images)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``noise`` (N, L) fixes the mask: the patches with the smallest noise stay visible."""
        n = images.shape[0]
        if noise is None:
            noise = torch.rand(n, self.encoder.num_patches, device=images.device)
        param_dtype = self.decoder_pred.weight.dtype  # bf16/fp16 under a mixed-precision engine
        latent, mask, ids_restore = self.forward_encoder(images.to(param_dtype), noise)
        pred = self.forward_decoder(latent, ids_restore)
        return {"loss": self.loss(images, pred, mask), "pred": pred, "mask": mask}
