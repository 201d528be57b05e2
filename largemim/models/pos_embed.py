"""Fixed 2-D sine-cosine position embeddings, laid out exactly as the reference MAE code does.

timm's ``build_sincos2d_pos_embed`` orders the sin/cos halves differently, so MAE and Hugging Face
``ViTMAE`` checkpoints would not be bit-compatible with it; this layout is: first half encodes the
column (w) coordinate, second half the row (h) coordinate, each as [sin, cos], frequencies
1 / 10000^(2i/d), with an all-zero row for the class token.
"""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """(1 + grid_size**2, dim) if ``cls_token`` else (grid_size**2, dim), float32."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # grid_w varies along columns
    emb = torch.cat([_sincos_1d(dim // 2, grid_w), _sincos_1d(dim // 2, grid_h)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
