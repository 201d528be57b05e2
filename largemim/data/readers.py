"""Open a shard URL: a local path, a ``pipe:`` command, or an ``http(s)://`` URL (read with curl).

A ``pipe:`` or curl reader is a child process, and Slurm signals every process of a job step: the
time-limit warning (``--signal``, USR1/USR2) and, on ``scancel`` or preemption, SIGTERM. A reader that
dies of one cuts its shard short, so the step the rank finishes before it saves (or every step after a
warning it survives) trains on other samples than an uninterrupted run would. Readers therefore start
with those signals ignored (an ignored signal stays ignored through ``exec``, and a shell may not trap
it again); a reader still ends when its rank closes the pipe (SIGPIPE) or Slurm sends SIGKILL.
"""

from __future__ import annotations

import signal
from typing import IO

from webdataset.gopen import Pipe, gopen

# Signals the rank handles itself (checkpoint.stop_signals and the requeue warning).
SHIELDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
_IGNORE = signal.SIG_IGN
_set = signal.signal


def _shield() -> None:
    """Runs in the child between fork and exec: no imports, no locks, only signal(2)."""
    for sig in SHIELDED:
        _set(sig, _IGNORE)


def open_shard(url: str, bufsize: int = 1 << 16) -> IO[bytes]:
    """A readable byte stream of the shard; a non-zero exit of a reader raises when the stream ends."""
    if url.startswith("pipe:"):
        # 141: the reader got SIGPIPE because the rank stopped reading early; not an error.
        return Pipe(url[5:], mode="rb", shell=True, bufsize=bufsize, ignore_status=[141], preexec_fn=_shield)
    if url.startswith(("http://", "https://")):
        command = ["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2", "-f", "-s", "-L", url]
        # 23: curl's write error when the rank stopped reading early.
        return Pipe(command, mode="rb", bufsize=bufsize, ignore_status=[141, 23], preexec_fn=_shield)
    return gopen(url)
