"""Open a shard URL: a local path, a ``pipe:`` command, an ``http(s)``/``sftp``/``ftps``/``scp`` URL (read
with curl), ``htgs://`` (curl from storage.googleapis.com), or ``gs://`` (gsutil), ``s3://`` (the AWS
CLI), ``ais://`` (ais); other schemes webdataset knows (``hf://``) through its own reader.

A ``pipe:`` or curl reader is a child process, and Slurm signals every process of a job step: the
time-limit warning (``--signal``, USR1/USR2) and, on ``scancel`` or preemption, SIGTERM. A reader that
dies of one cuts its shard short, so the step the rank finishes before it saves (or every step after a
warning it survives) trains on other samples than an uninterrupted run would. So a reader starts with
those signals blocked (:func:`largemim.signals.held`), under a bash that also ignores them before it
runs the command (an ignored signal stays ignored through ``exec``). bash, not sh: dash clears an
inherited signal mask, leaving a moment before its ``trap`` runs; where there is no bash, sh is used.
A reader still ends when its rank closes the pipe (SIGPIPE), is killed (:meth:`ShardReader.abandon`),
or Slurm sends its final SIGKILL. webdataset's readers (``hf://``) start curl without a shell: they get
the signals blocked, not ignored (a mask survives ``exec``). No ``preexec_fn``: it would force a full
fork of the (large) process for every shard.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from typing import IO

from webdataset.gopen import gopen

from largemim.signals import STEP_SIGNALS, held

_SHELL = shutil.which("bash") or "/bin/sh"
_IGNORE_STEP_SIGNALS = 'trap "" ' + " ".join(s.name.removeprefix("SIG") for s in STEP_SIGNALS) + "; "
# curl gives up on a transfer slower than 1 KiB/s for 5 minutes (a stalled server) instead of hanging
# the reader for ever. No curl --retry: after part of the body has gone down the pipe, curl would send
# the whole body again behind it (a shard spliced from two reads); the stream restarts the read itself
# and skips what it already has (data.open_retries).
CURL = ["curl", "--connect-timeout", "30", "--speed-limit", "1024", "--speed-time", "300", "-f", "-s", "-L"]


class ReaderFailed(OSError):
    """A reader process exited non-zero."""


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
            raise ReaderFailed(f"the reader exited with status {self.proc.returncode}")

    def exit_status(self, wait_s: float = 0.2) -> int | None:
        """The reader's exit status if it has ended (waiting up to ``wait_s``), else None; None for a file."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None

    def abandon(self) -> None:
        """Close a stream that is not read to its end; its reader is killed, not waited for long."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.stream.close()
        if self.proc is not None:
            self.proc.wait()


def _start(argv: list[str], bufsize: int, stderr: IO | None) -> ShardReader:
    with held(STEP_SIGNALS):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, bufsize=bufsize)
    return ShardReader(proc.stdout, proc)


# Object stores read by their own command line tools, started like curl (shielded, killable); the same
# commands webdataset's gopen would run, plus s3:// (the AWS CLI), which gopen does not know.
_COMMANDS = {
    "gs": lambda url: ["gsutil", "cat", url],
    "s3": lambda url: ["aws", "s3", "cp", url, "-"],
    "ais": lambda url: ["ais", "get", url, "-"],
    # Google Cloud Storage over HTTPS (public objects). webdataset's own htgs reader hands curl a gs:// URL,
    # which curl cannot read.
    "htgs": lambda url: [*CURL, "https://storage.googleapis.com/" + url.split("://", 1)[1]],
    **{scheme: lambda url: [*CURL, url] for scheme in ("http", "https", "sftp", "ftps", "scp")},
}
READER_SCHEMES = tuple(_COMMANDS)


def open_shard(url: str, bufsize: int = 1 << 16, stderr: IO | None = None) -> ShardReader:
    """Open a shard for reading; a reader process's exit status is checked by :meth:`ShardReader.finish`.
    ``stderr``: where a reader process's messages go (default: the rank's stderr)."""
    if url.startswith("pipe:"):
        return _start([_SHELL, "-c", _IGNORE_STEP_SIGNALS + url[5:]], bufsize, stderr)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in _COMMANDS:
        command = _COMMANDS[scheme](url)
        if stderr is not None and command[0] == "curl":
            command.insert(1, "-S")  # its messages are kept: with -s, its error ("(22) ... 404") too
        argv = [_SHELL, "-c", _IGNORE_STEP_SIGNALS + 'exec "$0" "$@"', *command]
        return _start(argv, bufsize, stderr)
    if scheme and scheme != "file":  # one only webdataset knows (hf://): its curl inherits the blocked signals
        with held(STEP_SIGNALS):
            return ShardReader(gopen(url, bufsize=bufsize))
    return ShardReader(gopen(url))  # a local file
