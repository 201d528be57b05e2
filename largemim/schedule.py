"""Learning-rate schedule, per optimizer step: linear warm-up, then cosine decay to min_lr."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, total: int, warmup: int, min_lr: float = 0.0) -> float:
    if warmup and step < warmup:
        return peak * (step + 1) / warmup  # never exactly 0 at step 0: the first step already learns
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(peak: float, total: int, warmup: int, min_lr: float = 0.0):
    """A LambdaLR multiplier function (the optimizer's param groups hold ``peak`` as their lr)."""
    return lambda step: lr_at(step, peak, total, warmup, min_lr) / peak
