"""A diverged run saves nothing: largemim/health.py on real ZeRO engines, and the trainer end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, TINY, free_port, read_metrics, run_trainer, trainer_cmd, trainer_env


def test_nonfinite_weights_are_found_in_every_ranks_partition(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={free_port()}",
           str(REPO / "tests/health_helper.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = json.loads(out.read_text())
    assert [c["case"] for c in rank0] == ["zero2:bf16", "zero3:bf16", "zero3:fp32"]
    for r0, r1 in zip(rank0, rank1, strict=True):
        assert r0["clean"] == [] and r1["clean"] == [], (r0, r1)
        for bad in ("nan", "inf"):  # one value on rank 1: named there only, counted once over the ranks
            assert r1[bad]["found"] == [r1["name"]] and r0[bad]["found"] == [], (r0, r1)
            assert r0[bad]["all_ranks"] == 1
        for r in (r0, r1):  # the trainer's check before a save: both ranks stop, and say what and where
            assert r["save_check"].startswith(f"the weights hold inf/NaN after step 7 (1 tensor(s): {r1['name']}); "), r
            assert "there is no checkpoint to resume from" in r["save_check"], r
            assert r["clean_save_check"] == 6, r  # clean: the skipped samples summed over the ranks
        if r0["case"].startswith("zero3"):
            # each rank holds half the tensor, and the module's own view of it is empty: a check of the
            # visible weights would have missed the NaN
            assert r1["visible_numel"] == 0 and r1["local_numel"] == 24576, r1
            assert r1["nan"]["naive"] == [], r1
            assert r1["padded"]["numel"] % 2 and r1["padded"]["found"] == [], r1  # padding is not a weight


@pytest.mark.slow
def test_a_diverged_run_saves_nothing_after_it_and_resumes_from_the_last_good_checkpoint(tmp_path, shard_set):
    run = tmp_path / "run"
    zero0 = ["train.steps=6", "train.precision=fp32", f"ds_config={REPO / 'ds_configs/zero0.json'}"]
    run_trainer(run, shard_set, [*zero0, "train.steps=2", "checkpoint.every_steps=1"])  # steps 1, 2: good
    # Resumed at a lr that breaks the weights in step 3. ZeRO-0 fp32 applies inf/NaN steps (no overflow
    # test), and the loss is checked at log steps only, every 100 here: the save of step 4 comes first.
    diverge = [
        *TINY, f"data.shards={shard_set}", f"run.dir={run}", *zero0, "checkpoint.every_steps=2",
        "log.every_steps=100", "optim.base_lr=1e30",
    ]  # fmt: skip
    proc = subprocess.run(trainer_cmd(2, diverge), cwd=REPO, env=trainer_env(), capture_output=True, text=True)
    assert proc.returncode != 0
    good = run / "checkpoints/step_00000002"
    message = f"the loss is inf/NaN in steps 3-4; nothing was saved after it and a resume starts from {good}"
    assert f"largemim: training stopped: {message}" in proc.stderr, proc.stderr[-3000:]
    assert "largemim/trainer.py" not in proc.stderr  # one line, no traceback of the ranks
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]

    # the user lowers the lr again and resumes: from step 2, to the end, on finite losses
    run_trainer(run, shard_set, zero0)
    metrics = read_metrics(run)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6], sorted(metrics)
    assert all(abs(m["loss"]) < 10 for m in metrics.values()), metrics
