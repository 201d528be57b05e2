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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.config import load_config  # noqa: E402
from largemim.memory import GIB, count_activations, largest_micro_batch, predicted_peak  # noqa: E402

SETUPS = (  # (label, ZeRO stage, offload)
    ("ZeRO-1", 1, "none"),
    ("ZeRO-2", 2, "none"),
    ("ZeRO-3", 3, "none"),
    ("ZeRO-2 + optimizer offload", 2, "optimizer"),
    ("ZeRO-3 + optimizer and parameter offload", 3, "all"),
)


def config(size: str, patch: int, ckpt: int, overrides: list[str]):
    base = ["data.shards=synthetic", "train.precision=bf16", f"model.size={size}", f"model.patch_size={patch}"]
    return load_config(None, [*base, f"model.grad_ckpt_every={ckpt}", *overrides])


def check(path: Path, overrides: list[str]) -> None:
    """Predicted against measured peak for every largemim row of a tools/benchmark.py JSONL."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind") == "throughput" and r.get("impl") == "largemim" and r.get("peak_mem_gib")]
    if not rows:
        sys.exit(f"{path}: no largemim rows with a measured peak_mem_gib")
    print(f"predicted against measured peak allocated memory ({path.name}):")
    print("| model | ZeRO | act. ckpt | micro-batch | measured GiB | predicted GiB | error | reserved / allocated |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("precision_mode", "").startswith("DeepSpeed torch_autocast"):
            continue  # fp32 weights: not modelled
        depth, dim, heads = r["decoder"].rstrip("h").replace("x", "/").split("/")
        extra = [f"model.img_size={r['img']}", f"objective.mask_ratio={r['mask_ratio']}"]
        extra += [f"model.decoder_depth={depth}", f"model.decoder_dim={dim}", f"model.decoder_heads={heads}"]
        acts = count_activations(config(r["size"], r["patch"], r["grad_ckpt_every"], [*extra, *overrides]))
        pred = predicted_peak(acts, r["micro_batch"], r["zero_stage"], 1) / GIB
        err = pred / r["peak_mem_gib"] - 1
        reserve = r["peak_reserved_gib"] / r["peak_mem_gib"] if r.get("peak_reserved_gib") else float("nan")
        every = r["grad_ckpt_every"]
        ckpt = "every block" if every == 1 else (f"every {every}" if every else "–")
        cells = [f"{r['size']}/{r['patch']}", r["zero_stage"], ckpt, r["micro_batch"], f"{r['peak_mem_gib']:.1f}"]
        cells += [f"{pred:.1f}", f"{100 * err:+.1f} %", f"{reserve:.2f}"]
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
    print(head + "\n|" + "---|" * (3 + len(gpus)))
    for spec in args.models.split(","):
        size, patch = spec.split("/")
        for ckpt in (0, 1):
            t0 = time.perf_counter()
            acts = count_activations(config(size, int(patch), ckpt, args.overrides))
            label = "every block" if ckpt else "–"
            for name, stage, offload in SETUPS:
                cells = [largest_micro_batch(acts, stage, g, offload, args.gpu_gib, args.reserve, args.context_gib)
                         for g in gpus]  # fmt: skip
                print(
                    f"| {size}/{patch} ({acts.params / 1e6:.0f} M) | {label} | {name} | "
                    + " | ".join(str(c) if c else "does not fit" for c in cells)
                    + " |",
                    flush=True,
                )
            print(f"  ({size}/{patch}, ckpt {ckpt}: {acts.per_image / 2**20:.1f} MiB of activations per image, "
                  f"counted in {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
