"""ViT encoder on timm's layers that runs on any subset of patch tokens.

Architecture only: no DeepSpeed, logging or checkpoints here. Parameter names follow timm's
``VisionTransformer`` (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks.N``, ``norm``) so the
encoder's state dict loads into timm (and the reference MAE) with renaming only at the top level.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from largemim.models.pos_embed import sincos_2d
from largemim.models.sizes import VIT_SIZES, ViTSize

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # timm's and MAE's ViT norm


def make_blocks(width: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    # timm's Block computes attention with F.scaled_dot_product_attention (flash / memory-efficient
    # kernels on CUDA) whenever timm's fused attention is on, its default on current torch.
    return nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth))


class ViTEncoder(nn.Module):
    def __init__(self, size: ViTSize | str, img_size: int = 224, patch_size: int = 16, in_chans: int = 3):
        super().__init__()
        size = VIT_SIZES[size] if isinstance(size, str) else size
        self.size, self.img_size, self.patch_size, self.in_chans = size, img_size, patch_size, in_chans
        self.width = size.width
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, size.width)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.width))
        # Fixed, not learned (MAE); kept as a frozen Parameter so state dicts and parameter counts
        # match timm's VisionTransformer, whose pos_embed is a Parameter.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, size.width), requires_grad=False)
        self.blocks = make_blocks(size.width, size.depth, size.heads, size.mlp_ratio)
        self.norm = LayerNorm(size.width)
        self.grad_ckpt_every = 0

    def set_grad_checkpointing(self, every: int) -> None:
        """Recompute the activations of every ``every``-th block in backward (0 = off)."""
        self.grad_ckpt_every = int(every)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, D) patch tokens with their position embeddings added."""
        return self.patch_embed(images) + self.pos_embed[:, 1:, :]

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the class token to any (N, K, D) subset of patch tokens and run the blocks."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for i, block in enumerate(self.blocks):
            if self.grad_ckpt_every and self.training and torch.is_grad_enabled() and i % self.grad_ckpt_every == 0:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """All patches: (N, 1 + L, D)."""
        return self.forward_tokens(self.embed_patches(images))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.no_grad()
    def init_weights(self) -> None:
        """The MAE paper code's initialisation of the encoder."""
        self.pos_embed.copy_(sincos_2d(self.width, self.grid_size).unsqueeze(0))
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer, not a conv
        nn.init.normal_(self.cls_token, std=0.02)


def init_linear_and_norm(module: nn.Module) -> None:
    """xavier-uniform linears with zero bias, unit LayerNorms (MAE's ``_init_weights``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def init_mim_weights(model: nn.Module) -> None:
    """MAE's initialisation, shared by every ViT objective: xavier-uniform linears and unit norms, the
    encoder's own (sin-cos positions, patch projection as a linear, class token), and a normal(0.02)
    mask token if the objective has one. Objectives add their extra state after this."""
    model.apply(init_linear_and_norm)
    model.encoder.init_weights()
    if isinstance(getattr(model, "mask_token", None), nn.Parameter):
        nn.init.normal_(model.mask_token, std=0.02)
