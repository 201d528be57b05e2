"""A Slurm task's view of its job: the process-group variables (from SLURM's) and the job's state.

Every rank is one Slurm task (``srun`` starts ``nodes x tasks_per_node`` of them). The variables that
``largemim.distributed.init_distributed`` reads are derived from SLURM's, as submitit's
``TorchDistributedEnvironment`` does: RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE =
SLURM_NTASKS, MASTER_ADDR = the first host of SLURM_JOB_NODELIST, MASTER_PORT derived from the job id (so
a requeued job, which keeps its id, uses the same port).

GPUs: a task keeps the CUDA_VISIBLE_DEVICES Slurm gives it. With ``--gpus-per-node`` every task of a node
sees all of the node's GPUs and LOCAL_RANK picks one (``torch.cuda.set_device(LOCAL_RANK)`` in
``init_distributed``, and DeepSpeed does the same). A site that binds one GPU per task (``--gpu-bind``,
``--gpus-per-task``) is caught here, before the process group, with a message that says what to change.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class SlurmTask:
    job_id: str
    restarts: int  # how many times Slurm has requeued this job (SLURM_RESTART_COUNT; 0 on the first run)
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    nodes: tuple[str, ...]
    master_addr: str
    master_port: int


def export_torch_env() -> SlurmTask:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for this task."""
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    # overwrite=True: the submitting shell's variables travel with sbatch's --export=ALL; a launcher's
    # RANK from there would be wrong here. A MASTER_PORT set there is kept (submitit reads it).
    tde = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    job = JobEnvironment()
    os.environ["NODE_RANK"] = str(job.node)
    task = SlurmTask(
        job_id=os.environ["SLURM_JOB_ID"],
        restarts=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        rank=tde.rank,
        local_rank=tde.local_rank,
        world_size=tde.world_size,
        local_world_size=tde.local_world_size,
        node_rank=job.node,
        nodes=tuple(job.hostnames),
        master_addr=tde.master_addr,
        master_port=tde.master_port,
    )
    check_gpu_binding(task)
    return task


def check_gpu_binding(task: SlurmTask) -> None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() in ("", "NoDevFiles"):
        return  # no GPUs in this job (or the CPU build): nothing to bind
    n = len([d for d in visible.split(",") if d.strip()])
    if n < task.local_world_size:
        raise RuntimeError(
            f"task {task.rank} sees {n} GPU(s) (CUDA_VISIBLE_DEVICES={visible}) but its node runs "
            f"{task.local_world_size} tasks; every task of a node must see all of the node's GPUs (LOCAL_RANK picks "
            "one). Request GPUs with --gpus-per-node and no --gpu-bind/--gpus-per-task, or pass "
            "--sbatch-extra gpu-bind=none"
        )


def _show(kind: str, name: str) -> dict[str, str]:
    """``scontrol show KIND NAME -o``'s KEY=VALUE fields for exactly NAME; {} if it cannot tell. Only its
    own line (an array job's id can list its tasks too), and the first of a repeated key."""
    try:
        out = subprocess.run(["scontrol", "show", kind, "-o", name], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    head = {"job": "JobId", "partition": "PartitionName"}[kind] + f"={name} "
    line = next((ln for ln in out.splitlines() if (ln + " ").startswith(head)), "")
    fields: dict[str, str] = {}
    for word in line.split():
        if "=" in word:
            key, value = word.split("=", 1)
            fields.setdefault(key, value)
    return fields


def job_fields(job_id: str, tries: int = 3) -> dict[str, str]:
    """``scontrol show job``'s KEY=VALUE fields (JobState, Restarts, PreemptTime, ...); {} if it cannot
    tell after ``tries`` (5 s apart: a busy slurmctld times out now and then)."""
    for attempt in range(tries):
        fields = _show("job", job_id)
        if fields or attempt == tries - 1:
            return fields
        time.sleep(5)
    return {}


def preempted_for_requeue(fields: dict[str, str]) -> bool:
    """The job (``job_fields``) is RUNNING in a grace time before a preemption that requeues it: Slurm
    will requeue it when the grace time ends, but not if it has ended by then. Not under PreemptMode
    CANCEL (the job is to end). The mode is the partition's; a QOS-based one (preempt/qos) is not seen."""
    if fields.get("JobState") != "RUNNING" or fields.get("PreemptTime", "None") in ("None", "Unknown", ""):
        return False
    mode = _show("partition", fields.get("Partition", "")).get("PreemptMode", "") if fields.get("Partition") else ""
    return "REQUEUE" in mode.upper()


def requeue(job_id: str) -> None:
    """Put this (running) job back in the queue: Slurm ends it now and starts it again with the same id."""
    from largemim.signals import held

    with held():  # the requeue makes Slurm SIGTERM the job: scontrol must still exit with its own status
        proc = subprocess.Popen(
            ["scontrol", "requeue", job_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"'scontrol requeue {job_id}' did not answer in 60 s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"'scontrol requeue {job_id}' failed ({proc.returncode}): {stderr.strip()}")


END_FILE, END_HOST = "LARGEMIM_END_FILE", "LARGEMIM_END_HOST"


def report_end(local_rank: int, stopped_early: bool, step: int) -> None:
    """Tell an sbatch template's batch script (slurm/job_lib.sh) how the ranks' run ended: "stopped STEP"
    (saved, and stopped early: requeue) or "finished STEP". A preemption with a grace time SIGTERMs the
    job's steps but not the batch script, which could not tell otherwise. Local rank 0 of the batch
    script's node (LARGEMIM_END_HOST) writes the file LARGEMIM_END_FILE names: a node-local path."""
    path, host = os.environ.get(END_FILE), os.environ.get(END_HOST)
    if not path or local_rank != 0 or (host and host != socket.gethostname()):
        return
    try:
        with open(path, "w") as f:
            f.write(f"{'stopped' if stopped_early else 'finished'} {step}\n")
    except OSError as e:  # the script then goes by the signals it saw
        print(f"largemim: could not write {END_FILE}={path} ({e}); the batch script decides without it", flush=True)
