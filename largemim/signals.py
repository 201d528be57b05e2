"""Stop requests from the scheduler: a signal sets a flag; every rank agrees on the step to stop at.

SLURM sends the signal to every task, but not at the same instant, so ranks compare flags with an
all-reduce (MAX) after each step, read one step later so that the host never waits for the device: if
any rank was signalled, all of them save at the same step and exit 0. Which signals mean "save and
stop" is configurable because NCCL can swallow SIGUSR1 (submitit moved to USR2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# Stop signals that arrived before the training loop installed its handlers (while a launcher was still
# importing, joining the process group, building the engine): StopOnSignal adopts them, so the loop
# stops after its first step instead of the signal being lost.
_early: list[str] = []
_early_pid: int | None = None  # the process that called catch_early


# What Slurm sends every process of a job step: the time-limit warning (--signal) and, on scancel,
# preemption or the hard limit, SIGTERM.
STEP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


@contextlib.contextmanager
def held(signals=STEP_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in this thread while the block runs (one that arrives meanwhile is delivered
    after it). A child started inside keeps them blocked (CPython's subprocess passes the thread's mask
    on), so a helper program such as ``scontrol`` or ``curl`` is never killed by them; unlike a
    ``preexec_fn``, this keeps subprocess's cheap vfork path, which matters in a process of many GB."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def signal_from_name(name: str) -> signal.Signals:
    """``"USR2"``, ``"SIGUSR2"`` -> ``signal.SIGUSR2``; a clear error for anything else."""
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"checkpoint.stop_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR2)")
    return sig


def _record_early(signum, frame) -> None:
    # Processes forked later (DataLoader workers) inherit this handler; Slurm signals them too, and they
    # must neither die of it (the default action) nor report it: the rank itself handles it.
    if os.getpid() != _early_pid:
        return
    _early.append(signal.Signals(signum).name)
    log.warning("received %s during start-up: will save and stop after the first step", _early[-1])


def catch_early(names: list[str]) -> None:
    """Record ``names`` from now on until a StopOnSignal takes over (call first thing in a launched job)."""
    global _early_pid
    _early_pid = os.getpid()
    for name in names:
        signal.signal(signal_from_name(name), _record_early)


class StopOnSignal:
    def __init__(self, names: list[str], device: torch.device):
        self.received: str | None = None
        self.device = device
        self._pending: tuple | None = None  # poll's all-reduce in flight: (work, value, cuda event)
        self._polled = False
        self._previous = {}
        for name in names:
            sig = signal_from_name(name)
            self._previous[sig] = signal.signal(sig, self._handle)
        early = [s for s in _early if s in {signal_from_name(n).name for n in names}]
        _early.clear()
        if early:
            self.received = early[0]

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        log.warning("received %s: will save and stop after this step", self.received)

    def poll(self) -> bool:
        """The per-step check, one step behind and without a host sync: True on every rank at the same
        call once a signal that some rank had received by the previous call is agreed on (a collective:
        call on all ranks, in step).

        Each call starts an all-reduce of this rank's flag and returns the result of the previous call's,
        which finished during the step in between. A blocking check (``agreed``) after every step made the
        host wait for the whole step's kernels before it could fetch and queue the next batch, leaving
        the GPU idle meanwhile; the price here is one more step in the grace time. The first call blocks,
        so that a signal from start-up still stops the run after its first step.
        """
        if not self._distributed():
            return self.received is not None
        if not self._polled:
            self._polled = True
            return self.agreed()
        if self._collect():
            return True
        self._pending = self._start()
        return False

    def agreed(self) -> bool:
        """True on every rank if any rank has received a stop signal (a blocking collective: call on all
        ranks). Also settles a ``poll`` still in flight."""
        if not self._distributed():
            return self.received is not None
        if self._collect():
            return True
        self._pending = self._start()
        return self._collect()

    @staticmethod
    def _distributed() -> bool:
        # torch is imported here, not at the top, so that a launcher can call catch_early before the
        # slow imports (a signal that comes while they run would otherwise hit submitit's handler).
        import torch.distributed as dist

        return dist.is_initialized() and dist.get_world_size() > 1

    def _start(self) -> tuple:
        """Launch the all-reduce (MAX) of this rank's flag; on CUDA also its copy to pinned host memory."""
        import torch
        import torch.distributed as dist

        # torch.full fills on the device; torch.tensor([...], device=cuda) would copy from pageable
        # memory and wait for the stream.
        flag = torch.full((1,), 1.0 if self.received else 0.0, device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type != "cuda":
            return (work, flag, None)
        work.wait()  # NCCL: orders the current stream after the collective; the host does not wait
        host = torch.empty(1, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return (None, host, done)

    def _collect(self) -> bool:
        """The result of the all-reduce in flight (False if none); waits for it if it has not finished."""
        if self._pending is None:
            return False
        work, value, done = self._pending
        self._pending = None
        if done is not None:
            done.synchronize()  # a step after it was queued: long finished
        else:
            work.wait()
        return bool(value[0] > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
