"""End to end: the real trainer under torchrun, 2 ranks, gloo, real DeepSpeed engines, real tar shards."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, TINY, demo_samples, read_metrics, run_trainer, trainer_cmd, trainer_env, write_shards
from PIL import Image

pytestmark = pytest.mark.slow


def _falling(metrics: dict[int, dict], steps: int) -> None:
    losses = [metrics[s]["loss"] for s in range(1, steps + 1)]
    assert all(map(lambda v: v == v and abs(v) < 1e6, losses)), losses  # finite
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


@pytest.mark.parametrize(
    "ds_config, precision, autocast",
    [
        ("zero0", "fp32", False),
        ("zero1", "bf16", False),
        ("zero2", "bf16", False),
        ("zero3", "bf16", False),
        ("zero3", "fp32", False),
        ("zero2", "bf16", True),
        ("zero3", "bf16", True),
    ],
)
def test_short_training_per_zero_stage(tmp_path, shard_set, ds_config, precision, autocast):
    run = tmp_path / "run"
    over = [f"ds_config=ds_configs/{ds_config}.json", f"train.precision={precision}", f"train.autocast={autocast}"]
    run_trainer(run, shard_set, [*over, "train.steps=12"])
    metrics = read_metrics(run)
    assert sorted(metrics) == list(range(1, 13))
    _falling(metrics, 12)
    marker = json.loads((run / "checkpoints/step_00000012/COMPLETE").read_text())
    assert marker["world_size"] == 2 and marker["zero_stage"] == int(ds_config[-1])
    assert (run / "config.yaml").is_file()


def test_representation_check_on_two_ranks_and_its_baselines_across_a_resume(tmp_path, shard_set):
    """Under ZeRO-3 every rank runs the forward passes; rank 0 alone fits the read-outs and reports. The
    baselines are computed once with their eval settings; a resume with other settings recomputes them
    and, as the encoder is no longer random, leaves the random-init row out."""
    test_set = write_shards(tmp_path / "labelled", demo_samples("test", 64), [64])
    run = tmp_path / "run"
    common = [
        "ds_config=ds_configs/zero3.json", "train.precision=fp32", f"eval.train_shards={shard_set}",
        f"eval.test_shards={test_set}", "eval.train_samples=128", "eval.test_samples=64", "eval.every_steps=4",
        "log.tensorboard=true",
    ]  # fmt: skip
    proc = run_trainer(run, shard_set, [*common, "train.steps=8", "eval.knn_k=5"])
    base = json.loads((run / "repr_baselines.json").read_text())
    assert set(base) == {"settings", "random_init", "raw_pixels"} and base["settings"]["knn_k"] == 5
    for row in ("random_init", "raw_pixels"):
        assert 0.0 < base[row]["knn"] <= 1.0 and 0.0 < base[row]["linear"] <= 1.0, base
    out = proc.stdout + proc.stderr
    assert "random-init encoder" in out and "pre-trained encoder (step 8)" in out, out[-3000:]
    assert out.count("representation check at step 4") == 1  # rank 0 reports, once

    run_trainer(run, shard_set, [*common, "train.steps=12", "eval.knn_k=7"])  # resumes at step 8
    base = json.loads((run / "repr_baselines.json").read_text())
    assert set(base) == {"settings", "raw_pixels"} and base["settings"]["knn_k"] == 7, base
    # every check in eval.jsonl (also without TensorBoard), none twice across the resume
    checks = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [(c["step"], c["eval"]) for c in checks] == [(4, "repr"), (8, "repr"), (12, "repr")], checks
    assert all(0.0 < c["knn"] <= 1.0 and 0.0 < c["linear"] <= 1.0 for c in checks), checks
    table = subprocess.run(
        [sys.executable, str(REPO / "tools/learning_curve.py"), str(run)], capture_output=True, text=True, check=True
    ).stdout
    assert [ln.split(" | ")[0] for ln in table.splitlines() if ln[2:3].isdigit()] == ["| 4", "| 8", "| 12"], table


def test_activation_checkpointing_gives_the_same_losses(tmp_path, shard_set):
    common = ["ds_config=ds_configs/zero2.json", "train.precision=fp32", "train.steps=4"]
    run_trainer(tmp_path / "plain", shard_set, common)
    run_trainer(tmp_path / "ckpt", shard_set, [*common, "model.grad_ckpt_every=1"])
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ckpt")
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in b]


def test_gradient_checks_give_the_same_losses(tmp_path, shard_set):
    """DeepSpeed's bf16 mode with clipping: train.check_grad_overflow=false takes the same steps (nothing
    overflows here), and DeepSpeed's own per-tensor loops (train.foreach_grad_checks=false) the same steps
    as largemim's multi-tensor checks, up to the fp32 (not fp64) accumulation of each tensor's norm."""
    common = ["ds_config=ds_configs/zero2.json", "train.precision=bf16", "train.steps=4", "optim.grad_clip=0.05"]
    run_trainer(tmp_path / "checked", shard_set, common)
    run_trainer(tmp_path / "unchecked", shard_set, [*common, "train.check_grad_overflow=false"])
    run_trainer(tmp_path / "deepspeed", shard_set, [*common, "train.foreach_grad_checks=false"])
    a, b, c = (read_metrics(tmp_path / name) for name in ("checked", "unchecked", "deepspeed"))
    assert sorted(b) == [1, 2, 3, 4] and [a[s]["loss"] for s in a] == [b[s]["loss"] for s in b]
    assert all(a[s]["grad_norm"] > 0.05 for s in a)  # clipping acts at every step, so the norm matters
    for key in ("loss", "grad_norm"):
        assert [c[s][key] for s in c] == pytest.approx([a[s][key] for s in a], rel=1e-4), key


def test_auto_checkpointing_checkpoints_when_the_budget_needs_it(tmp_path, shard_set):
    """model.grad_ckpt_auto with a memory budget between the predicted needs without and with every block
    checkpointed: the trainer picks some checkpointing, says so, and trains as with that choice by hand."""
    from largemim.config import load_config
    from largemim.engine import load_ds_json
    from largemim.memory import GIB, ActivationCount, count_activations_each, predicted_peak, zero_config

    common = ["ds_config=ds_configs/zero2.json", "train.precision=bf16", "train.steps=3"]
    c = load_config(None, [*TINY, "data.shards=x", *common])
    zero = zero_config(load_ds_json(REPO / "ds_configs/zero2.json"))
    none, full = count_activations_each(c, (0, 1))
    need = [predicted_peak(a, c.train.micro_batch, 2, zero) * 1.28 / GIB for a in (none, full)]
    assert need[1] < need[0] and isinstance(full, ActivationCount)
    budget = (need[0] + need[1]) / 2
    auto = run_trainer(tmp_path / "auto", shard_set, [*common, "model.grad_ckpt_auto=true",
                                                      f"model.grad_ckpt_budget_gib={budget!r}"])  # fmt: skip
    chosen = re.search(r"model.grad_ckpt_auto: grad_ckpt_every=(\d+)", auto.stdout + auto.stderr)
    assert chosen and int(chosen.group(1)) > 0, (auto.stdout + auto.stderr)[-3000:]
    run_trainer(tmp_path / "by_hand", shard_set, [*common, f"model.grad_ckpt_every={chosen.group(1)}"])
    a, b = read_metrics(tmp_path / "auto"), read_metrics(tmp_path / "by_hand")
    assert sorted(a) == [1, 2, 3] and [a[s]["loss"] for s in a] == [b[s]["loss"] for s in b]


def test_resume_takes_the_configured_optimizer_settings_and_logs_whole_windows(tmp_path, shard_set):
    """A resume goes on with the run's configured lr and clip, not those saved in the checkpoint (the advice
    after a NaN is to lower the lr and resume), and a resumed run's first log window averages only the
    steps it ran."""
    common = [
        "ds_config=ds_configs/zero2.json", "train.precision=fp32", "train.steps=6", "checkpoint.every_steps=3",
        "optim.grad_clip=0",
    ]  # fmt: skip
    straight = tmp_path / "straight"
    run_trainer(straight, shard_set, [*common, "log.every_steps=1", "optim.grad_clip=0.5"])
    per_step = read_metrics(straight)  # steps 1-3 as in the run below; step 4's loss comes before its update

    run = tmp_path / "run"
    run_trainer(run, shard_set, [*common, "log.every_steps=2", "optim.grad_clip=0.5"])
    shutil.rmtree(run / "checkpoints/step_00000006")  # as if stopped after step 3
    proc = run_trainer(run, shard_set, [*common, "log.every_steps=2"])
    assert "optim.grad_clip=0 replaces the clip of 0.5 saved in the checkpoint" in proc.stdout + proc.stderr
    # the step-4 window holds step 4 alone (it was divided by the full window's 2 steps)
    assert read_metrics(run)[4]["loss"] == pytest.approx(per_step[4]["loss"], rel=1e-6)

    shutil.rmtree(run / "checkpoints/step_00000006")
    proc = run_trainer(run, shard_set, [*common, "log.every_steps=2", "optim.base_lr=4e-3"])  # twice TINY's
    assert "the configured optimizer settings replace the checkpoint's: peak lr" in proc.stdout + proc.stderr
    lr = read_metrics(run)[4]["lr"]
    assert lr > 0 and lr == pytest.approx(2 * per_step[4]["lr"], rel=1e-6)


def test_compiled_training_gives_the_eager_losses(tmp_path, shard_set, monkeypatch):
    """train.compile (DeepSpeed engine.compile, inductor; about 2 minutes of compiling on 2 CPU cores):
    the same masks and, to float rounding, the same losses as the eager run; and the reconstruction
    picture at the end (eval mode, 8 images) runs eagerly instead of compiling the model a second time."""
    common = ["ds_config=ds_configs/zero2.json", "train.precision=fp32", "train.steps=3"]
    run_trainer(tmp_path / "eager", shard_set, common)
    monkeypatch.setenv("TORCH_LOGS", "recompiles")
    proc = run_trainer(tmp_path / "compiled", shard_set, [*common, "train.compile=true"], timeout=600)
    assert "Recompiling" not in proc.stdout + proc.stderr
    assert list((tmp_path / "compiled" / "reconstructions").glob("step_*.png"))
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4), step


def _jpeg_shards(folder) -> str:
    """Real images as RGB JPEGs in 4 shards, one in every 25 a truncated file (a header, half the data)."""
    samples = []
    for i, s in enumerate(demo_samples("train", 400)):
        buf = io.BytesIO()
        Image.open(io.BytesIO(s["png"])).convert("RGB").resize((40, 40), Image.BICUBIC).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        samples.append({"__key__": s["__key__"], "jpg": data[: len(data) // 2] if i % 25 == 7 else data})
    return write_shards(folder, samples, [100] * 4)


def test_device_decode_trains_like_the_reference_pipeline(tmp_path):
    """data.decode=device (here on the CPU device) sees the reference pipeline's batches, so the losses agree
    to rounding; truncated JPEGs, which only the decode finds, are skipped and counted in both."""
    shards = _jpeg_shards(tmp_path / "shards")
    common = ["ds_config=ds_configs/zero2.json", "train.precision=fp32", "train.steps=6", "data.workers=2"]
    run_trainer(tmp_path / "ref", shards, [*common, "data.decode=reference"])
    run_trainer(tmp_path / "dev", shards, [*common, "data.decode=device"])
    ref, dev = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "dev")
    assert sorted(dev) == list(range(1, 7))
    for step in ref:  # norm_pix_loss on 4 px patches magnifies sub-grey-level differences to ~0.5 %
        assert dev[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-2), step
        assert dev[step].get("skipped_samples", 0) == ref[step].get("skipped_samples", 0), step
    assert dev[6]["skipped_samples"] > 0
    # the count is all ranks' since the run began, and carries across a resume
    run_trainer(tmp_path / "dev", shards, [*common, "data.decode=device", "train.steps=9"])
    resumed = read_metrics(tmp_path / "dev")
    assert all(resumed[s]["skipped_samples"] >= dev[6]["skipped_samples"] for s in (7, 8, 9))


def _launch(run_dir, shards, overrides):
    cmd = trainer_cmd(2, [*TINY, f"data.shards={shards}", f"run.dir={run_dir}", *overrides])
    return subprocess.Popen(
        cmd, cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_a_stop_signal_in_the_last_step_finishes_the_run(tmp_path, shard_set):
    """A signal during start-up stops the loop after its first step; with one step that is the last: the
    run is complete (saved, reported "finished" to an sbatch template's batch script, which then does
    not requeue it) and only its final pictures and evaluation are skipped."""
    run, end_file = tmp_path / "run", tmp_path / "ended"
    cmd = [sys.executable, "-m", "largemim.train", "--config", str(REPO / "largemim/recipes/mae_tiny_cpu.yaml"),
           *TINY, f"data.shards={shard_set}", f"run.dir={run}", "train.steps=1", "train.warmup_steps=0",
           "ds_config=ds_configs/zero2.json", "train.precision=fp32", "log.image_every_steps=1"]  # fmt: skip
    env = dict(trainer_env(), LARGEMIM_END_FILE=str(end_file))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:  # the plan is logged before the engine is built: well before step 1 ends
        out.append(line)
        if "plan: 1 steps" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    out.append(proc.communicate(timeout=240)[0])
    text = "".join(out)
    assert proc.returncode == 0, text[-4000:]
    assert "stopping at step 1 on SIGUSR1" in text and "that was the last step" in text, text[-3000:]
    assert end_file.read_text() == "finished 1\n"
    assert (run / "checkpoints/step_00000001/COMPLETE").is_file()
    assert not (run / "reconstructions").exists() or not any((run / "reconstructions").iterdir())


def test_stop_on_signal_then_resume_matches_uninterrupted_run(tmp_path, shard_set):
    common = [
        "ds_config=ds_configs/zero2.json", "train.precision=fp32", "train.steps=24", "checkpoint.every_steps=1000",
        "data.workers=2",
    ]  # fmt: skip
    run_trainer(tmp_path / "straight", shard_set, common)
    straight = read_metrics(tmp_path / "straight")

    run = tmp_path / "interrupted"
    proc = _launch(run, shard_set, common)
    deadline = time.time() + 240
    while time.time() < deadline:  # signal once a few steps have run
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    # Signal the ranks and their loader workers, as scancel or a preemption signals every process of a
    # step (torchrun itself would turn a signal into its own exit code 1 after forwarding it).
    ranks = psutil.Process(proc.pid).children()
    workers = [w for r in ranks for w in r.children()]
    assert len(ranks) == 2 and len(workers) == 4, (ranks, workers)
    for p in ranks + workers:
        p.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    stopped = read_metrics(run)
    stop_step = max(stopped)
    assert 4 <= stop_step < 24, out[-2000:]
    assert (run / f"checkpoints/step_{stop_step:08d}/COMPLETE").is_file()
    # A save that was interrupted (no COMPLETE marker) must never be picked up.
    broken = run / "checkpoints/step_00000023"
    broken.mkdir()
    (broken / "mp_rank_00_model_states.pt").write_bytes(b"half a file")

    run_trainer(run, shard_set, common)  # the same command again: resumes with no flag
    resumed = read_metrics(run)
    assert sorted(resumed) == list(range(1, 25))
    for step in range(1, 25):
        assert resumed[step]["loss"] == straight[step]["loss"], (step, stop_step)


def test_config_error_exits_2_before_starting(tmp_path, shard_set):
    cmd = trainer_cmd(1, [*TINY, f"data.shards={shard_set}", f"run.dir={tmp_path}", "optim.lrr=1"])
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown config key 'optim.lrr'" in proc.stderr and "did you mean 'optim.lr'" in proc.stderr


# An uninterrupted 8-step ZeRO-2 fp32 run on 2 ranks, saved at steps 4 and 8: the reference that the resume
# tests below copy and resume (at another world size, under another ZeRO stage).
ZERO2_RUN = [
    "train.precision=fp32", "train.steps=8", "checkpoint.every_steps=4", "checkpoint.keep_last=5",
    "train.global_batch=32",
]  # fmt: skip


@pytest.fixture(scope="module")
def zero2_straight(tmp_path_factory, shard_set):
    straight = tmp_path_factory.mktemp("zero2_straight") / "run"
    run_trainer(straight, shard_set, [*ZERO2_RUN, "ds_config=ds_configs/zero2.json", "train.micro_batch=16"])
    return straight


def test_resume_at_another_world_size_through_universal_checkpoint(tmp_path, shard_set, zero2_straight):
    common = ["ds_config=ds_configs/zero2.json", *ZERO2_RUN]
    straight = zero2_straight
    full = read_metrics(straight)
    for nproc, micro, extra in ((2, 16, ["checkpoint.load_universal=true"]), (1, 32, ["checkpoint.keep_last=1"])):
        run = tmp_path / f"resumed_{nproc}"
        shutil.copytree(straight, run)
        shutil.rmtree(run / "checkpoints/step_00000008")  # as if stopped after step 4 ...
        leftover = run / "checkpoints/step_00000008/zero_pp_rank_1_mp_rank_00_optim_states.pt"
        leftover.parent.mkdir()
        leftover.write_bytes(b"half a file")  # ... in the middle of saving step 8 with 2 ranks
        proc = run_trainer(run, shard_set, [*common, f"train.micro_batch={micro}", *extra], nproc=nproc)
        assert "universal format" in proc.stdout + proc.stderr
        universal = run / "checkpoints/universal/step_00000004"
        if nproc == 2:
            assert (universal / "COMPLETE").is_file()
        else:  # keep_last=1: step 4 went when step 8 was saved, and its universal copy with it
            assert not universal.exists() and not (run / "checkpoints/step_00000004").exists()
            assert not leftover.exists(), "a 2-rank shard of the interrupted save was left among 1-rank files"
        assert (run / "checkpoints/step_00000008/COMPLETE").is_file()
        resumed = read_metrics(run)
        assert sorted(resumed) == list(range(1, 9))
        for step in range(5, 9):
            if nproc == 2:  # same ranks, same data: the universal copy restores the exact state
                assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5), step
            else:  # one rank reads its batches from other shards: same trajectory within noise
                assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=0.15), step


def test_resume_under_another_zero_stage(tmp_path, shard_set, zero2_straight):
    """Review finding: a ZeRO-2 checkpoint resumed with a ZeRO-3 ds_config (to fit memory) got "DeepSpeed
    returned nothing", and ZeRO-0 <-> ZeRO-1/2/3 a DeepSpeed traceback (FileNotFoundError, AttributeError).
    Now ZeRO-1/2 -> 3 goes through the universal format (the same trajectory), and ZeRO-0 <-> the others is
    a config error (exit 2) that names both stages and what to do."""
    common = [*ZERO2_RUN, "train.micro_batch=16"]
    straight = zero2_straight
    full = read_metrics(straight)
    run = tmp_path / "zero3"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints/step_00000008")  # as if stopped after step 4
    proc = run_trainer(run, shard_set, [*common, "ds_config=ds_configs/zero3.json"])
    out = proc.stdout + proc.stderr
    assert "written by 2 ranks with ZeRO-2; converting it to DeepSpeed's universal format" in out, out[-3000:]
    resumed = read_metrics(run)
    for step in range(5, 9):  # same ranks, same data: the same state, ZeRO-3 sums in another order
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-4), step
    # and back: the ZeRO-3 checkpoint of step 8 goes on under ZeRO-2 as under ZeRO-3
    longer = [*common, "train.steps=12"]
    for stage in (3, 2):
        shutil.copytree(run, tmp_path / f"on{stage}", ignore=shutil.ignore_patterns("universal"))
        run_trainer(tmp_path / f"on{stage}", shard_set, [*longer, f"ds_config=ds_configs/zero{stage}.json"])
    on3, on2 = read_metrics(tmp_path / "on3"), read_metrics(tmp_path / "on2")
    for step in range(9, 13):
        assert on2[step]["loss"] == pytest.approx(on3[step]["loss"], rel=1e-4), step
    overrides = [*TINY, f"data.shards={shard_set}", f"run.dir={run}", *common, "ds_config=ds_configs/zero0.json"]
    cmd = trainer_cmd(2, overrides)
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "largemim/trainer.py" not in proc.stderr, proc.stderr[-3000:]  # no traceback
    assert "exitcode  : 2" in proc.stderr  # a config error, on each rank
    assert "was saved with ZeRO-3 and this run's ds_config is ZeRO-0" in proc.stderr, proc.stderr[-3000:]
    assert "ds_configs/zero3.json" in proc.stderr


def test_a_resume_after_short_shards_rebuilds_the_lanes_as_they_were_read(tmp_path, shard_set):
    """Shards holding fewer samples than their manifest says move the lanes' later positions: the
    checkpoint records each rank's shortfalls, and the resume rebuilds its lanes with those parts cut
    where the reads ended, so it continues exactly."""
    data = tmp_path / "data"
    shutil.copytree(Path(shard_set).parent, data)
    manifest = json.loads((data / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["samples"] += 10  # every shard is 10 samples short of its manifest
    (data / "manifest.json").write_text(json.dumps(manifest))
    shards = str(data / Path(shard_set).name)
    common = [*ZERO2_RUN, "ds_config=ds_configs/zero2.json", "train.micro_batch=16"]
    straight = tmp_path / "straight"
    run_trainer(straight, shards, common)
    saved = torch.load(straight / "checkpoints/step_00000004/mp_rank_00_model_states.pt", weights_only=False)
    falls = saved["data"]["shortfalls"]
    assert falls["world_size"] == 2 and any(falls["by_rank"].values())  # met before step 4
    run = tmp_path / "resumed"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints/step_00000008")  # as if stopped after step 4
    run_trainer(run, shards, common)
    full, resumed = read_metrics(straight), read_metrics(run)
    for step in range(5, 9):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6), step


def test_a_damaged_newest_checkpoint_names_the_way_back(tmp_path, shard_set):
    """A newest checkpoint whose files cannot be read (a disk or quota problem, a file removed) stopped the
    resume with DeepSpeed's unpickling traceback. Now one line names it and the fallback: remove its
    COMPLETE and the run resumes from the checkpoint before."""
    common = ["ds_config=ds_configs/zero2.json", "train.precision=fp32", "checkpoint.every_steps=2",
              "checkpoint.keep_last=2", "train.global_batch=32", "train.micro_batch=16"]  # fmt: skip
    run = tmp_path / "run"
    run_trainer(run, shard_set, [*common, "train.steps=4"])
    newest = run / "checkpoints/step_00000004"
    shard = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    cmd = trainer_cmd(2, [*TINY, f"data.shards={shard_set}", f"run.dir={run}", *common, "train.steps=6"])
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"could not read checkpoint {newest}" in proc.stderr, proc.stderr[-3000:]
    assert f"remove {newest / 'COMPLETE'} and the run resumes from the previous complete checkpoint" in proc.stderr
    (newest / "COMPLETE").unlink()
    run_trainer(run, shard_set, [*common, "train.steps=6"])
    assert sorted(read_metrics(run)) == list(range(1, 7))
    assert (run / "checkpoints/step_00000006/COMPLETE").is_file()


def test_data2vec_zero3_resumes_at_another_world_size(tmp_path, shard_set):
    """ZeRO-3 data2vec saved by 2 ranks, resumed by 1 through the universal format: the teacher's fp32 EMA
    master, saved as each rank's slices, is put back together for the one rank, and training goes on."""
    from test_objectives_e2e import ZERO3_NOTHING_PERSISTENT

    ds = tmp_path / "zero3_nothing_persistent.json"
    ds.write_text(json.dumps(ZERO3_NOTHING_PERSISTENT))
    d2v = [
        "objective.name=data2vec", "objective.mask=block", "objective.mask_ratio=0.6", "objective.min_block_patches=2",
        "objective.target_layers=2", "objective.ema_start=0.99", "objective.ema_end=0.999", "objective.ema_steps=8",
    ]  # fmt: skip
    common = [*d2v, f"ds_config={ds}", "train.precision=fp32", "train.steps=8", "checkpoint.every_steps=4",
              "checkpoint.keep_last=5", "train.global_batch=32"]  # fmt: skip
    straight = tmp_path / "straight"
    run_trainer(straight, shard_set, [*common, "train.micro_batch=16"])
    run = tmp_path / "resumed"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints/step_00000008")  # as if stopped after step 4
    proc = run_trainer(run, shard_set, [*common, "train.micro_batch=32"], nproc=1)
    out = proc.stdout + proc.stderr
    assert "universal format" in out and re.search(r"restored \d+ buffers/frozen tensors", out), out[-3000:]
    full, resumed = read_metrics(straight), read_metrics(run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):  # one rank reads other batches: the same trajectory within noise
        for key in ("loss", "target_std"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=0.15), (step, key)


def test_init_from_reference_mae_checkpoint(tmp_path, shard_set):
    """A run started from another run's weights (exported to the reference MAE format) begins where it ended."""
    first = tmp_path / "first"
    run_trainer(first, shard_set, ["ds_config=ds_configs/zero2.json", "train.precision=fp32", "train.steps=6"])
    exported = tmp_path / "mae.pth"
    proc = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", "to-official", str(first), str(exported)],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = tmp_path / "second"
    common = ["ds_config=ds_configs/zero3.json", "train.precision=fp32", "train.steps=2"]
    out = run_trainer(second, shard_set, [*common, f"model.init_from={exported}"])
    assert "initialised from" in out.stdout + out.stderr
    scratch = tmp_path / "scratch"
    run_trainer(scratch, shard_set, common)
    # Starting from trained weights, the first loss is far below a fresh start's.
    assert read_metrics(second)[1]["loss"] < 0.9 * read_metrics(scratch)[1]["loss"]
