"""tools/benchmark.py runs end to end on the CPU: the real DeepSpeed engine and HF's ViTMAE, one JSON
line each. (A check that the tool works, not a benchmark: CPU numbers of a tiny model mean nothing.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "benchmark.py"
TINY = [
    "model.size=nano",
    "model.img_size=32",
    "model.patch_size=4",
    "model.decoder_dim=32",
    "model.decoder_depth=1",
    "model.decoder_heads=4",
    "train.micro_batch=4",
]


def load_tool():
    spec = importlib.util.spec_from_file_location("largemim_benchmark_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(args: list[str], timeout: int, **env_extra: str):
    """tools/benchmark.py on the CPU in a subprocess: (the process, its throughput records by impl)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env_extra)
    cmd = [sys.executable, str(TOOL), "--device", "cpu", *TINY, "ds_config=ds_configs/zero2.json", *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    records = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return p, records


def test_both_implementations_report(tmp_path):
    pytest.importorskip("transformers")
    jsonl = tmp_path / "bench.jsonl"
    p, records = run_tool(["--steps", "2", "--warmup", "1", "--jsonl", str(jsonl), "train.precision=bf16",
                           "model.grad_ckpt_every=2", "--count-ops", "1", "optim.impl=torch_fused"], 240)  # fmt: skip
    throughput = {r["impl"]: r for r in records if r["kind"] == "throughput"}
    assert set(throughput) == {"largemim", "hf"}
    for r in throughput.values():
        assert r["images_per_s"] > 0 and r["tflops"] > 0
        assert r["micro_batch"] == 4 and r["size"] == "nano" and r["grad_ckpt_every"] == 2
        assert r["gflop_per_image"] > 0 and r["mfu"] is None  # no known peak on a CPU
        assert r["loss"] == r["loss"]  # not NaN
    assert throughput["largemim"]["zero_stage"] == 2
    # --count-ops: per-phase operator counts; both optimizer steps are a few multi-tensor kernels (fused
    # AdamW; largemim's ZeRO-2 gradient checks through largemim/grad_checks.py), not one per tensor
    ops = {impl: r["ops_per_step"]["phases"] for impl, r in throughput.items()}
    for phases in ops.values():
        assert phases["forward"]["kernels"] > 20 and phases["backward"]["kernels"] > phases["forward"]["kernels"]
    assert ops["hf"]["step"]["kernels"] < 10 and ops["largemim"]["step"]["kernels"] < 80
    # no device sync in the forward (DeepSpeed's synchronising throughput timer is off); two read-backs in
    # the bf16 step (the inf/NaN test and the norm check)
    assert ops["largemim"]["forward"]["syncs"] == 0 and ops["largemim"]["step"]["syncs"] == 2
    assert "largemim: operators per step: device kernels" in p.stderr
    ratio = [r for r in records if r["kind"] == "ratio"]
    assert len(ratio) == 1
    expected = throughput["largemim"]["images_per_s"] / throughput["hf"]["images_per_s"]
    assert ratio[0]["largemim_over_hf_images_per_s"] == pytest.approx(expected, rel=1e-3)
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == records


def test_profile_prints_the_top_operators_and_writes_a_trace(tmp_path):
    args = ["--impl", "largemim", "--steps", "1", "--warmup", "1", "--profile", "2", "--trace-dir", str(tmp_path)]
    p, _ = run_tool(args, 240)
    assert "== profile: largemim, 2 steps" in p.stderr and "Self CPU" in p.stderr
    assert "aten::mm" in p.stderr or "aten::addmm" in p.stderr  # the model's matmuls are among the operators
    assert "ms per step, host returns after" in p.stderr
    trace = json.loads((tmp_path / "largemim.json").read_text())
    assert len(trace["traceEvents"]) > 100


def test_largest_fitting_search():
    tool = load_tool()
    calls = []

    def fits_below(limit):
        def fits(b):
            calls.append(b)
            return b <= limit

        return fits

    assert tool.largest_fitting(fits_below(100), start=8, limit=4096, resolution=0.0) == 100
    assert calls[:5] == [8, 16, 32, 64, 128]
    assert tool.largest_fitting(fits_below(5000), start=8, limit=1024) == 1024  # capped, says the limit
    assert tool.largest_fitting(fits_below(3), start=8, limit=1024) == 3  # searched below the start
    assert tool.largest_fitting(fits_below(0), start=8, limit=1024) == 0
    found = tool.largest_fitting(fits_below(300), start=8, limit=4096, resolution=0.125)
    assert 300 * (1 - 0.125) <= found <= 300


def test_overrides_and_options_mix():
    """The sweep puts the swept keys after the options; argparse must not take them for strays."""
    args = load_tool().parse_args(["model.size=nano", "--steps", "3", "train.micro_batch=8", "--impl", "hf"])
    assert args.overrides == ["model.size=nano", "train.micro_batch=8"] and args.steps == 3 and args.impl == "hf"


def test_count_ops_counts_deepspeeds_device_syncs(tmp_path):
    """A ds_config that turns DeepSpeed's throughput timer back on: its synchronize() at the start of each
    forward and the end of each step is counted (DeepSpeed calls it on a CPU too)."""
    ds = json.loads((REPO / "ds_configs/zero2.json").read_text())
    ds["timers"] = {"throughput": {"enabled": True, "synchronized": True}}
    (tmp_path / "timed.json").write_text(json.dumps(ds))
    args = ["--impl", "largemim", "--steps", "1", "--warmup", "1", "--count-ops", "2"]
    _, records = run_tool([*args, f"ds_config={tmp_path / 'timed.json'}", "train.precision=bf16"], 240)
    record = records[0]
    phases = record["ops_per_step"]["phases"]
    assert phases["forward"]["syncs"] == 1 and phases["step"]["syncs"] > 2, phases  # 2 without the timer


def test_a_failing_count_keeps_the_timing(capsys):
    import torch
    from deepspeed.accelerator import get_accelerator

    tool = load_tool()
    args = tool.parse_args(["--count-ops", "1"])

    def broken():
        raise RuntimeError("boom")

    phases = [("forward", lambda: None), ("backward", lambda: None), ("step", broken)]
    assert tool.count_ops(phases, args, torch.device("cpu"), "largemim") is None
    assert "--count-ops failed (RuntimeError: boom); timing kept" in capsys.readouterr().err
    assert "synchronize" not in vars(get_accelerator())  # DeepSpeed's own method again


@pytest.mark.slow
def test_the_compiled_pair_reports_both_compiled(tmp_path):
    """--hf-compile with train.compile=true: both implementations compiled (inductor; a minute or two on
    the CPU), so the ratio compares like with like, and each JSON line says so."""
    pytest.importorskip("transformers")
    args = ["--steps", "2", "--warmup", "2", "--hf-compile", "train.precision=bf16", "train.compile=true"]
    p, records = run_tool(args, 900, TORCH_LOGS="recompiles")
    throughput = {r["impl"]: r for r in records if r["kind"] == "throughput"}
    assert set(throughput) == {"largemim", "hf"}
    for r in throughput.values():
        assert r["compiled"] is True and r["precision_mode"].endswith(", compiled")
        assert r["images_per_s"] > 0 and r["loss"] == r["loss"]
    assert "Recompiling" not in p.stderr  # the timed steps ran the graphs compiled in the warm-up


def test_count_ops_refuses_a_compiled_model(capsys):
    tool = load_tool()
    args = tool.parse_args(["--count-ops", "1", *TINY, "train.compile=true"])
    assert tool.benchmark(args, print) == 2
    assert "--count-ops counts eager operators" in capsys.readouterr().err
    args = tool.parse_args(["--count-ops", "1", *TINY, "--hf-compile"])
    assert tool.benchmark(args, print) == 2


def test_sweep_memory_needs_cuda(capsys):
    tool = load_tool()
    args = tool.parse_args(["--sweep-memory", *TINY])
    assert tool.sweep_memory(args, "cpu", print) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_sweep_memory_orchestration(monkeypatch):
    """The sweep's bookkeeping with the GPU runs replaced by a rule: what fits depends on checkpointing."""
    tool = load_tool()
    limits = {("largemim", 0): 48, ("largemim", 1): 200, ("hf", 0): 40, ("hf", 1): 150}

    def fake_try(args, base, impl, ds, ckpt, batch):
        if batch > limits[impl, ckpt]:
            return None
        return {"kind": "throughput", "zero_stage": 2 if impl == "largemim" else None, "peak_mem_gib": batch / 10}

    monkeypatch.setattr(tool, "try_batch", fake_try)
    records = []
    args = tool.parse_args(["--sweep-memory", "--sweep-configs", "ds_configs/zero0.json,ds_configs/zero2.json", *TINY])
    assert tool.sweep_memory(args, "cuda", records.append) == 0
    assert len(records) == 2 * 2 + 2  # two JSONs x ckpt off/on for largemim, ckpt off/on for HF
    for r in records:
        limit = limits[r["impl"], r["grad_ckpt_every"]]
        assert limit * (1 - args.sweep_resolution) <= r["max_micro_batch"] <= limit
        assert r["peak_mem_gib"] == r["max_micro_batch"] / 10
        assert "train.micro_batch=4" not in r["overrides"]  # the swept keys are the sweep's own

    def broken_try(args, base, impl, ds, ckpt, batch):
        raise tool.SweepError("largemim ckpt=0 batch 8: failed (exit 1)")

    monkeypatch.setattr(tool, "try_batch", broken_try)
    records.clear()
    args = tool.parse_args(["--sweep-memory", "--impl", "largemim", "--sweep-configs", "ds_configs/zero2.json"])
    assert tool.sweep_memory(args, "cuda", records.append) == 1
    assert [r["error"] for r in records] == ["largemim ckpt=0 batch 8: failed (exit 1)"] * 2


def test_a_recipes_global_batch_does_not_hide_the_optimizer_step():
    """With a recipe's global batch the engine would accumulate (grad_accum 64 for ViT-L on one device),
    and no timed step would hold an optimizer step while the HF side steps every micro-batch."""
    from largemim.config import make_plan

    tool = load_tool()
    recipe = str(REPO / "largemim/recipes/mae_vit_large_patch16.yaml")
    cfg = tool.bench_config(tool.parse_args(["--config", recipe, *TINY, "--steps", "3"]))
    assert make_plan(cfg, 1, 10**6).grad_accum == 1
