"""Tar-shard stream for training: deterministic, equal batch counts on every rank, resumable.

Stages, per (rank, loader worker):
  shards -> this epoch's share -> samples (tar members grouped by key) -> seeded shuffle buffer
  -> skip what a resumed run already consumed -> decode + augment -> batch.

A rank's data is split into ``workers`` lanes: micro-batch ``b`` is made from lane ``b % workers``'s
sample stream. Every shuffle and every crop draws from an RNG seeded by (seed, epoch, rank, lane[,
sample]), so a batch's content is a function of the config and ``b`` alone. A DataLoader with
``batch_size=None`` takes items from its workers in turn, starting with worker 0, so worker ``w``
serves lane ``(start + w) % workers``; resuming at micro-batch ``start`` restarts each lane at its own
next batch, skipping the samples it had consumed without decoding them. The same number of workers
must be used after a resume (it is saved in the checkpoint and checked).

Every rank yields exactly ``micro_batches_per_epoch`` batches per data epoch: a worker whose shards
run out before its share of batches is full reads its shards again in a new order, so no rank waits
for another at the end of an epoch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from largemim.data.augment import TrainAugment, image_bytes

log = logging.getLogger(__name__)


@dataclass
class Batch:
    index: int  # this rank's micro-batch number since the start of the run
    images: torch.Tensor  # (micro_batch, 3, H, W), normalised float32
    skipped: int  # samples this worker skipped as undecodable since its previous batch


@dataclass(frozen=True)
class StreamSpec:
    urls: tuple[str, ...]
    micro_batch: int
    micro_batches_per_epoch: int
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int


class _SkipCounter:
    """A webdataset handler that skips a broken shard member and counts it."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping unreadable data: %s", exn)
        return True


class ShardStream(IterableDataset):
    def __init__(self, spec: StreamSpec, augment: TrainAugment, start_batch: int = 0):
        super().__init__()
        self.spec, self.augment, self.start_batch = spec, augment, start_batch
        self._errors = _SkipCounter()

    # -- which shards a (rank, worker) reads in an epoch
    def shards_for(self, epoch: int, lane: int, workers: int) -> list[str]:
        s = self.spec
        order = list(s.urls)
        random.Random(f"{s.seed}-shards-{epoch}").shuffle(order)
        slots = s.world_size * workers
        slot = s.rank * workers + lane
        mine = order[slot::slots]
        if not mine:  # fewer shards than ranks x workers: share shards rather than hang
            mine = [order[slot % len(order)]]
        return mine

    def _raw_samples(self, epoch: int, lane: int, workers: int) -> Iterator[dict]:
        """A lane's samples of an epoch, shuffled, endless (re-reads its shards in a new order)."""
        s = self.spec
        shards = self.shards_for(epoch, lane, workers)

        def endless() -> Iterator[dict]:
            for cycle in range(1 << 30):
                order = list(shards)
                random.Random(f"{s.seed}-cycle-{epoch}-{s.rank}-{lane}-{cycle}").shuffle(order)
                got = 0
                for sample in wds.tarfile_samples([{"url": u} for u in order], handler=self._errors):
                    got += 1
                    yield sample
                if got == 0:
                    raise RuntimeError(f"shards {order} hold no readable sample; check data.shards")

        rng = random.Random(f"{s.seed}-shuffle-{epoch}-{s.rank}-{lane}")
        yield from wds.filters._shuffle(endless(), bufsize=s.shuffle_buffer, initial=s.shuffle_buffer, rng=rng)

    def _decode(self, sample: dict, rng: np.random.Generator) -> torch.Tensor | None:
        data = image_bytes(sample)
        try:
            if data is None:
                raise ValueError(f"no image member (keys: {sorted(k for k in sample if not k.startswith('_'))})")
            return self.augment(data, rng)
        except Exception as exn:  # noqa: BLE001 - any undecodable sample is skipped and counted
            self._errors(ValueError(f"{sample.get('__url__')}: sample {sample.get('__key__')!r}: {exn}"))
            return None

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        s = self.spec
        per_epoch = s.micro_batches_per_epoch
        b = self.start_batch + worker  # the first batch this worker serves
        lane = b % workers
        while True:
            epoch, offset = divmod(b, per_epoch)
            # how many of this lane's batches come earlier in the epoch: they are skipped undecoded
            first = (lane - epoch * per_epoch) % workers
            done = 0 if offset <= first else (offset - first - 1) // workers + 1
            samples = self._raw_samples(epoch, lane, workers)
            position = 0
            for _ in range(done * s.micro_batch):
                next(samples)
                position += 1
            while b // per_epoch == epoch:
                skipped_before = self._errors.count
                images = []
                for _ in range(s.micro_batch):  # a batch is always micro_batch raw samples: exact resume
                    image = self._decode(next(samples), np.random.default_rng([s.seed, epoch, s.rank, lane, position]))
                    position += 1
                    images.append(image)
                good = [im for im in images if im is not None]
                while not good:  # a whole batch undecodable: read on (the rare case resume cannot replay)
                    image = self._decode(next(samples), np.random.default_rng([s.seed, epoch, s.rank, lane, position]))
                    position += 1
                    good = [image] if image is not None else []
                # An undecodable sample's place is taken by a good one of the same batch.
                images = [im if im is not None else good[i % len(good)] for i, im in enumerate(images)]
                yield Batch(b, torch.stack(images), self._errors.count - skipped_before)
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
    )
