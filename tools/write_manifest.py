#!/usr/bin/env python
"""Write the manifest.json the trainer reads for an existing WebDataset shard set (img2dataset's output,
a downloaded copy, shards written by another tool), without rewriting the shards.

With each shard's sample count known the trainer needs no data.num_samples, data.sampling=exact reads
every sample once per epoch, and a resume reads back only what the shuffle buffers held.

  tools/write_manifest.py '/data/laion/{00000..09999}.tar'        # writes /data/laion/manifest.json
  tools/write_manifest.py 's3://bucket/laion/{00000..09999}.tar' --out manifest.json
  aws s3 cp manifest.json s3://bucket/laion/manifest.json          # where the trainer looks for it

Samples are counted from the tar headers as the training stream groups the members (local shards are
read header to header; remote ones are streamed whole, --workers at a time). A manifest already in the
folder keeps its entries for other shards; those of the shards counted are replaced, and any change is
reported. A damaged shard is an error naming it, and nothing is written, unless --allow-damaged (then
what can be read is counted).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.data.count_shards import ShardCount, count_shard  # noqa: E402
from largemim.data.manifest import MANIFEST_NAME, Manifest, ShardInfo  # noqa: E402
from largemim.data.sources import expand_shards, is_local  # noqa: E402
from largemim.files import write_atomic  # noqa: E402
from largemim.progress import progress_bar  # noqa: E402

UPLOAD = {"s3": "aws s3 cp", "gs": "gsutil cp"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", help="the shards: a brace pattern, local or remote (s3://, gs://, https://, ...)")
    ap.add_argument("--out", type=Path, help=f"manifest file to write (default: FOLDER/{MANIFEST_NAME}; "
                    "needed for remote shards: upload it next to them)")  # fmt: skip
    ap.add_argument("--workers", type=int, default=16, help="shards counted at a time (default 16)")
    ap.add_argument("--allow-damaged", action="store_true", help="count what a damaged shard holds before its damage")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return ap


def folder_of(url: str) -> str:
    return str(Path(url).parent) if is_local(url) else url.rsplit("/", 1)[0]


def count_all(urls: list[str], workers: int, progress: bool) -> list[ShardCount]:
    with ThreadPoolExecutor(max(1, workers)) as pool, progress_bar(
        total=len(urls), enabled=progress, desc="counting samples", unit="shard"
    ) as bar:  # fmt: skip
        counts = []
        for count in pool.map(count_shard, urls):
            counts.append(count)
            bar.update(1)
            bar.set_postfix(samples=sum(c.samples for c in counts), refresh=False)
    return counts


def merged(out: Path, counts: Iterable[ShardCount]) -> tuple[Manifest, int, list[str]]:
    """The manifest at ``out`` (if any) with these counts in it; how many of its entries were kept as they
    were, and the changed ones."""
    old = Manifest.load(out) if out.exists() else Manifest()
    entries = {s.url: s.samples for s in old.shards}
    counted = {c.url.rsplit("/", 1)[-1]: c.samples for c in counts}
    changed = [f"{n}: {entries[n]} -> {s}" for n, s in counted.items() if n in entries and entries[n] != s]
    kept = sum(1 for n in entries if n not in counted)
    entries.update(counted)
    return Manifest(shards=[ShardInfo(n, s) for n, s in entries.items()]), kept, changed


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        urls = expand_shards(args.shards)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    folders = sorted({folder_of(u) for u in urls})
    remote = [f for f in folders if "://" in f or f.startswith("pipe:")]
    if any(u.startswith("pipe:") for u in urls):
        raise SystemExit("error: pipe: commands have no folder for a manifest; give the shards' URLs or paths")
    if len(folders) > 1:
        raise SystemExit(f"error: the shards are in {len(folders)} folders ({folders[0]}, ...): a manifest lists "
                         "one folder's shards; run once per folder")  # fmt: skip
    if remote and args.out is None:
        raise SystemExit(f"error: {folders[0]} is remote: give --out FILE, then upload FILE to "
                         f"{folders[0]}/{MANIFEST_NAME}")  # fmt: skip
    out = args.out or Path(folders[0]) / MANIFEST_NAME
    try:
        counts = count_all(urls, args.workers, not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    damaged = [c for c in counts if c.damage]
    for c in damaged:
        print(f"damaged: {c.url}: {c.samples} samples before {c.damage}", file=sys.stderr)
    if damaged and not args.allow_damaged:
        raise SystemExit(f"error: {len(damaged)} of {len(urls)} shards are damaged (listed above): rewrite them "
                         "(tools/make_shards.py --tars) or leave them out of the pattern, or pass --allow-damaged "
                         "to count what they hold before the damage; nothing was written")  # fmt: skip
    try:
        manifest, kept, changed = merged(out, counts)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: the manifest at {out} cannot be read ({e}); move it away and run again") from None
    write_atomic(out, manifest.to_json())
    total = sum(c.samples for c in counts)
    print(f"{out}: {len(counts)} shards counted, {total} samples"
          + (f"; {kept} other entries kept" if kept else "")
          + (f"; {len(changed)} changed (e.g. {changed[0]})" if changed else ""))  # fmt: skip
    if remote:
        tool = UPLOAD.get(folders[0].split("://", 1)[0].lower())
        target = f"{folders[0]}/{MANIFEST_NAME}"
        print(f"upload it next to the shards: {tool} {out} {target}" if tool else f"upload it to {target}")


if __name__ == "__main__":
    main()
