"""largemim.memory and tools/memory_table.py: activations counted from the real forward, model states by ZeRO
stage, and the prediction against peaks measured on an H200 (tools/measured/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from largemim.config import load_config
from largemim.memory import (
    GIB,
    ActivationCount,
    _saved_bytes,
    count_activations,
    largest_micro_batch,
    model_state_bytes,
    predicted_peak,
    zero_config,
)

REPO = Path(__file__).resolve().parents[1]
MEASURED = REPO / "tools" / "measured" / "h200_2026-11-26_bench.jsonl"
SMALL = ["data.shards=synthetic", "model.size=micro", "model.img_size=64", "model.patch_size=8"]
SMALL += ["model.decoder_dim=64", "model.decoder_depth=2", "model.decoder_heads=4"]


def cfg(*overrides: str):
    return load_config(None, [*SMALL, *overrides])


def test_activations_grow_linearly_with_the_batch():
    import torch

    from largemim.objectives import build_objective

    c = cfg("train.precision=bf16")
    acts = count_activations(c)
    torch.manual_seed(0)
    model = build_objective(c).to(torch.bfloat16).train()
    four, two = _saved_bytes(model, 4, c, torch.bfloat16), _saved_bytes(model, 2, c, torch.bfloat16)
    inputs = 3 * 64 * 64 * 4  # the fp32 batch itself
    assert acts.per_image > inputs and four - two == 2 * (acts.per_image - inputs)
    assert acts.params + acts.frozen == sum(p.numel() for p in model.parameters())
    assert acts.frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad) > 0  # fixed pos_embed


def test_what_changes_the_count_changes_it():
    base = count_activations(cfg("train.precision=bf16"))
    assert count_activations(cfg("train.precision=bf16", "model.grad_ckpt_every=1")).per_image < 0.8 * base.per_image
    assert count_activations(cfg("train.precision=bf16", "objective.mask_ratio=0.9")).per_image < base.per_image
    fp32 = count_activations(cfg("train.precision=fp32")).per_image
    assert 1.7 * base.per_image < fp32 < 2.3 * base.per_image  # 16-bit activations are half the bytes


def zero(**section):
    return zero_config({"zero_optimization": section})


def test_model_states_by_stage_and_against_deepspeeds_estimate():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    psi, bucket = 300_000_000, 2 * 50_000_000  # 16-bit bytes of a 5e7-element reduce bucket
    assert model_state_bytes(psi, 8, zero(stage=0)) == 18 * psi  # BF16_Optimizer: fp32 gradients too
    assert model_state_bytes(psi, 8, zero(stage=1, reduce_bucket_size=5e7)) == 4 * psi + 12 * psi // 8 + bucket
    two = zero(stage=2, reduce_bucket_size=5e7, overlap_comm=True)
    assert model_state_bytes(psi, 8, two) == 2 * psi + 14 * psi // 8 + 2 * bucket  # two buckets when overlapping
    three = zero(stage=3, reduce_bucket_size=5e7, stage3_prefetch_bucket_size=5e7)  # overlap_comm: on by default
    gathered = 2 * psi + bucket  # every weight stays gathered while reused within 1e9 elements (the default)
    assert model_state_bytes(psi, 8, three) == 16 * psi // 8 + gathered + 2 * bucket
    small_live = zero(stage=3, reduce_bucket_size=5e7, stage3_prefetch_bucket_size=5e7, stage3_max_live_parameters=1e8)
    assert model_state_bytes(psi, 8, small_live) == 16 * psi // 8 + 2 * 10**8 + bucket + 2 * bucket
    cpu = {"device": "cpu"}
    offloaded = zero(stage=2, reduce_bucket_size=5e7, offload_optimizer=cpu)
    assert model_state_bytes(psi, 8, offloaded) == 2 * psi + 2 * psi // 8 + bucket
    all_off = zero(stage=3, reduce_bucket_size=5e7, stage3_prefetch_bucket_size=5e7, offload_optimizer=cpu,
                   offload_param=cpu)  # fmt: skip
    assert model_state_bytes(psi, 8, all_off) == 2 * psi // 8 + gathered + 2 * bucket
    for gpus in (1, 8, 64):
        # DeepSpeed's estimate also holds the fp32 gradient partition, made after the activations are freed.
        _, ds = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=gpus, cpu_offload=False)
        ours = model_state_bytes(psi, gpus, zero(stage=2, reduce_bucket_size=1))
        assert abs(ds - (ours - 2) - 4 * psi // gpus) <= 2


def test_largest_micro_batch_is_the_edge_of_the_budget():
    acts = ActivationCount(per_image=60 * 2**20, fixed=0, params=300_000_000, frozen=0)
    for section in ({"stage": 2}, {"stage": 3}, {"stage": 2, "offload_optimizer": {"device": "cpu"}}):
        for gpus in (1, 8):
            z = zero(**section)
            b = largest_micro_batch(acts, gpus, z, gpu_gib=80, reserve=1.28, context_gib=1)
            budget = 79 * GIB
            assert predicted_peak(acts, b, gpus, z) * 1.28 <= budget < predicted_peak(acts, b + 1, gpus, z) * 1.28
    huge = ActivationCount(per_image=1, fixed=0, params=10**11, frozen=0)
    assert largest_micro_batch(huge, 1, zero(stage=2), gpu_gib=80) == 0  # the states alone do not fit


def test_prediction_within_5_percent_of_the_h200_peaks(tmp_path):
    """The tool's --check on the ViT-L/16 rows measured on an H200 (ZeRO-2 and -3, with and without
    checkpointing): the counted forward must stay close to what the GPU allocated."""
    rows = [json.loads(line) for line in MEASURED.read_text().splitlines()]
    large = [r for r in rows if r.get("size") == "large"]
    assert len([r for r in large if r.get("impl") == "largemim"]) == 3
    subset = tmp_path / "large.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in large))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "tools/memory_table.py", "--check", str(subset), "--models", "large/16", "--gpus", "1,8"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    errors = [float(line.split("|")[7].strip().rstrip(" %")) for line in p.stdout.splitlines()
              if line.startswith("| large/16 | ")]  # fmt: skip
    assert len(errors) == 3 and all(abs(e) < 5.0 for e in errors), p.stdout
    table = [line for line in p.stdout.splitlines() if line.startswith("| large/16 (")]
    assert len(table) == 10  # 5 setups x with/without checkpointing
    one_gpu = {tuple(c.strip() for c in line.split("|")[2:4]): int(line.split("|")[4]) for line in table}
    assert one_gpu[("every block", "ZeRO-2")] > 2 * one_gpu[("–", "ZeRO-2")]  # checkpointing frees most
    assert 256 < one_gpu[("–", "ZeRO-2")] < 2000  # 21.4 GiB were measured at 256


def test_checkpointing_some_blocks_is_in_proportion():
    """choose_grad_ckpt interpolates between no and full checkpointing by the blocks checkpointed."""
    from largemim.memory import checkpointed_blocks

    none = count_activations(cfg("train.precision=bf16")).per_image
    full = count_activations(cfg("train.precision=bf16", "model.grad_ckpt_every=1")).per_image
    for every in (2, 4):
        counted = count_activations(cfg("train.precision=bf16", f"model.grad_ckpt_every={every}")).per_image
        n = checkpointed_blocks(6, every)  # ViT "micro" has 6 blocks
        assert abs(counted - (none - (none - full) * n / 6)) < 0.03 * none, every


def test_auto_checkpointing_picks_the_least_that_fits():
    from largemim.config import ConfigError
    from largemim.memory import choose_grad_ckpt

    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}
    c = cfg("train.precision=bf16", "train.micro_batch=512", "model.grad_ckpt_auto=true")
    none = count_activations(c)
    full = count_activations(cfg("train.precision=bf16", "model.grad_ckpt_every=1"))
    need0, need1 = (predicted_peak(a, 512, 1, zero_config(ds)) * 1.28 / GIB for a in (none, full))
    assert need1 < 0.8 * need0  # at this batch the activations matter
    assert choose_grad_ckpt(c, ds, 1, budget_gib=need0 * 1.001)[0] == 0  # fits as it is: no checkpointing
    between, need = choose_grad_ckpt(c, ds, 1, budget_gib=(need0 + need1) / 2)
    assert between > 0 and need <= (need0 + need1) / 2
    assert choose_grad_ckpt(c, ds, 1, budget_gib=need1 * 1.001)[0] == 1  # only every block fits
    with pytest.raises(ConfigError, match="even with every block checkpointed"):
        choose_grad_ckpt(c, ds, 1, budget_gib=need1 * 0.99)


def test_auto_checkpointing_config_checks():
    from largemim.config import ConfigError, make_plan

    for extra, message in (("model.grad_ckpt_every=2", "not both"), ("train.precision=fp32", "bf16/fp16 mode")):
        c = cfg("train.steps=1", "model.grad_ckpt_auto=true", extra)
        with pytest.raises(ConfigError, match=message):
            make_plan(c, 1, 1000)


def test_state_outside_the_parameters_is_counted():
    """data2vec's fp32 EMA master (a buffer) is on the GPU beside the 16-bit teacher."""
    c = load_config(REPO / "largemim/recipes/data2vec_tiny_cpu.yaml", ["data.shards=synthetic"])
    acts = count_activations(c)
    assert acts.frozen > 0 and acts.extra > 3.9 * acts.frozen  # the teacher's fp32 average (fixed table aside)
    zero = zero_config({"zero_optimization": {"stage": 2}})
    assert predicted_peak(acts, 1, 1, zero) > predicted_peak(ActivationCount(acts.per_image, acts.fixed, acts.params,
                                                                             acts.frozen), 1, 1, zero)  # fmt: skip
