"""The ViT size table: one row per size, every number with its source.

Widths, depths, heads and MLP sizes are timm's (``timm/models/vision_transformer.py``), which match
the ViT paper for Ti..H. "giant" is timm's and EVA's ViT-g/14 (1408 wide, 40 deep, 16 heads, MLP 6144,
from Zhai et al., "Scaling Vision Transformers"), not DINOv2's ViT-g (1536 wide, 24 heads). "gigantic"
is timm's ViT-G/14 (1664 wide, 48 deep, MLP 8192). Patch and image size are run parameters, not part
of a size; ``timm_name`` is the timm model whose encoder parameter count ours equals at 224 px.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    timm_name: str  # matching timm model (at its default patch size, 224 px)

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_dim / self.width


VIT_SIZES: dict[str, ViTSize] = {
    "tiny": ViTSize(192, 12, 3, 768, "vit_tiny_patch16_224"),
    "small": ViTSize(384, 12, 6, 1536, "vit_small_patch16_224"),
    "base": ViTSize(768, 12, 12, 3072, "vit_base_patch16_224"),
    "large": ViTSize(1024, 24, 16, 4096, "vit_large_patch16_224"),
    "huge": ViTSize(1280, 32, 16, 5120, "vit_huge_patch14_224"),
    "giant": ViTSize(1408, 40, 16, 6144, "vit_giant_patch14_224"),
    "gigantic": ViTSize(1664, 48, 16, 8192, "vit_gigantic_patch14_224"),
    # Below timm's table: for CPU tests and the demo only.
    "micro": ViTSize(128, 6, 4, 512, ""),
    "nano": ViTSize(64, 4, 4, 256, ""),
}
