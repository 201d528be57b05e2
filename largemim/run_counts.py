"""The shards' sample counts a run works with: read on rank 0, sent to every rank, and for remote shards
kept in the run folder.

Every rank must deal its data from the same counts (a rank without them deals whole shards, and its
data overlaps the others'), so rank 0 reads the manifests (local ones, and remote ones fetched)
and sends the result. Remote counts are kept in ``RUN_DIR/remote_shard_counts.json`` as last read: a
later start whose fetch fails (an outage) goes on with them instead of dealing, and rebuilding its
loader lanes, another way. Local manifests are read afresh each start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from largemim.data.remote_manifest import manifest_folder, remote_counts
from largemim.data.sources import is_local, local_counts, warn_uncounted, why_uncounted
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
            box[0] = f"{e}" if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {e}"
    broadcast_from_rank0(box)
    if isinstance(box[0], str):
        raise CountsUnavailable(box[0])
    return box[0]


def _read(urls: list[str], need_all: bool, saved_path: Path) -> dict[str, int]:
    """One read of every manifest (a remote folder fetched once: an outage costs its tries once, well
    within the time the other ranks wait), gaps in the remote counts filled from the saved ones."""
    saved = _load(saved_path)
    counts = local_counts(urls)
    remote, failures = remote_counts(urls)
    counts.update(remote)
    kept = [u for u in urls if u not in counts and u in saved and manifest_folder(u) in failures]  # unread now
    if kept:
        counts.update((u, saved[u]) for u in kept)
        log.warning("the counts of %d remote shard(s) (e.g. %s) come from %s, as last read: %s", len(kept), kept[0],
                    saved_path, why_uncounted(kept[0], failures))  # fmt: skip
    uncounted = {manifest_folder(u) for u in urls if u not in counts}
    for folder, reason in sorted(failures.items()):
        if folder in uncounted:
            warn_uncounted(folder, reason)
    missing = next((u for u in urls if u not in counts), None)
    if need_all and missing is not None:
        raise ValueError(why_uncounted(missing, failures))
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
