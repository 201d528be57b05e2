#!/usr/bin/env python
"""How long a resumed loader lane takes to give its first sample: rebuilt from the manifests' counts
(largemim/data/shuffle.py) against replaying its input up to the resume point (what it does without
counts, and what every lane did before), side by side in one run, over local files and over HTTP.

The gain depends on how many buffer lengths a lane's epoch holds: the buffer's oldest samples sit about
buffer x ln(buffer) positions back, and those shards are read back from their heads. A web-scale set
(780k samples per lane, buffer 2000) is far in the fast regime; ImageNet on 64 lanes (20k per lane) is not.

A synthetic shard set is written first (random bytes of --sample-kb per sample: nothing is decoded, only
the positioning is timed). One rank, one lane, exact mode: the lane's deal is the whole set, and the
resume points are fractions of it. The HTTP server is Python's, on this machine: it stands in for an
object store, without its latency.

  python tools/bench_resume.py                      # 24 shards x 500 samples x 100 KB (1.2 GB in /tmp)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import itertools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.data.fast_decode import FastTrainAugment  # noqa: E402
from largemim.data.manifest import Manifest, ShardInfo  # noqa: E402
from largemim.data.stream import ShardStream, StreamSpec  # noqa: E402


def write_set(folder: Path, shards: int, per_shard: int, sample_kb: int) -> list[Path]:
    paths = []
    for n in range(shards):
        path = folder / f"bench-{n:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                sink.write({"__key__": f"{n:06d}_{i:06d}", "jpg": os.urandom(sample_kb * 1024), "cls": b"0"})
        paths.append(path)
    Manifest(shards=[ShardInfo(p.name, per_shard) for p in paths]).save(folder)
    return paths


class _Counting(ShardStream):
    """Counts the samples its reads go through (heads read past included)."""

    parsed = 0

    def _shard_samples(self, url, first=0, stop=None, dead=None, count=True, where=None, key=None):
        self.parsed += first
        for sample in super()._shard_samples(url, first, stop, dead, count, where, key):
            self.parsed += 1
            yield sample


def first_sample(urls: list[str], per_epoch: int, buffer: int, skip: int, counts: dict) -> tuple[float, int]:
    spec = StreamSpec(((*urls,),), 8, per_epoch, 0, 1, 0, buffer, "exact", expected=counts)
    stream = _Counting(spec, FastTrainAugment(224, (0.2, 1.0)))
    start = time.perf_counter()
    next(stream._raw_samples(0, 0, 1, skip))
    return time.perf_counter() - start, stream.parsed


@contextlib.contextmanager
def served(root: Path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a lane that has what it needs closes its connection mid-file: not worth a traceback

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=24)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--sample-kb", type=int, default=100, help="bytes per sample (ImageNet's JPEGs: ~110 KB)")
    ap.add_argument("--buffers", default="100,2000", help="data.shuffle_buffer values (2000: largemim's default)")
    ap.add_argument("--at", default="0.25,0.5,0.9", help="resume points, as fractions of the lane's epoch")
    args = ap.parse_args()
    total = args.shards * args.per_shard
    per_epoch = total // 8
    with tempfile.TemporaryDirectory(prefix="bench_resume_") as tmp:
        folder = Path(tmp)
        print(f"writing {args.shards} shards x {args.per_shard} samples x {args.sample_kb} KB to {folder} ...")
        paths = write_set(folder, args.shards, args.per_shard, args.sample_kb)
        print(f"a lane's epoch: {total} samples; time to the first sample after the resume point, and samples read\n")
        print(f"{'source':<6} {'buffer':>6} {'resume at':>10} {'replay s':>9} {'rebuilt s':>10} {'speed-up':>9} "
              f"{'read (replay)':>14} {'read (rebuilt)':>15}")  # fmt: skip
        with served(folder) as site:
            for source, urls in (("local", [str(p) for p in paths]), ("http", [f"{site}/{p.name}" for p in paths])):
                counts = {u: args.per_shard for u in urls}
                points = itertools.product(map(int, args.buffers.split(",")), map(float, args.at.split(",")))
                for buffer, fraction in points:
                    skip = int(fraction * per_epoch) * 8
                    replay_s, replay_read = first_sample(urls, per_epoch, buffer, skip, {})
                    rebuilt_s, rebuilt_read = first_sample(urls, per_epoch, buffer, skip, counts)
                    print(f"{source:<6} {buffer:>6} {skip:>10} {replay_s:>9.2f} {rebuilt_s:>10.2f} "
                          f"{replay_s / rebuilt_s:>8.1f}x {replay_read:>14} {rebuilt_read:>15}")  # fmt: skip


if __name__ == "__main__":
    main()
