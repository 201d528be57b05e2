"""Process-group set-up for torchrun, the deepspeed launcher, SLURM wrappers, or a single process."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broadcast_from_rank0(objects: list) -> None:
    """Replace ``objects``' items on every rank with rank 0's (nothing to do in a world of one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(objects, src=0)


def cuda_wanted() -> bool:
    """A CUDA device is visible and ``DS_ACCELERATOR`` does not ask for the CPU."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "").lower() != "cpu"


def check_gpus_usable() -> None:
    """A Slurm job given GPUs whose CUDA cannot see them (a driver or container problem) would otherwise
    train on the CPU with gloo without a word; ``DS_ACCELERATOR=cpu`` asks for the CPU on purpose."""
    given = next((os.environ[k] for k in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE")
                  if os.environ.get(k, "").strip() not in ("", "0")), None)  # fmt: skip
    if given is None or torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR", "").lower() == "cpu":
        return
    why = "torch was built without CUDA" if torch.version.cuda is None else "CUDA sees no device"
    raise RuntimeError(
        f"this Slurm job has GPUs ({given}) but {why} on {socket.gethostname()} (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): check nvidia-smi and the container's GPU access on that node, "
        "or set DS_ACCELERATOR=cpu to train on the CPU on purpose"
    )


def init_distributed() -> DistEnv:
    """Join the process group described by the launcher's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    A plain ``python -m largemim.train`` becomes a world of one. ``DS_ACCELERATOR=cpu`` keeps a machine
    with GPUs on the CPU (as DeepSpeed itself then does). On the CPU the backend is gloo and each rank
    gets an equal share of the cores unless OMP_NUM_THREADS says otherwise.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    check_gpus_usable()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and not cuda_wanted() and local_rank == 0:
        log.warning(
            "DS_ACCELERATOR=cpu: training on the CPU although %d GPU(s) are visible; unset DS_ACCELERATOR "
            "(tools/setup_env.sh and tools/demo.sh set it for the CPU demo) to train on them",
            torch.cuda.device_count(),
        )
    if cuda_wanted():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device)


def teardown(exit_code: int) -> None:
    """Leave the process group and exit without running interpreter finalisers.

    About 1-2 % of multi-rank CPU runs abort in gloo's destructors at interpreter exit, after all work
    is done ("terminate called without an active exception"); exiting right after
    destroy_process_group, once every file is closed, avoids it (see ../shared/notes/deepspeed-cpu.md).
    """
    import sys

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
