"""Shard sources: brace-expanded patterns and how many samples they hold."""

from __future__ import annotations

from pathlib import Path

import braceexpand

from largemim.data.manifest import MANIFEST_NAME, Manifest


def expand_shards(pattern: str) -> list[str]:
    """``/d/train-{000000..000009}.tar`` -> ten paths; several patterns may be joined with ``::``."""
    urls = [u for part in pattern.split("::") if part.strip() for u in braceexpand.braceexpand(part.strip())]
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no shard")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist, e.g. {missing[0]!r}; "
            "check data.shards (brace ranges are inclusive: {000000..000009} is ten shards)"
        )
    return urls


def count_samples(urls: list[str]) -> int:
    """Samples in ``urls`` according to the manifest(s) in their folders; raises if one is missing."""
    by_name: dict[str, int] = {}
    for folder in sorted({str(Path(u).parent) for u in urls}):
        manifest = Manifest.load(Path(folder) / MANIFEST_NAME)
        for s in manifest.shards:
            by_name[str(Path(folder) / s.url)] = s.samples
    unknown = [u for u in urls if str(Path(u)) not in by_name]
    if unknown:
        raise ValueError(
            f"shard {unknown[0]!r} is not in its folder's {MANIFEST_NAME}; rewrite the manifest with "
            "tools/make_shards.py or set data.num_samples"
        )
    return sum(by_name[str(Path(u))] for u in urls)
