"""Predicted GPU memory of a training step: model states by ZeRO stage plus activations counted per image.

Peak memory of a step is, to a few per cent, what lives at the start of the backward pass:

* **model states** (:func:`model_state_bytes`): in DeepSpeed's bf16/fp16 mode, per parameter, the
  16-bit weights (2 bytes) and gradients (2), and the fp32 master copy and Adam's two moments (12);
  ZeRO-1/2 split the 12 (and ZeRO-2 the gradients) over the data-parallel GPUs, ZeRO-3 everything,
  offload moves the 12 (ZeRO-3 with parameter offload: all) to host memory. DeepSpeed's own
  ``estimate_zero2_model_states_mem_needs`` also counts a 4-byte fp32 gradient partition: that one is
  made during the optimizer step, after the activations are gone, so it does not add to the peak.
* **activations** (:func:`count_activations`): the tensors autograd keeps for the backward pass,
  counted by running the real objective's forward on the CPU under ``saved_tensors_hooks`` at micro-
  batch 1 and 2 (unique storages, parameters excluded) and taking the difference. Activation
  checkpointing, the mask ratio, the decoder and the compute dtype are all in the count because the
  real module runs. No GPU is needed: the kept tensors' shapes and dtypes do not depend on the device.

Checked against the peaks measured on an H200 on 2026-11-26 (``tools/memory_table.py --check``):
MAE ViT-L/16, H/14 and g/14 under ZeRO-2 and ViT-L/16 with checkpointing within 2-4 %. The caching
allocator reserves 10-22 % above the allocated peak (fragmentation): :func:`largest_micro_batch` keeps
a margin of 1.28 (1.22 times the 5 % of the prediction's largest error) by default.
Only DeepSpeed's bf16/fp16 mode is modelled; ``train.autocast`` (fp32 weights) is not yet.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from largemim.config import Config

GIB = 2**30


@dataclass(frozen=True)
class ActivationCount:
    per_image: int  # bytes kept for the backward pass per image of the micro-batch
    fixed: int  # bytes kept whatever the micro-batch (usually ~0)
    params: int  # trained parameters (encoder, decoder, heads)
    frozen: int  # parameters without gradients (data2vec's teacher, BEiT's tokenizer): 16-bit weights only
    largest_layer: int  # parameters of the largest leaf module (ZeRO-3 gathers at least this at once)


def _saved_bytes(model: torch.nn.Module, batch: int, cfg: Config, dtype: torch.dtype) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    m = cfg.model
    x = torch.randn(batch, m.in_chans, m.img_size, m.img_size, dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(kept.values())


def count_activations(cfg: Config) -> ActivationCount:
    """Bytes of activations per image for ``cfg``'s objective, model, mask ratio, checkpointing and precision
    (DeepSpeed's bf16/fp16 mode: the whole module in that dtype). Builds the model on the CPU: a few
    seconds for ViT-L, about half a minute for ViT-g."""
    from largemim.objectives import build_objective

    cfg = copy.deepcopy(cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    if dtype == torch.float16:
        dtype = torch.bfloat16  # same sizes; fp16 kernels are missing on some CPUs
    torch.manual_seed(0)
    model = build_objective(cfg).to(dtype).train()
    encoder = getattr(model, "encoder", None)
    if cfg.model.grad_ckpt_every and encoder is not None:
        encoder.set_grad_checkpointing(cfg.model.grad_ckpt_every)
    one, two = _saved_bytes(model, 1, cfg, dtype), _saved_bytes(model, 2, cfg, dtype)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    largest = max((sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules()), default=0)
    return ActivationCount(two - one, max(0, 2 * one - two), params, frozen, largest)


def model_state_bytes(params: int, largest_layer: int, stage: int, gpus: int, offload: str = "none") -> int:
    """Bytes per GPU of weights, gradients and optimizer state in DeepSpeed's bf16/fp16 mode.

    ``offload``: "none", "optimizer" (the fp32 master and Adam moments in host memory) or "all"
    (ZeRO-3 with parameters offloaded too). Under ZeRO-3 the gathered working set (two of the largest
    layer, one gathering and one prefetched, in 16 bits) is added."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage} is not 0-3")
    if offload not in ("none", "optimizer", "all") or (offload == "all" and stage < 3):
        raise ValueError(f"offload={offload!r}: 'none', 'optimizer', or 'all' (ZeRO-3 only)")
    n = max(1, gpus)
    optimizer = 0 if offload != "none" else 12 * params  # fp32 master + Adam m and v
    if stage == 0:
        return 2 * params + 2 * params + optimizer
    if stage == 1:
        return 2 * params + 2 * params + optimizer // n
    if stage == 2:
        return 2 * params + (2 * params + optimizer) // n
    working = 2 * 2 * largest_layer
    if offload == "all":
        return working
    return (2 * params + 2 * params + optimizer) // n + working


def predicted_peak(acts: ActivationCount, micro_batch: int, stage: int, gpus: int, offload: str = "none") -> int:
    """Bytes allocated at the step's peak (what ``torch.cuda.max_memory_allocated`` reports)."""
    states = model_state_bytes(acts.params, acts.largest_layer, stage, gpus, offload)
    frozen = 2 * acts.frozen // (max(1, gpus) if stage == 3 else 1)  # weights only (data2vec's fp32 EMA
    # master, 4 more bytes per teacher parameter, is not counted)
    return states + frozen + acts.fixed + acts.per_image * micro_batch


def largest_micro_batch(
    acts: ActivationCount, stage: int, gpus: int, offload: str, gpu_gib: float, reserve: float = 1.28, context_gib=1.0
) -> int:
    """The largest micro-batch whose predicted peak, times ``reserve`` (the allocator's reserve, measured up
    to 1.22 on an H200, and the prediction's error, up to 5 %), fits in ``gpu_gib`` less the CUDA context;
    0 if the model states alone do not fit."""
    budget = (gpu_gib - context_gib) * GIB / reserve
    room = budget - predicted_peak(acts, 0, stage, gpus, offload)
    return max(0, int(room // acts.per_image)) if acts.per_image > 0 else 0
