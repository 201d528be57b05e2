"""Open a shard URL: a local path, a ``pipe:`` command, or an ``http(s)://`` URL (read with curl).

A ``pipe:`` or curl reader is a child process, and Slurm signals every process of a job step: the
time-limit warning (``--signal``, USR1/USR2) and, on ``scancel`` or preemption, SIGTERM. A reader that
dies of one cuts its shard short, so the step the rank finishes before it saves (or every step after a
warning it survives) trains on other samples than an uninterrupted run would. Readers therefore start
with those signals ignored (an ignored signal stays ignored through ``exec``, and a shell may not trap
it again); a reader still ends when its rank closes the pipe (SIGPIPE) or Slurm sends SIGKILL.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from typing import IO

from webdataset.gopen import gopen

# Signals the rank handles itself (checkpoint.stop_signals and the requeue warning).
SHIELDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
_IGNORE = signal.SIG_IGN
_set = signal.signal


def _shield() -> None:
    """Runs in the child between fork and exec: no imports, no locks, only signal(2)."""
    for sig in SHIELDED:
        _set(sig, _IGNORE)


class ShardReader:
    """A shard's byte stream, and the process that produces it (none for a local file)."""

    def __init__(self, stream: IO[bytes], proc: subprocess.Popen | None = None):
        self.stream, self.proc = stream, proc

    def finish(self) -> None:
        """Read to the end (the tar's padding) and close; raises if the reader exited non-zero, which
        may have cut the shard short. Only here: a status check while reading would drop a chunk."""
        while self.stream.read(1 << 16):
            pass
        self.stream.close()
        if self.proc is not None and self.proc.wait() != 0:
            raise OSError(f"the reader exited with status {self.proc.returncode}")

    def abandon(self) -> None:
        """Close a stream that is not read to its end; its reader is killed, not waited for long."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.stream.close()
        if self.proc is not None:
            self.proc.wait()


def open_shard(url: str, bufsize: int = 1 << 16) -> ShardReader:
    """Open a shard for reading; a reader process's exit status is checked by :meth:`ShardReader.finish`."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=bufsize, preexec_fn=_shield)
        return ShardReader(proc.stdout, proc)
    if url.startswith(("http://", "https://")):
        command = ["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2", "-f", "-s", "-L", url]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, bufsize=bufsize, preexec_fn=_shield)
        return ShardReader(proc.stdout, proc)
    return ShardReader(gopen(url))
