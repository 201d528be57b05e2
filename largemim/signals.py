"""Stop requests from the scheduler: a signal sets a flag; every rank agrees on the step to stop at.

SLURM sends the signal to every task, but not at the same instant, so ranks compare flags with an
all-reduce (MAX) after each step: if any rank was signalled, all of them save at the same step and
exit 0. Which signals mean "save and stop" is configurable because NCCL can swallow SIGUSR1
(submitit moved to USR2).
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

    def agreed(self) -> bool:
        """True on every rank if any rank has received a stop signal (a collective: call on all ranks)."""
        # torch is imported here, not at the top, so that a launcher can call catch_early before the
        # slow imports (a signal that comes while they run would otherwise hit submitit's handler).
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
