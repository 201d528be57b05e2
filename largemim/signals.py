"""Stop requests from the scheduler: a signal sets a flag; every rank agrees on the step to stop at.

SLURM sends the signal to every task, but not at the same instant, so ranks compare flags with an
all-reduce (MAX) after each step: if any rank was signalled, all of them save at the same step and
exit 0. Which signals mean "save and stop" is configurable because NCCL can swallow SIGUSR1
(submitit moved to USR2).
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopOnSignal:
    def __init__(self, names: list[str], device: torch.device):
        self.received: str | None = None
        self.device = device
        self._previous = {}
        for name in names:
            sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"checkpoint.stop_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR2)")
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        log.warning("received %s: will save and stop after this step", self.received)

    def agreed(self) -> bool:
        """True on every rank if any rank has received a stop signal (a collective: call on all ranks)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
