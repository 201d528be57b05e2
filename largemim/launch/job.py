"""What runs in every Slurm task of a ``largemim-submit`` job: train in-process; requeue on the signal.

Why the trainer, not submitit, handles the requeue signal. submitit calls ``checkpoint()`` from inside
its signal handler, that is, at whatever bytecode the main thread happens to be running: in the middle of
a forward pass or of an all-reduce. A save there would be a collective started on one rank at a random
point; it cannot be made safe. So:

1. First thing in the task, the requeue signal and ``checkpoint.stop_signals`` get a handler that only
   records them (``largemim.signals.catch_early``), replacing submitit's; the training loop's own
   handler (``StopOnSignal``) then takes over and adopts anything recorded during start-up.
2. The loop finishes the step it is in; the ranks agree (an all-reduce after every step) to stop at the
   same step; they save that step (the ``COMPLETE`` marker is written after every rank's shards) and
   ``train`` returns with ``stopped_early``.
3. Rank 0 decides, and tells the others: if the job is still RUNNING and has been requeued fewer than
   ``max_requeues`` times, it runs ``scontrol requeue`` (the same job id goes back to the queue and starts
   again from the run folder, which resumes from the saved step). If the job is not RUNNING (``scancel``
   sends SIGTERM while the job is already COMPLETING) or the cap is reached, the job ends with an error
   that says so. A requeued task leaves with ``SystemExit`` so submitit writes no result for it; a job
   that ends for good leaves a result (or an error) for ``job.results()``.
4. No rank leaves before the requeue is done: the others wait for rank 0's word on it (a broadcast),
   then all leave the process group together. A rank that exited early (status 3) would, under srun's
   ``--kill-on-bad-exit`` (or ``KillOnBadExit=1``), get rank 0 killed before it requeued, and the chain
   would stop. If ``scontrol requeue`` fails, every rank ends with an error that says so.

``checkpoint()`` is still defined: submitit's handler is in place for the second or two between the task
starting and step 1, and calls it if the signal comes then. Nothing has trained yet, so it resubmits the
same call unchanged.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from submitit.helpers import DelayedSubmission

from largemim.config import Config
from largemim.launch import chain

log = logging.getLogger("largemim")

EXIT_REQUEUED = 3  # a task's exit status after it requeued its job (submitit's own handler uses 255)


class JobStopped(RuntimeError):
    """The run stopped before its end and was not requeued; its folder holds a checkpoint of that step."""


@dataclass
class TrainJob:
    """The submitit callable: one per run. Pickled once at submission; a requeued job runs it again."""

    cfg: Config  # resolved at submission; ``checkpoint.stop_signals`` already includes ``signal``
    signal: str  # e.g. "SIGUSR2": the signal that means "save and requeue"
    max_requeues: int

    def __call__(self) -> dict:
        from largemim import signals

        signals.catch_early(list(self.cfg.checkpoint.stop_signals))  # before anything slow
        exit_status = _ExitWithoutFinalizers()
        from largemim.launch.slurm_env import export_torch_env

        task = export_torch_env()
        if task.world_size > 1:
            exit_status.install()
        slurm_dir = Path(self.cfg.run.dir) / "slurm"
        try:
            from largemim.distributed import init_distributed
            from largemim.run_log import setup_console

            env = init_distributed()
            setup_console(env.rank)
            if env.rank == 0:
                log.info(
                    "job %s (restart %d): rank 0 of %d on %s, master %s:%d", task.job_id, task.restarts,
                    task.world_size, ",".join(task.nodes), task.master_addr, task.master_port,
                )  # fmt: skip
                chain.record(
                    slurm_dir, "started", job_id=task.job_id, restart=task.restarts, nodes=list(task.nodes),
                    step=_newest_complete_step(Path(self.cfg.run.dir)),
                )  # fmt: skip
            from largemim.trainer import train

            summary = train(self.cfg, env)
        except BaseException as e:
            if task.rank == 0:
                chain.record(slurm_dir, "failed", job_id=task.job_id, error=f"{type(e).__name__}: {e}"[:500])
            raise
        return self._end(task, env.rank, summary, exit_status)

    def _end(self, task, rank: int, summary: dict, exit_status: _ExitWithoutFinalizers) -> dict:
        """After ``train``: return the summary (finished), requeue and leave, or raise JobStopped."""
        slurm_dir = Path(self.cfg.run.dir) / "slurm"
        step = summary["end_step"]
        if not summary.get("stopped_early"):
            if rank == 0:
                chain.record(slurm_dir, "finished", job_id=task.job_id, step=step, total_steps=summary["total_steps"])
            _leave_process_group()
            return summary

        requeue, reason = self._decide(task, rank)
        if requeue is None:  # already requeued by Slurm: leave without a result, as after our own requeue
            if rank == 0:
                chain.record(
                    slurm_dir, "requeued", job_id=task.job_id, step=step, total_steps=summary["total_steps"],
                    reason=reason,
                )  # fmt: skip
                log.warning("saved step %d; %s", step, reason)
            _leave_process_group()
            exit_status.code = EXIT_REQUEUED
            sys.exit(EXIT_REQUEUED)
        if requeue:
            error = self._requeue(task, rank, step, summary["total_steps"], reason)
            _leave_process_group()  # only once the requeue is done: see 4. above
            if error is None:
                exit_status.code = EXIT_REQUEUED
                sys.exit(EXIT_REQUEUED)  # SystemExit: submitit writes no result, the requeued job will
            raise JobStopped(
                f"stopped at step {step} of {summary['total_steps']}; requeueing failed: {error}. "
                f"{self.cfg.run.dir} has a checkpoint of step {step}; submit the same command to continue."
            )
        _leave_process_group()
        message = (
            f"stopped at step {step} of {summary['total_steps']} and not requeued: {reason}. "
            f"{self.cfg.run.dir} has a checkpoint of step {step}; submit the same command to continue."
        )
        if rank == 0:
            chain.record(
                slurm_dir, "stopped", job_id=task.job_id, step=step, total_steps=summary["total_steps"], reason=reason
            )
        raise JobStopped(message)

    def _decide(self, task, rank: int) -> tuple[bool | None, str]:
        """Rank 0 decides whether to requeue; every rank gets the same answer. ``None``: Slurm has
        requeued the job itself (preemption in REQUEUE mode, a node failure, an admin's ``scontrol
        requeue``): its restart count is already past this run's, and its state is no longer RUNNING."""
        from largemim.distributed import broadcast_from_rank0
        from largemim.launch.slurm_env import job_fields, preempted_for_requeue

        decision: list = [None]
        if rank == 0:
            fields = job_fields(task.job_id)
            state = fields.get("JobState", "UNKNOWN")
            restarts = int(fields["Restarts"]) if fields.get("Restarts", "").isdigit() else task.restarts
            if state != "RUNNING" and restarts > task.restarts:
                decision[0] = (None, f"Slurm requeued the job (JobState {state}, restart {restarts})")
            elif state != "RUNNING":
                decision[0] = (False, f"the job is {state} (cancelled, or ended by Slurm), so it is not requeued")
            elif preempted_for_requeue(fields):
                # preempted with a grace time: Slurm would requeue the job itself when the grace time ends,
                # whatever --max-requeues, but not once it has ended (as it would have, stopped at the cap)
                decision[0] = (True, f"preempted at {fields['PreemptTime']}: requeue {task.restarts + 1}, not capped")
            elif task.restarts >= self.max_requeues:
                cap = f"--max-requeues {self.max_requeues}"
                decision[0] = (False, f"it has been requeued {task.restarts} times ({cap})")
            else:
                decision[0] = (True, f"requeue {task.restarts + 1} of at most {self.max_requeues}")
        broadcast_from_rank0(decision)
        return decision[0]

    def _requeue(self, task, rank: int, step: int, total_steps: int, reason: str) -> str | None:
        """Rank 0 runs ``scontrol requeue``; every rank returns None once it is done, or its error.

        The broadcast is also what holds the other ranks back until the requeue is done. ``requeued`` is
        recorded only once it is done; a failed requeue is recorded as ``failed`` (with the saved step).
        """
        from largemim.distributed import broadcast_from_rank0
        from largemim.launch.slurm_env import requeue as scontrol_requeue

        slurm_dir = Path(self.cfg.run.dir) / "slurm"
        error: list = [None]
        if rank == 0:
            log.warning("saved step %d; requeueing job %s (%s)", step, task.job_id, reason)
            try:
                scontrol_requeue(task.job_id)  # Slurm now ends this job (SIGTERM, then SIGKILL after KillWait)
            except Exception as e:
                error[0] = f"{type(e).__name__}: {e}"[:500]
                chain.record(slurm_dir, "failed", job_id=task.job_id, step=step, error=error[0])
            else:
                chain.record(
                    slurm_dir, "requeued", job_id=task.job_id, step=step, total_steps=total_steps, reason=reason
                )
        broadcast_from_rank0(error)
        return error[0]

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Only reached if the signal comes before ``__call__`` replaced submitit's handler (see above)."""
        return DelayedSubmission(self, *args, **kwargs)


def _newest_complete_step(run_dir: Path) -> int:
    from largemim.checkpoint import complete_checkpoints

    found = complete_checkpoints(run_dir / "checkpoints")
    return found[-1][0] if found else 0


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _ExitWithoutFinalizers:
    """End a multi-rank task with ``os._exit`` once submitit has written its result.

    About 1-2 % of multi-rank gloo processes abort in destructors at interpreter exit, after all work is
    done ("terminate called without an active exception"); Slurm would then record a finished job as
    FAILED. ``largemim.distributed.teardown`` avoids it with ``os._exit``; here the task must first return
    to submitit (which writes the result file), so the same exit runs from ``atexit``, with the status the
    interpreter would have used: 0, 1 after an uncaught exception, or what the requeue path set.
    """

    def __init__(self) -> None:
        self.code = 0

    def install(self) -> None:
        previous = sys.excepthook

        def hook(*exc_info):
            self.code = 1
            previous(*exc_info)

        sys.excepthook = hook
        atexit.register(self._exit)

    def _exit(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.code)
