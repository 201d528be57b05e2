#!/usr/bin/env python
"""Check SimMIM, the dVAE, BEiT and data2vec on one accelerator: real DeepSpeed engines (ZeRO-2 and
ZeRO-3, bf16) built as the trainer builds them, synthetic images, a few steps each. Prints one JSON line
per run (losses, ms per step, peak memory) and checks what only a GPU run shows: devices and dtypes of
the masks, the tokenizer and the EMA teacher, and the teacher's memory cost measured against SimMIM at
the same size (both run the whole image through the student).

  python tools/gpu_check_objectives.py --out runs/gpu_objectives               # ViT-B/16 and ViT-L/16, 224 px
  python tools/gpu_check_objectives.py --sizes nano --img 32 --patch 4 --batch 4 --steps 3   # CPU smoke test

Run from the repository root, in one process (it makes a world of one).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.config import check_objective, load_config, make_plan  # noqa: E402
from largemim.distributed import init_distributed  # noqa: E402
from largemim.engine import build_engine, build_model  # noqa: E402
from largemim.objectives.dvae import TokenizerMeta, save_tokenizer  # noqa: E402

ZERO = {
    2: {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}},
    3: {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "stage3_param_persistence_threshold": 100000}},
}  # fmt: skip


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def run(name: str, size: str, stage: int, args, extra: list[str], device: torch.device) -> dict:
    cfg = load_config(None, [
        "data.shards=unused", f"model.size={size}", f"model.img_size={args.img}", f"model.patch_size={args.patch}",
        f"objective.name={name}", f"train.micro_batch={args.batch}", f"train.steps={args.steps}",
        "train.warmup_steps=1", "train.precision=bf16", "optim.base_lr=1e-4", "optim.grad_clip=3.0",
        "train.compile=false", *extra,  # a few steps each: compiling would take most of the time
    ])  # fmt: skip
    check_objective(cfg)
    plan = make_plan(cfg, 1, 10**6)
    base = 0
    if device.type == "cuda":  # what earlier runs left allocated is not this run's
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = build_model(cfg, ZERO[stage])
    engine = build_engine(model, cfg, plan, ZERO[stage])
    gen = torch.Generator(device="cpu").manual_seed(1)
    losses, times, extras = [], [], {}
    for step in range(1, args.steps + 1):
        images = torch.randn(args.batch, 3, args.img, args.img, generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine(images)
        engine.backward(out["loss"])
        engine.step()
        if hasattr(engine.module, "after_step"):
            engine.module.after_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(round(out["loss"].item(), 4))
        extras = {k: round(v.item(), 4) for k, v in out.items() if k != "loss" and v.ndim == 0}
    module = engine.module
    record = {
        "objective": name, "size": size, "zero": stage, "batch": args.batch, "losses": losses, **extras,
        "ms_per_step": round(1000 * sorted(times[2:] or times)[len(times[2:] or times) // 2], 1),
        "peak_gib": gib(torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else None,
        "params_m": round(sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters()) / 1e6,
                          2),
    }  # fmt: skip
    assert all(v == v and abs(v) < 1e4 for v in losses), losses
    if name == "data2vec":
        teacher = list(module.teacher.parameters())
        record["teacher_dtype"] = str(teacher[0].dtype)
        record["master_dtype"] = str(module.ema_master.dtype)
        record["master_device"] = str(module.ema_master.device)
        record["teacher_local_gib"] = gib(sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * 2
                                              for p in teacher))  # fmt: skip
        record["master_gib"] = gib(module.ema_master.numel() * 4)
        assert module.ema_master.dtype == torch.float32 and module.ema_master.device.type == device.type
        assert int(module.ema_updates) == args.steps
    if name == "dvae":
        record["state_dict"] = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
    del engine, model, module
    gc.collect()
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_objectives")
    ap.add_argument("--sizes", nargs="+", default=["base", "large"])
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = init_distributed()
    if env.device.type == "cuda":
        print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__}), flush=True)
    grid = args.img // args.patch
    small = grid < 8  # a CPU smoke test: blocks and depth of a tiny model
    block = ["objective.min_block_patches=2"] if small else []
    k = ["objective.target_layers=2"] if small else []
    results = []

    def record(r: dict) -> dict:
        r = {k: v for k, v in r.items() if k != "state_dict"} | {"_sd": r.get("state_dict")}
        print(json.dumps({k: v for k, v in r.items() if k != "_sd"}), flush=True)
        results.append({k: v for k, v in r.items() if k != "_sd"})
        return r

    dvae = record(run("dvae", args.sizes[0], 2, args, [f"objective.vocab_size={args.vocab}", "objective.dvae_hidden=64",
                                                      "optim.base_lr=1e-3"], env.device))  # fmt: skip
    meta = TokenizerMeta(args.vocab, grid, args.img, args.patch, 3, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                         source="gpu_check_objectives")  # fmt: skip
    tok = save_tokenizer(dvae["_sd"], meta, out / "tokenizer.safetensors")
    for size in args.sizes:
        for stage in (2, 3):
            record(run("simmim", size, stage, args, [f"objective.mask_patch_size={args.patch * 2}"], env.device))
            record(run("data2vec", size, stage, args, [*block, *k, "objective.ema_steps=5"], env.device))
            record(run("beit", size, stage, args, [*block, f"objective.tokenizer={tok}",
                                                   f"objective.vocab_size={args.vocab}"], env.device))  # fmt: skip
    for size in args.sizes:  # the teacher's cost: data2vec against SimMIM, same size, stage and batch
        for stage in (2, 3):
            pick = {r["objective"]: r for r in results if r.get("size") == size and r.get("zero") == stage}
            if pick.get("simmim", {}).get("peak_gib") is not None:
                d, s = pick["data2vec"], pick["simmim"]
                print(json.dumps({"teacher_cost": size, "zero": stage,
                                  "extra_peak_gib": round(d["peak_gib"] - s["peak_gib"], 3),
                                  "extra_ms": round(d["ms_per_step"] - s["ms_per_step"], 1)}), flush=True)  # fmt: skip
    (out / "objectives.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
