"""Predicted GPU memory of a training step: model states by ZeRO stage plus activations counted per image.

Peak memory of a step is, to a few per cent, what lives at the start of the backward pass:

* **model states** (:func:`model_state_bytes`): in DeepSpeed's bf16/fp16 mode, per parameter, the
  16-bit weights (2 bytes) and gradients (2), and the fp32 master copy and Adam's two moments (12);
  ZeRO-1/2 split the 12 (and ZeRO-2 the gradients) over the data-parallel GPUs, ZeRO-3 everything,
  offload moves the 12 (ZeRO-3 with parameter offload: the weights' partition too) to host memory;
  plus DeepSpeed's buffers as the ds_config sets them (reduce buckets; under ZeRO-3 the prefetch
  bucket and the weights it keeps gathered). DeepSpeed's own ``estimate_zero2_model_states_mem_needs``
  also counts a 4-byte fp32 gradient partition: that one is made during the optimizer step, after the
  activations are gone, so it does not add to the peak.
* **activations** (:func:`count_activations`): the tensors autograd keeps for the backward pass,
  counted by running the real objective's forward on the CPU under ``saved_tensors_hooks`` at micro-
  batch 1 and 2 (unique storages, parameters excluded) and taking the difference. Activation
  checkpointing, the mask ratio, the decoder and the compute dtype are all in the count because the
  real module runs. No GPU is needed: the kept tensors' shapes and dtypes do not depend on the device
  (q, k, v, output and log-sum-exp for flash attention, on the CPU as on CUDA). The fp32 input batch
  is added; not counted: under checkpointing, the recomputed block's temporaries during backward.

Checked against the peaks measured on one H200 on 2026-11-26 (``tools/memory_table.py --check``):
MAE ViT-L/16, H/14 and g/14 under ZeRO-2, ViT-L/16 with checkpointing and under ZeRO-3, all within
5 %. Only one GPU was measured: the partitioned terms at 8 or 64 GPUs follow DeepSpeed's layout
but are not checked. The caching allocator reserves 10-22 % above the allocated peak (fragmentation):
:func:`largest_micro_batch` keeps a margin of 1.28 (1.22 times the prediction's largest error, 5 %).
Only DeepSpeed's bf16/fp16 mode is modelled; ``train.autocast`` (fp32 weights) is not yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from largemim.config import Config

GIB = 2**30


@dataclass(frozen=True)
class ActivationCount:
    per_image: int  # bytes per image of the micro-batch: the input and what autograd keeps for backward
    fixed: int  # bytes kept whatever the micro-batch (usually ~0)
    params: int  # trained parameters (encoder, decoder, heads)
    frozen: int  # parameters without gradients (data2vec's teacher, MAE's fixed position table): 16-bit weights
    extra: int = 0  # bytes of other state on the GPU, kept whole: buffers (data2vec's fp32 EMA master) and
    # BEiT's tokenizer (fp32, outside the module)


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
    (DeepSpeed's bf16/fp16 mode: the whole module in that dtype). Builds the model on the CPU: about 5
    seconds for ViT-L and 15 for ViT-g on two cores."""
    return count_activations_each(cfg, [cfg.model.grad_ckpt_every])[0]


def count_activations_each(cfg: Config, grad_ckpt_every: Sequence[int]) -> list[ActivationCount]:
    """:func:`count_activations` at each of several ``model.grad_ckpt_every`` settings, from one build."""
    from largemim.objectives import build_objective

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    if dtype == torch.float16:
        dtype = torch.bfloat16  # same sizes; fp16 kernels are missing on some CPUs
    counts = []
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        model = build_objective(cfg)
        extra = sum(b.numel() * b.element_size() for b in model.buffers())  # before the cast: fp32 stays fp32
        model = model.to(dtype).train()
        encoder = getattr(model, "encoder", None)
        for every in grad_ckpt_every:
            if encoder is not None:
                encoder.set_grad_checkpointing(every)
            counts.append((_saved_bytes(model, 1, cfg, dtype), _saved_bytes(model, 2, cfg, dtype)))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    m = cfg.model
    batch = m.in_chans * m.img_size * m.img_size * 4  # the normalised fp32 images themselves
    tokenizer = getattr(getattr(model, "tokenizer", None), "model", None)  # BEiT's, loaded by the forward
    if isinstance(tokenizer, torch.nn.Module):
        extra += sum(t.numel() * t.element_size() for t in [*tokenizer.parameters(), *tokenizer.buffers()])
    return [ActivationCount(two - one + batch, max(0, 2 * one - two), params, frozen, extra) for one, two in counts]


def zero_config(ds_json: dict):
    """The ds_config's ``zero_optimization`` section with DeepSpeed's own defaults filled in."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return DeepSpeedZeroConfig(**ds_json.get("zero_optimization", {}))


def model_state_bytes(params: int, gpus: int, zero) -> int:
    """Bytes per GPU of weights, gradients, optimizer state and DeepSpeed's buffers in its bf16/fp16 mode.

    ``zero``: :func:`zero_config` of the run's ds_config. Per parameter: 16-bit weights (2 bytes) and
    gradients (2); the fp32 master and Adam moments (12) unless the optimizer is offloaded; ZeRO-1 splits
    the 12 over the GPUs, ZeRO-2 the gradients too, ZeRO-3 everything (and parameter offload moves the
    weights' partition to the host). Buffers: the gradient reduce bucket (``reduce_bucket_size``
    16-bit elements, two with ``overlap_comm``); under ZeRO-3 the prefetch bucket and the gathered
    weights, which DeepSpeed keeps while they are reused within ``stage3_max_reuse_distance`` (1e9 by
    default: the whole model up to ``stage3_max_live_parameters``). ZeRO-0 in bf16 (DeepSpeed wraps the
    optimizer in FP16_UnfusedOptimizer) also makes fp32 gradients: counted as 2 + 4 + 12 per parameter,
    not checked against a measurement."""
    n = max(1, gpus)
    stage = int(zero.stage)
    opt_offload = zero.offload_optimizer is not None and zero.offload_optimizer.device != "none"
    param_offload = zero.offload_param is not None and zero.offload_param.device != "none"
    optimizer = 0 if opt_offload else 12 * params  # fp32 master + Adam m and v
    if stage == 0:
        return 2 * params + 4 * params + optimizer
    buckets = 2 * int(zero.reduce_bucket_size) * (2 if zero.overlap_comm else 1)
    if stage == 1:
        return 2 * params + 2 * params + optimizer // n + buckets
    if stage == 2:
        return 2 * params + (2 * params + optimizer) // n + buckets
    weights = 0 if param_offload else 2 * params // n
    gathered = 2 * min(params, int(zero.max_live_parameters)) + 2 * int(zero.prefetch_bucket_size)
    return weights + (2 * params + optimizer) // n + gathered + buckets


def predicted_peak(acts: ActivationCount, micro_batch: int, gpus: int, zero) -> int:
    """Bytes allocated at the step's peak (what ``torch.cuda.max_memory_allocated`` reports)."""
    states = model_state_bytes(acts.params, gpus, zero)
    frozen = 2 * acts.frozen // (max(1, gpus) if int(zero.stage) == 3 else 1)  # 16-bit weights only
    return states + frozen + acts.extra + acts.fixed + acts.per_image * micro_batch


def largest_micro_batch(
    acts: ActivationCount, gpus: int, zero, gpu_gib: float, reserve: float = 1.28, context_gib: float = 1.0
) -> int:
    """The largest micro-batch whose predicted peak, times ``reserve`` (the allocator's reserve, measured up
    to 1.22 on an H200, and the prediction's error, up to 5 %), fits in ``gpu_gib`` less the CUDA context;
    0 if the model states alone do not fit."""
    budget = (gpu_gib - context_gib) * GIB / reserve
    room = budget - predicted_peak(acts, 0, gpus, zero)
    return max(0, int(room // acts.per_image)) if acts.per_image > 0 else 0


def checkpointed_blocks(depth: int, every: int) -> int:
    """Encoder blocks whose activations are recomputed with ``model.grad_ckpt_every=every`` (0 = none)."""
    return 0 if every <= 0 else -(-depth // every)


def choose_grad_ckpt(
    cfg: Config, ds_json: dict, gpus: int, budget_gib: float, reserve: float = 1.28
) -> tuple[int, float]:
    """``model.grad_ckpt_auto``: the least activation checkpointing whose predicted peak fits ``budget_gib``.

    Returns (``grad_ckpt_every``, predicted GiB at that choice, times ``reserve``). Counts the activations
    without and with every block checkpointed, and between the two in proportion to the blocks
    checkpointed (each encoder block keeps the same tensors). Tries none, then every ``depth``-th block,
    and so on down to every block; raises ConfigError naming the figures if even that does not fit."""
    from largemim.config import ConfigError
    from largemim.models.sizes import VIT_SIZES

    depth = VIT_SIZES[cfg.model.size].depth  # the encoder's blocks (grad_ckpt_every applies to these)
    zero = zero_config(ds_json)
    none, every = count_activations_each(cfg, (0, 1))
    batch = cfg.train.micro_batch
    for k in [0, *range(depth, 0, -1)]:
        n = checkpointed_blocks(depth, k)
        per_image = none.per_image - (none.per_image - every.per_image) * n // depth
        acts = ActivationCount(per_image, none.fixed, none.params, none.frozen, none.extra)
        need = predicted_peak(acts, batch, gpus, zero) * reserve / GIB
        if need <= budget_gib:
            return k, need
    raise ConfigError(
        f"model.grad_ckpt_auto: micro-batch {batch} needs about {need:.2f} GiB even with every block "
        f"checkpointed ({reserve}x the predicted peak), over the {budget_gib:.2f} GiB available; lower "
        "train.micro_batch (raise train.grad_accum to keep the global batch) or offload (ds_configs/*offload*)"
    )
