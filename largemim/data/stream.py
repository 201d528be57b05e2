"""Tar-shard stream for training: deterministic, equal batch counts on every rank, resumable.

Stages, per (rank, loader worker):
  shards -> this epoch's share -> samples (tar members grouped by key) -> seeded shuffle buffer
  -> skip what a resumed run already consumed -> decode + augment -> batch.

A rank's data is split into ``L`` lanes (``data.lanes``, default one per loader worker): micro-batch
``b`` is made from lane ``b % L``'s sample stream. Every shuffle and every crop draws from an RNG seeded
by (seed, epoch, rank, lane[, sample]), so a batch's content is a function of the config, ``L`` and
``b`` alone, not of the number of workers. A DataLoader with ``batch_size=None`` takes items from its
``W`` workers in turn, starting with worker 0, so worker ``w`` serves batches ``start + w + kW``; with
``W`` dividing ``L`` these are exactly the batches of lanes ``(start + w) % W (mod W)``, so each lane is
read by one worker only. Resuming at micro-batch ``start`` restarts each lane at its own next batch,
without reading the samples it had consumed where the manifests give each shard's count (the
shuffle buffer is rebuilt from sample positions and only its samples are read back:
:mod:`largemim.data.shuffle`), else reading past them without decoding; with ``data.lanes`` set, a run may resume
with any number of workers that divides it.

Two ways to choose shards (``data.sampling``):

* ``resampled`` (default): each lane draws shards with replacement from an RNG seeded by (seed, epoch,
  rank, lane); a data epoch is ``data.num_samples`` samples (default: the manifests' total). Several
  ``::``-separated shard sets are mixed per sample with ``data.weights``.
* ``exact``: each epoch, the shards are shuffled with (seed, epoch) and laid end to end; each (rank,
  lane) is dealt the run of samples its batches of the epoch need, in order, so a deal may begin or end
  inside a shard (its head is read past without decoding). A lane reads its deal once, through the
  shuffle buffer, before it reads any of it again. Every sample is read once per epoch, but for the
  ``N mod (ranks x micro_batch)`` left over at the end of the order, which the shuffle changes from
  epoch to epoch. This needs each shard's sample count (the manifests); without them whole shards are
  dealt and the epoch is only nearly exact, and fewer shards than ranks x lanes is an error at start-up
  (:func:`check_exact_split`).

Either way every rank yields exactly ``micro_batches_per_epoch`` batches per data epoch, so no rank waits
for another at the end of an epoch (webdataset#188, #303). A lane whose deal runs short (a truncated or
unreadable shard) reads it again in a new order; one whose deal gives nothing at all reads the whole
epoch's order instead, from its own starting point, and only a data set none of which can be read
stops the run.

A read that fails (a ``pipe:``/``http`` reader, an I/O error on a local file) is tried ``open_retries``
times in all, skipping the samples already given (the stream stays exact); then the rest of the shard is
skipped with a warning naming it.
A truncated tar is read up to the damage, and a shard shorter than its manifest says is counted as
truncated; an undecodable member is skipped and counted.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from largemim.data.augment import TrainAugment, image_bytes
from largemim.data.device_decode import EncodedImages
from largemim.data.readers import ReaderFailed, open_shard
from largemim.data.shuffle import ENDLESS, Part, ShuffleBuffer, fast_forward
from largemim.data.sources import is_local

log = logging.getLogger(__name__)


def _nothing_readable(limit: int, url: str) -> RuntimeError:
    return RuntimeError(f"{limit} shards in a row gave no readable sample (last: {url}); check data.shards")


class _CutPart(tuple):
    """A part cut where a read before the resume point ended; ``original`` is the part it was cut from."""

    def __new__(cls, part: Part, original: Part):
        self = super().__new__(cls, part)
        self.original = original
        return self


# A read of a lane's part that came up short (a truncated, damaged or unreachable shard): (epoch, lane, set,
# the part's index in the lane's sequence, the sample of the shard the read ended at). Later positions of
# the lane's input move with it, so a resume rebuilds the lane from the counts with these parts cut there.
Shortfall = tuple[int, int, int, int, int]


@dataclass
class Batch:
    index: int  # this rank's micro-batch number since the start of the run
    images: torch.Tensor | EncodedImages  # (micro_batch, 3, H, W) uint8 pixels, normalised on the training
    # device (augment.Normalise), or files to decode there (data.decode=device)
    skipped: int  # samples this worker skipped as undecodable since its previous batch
    shortfalls: tuple = ()  # reads that came up short since then (Shortfall): they move the lane's later
    # positions, so the trainer saves them and a resume rebuilds the lane with them (StreamSpec.shortfalls)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin thread (``pin_memory=True``), which passes dataclasses through
        unpinned otherwise; files for device decoding stay where they are (nvJPEG reads host memory)."""
        if isinstance(self.images, torch.Tensor):
            return Batch(self.index, self.images.pin_memory(), self.skipped, self.shortfalls)
        return self


@dataclass(frozen=True)
class StreamSpec:
    sets: tuple[tuple[str, ...], ...]  # one tuple of shard URLs per '::'-separated set
    micro_batch: int
    micro_batches_per_epoch: int
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int
    sampling: str = "resampled"
    weights: tuple[float, ...] = field(default_factory=tuple)  # per set; empty = by samples (else shards)
    open_retries: int = 3
    lanes: int = 0  # sample streams per rank; 0 = one per loader worker (a multiple of the workers otherwise)
    expected: Mapping[str, int] = field(default_factory=dict)  # samples per shard, from the manifests
    shortfalls: Mapping[tuple[int, int, int, int], int] = field(default_factory=dict)  # this rank's reads that
    # came up short before the resume point: (epoch, lane, set, part index) -> the sample the read ended at

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(u for s in self.sets for u in s)


def check_exact_split(num_shards: int, world_size: int, lanes_per_rank: int) -> None:
    """Exact epochs deal whole shards to ranks x lanes: there must be at least one shard per lane."""
    lanes = world_size * max(1, lanes_per_rank)
    if num_shards < lanes:
        raise ValueError(
            f"data.sampling=exact needs at least one shard per loader lane: {world_size} ranks x "
            f"{max(1, lanes_per_rank)} lanes = {lanes} shards, but the set has {num_shards}. Write more, smaller "
            "shards (tools/make_shards.py), lower data.workers (or data.lanes), or use data.sampling=resampled"
        )


class _SkipCounter:
    """Counts the samples skipped as unreadable (a webdataset handler for one broken sample)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.add(1, f"skipping unreadable data: {exn}")
        return True

    def add(self, samples: int, message: str) -> None:
        self.count += samples
        log.warning("%s", message)


def _tagged(files: Iterator[dict], url: str) -> Iterator[dict]:
    for f in files:
        f["__url__"] = url
        yield f


@dataclass
class _LaneCursor:
    """Where one lane's sample stream stands: its epoch, the samples read, the batch it is ready for."""

    epoch: int
    samples: Iterator[dict]
    position: int
    next_batch: int


class ShardStream(IterableDataset):
    def __init__(self, spec: StreamSpec, augment: TrainAugment, start_batch: int = 0):
        super().__init__()
        self.spec, self.augment, self.start_batch = spec, augment, start_batch
        self._errors = _SkipCounter()
        self._shortfalls: list[Shortfall] = []  # as they happen
        self._overrun: set[str] = set()  # shards found longer than their manifest (warned once)

    # -- which shards a (rank, worker) reads in an epoch
    def _epoch_order(self, epoch: int) -> list[str]:
        """Exact mode: the epoch's shard order, the same on every rank."""
        order = list(self.spec.urls)
        random.Random(f"{self.spec.seed}-shards-{epoch}").shuffle(order)
        return order

    def shards_for(self, epoch: int, lane: int, lanes: int) -> list[str]:
        s = self.spec
        order = self._epoch_order(epoch)
        slots = s.world_size * lanes
        slot = s.rank * lanes + lane
        mine = order[slot::slots]
        if not mine:  # fewer shards than ranks x lanes: share shards rather than hang
            mine = [order[slot % len(order)]]
        return mine

    def parts_for(self, epoch: int, lane: int, lanes: int) -> list[tuple[str, int, int | None]]:
        """Exact mode: this (rank, lane)'s deal of the epoch as (url, first, stop) sample ranges (stop None:
        to the shard's end): the run of the epoch's shard order that its batches need, after the runs of
        the slots before it (ranks, then lanes). Whole shards (``shards_for``) where a count is unknown."""
        s = self.spec
        if any(u not in s.expected for u in s.urls):
            return [(u, 0, None) for u in self.shards_for(epoch, lane, lanes)]
        order = self._epoch_order(epoch)
        per_epoch = s.micro_batches_per_epoch

        def need(ln: int) -> int:  # samples lane ln's batches of this epoch take (one rank)
            first = (ln - epoch * per_epoch) % lanes
            return 0 if first >= per_epoch else ((per_epoch - first - 1) // lanes + 1) * s.micro_batch

        total = sum(s.expected[u] for u in order)
        want = need(lane)
        if not want or not total:
            return []
        # data.num_samples larger than the shards hold: the order wraps around
        pos = (s.rank * sum(need(ln) for ln in range(lanes)) + sum(need(ln) for ln in range(lane))) % total
        parts = []
        while want > 0:
            offset = 0
            for url in order:
                n = s.expected[url]
                lo, hi = max(pos, offset), min(pos + want, offset + n)
                if lo < hi:
                    parts.append((url, lo - offset, None if hi - offset == n else hi - offset))
                offset += n
            want -= min(total, pos + want) - pos
            pos = 0
        return parts

    def _samples_of(
        self, parts: Iterator[Part], dead: set, tag: tuple[int, int, int] | None = None, start: int = 0
    ) -> Iterator[dict]:
        """The samples of each (url, first, stop) range in turn. ``dead``: the ranges that gave nothing,
        one lane's for one epoch: passed over without another try, and not counted again; an outage while
        a remote shard is opened costs that range one epoch, not the run. ``tag``: (epoch, lane, set) of a
        sequence a resume may rebuild, whose parts are numbered from ``start``: a read that comes up short
        is recorded as a :data:`Shortfall`."""
        for j, part in enumerate(parts, start):
            key = getattr(part, "original", part)  # a cut part is dead (or made dead) as the part it was cut from
            if key in dead or (part[2] is not None and part[2] <= part[1]):
                continue  # dead, or a range cut to nothing (:meth:`_cut`): not opened
            where = None if tag is None else (*tag, j)
            yield from self._shard_samples(*part, dead=dead, where=where, key=key)

    def _read_back(self, url: str, first: int, stop: int) -> Iterator[dict]:
        """A resumed lane's buffered samples (:func:`fast_forward` counts the ones it cannot read)."""
        return self._shard_samples(url, first, stop, count=False)

    def _shard_samples(
        self,
        url: str,
        first: int = 0,
        stop: int | None = None,
        dead: set | None = None,
        count: bool = True,
        where: tuple[int, int, int, int] | None = None,
        key: Part | None = None,
    ) -> Iterator[dict]:
        """Samples ``first`` to ``stop`` (None: the end) of one shard, in order; the ones before ``first``
        are read past without decoding. A failing read (a ``pipe:`` command or curl that cannot start,
        exits non-zero or breaks off; an I/O error on a local file) is restarted up to ``open_retries``
        times, skipping the samples already given, so a transient error changes nothing. Each sample is
        given only once the next one has begun, and the last only once the read ended well: a read broken
        off between two members of a sample never gives that sample half-made. A damaged tar (not an I/O
        error) is not read again. What could not be read is skipped with one warning and counted (the
        samples of the range the manifest says are missing, else one); a range that gave no sample is
        added to ``dead``. ``count`` False: a failure is logged, not counted. With the shard's count known
        the read ends there: a longer shard's extra samples would move every later position (warned)."""
        attempts = max(1, self.spec.open_retries)
        expected = self.spec.expected.get(url)
        part_stop, capped = stop, stop is None and expected is not None
        stop = expected if capped else stop
        limit = stop  # the samples this read should end with (None: unknown)
        given, error, recorded = first, None, False
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(min(2.0 ** (attempt - 2), 10.0))
            reader, read, held = None, 0, None

            def repeated_member(exn: Exception) -> bool:
                # A member repeated within a sample is skipped and counted (once: not again while a
                # restarted read replays the samples already given); the rest of the shard is read.
                return self._errors(exn) if read >= given and count else True  # noqa: B023 - the current counts

            try:
                reader = open_shard(url)
                files = wds.tariterators.tar_file_iterator(reader.stream, handler=wds.reraise_exception)
                cut = False
                for sample in wds.tariterators.group_by_keys(_tagged(files, url), handler=repeated_member):
                    read += 1
                    if read <= given:
                        continue  # a restarted read: given before (or before this range)
                    if held is not None:
                        given += 1
                        yield held
                    if stop is not None and given >= stop:
                        held, cut = None, True
                        break  # the range is complete: the reader is ended below, mid-shard
                    held = sample
                else:
                    reader.finish()  # a reader's exit status, once it has sent everything
                if held is not None:
                    given += 1
                    if limit is not None and given < limit and count and where is not None:
                        self._shortfalls.append((*where, given))  # before the last sample goes: with it
                        recorded = True
                    yield held
                if not cut:
                    reader = None  # it ended by itself
                error = None
                break
            except Exception as exn:  # noqa: BLE001 - any read failure is retried, then skipped and counted
                status = reader.exit_status() if reader is not None and not isinstance(exn, ReaderFailed) else None
                # the tar parser fails first when a reader dies (an "empty file"): name the reader's failure
                error = ReaderFailed(f"the reader exited with status {status} ({exn})") if status else exn
                log.info("shard %s: attempt %d of %d failed after %d samples: %s", url, attempt, attempts, read, exn)
                if is_local(url) and not isinstance(exn, OSError):
                    break  # a damaged file reads the same way again
            finally:
                if reader is not None:
                    reader.abandon()  # stopped early (failure, or the lane moved on): end the reader now

        if capped and error is None and cut and url not in self._overrun:
            self._overrun.add(url)
            log.warning("shard %s holds more samples than the %d its manifest lists: the rest are not read "
                        "(tools/write_manifest.py counts it again)", url, expected)  # fmt: skip

        def report(samples: int, message: str) -> None:
            if not count:
                log.warning("%s", message)
                return
            self._errors.add(samples, message)
            if where is not None and not recorded:
                self._shortfalls.append((*where, given))

        if error is not None:
            missing = limit - given if limit is not None and limit > given else 1
            done = (
                f"samples {first}-{limit or 'end'}: read {given - first}"
                if first or part_stop is not None
                else f"read {given} samples"
            )
            report(missing, f"shard {url} ({done}, then failed: {error}); the rest is skipped")
        elif limit is not None and given < limit:
            report(
                limit - given,
                f"shard {url} ends after {read} of the {expected} samples its manifest lists: the "
                "file is truncated (rewrite it with tools/make_shards.py)",
            )
        if given == first and (error is not None or (limit is not None and limit > first)) and dead is not None:
            dead.add(key or (url, first, part_stop))  # gave nothing: passed over for the rest of the lane's epoch

    def _shard_order(self, epoch: int, lane: int, set_index: int) -> Iterator[str]:
        """Resampled mode: the endless sequence of shards a lane draws in an epoch (from one set, when mixing)."""
        s = self.spec
        urls = s.sets[set_index]
        rng = random.Random(f"{s.seed}-resample-{epoch}-{s.rank}-{lane}-{set_index}")
        while True:
            yield urls[rng.randrange(len(urls))]

    def _exact_samples(self, epoch: int, lane: int, lanes: int, skip: int = 0) -> Iterator[dict]:
        """Exact mode: the lane's deal, read in a seeded order and shuffled one pass at a time, then again in
        a new order if the lane runs short. The buffer drains at the end of each pass, so a re-read sample
        never takes the place of one not yet read; endless. From the ``skip``-th sample on: where the counts
        are known, passes read whole before it are passed over and the one it falls in is fast-forwarded,
        else the samples before it are read past."""
        s = self.spec
        parts = self.parts_for(epoch, lane, lanes)
        fallback, dead, drop = False, set(), skip
        for cycle in range(1 << 30):
            order = list(parts)
            if cycle:  # the first pass keeps the deal's order, so neighbouring lanes' reads rarely overlap
                random.Random(f"{s.seed}-cycle-{epoch}-{s.rank}-{lane}-{cycle}").shuffle(order)
            rng = random.Random(f"{s.seed}-shuffle-{epoch}-{s.rank}-{lane}" + (f"-{cycle}" if cycle else ""))
            buffer, read = ShuffleBuffer(s.shuffle_buffer, rng), 0
            tag = (epoch, lane, cycle)  # (exact mode: the pass in the shortfalls' set slot)
            listed, gone = self._cut(iter(order), self._cuts(*tag))  # as the reads before a resume point found them
            cut = list(listed)
            samples = self._samples_of(iter(cut), dead, tag)
            if drop and self._counted([u for u, _, _ in order]):
                total = sum(map(self._part_size, cut))
                if drop >= total:  # a pass read whole before the resume point (the buffer drains at its end)
                    samples, read, drop = iter(()), total, drop - total
                else:
                    sources, back, lost = [functools.partial(iter, cut)], self._read_back, self._errors.add
                    [(rest, j)] = fast_forward(buffer, sources, [total], lambda: 0, drop, self._part_size, back, lost)
                    samples, read, drop = self._samples_of(rest, dead, tag, j), drop, 0
            for sample in buffer.run(samples):
                read += 1
                if drop:
                    drop -= 1
                    continue
                yield sample
            dead.update(gone)  # as the reads before the resume point left it for the next pass
            if read:
                continue
            if fallback:
                raise RuntimeError(
                    f"none of the {len(s.urls)} shards gave a readable sample this epoch (e.g. {s.urls[0]}); check "
                    "data.shards and the warnings above"
                )
            # Nothing in this lane's deal could be read: go on with the whole epoch's shards (repeats, and
            # skipped samples counted) rather than stop every rank over one bad shard.
            log.warning("the shards dealt to rank %d lane %d gave no readable sample: it reads the epoch's other "
                        "shards instead", s.rank, lane)  # fmt: skip
            everything = self._epoch_order(epoch)
            turn = (s.rank * lanes + lane) % len(everything)
            parts, fallback = [(u, 0, None) for u in everything[turn:] + everything[:turn]], True

    def _draws(self, epoch: int, lane: int, set_index: int) -> Iterator[Part]:
        """Resampled mode: a lane's shard sequence of an epoch (from one set, when mixing), as whole shards."""
        return ((url, 0, None) for url in self._shard_order(epoch, lane, set_index))

    def _cut_draws(self, epoch: int, lane: int, set_index: int) -> Iterator[Part]:
        """The draws as the reads before the resume point found them (:data:`Shortfall`); endless, or an
        error where the cuts leave nothing to read (the run they came from stopped there too)."""
        parts, _ = self._cut(self._draws(epoch, lane, set_index), self._cuts(epoch, lane, set_index))
        empty, limit = 0, self._empty_limit()
        for part in parts:
            empty = empty + 1 if part[2] == part[1] else 0
            if empty > limit:
                raise _nothing_readable(limit, part[0])
            yield part

    def _cuts(self, epoch: int, lane: int, slot: int) -> dict[int, int]:
        """This lane's shortfalls before the resume point, by part index: of one set's draws (resampled) or
        of one pass (exact)."""
        here = (epoch, lane, slot)
        return {j: end for (e, ln, si, j), end in self.spec.shortfalls.items() if (e, ln, si) == here}

    @staticmethod
    def _cut(parts: Iterator[Part], cuts: dict[int, int]) -> tuple[Iterator[Part], set]:
        """``parts`` with part ``j`` cut at ``cuts[j]``; a part that gave nothing is dead from there on (it
        was passed over, unread, wherever it came again in the run the cuts were recorded in: an empty
        range here). Also the set of those dead parts, filled as the parts are listed."""
        gone: set = set()

        def listed() -> Iterator[Part]:
            for j, (url, first, stop) in enumerate(parts):
                if (url, first, stop) in gone:
                    yield url, first, first
                elif j in cuts:
                    if cuts[j] == first:
                        gone.add((url, first, stop))
                    yield _CutPart((url, first, cuts[j]), (url, first, stop))
                else:
                    yield url, first, stop

        return listed(), gone

    def _endless(self, parts: Iterator[Part], tag: tuple[int, int, int], start: int = 0) -> Iterator[dict]:
        """Samples of the lane's shard sequence; a clear error (never a silent spin) when shard after
        shard yields nothing."""
        empty_in_a_row = [0]
        limit = self._empty_limit()

        def counted(parts: Iterator[Part]) -> Iterator[Part]:
            for part in parts:
                if empty_in_a_row[0] >= limit:
                    raise _nothing_readable(limit, part[0])
                empty_in_a_row[0] += 1
                yield part

        for sample in self._samples_of(counted(parts), set(), tag, start):  # one lane's, for one epoch
            empty_in_a_row[0] = 0
            yield sample

    def _raw_samples(self, epoch: int, lane: int, lanes: int, skip: int = 0) -> Iterator[dict]:
        """A lane's samples of an epoch (resampled: mixed across sets by weight), shuffled, from its
        ``skip``-th on (:mod:`largemim.data.shuffle`: without reading the ones before where each shard's
        count is known, else read past undecoded); endless."""
        s = self.spec
        if s.sampling == "exact":
            yield from self._exact_samples(epoch, lane, lanes, skip)
            return
        sources = [functools.partial(self._cut_draws, epoch, lane, i) for i in range(len(s.sets))]
        choose = lambda: 0  # noqa: E731 - one set
        if len(s.sets) > 1:
            weights = list(s.weights) if s.weights else self._set_sizes()
            rng = random.Random(f"{s.seed}-mix-{epoch}-{s.rank}-{lane}")
            choose = lambda: rng.choices(range(len(s.sets)), weights)[0]  # noqa: E731
        buffer = ShuffleBuffer(s.shuffle_buffer, random.Random(f"{s.seed}-shuffle-{epoch}-{s.rank}-{lane}"))
        parts = [(draws(), 0) for draws in sources]  # (cut: replayed as read)
        if skip and self._counted(s.urls) and all(sum(s.expected[u] for u in urls) for urls in s.sets):
            ends, read = [ENDLESS] * len(sources), self._read_back
            parts = fast_forward(buffer, sources, ends, choose, skip, self._part_size, read, self._errors.add)
            skip = 0
        streams = [self._endless(p, (epoch, lane, i), j) for i, (p, j) in enumerate(parts)]
        mixed = streams[0] if len(streams) == 1 else (next(streams[choose()]) for _ in iter(int, 1))
        yield from itertools.islice(buffer.run(mixed), skip, None)

    def _empty_limit(self) -> int:
        """Resampled mode: shards in a row that give nothing before a lane stops (never a silent spin)."""
        return 2 * len(self.spec.urls) + 8

    def _counted(self, urls) -> bool:
        """Whether every one of these shards' sample count is known (their manifests)."""
        return all(u in self.spec.expected for u in urls)

    def _part_size(self, part: Part) -> int:
        url, first, stop = part
        return (stop if stop is not None else self.spec.expected[url]) - first

    def _set_sizes(self) -> list[int]:
        """Default mixing weights: each set's samples (so every sample is as likely as any other), or its
        shard count where a count is unknown (no manifest)."""
        s = self.spec
        if all(u in s.expected for u in s.urls):
            return [sum(s.expected[u] for u in urls) for urls in s.sets]
        return [len(urls) for urls in s.sets]

    def _decode(self, sample: dict, rng: np.random.Generator):
        if sample.get("__missing__"):
            return None  # a buffered sample a resumed lane could not read back (counted by that read)
        data = image_bytes(sample)
        try:
            if data is None:
                raise ValueError(f"no image member (keys: {sorted(k for k in sample if not k.startswith('_'))})")
            return self.augment(data, rng)
        except Exception as exn:  # noqa: BLE001 - any undecodable sample is skipped and counted
            self._errors(ValueError(f"{sample.get('__url__')}: sample {sample.get('__key__')!r}: {exn}"))
            return None

    def _lane_batches_before(self, lane: int, b: int, lanes: int) -> int:
        """How many of ``lane``'s batches come before batch ``b`` in b's epoch (skipped undecoded on resume)."""
        per_epoch = self.spec.micro_batches_per_epoch
        epoch, offset = divmod(b, per_epoch)
        first = (lane - epoch * per_epoch) % lanes
        return 0 if offset <= first else (offset - first - 1) // lanes + 1

    def _batch(self, b: int, cursor: _LaneCursor, lane: int) -> Batch:
        s = self.spec
        rng = lambda: np.random.default_rng([s.seed, cursor.epoch, s.rank, lane, cursor.position])  # noqa: E731
        skipped_before, shortfalls_before = self._errors.count, len(self._shortfalls)
        images = []
        for _ in range(s.micro_batch):  # a batch is always micro_batch raw samples: exact resume
            images.append(self._decode(next(cursor.samples), rng()))
            cursor.position += 1
        good = [im for im in images if im is not None]
        extra = 0
        while not good:  # a whole batch undecodable: read on (the rare case resume cannot replay)
            if extra >= 16 * s.micro_batch:
                raise RuntimeError(
                    f"{s.micro_batch + extra} samples in a row could not be decoded (see the warnings); "
                    "check data.shards"
                )
            image = self._decode(next(cursor.samples), rng())
            cursor.position += 1
            extra += 1
            good = [image] if image is not None else []
        # An undecodable sample's place is taken by a good one of the same batch.
        images = [im if im is not None else good[i % len(good)] for i, im in enumerate(images)]
        collate = getattr(self.augment, "collate", torch.stack)  # DeviceDecodeAugment keeps the files
        shortfalls = tuple(self._shortfalls[shortfalls_before:])
        return Batch(b, collate(images), self._errors.count - skipped_before, shortfalls)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        s = self.spec
        lanes = s.lanes or workers
        if lanes % workers:
            raise ValueError(f"data.lanes={lanes} must be a multiple of data.workers={workers}")
        cursors: dict[int, _LaneCursor] = {}
        b = self.start_batch + worker  # the first batch this worker serves; then every workers-th
        while True:
            epoch, lane = b // s.micro_batches_per_epoch, b % lanes
            cursor = cursors.get(lane)
            if cursor is None or cursor.epoch != epoch or cursor.next_batch != b:
                skip = self._lane_batches_before(lane, b, lanes) * s.micro_batch
                samples = self._raw_samples(epoch, lane, lanes, skip)
                cursor = cursors[lane] = _LaneCursor(epoch, samples, skip, b)
            yield self._batch(b, cursor, lane)
            cursor.next_batch = b + lanes  # this lane's next batch (the next epoch's deal if past the end)
            b += workers


def build_train_loader(spec: StreamSpec, augment: TrainAugment, workers: int, start_batch: int, pin: bool):
    """An endless iterator of :class:`Batch` starting at this rank's micro-batch ``start_batch``."""
    dataset = ShardStream(spec, augment, start_batch)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=functools.partial(_worker_signals, os.getpid()) if workers > 0 else None,
    )


def _worker_signals(rank_pid: int, worker_id: int) -> None:
    """Slurm signals every process of a job step: the time-limit warning (``--signal``, USR1/USR2) and,
    on ``scancel``, preemption or the hard limit, SIGTERM. A worker leaves the stop to its rank (and the
    readers it starts shield themselves: :mod:`largemim.data.readers`).

    USR1/USR2 are ignored. SIGTERM is how the DataLoader, and multiprocessing at exit, end a worker that
    does not stop by itself, so it cannot simply be ignored (that hangs the rank's exit); torch's own
    handler exits quietly when the rank sent it but dies of any other sender's, and the rank's SIGCHLD
    handler then raises "DataLoader worker exited unexpectedly" in the middle of the step or the save it
    was about to make. So SIGTERM is blocked here and a thread takes it: from the rank (or the worker's
    parent), exit as torch does; from anyone else (Slurm, a launcher killing the process tree), ignore it:
    the worker ends with its rank, who saves first."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    parent = os.getppid()
    args = ({rank_pid, parent}, parent)
    threading.Thread(target=_take_sigterm, args=args, name="largemim-sigterm", daemon=True).start()


def _take_sigterm(senders: set[int], parent: int) -> None:
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 5.0)
        if info is None:
            if os.getppid() != parent:  # the rank died (SIGKILL, OOM): nothing left to feed; end now
                os._exit(0)
        elif info.si_pid in senders:
            os._exit(0)  # as torch's worker handler does: the rank is ending this worker
