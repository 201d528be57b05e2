import itertools
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import demo_samples, write_shards

from largemim.data.augment import TrainAugment
from largemim.data.sources import count_samples, expand_shards
from largemim.data.stream import ShardStream, StreamSpec, build_train_loader

AUG = TrainAugment(16, (0.2, 1.0), (0.5,) * 3, (0.5,) * 3)


def spec(urls, rank=0, world=2, mb=8, per_epoch=7, seed=3):
    return StreamSpec(tuple(urls), mb, per_epoch, rank, world, seed, shuffle_buffer=40)


def take(urls, n, start=0, workers=0, **kw):
    loader = build_train_loader(spec(urls, **kw), AUG, workers, start, pin=False)
    return list(itertools.islice(iter(loader), n))


def test_manifest_counts_and_brace_expansion(shard_set):
    urls = expand_shards(shard_set)
    assert len(urls) == 5 and count_samples(urls) == 640
    with pytest.raises(FileNotFoundError, match=r"1 of 6 shards .* do not exist, e.g. '.*shard-000005.tar'"):
        expand_shards(shard_set.replace("000004", "000005"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_identical_batch_stream(shard_set, workers):
    urls = expand_shards(shard_set)
    full = take(urls, 18, workers=workers)  # crosses two epoch boundaries (7 per epoch)
    assert [b.index for b in full] == list(range(18))
    for start in (5, 7, 11):
        resumed = take(urls, 18 - start, start=start, workers=workers)
        assert [b.index for b in resumed] == list(range(start, 18))
        for a, b in zip(full[start:], resumed, strict=False):
            assert torch.equal(a.images, b.images)


def test_epochs_differ_and_ranks_differ(shard_set):
    urls = expand_shards(shard_set)
    r0, r1 = take(urls, 14, rank=0), take(urls, 14, rank=1)
    assert not torch.equal(r0[0].images, r1[0].images)
    assert not torch.equal(r0[0].images, r0[7].images)


def test_ranks_and_workers_get_disjoint_shards_and_no_one_hangs(shard_set):
    urls = expand_shards(shard_set)
    slots = [
        ShardStream(spec(urls, rank=r), AUG).shards_for(epoch=0, lane=w, workers=2) for r in range(2) for w in range(2)
    ]
    flat = [u for s in slots for u in s]
    assert len(flat) == len(set(flat)) == 5 and all(slots)
    # Uneven shards (80..200 samples): every rank still yields the same number of batches per epoch,
    # re-reading its shards when they run out, so two epochs finish on both ranks.
    for rank in range(2):
        batches = take(urls, 2 * 30, rank=rank, workers=2, per_epoch=30)
        assert [b.index for b in batches] == list(range(60))
        assert all(b.images.shape == (8, 3, 16, 16) for b in batches)


def test_corrupt_members_and_truncated_tar_are_skipped_and_counted(tmp_path):
    good = demo_samples("train", 60)
    bad = [
        {"__key__": "bad_png", "png": b"\x89PNG\r\n\x1a\nnot really a png", "cls": b"1"},
        {"__key__": "empty", "png": b"", "cls": b"2"},
        {"__key__": "no_image", "txt": b"just text"},
    ]
    samples = good[:20] + bad + good[20:]
    pattern = write_shards(tmp_path, samples, [33, 30])
    urls = expand_shards(pattern)
    # Truncate the second shard in the middle of a member.
    second = Path(urls[1])
    second.write_bytes(second.read_bytes()[: len(second.read_bytes()) // 2 + 100])
    batches = take(urls, 12, world=1, per_epoch=6)
    assert all(b.images.shape == (8, 3, 16, 16) and torch.isfinite(b.images).all() for b in batches)
    skipped = sum(b.skipped for b in batches)
    assert skipped >= 3 * 2  # the three bad samples, in each of two epochs, plus the truncated tar's error


def test_shard_that_cannot_be_read_at_all_is_a_clear_error(tmp_path):
    path = tmp_path / "empty-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "x", "txt": b"no images here"})
    loader = build_train_loader(spec([str(path)], world=1), AUG, 0, 0, pin=False)
    with pytest.raises(RuntimeError):
        next(iter(loader))
