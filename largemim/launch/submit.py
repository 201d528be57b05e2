"""``largemim-submit``: run ``largemim.train``'s config on a Slurm cluster through submitit.

    largemim-submit --config RECIPE [key=value ...] --nodes 4 --gpus-per-node 8 --time 1440 --partition P
    largemim-submit --config RECIPE [key=value ...] ... --dry-run   # print the sbatch script and config
    largemim-submit --status RUN_DIR                                # the job chain, step, last loss
    largemim-submit --cancel RUN_DIR                                # scancel the run's live job(s)

One job runs ``nodes x tasks_per_node`` tasks, one rank each, training in-process. The config is
resolved and checked here, on the login node, before anything is queued. submitit's files (the pickled
call, one log per task) go to ``RUN_DIR/slurm/``, with ``chain.jsonl``, the run's record of its jobs.
Without ``--time`` the job gets its partition's DefaultTime, read with ``sinfo`` (a partition without one
needs ``--time``; largemim/launch/time_limit.py): submitit would otherwise ask for 5 minutes.

Time limits and preemption: Slurm sends ``--signal`` (default USR2) ``--signal-delay-s`` seconds before
the time limit (or when an admin or a preemption script sends it). Every rank stops after the same
step, saves it, and rank 0 requeues the job (same id) unless it has been requeued ``--max-requeues``
times; the requeued job resumes from that step. See largemim/launch/job.py for why the save is not done
inside submitit's signal handler, and slurm/README.md for the whole story.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from largemim.config import Config, ConfigError, load_config, make_plan, to_yaml
from largemim.launch import chain
from largemim.launch.time_limit import SUBMITIT_UNLIMITED_MIN, TimeLimit, job_time_limit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="largemim-submit",
        description="Submit a largemim run to Slurm (submitit); requeues itself on time limits and preemption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--config", help="YAML recipe, as for largemim-train")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, as for largemim-train: run.dir=... optim.lr=...")
    what = ap.add_argument_group("instead of submitting")
    what.add_argument("--dry-run", action="store_true", help="print the sbatch script and config; submit nothing")
    what.add_argument("--status", metavar="RUN_DIR", help="show RUN_DIR's job chain: ids, states, requeues, step, loss")
    what.add_argument("--cancel", metavar="RUN_DIR", help="scancel RUN_DIR's queued or running job(s)")
    res = ap.add_argument_group("resources (sbatch options)")
    res.add_argument("--nodes", type=int, default=1)
    res.add_argument("--gpus-per-node", type=int, default=0)
    res.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: GPUs per node, or 1)")
    res.add_argument("--cpus-per-task", type=int, default=None)
    res.add_argument("--mem", default=None, help="memory per node, sbatch syntax: 64G, 500000M, 0 (= all)")
    res.add_argument("--partition", default=None)
    res.add_argument("--account", default=None)
    res.add_argument("--qos", default=None)
    res.add_argument("--constraint", default=None)
    res.add_argument(
        "--time", default=None,
        help="time limit: minutes, or Slurm's D-HH:MM:SS (and its other forms), or UNLIMITED (default: the "
        "partition's DefaultTime, read with sinfo; required where the partition has none)",
    )  # fmt: skip
    res.add_argument("--exclusive", action="store_true")
    res.add_argument("--job-name", default=None, help="default: largemim-<name of run.dir>")
    res.add_argument(
        "--sbatch-extra", action="append", default=[], metavar="KEY[=VALUE]",
        help="any other sbatch option, e.g. --sbatch-extra mail-type=END --sbatch-extra gpu-bind=none (repeat)",
    )  # fmt: skip
    req = ap.add_argument_group("requeue")
    req.add_argument("--max-requeues", type=int, default=20, help="requeues allowed (time limits and preemptions)")
    req.add_argument("--signal", default="USR2", help="signal meaning 'save and requeue' (USR1 can be eaten by NCCL)")
    req.add_argument(
        "--signal-delay-s", type=int, default=120,
        help="send --signal this long before the time limit: must cover one step plus one save",
    )  # fmt: skip
    ap.add_argument("--wait", action="store_true", help="after submitting, wait until the job chain ends")
    ap.add_argument(
        "--force", action="store_true", help="submit even though a job for the same run.dir is queued or running"
    )
    args = ap.parse_intermixed_args(argv)
    modes = [bool(args.status), bool(args.cancel), bool(args.config)]
    if sum(modes) != 1:
        ap.error("give --config (to submit or --dry-run), or --status RUN_DIR, or --cancel RUN_DIR")
    return args


def signal_name(name: str) -> str:
    """``usr2`` / ``SIGUSR2`` / ``12`` -> ``USR2`` (sbatch's and submitit's spelling)."""
    import signal as _signal

    raw = name.strip().upper()
    try:
        sig = _signal.Signals(int(raw)) if raw.isdigit() else _signal.Signals["SIG" + raw.removeprefix("SIG")]
    except (KeyError, ValueError):
        raise ConfigError(f"--signal {name!r} is not a signal name (e.g. USR2, USR1, TERM)") from None
    if sig in (_signal.SIGKILL, _signal.SIGSTOP):
        raise ConfigError(f"--signal {name!r} cannot be caught; use USR2")
    return sig.name[3:]


@dataclass
class Prepared:
    cfg: Config
    run_dir: Path
    world_size: int
    tasks_per_node: int
    signal: str  # short name: USR2
    params: dict  # submitit SlurmExecutor parameters
    plan_line: str
    time: TimeLimit


def prepare(args: argparse.Namespace) -> Prepared:
    """Resolve and check the config for this job's world size; build the sbatch parameters."""
    sig = signal_name(args.signal)
    if args.nodes < 1 or (args.tasks_per_node is not None and args.tasks_per_node < 1):
        raise ConfigError(f"--nodes ({args.nodes}) and --tasks-per-node ({args.tasks_per_node}) must be >= 1")
    if args.max_requeues < 0 or args.signal_delay_s < 0:
        raise ConfigError("--max-requeues and --signal-delay-s must be >= 0")
    tasks = args.tasks_per_node or (args.gpus_per_node if args.gpus_per_node > 0 else 1)
    if args.gpus_per_node and tasks != args.gpus_per_node:
        print(
            f"largemim-submit: note: {tasks} task(s) per node for {args.gpus_per_node} GPU(s) per node; "
            "usually there is one task (rank) per GPU",
            file=sys.stderr,
        )
    world = args.nodes * tasks

    first = load_config(args.config, args.overrides)
    # Paths the job reads are made absolute (the job also runs in this folder: --chdir), and the requeue
    # signal joins the signals the training loop stops on.
    pinned = [f"run.dir={Path(first.run.dir).resolve()}"]
    if Path(first.ds_config).is_file():
        pinned.append(f"ds_config={Path(first.ds_config).resolve()}")
    stops = list(first.checkpoint.stop_signals)
    if f"SIG{sig}" not in {("" if s.upper().startswith("SIG") else "SIG") + s.upper() for s in stops}:
        stops.append(f"SIG{sig}")
    pinned.append(f"checkpoint.stop_signals=[{','.join(stops)}]")
    cfg = load_config(args.config, [*args.overrides, *pinned])

    from largemim.data.sources import count_samples, expand_shards
    from largemim.engine import load_ds_json

    load_ds_json(cfg.ds_config)
    try:
        num_samples = cfg.data.num_samples or count_samples(expand_shards(cfg.data.shards))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.shards: {e}") from None
    plan = make_plan(cfg, world, num_samples)
    plan_line = (
        f"world size {world} ({args.nodes} node(s) x {tasks} task(s)): {plan.total_steps} steps of global batch "
        f"{plan.global_batch} (micro-batch {cfg.train.micro_batch} x grad-accum {plan.grad_accum}), lr {plan.lr:.3e}"
    )

    run_dir = Path(cfg.run.dir)
    setup = [f"export SUBMITIT_PREEMPT_SIGNAL={sig}  # submitit's handler, until the trainer's takes over"]
    root = Path(__file__).resolve().parents[2]
    if "site-packages" not in root.parts and "dist-packages" not in root.parts:  # a source checkout
        setup.append(f"export PYTHONPATH={shlex.quote(str(root))}${{PYTHONPATH:+:$PYTHONPATH}}")
    if args.cpus_per_task:
        setup.append(f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{args.cpus_per_task}}}")
    # sbatch hands the submitting shell's environment on: tools/setup_env.sh's DS_ACCELERATOR=cpu would
    # keep a job with GPUs (--gpus-per-node, or --sbatch-extra gres=gpu:N) on the CPU.
    setup.append(
        'if [ "${DS_ACCELERATOR:-}" = cpu ] && [ -n "${SLURM_JOB_GPUS:-}${SLURM_GPUS_ON_NODE:-}'
        '${SLURM_GPUS_PER_NODE:-}" ]; then unset DS_ACCELERATOR; fi'
    )
    # Slurm 22.05-23.02: srun no longer takes --cpus-per-task from the job (restored in 23.11), so each
    # task would get 1 CPU under task/affinity or task/cgroup binding; SRUN_CPUS_PER_TASK hands it on.
    setup.append(
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then '
        "export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}; fi"
    )

    # Always a value: submitit writes --time=5 when given none.
    limit = job_time_limit(args.time, args.partition)
    extra: dict = {"signal": f"{sig}@{args.signal_delay_s}", "requeue": True, "chdir": os.getcwd()}
    if limit.minutes is None:
        extra["time"] = limit.sbatch  # the #SBATCH line; submitit's own `time` must stay a number (below)
    if args.mem is not None:
        extra["mem"] = args.mem
    for item in args.sbatch_extra:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"--sbatch-extra {item!r}: expected KEY=VALUE or KEY (e.g. mail-type=END)")
        if key in ("time", "t"):
            raise ConfigError(f"--sbatch-extra {item!r}: use --time (minutes, D-HH:MM:SS or UNLIMITED)")
        if key in ("partition", "p"):
            raise ConfigError(f"--sbatch-extra {item!r}: use --partition (the time limit is looked up for it)")
        extra[key.replace("_", "-")] = value if eq else True
    params: dict = {
        "job_name": args.job_name or f"largemim-{run_dir.name}",
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "signal_delay_s": args.signal_delay_s,
        "setup": setup,
        "additional_parameters": extra,
    }
    optional = {
        "cpus_per_task": args.cpus_per_task, "gpus_per_node": args.gpus_per_node or None, "partition": args.partition,
        "account": args.account, "qos": args.qos, "constraint": args.constraint,
        "time": SUBMITIT_UNLIMITED_MIN if limit.minutes is None else limit.minutes,
        "exclusive": True if args.exclusive else None,
    }  # fmt: skip
    params.update({k: v for k, v in optional.items() if v is not None})
    return Prepared(cfg, run_dir, world, tasks, sig, params, plan_line, limit)


def make_executor(prep: Prepared, max_requeues: int):
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=prep.run_dir / "slurm", max_num_timeout=max_requeues)
    except RuntimeError as e:
        raise ConfigError(f"{e} (Slurm's commands, srun and sbatch, must be on PATH)") from None
    executor.update_parameters(**prep.params)
    return executor


def sbatch_script(executor) -> str:
    """The script submitit would hand to sbatch. submitit has no public dry run: this is its own renderer."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def submit(argv: list[str] | None = None):
    """Submit and return the submitit job (``job.results()`` waits for every task's result)."""
    from largemim.launch.job import TrainJob

    args = parse_args(argv)
    prep = prepare(args)
    # COMPLETING too: a cancelled job's ranks are still saving then
    live = live_jobs(prep.run_dir, LIVE_STATES | {"COMPLETING", "STAGE_OUT"})
    if live and not args.force:
        listed = ", ".join(f"{j} ({state})" for j, state in live.items())
        raise ConfigError(
            f"{prep.run_dir} already has a live job: {listed}. Two jobs would write the same checkpoints and "
            f"logs; wait for it (it resumes by itself), cancel it (largemim-submit --cancel {prep.run_dir}), or "
            "pass --force if Slurm's state is stale"
        )
    executor = make_executor(prep, args.max_requeues)
    job = executor.submit(TrainJob(prep.cfg, f"SIG{prep.signal}", args.max_requeues))
    chain.record(
        prep.run_dir / "slurm", "submitted", job_id=str(job.job_id), nodes=args.nodes,
        tasks_per_node=prep.tasks_per_node, signal=prep.signal, signal_delay_s=args.signal_delay_s,
        max_requeues=args.max_requeues, argv=list(argv if argv is not None else sys.argv[1:]),
    )  # fmt: skip
    return job, prep


LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED", "RESIZING"}


def live_jobs(run_dir: Path, states_wanted: set[str] = LIVE_STATES) -> dict[str, str]:
    """{job id: state} of the jobs submitted for ``run_dir`` that Slurm still queues or runs."""
    events = chain.read(Path(run_dir) / "slurm")
    ids = list(dict.fromkeys(str(e["job_id"]) for e in events if e.get("event") == "submitted"))
    states = chain.slurm_states(ids) if ids else {}
    return {j: states[j]["State"] for j in ids if states.get(j, {}).get("State") in states_wanted}


def cancel(run_dir: Path) -> int:
    live = list(live_jobs(run_dir))
    if not live:
        print(f"{run_dir}: no queued or running job")
        return 0
    # Plain scancel: SIGTERM, which the trainer treats as "save this step and stop" (checkpoint.stop_signals);
    # the job is COMPLETING by then, so it is not requeued.
    proc = subprocess.run(["scancel", *live], capture_output=True, text=True)
    print(f"{run_dir}: cancelled job(s) {' '.join(live)}" if proc.returncode == 0 else proc.stderr.strip())
    return proc.returncode


def job_error_line(error: Exception) -> str:
    """The line that names the error in submitit's FailedJobError (its message wraps the job's traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    trace = lines[: lines.index("----------------------", 2)] if lines.count("----------------------") >= 2 else lines
    named = [ln for ln in trace if ln and not ln.startswith(("File ", "^", "~", "-"))]
    return named[-1] if named else str(error).strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.status:
        print(chain.format_status(Path(args.status)))
        return 0
    if args.cancel:
        return cancel(Path(args.cancel))
    try:
        if args.dry_run:
            prep = prepare(args)
            executor = make_executor(prep, args.max_requeues)
            print(f"# sbatch script (--dry-run: not submitted; job folder {prep.run_dir / 'slurm'})")
            print(sbatch_script(executor))
            print(f"# resolved config (the job writes it to {prep.run_dir / 'config.yaml'})")
            print(to_yaml(prep.cfg))
            print(f"# plan: {prep.plan_line}")
            print(f"# time limit: {prep.time.describe()}")
            return 0
        job, prep = submit(argv)
    except ConfigError as e:
        print(f"largemim-submit: error: {e}", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id}: {prep.plan_line}")
    print(f"  time:   {prep.time.describe()}")
    print(f"  logs:   {prep.run_dir / 'slurm'}/{job.job_id}_<task>_log.out|err")
    print(f"  status: largemim-submit --status {prep.run_dir}")
    if not args.wait:
        return 0
    try:
        job.results()
        code = 0
    except Exception as e:  # the job's own error (JobStopped, a crash) or submitit's UncompletedJobError
        print(f"largemim-submit: the job did not finish: {job_error_line(e)}", file=sys.stderr)
        code = 1
    print(chain.format_status(prep.run_dir))
    return code


if __name__ == "__main__":
    sys.exit(main())
