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
    # Choose grad_ckpt_every at start-up: the least checkpointing whose predicted peak memory
    # (largemim/memory.py, DeepSpeed's bf16/fp16 mode) fits the GPU, logged. grad_ckpt_budget_gib: the
    # memory the step may use; 0 = the GPU's total less 1 GiB for the CUDA context.
    grad_ckpt_auto: bool = False
    grad_ckpt_budget_gib: float = 0.0
    # Initial weights for a new run (ignored when the run folder holds a checkpoint): a largemim run or
    # checkpoint folder, a converted .safetensors, a reference-MAE .pth, timm ViT weights, or a HF folder.
    init_from: str = ""
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16


@dataclass
class ObjectiveConfig:
    name: str = "mae"  # mae | simmim | beit | dvae | data2vec (largemim.objectives.OBJECTIVES)
    # MAE's 0.75 here; a config that leaves it out gets its objective's own (OWN_MASK_RATIO) from load_config
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # target = each patch's pixels normalised by its own mean and variance
    # Masking (SimMIM, BEiT, data2vec; MAE always masks random patches).
    mask: str = "auto"  # random | block | simmim; auto = the objective's own (SimMIM simmim, BEiT/data2vec block)
    mask_patch_size: int = 32  # simmim masking: pixels per masked square (a multiple of model.patch_size)
    min_block_patches: int = 16  # block masking: smallest block, in patches (BEiT)
    # dVAE tokenizer (BEiT stage 1): Gumbel-softmax temperature decays exponentially from start to end.
    vocab_size: int = 8192
    dvae_hidden: int = 64  # conv width of the dVAE encoder and decoder
    dvae_temp_start: float = 1.0
    dvae_temp_end: float = 0.0625  # DALL-E's 1/16
    dvae_temp_steps: int = 5000  # optimizer steps from start to end temperature
    dvae_kl_weight: float = 0.01  # weight of KL(q || uniform) per latent position
    # BEiT (stage 2): the frozen tokenizer written by tools/export_tokenizer.py from a dvae run.
    tokenizer: str = ""
    # data2vec: EMA teacher, decay ramped linearly from ema_start to ema_end over ema_steps optimizer steps
    # (-1: over the whole run, as data2vec anneals; 0: ema_end throughout).
    ema_start: float = 0.999
    ema_end: float = 0.9999
    ema_steps: int = 10000
    target_layers: int = 6  # average the top-K teacher blocks' FFN outputs
    # each target block's normalisation before the average: instance (per channel over the patches;
    # data2vec 2.0's for images, and its v1 speech recipe) | layer (per patch over channels; the v1 paper's
    # text for vision, which collapsed in the Fashion-MNIST learning run, see README)
    target_norm: str = "instance"
    regression_loss: str = "smooth_l1"  # smooth_l1 | mse
    smooth_l1_beta: float = 2.0

    def mask_kind(self) -> str:
        """The mask generator this objective uses: ``mask`` unless it is "auto"."""
        if self.mask != "auto":
            return self.mask
        return {"simmim": "simmim", "beit": "block", "data2vec": "block"}.get(self.name, "random")


@dataclass
class DataConfig:
    shards: str = MISSING  # brace-expanded path(s), e.g. /data/in1k/train-{000000..001023}.tar; sets joined by ::
    weights: list[float] = field(default_factory=list)  # mixing weight per ::-separated set (resampled only)
    num_samples: int = 0  # samples per epoch; 0 = the manifests' total (manifest.json next to the shards)
    sampling: str = "resampled"  # resampled: shards drawn with replacement | exact: every shard once per epoch
    workers: int = 4  # loader processes per rank; 0 = load in the training process
    lanes: int = 0  # sample streams per rank; 0 = one per worker. Set (e.g. 8) to resume with any workers dividing it
    shuffle_buffer: int = 2000
    # fast: crop chosen from the header, JPEG decoded at reduced scale in the workers | reference: full PIL
    # decode | device: JPEGs decoded, cropped and resized on the training GPU (nvJPEG), see data/device_decode.py
    decode: str = "fast"
    open_retries: int = 3  # reads in all of a shard whose read fails (a pipe:/http reader, a local I/O error)
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
    # bf16 only: keep fp32 weights and run forward/backward under torch.autocast (DeepSpeed's
    # torch_autocast) instead of DeepSpeed's bf16 weights with fp32 master copies: 4 instead of 6 bytes
    # of weights per parameter. Slower since the bf16 mode's gradient checks became one pass: MAE ViT-H/14
    # 847 vs 961 images/s on an H200 (BENCHMARKS.md, 2026-11-27).
    autocast: bool = False
    # torch.compile the objective's forward and backward (DeepSpeed's engine.compile, inductor); random
    # ops keep eager semantics, so a compiled run draws the same masks as an eager one. auto: compiled
    # for the setup measured faster (MAE on a CUDA GPU, ZeRO 0-2, DeepSpeed's bf16 mode, no activation
    # checkpointing; ViT-L/16 1.23x, ViT-H/14 1.13x on one H200), eager elsewhere; true | false force it.
    compile: str = "auto"
    # bf16 mode: DeepSpeed tests every gradient for inf/NaN each step to skip such a step (a host sync, and
    # about a dozen small kernels per parameter tensor unless foreach_grad_checks makes it one pass). bf16
    # has no loss scale to adjust, and the trainer stops on a non-finite loss at the next log line; false
    # saves that work (a step with a non-finite gradient is then applied, and the run stops at the next log
    # line or save instead, without saving it: largemim/health.py).
    check_grad_overflow: bool = True
    # ZeRO-1/2: DeepSpeed's inf/NaN test and gradient norm as one multi-tensor kernel each instead of a
    # Python loop of small kernels per parameter tensor (largemim/grad_checks.py); false keeps DeepSpeed's.
    foreach_grad_checks: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 2
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    load_universal: bool = False  # resume through DeepSpeed's universal format even at the same world size


@dataclass
class LogConfig:
    every_steps: int = 20
    image_every_steps: int = 1000  # reconstruction picture of a fixed batch; 0 = off
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = from largemim.flops' table of known GPUs


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


def _merge(schema, other, where: str, key: str | None = None):
    try:
        return OmegaConf.merge(schema, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise _unknown_key_error(e.full_key or str(e.key), where) from None
    except (OmegaConfBaseException, TypeError) as e:
        # OmegaConf leaves full_key/msg unset for some errors (a tuple of the wrong length): name the
        # override's key (``key``) and OmegaConf's own words instead of "None"
        named = getattr(e, "full_key", None) or key or "a value"
        text = str(getattr(e, "msg", None) or e).splitlines()[0]
        raise ConfigError(f"bad value for {named!r} in {where}: {text}") from None


# The papers' mask ratios, for a config that names an objective but not its ratio.
OWN_MASK_RATIO = {"simmim": 0.6, "beit": 0.4, "data2vec": 0.6}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML recipe at ``path`` < ``overrides`` like ``["optim.lr=1e-4", "run.dir=runs/x"]``."""
    cfg = OmegaConf.structured(Config)
    ratio_given = False
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (recipes live in largemim/recipes/)")
        recipe = OmegaConf.load(path)
        ratio_given = OmegaConf.select(recipe, "objective.mask_ratio", default=None) is not None
        cfg = _merge(cfg, recipe, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        ratio_given |= key.strip() == "objective.mask_ratio"
        # Build the nested dict by hand rather than with from_dotlist, so values are taken verbatim and
        # converted by the schema's type (a shard pattern with braces or a 1e-4 stays what it looks like).
        nested: dict = {}
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(value)
        cfg = _merge(cfg, OmegaConf.create(nested), f"command-line override {item!r}", key.strip())
    try:
        result = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        if "missing mandatory value" in str(e).lower():
            raise ConfigError(f"{e.full_key} must be set (in the recipe or as {e.full_key}=...)") from None
        raise ConfigError(str(e).splitlines()[0]) from None
    # A YAML recipe's `compile: true` arrives as the string "True"; the spellings a bool took are kept.
    value = str(result.train.compile).lower()
    result.train.compile = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}.get(
        value, value
    )
    if result.train.compile not in ("auto", "true", "false"):
        raise ConfigError(f"train.compile={result.train.compile!r} must be auto, true or false")
    if not ratio_given:
        result.objective.mask_ratio = OWN_MASK_RATIO.get(result.objective.name, result.objective.mask_ratio)
    return result


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
    if m.patch_size < 1 or m.img_size < 1:
        raise ConfigError(f"model.patch_size ({m.patch_size}) and model.img_size ({m.img_size}) must be >= 1")
    if m.in_chans != 3:
        raise ConfigError(f"model.in_chans={m.in_chans}: the data pipeline decodes every image to RGB, so it must be 3")
    if m.decoder_dim % 4 or m.decoder_dim % max(1, m.decoder_heads) or m.decoder_heads < 1:
        raise ConfigError(
            f"model.decoder_dim={m.decoder_dim} must be a multiple of 4 (its sin-cos positions) and of "
            f"model.decoder_heads={m.decoder_heads} (>= 1), e.g. 512 and 16"
        )
    if m.grad_ckpt_every < 0:
        raise ConfigError(f"model.grad_ckpt_every={m.grad_ckpt_every} must be >= 0 (0: off, k: every k-th block)")
    if m.img_size % m.patch_size:
        below = m.img_size // m.patch_size * m.patch_size
        raise ConfigError(
            f"model.img_size {m.img_size} is not a multiple of model.patch_size {m.patch_size}; "
            f"use img_size {below} or {below + m.patch_size}"
        )
    if not 0.0 < o.mask_ratio < 1.0:
        raise ConfigError(f"objective.mask_ratio={o.mask_ratio} must be strictly between 0 and 1 (MAE uses 0.75)")
    if cfg.run.seed < 0:
        raise ConfigError(f"run.seed={cfg.run.seed} must be >= 0 (numpy's seed sequences take no negative numbers)")
    check_objective(cfg)
    c, lg = cfg.checkpoint, cfg.log
    for name, value in (("checkpoint.every_steps", c.every_steps), ("log.every_steps", lg.every_steps)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be >= 1 (a run always saves and logs at its last step)")
    if c.keep_last < 1:
        raise ConfigError(
            f"checkpoint.keep_last={c.keep_last} must be >= 1: the checkpoints kept (each save then "
            "deletes the older ones); to keep every one, set it above train steps / checkpoint.every_steps"
        )
    for name, value in (("log.image_every_steps", lg.image_every_steps), ("eval.every_steps", cfg.eval.every_steps)):
        if value < 0:
            raise ConfigError(f"{name}={value} must be >= 0 (0: off)")
    d = cfg.data
    if d.sampling not in ("resampled", "exact"):
        raise ConfigError(f"data.sampling={d.sampling!r} must be 'resampled' or 'exact'")
    if d.lanes and d.lanes % max(1, d.workers):
        raise ConfigError(f"data.lanes={d.lanes} must be a multiple of data.workers={d.workers} (or 0: one per worker)")
    if d.decode not in ("fast", "reference", "device"):
        raise ConfigError(f"data.decode={d.decode!r} must be 'fast', 'reference' or 'device'")
    sets = [p for p in d.shards.split("::") if p.strip()]
    if d.weights and len(d.weights) != len(sets):
        raise ConfigError(f"data.weights has {len(d.weights)} entries for {len(sets)} '::'-separated shard sets")
    if d.weights and (d.sampling == "exact" or min(d.weights) < 0 or sum(d.weights) <= 0):
        raise ConfigError("data.weights need data.sampling=resampled and non-negative weights with a positive sum")
    if t.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision={t.precision!r} must be one of bf16, fp16, fp32")
    if t.autocast and t.precision != "bf16":
        raise ConfigError(f"train.autocast needs train.precision=bf16 (got {t.precision})")
    if cfg.model.grad_ckpt_auto and cfg.model.grad_ckpt_every:
        raise ConfigError("set model.grad_ckpt_every or model.grad_ckpt_auto=true, not both")
    if cfg.model.grad_ckpt_auto and (t.precision == "fp32" or t.autocast or cfg.objective.name == "dvae"):
        raise ConfigError(
            "model.grad_ckpt_auto predicts memory for DeepSpeed's bf16/fp16 mode and ViT objectives only; "
            "set model.grad_ckpt_every by hand (tools/memory_table.py helps)"
        )
    if not t.check_grad_overflow and (t.precision != "bf16" or t.autocast):
        raise ConfigError(
            "train.check_grad_overflow=false applies to DeepSpeed's bf16 mode only (train.precision=bf16, "
            "train.autocast=false): fp16's loss scaling needs the check, and fp32 and autocast runs make none"
        )
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
    if t.steps < 0 or t.epochs < 0:
        raise ConfigError(f"train.steps ({t.steps}) and train.epochs ({t.epochs}) must not be negative")
    total = t.steps if t.steps else max(1, math.ceil(t.epochs * steps_per_epoch))
    if t.warmup_steps and t.warmup_epochs:
        raise ConfigError("set at most one of train.warmup_steps and train.warmup_epochs")
    warmup = t.warmup_steps if t.warmup_steps else round(t.warmup_epochs * steps_per_epoch)
    if warmup > total:
        raise ConfigError(f"warm-up ({warmup} steps) is longer than the run ({total} steps)")
    lr = cfg.optim.lr if cfg.optim.lr else cfg.optim.base_lr * global_batch / 256
    return Plan(world_size, global_batch, total, warmup, steps_per_epoch, lr, micro_per_epoch, grad_accum)


def check_objective(cfg: Config) -> None:
    """Check the objective's own settings against the model; called by ``make_plan``."""
    m, o = cfg.model, cfg.objective
    from largemim.models.sizes import VIT_SIZES  # local import keeps config importable without torch

    kinds = ("random", "block", "simmim")
    if o.mask != "auto" and o.mask not in kinds:
        raise ConfigError(f"objective.mask={o.mask!r} must be auto or one of {', '.join(kinds)}")
    kind = o.mask_kind()
    if o.name == "mae" and kind != "random":
        raise ConfigError(f"objective.mask={o.mask!r}: MAE drops the hidden patches and masks random ones only")
    if o.name in ("simmim", "beit", "data2vec"):
        grid = m.img_size // m.patch_size
        hidden = grid * grid - int(grid * grid * (1 - o.mask_ratio))
        if kind == "simmim":
            unit = o.mask_patch_size
            if unit < m.patch_size or unit % m.patch_size or m.img_size % unit:
                raise ConfigError(
                    f"objective.mask_patch_size={unit} must be a multiple of model.patch_size {m.patch_size} that "
                    f"divides model.img_size {m.img_size} (SimMIM masks {unit}-pixel squares of whole patches)"
                )
        if kind == "block" and o.min_block_patches < 1:
            raise ConfigError(f"objective.min_block_patches={o.min_block_patches} must be >= 1 (BEiT uses 16)")
        if hidden < 1:
            raise ConfigError(f"objective.mask_ratio={o.mask_ratio} hides no patch of the {grid}x{grid} grid")
    if o.name == "dvae":
        if o.vocab_size < 2 or o.dvae_hidden < 1:
            raise ConfigError(
                f"objective.vocab_size ({o.vocab_size}) must be >= 2 and objective.dvae_hidden ({o.dvae_hidden}) >= 1"
            )
        if not 0.0 < o.dvae_temp_end <= o.dvae_temp_start or o.dvae_temp_steps < 1:
            raise ConfigError(
                f"the dVAE temperature must fall from objective.dvae_temp_start ({o.dvae_temp_start}) to "
                f"objective.dvae_temp_end ({o.dvae_temp_end}) > 0 over objective.dvae_temp_steps "
                f"({o.dvae_temp_steps}) >= 1 steps (DALL-E: 1 to 1/16)"
            )
        if o.dvae_kl_weight < 0:
            raise ConfigError(f"objective.dvae_kl_weight={o.dvae_kl_weight} must be >= 0")
        if cfg.eval.train_shards or cfg.eval.test_shards:
            raise ConfigError("the dVAE has no ViT encoder to check: set eval.train_shards= and eval.test_shards=")
        if m.grad_ckpt_every:
            raise ConfigError("model.grad_ckpt_every applies to ViT blocks; the dVAE has none: set it to 0")
    if o.name == "beit":
        if not o.tokenizer:
            raise ConfigError(
                "objective.tokenizer must name a tokenizer file: train one with objective.name=dvae, then write it "
                "with 'python tools/export_tokenizer.py RUN_DIR'"
            )
        if not Path(o.tokenizer).is_file():
            raise ConfigError(
                f"objective.tokenizer={o.tokenizer!r} does not exist; write it from a dvae run with "
                "'python tools/export_tokenizer.py RUN_DIR'"
            )
    if o.name == "data2vec":
        if not 0.0 <= o.ema_start <= o.ema_end <= 1.0 or o.ema_steps < -1:
            raise ConfigError(
                f"the EMA decay must rise from objective.ema_start ({o.ema_start}) to objective.ema_end "
                f"({o.ema_end}) <= 1 over objective.ema_steps ({o.ema_steps}) steps, >= 0 or -1 for the whole "
                "run (data2vec: 0.999 to 0.9999)"
            )
        depth = VIT_SIZES[m.size].depth if m.size in VIT_SIZES else None
        if o.target_layers < 1 or (depth is not None and o.target_layers > depth):
            raise ConfigError(
                f"objective.target_layers={o.target_layers} must be between 1 and the encoder depth ({depth})"
            )
        if o.target_norm not in ("layer", "instance"):
            raise ConfigError(f"objective.target_norm={o.target_norm!r} must be instance or layer")
        if o.regression_loss not in ("smooth_l1", "mse"):
            raise ConfigError(f"objective.regression_loss={o.regression_loss!r} must be smooth_l1 or mse")
        if o.regression_loss == "smooth_l1" and o.smooth_l1_beta <= 0:
            raise ConfigError(f"objective.smooth_l1_beta={o.smooth_l1_beta} must be > 0 (data2vec uses 2)")
