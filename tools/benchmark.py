"""Training throughput of largemim's DeepSpeed engine, side by side with Hugging Face's ViTMAE.

One process, one device, synthetic images already on the device (no data loading is timed). For the
configured model, mask ratio, decoder, ZeRO stage, precision, activation checkpointing and micro-batch
it builds the real engine (``largemim.engine.build_model`` + ``build_engine``), warms up, times
``--steps`` optimizer steps (CUDA events on a GPU, ``perf_counter`` on the CPU), then trains
``transformers.ViTMAEForPreTraining`` of the same shape the way a plain torch loop would (SDPA
attention, autocast, torch AdamW, fused on CUDA) at the same batch, and prints images/s, TFLOP/s, MFU
where the device's peak is known, peak memory and the ratio largemim / HF. Each result is one JSON
line on stdout (and appended to ``--jsonl``); a readable summary goes to stderr.

Settings are largemim's own config keys, as for training (a recipe and/or dotted overrides):

    python tools/benchmark.py model.size=large model.patch_size=16 train.micro_batch=128 \\
        train.precision=bf16 ds_config=ds_configs/zero2.json model.grad_ckpt_every=0 optim.impl=auto

``--sweep-memory`` (CUDA only) finds the largest micro-batch that fits for each DeepSpeed JSON in
``--sweep-configs``, without and with activation checkpointing, each try in a fresh subprocess so
that an out-of-memory error cannot poison the next one.

largemim's default ``train.compile=auto`` compiles on a GPU (MAE, ZeRO 0-2, bf16, no activation
checkpointing) while the HF loop runs eagerly unless ``--hf-compile``; ``train.compile=false`` gives the
eager pair, ``--hf-compile`` the compiled one.

Numbers are only comparable on the same machine in the same run: run the pair, read the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OOM_EXIT = 3  # exit status of a run that ran out of device memory (read by --sweep-memory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML recipe (default: the built-in defaults, ViT-B/16 MAE)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides: model.size=large train.micro_batch=64 ...")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, kernels, autotuning)")
    ap.add_argument("--impl", choices=["both", "largemim", "hf"], default="both")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU; overrides the table")
    ap.add_argument("--require-flash", action="store_true", help="fail unless SDPA can use flash attention (CUDA)")
    ap.add_argument("--jsonl", help="also append every JSON line to this file")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile N more steps of each implementation (torch.profiler): top operators and "
        "the host's share of the step, to stderr",
    )
    ap.add_argument("--trace-dir", help="with --profile: also write a Chrome trace per implementation here")
    ap.add_argument(
        "--count-ops",
        type=int,
        default=0,
        metavar="N",
        help="after timing, count the operators N more steps of each implementation dispatch, per phase "
        "(forward, backward, optimizer step): device kernels, host syncs and metadata-only views, to stderr",
    )
    ap.add_argument(
        "--hf-compile", action="store_true",
        help="torch.compile the HF model too (model.compile(), inductor): the compiled pair, where largemim "
        "compiles (train.compile=auto on a GPU)",
    )  # fmt: skip
    ap.add_argument(
        "--mem-cap-gib", type=float, default=0.0,
        help="CUDA: let this process allocate at most this many GiB (e.g. 79 on a bigger card: an 80 GB GPU)",
    )  # fmt: skip
    ap.add_argument("--sweep-memory", action="store_true", help="largest micro-batch per ZeRO stage, +/- act. ckpt")
    ap.add_argument(
        "--sweep-configs",
        default="ds_configs/zero0.json,ds_configs/zero1.json,ds_configs/zero2.json,ds_configs/zero3.json",
        help="comma-separated DeepSpeed JSONs for --sweep-memory",
    )
    ap.add_argument("--sweep-start", type=int, default=8, help="first micro-batch tried by --sweep-memory")
    ap.add_argument("--sweep-max", type=int, default=4096, help="largest micro-batch tried by --sweep-memory")
    ap.add_argument("--sweep-resolution", type=float, default=0.125, help="stop bisecting at this fraction")
    ap.add_argument("--sweep-timeout", type=int, default=300, help="seconds per try in --sweep-memory")
    return ap.parse_intermixed_args(argv)  # overrides may come before, between and after options


def select_device(choice: str) -> str:
    """Decide before DeepSpeed is imported: it picks its accelerator once, at import."""
    if choice == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
        return "cpu"
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark: --device cuda but torch sees no CUDA device")
    if torch.cuda.is_available():
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            del os.environ["DS_ACCELERATOR"]
        return "cuda"
    os.environ["DS_ACCELERATOR"] = "cpu"
    return "cpu"


def bench_config(args: argparse.Namespace):
    """The typed config, with the run length set by --warmup/--steps (data is synthetic)."""
    from largemim.config import ConfigError, load_config

    cfg = load_config(args.config, ["data.shards=synthetic", *args.overrides])
    if cfg.model.grad_ckpt_auto:
        raise ConfigError(
            "tools/benchmark.py times a fixed configuration: set model.grad_ckpt_every instead of "
            "model.grad_ckpt_auto (tools/memory_table.py shows what auto would pick)"
        )
    cfg.train.steps, cfg.train.epochs = args.warmup + args.steps, 0.0
    cfg.train.warmup_steps, cfg.train.warmup_epochs = 0, 0.0
    # Every timed step is one micro-batch and its optimizer step, as on the Hugging Face side: a recipe's
    # global batch would make DeepSpeed accumulate, and the timed steps would hold no optimizer step.
    cfg.train.global_batch, cfg.train.grad_accum = 0, 1
    return cfg


# ---------------------------------------------------------------------------------------------------
# Timing and memory


def time_steps(step, warmup: int, steps: int, device) -> tuple[float, float]:
    """(seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones, the last loss)."""
    import torch

    loss = None
    for _ in range(warmup):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = step()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        seconds = time.perf_counter() - t0
    return seconds, float(loss)


def profile_steps(step, args, device, label: str) -> None:
    """``--profile N``: where N more steps spend their time, printed to stderr.

    The table lists operators by self time on the device (on a GPU) or the CPU. Below it, the host's
    busy time per step against the step's wall time: a host busy for nearly the whole step means the
    GPU waits for kernel launches (launch-bound: fewer, larger kernels or CUDA graphs help), a host
    mostly idle means the GPU's kernels themselves are the limit."""
    if args.profile <= 0:
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile):
            step()
        host = time.perf_counter() - t0  # until the last launch returned
        sync()
        wall = time.perf_counter() - t0
    ops = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"== profile: {label}, {args.profile} steps", file=sys.stderr)
    print(ops.table(sort_by=sort, row_limit=20), file=sys.stderr)
    kernels = sum(e.count for e in ops if cuda and e.self_device_time_total > 0)
    print(
        f"   {label}: {wall / args.profile * 1e3:.1f} ms per step, host returns after "
        f"{host / args.profile * 1e3:.1f} ms"
        + (f", {kernels / args.profile:.0f} device kernels per step" if cuda else ""),
        file=sys.stderr,
    )
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace_dir) / f"{label}.json"))


# Operators that read a device value back to the host: on a GPU each one waits for every kernel queued
# before it (``.item()``, ``bool(t)`` and ``torch.equal`` dispatch to ``_local_scalar_dense``/``equal``;
# ``nonzero`` and ``masked_select`` need their output size).
HOST_SYNC_OPS = frozenset(
    {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim"}
)


def count_ops(phases, args, device, label: str) -> dict | None:
    """``--count-ops N``: operators dispatched per step in each phase, averaged over N steps.

    Counted with a ``TorchDispatchMode``, so for the same code path the count is about the same on any
    device: every operator costs the host a dispatch (microseconds of Python and C++), and each "kernel"
    also launches device work that the GPU runs in order (some operators launch several; kernels that an
    extension launches itself, e.g. DeepSpeed's FusedAdam, are not seen). Views (``view``, ``detach``,
    ``t``, ...) only make a new tensor header. A host sync stalls the host until the GPU has drained its
    queue: operators that read a value back (and, on a GPU, blocking copies to the CPU), and DeepSpeed's
    ``synchronize()`` calls; on a CPU every read-back is counted (torch's non-fused optimizers read their
    CPU step counters too). A failure here is reported and leaves the timing measured before intact."""
    if args.count_ops <= 0:
        return None
    try:
        return _count_ops(phases, args, device, label)
    except Exception as e:  # noqa: BLE001 - a diagnostic: the timing measured before must still be reported
        print(f"   {label}: --count-ops failed ({type(e).__name__}: {e}); timing kept", file=sys.stderr, flush=True)
        return None


def _is_blocking_copy_to_host(name: str, a: tuple, kw: dict, torch) -> bool:
    """A device-to-CPU copy that the host waits for (``.cpu()``, ``.tolist()``, ``copy_`` into CPU memory)."""
    if kw.get("non_blocking") or (name == "copy_" and len(a) > 2 and a[2]):
        return False
    if name == "_to_copy":
        target = kw.get("device")
        return bool(a) and a[0].is_cuda and target is not None and torch.device(target).type == "cpu"
    if name == "copy_":
        return len(a) >= 2 and not a[0].is_cuda and isinstance(a[1], torch.Tensor) and a[1].is_cuda
    return False


def _count_ops(phases, args, device, label: str) -> dict:
    import torch
    from deepspeed.accelerator import get_accelerator
    from torch.utils._python_dispatch import TorchDispatchMode

    cuda = device.type == "cuda"

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kernels = self.views = self.syncs = 0
            self.by_op: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            kw = kw or {}
            name = func.overloadpacket.__name__
            self.by_op[name] = self.by_op.get(name, 0) + 1
            if name in HOST_SYNC_OPS:
                if not cuda or any(isinstance(t, torch.Tensor) and t.is_cuda for t in a):
                    self.syncs += 1
            elif cuda and name in ("_to_copy", "copy_") and _is_blocking_copy_to_host(name, a, kw, torch):
                self.syncs += 1
            elif getattr(func, "is_view", False):
                self.views += 1
            elif not name.startswith("_record_function"):  # profiler markers
                self.kernels += 1
            return func(*a, **kw)

    counters = {name: Counter() for name, _ in phases}
    # DeepSpeed also waits for the device outside any operator (get_accelerator().synchronize()): counted
    # as host syncs too. Some of those calls only run on a GPU: ZeRO-1/2 with overlap_comm synchronises
    # in each bucket reduce and at the end of the backward where the accelerator does not order its
    # streams itself, and DeepSpeed's CPU accelerator does (it has no side streams), so a CPU count
    # leaves them out.
    accelerator = get_accelerator()
    device_sync = accelerator.synchronize
    was_own = "synchronize" in vars(accelerator)
    current: list = []

    def counted_sync(*a, **kw):
        if current:
            current[0].syncs += 1
        return device_sync(*a, **kw)

    accelerator.synchronize = counted_sync
    try:
        for _ in range(args.count_ops):
            for name, fn in phases:
                current[:] = [counters[name]]
                with counters[name]:
                    fn()
    finally:
        if was_own:
            accelerator.synchronize = device_sync
        else:
            del accelerator.synchronize
    n = args.count_ops
    per_phase = {
        name: {"kernels": c.kernels / n, "syncs": c.syncs / n, "views": c.views / n} for name, c in counters.items()
    }
    total = {k: sum(p[k] for p in per_phase.values()) for k in ("kernels", "syncs", "views")}
    top_step = sorted(counters["step"].by_op.items(), key=lambda kv: -kv[1])[:8]
    text = ", ".join(f"{name} {p['kernels']:.0f}" for name, p in per_phase.items())
    print(
        f"   {label}: operators per step: device kernels {total['kernels']:.0f} ({text}), host syncs "
        f"{total['syncs']:.0f}, views {total['views']:.0f}; step's most frequent: "
        + ", ".join(f"{k} {v / n:.0f}" for k, v in top_step),
        file=sys.stderr,
        flush=True,
    )
    return {"phases": per_phase, "total": total, "step_top_ops": {k: v / n for k, v in top_step}}


def measure(phases, args, device, label: str) -> tuple[float, float, dict]:
    """Time the step made of ``phases`` (name, function) run in order, the last returning the loss; then
    ``--profile`` and ``--count-ops`` it. Returns (seconds, last loss, extra fields for the JSON record)."""

    def step():
        result = None
        for _, fn in phases:
            result = fn()
        return result

    # Python's garbage collector off while timing, for both implementations alike: DeepSpeed turns it off
    # for as long as an engine exists, so the HF loop would otherwise be timed with it on
    enabled = gc.isenabled()
    gc.disable()
    try:
        seconds, loss = time_steps(step, args.warmup, args.steps, device)
    finally:
        if enabled:
            gc.enable()
    profile_steps(step, args, device, label)
    ops = count_ops(phases, args, device, label)
    return seconds, loss, ({"ops_per_step": ops} if ops else {})


def reset_memory(device) -> float:
    """Free what the previous implementation left and start a new peak; returns GiB still allocated."""
    import torch

    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def peak_memory(device, before_gib: float) -> dict:
    """Peak allocated during this implementation's build and steps, less what was allocated before it
    (so that anything the previous implementation left behind is not charged to this one)."""
    import torch

    if device.type != "cuda":
        return {"peak_mem_gib": None, "peak_reserved_gib": None}
    return {
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30 - before_gib, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3),
    }


def flash_attention_usable(cfg, device) -> bool | None:
    """Whether SDPA's flash kernel accepts both head sizes at the compute precision (None on the CPU)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from largemim.models.sizes import VIT_SIZES

    if device.type != "cuda":
        return None
    size = VIT_SIZES[cfg.model.size]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.half, "fp32": torch.float}[cfg.train.precision]
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for hd in (size.width // size.heads, cfg.model.decoder_dim // cfg.model.decoder_heads):
                q = torch.randn(2, 2, 64, hd, device=device, dtype=dtype, requires_grad=True)
                F.scaled_dot_product_attention(q, q, q).sum().backward()
        return True
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------------------
# The two implementations


def synthetic_images(cfg, device):
    """One micro-batch of noise images, made on the device once: no input pipeline is timed."""
    import torch

    m = cfg.model
    return torch.randn(cfg.train.micro_batch, m.in_chans, m.img_size, m.img_size, device=device)


def run_largemim(cfg, args, device) -> dict:
    import torch

    from largemim.config import make_plan
    from largemim.engine import build_engine, build_model, load_ds_json, zero_stage

    plan = make_plan(cfg, world_size=1, num_samples=1 << 40)
    ds_path = Path(cfg.ds_config)
    ds_json = load_ds_json(ds_path if ds_path.exists() or ds_path.is_absolute() else REPO / ds_path)
    mem_before = reset_memory(device)
    torch.manual_seed(cfg.run.seed)
    # Create the parameters on the device directly (a ViT-g initialised on the CPU takes a while);
    # under ZeRO-3 zero.Init places and partitions them itself.
    where = torch.device(device) if zero_stage(ds_json) < 3 else contextlib.nullcontext()
    with where:
        model = build_model(cfg, ds_json)
    engine = build_engine(model, cfg, plan, ds_json)
    engine.train()
    images = synthetic_images(cfg, device)

    state = {}

    def forward():
        state["out"] = engine(images)

    def backward():
        engine.backward(state["out"]["loss"])

    def optimizer_step():
        engine.step()
        return state.pop("out")["loss"].detach()

    phases = [("forward", forward), ("backward", backward), ("step", optimizer_step)]
    seconds, loss, ops = measure(phases, args, device, "largemim")
    optimizer = type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__
    fused = getattr(getattr(engine.optimizer, "optimizer", engine.optimizer), "defaults", {}).get("fused")
    mode = f"DeepSpeed {cfg.train.precision}" if cfg.train.precision != "fp32" else "fp32"
    if cfg.train.autocast:
        mode = "DeepSpeed torch_autocast bf16"
    result = {
        "impl": "largemim",
        "zero_stage": zero_stage(ds_json),
        "optimizer": optimizer + (" (fused)" if fused else ""),
        "precision_mode": mode + (", compiled" if engine.is_compiled else ""),
        "compiled": engine.is_compiled,
        "fused_attn": bool(getattr(model.encoder.blocks[0].attn, "fused_attn", False)),
        "seconds": seconds,
        "loss": loss,
        "mem_before_gib": round(mem_before, 3),
        **peak_memory(device, mem_before),
        **ops,
    }
    # Free the engine before HF runs in this process: its leftovers (4-14 GiB measured on an H200) would
    # count in HF's reserved memory and take its room on an 80 GB card.
    # (The locals go with this frame; run_hf's reset_memory collects and empties the cache.)
    engine.destroy()
    state.clear()
    return result


def build_hf(cfg, device):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from largemim.models.sizes import VIT_SIZES

    m, size = cfg.model, VIT_SIZES[cfg.model.size]
    config = ViTMAEConfig(
        hidden_size=size.width,
        num_hidden_layers=size.depth,
        num_attention_heads=size.heads,
        intermediate_size=size.mlp_dim,
        image_size=m.img_size,
        patch_size=m.patch_size,
        num_channels=m.in_chans,
        qkv_bias=True,
        decoder_hidden_size=m.decoder_dim,
        decoder_num_hidden_layers=m.decoder_depth,
        decoder_num_attention_heads=m.decoder_heads,
        decoder_intermediate_size=int(m.decoder_dim * 4),
        mask_ratio=cfg.objective.mask_ratio,
        norm_pix_loss=cfg.objective.norm_pix_loss,
        layer_norm_eps=1e-6,  # as MAE's and timm's ViT
        hidden_act="gelu",
    )
    import torch

    with torch.device(device):
        model = ViTMAEForPreTraining._from_config(config, attn_implementation="sdpa")
    if m.grad_ckpt_every:
        enc = model.vit
        enable = getattr(enc, "activation_checkpointing_enable", None)  # transformers >= 5.2x
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The same blocks as largemim: encoder blocks 0, k, 2k, ...; the decoder keeps its activations.
        layers = [mod for mod in enc.modules() if type(mod).__name__ == "ViTMAELayer"]
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i % m.grad_ckpt_every == 0
    return model


def run_hf(cfg, args, device) -> dict:
    import torch

    from largemim.config import make_plan

    mem_before = reset_memory(device)
    torch.manual_seed(cfg.run.seed)
    model = build_hf(cfg, device)
    model.train()
    if args.hf_compile:
        model.compile()  # in place, as DeepSpeed's engine.compile does largemim's; compiles in the warm-up
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda" or cfg.optim.impl == "torch_fused"  # on a CPU only when asked (as largemim)
    lr = make_plan(cfg, world_size=1, num_samples=1 << 40).lr  # the same as largemim's (no effect on speed)
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=fused)
    precision = cfg.train.precision
    # What a plain torch loop does for mixed precision: fp32 weights and optimizer, autocast compute.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.half}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    params = [p for g in groups for p in g["params"]]
    images = synthetic_images(cfg, device)

    state = {}

    def forward():
        with autocast:
            state["loss"] = model(pixel_values=images).loss

    def backward():
        loss = state["loss"]
        (loss if scaler is None else scaler.scale(loss)).backward()

    def optimizer_step():
        if scaler is not None:
            if cfg.optim.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            scaler.step(opt)
            scaler.update()
        else:
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return state.pop("loss").detach()

    phases = [("forward", forward), ("backward", backward), ("step", optimizer_step)]
    seconds, loss, ops = measure(phases, args, device, "hf")
    result = {
        "impl": "hf",
        "zero_stage": None,
        "optimizer": "AdamW" + (" (fused)" if fused else ""),
        "precision_mode": (f"autocast {precision}, fp32 weights" if dtype else "fp32")
        + (", compiled" if args.hf_compile else ""),
        "compiled": args.hf_compile,
        "fused_attn": model.config._attn_implementation == "sdpa",
        "seconds": seconds,
        "loss": loss,
        "mem_before_gib": round(mem_before, 3),
        **peak_memory(device, mem_before),
        **ops,
    }
    return result


# ---------------------------------------------------------------------------------------------------
# Reporting


def describe(cfg, args, device) -> dict:
    import torch

    from largemim.flops import known_device

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    m = cfg.model
    versions = {"torch": torch.__version__}
    for mod in ("deepspeed", "timm", "transformers"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    return {
        "device": name,
        "device_row": known_device(name) if device.type == "cuda" else None,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "size": m.size,
        "patch": m.patch_size,
        "img": m.img_size,
        "mask_ratio": cfg.objective.mask_ratio,
        "decoder": f"{m.decoder_depth}x{m.decoder_dim}/{m.decoder_heads}h",
        "norm_pix_loss": cfg.objective.norm_pix_loss,
        "ds_config": cfg.ds_config,
        "precision": cfg.train.precision,
        "grad_ckpt_every": m.grad_ckpt_every,
        "autocast": cfg.train.autocast,
        "compile": cfg.train.compile,
        "micro_batch": cfg.train.micro_batch,
        "optim_impl": cfg.optim.impl,
        "steps": args.steps,
        "warmup": args.warmup,
        "versions": versions,
    }


class Emitter:
    def __init__(self, path: str | None):
        self.file = open(path, "a") if path else None  # noqa: SIM115 - kept open for the whole run

    def __call__(self, record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def finish(raw: dict, common: dict, cfg, args) -> dict:
    from largemim.flops import forward_flops, mfu, peak_tflops

    flops = forward_flops(cfg).train
    ips = cfg.train.micro_batch * args.steps / raw["seconds"]
    peak = peak_tflops(common["device"], cfg.train.precision, args.peak_tflops or None)
    if common["device"].startswith("cpu") and not args.peak_tflops:
        peak = None
    util = mfu(ips, flops, peak)
    return {
        "kind": "throughput",
        **common,
        **{k: v for k, v in raw.items() if k != "seconds"},
        "step_ms": round(1e3 * raw["seconds"] / args.steps, 3),
        "images_per_s": round(ips, 3),
        "gflop_per_image": round(flops / 1e9, 3),
        "tflops": round(ips * flops / 1e12, 4),
        "peak_tflops": peak,
        "mfu": None if util is None else round(util, 4),
    }


def summary_line(r: dict) -> str:
    mfu_text = f"MFU {100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "MFU   n/a"
    mem = f"peak {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "peak mem n/a (CPU)"
    return (
        f"{r['impl']:>8}: {r['images_per_s']:10.1f} img/s  {r['step_ms']:9.2f} ms/step  {r['tflops']:8.2f} TFLOP/s  "
        f"{mfu_text}  {mem}  loss {r['loss']:.4f}  [{r['optimizer']}, {r['precision_mode']}]"
    )


# ---------------------------------------------------------------------------------------------------
# Memory sweep


def largest_fitting(fits, start: int, limit: int, resolution: float = 0.125) -> int:
    """The largest batch b in [1, limit] with fits(b), assuming fitting is monotone: double from
    ``start`` until a failure, then bisect until the gap is under ``resolution`` of the best. 0 if
    not even 1 fits."""
    lo, hi, b = 0, None, max(1, start)
    while b <= limit:
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if lo == 0 and hi is not None:  # even the start failed: search below it
        lo, hi2 = 0, hi
        while hi2 - lo > 1:
            mid = (lo + hi2) // 2
            lo, hi2 = (mid, hi2) if fits(mid) else (lo, mid)
        return lo
    if hi is None:
        return lo  # reached the limit
    while hi - lo > max(1, int(lo * resolution)):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class SweepError(RuntimeError):
    """A try failed for a reason other than memory: the sweep cannot say what fits."""


def try_batch(args, base: list[str], impl: str, ds: str, ckpt: int, batch: int) -> dict | None:
    """Run 1 + 2 steps at ``batch`` in a fresh process: its throughput record, or None on OOM."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--impl", impl, "--device", "cuda"]
    cmd += ["--steps", "2", "--warmup", "1", f"model.grad_ckpt_every={ckpt}", f"train.micro_batch={batch}"]
    if impl == "largemim":
        cmd.append(f"ds_config={ds}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    label = f"{impl} {ds if impl == 'largemim' else ''} ckpt={ckpt} batch {batch}"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.sweep_timeout, env=env)
    except subprocess.TimeoutExpired:
        raise SweepError(f"{label}: no result in {args.sweep_timeout} s") from None
    records = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode == OOM_EXIT:
        print(f"  {label}: out of memory", file=sys.stderr, flush=True)
        return None
    found = [r for r in records if r.get("kind") == "throughput"]
    if p.returncode != 0 or not found:
        raise SweepError(f"{label}: failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    print(f"  {label}: fits, peak {found[0]['peak_mem_gib']} GiB", file=sys.stderr, flush=True)
    return found[0]


def sweep_memory(args, device, emit) -> int:
    if device != "cuda":
        print("benchmark: --sweep-memory needs CUDA (it measures device memory by running into OOM)", file=sys.stderr)
        return 2
    impls = ["largemim", "hf"] if args.impl == "both" else [args.impl]
    swept = ("ds_config=", "model.grad_ckpt_every=", "train.micro_batch=")
    base = [a for a in args.overrides if not a.startswith(swept)]
    if not any(a.startswith("train.compile=") for a in base):
        base.append("train.compile=false")  # largemim/memory.py models eager; each try would compile anew
    if args.config:
        base = ["--config", args.config, *base]
    code = 0
    for impl in impls:
        for ds in args.sweep_configs.split(",") if impl == "largemim" else ["-"]:
            for ckpt in (0, 1):
                tried: dict[int, dict | None] = {}

                def fits(batch: int, impl=impl, ds=ds, ckpt=ckpt, tried=tried) -> bool:
                    tried[batch] = try_batch(args, base, impl, ds, ckpt, batch)
                    return tried[batch] is not None

                record = {"kind": "memory", "impl": impl, "ds_config": None if ds == "-" else ds}
                record.update(grad_ckpt_every=ckpt, overrides=base)
                try:
                    best = largest_fitting(fits, args.sweep_start, args.sweep_max, args.sweep_resolution)
                except SweepError as e:
                    print(f"benchmark: {e}", file=sys.stderr)
                    emit({**record, "error": str(e).splitlines()[0]})
                    code = 1
                    continue
                at_best = tried.get(best) or {}
                record.update(max_micro_batch=best, reached_limit=best >= args.sweep_max)
                for key in ("zero_stage", "peak_mem_gib", "peak_reserved_gib", "images_per_s", "device"):
                    record[key] = at_best.get(key)
                emit(record)
    return code


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    device_type = select_device(args.device)
    emit = Emitter(args.jsonl)
    try:
        if args.sweep_memory:
            return sweep_memory(args, device_type, emit)
        return benchmark(args, emit)
    finally:
        emit.close()


def benchmark(args, emit) -> int:
    import torch

    from largemim.config import ConfigError

    try:
        cfg = bench_config(args)
    except ConfigError as e:
        print(f"benchmark: config error: {e}", file=sys.stderr)
        return 2
    if args.count_ops and (cfg.train.compile == "true" or args.hf_compile):
        print("benchmark: --count-ops counts eager operators; drop train.compile=true and --hf-compile for it",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.count_ops:
        cfg.train.compile = "false"  # auto would compile on a GPU
    impls = ["largemim", "hf"] if args.impl == "both" else [args.impl]
    if "hf" in impls:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("benchmark: transformers is not installed (pip install transformers) or use --impl largemim")
            return 2
    from largemim.distributed import init_distributed

    env = init_distributed()
    device = env.device
    common = describe(cfg, args, device)
    if args.mem_cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * 2**30 / total), device)
        common["mem_cap_gib"] = args.mem_cap_gib
    flash = flash_attention_usable(cfg, device)
    common["flash_attn"] = flash
    if args.require_flash and not flash:
        print(f"benchmark: SDPA cannot use flash attention here ({common['device']}, {cfg.train.precision})")
        return 2
    results = {}
    try:
        for impl in impls:
            raw = run_largemim(cfg, args, device) if impl == "largemim" else run_hf(cfg, args, device)
            results[impl] = finish(raw, common, cfg, args)
            emit(results[impl])
            print(summary_line(results[impl]), file=sys.stderr, flush=True)
    except RuntimeError as e:  # torch.OutOfMemoryError, or an OOM that a library re-raised as RuntimeError
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        emit({"kind": "oom", **common, "impl": impl, "error": str(e).splitlines()[0]})
        return OOM_EXIT
    if len(results) == 2:
        ratio = results["largemim"]["images_per_s"] / results["hf"]["images_per_s"]
        mem = None
        if results["hf"]["peak_mem_gib"]:
            mem = round(results["largemim"]["peak_mem_gib"] / results["hf"]["peak_mem_gib"], 4)
        emit({"kind": "ratio", **common, "largemim_over_hf_images_per_s": round(ratio, 4), "largemim_over_hf_mem": mem})
        print(f"   ratio: largemim / HF = {ratio:.3f}x images/s", file=sys.stderr, flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
