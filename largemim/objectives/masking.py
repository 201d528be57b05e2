"""Mask generators. Each returns which patches are hidden, with exact counts per sample."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from largemim.config import Config


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


def num_hidden(num_patches: int, mask_ratio: float) -> int:
    """Patches hidden at ``mask_ratio``, with the rounding of ``random_masking_ids`` (MAE's ``len_keep``)."""
    return num_patches - int(num_patches * (1 - mask_ratio))


def random_mask(n: int, grid: int, mask_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, grid*grid) bool, True = hidden: exactly ``num_hidden`` random patches per sample (MAE's rule)."""
    noise = torch.rand(n, grid * grid, generator=generator)
    return random_masking_ids(noise, mask_ratio)[1].bool()


def simmim_mask(
    n: int, grid: int, mask_ratio: float, unit: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """SimMIM's masking: random squares of ``unit`` x ``unit`` patches (its 32-pixel mask patches over
    16-pixel model patches: unit 2), ``num_hidden`` of the coarse grid's squares per sample, upsampled
    to the patch grid. (N, grid*grid) bool, True = hidden."""
    if grid % unit:
        raise ValueError(f"a {grid}x{grid} patch grid cannot be cut into squares of {unit}x{unit} patches")
    coarse = grid // unit
    hidden = random_mask(n, coarse, mask_ratio, generator).view(n, coarse, coarse)
    return hidden.repeat_interleave(unit, 1).repeat_interleave(unit, 2).reshape(n, grid * grid)


class _Uniforms:
    """Uniform [0, 1) numbers drawn from a torch RNG in chunks, handed out one at a time as floats."""

    def __init__(self, generator: torch.Generator | None, chunk: int = 512):
        self.generator, self.chunk, self.values, self.i = generator, chunk, [], 0

    def __call__(self) -> float:
        if self.i == len(self.values):
            self.values, self.i = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist(), 0
        self.i += 1
        return self.values[self.i - 1]


def _one_block_mask(grid: int, target: int, min_block: int, rand: _Uniforms, min_aspect: float) -> np.ndarray:
    """BEiT's ``MaskingGenerator`` for one sample, then grown to exactly ``target`` hidden patches."""
    mask = np.zeros((grid, grid), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < target:
        max_patches = target - count
        delta = 0
        for _ in range(10):  # BEiT: ten tries at a block that adds between 1 and max_patches new patches
            area = min_block + (max_patches - min_block) * rand()
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rand())
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            top, left = int(rand() * (grid - h + 1)), int(rand() * (grid - w + 1))
            if not (0 < h < grid and 0 < w < grid):
                continue
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_patches:
                block[...] = True
                delta = new
                break
        if delta == 0:
            break
        count += delta
    # BEiT stops short when no block fits the remainder (fewer than min_block patches left, or bad luck);
    # grow the hidden region by random patches on its border until the count is exact.
    while count < target:
        if count:
            border = np.zeros_like(mask)
            border[1:] |= mask[:-1]
            border[:-1] |= mask[1:]
            border[:, 1:] |= mask[:, :-1]
            border[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(border & ~mask)
        else:  # nothing hidden yet: start from one random patch
            candidates = np.flatnonzero(~mask)
        keys = [rand() for _ in candidates]
        take = candidates[np.argsort(keys, kind="stable")[: target - count if count else 1]]
        mask.flat[take] = True
        count += len(take)
    return mask


def block_mask(
    n: int,
    grid: int,
    mask_ratio: float,
    min_block: int = 16,
    generator: torch.Generator | None = None,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """BEiT's block-wise masking: rectangles of at least ``min_block`` patches with aspect ratio in
    [``min_aspect``, 1 / ``min_aspect``] until exactly ``num_hidden`` patches per sample are hidden.
    (N, grid*grid) bool, True = hidden. Runs on the CPU (a few hundred microseconds per sample)."""
    target = num_hidden(grid * grid, mask_ratio)
    rand = _Uniforms(generator)
    masks = [_one_block_mask(grid, target, min_block, rand, min_aspect) for _ in range(n)]
    return torch.from_numpy(np.stack(masks).reshape(n, grid * grid))


@dataclass(frozen=True)
class MaskGenerator:
    """One of the mask generators, set up for a model's patch grid; ``__call__`` draws a batch of masks
    from ``generator`` or, without one, from torch's global RNG (which the trainer seeds per micro-step)."""

    kind: str  # random | block | simmim
    grid: int  # patches per side
    mask_ratio: float
    min_block: int = 16  # block
    unit: int = 2  # simmim: patches per side of a masked square

    @classmethod
    def from_config(cls, cfg: Config) -> MaskGenerator:
        m, o = cfg.model, cfg.objective
        return cls(o.mask_kind(), m.img_size // m.patch_size, o.mask_ratio, o.min_block_patches,
                   max(1, o.mask_patch_size // m.patch_size))  # fmt: skip

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_hidden(self) -> int:
        """Hidden patches per sample, the same for every sample."""
        if self.kind == "simmim":
            return num_hidden((self.grid // self.unit) ** 2, self.mask_ratio) * self.unit**2
        return num_hidden(self.num_patches, self.mask_ratio)

    def __call__(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "random":
            return random_mask(n, self.grid, self.mask_ratio, generator)
        if self.kind == "block":
            return block_mask(n, self.grid, self.mask_ratio, self.min_block, generator)
        if self.kind == "simmim":
            return simmim_mask(n, self.grid, self.mask_ratio, self.unit, generator)
        raise ValueError(f"unknown mask kind {self.kind!r} (random, block or simmim)")

    def resolve(
        self, n: int, device: torch.device, noise: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The (N, L) bool mask for a forward pass: ``mask`` if given; else, for random masking, MAE's rule
        on ``noise`` if given; else a fresh draw."""
        if mask is None:
            if noise is not None and self.kind == "random":
                mask = random_masking_ids(noise, self.mask_ratio)[1]
            else:
                mask = self(n)
        else:  # a mask from the caller: check it (a host sync, but not in training, which draws its own)
            counts = mask.reshape(n, -1).sum(dim=1)
            if mask.shape != (n, self.num_patches) or not bool((counts == self.num_hidden).all()):
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} hiding {counts.tolist()} patches; expected ({n}, "
                    f"{self.num_patches}) hiding {self.num_hidden} per sample"
                )
        return mask.to(device=device, dtype=torch.bool)

    def hidden_index(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, num_hidden) positions of the hidden patches, in increasing order. Every sample hides the same
        number, so this is a fixed-shape gather index with no host sync (boolean indexing would sync)."""
        order = mask.to(torch.uint8).argsort(dim=1, descending=True, stable=True)
        return order[:, : self.num_hidden]
