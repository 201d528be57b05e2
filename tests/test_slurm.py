"""Launchers on a real Slurm cluster (slurm/local_cluster.sh: two nodes n1, n2 on this machine).

Every job trains the tiny MAE with real DeepSpeed engines (gloo) on 2 ranks, one per node, from real tar
shards. An uninterrupted ``largemim-submit`` job is the reference; a job preempted with the requeue
signal and a job that meets a real 1-minute time limit must be requeued and log exactly the reference's
losses, step by step (a step trained twice or skipped would change every later loss).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, read_metrics


def on_cluster(test):
    """A test that runs jobs on the local cluster."""
    return pytest.mark.slurm(pytest.mark.slow(test))


CLUSTER = REPO / "slurm" / "local_cluster.sh"
RECIPE = str(REPO / "largemim/recipes/mae_tiny_cpu.yaml")
STEPS = 200  # long enough that a signal lands mid-run; ~15-20 s of training on 2 shared cores
TEMPLATE_STEPS = 100
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# Shards are read through a pipe: command, so that the first run of a job chain can be held back (see
# CAT_SHARD); the stream, and so every loss, is the same whichever way a shard is read.
CAT_SHARD = """#!/bin/sh
# Test helper, data.shards=pipe:THIS SHARD: print the shard. Slurm signals every process of a job step;
# the stop signals are not trapped here: largemim starts its readers with them ignored.
if [ -n "$LM_TEST_HOLD_FIRST_RUN" ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    # The first run of the chain reads nothing until 50 s after the job started, so that it is still
    # running when its time-limit warning comes (25-55 s after the start with --time 1 --signal-delay-s 5).
    start=$(date -d "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/.*StartTime=\\([^ ]*\\).*/\\1/p')" +%s)
    wait=$((start + 50 - $(date +%s)))
    if [ "$wait" -gt 0 ]; then sleep "$wait"; fi
fi
exec cat "$1"
"""


# ------------------------------------------------------------------------------------------ the cluster
@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster, started here if it is not running (and then stopped at the end)."""
    base = Path(os.environ.get("LARGEMIM_SLURM_BASE", "/tmp/largemim-slurm"))
    started = subprocess.run([str(CLUSTER), "status", "--base", str(base)], capture_output=True).returncode != 0
    # start on a running cluster checks that it runs with the slurm.conf this checkout writes
    proc = subprocess.run([str(CLUSTER), "start", "--base", str(base)], capture_output=True, text=True)
    assert proc.returncode == 0, f"local cluster did not start:\n{proc.stdout}\n{proc.stderr}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(base / "etc/slurm.conf"))
        mp.setenv("PATH", f"{base / 'bin'}{os.pathsep}{os.environ['PATH']}")  # the sacct stand-in
        # Exported into the jobs by sbatch (--export=ALL is the default).
        mp.setenv("DS_ACCELERATOR", "cpu")
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("PYTHONUNBUFFERED", "1")
        mp.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        mp.delenv("LM_TEST_SLOW_START", raising=False)
        yield base
    if started:
        subprocess.run([str(CLUSTER), "stop", "--base", str(base)], capture_output=True)


@pytest.fixture(scope="module")
def shards(shard_set, tmp_path_factory) -> str:
    helper = tmp_path_factory.mktemp("pipe") / "cat_shard.sh"
    helper.write_text(CAT_SHARD)
    helper.chmod(0o755)
    # exec: gopen runs the command with /bin/sh -c, and that shell would die of the signal too.
    return f"pipe:exec {helper} {shard_set}"


def overrides(run_dir: Path, shards: str, steps: int = STEPS) -> list[str]:
    return [
        *TINY, f"data.shards={shards}", "data.num_samples=640", f"run.dir={run_dir}", f"train.steps={steps}",
        f"ds_config={REPO / 'ds_configs/zero2.json'}", "train.precision=fp32", "checkpoint.every_steps=1000",
    ]  # fmt: skip


def submit_args(run_dir: Path, shards: str, *extra: str) -> list[str]:
    return [
        "--config", RECIPE, *overrides(run_dir, shards), "--nodes", "2", "--tasks-per-node", "1",
        "--cpus-per-task", "1", "--partition", "debug", "--signal-delay-s", "30", *extra,
    ]  # fmt: skip


def submit(args: list[str]) -> str:
    from largemim.launch.submit import submit as submit_job

    job, _ = submit_job(args)
    return str(job.job_id)


def slurm_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-j", job_id, "-o", "JobID,State", "--parsable2", "-n"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        if jid == job_id:
            return state.split()[0] if state else "UNKNOWN"
    return "UNKNOWN"


def restarts(job_id: str) -> int | None:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    fields = dict(w.split("=", 1) for w in out.split() if "=" in w)
    return int(fields["Restarts"]) if "Restarts" in fields else None


def wait_until_ended(job_id: str, timeout: float, logs: Path) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = slurm_state(job_id)
        if state in FINAL:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not end in {timeout:.0f} s (state {state}); logs:\n{tail_logs(logs)}")


def wait_for_steps(run_dir: Path, n: int, timeout: float, logs: Path) -> None:
    path, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not log {n} steps in {timeout:.0f} s; logs:\n{tail_logs(logs)}")


def tail_logs(folder: Path, lines: int = 25) -> str:
    out = []
    for f in sorted(folder.glob("*.out")) + sorted(folder.glob("*.err")):
        text = [ln for ln in f.read_text(errors="replace").splitlines() if "FutureWarning" not in ln]
        out.append(f"----- {f.name}\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


def chain_events(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "slurm/chain.jsonl").read_text().splitlines()]


def assert_same_losses(run_dir: Path, reference: Path, steps: int = STEPS) -> None:
    got, want = read_metrics(run_dir), read_metrics(reference)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(1, steps + 1))  # none twice, none skipped
    diffs = [(s, got[s]["loss"], want[s]["loss"]) for s in range(1, steps + 1) if got[s]["loss"] != want[s]["loss"]]
    assert not diffs, f"{len(diffs)} steps differ from the uninterrupted run, first {diffs[:3]}"


def assert_resumed_where_stopped(events: list[dict]) -> list[int]:
    """Every requeue/stop is followed by a start from exactly that step; returns the stop steps."""
    stops = []
    for i, e in enumerate(events):
        if e["event"] in ("requeued", "stopped"):
            stops.append(e["step"])
            later = [x for x in events[i + 1 :] if x["event"] == "started"]
            if later:
                assert later[0]["step"] == e["step"], events
    return stops


# ------------------------------------------------------------------------------------------ submitit
@pytest.fixture(scope="module")
def reference(slurm_cluster, shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-node x 1-task largemim-submit job."""
    run = tmp_path_factory.mktemp("reference") / "run"
    job_id = submit(submit_args(run, shards, "--time", "10"))
    state = wait_until_ended(job_id, 300, run / "slurm")
    assert state == "COMPLETED", tail_logs(run / "slurm")
    return run


@on_cluster
def test_submitit_two_node_job_trains_and_finishes(time_limit_job, reference):
    import submitit

    from largemim.launch.chain import format_status

    events = chain_events(reference)
    assert [e["event"] for e in events] == ["submitted", "started", "finished"]
    job_id = events[0]["job_id"]
    assert events[1]["nodes"] == ["n1", "n2"] and events[1]["step"] == 0
    results = submitit.SlurmJob(reference / "slurm", job_id, tasks=[0, 1]).results()
    assert [r["end_step"] for r in results] == [STEPS, STEPS]
    assert not any(r["stopped_early"] for r in results)
    metrics = read_metrics(reference)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    losses = [metrics[s]["loss"] for s in range(1, STEPS + 1)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, losses[:10] + losses[-10:]
    assert (reference / f"checkpoints/step_{STEPS:08d}/COMPLETE").is_file()
    status = format_status(reference)
    assert f"job {job_id}: COMPLETED, 0 requeue(s)" in status, status
    assert f"progress: step {STEPS} of {STEPS}, last loss {metrics[STEPS]['loss']:.4f}" in status, status


# A job in the "urgent" partition that needs both nodes whole: Slurm preempts the training job for it.
URGENT = [
    "sbatch", "--parsable", "--partition", "urgent", "--nodes", "2", "--exclusive", "--output", "/dev/null",
    "--wrap", "sleep 1",
]  # fmt: skip


@on_cluster
@pytest.mark.parametrize(
    "interrupt, reason, cap",
    [
        # what a preemption script sends: the ranks save and requeue the job themselves
        (lambda job: ["scancel", "--signal=USR2", job], "requeue 1 of at most 20", "20"),
        # a real preemption (PreemptMode=REQUEUE, GraceTime=60): Slurm SIGTERMs the job's steps at once and
        # would requeue the job itself 60 s later, whatever --max-requeues, but not a job that has ended;
        # the ranks save and requeue it at once, also at the cap
        (lambda job: URGENT, "requeue 1, not capped", "0"),
        # Slurm's own requeue (a preemption without grace time, a node failure, an admin's scontrol requeue)
        # SIGTERMs the job: the ranks save, see that Slurm has requeued it already (its restart count is
        # past theirs) and leave without a result, so the chain says requeued and the next run finishes
        (lambda job: ["scontrol", "requeue", job], "Slurm requeued the job", "20"),
    ],
    ids=["preemption-signal", "preemption-at-the-cap", "requeue-by-slurm"],
)
def test_a_requeued_job_resumes_and_matches_uninterrupted_run(reference, shards, tmp_path, interrupt, reason, cap):
    import submitit

    run = tmp_path / "run"
    job_id = submit(submit_args(run, shards, "--time", "10", "--max-requeues", cap))
    wait_for_steps(run, 30, 240, run / "slurm")
    other = subprocess.run(interrupt(job_id), check=True, capture_output=True, text=True).stdout.strip()
    assert wait_until_ended(job_id, 300, run / "slurm") == "COMPLETED", tail_logs(run / "slurm")
    if other:  # the urgent job: it ran, in the time between the training job's two runs
        assert wait_until_ended(other, 60, run / "slurm") == "COMPLETED"

    events = chain_events(run)
    assert [e["event"] for e in events] == ["submitted", "started", "requeued", "started", "finished"], events
    assert reason in events[2]["reason"], events[2]
    (stop,) = assert_resumed_where_stopped(events)
    assert 30 <= stop < STEPS
    assert restarts(job_id) in (1, None)  # None: slurmctld has forgotten the job already
    results = submitit.SlurmJob(run / "slurm", job_id, tasks=[0, 1]).results()
    assert [r["end_step"] for r in results] == [STEPS, STEPS]
    assert_same_losses(run, reference)


@pytest.fixture(scope="module")
def time_limit_job(slurm_cluster, shards, tmp_path_factory) -> tuple[str, Path]:
    """A real 1-minute limit. slurmctld checks limits every 30 s: with --signal-delay-s 5 the warning (USR2)
    comes 25-55 s after the start and the limit itself is enforced at the next check, 30 s later. The
    ranks save and the job requeues itself until the run ends. Its first run is held back (CAT_SHARD) so
    that it surely meets its warning; the later ones train at full speed. Submitted before the reference
    (the first test asks for it): most of its time is spent waiting for Slurm, so other jobs run meanwhile."""
    run = tmp_path_factory.mktemp("time_limit") / "run"
    hold = "export=ALL,LM_TEST_HOLD_FIRST_RUN=1"
    return submit(submit_args(run, shards, "--time", "1", "--signal-delay-s", "5", "--sbatch-extra", hold)), run


@on_cluster
def test_time_limit_requeues_and_matches_uninterrupted_run(time_limit_job, reference):
    job_id, run = time_limit_job
    assert wait_until_ended(job_id, 600, run / "slurm") == "COMPLETED", tail_logs(run / "slurm")

    events = chain_events(run)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "submitted" and kinds[-1] == "finished" and kinds.count("requeued") >= 1, kinds
    assert kinds.count("started") == kinds.count("requeued") + 1, kinds
    assert "stopped" not in kinds and "failed" not in kinds, events
    stops = assert_resumed_where_stopped(events)
    assert stops == sorted(stops) and stops[0] >= 1, stops
    assert_same_losses(run, reference)


@on_cluster
def test_requeue_cap_and_cancel(slurm_cluster, shards, tmp_path):
    """--max-requeues 0: the signal saves and ends the job (no requeue); the same command continues the
    run (and is refused while that job runs); largemim-submit --cancel saves the step it is at and ends the
    job for good."""
    import submitit

    from largemim.launch.submit import main

    run = tmp_path / "run"
    args = submit_args(run, shards, "--time", "10", "--max-requeues", "0")
    first = submit(args)
    wait_for_steps(run, 20, 240, run / "slurm")
    subprocess.run(["scancel", "--signal=USR2", first], check=True)
    assert wait_until_ended(first, 240, run / "slurm") in ("FAILED", "COMPLETED")
    with pytest.raises(Exception, match=r"not requeued: it has been requeued 0 times \(--max-requeues 0\)"):
        submitit.SlurmJob(run / "slurm", first, tasks=[0, 1]).results()
    stopped = chain_events(run)[-1]
    assert stopped["event"] == "stopped" and (run / f"checkpoints/step_{stopped['step']:08d}/COMPLETE").is_file()

    second = submit(args)  # the same command: resumes from the saved step
    wait_for_steps(run, stopped["step"] + 20, 240, run / "slurm")
    from largemim.config import ConfigError

    with pytest.raises(ConfigError, match=rf"already has a live job: {second} \(RUNNING\)"):
        submit(args)  # a second job on the same run folder, while the first runs: refused
    assert main(["--cancel", str(run)]) == 0
    assert wait_until_ended(second, 240, run / "slurm") == "CANCELLED"
    events = chain_events(run)
    starts = [e for e in events if e["event"] == "started"]
    assert [e["job_id"] for e in starts] == [first, second], events  # the cancelled job never came back
    last = events[-1]
    assert last["event"] == "stopped" and last["job_id"] == second, last
    assert "COMPLETING" in last["reason"] or "CANCELLED" in last["reason"], last  # not requeued: cancelled
    assert last["step"] > stopped["step"]
    assert (run / f"checkpoints/step_{last['step']:08d}/COMPLETE").is_file()  # saved on the way out
    assert_resumed_where_stopped(events)
    assert sorted(read_metrics(run)) == list(range(1, last["step"] + 1))


# ------------------------------------------------------------------------------------------ sbatch templates
def sbatch_template(template: str, run: Path, shards: str, *extra: str) -> str:
    run.mkdir(parents=True)
    env = dict(os.environ, CONFIG=RECIPE, PROCS_PER_NODE="1", VENV=str(REPO / ".venv"))
    cmd = [
        "sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", "--partition=debug",
        f"--output={run}/slurm-%j.out", str(REPO / "slurm" / template), *overrides(run, shards, TEMPLATE_STEPS),
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def torchrun_run(slurm_cluster, shards, tmp_path_factory) -> Path:
    """The torchrun template on 2 nodes, sent its warning signal (B:USR1) mid-run: forwarded to the ranks,
    saved, requeued by the batch script, finished."""
    run = tmp_path_factory.mktemp("torchrun") / "run"
    job_id = sbatch_template("torchrun.sbatch", run, shards)
    wait_for_steps(run, 20, 240, run)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)  # as #SBATCH --signal=B:USR1@...
    assert wait_until_ended(job_id, 300, run) == "COMPLETED", tail_logs(run)
    return run


@on_cluster
def test_torchrun_template_two_nodes_requeues_on_its_signal(torchrun_run):
    log = next(torchrun_run.glob("slurm-*.out")).read_text()
    assert "2 node(s) x 1 rank(s), master n1:" in log
    assert "got SIGUSR1: forwarding it to the ranks" in log and "requeueing (requeue 1 of at most 20)" in log
    assert "[rank 1] received SIGUSR1" in log  # the rank on n2 got it too
    assert log.count("] srun exited with 0") == 2 and "the ranks saved step" in log
    assert sorted(read_metrics(torchrun_run)) == list(range(1, TEMPLATE_STEPS + 1))


@on_cluster
def test_deepspeed_template_two_nodes_matches_torchrun(torchrun_run, shards, tmp_path):
    """The deepspeed CLI on 2 nodes (one `deepspeed --no_ssh --node_rank N` per node), uninterrupted: the
    same losses as the torchrun run that was stopped and requeued half-way."""
    run = tmp_path / "run"
    job_id = sbatch_template("deepspeed.sbatch", run, shards)
    assert wait_until_ended(job_id, 300, run) == "COMPLETED", tail_logs(run)
    log = next(run.glob("slurm-*.out")).read_text()
    assert "nnodes=2, num_local_procs=1, node_rank=1" in log and "dist_world_size=2" in log
    assert_same_losses(run, torchrun_run, TEMPLATE_STEPS)


@on_cluster
@pytest.mark.parametrize("template", ["torchrun.sbatch", "deepspeed.sbatch"])
def test_templates_requeue_when_preempted(torchrun_run, shards, tmp_path, template):
    """A real preemption with a grace time: Slurm SIGTERMs the job's steps but not the batch script, and
    would requeue the job only when the grace time ends. The ranks save and stop; the script learns that
    from the ranks (LARGEMIM_END_FILE) and requeues at once, instead of taking their exit for the end of
    the run and letting the job end FAILED or COMPLETED half-way."""
    run = tmp_path / "run"
    job_id = sbatch_template(template, run, shards)
    wait_for_steps(run, 20, 240, run)
    urgent = subprocess.run(URGENT, check=True, capture_output=True, text=True).stdout.strip()
    assert wait_until_ended(job_id, 300, run) == "COMPLETED", tail_logs(run)
    assert wait_until_ended(urgent, 60, run) == "COMPLETED"
    log = next(run.glob("slurm-*.out")).read_text()
    assert "the ranks saved step" in log and "requeueing (preempted: Slurm would requeue it" in log, tail_logs(run)
    assert_same_losses(run, torchrun_run, TEMPLATE_STEPS)


@on_cluster
def test_deepspeed_template_saves_on_scancel(slurm_cluster, shards, tmp_path):
    """A plain scancel (SIGTERM to every process of the step): the per-node bash and the deepspeed runner
    wait instead of dying at once (which would end the task and get the ranks killed before they saved),
    so the ranks save the step they stop at; the job is not requeued. With a loader worker per rank,
    which gets the SIGTERM too and must not take its rank down with it."""
    from largemim.checkpoint import complete_checkpoints

    run = tmp_path / "run"
    job_id = sbatch_template("deepspeed.sbatch", run, shards, "data.workers=1")
    wait_for_steps(run, 20, 240, run)
    subprocess.run(["scancel", job_id], check=True)
    assert wait_until_ended(job_id, 120, run) == "CANCELLED", tail_logs(run)
    saved = [step for step, _ in complete_checkpoints(run / "checkpoints")]
    assert saved and 20 <= saved[-1] < TEMPLATE_STEPS, tail_logs(run)  # every_steps=1000: only the stop's save
    assert "requeueing" not in next(run.glob("slurm-*.out")).read_text()


# ------------------------------------------------------------------------------------------ CLI
@on_cluster
def test_dry_run_prints_the_script_and_config_and_submits_nothing(slurm_cluster, shards, tmp_path, capsys):
    from largemim.launch.submit import main

    run = tmp_path / "run"
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    code = main([
        *submit_args(run, shards), "--time", "90", "--exclusive", "--account", "acct", "--qos", "high",
        "--mem", "4G", "--constraint", "a100", "--sbatch-extra", "mail-type=END", "--dry-run",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    for line in [
        "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=1", "#SBATCH --time=90",
        "#SBATCH --signal=USR2@30", "#SBATCH --requeue", "#SBATCH --partition=debug", "#SBATCH --exclusive",
        "#SBATCH --account=acct", "#SBATCH --qos=high", "#SBATCH --mem=4G", "#SBATCH --constraint=a100",
        "#SBATCH --mail-type=END", f"#SBATCH --output={run}/slurm/%j_0_log.out", "export SUBMITIT_PREEMPT_SIGNAL=USR2",
        f"submitit.core._submit {run}/slurm", "export SRUN_CPUS_PER_TASK=", "# time limit: 90 min (--time)",
    ]:  # fmt: skip
        assert line in out, line
    # The resolved config: absolute run dir; the requeue signal joined the default stop signals.
    assert f"dir: {run}" in out and "- SIGUSR2" in out, out
    assert f"world size 2 (2 node(s) x 1 task(s)): {STEPS} steps" in out
    assert not run.exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == queued

    assert main([*submit_args(run, shards), "--signal", "sigusr1", "--time", "1-00", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --signal=USR1@30" in out and "export SUBMITIT_PREEMPT_SIGNAL=USR1" in out
    assert "#SBATCH --time=1440" in out
    # No --time, and this cluster's partition has no DefaultTime: asked for (submitit alone would write 5).
    assert main([*submit_args(run, shards), "--dry-run"]) == 2
    assert "partition 'debug' has no DefaultTime (MaxTime infinite)" in capsys.readouterr().err

    assert main(["--config", RECIPE, *overrides(run, shards), "optim.lrr=1", "--dry-run"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert main([*submit_args(run, shards), "--signal", "NOPE", "--dry-run"]) == 2
    assert "--signal 'NOPE' is not a signal name" in capsys.readouterr().err
    assert main(["--status", str(run)]) == 0 and "no Slurm jobs recorded" in capsys.readouterr().out


def test_a_stop_signal_during_start_up_is_kept_for_the_loop():
    """The launcher catches stop signals first thing; the training loop's handler adopts what came in
    the meantime (once), so a warning during start-up still stops the run after its first step."""
    import signal

    import torch

    from largemim import signals

    previous = signal.getsignal(signal.SIGUSR2)
    try:
        signals.catch_early(["SIGUSR2"])
        os.kill(os.getpid(), signal.SIGUSR2)  # runs the handler before the next statement
        stopper = signals.StopOnSignal(["SIGTERM", "SIGUSR2"], torch.device("cpu"))
        assert stopper.received == "SIGUSR2" and stopper.agreed()
        stopper.restore()
        again = signals.StopOnSignal(["SIGUSR2"], torch.device("cpu"))
        assert again.received is None and not again.agreed()
        again.restore()
    finally:
        signal.signal(signal.SIGUSR2, previous)
