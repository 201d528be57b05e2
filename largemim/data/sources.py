"""Shard sources: brace-expanded patterns and how many samples they hold."""

from __future__ import annotations

import logging
from pathlib import Path

import braceexpand
from webdataset.gopen import gopen_schemes

from largemim.data.manifest import MANIFEST_NAME, Manifest
from largemim.data.readers import READER_SCHEMES
from largemim.data.remote_manifest import manifest_folder, remote_counts, unavailable

log = logging.getLogger(__name__)

# Schemes largemim's readers start (data/readers.py: s3 with the AWS CLI, gs with gsutil, http(s) with
# curl, ...), those webdataset's gopen reads (hf://, ...), and file://.
_READABLE_SCHEMES = (set(gopen_schemes) - {"__default__"}) | set(READER_SCHEMES) | {"file"}


def split_sets(pattern: str) -> list[str]:
    """Shard sets are joined with ``::`` (each may be mixed with its own weight)."""
    return [part.strip() for part in pattern.split("::") if part.strip()]


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(pattern: str) -> list[str]:
    """``/d/train-{000000..000009}.tar`` -> ten paths; ``pipe:`` commands are expanded the same way
    (``pipe:aws s3 cp s3://b/shard-{000..099}.tar -`` -> 100 commands); several sets join with ``::``."""
    urls = [u for part in split_sets(pattern) for u in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no shard")
    for url in urls:
        scheme = url.split("://", 1)[0].lower() if "://" in url and not url.startswith("pipe:") else None
        if scheme is not None and scheme not in _READABLE_SCHEMES:
            raise ValueError(
                f"data.shards: {url!r} has a scheme ({scheme}://) that cannot be read directly; stream it "
                f"through a command instead, e.g. 'pipe:mycli cat {url}'"
            )
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist, e.g. {missing[0]!r}; "
            "check data.shards (brace ranges are inclusive: {000000..000009} is ten shards)"
        )
    return urls


def local_counts(urls: list[str]) -> dict[str, int]:
    """Samples per local shard, for those whose folder's ``manifest.json`` lists them (a folder without a
    readable one is left out; :func:`why_uncounted` says why)."""
    counts: dict[str, int] = {}
    for folder in sorted({str(Path(u).parent) for u in urls if is_local(u)}):
        path = Path(folder) / MANIFEST_NAME
        try:
            manifest = Manifest.load(path)
        except (OSError, ValueError) as e:
            if path.exists():
                log.warning("ignoring %s: %s", path, e)
            continue
        for s in manifest.shards:
            counts[str(Path(folder) / s.url)] = s.samples
    return {u: counts[str(Path(u))] for u in urls if is_local(u) and str(Path(u)) in counts}


def manifest_counts(urls: list[str]) -> dict[str, int]:
    """Samples per shard, for the shards whose folder's manifest lists them: a local folder's
    ``manifest.json``, or a remote one's (:mod:`largemim.data.remote_manifest`); the others are left out,
    a remote folder's with a warning. (The trainer reads them through :mod:`largemim.run_counts`.)"""
    counts = local_counts(urls)
    remote, failures = remote_counts(urls)
    for folder, reason in sorted(failures.items()):
        warn_uncounted(folder, reason)
    return {**counts, **remote}


def warn_uncounted(folder: str, reason: str) -> None:
    log.warning(
        "no sample counts for the shards in %s (%s): exact epochs are only nearly exact and a resume reads past "
        "what each lane had consumed; upload their %s (tools/write_manifest.py writes one)",
        folder, reason, MANIFEST_NAME,
    )  # fmt: skip


def why_uncounted(url: str, failures: dict[str, str]) -> str:
    """Why ``url`` has no sample count, and what to do (``failures``: remote folders' reasons)."""
    if is_local(url):
        try:
            Manifest.load(Path(url).parent)
        except (OSError, ValueError) as e:
            return f"{e}"
    elif (folder := manifest_folder(url)) is None:
        return (
            f"cannot count the samples of shards such as {url!r} (pipe: commands, URLs with a query and schemes "
            "only webdataset reads have no manifest read): set data.num_samples"
        )
    elif folder in failures:
        return unavailable(folder, failures[folder])
    return (
        f"shard {url!r} is not in its folder's {MANIFEST_NAME}; rewrite the manifest (tools/write_manifest.py) "
        "or set data.num_samples"
    )


def count_samples(urls: list[str]) -> int:
    """Samples in ``urls`` according to the manifest(s) in their folders; raises if one is missing."""
    counts = sample_counts(urls)
    return sum(counts[u] for u in urls)


def sample_counts(urls: list[str]) -> dict[str, int]:
    """Samples per shard from the manifest(s) in their folders; raises, saying why and what to do, if one
    has none (:func:`why_uncounted`)."""
    uncountable = next((u for u in urls if not is_local(u) and manifest_folder(u) is None), None)
    if uncountable is not None:  # before any fetch
        raise ValueError(why_uncounted(uncountable, {}))
    counts = local_counts(urls)
    remote, failures = remote_counts(urls)
    counts.update(remote)
    missing = next((u for u in urls if u not in counts), None)
    if missing is not None:
        raise ValueError(why_uncounted(missing, failures))
    return counts
