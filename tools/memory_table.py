#!/usr/bin/env python
"""Predicted largest MAE micro-batch per GPU: ViT-L/H/g x ZeRO stage x offload x GPU count, +/- checkpointing.

Activations are counted by running each model's real forward on this machine's CPU (largemim.memory:
the tensors autograd keeps, per image); model states follow DeepSpeed's bf16/fp16 layout for each ZeRO
stage. A micro-batch "fits" when its predicted peak, times ``--reserve`` (1.28: the allocator reserved up
to 1.22 times the allocated peak on an H200, and the prediction was within 5 % of the measured peaks),
stays within ``--gpu-gib`` less ``--context-gib`` for the CUDA context.

``--check JSONL`` first compares the prediction with the peaks ``tools/benchmark.py`` measured (its JSON
lines: ``peak_mem_gib`` of each largemim row); ``tools/measured/`` keeps those of past GPU sessions.

    python tools/memory_table.py --check tools/measured/h200_2026-11-26_bench.jsonl
    python tools/memory_table.py --models large/16 --gpus 1,8 model.decoder_depth=4

Settings are largemim config overrides (defaults: MAE, mask 0.75, 8x512 decoder, 224 px, bf16).
A prediction, not a measurement: ``tools/benchmark.py --sweep-memory`` measures on a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.config import load_config  # noqa: E402
from largemim.engine import load_ds_json  # noqa: E402
from largemim.memory import (  # noqa: E402
    GIB,
    count_activations,
    count_activations_each,
    largest_micro_batch,
    predicted_peak,
    zero_config,
)

REPO = Path(__file__).resolve().parents[1]

SETUPS = (  # the repository's ds_configs: their buckets and offload settings are part of the prediction
    ("ZeRO-1", "ds_configs/zero1.json"),
    ("ZeRO-2", "ds_configs/zero2.json"),
    ("ZeRO-3", "ds_configs/zero3.json"),
    ("ZeRO-2 + optimizer offload", "ds_configs/zero2_offload.json"),
    ("ZeRO-3 + optimizer and parameter offload", "ds_configs/zero3_offload.json"),
)
DECODER = re.compile(r"(\d+)x(\d+)/(\d+)h")


def config(size: str, patch: int, ckpt: int, overrides: list[str]):
    base = ["data.shards=synthetic", "train.precision=bf16", f"model.size={size}", f"model.patch_size={patch}"]
    return load_config(None, [*base, f"model.grad_ckpt_every={ckpt}", *overrides])


def zero_of(ds_config: str | None):
    path = Path(ds_config or "ds_configs/zero2.json")
    return zero_config(load_ds_json(path if path.is_absolute() else REPO / path))


def row_setup(r: dict, overrides: list[str]):
    """(config, micro-batch, ZeRO config) of a tools/benchmark.py JSON line, or a reason it is not modelled."""
    if r.get("kind") == "memory":  # a --sweep-memory result: its overrides, at the largest batch that ran
        if r.get("error") or not r.get("max_micro_batch"):
            return "no fitting batch"
        args, config_file = list(r.get("overrides") or []), None
        if args[:1] == ["--config"]:
            config_file, args = args[1], args[2:]
        cfg = load_config(
            config_file, ["data.shards=synthetic", *args, f"model.grad_ckpt_every={r['grad_ckpt_every']}"]
        )
        batch = r["max_micro_batch"]
    else:
        mode = r.get("precision_mode", "")
        if not mode.startswith(("DeepSpeed bf16", "DeepSpeed fp16")) or "compiled" in mode:
            return f"not modelled ({mode})"  # fp32 weights (autocast, fp32) and compiled runs
        match = DECODER.fullmatch(str(r.get("decoder", "")))
        if not match:
            return f"unreadable decoder field {r.get('decoder')!r}"
        depth, dim, heads = match.groups()
        extra = [
            f"model.img_size={r['img']}",
            f"objective.mask_ratio={r['mask_ratio']}",
            f"train.precision={r['precision']}",
        ]
        extra += [f"model.decoder_depth={depth}", f"model.decoder_dim={dim}", f"model.decoder_heads={heads}"]
        cfg = config(r["size"], r["patch"], r["grad_ckpt_every"], [*extra, *overrides])
        batch = r["micro_batch"]
    return cfg, batch, zero_of(r.get("ds_config"))


def check(path: Path, overrides: list[str]) -> None:
    """Predicted against measured peak for every largemim row of a tools/benchmark.py JSONL (one GPU each)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("impl") == "largemim" and r.get("kind") in ("throughput", "memory")]
    rows = [r for r in rows if r.get("peak_mem_gib")]
    if not rows:
        sys.exit(f"{path}: no largemim rows with a measured peak_mem_gib")
    print(f"predicted against measured peak allocated memory, one GPU ({path.name}):")
    print(
        "| model | ds_config | act. ckpt | micro-batch | measured GiB | predicted GiB | error | reserved / allocated |"
    )
    print("|---|---|---|---|---|---|---|---|")
    counted: dict[str, object] = {}  # rows of the same model share one count (one model build each)
    for r in rows:
        setup = row_setup(r, overrides)
        if isinstance(setup, str):
            print(f"| {r.get('size', '?')}/{r.get('patch', '?')} | {r.get('ds_config')} | skipped: {setup} |")
            continue
        cfg, batch, zero = setup
        if repr(cfg) not in counted:
            counted[repr(cfg)] = count_activations(cfg)
        pred = predicted_peak(counted[repr(cfg)], batch, 1, zero) / GIB
        err = pred / r["peak_mem_gib"] - 1
        reserve = r["peak_reserved_gib"] / r["peak_mem_gib"] if r.get("peak_reserved_gib") else float("nan")
        every = cfg.model.grad_ckpt_every
        ckpt = "every block" if every == 1 else (f"every {every}" if every else "–")
        cells = [f"{cfg.model.size}/{cfg.model.patch_size}", Path(r.get("ds_config") or "").name, ckpt, batch]
        cells += [f"{r['peak_mem_gib']:.1f}", f"{pred:.1f}", f"{100 * err:+.1f} %", f"{reserve:.2f}"]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="largemim config overrides, e.g. objective.mask_ratio=0.6")
    ap.add_argument("--models", default="large/16,huge/14,giant/14", help="size/patch, comma-separated")
    ap.add_argument("--gpus", default="1,8,64", help="data-parallel GPU counts, comma-separated")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU (H100/A100 80 GB: 80)")
    ap.add_argument(
        "--reserve", type=float, default=1.28, help="margin over the predicted peak: allocator reserve x model error"
    )
    ap.add_argument("--context-gib", type=float, default=1.0, help="CUDA context and NCCL buffers")
    ap.add_argument("--check", type=Path, help="compare with the peaks in a tools/benchmark.py JSONL first")
    args = ap.parse_intermixed_args()
    if args.check:
        check(args.check, args.overrides)
    gpus = [int(g) for g in args.gpus.split(",")]
    print(f"largest micro-batch per {args.gpu_gib:g} GiB GPU (predicted; reserve x{args.reserve}, "
          f"{args.context_gib:g} GiB context), MAE bf16, by data-parallel GPUs:")  # fmt: skip
    head = "| model | act. ckpt | setup | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in gpus) + " |"
    print("(the one-GPU column is what --check verifies; more GPUs only divide the partitioned states)")
    print(head + "\n|" + "---|" * (3 + len(gpus)))
    for spec in args.models.split(","):
        size, patch = spec.split("/")
        t0 = time.perf_counter()
        counts = count_activations_each(config(size, int(patch), 0, args.overrides), (0, 1))  # one build
        for ckpt, acts in zip((0, 1), counts, strict=True):
            label = "every block" if ckpt else "–"
            for name, ds_config in SETUPS:
                zero = zero_of(ds_config)
                cells = [largest_micro_batch(acts, g, zero, args.gpu_gib, args.reserve, args.context_gib) for g in gpus]
                print(
                    f"| {size}/{patch} ({acts.params / 1e6:.0f} M) | {label} | {name} | "
                    + " | ".join(str(c) if c else "does not fit" for c in cells)
                    + " |",
                    flush=True,
                )
            print(f"  ({size}/{patch}, ckpt {ckpt}: {acts.per_image / 2**20:.1f} MiB of activations per image)",
                  file=sys.stderr, flush=True)  # fmt: skip
        print(f"  ({size}/{patch} counted in {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
