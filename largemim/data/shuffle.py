"""A lane's shuffle buffer, and how a resumed lane rebuilds it without reading what it had consumed.

The buffer is webdataset's (``filters._shuffle`` with ``initial=bufsize``: the same draws, so a stream is
the same sample for sample) with its state held in the open. Its draws depend on counts only, never on
the samples, so running the same buffer over sample *positions* says, for a lane resumed at its
``skip``-th sample, which positions the buffer holds at that point and how far into its input it had
read. With each shard's sample count known (the manifests), a position names a shard and a sample in
it: only the buffer's samples are read back (each shard that holds some from the first of them, the
head read past without decoding; typically a few buffer lengths back), and the input goes on from
where it stood. Replaying the lane's input instead reads everything before the resume point, which
for a web-scale epoch per lane means re-reading (re-downloading) tens of gigabytes per loader lane.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence

from webdataset.filters import pick

ENDLESS = math.inf  # the sample count of a resampled lane's input

Part = tuple[str, int, int | None]  # a shard URL and a range of its samples (stop None: to its end)


class ShuffleBuffer:
    """A shuffle buffer of ``size`` samples drawing from ``rng``; ``items`` is what it holds."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng = size, rng
        self.items: list = []

    def run(self, data: Iterator) -> Iterator:
        """``webdataset.filters._shuffle(data, bufsize=size, initial=size, rng=rng)``, from the buffer's
        present state (empty: from the start)."""
        buf, rng, size = self.items, self.rng, self.size
        for item in data:
            buf.append(item)
            if len(buf) < size:
                with contextlib.suppress(StopIteration):
                    buf.append(next(data))
            if len(buf) >= size:
                yield pick(buf, rng)
        while buf:
            yield pick(buf, rng)


def fast_forward(
    buffer: ShuffleBuffer,
    sources: Sequence[Callable[[], Iterator[Part]]],
    limits: Sequence[float],
    choose: Callable[[], int],
    skip: int,
    size_of: Callable[[Part], int],
    read: Callable[[str, int, int], Iterator[dict]],
    lost: Callable[[int, str], None],
) -> list[tuple[Iterator[Part], int]]:
    """Put an empty ``buffer`` where it would stand after giving ``skip`` samples, and return where each
    source's input goes on. The buffer's input takes its next sample from source ``choose()`` (which may
    draw from an RNG: it is drawn exactly as the real input draws it); ``sources[i]()`` lists source
    ``i``'s parts afresh, ``limits[i]`` is its sample count (``math.inf`` for an endless one, which
    every one but a lone source must be), ``size_of`` a part's sample count and ``read(url, first,
    stop)`` gives that range's samples in order, counting nothing it cannot read. A buffered sample that
    cannot be read back (its shard is gone or damaged since) is held as ``{"__missing__": True}``: it
    keeps its place in the draws, and its batch fills it as it fills an undecodable sample; their number
    goes to ``lost(count, message)`` once. Each source goes on as (its parts from the resume point on,
    the index among its parts of the first of them)."""
    taken = [0] * len(sources)

    def positions() -> Iterator[tuple[int, int]]:
        while True:
            i = choose()
            if taken[i] >= limits[i]:
                return
            taken[i] += 1  # before the yield: the buffer may stop pulling after any sample
            yield i, taken[i] - 1

    run = buffer.run(positions())
    for _ in range(skip):
        next(run)
    run.close()
    found: dict[tuple[int, int], dict] = {}
    rest = []
    for i, parts in enumerate(sources):
        wanted = sorted(k for j, k in buffer.items if j == i)
        got, goes_on, index = _read_back(parts(), wanted, taken[i], size_of, read)
        found.update(((i, k), sample) for k, sample in got.items())
        rest.append((goes_on, index))
    missing = [found[p] for p in buffer.items if found[p].get("__missing__")]
    if missing:
        lost(len(missing), f"a resumed lane could not read back {len(missing)} of the {len(buffer.items)} samples "
             f"its shuffle buffer held (e.g. {missing[0]['__url__']}, since damaged or removed): skipped")  # fmt: skip
    buffer.items[:] = [found[p] for p in buffer.items]
    return rest


def _read_back(
    parts: Iterator[Part],
    wanted: list[int],
    consumed: int,
    size_of: Callable[[Part], int],
    read: Callable[[str, int, int], Iterator[dict]],
) -> tuple[dict[int, dict], Iterator[Part], int]:
    """The samples at the ``wanted`` positions (sorted, all below ``consumed``) of a source (a placeholder
    where one cannot be read), its parts from position ``consumed`` on, and the index of the first."""
    got: dict[int, dict] = {}
    start, j, index = 0, 0, -1
    for index, (url, first, stop) in enumerate(parts):  # noqa: B007 - the last index is returned
        end = start + size_of((url, first, stop))
        here = []
        while j < len(wanted) and wanted[j] < end:
            here.append(wanted[j])
            j += 1
        if here:
            keep = set(here)
            for k, sample in enumerate(read(url, first + here[0] - start, first + here[-1] - start + 1), here[0]):
                if k in keep:
                    got[k] = sample
            for k in here:
                got.setdefault(k, {"__missing__": True, "__key__": f"{url} sample {first + k - start}", "__url__": url})
        if consumed < end:
            return got, itertools.chain([(url, first + consumed - start, stop)], parts), index
        start = end
    return got, iter(()), index + 1
