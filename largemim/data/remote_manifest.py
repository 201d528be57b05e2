"""Sample counts of remote shard sets: the ``manifest.json`` next to the shards, fetched with their reader.

``s3://b/p/train-000000.tar`` is listed by ``s3://b/p/manifest.json``, read as the shards are
(:func:`largemim.data.readers.open_shard`: the AWS CLI, gsutil, curl, ...). Only for the schemes those
readers fetch and ``file://``: not ``pipe:`` commands (no folder), not schemes only webdataset reads
(``hf://``: its errors would carry the command line with its token, and its reader cannot be timed out),
not URLs with a query (a presigned URL names one object, not a folder). The trainer fetches on rank 0 and
sends the result to the others, so all ranks deal their data the same way.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from largemim.data.manifest import MANIFEST_NAME, Manifest
from largemim.data.readers import READER_SCHEMES, ReaderFailed, open_shard

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 60.0  # per attempt
FETCH_BUDGET_S = 300.0  # all folders' tries together: well within the 10 minutes the other ranks wait for
# rank 0 in a collective (the process group's default timeout), however many folders are out
FETCH_ATTEMPTS = 3  # an object store's passing error (503, a reset) costs one more start-up second or two
MAX_MANIFEST_BYTES = 256 << 20  # about 4M shards
_FETCHED = frozenset(READER_SCHEMES) | {"file"}


def manifest_folder(url: str) -> str | None:
    """The remote folder whose manifest lists ``url``, or None where none is fetched (see the module)."""
    if url.startswith("pipe:") or "://" not in url:
        return None
    parts = urlsplit(url)
    if parts.scheme.lower() not in _FETCHED or parts.query or parts.fragment or "/" not in parts.path:
        return None
    return url.rsplit("/", 1)[0]


def remote_counts(urls: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Samples per remote shard from each folder's manifest (folders fetched side by side, once), and why
    each folder whose manifest could not be read has none (:func:`unavailable` words it)."""
    by_folder: dict[str, list[str]] = {}
    for u in urls:
        if (f := manifest_folder(u)) is not None:
            by_folder.setdefault(f, []).append(u)
    folders = sorted(by_folder)
    if not folders:
        return {}, {}
    log.info("reading the sample counts of %d remote shard folder(s), e.g. %s/%s", len(folders), folders[0],
             MANIFEST_NAME)  # fmt: skip
    deadline = time.monotonic() + FETCH_BUDGET_S
    with ThreadPoolExecutor(min(16, len(folders))) as pool:
        fetched = list(pool.map(lambda folder: _fetch_manifest(folder, deadline), folders))
    counts: dict[str, int] = {}
    failures: dict[str, str] = {}
    for folder, manifest in zip(folders, fetched, strict=True):
        if isinstance(manifest, str):
            failures[folder] = manifest
            continue
        listed = {s.url if "://" in s.url else f"{folder}/{s.url}": s.samples for s in manifest.shards}
        counts.update((u, listed[u]) for u in by_folder[folder] if u in listed)
    return counts, failures


def unavailable(folder: str, reason: str) -> str:
    return (
        f"cannot count the samples of the shards in {folder}: {reason}; upload their {MANIFEST_NAME} next to "
        "them (tools/write_manifest.py writes one), or set data.num_samples"
    )


def _fetch_manifest(folder: str, deadline: float) -> Manifest | str:
    """The folder's manifest, or why there is none, by ``deadline``."""
    where = f"{folder}/{MANIFEST_NAME}"
    error: Exception = TimeoutError(f"not tried: the {FETCH_BUDGET_S:.0f} s for all folders ran out")
    tried = 0
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        left = deadline - time.monotonic()
        if left < 1:
            break
        tried = attempt
        try:
            return Manifest.parse(fetch_text(where, min(FETCH_TIMEOUT_S, left)), where)
        except FileNotFoundError as e:  # file://: not there (a store's "not found" is tried again: its CLI
            return f"{e}"  # exits 1 on a 404 and on a passing 503 alike)
        except OSError as e:  # not reachable now, or not there: tried again
            error = e
        except ValueError as e:  # there, but no manifest: the same again
            return f"{e}"
        if attempt < FETCH_ATTEMPTS:
            time.sleep(attempt)
    return f"{error} ({tried} attempt{'s' if tried != 1 else ''})" if tried else f"{error}"


def fetch_text(url: str, timeout_s: float = FETCH_TIMEOUT_S) -> str:
    """A small remote file, read as the shards are (:func:`open_shard`) in ``timeout_s`` in all (read with
    a deadline here: a reader that hangs, or leaves a child holding the pipe as gsutil's wrapper does,
    cannot hold the start-up); a failure names the reader's own message (e.g. the store's "not found")."""
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryFile() as messages:
        reader = open_shard(url, stderr=messages)
        try:
            if reader.proc is None:  # file://
                data = reader.stream.read(MAX_MANIFEST_BYTES + 1)
                if len(data) > MAX_MANIFEST_BYTES:
                    raise ValueError(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
                return data.decode("utf-8", errors="replace")
            data = _read_by(reader, deadline, timeout_s)
            try:
                status = reader.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"no answer in {timeout_s:.0f} s") from None
            if status != 0:
                messages.seek(0)
                said = " ".join(messages.read()[-300:].decode("utf-8", errors="replace").split())
                raise ReaderFailed(f"the reader exited with status {status}" + (f": {said}" if said else ""))
        finally:
            reader.abandon()
    return data.decode("utf-8", errors="replace")


def _read_by(reader, deadline: float, timeout_s: float) -> bytes:
    """All of a reader's pipe by ``deadline``, at most MAX_MANIFEST_BYTES. Its end is the pipe's end, or
    the reader's exit with nothing left to read (a child it left behind may hold the pipe open)."""
    fd = reader.stream.fileno()
    poller = select.poll()  # not select(): it cannot take a descriptor above 1023
    poller.register(fd, select.POLLIN | select.POLLHUP)
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer in {timeout_s:.0f} s")
        if not poller.poll(min(left, 0.5) * 1000):
            if reader.proc.poll() is None:
                continue
            if not poller.poll(0):  # exited: what it wrote before its exit is readable now, or there is none
                return b"".join(chunks)
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
