"""Is the model fit to save? A checkpoint of inf/NaN weights would become the one every resume starts
from, and pruning would delete the good ones behind it.

Weights go non-finite when a step with inf/NaN gradients is applied instead of skipped. DeepSpeed skips
such steps in its fp16/bf16 modes and its ZeRO optimizers (on an inf/NaN gradient norm), except with
``train.check_grad_overflow=false``; fp32 weights at ZeRO-0 (``train.precision=fp32``, or autocast) are
not checked at all. The loss is checked at log steps only, and the step that breaks the weights still
reports the finite loss of the weights before it, so a save can come first.

Not checked: the optimizer's moments (an inf ``exp_avg_sq`` freezes its weights but leaves them finite),
and ZeRO-3 partitions swapped out to NVMe (``offload_param.device=nvme``), whose ``ds_tensor`` is then a
placeholder.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class TrainingDiverged(FloatingPointError):
    """The loss or the weights went inf/NaN; the message says what was kept and what to change."""


def _local_values(p: torch.nn.Parameter) -> torch.Tensor:
    """The values of ``p`` this rank holds. ZeRO-3: its partition (``p`` itself is empty between uses)
    without the padding of the last partition, which DeepSpeed leaves uninitialised."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        return p.detach()
    size = part.numel()
    rank = dist.get_rank(group=getattr(p, "ds_process_group", None)) if dist.is_initialized() else 0
    real = max(0, min(size, p.ds_numel - rank * size))
    return part.detach().view(-1)[:real]


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s parameters that hold inf or NaN on this rank (under ZeRO-3: in this rank's
    partition, so the answer must be gathered over ranks). One max-abs kernel per tensor group and one
    host sync; run before a save, not per step."""
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for name, p in module.named_parameters():
        t = _local_values(p)
        if t.numel():
            groups[(t.device, t.dtype)].append((name, t))
    bad: list[str] = []
    for items in groups.values():
        # the largest |value| is finite exactly when every value is (NaN propagates); a norm could overflow
        peaks = torch.stack(torch._foreach_norm([t for _, t in items], float("inf")))
        finite = torch.isfinite(peaks).tolist()
        bad += [name for (name, _), ok in zip(items, finite, strict=True) if not ok]
    return bad
