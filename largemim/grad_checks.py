"""Multi-tensor gradient checks for DeepSpeed's ZeRO-1/2 optimizer: the inf/NaN test and the global norm.

DeepSpeed 0.19's ``DeepSpeedZeroOptimizer.step`` walks the gradient tensors one at a time twice: it
tests each for inf/NaN (``has_inf_or_nan``: about a dozen small kernels per tensor) and takes each
one's 2-norm in fp64 (a cast and a norm per tensor). Every one of those kernels is launched from Python
while the GPU, which finished the backward pass, waits. MAE ViT-L/16 has about 390 parameter tensors,
so its optimizer step launched about 6,000 kernels (tools/benchmark.py --count-ops) against a plain
loop's handful, and a GPU step lost roughly 10-15 us per kernel against the plain loop (BENCHMARKS.md).

``install`` replaces both methods on one optimizer instance with ``torch._foreach_norm`` over the same
tensors (the multi-tensor kernel ``torch.nn.utils.clip_grad_norm_`` uses): a few launches per step
instead of thousands. What stays the same: the tensors taken (this rank's partition, padding skipped),
the all-reduces over the data-parallel group, the -1 marker for a non-finite norm, and a step skipped
on a non-finite gradient or norm. What differs: each tensor's norm is accumulated in fp32 (DeepSpeed:
fp64), so the global norm agrees to about 1e-6 relative. A tensor whose norm exceeds about 1.8e19
gives an infinite fp32 norm here; DeepSpeed's global norm (summed squares cast to fp32) is infinite
then too, so the step is skipped either way, but the inf/NaN test would also flag it here, which only
matters when ``zero_optimization.compute_grad_norm`` is off: that case keeps DeepSpeed's loops. Values
below about 1e-19 square to zero in fp32 (a vanished gradient's logged norm reads 0). Set
``train.foreach_grad_checks=false`` to keep DeepSpeed's own loops.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@torch.no_grad()
def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's 2-norm, accumulated and returned in fp32, stacked into one vector (no view per tensor:
    even a ``detach`` costs the host a dispatch)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def _grad_norm_direct(self, gradients, params, norm_type=2):
    """DeepSpeedZeroOptimizer.get_grad_norm_direct for the 2-norm without model or pipeline parallelism."""
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    # As DeepSpeed: the i-th gradient that is not padding pairs with the i-th parameter (zip stops at the shorter).
    grads = [g for g, _ in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params, strict=False)]
    if grads:
        total = _norms(grads).double().pow(2).sum().float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def _has_overflow_partitioned_grads(self):
    """DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial: a [1] bool tensor, true if any of this
    rank's gradients holds inf or NaN (a tensor's norm is finite only if all its values are)."""
    grads = [g for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i] if g is not None]
    if not grads:
        return torch.zeros(1, dtype=torch.bool, device=self.device)
    return (~torch.isfinite(_norms(grads))).any().reshape(1)


def unsupported_reason(optimizer) -> str | None:
    """Why ``install`` must leave this optimizer alone, or None if it can take over its checks."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return f"{type(optimizer).__name__} is not DeepSpeed's ZeRO-1/2 optimizer"
    if not hasattr(torch, "_foreach_norm"):
        return f"torch {torch.__version__} has no torch._foreach_norm"
    for name in ("get_grad_norm_direct", "has_overflow_partitioned_grads_serial", "averaged_gradients", "bit16_groups"):
        if not hasattr(optimizer, name):
            return f"this DeepSpeed's ZeRO optimizer has no {name}"
    if not getattr(optimizer, "compute_grad_norm", True):
        return "zero_optimization.compute_grad_norm is off (the inf/NaN test alone must then match DeepSpeed's)"
    if getattr(optimizer, "cpu_offload", False):
        return "optimizer offload takes its norm and overflow test on the CPU"
    if getattr(optimizer, "mpu", None) is not None or getattr(optimizer, "model_parallel_rank", 0) != 0:
        return "model parallelism counts some parameters once across ranks"
    if getattr(optimizer, "has_moe_layers", False):
        return "mixture-of-experts parameters are averaged separately"
    if any(getattr(p, "ds_pipe_replicated", False) for group in optimizer.bit16_groups for p in group):
        return "pipeline-replicated parameters are counted once"
    return None


def install(optimizer) -> bool:
    """Give this DeepSpeed ZeRO-1/2 optimizer the multi-tensor checks; False (and a log line) if it cannot."""
    reason = unsupported_reason(optimizer)
    if reason is not None:
        log.info("train.foreach_grad_checks: DeepSpeed's own per-tensor checks kept (%s)", reason)
        return False
    optimizer.get_grad_norm_direct = types.MethodType(_grad_norm_direct, optimizer)
    optimizer.has_overflow_partitioned_grads_serial = types.MethodType(_has_overflow_partitioned_grads, optimizer)
    log.info("train.foreach_grad_checks: gradient norm and inf/NaN test as multi-tensor kernels")
    return True
