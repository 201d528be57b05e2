"""Count the samples of existing tar shards (any WebDataset set: img2dataset's, a Hugging Face copy, ...),
to write the manifest the trainer reads (tools/write_manifest.py).

A shard's count is the number of samples the training stream gets from it: its members are grouped as
webdataset groups them (``tar_file_iterator`` then ``group_by_keys``: regular files only, ``__meta__``
files skipped, a new sample whenever the key changes), but from the tar headers alone. A local file is
read by seeking from header to header (a 500 MB shard costs a few hundred small reads); a remote one is
streamed through its reader (:func:`largemim.data.readers.open_shard`), all its bytes.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass

from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from largemim.data.readers import open_shard
from largemim.data.sources import is_local

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # tar_file_iterator's default skip_meta


@dataclass(frozen=True)
class ShardCount:
    url: str
    samples: int
    damage: str | None = None  # why the read stopped early (a cut or corrupt tar, a failed reader)


def _key(name: str) -> str | None:
    """The sample key webdataset gives a member, or None where it skips the member."""
    if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
        return None
    if _SKIP_META.match(name):
        return None
    return base_plus_ext(name)[0]


def count_shard(url: str) -> ShardCount:
    """The samples of one shard, and what stopped the read if it did not reach the tar's end."""
    samples, last = 0, None
    reader = None
    try:
        if not is_local(url):
            reader = open_shard(url)
        # a local file seekable (the member data skipped, not read); a stream as webdataset opens it
        where = {"name": url, "mode": "r:*"} if reader is None else {"fileobj": reader.stream, "mode": "r|*"}
        with tarfile.open(**where) as tar:
            for info in tar:
                key = _key(info.name) if info.isreg() else None
                if key is not None and key != last:
                    samples, last = samples + 1, key
                tar.members = []  # a streamed tar keeps every header otherwise
        if reader is not None:
            reader.finish()
    except (tarfile.TarError, OSError, EOFError) as e:
        return ShardCount(url, samples, f"{type(e).__name__}: {e}")
    finally:
        if reader is not None:
            reader.abandon()
    return ShardCount(url, samples)
