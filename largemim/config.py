"""Typed run configuration: dataclass defaults, then a YAML recipe, then dotted ``key=value`` overrides.

OmegaConf does the merging and type conversion with struct mode on, so a key that is not in the schema
is an error; this module turns OmegaConf's errors into messages that name the key and suggest the
nearest one, and checks derived quantities (batch arithmetic, patch grid, mask ratio) before anything
starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says what and how."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0


@dataclass
class ModelConfig:
    size: str = "base"  # a row of largemim.models.sizes.VIT_SIZES
    patch_size: int = 16
    img_size: int = 224
    in_chans: int = 3
    grad_ckpt_every: int = 0  # checkpoint every k-th encoder block's activations; 0 = off
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16


@dataclass
class ObjectiveConfig:
    name: str = "mae"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # target = each patch's pixels normalised by its own mean and variance


@dataclass
class DataConfig:
    shards: str = MISSING  # brace-expanded path(s), e.g. /data/in1k/train-{000000..001023}.tar
    num_samples: int = 0  # samples in the shard set; 0 = read manifest.json next to the shards
    workers: int = 4  # loader processes per rank; 0 = load in the training process
    shuffle_buffer: int = 2000
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256 (MAE's rule) unless lr is set
    lr: float = 0.0
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 = off
    impl: str = "auto"  # auto | torch | torch_fused | deepspeed


@dataclass
class TrainConfig:
    micro_batch: int = 64  # per rank, per forward
    grad_accum: int = 0  # 0 = derived: global_batch / (micro_batch x world size), or 1 if global_batch is 0
    global_batch: int = 0  # if set, must equal micro_batch * grad_accum * world size
    steps: int = 0  # length in optimizer steps, or ...
    epochs: float = 0.0  # ... in epochs of data.num_samples (exactly one of the two)
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    precision: str = "bf16"  # bf16 | fp16 | fp32


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 2
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class LogConfig:
    every_steps: int = 20
    image_every_steps: int = 1000  # reconstruction picture of a fixed batch; 0 = off
    tensorboard: bool = True


@dataclass
class EvalConfig:
    """Representation check: kNN and linear probe on encoder features of a labelled shard set."""

    train_shards: str = ""  # labelled shards to fit kNN / the probe on; "" = no check
    test_shards: str = ""
    train_samples: int = 5000
    test_samples: int = 1000
    knn_k: int = 20
    every_steps: int = 0  # 0 = only at the start (random init) and at the end


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ds_config: str = "ds_configs/zero2.json"  # engine settings only (ZeRO stage, offload, buckets)


def _all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls or Config):
        keys.append(prefix + f.name)
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            keys.extend(_all_keys(f.default_factory, prefix + f.name + "."))
    return keys


def _unknown_key_error(key: str, where: str) -> ConfigError:
    candidates = _all_keys()
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    if not close:  # a typo in the last part only: compare leaf names inside the same section
        leaf = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1]], cutoff=0.7)]
    hint = f"; did you mean {' or '.join(repr(c) for c in close[:3])}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _merge(schema, other, where: str):
    try:
        return OmegaConf.merge(schema, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise _unknown_key_error(e.full_key or str(e.key), where) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value for {e.full_key!r} in {where}: {str(e.msg).splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML recipe at ``path`` < ``overrides`` like ``["optim.lr=1e-4", "run.dir=runs/x"]``."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (recipes live in largemim/recipes/)")
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        # Build the nested dict by hand rather than with from_dotlist, so values are taken verbatim and
        # converted by the schema's type (a shard pattern with braces or a 1e-4 stays what it looks like).
        nested: dict = {}
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(value)
        cfg = _merge(cfg, OmegaConf.create(nested), f"command-line override {item!r}")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        if "missing mandatory value" in str(e).lower():
            raise ConfigError(f"{e.full_key} must be set (in the recipe or as {e.full_key}=...)") from None
        raise ConfigError(str(e).splitlines()[0]) from None


def _parse_value(value: str):
    value = value.strip()
    if value.startswith("[") or value.startswith("("):  # lists and tuples: [0.2,1.0] or (0.2,1.0)
        inner = value[1:-1].strip()
        return [_parse_value(v) for v in inner.split(",")] if inner else []
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value  # OmegaConf converts strings to the schema's int/float/bool and says so if it can't


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: Config, run_dir: Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------
# Derived quantities: converted once, checked before anything expensive starts.


@dataclass(frozen=True)
class Plan:
    """What the run will do, in steps: the only unit the loop knows."""

    world_size: int
    global_batch: int
    total_steps: int
    warmup_steps: int
    steps_per_epoch: float  # optimizer steps per pass over data.num_samples (informational)
    lr: float
    micro_batches_per_epoch: int  # per rank; every rank yields exactly this many per data epoch
    grad_accum: int


def make_plan(cfg: Config, world_size: int, num_samples: int) -> Plan:
    """Check the config against the world size and data set size and convert epochs to steps."""
    m, t, o = cfg.model, cfg.train, cfg.objective
    from largemim.models.sizes import VIT_SIZES  # local import keeps config importable without torch

    if m.size not in VIT_SIZES:
        close = difflib.get_close_matches(m.size, list(VIT_SIZES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.size={m.size!r} is not in the size table ({', '.join(VIT_SIZES)}){hint}")
    if m.img_size % m.patch_size:
        below = m.img_size // m.patch_size * m.patch_size
        raise ConfigError(
            f"model.img_size {m.img_size} is not a multiple of model.patch_size {m.patch_size}; "
            f"use img_size {below} or {below + m.patch_size}"
        )
    if not 0.0 < o.mask_ratio < 1.0:
        raise ConfigError(f"objective.mask_ratio={o.mask_ratio} must be strictly between 0 and 1 (MAE uses 0.75)")
    if t.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision={t.precision!r} must be one of bf16, fp16, fp32")
    if cfg.optim.impl not in ("auto", "torch", "torch_fused", "deepspeed"):
        raise ConfigError(f"optim.impl={cfg.optim.impl!r} must be one of auto, torch, torch_fused, deepspeed")
    if t.micro_batch < 1 or t.grad_accum < 0:
        raise ConfigError(
            f"train.micro_batch ({t.micro_batch}) must be >= 1 and train.grad_accum ({t.grad_accum}) >= 0"
        )
    per_pass = t.micro_batch * world_size
    grad_accum = t.grad_accum
    if not grad_accum:  # derive it from the global batch
        if t.global_batch and t.global_batch % per_pass:
            raise ConfigError(
                f"train.global_batch {t.global_batch} is not divisible by micro_batch {t.micro_batch} x world size "
                f"{world_size} = {per_pass}; change train.micro_batch or the number of ranks"
            )
        grad_accum = t.global_batch // per_pass if t.global_batch else 1
    global_batch = per_pass * grad_accum
    if t.global_batch and t.global_batch != global_batch:
        hint = (
            f"; set train.grad_accum={t.global_batch // per_pass} (or 0 to derive it)"
            if t.global_batch % per_pass == 0
            else ""
        )
        raise ConfigError(
            f"train.global_batch {t.global_batch} != micro_batch {t.micro_batch} x grad_accum {grad_accum} "
            f"x world size {world_size} = {global_batch}{hint}"
        )
    if num_samples < global_batch:
        raise ConfigError(
            f"the data set has {num_samples} samples, fewer than one global batch ({global_batch}); "
            "lower train.micro_batch or use more data"
        )
    micro_per_epoch = num_samples // per_pass
    steps_per_epoch = micro_per_epoch / grad_accum
    if bool(t.steps) == bool(t.epochs):
        raise ConfigError(f"set exactly one of train.steps ({t.steps}) and train.epochs ({t.epochs})")
    total = t.steps if t.steps else max(1, math.ceil(t.epochs * steps_per_epoch))
    if t.warmup_steps and t.warmup_epochs:
        raise ConfigError("set at most one of train.warmup_steps and train.warmup_epochs")
    warmup = t.warmup_steps if t.warmup_steps else round(t.warmup_epochs * steps_per_epoch)
    if warmup > total:
        raise ConfigError(f"warm-up ({warmup} steps) is longer than the run ({total} steps)")
    lr = cfg.optim.lr if cfg.optim.lr else cfg.optim.base_lr * global_batch / 256
    return Plan(world_size, global_batch, total, warmup, steps_per_epoch, lr, micro_per_epoch, grad_accum)
