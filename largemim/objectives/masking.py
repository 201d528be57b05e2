"""Mask generators. Each returns which patches are hidden, with exact counts per sample."""

from __future__ import annotations

import torch


def random_masking_ids(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking driven by ``noise`` (N, L), as the reference MAE and HF ``ViTMAE``.

    The ``len_keep = int(L * (1 - mask_ratio))`` patches with the smallest noise stay visible.
    Returns ``ids_keep`` (N, K), ``mask`` (N, L; 1 = hidden, 0 = visible) and ``ids_restore`` (N, L),
    which puts tokens given in shuffled order back into patch order.
    """
    n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore
