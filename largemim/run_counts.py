"""The shards' sample counts a run works with: read on rank 0, sent to every rank, and for remote shards
kept in the run folder.

Every rank must deal its data from the same counts (a rank without them deals whole shards, and its
data overlaps the others'), so rank 0 reads the manifests (:func:`manifest_counts`, remote ones fetched)
and sends the result. A remote manifest read once is kept in ``RUN_DIR/remote_shard_counts.json``: a
resume whose fetch fails (an outage) goes on with the counts it started with instead of dealing, and
rebuilding its loader lanes, another way. Local manifests are read afresh each start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from largemim.data.sources import is_local, manifest_counts, sample_counts
from largemim.distributed import broadcast_from_rank0
from largemim.files import write_atomic

log = logging.getLogger(__name__)

SAVED_NAME = "remote_shard_counts.json"


class CountsUnavailable(ValueError):
    """The counts the run needs cannot be read (rank 0's message, on every rank)."""


def run_shard_counts(urls: list[str], need_all: bool, rank: int, run_dir: Path) -> dict[str, int]:
    """Samples per shard, on every rank alike; all of them where the epoch length comes from them
    (``need_all``: else :class:`CountsUnavailable`)."""
    box: list = [None]
    if rank == 0:
        try:
            box[0] = _read(urls, need_all, run_dir / SAVED_NAME)
        except Exception as e:  # noqa: BLE001 - whatever it is, every rank must get past the broadcast
            box[0] = f"{e}"
    broadcast_from_rank0(box)
    if isinstance(box[0], str):
        raise CountsUnavailable(box[0])
    return box[0]


def _read(urls: list[str], need_all: bool, saved_path: Path) -> dict[str, int]:
    saved = _load(saved_path)
    try:
        counts = sample_counts(urls) if need_all else manifest_counts(urls)
        error = None
    except (OSError, ValueError) as e:
        if not any(u in saved for u in urls):
            raise
        counts, error = manifest_counts(urls), e
    kept = [u for u in urls if u not in counts and u in saved]
    if kept:
        counts.update((u, saved[u]) for u in kept)
        log.warning("the counts of %d remote shard(s) (e.g. %s) come from %s, read at an earlier start: their "
                    "manifest could not be read now", len(kept), kept[0], saved_path)  # fmt: skip
    if need_all and error is not None and any(u not in counts for u in urls):
        raise error
    remote = {u: n for u, n in counts.items() if not is_local(u)}
    if remote and any(saved.get(u) != n for u, n in remote.items()):
        saved_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(saved_path, json.dumps({**saved, **remote}))
    return counts


def _load(path: Path) -> dict[str, int]:
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s (%s)", path, e)
        return {}
    return {str(u): int(n) for u, n in body.items()} if isinstance(body, dict) else {}
