"""Is the model fit to save? A checkpoint of inf/NaN weights would become the one every resume starts
from, and pruning would delete the good ones behind it.

Weights go non-finite when a step applies an inf/NaN update instead of skipping it (ZeRO-0 has no
overflow test; ``train.check_grad_overflow=false`` turns DeepSpeed's off). The loss is
checked at log steps only, and the step that breaks the weights still reports the finite loss of the
weights before it, so a save can come first.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s parameters that hold inf or NaN on this rank (under ZeRO-3: in this rank's
    partition, so the answer must be summed over ranks). One max-abs kernel per tensor group and one
    host sync; run before a save, not per step."""
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for name, p in module.named_parameters():
        t = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition (p itself is empty between uses)
        t = p.detach() if t is None else t.detach()
        if t.numel():
            groups[(t.device, t.dtype)].append((name, t))
    bad: list[str] = []
    for items in groups.values():
        # the largest |value| is finite exactly when every value is (NaN propagates); a norm could overflow
        peaks = torch.stack(torch._foreach_norm([t for _, t in items], float("inf")))
        finite = torch.isfinite(peaks).tolist()
        bad += [name for (name, _), ok in zip(items, finite, strict=True) if not ok]
    return bad
