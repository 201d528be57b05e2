"""Parts of the Slurm launcher that need no cluster: the job's time limit (Slurm's time formats, the
partition's limit from sinfo's output), the dry-run script, and the order of the requeue on two real
gloo ranks. The launchers on a real cluster are in test_slurm.py.

A few Slurm commands are stand-ins on PATH here (sinfo printing a partition table, scontrol answering
for a job that does not exist): each test says which.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, TINY, free_port

from largemim.config import Config, ConfigError
from largemim.launch.time_limit import TimeLimit, job_time_limit, parse_slurm_time, partition_time_limit


# ------------------------------------------------------------------------------------------ time formats
@pytest.mark.parametrize(
    "text, minutes",
    [
        ("90", 90), ("0:30", 1), ("30:00", 30), ("30:01", 31),  # MM, MM:SS (seconds round up, as Slurm's)
        ("1:00:00", 60), ("12:30:00", 750), ("00:00:30", 1),  # HH:MM:SS
        ("2-12", 3600), ("1-02:30", 1590), ("1-00:00:00", 1440), ("1-00:00:30", 1441),  # D-HH[:MM[:SS]]
        ("infinite", None), ("UNLIMITED", None), ("Unlimited", None), (" 45 ", 45),
    ],
)  # fmt: skip
def test_slurm_time_formats(text, minutes):
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["n/a", "", "abc", "1:2:3:4", "1-2-3", "-5", "1.5", "1h"])
def test_what_is_not_a_slurm_time_is_an_error(text):
    with pytest.raises(ValueError):
        parse_slurm_time(text)


# ------------------------------------------------------------------------------------------ partitions
# `sinfo --noheader --all --format='%P %L %l'`: partition ('*' = the default), DefaultTime, MaxTime.
SINFO = """\
debug* 30:00 1-00:00:00
gpu n/a 2-00:00:00
long n/a infinite
short 10:00 1:00:00
"""


@pytest.mark.parametrize(
    "partition, minutes, source",
    [
        (None, 30, "default partition debug: DefaultTime 30:00"),
        ("debug", 30, "partition debug: DefaultTime 30:00"),
        ("short", 10, "partition short: DefaultTime 10:00"),
        ("debug,short", 10, "partition short: DefaultTime 10:00"),  # a list: the shortest limit
    ],
)
def test_partition_time_limit_from_sinfo(partition, minutes, source):
    limit = partition_time_limit(SINFO, partition)
    assert limit.minutes == minutes
    assert limit.source == f"{source}, from sinfo; --time not given"
    assert limit.sbatch == ("UNLIMITED" if minutes is None else str(minutes))


def test_partition_time_limit_errors_ask_for_time():
    with pytest.raises(ConfigError, match=r"partition 'nope' is not in sinfo's list \(debug, gpu, long, short\)"):
        partition_time_limit(SINFO, "nope")
    with pytest.raises(ConfigError, match="marks no default partition.*give --partition, or give --time"):
        partition_time_limit("gpu n/a 2-00:00:00\n", None)
    # No DefaultTime: sbatch would take min(MaxTime, the QOS's MaxWall); asking for MaxTime could exceed it.
    for partition in ("gpu", "long", "debug,gpu"):
        with pytest.raises(ConfigError, match=r"has no DefaultTime \(MaxTime .*QOS.*give --time"):
            partition_time_limit(SINFO, partition)
    with pytest.raises(ConfigError, match="no usable time limit.*give --time"):
        partition_time_limit("odd* soon n/a\n", None)
    with pytest.raises(ConfigError, match="not in sinfo's list \\(none\\)"):
        partition_time_limit("", "gpu")


@pytest.fixture
def fake_bin(tmp_path, monkeypatch) -> Path:
    """A folder first on PATH for stand-ins of Slurm's commands; SBATCH_* variables cleared."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    for name in ("SBATCH_TIMELIMIT", "SBATCH_PARTITION"):
        monkeypatch.delenv(name, raising=False)
    return folder


def stand_in(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_job_time_limit_order_and_failures(fake_bin, monkeypatch):
    stand_in(fake_bin, "sinfo", f"cat <<'EOF'\n{SINFO}EOF\n")
    assert job_time_limit("1-00:00:00", None) == TimeLimit(1440, "--time")
    assert job_time_limit(None, None).minutes == 30
    with pytest.raises(ConfigError, match="'long' has no DefaultTime"):
        job_time_limit(None, "long")
    monkeypatch.setenv("SBATCH_PARTITION", "short")  # sbatch would use it: so is its limit
    assert job_time_limit(None, None).minutes == 10
    assert job_time_limit(None, "short").minutes == 10  # the same partition both ways is fine
    with pytest.raises(ConfigError, match="--time: 'soon' is not a Slurm time"):
        job_time_limit("soon", None)
    monkeypatch.setenv("SBATCH_TIMELIMIT", "2:00:00")  # wins over the script's #SBATCH --time
    assert job_time_limit(None, None) == TimeLimit(120, "SBATCH_TIMELIMIT in the environment; --time not given")
    with pytest.raises(ConfigError, match="SBATCH_TIMELIMIT=2:00:00 are both set"):
        job_time_limit("1:00:00", None)
    monkeypatch.delenv("SBATCH_TIMELIMIT")
    with pytest.raises(ConfigError, match="--partition debug and SBATCH_PARTITION=short are both set"):
        job_time_limit(None, "debug")

    stand_in(fake_bin, "sinfo", "echo 'sinfo: error: Unable to contact slurm controller' >&2; exit 1\n")
    with pytest.raises(ConfigError, match=r"failed \(1: sinfo: error: Unable to contact.*give --time"):
        job_time_limit(None, None)
    monkeypatch.setenv("PATH", str(fake_bin))
    (fake_bin / "sinfo").unlink()
    with pytest.raises(ConfigError, match="could not run .* give --time"):
        job_time_limit(None, None)


# ------------------------------------------------------------------------------------------ dry run
def test_dry_run_shows_the_partition_time_limit_and_cpus_for_srun(fake_bin, shard_set, tmp_path, capsys, monkeypatch):
    """Without --time the script asks for the partition's limit (submitit alone would write 5 minutes)."""
    from largemim.launch.submit import main

    stand_in(fake_bin, "srun", "exit 1\n")  # submitit only checks that srun is on PATH; nothing runs it
    stand_in(fake_bin, "sinfo", "echo 'debug* n/a infinite'; echo 'gpu 1-00:00:00 2-00:00:00'\n")
    run = tmp_path / "run"
    args = [
        "--config", str(REPO / "largemim/recipes/mae_tiny_cpu.yaml"), *TINY, f"data.shards={shard_set}",
        f"run.dir={run}", "--nodes", "2", "--cpus-per-task", "4", "--dry-run",
    ]  # fmt: skip

    assert main(args) == 2  # the default partition has no DefaultTime
    assert "partition 'debug' has no DefaultTime (MaxTime infinite)" in capsys.readouterr().err
    assert main([*args, "--time", "UNLIMITED"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --time=UNLIMITED" in out and "#SBATCH --time=5" not in out
    assert "# time limit: UNLIMITED (--time)" in out
    assert "then export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}; fi" in out
    assert out.index("SRUN_CPUS_PER_TASK") < out.index("srun --unbuffered")

    assert main([*args, "--partition", "gpu"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --time=1440" in out and "# time limit: 1440 min (partition gpu: DefaultTime 1-00:00:00" in out

    assert main([*args, "--time", "2:00:00"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --time=120" in out and "# time limit: 120 min (--time)" in out
    # tools/setup_env.sh exports DS_ACCELERATOR=cpu, and sbatch hands it on: a job that has GPUs drops it
    # (decided in the job, where Slurm says what it got: --gpus-per-node or a gres given through extras).
    line = next(ln for ln in out.splitlines() if "unset DS_ACCELERATOR" in ln)
    for env, kept in [({}, "cpu"), ({"SLURM_JOB_GPUS": "0,1"}, ""), ({"SLURM_GPUS_ON_NODE": "8"}, "")]:
        shell = subprocess.run(
            ["bash", "-c", line + '; echo "${DS_ACCELERATOR:-}"'], env={"PATH": os.environ["PATH"],
            "DS_ACCELERATOR": "cpu", **env}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert shell.stdout.strip() == kept, (env, shell.stdout)
    assert out.index("unset DS_ACCELERATOR") < out.index("srun --unbuffered")

    assert main([*args, "--time", "10", "--sbatch-extra", "time=10"]) == 2
    assert "use --time" in capsys.readouterr().err
    assert main([*args, "--time", "10", "--sbatch-extra", "partition=gpu"]) == 2
    assert "use --partition" in capsys.readouterr().err
    assert not run.exists()


# ------------------------------------------------------------------------------------------ requeue order
# scontrol stand-in: the job is RUNNING; `requeue` takes a second, then leaves a marker (or fails).
SCONTROL = """\
case "$1" in
show) echo "JobId=$4 JobState=RUNNING Restarts=0" ;;
requeue)
    sleep 1
    if [ -n "$FAIL_REQUEUE" ]; then echo "scontrol: error: Requested operation is presently disabled" >&2; exit 1; fi
    touch "$MARKER" ;;
esac
"""


def _rank_after_train(rank: int, port: int, run_dir: str, marker: str, results) -> None:
    """One rank of a 2-rank gloo group, from the point where ``train`` returned stopped early at step 7."""
    import torch.distributed as dist

    from largemim.launch.job import TrainJob, _ExitWithoutFinalizers
    from largemim.launch.slurm_env import SlurmTask

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = Config()
    cfg.run.dir = run_dir
    task = SlurmTask("123", 0, rank, rank, 2, 1, rank, ("n1", "n2"), "127.0.0.1", port)
    exit_status = _ExitWithoutFinalizers()
    summary = {"start_step": 0, "end_step": 7, "total_steps": 10, "stopped_early": True}
    try:
        TrainJob(cfg, "SIGUSR2", max_requeues=3)._end(task, rank, summary, exit_status)
        outcome = "returned"
    except SystemExit as e:
        outcome = f"SystemExit({e.code}), marker there: {os.path.exists(marker)}"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    results.put((rank, outcome, exit_status.code, dist.is_initialized()))


def _run_two_ranks(run_dir: Path, marker: Path) -> dict[int, tuple]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_after_train, args=(r, port, str(run_dir), str(marker), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = {r: tuple(rest) for r, *rest in (results.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(30)
    return out


@pytest.mark.parametrize("fail", [False, True])
def test_no_rank_leaves_before_rank_0_has_requeued(fail, fake_bin, tmp_path, monkeypatch):
    """Rank 1 leaves (SystemExit 3) only after `scontrol requeue` is done, and `requeued` is recorded only
    after it; a failed requeue ends every rank with that error instead of a hang or a silent exit 3."""
    stand_in(fake_bin, "scontrol", SCONTROL)
    marker = tmp_path / "requeue-done"
    monkeypatch.setenv("MARKER", str(marker))
    if fail:
        monkeypatch.setenv("FAIL_REQUEUE", "1")
    run = tmp_path / "run"

    out = _run_two_ranks(run, marker)

    events = [json.loads(ln) for ln in (run / "slurm/chain.jsonl").read_text().splitlines()]
    if not fail:
        for rank in (0, 1):
            assert out[rank] == ("SystemExit(3), marker there: True", 3, False), out
        assert [e["event"] for e in events] == ["requeued"] and events[0]["step"] == 7, events
        assert events[0]["time"] >= marker.stat().st_mtime - 0.01  # recorded after the requeue was done
    else:
        for rank in (0, 1):
            outcome, code, initialized = out[rank]
            assert outcome.startswith("JobStopped: stopped at step 7 of 10; requeueing failed: RuntimeError"), out
            assert "presently disabled" in outcome and code == 0 and not initialized
        assert [e["event"] for e in events] == ["failed"] and events[0]["step"] == 7, events
        assert not marker.exists()


def test_ds_accelerator_cpu_keeps_a_gpu_machine_on_the_cpu(monkeypatch):
    """The demo and the tests export DS_ACCELERATOR=cpu; on a machine with GPUs, DeepSpeed then builds a
    CPU engine, so the trainer must not put its ranks (and their batches) on CUDA devices."""
    import torch

    from largemim.distributed import cuda_wanted

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not cuda_wanted()
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert cuda_wanted()
    monkeypatch.delenv("DS_ACCELERATOR")
    assert cuda_wanted()


def test_a_gpu_job_whose_cuda_sees_no_gpu_is_an_error(monkeypatch):
    """Review finding: a Slurm job given GPUs whose CUDA cannot see them (driver, container) trained on the
    CPU with gloo without a word. DS_ACCELERATOR=cpu still asks for the CPU on purpose."""
    import torch

    from largemim.distributed import check_gpus_usable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "DS_ACCELERATOR"):
        monkeypatch.delenv(key, raising=False)
    check_gpus_usable()  # no GPUs asked for: the CPU it is
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    check_gpus_usable()
    monkeypatch.setenv("SLURM_JOB_GPUS", "4,5")
    with pytest.raises(RuntimeError, match=r"this Slurm job has GPUs \(4,5\) but .* set DS_ACCELERATOR=cpu"):
        check_gpus_usable()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    check_gpus_usable()


# ------------------------------------------------------------------------------------------ slurm/job_lib.sh
PREEMPTED = "2026-11-27T03:40:03"  # scontrol's PreemptTime while a preempted job is in its grace time


# scontrol stand-in for lm_finish and _decide: answers for job 5 (with a sibling array task's line first)
# and partition debug from $STATE, $RESTARTS, $PREEMPT, $MODE; logs each call.
SCONTROL_JOB = """\
echo "$*" >>"$CALLS"
case "$1 $2" in
"show job") echo "JobId=6 ArrayJobId=5 JobState=RUNNING Restarts=0 PreemptTime=None Partition=debug"
            echo "JobId=5 JobName=a JobState=$STATE Restarts=$RESTARTS PreemptTime=$PREEMPT Partition=debug" ;;
"show partition") echo "PartitionName=debug PreemptMode=$MODE GraceTime=60" ;;
esac
"""


@pytest.mark.parametrize(
    "signalled, terminated, status, ended, state, preempt, mode, restarts, code, requeued, said",
    [
        # the warning signal, the ranks saved: requeue
        ("1", "", 0, "stopped 37", "RUNNING", "None", "REQUEUE", 0, 0, True, "requeueing (requeue 1 of at most 3)"),
        # a preemption with a grace time: no signal here, the launcher exited 1 after SIGTERM: requeue
        ("", "", 1, "stopped 37", "RUNNING", PREEMPTED, "REQUEUE", 0, 0, True, "the ranks saved step 37 and stopped"),
        # ... also when the launcher killed the ranks before they saved, and also at the cap (as Slurm would)
        ("", "", 1, "", "RUNNING", PREEMPTED, "REQUEUE", 0, 0, True, "the ranks reported no save"),
        ("", "", 1, "stopped 37", "RUNNING", PREEMPTED, "REQUEUE", 3, 0, True, "whatever MAX_REQUEUES"),
        # a preemption that cancels the job: requeued like after a warning signal, within the cap only
        ("", "", 1, "stopped 37", "RUNNING", PREEMPTED, "CANCEL", 0, 0, True, "requeue 1 of at most 3"),
        ("", "", 1, "stopped 37", "RUNNING", PREEMPTED, "CANCEL", 3, 1, False, "MAX_REQUEUES=3"),
        ("", "", 1, "", "RUNNING", PREEMPTED, "CANCEL", 0, 1, False, ""),
        # the signal came during the final save: the run finished, nothing to requeue
        ("1", "", 0, "finished 40", "RUNNING", "None", "REQUEUE", 0, 0, False, "the run ended (step 40) before it"),
        # no word from the ranks (a TMPDIR private to the step): go by the signal and the clean exit
        ("1", "", 0, "", "RUNNING", "None", "REQUEUE", 0, 0, True, "no word from the ranks"),
        # a rank crashed after the signal, or without one: not requeued, srun's status
        ("1", "", 1, "", "RUNNING", "None", "REQUEUE", 0, 1, False, "without saving: not requeueing"),
        ("", "", 1, "", "RUNNING", "None", "REQUEUE", 0, 1, False, ""),
        # scancel or the time limit: this shell got SIGTERM too
        ("", "1", 0, "stopped 37", "RUNNING", "None", "REQUEUE", 0, 0, False, ""),
        ("1", "", 0, "stopped 37", "COMPLETING", "None", "REQUEUE", 0, 0, False, "the job is COMPLETING"),
        # over the cap
        ("1", "", 0, "stopped 37", "RUNNING", "None", "REQUEUE", 3, 1, False, "MAX_REQUEUES=3"),
    ],
)
def test_batch_script_requeue_decision(
    fake_bin, tmp_path, signalled, terminated, status, ended, state, preempt, mode, restarts, code, requeued, said
):
    """lm_finish of the sbatch templates, with scontrol a stand-in (the templates themselves are preempted
    on the local cluster in test_slurm.py)."""
    calls = tmp_path / "calls"
    stand_in(fake_bin, "scontrol", SCONTROL_JOB)
    end_file = tmp_path / "ended"
    if ended:
        end_file.write_text(ended + "\n")
    script = (
        f"source {REPO / 'slurm/job_lib.sh'}; STOP_SIGNAL=USR1; MAX_REQUEUES=3; LARGEMIM_END_FILE={end_file}; "
        f"LM_SIGNALLED={signalled}; LM_TERMINATED={terminated}; LM_STATUS={status}; lm_finish"
    )
    env = dict(
        os.environ, SLURM_JOB_ID="5", SLURM_RESTART_COUNT=str(restarts), SLURM_JOB_PARTITION="debug",
        CALLS=str(calls), STATE=state, RESTARTS=str(restarts), PREEMPT=preempt, MODE=mode,
    )  # fmt: skip
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    requeues = [c for c in (calls.read_text().splitlines() if calls.exists() else []) if c.startswith("requeue")]
    assert requeues == (["requeue 5"] if requeued else []), proc.stdout
    assert said in proc.stdout
    assert not end_file.exists()  # read once: a later run of the same job starts without it
    assert proc.returncode == code, proc.stdout


def test_an_array_task_signals_and_requeues_itself_only(fake_bin, tmp_path):
    """Review finding: for the array task whose SLURM_JOB_ID is the array's id, `scancel --signal` and
    `scontrol requeue` of that id reached every task of the array. ARRAYID_TASKID names the task alone."""
    calls = tmp_path / "calls"
    stand_in(fake_bin, "scontrol", SCONTROL_JOB)
    stand_in(fake_bin, "scancel", 'echo "scancel $*" >>"$CALLS"\n')
    end_file = tmp_path / "ended"
    end_file.write_text("stopped 37\n")
    script = (
        f"source {REPO / 'slurm/job_lib.sh'}; STOP_SIGNAL=USR1; MAX_REQUEUES=3; LARGEMIM_END_FILE={end_file}; "
        "_lm_forward; kill $LM_RESENDER; LM_TERMINATED=; LM_STATUS=0; lm_finish"
    )
    env = dict(
        os.environ, SLURM_JOB_ID="5", SLURM_ARRAY_JOB_ID="5", SLURM_ARRAY_TASK_ID="3", SLURM_RESTART_COUNT="0",
        SLURM_JOB_PARTITION="debug", CALLS=str(calls), STATE="RUNNING", RESTARTS="0", PREEMPT="None", MODE="REQUEUE",
    )  # fmt: skip
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    made = [c for c in calls.read_text().splitlines() if c.startswith(("scancel", "requeue"))]
    assert made == ["scancel --signal=USR1 5_3", "requeue 5_3"], (made, proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    "state, preempt, mode, restarts, decision",
    [
        ("RUNNING", "None", "REQUEUE", 0, (True, "requeue 1 of at most 3")),
        ("RUNNING", "None", "REQUEUE", 3, (False, "it has been requeued 3 times (--max-requeues 3)")),
        ("RUNNING", PREEMPTED, "REQUEUE", 3, (True, f"preempted at {PREEMPTED}: requeue 4, not capped")),
        ("RUNNING", PREEMPTED, "CANCEL", 3, (False, "it has been requeued 3 times (--max-requeues 3)")),
        ("COMPLETING", PREEMPTED, "REQUEUE", 0, (False, "the job is COMPLETING (cancelled, or ended by Slurm)")),
        ("COMPLETING", "None", "REQUEUE", 1, (None, "Slurm requeued the job (JobState COMPLETING, restart 1)")),
    ],
)
def test_largemim_submit_requeue_decision(fake_bin, tmp_path, monkeypatch, state, preempt, mode, restarts, decision):
    """Rank 0's decision after a stop under largemim-submit, from scontrol's answers (a stand-in that also
    lists a sibling array task first, whose fields must not be taken)."""
    from largemim.launch.job import TrainJob
    from largemim.launch.slurm_env import SlurmTask

    stand_in(fake_bin, "scontrol", SCONTROL_JOB)
    answers = dict(CALLS=tmp_path / "calls", STATE=state, RESTARTS=restarts, PREEMPT=preempt, MODE=mode)
    for key, value in answers.items():
        monkeypatch.setenv(key, str(value))
    task = SlurmTask("5", 0 if restarts == 1 and state == "COMPLETING" else restarts, 0, 0, 1, 1, 0, ("n1",), "n1", 1)
    requeue, reason = TrainJob(Config(), "SIGUSR2", max_requeues=3)._decide(task, 0)
    assert requeue is decision[0] and reason.startswith(decision[1]), (requeue, reason)


def test_status_shows_progress_and_the_last_representation_check(tmp_path):
    """largemim-submit --status without Slurm: the job chain, the logged progress, the newest complete
    checkpoint and the last representation check (a torn last line of either file is passed over)."""
    from largemim.launch import chain

    run = tmp_path / "run"
    chain.record(run / "slurm", "submitted", job_id="7", max_requeues=20, nodes=2, tasks_per_node=1)
    chain.record(run / "slurm", "started", job_id="7", restart=0, nodes=["n1", "n2"], step=0)
    logged = "".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (1, 2, 3))
    (run / "metrics.jsonl").write_text(logged + '{"st')
    (run / "eval.jsonl").write_text(json.dumps({"step": 2, "eval": "repr", "knn": 0.61234, "linear": 0.7}) + "\n\0\0")
    (run / "checkpoints/step_00000002").mkdir(parents=True)
    (run / "checkpoints/step_00000002/COMPLETE").write_text("{}")
    (run / "checkpoints/step_00000003").mkdir()  # being written: no marker
    lines = chain.format_status(run, query_slurm=False).splitlines()
    assert lines[1].startswith("job 7: (not known to Slurm any more), 0 requeue(s) (cap 20), 2 node(s) x 1 task(s)")
    assert lines[-2] == "progress: step 3, last loss 0.3333; newest complete checkpoint: step 2"
    assert lines[-1] == "representation check: step 2, kNN 0.612, linear 0.700"


# ------------------------------------------------------------------- agreeing on the step to stop at
def _rank_polls(rank: int, port: int, signal_before: int, results) -> None:
    """One of 2 gloo ranks calling ``poll`` after each of 6 steps; rank 1 gets SIGUSR2 before call
    ``signal_before`` (0: never); then one blocking ``agreed``."""
    import signal

    import torch
    import torch.distributed as dist

    from largemim.signals import StopOnSignal

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stopper = StopOnSignal(["SIGUSR2"], torch.device("cpu"))
    polls = []
    for call in range(1, 7):
        if rank == 1 and call == signal_before:
            os.kill(os.getpid(), signal.SIGUSR2)
        polls.append(stopper.poll())
    final = stopper.agreed()
    stopper.restore()
    dist.destroy_process_group()
    results.put((rank, polls, final))


@pytest.mark.parametrize(
    "signal_before, first_true",
    [(1, 1), (2, 3), (3, 4), (6, None)],  # start-up: at once; later: one call after the signal's step
)
def test_ranks_agree_on_a_stop_one_step_after_the_signal(signal_before, first_true):
    """poll reads the previous call's all-reduce, so the host never waits for the device's step: both
    ranks see True from the same call, one after the step in which rank 1 was signalled (the first call
    blocks, so a signal during start-up stops after step 1); agreed() settles what poll left in flight."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_polls, args=(r, port, signal_before, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = {r: (polls, final) for r, polls, final in (results.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(30)
    assert out[0] == out[1], out
    polls, final = out[0]
    expected_first = polls.index(True) + 1 if True in polls else None
    assert expected_first == first_true, polls
    assert final is True  # every case signalled by the last call
