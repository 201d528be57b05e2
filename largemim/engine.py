"""Turn (model, typed config, DeepSpeed JSON) into a DeepSpeed engine: the one place distribution,
precision, activation checkpointing and the optimizer are applied.

The JSON in ds_configs/ holds engine settings only (ZeRO stage, offload, buckets). Batch sizes,
clipping, precision, optimizer and schedule come from the typed config, so the two cannot disagree: a
JSON that sets one of those keys is refused with the config key to use instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import deepspeed
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from largemim import grad_checks
from largemim.config import Config, ConfigError, Plan
from largemim.distributed import cuda_wanted
from largemim.schedule import lr_factor

log = logging.getLogger(__name__)

# JSON keys owned by the typed config, and where they live there.
OWNED_KEYS = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "train.precision",
    "bfloat16": "train.precision",  # DeepSpeed's older name for bf16, still read
    "fp16": "train.precision",
    "amp": "train.precision",
    "torch_autocast": "train.autocast",
    "optimizer": "optim.*",
    "scheduler": "optim.* and train.warmup_*",
}


def load_ds_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ds_config {str(path)!r} does not exist; pick one of ds_configs/*.json")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {str(path)!r} is not valid JSON: {e}") from None
    owned = [k for k in ds if k in OWNED_KEYS]
    if owned:
        where = ", ".join(f"{k!r} -> {OWNED_KEYS[k]}" for k in owned)
        raise ConfigError(f"{path} sets keys that belong to the largemim config ({where}); remove them from the JSON")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def full_ds_config(cfg: Config, plan: Plan, ds: dict) -> dict:
    out = dict(ds)
    out["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    out["gradient_accumulation_steps"] = plan.grad_accum
    out["train_batch_size"] = plan.global_batch
    # Always written: DeepSpeed's default is 1.0, so leaving the key out when optim.grad_clip=0 ("off")
    # would clip at 1.0.
    out["gradient_clipping"] = float(cfg.optim.grad_clip)
    if cfg.train.precision == "bf16" and cfg.train.autocast:
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}  # fp32 weights, bf16 matmuls
    elif cfg.train.precision == "bf16":
        out["bf16"] = {"enabled": True, "check_grad_overflow": cfg.train.check_grad_overflow}
    elif cfg.train.precision == "fp16":
        # Dynamic loss scaling; fp16 at scale NaNs more often than bf16 (see README).
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2}
    out.setdefault("steps_per_print", 1 << 30)  # largemim prints its own progress lines
    out.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer is on by default and synchronises the device at the start of every
    # forward and the end of every step (2 full device syncs per step, so the host never runs ahead of
    # the GPU); largemim logs its own rate, so it is off unless a ds_config turns it on.
    timers = dict(out.get("timers") or {})
    timers.setdefault("throughput", {"enabled": False})
    out["timers"] = timers
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norms (all 1-D tensors), position embeddings and tokens."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 (zero.Init) leaves each rank an empty 1-D slice: the parameter's own shape is ds_shape
        shape = getattr(p, "ds_shape", p.shape)
        (no_decay if len(shape) <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def choose_optimizer(cfg: Config, ds: dict) -> str:
    impl = cfg.optim.impl
    if offloads_optimizer(ds):
        if impl not in ("auto", "deepspeed"):
            raise ConfigError(f"optimizer offload needs DeepSpeedCPUAdam: set optim.impl=auto, not {impl!r}")
        return "deepspeed"  # DeepSpeed builds DeepSpeedCPUAdam for offloaded optimizer states
    if impl == "auto":
        return "torch_fused" if cuda_wanted() else "torch"
    return impl


def _init_from(model: nn.Module, cfg: Config, path: str) -> None:
    """Overwrite the fresh initialisation with the weights at ``path`` (any format the converters read)."""
    from largemim.convert.init_from import apply_init_weights, load_init_weights
    from largemim.models.sizes import VIT_SIZES

    m = cfg.model
    weights = load_init_weights(path, img_size=m.img_size, heads=VIT_SIZES[m.size].heads, decoder_heads=m.decoder_heads)
    untouched = apply_init_weights(model, weights)
    log.info("initialised from %s; %d tensors kept their own initialisation%s", path, len(untouched),
             f" (e.g. {untouched[0]})" if untouched else "")  # fmt: skip


def build_model(cfg: Config, ds_json: dict, init_from: str = "") -> nn.Module:
    """Build the objective; under ZeRO-3 its parameters are created already partitioned across ranks
    (``zero.Init``), then gathered whole once to be initialised (rank 0's values broadcast to all; ~2 GB
    in bf16 for a ViT-g, briefly). ``init_from`` then overwrites the initialisation (a new run only)."""
    from largemim.objectives import build_objective

    if cfg.train.compile == "true" and zero_stage(ds_json) >= 3:
        # Measured on CPU: dynamo traces past ZeRO-3's gather hooks and meets a partitioned (empty) parameter.
        raise ConfigError(
            "train.compile works with ZeRO 0-2; under ZeRO-3 set train.compile=auto or false (DeepSpeed's own "
            "DeepCompile, the 'compile' section of a ds_config, is not wired into largemim yet)"
        )
    if not cfg.train.check_grad_overflow and zero_stage(ds_json) not in (1, 2):
        # DeepSpeed 0.19.8 reads bf16.check_grad_overflow for its ZeRO-1/2 optimizer only: ZeRO-3 always
        # skips a step on an inf/NaN gradient norm, and ZeRO-0's bf16 wrapper ignores the key.
        raise ConfigError(
            f"train.check_grad_overflow=false has an effect under ZeRO-1/2 only (this ds_config is ZeRO-"
            f"{zero_stage(ds_json)}); remove it"
        )
    if zero_stage(ds_json) < 3:
        model = build_objective(cfg)
        if init_from:
            _init_from(model, cfg, init_from)
        return model
    # Precision goes in the config, not as dtype=: DeepSpeed 0.19.8's zero.Init ignores dtype= when a
    # config is given too and picks bf16 on a CPU (an operator-precedence slip in _set_dtype).
    p = cfg.train.precision
    init_cfg = {
        "zero_optimization": ds_json["zero_optimization"],
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "bf16": {"enabled": p == "bf16" and not cfg.train.autocast},
        "fp16": {"enabled": p == "fp16"},
    }
    with deepspeed.zero.Init(config_dict_or_path=init_cfg):
        model = build_objective(cfg, init=False)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        model.init_weights()
        if init_from:
            _init_from(model, cfg, init_from)
    return model


def reapply_optim_config(engine, cfg: Config, plan: Plan) -> None:
    """After a resume: the run's configured optimizer settings win over those saved in the checkpoint.

    Loading an optimizer's state restores its param groups' hyperparameters, and LambdaLR's state restores
    its peak (``base_lrs``), so without this a resume with a lowered ``optim.base_lr`` (the advice after a
    NaN), another world size's scaled lr, or a new weight decay would silently go on with the old values.
    The groups are those of ``param_groups``: [decay, no decay].
    """
    sched = engine.lr_scheduler
    groups = sched.optimizer.param_groups
    changed = []
    saved_peak = sched.base_lrs[0] if sched.base_lrs else plan.lr
    if saved_peak != plan.lr:
        changed.append(f"peak lr {plan.lr:.4g} (was {saved_peak:.4g})")
    sched.base_lrs = [plan.lr for _ in groups]
    lrs = [plan.lr * f(sched.last_epoch) for f in sched.lr_lambdas]
    wanted = {"betas": tuple(cfg.optim.betas), "eps": cfg.optim.eps}
    for i, (group, lr) in enumerate(zip(groups, lrs, strict=True)):
        group["initial_lr"], group["lr"] = plan.lr, lr
        if len(groups) == 2:  # param_groups' [decay, no decay]
            wanted["weight_decay"] = cfg.optim.weight_decay if i == 0 else 0.0
        for key, value in wanted.items():
            old = tuple(group[key]) if key == "betas" else group.get(key)
            if old != value:
                changed.append(f"group {i} {key} {value} (was {old})")
                group[key] = value
    sched._last_lr = lrs
    if changed:
        log.info("the configured optimizer settings replace the checkpoint's: %s", "; ".join(changed))


def build_engine(model: nn.Module, cfg: Config, plan: Plan, ds_json: dict):
    """Returns the DeepSpeed engine (model + optimizer + per-step LR schedule)."""
    encoder = getattr(model, "encoder", None)
    if cfg.model.grad_ckpt_every and encoder is not None:
        encoder.set_grad_checkpointing(cfg.model.grad_ckpt_every)  # before wrapping: the engine only calls forward
    ds = full_ds_config(cfg, plan, ds_json)
    groups = param_groups(model, cfg.optim.weight_decay)
    log.info("AdamW: %d tensors with weight decay %g, %d without", len(groups[0]["params"]), cfg.optim.weight_decay,
             len(groups[1]["params"]))  # fmt: skip
    adam = {"lr": plan.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}
    impl = choose_optimizer(cfg, ds)
    if impl == "deepspeed":
        # DeepSpeed's own AdamW: FusedAdam on CUDA, DeepSpeedCPUAdam with optimizer offload.
        ds["optimizer"] = {"type": "AdamW", "params": adam}
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=plan.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=impl == "torch_fused"
        )
    factor = lr_factor(plan.lr, plan.total_steps, plan.warmup_steps, cfg.optim.min_lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups if optimizer is None else None,
        optimizer=optimizer,
        lr_scheduler=lambda opt: LambdaLR(opt, factor),
        config=ds,
    )
    log.info("engine: ZeRO-%d, %s, optimizer %s", zero_stage(ds), cfg.train.precision, type(engine.optimizer).__name__)
    if cfg.train.foreach_grad_checks and zero_stage(ds) in (1, 2):
        grad_checks.install(engine.optimizer)
    compiled, why = compile_choice(cfg, ds)
    if compiled:
        import torch._dynamo.config as dynamo
        import torch._functorch.config as functorch
        import torch._inductor.config as inductor

        inductor.fallback_random = True  # torch.rand & co. as in eager: the same masks for the same seed
        # The backward graph compiled with the forward, not lazily at the first backward: a failure to
        # compile it then shows in the forward, where dynamo can fall back (a lazy one raises in backward).
        functorch.force_non_lazy_backward_lowering = True
        if cfg.train.compile == "auto":
            dynamo.suppress_errors = True  # a graph that fails to compile runs eagerly, with dynamo's warning
        engine.compile()  # the first steps are slow while inductor compiles
        log.info("train.compile=%s: the objective's forward and backward are compiled on first use (%s)",
                 cfg.train.compile, why)  # fmt: skip
    elif cfg.train.compile == "auto":
        log.info("train.compile=auto: eager (%s); train.compile=true compiles anyway", why)
    return engine


def compile_choice(cfg: Config, ds: dict) -> tuple[bool, str]:
    """(compile?, why) for ``train.compile``: true and false as set; auto compiles the setup that was
    measured faster (BENCHMARKS.md, 2026-11-27, one H200, micro-batch 256: MAE ViT-L/16 1.23x, ViT-H/14
    1.13x): MAE on a CUDA GPU, ZeRO 0-2, DeepSpeed's bf16 mode, no activation checkpointing. Other
    sizes, batches and GPU counts of that setup are compiled too, unmeasured."""
    if cfg.train.compile != "auto":
        return cfg.train.compile == "true", f"train.compile={cfg.train.compile}"
    against = [
        why
        for why, off in (
            ("no CUDA device", not cuda_wanted()),
            (f"objective {cfg.objective.name}, not mae", cfg.objective.name != "mae"),
            ("ZeRO-3", zero_stage(ds) >= 3),
            ("not DeepSpeed's bf16 mode", cfg.train.precision != "bf16" or cfg.train.autocast),
            ("activation checkpointing", bool(cfg.model.grad_ckpt_every)),
        )
        if off
    ]
    return not against, ", ".join(against) or "MAE on CUDA, ZeRO 0-2, bf16, no activation checkpointing"
