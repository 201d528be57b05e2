import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import demo_samples, write_shards

from largemim.data.augment import TrainAugment
from largemim.data.fast_decode import FastTrainAugment
from largemim.data.sources import count_samples, expand_shards
from largemim.data.stream import ShardStream, StreamSpec, build_train_loader, check_exact_split

AUG = FastTrainAugment(16, (0.2, 1.0))


def spec(urls, rank=0, world=2, mb=8, per_epoch=7, seed=3, sampling="exact", sets=None, weights=(), retries=3, lanes=0):
    sets = sets or (tuple(urls),)
    return StreamSpec(
        tuple(map(tuple, sets)), mb, per_epoch, rank, world, seed, 40, sampling, tuple(weights), retries, lanes
    )


def take(urls, n, start=0, workers=0, aug=AUG, **kw):
    loader = build_train_loader(spec(urls, **kw), aug, workers, start, pin=False)
    return list(itertools.islice(iter(loader), n))


def test_manifest_counts_and_brace_expansion(shard_set):
    urls = expand_shards(shard_set)
    assert len(urls) == 5 and count_samples(urls) == 640
    with pytest.raises(FileNotFoundError, match=r"1 of 6 shards .* do not exist, e.g. '.*shard-000005.tar'"):
        expand_shards(shard_set.replace("000004", "000005"))
    with pytest.raises(ValueError, match="set data.num_samples"):
        count_samples(["pipe:cat /x.tar"])


@pytest.mark.parametrize("sampling", ["exact", "resampled"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_identical_batch_stream(shard_set, workers, sampling):
    urls = expand_shards(shard_set)
    full = take(urls, 18, workers=workers, sampling=sampling)  # crosses two epoch boundaries (7 per epoch)
    assert [b.index for b in full] == list(range(18))
    for start in (5, 7, 11):
        resumed = take(urls, 18 - start, start=start, workers=workers, sampling=sampling)
        assert [b.index for b in resumed] == list(range(start, 18))
        for a, b in zip(full[start:], resumed, strict=True):
            assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("sampling", ["exact", "resampled"])
def test_with_lanes_set_the_stream_does_not_depend_on_the_worker_count(shard_set, sampling):
    """data.lanes=4: the same batches from 0, 1, 2 or 4 workers, and a resume may change the count."""
    urls = expand_shards(shard_set)
    ref = take(urls, 16, workers=0, sampling=sampling, lanes=4)
    assert [b.index for b in ref] == list(range(16))
    for workers in (2, 4):
        other = take(urls, 16, workers=workers, sampling=sampling, lanes=4)
        assert all(torch.equal(a.images, b.images) for a, b in zip(ref, other, strict=True)), workers
    resumed = take(urls, 7, start=9, workers=2, sampling=sampling, lanes=4)  # e.g. stopped with 4 workers
    assert all(torch.equal(a.images, b.images) for a, b in zip(ref[9:], resumed, strict=True))
    with pytest.raises(ValueError, match="data.lanes=4 must be a multiple of data.workers=3"):
        take(urls, 1, workers=3, lanes=4)


def test_epochs_differ_and_ranks_differ(shard_set):
    urls = expand_shards(shard_set)
    r0, r1 = take(urls, 14, rank=0), take(urls, 14, rank=1)
    assert not torch.equal(r0[0].images, r1[0].images)
    assert not torch.equal(r0[0].images, r0[7].images)


def test_exact_mode_deals_disjoint_shards_and_no_one_hangs(shard_set):
    urls = expand_shards(shard_set)
    deal = [
        ShardStream(spec(urls, rank=r), AUG).shards_for(epoch=0, lane=w, lanes=2) for r in range(2) for w in range(2)
    ]
    flat = [u for s in deal for u in s]
    assert len(flat) == len(set(flat)) == 5 and all(deal)
    # Uneven shards (80..200 samples): every rank still yields the same number of batches per epoch,
    # re-reading its shards when they run out, so two epochs finish on both ranks.
    for rank in range(2):
        batches = take(urls, 2 * 30, rank=rank, workers=2, per_epoch=30)
        assert [b.index for b in batches] == list(range(60))
        assert all(b.images.shape == (8, 3, 16, 16) for b in batches)


def test_exact_mode_with_too_few_shards_says_how_many_are_needed():
    check_exact_split(8, 2, 4)
    with pytest.raises(ValueError, match=r"2 ranks x 4 lanes = 8 shards, but the set has 5"):
        check_exact_split(5, 2, 4)


def test_resampled_mode_runs_with_fewer_shards_than_lanes(shard_set):
    urls = expand_shards(shard_set)[:1]
    for rank in range(2):
        assert [b.index for b in take(urls, 10, rank=rank, workers=2, sampling="resampled")] == list(range(10))


def test_mixing_weights_hold(tmp_path):
    a = write_shards(tmp_path / "a", demo_samples("train", 200), [100, 100], prefix="a")
    b = write_shards(tmp_path / "b", demo_samples("test", 200), [100, 100], prefix="b")
    sets = [expand_shards(a), expand_shards(b)]
    stream = ShardStream(spec(None, sets=sets, sampling="resampled", weights=(0.8, 0.2)), AUG)
    keys = [s["__key__"] for s in itertools.islice(stream._raw_samples(0, 0, 1), 4000)]
    share = Counter(k.split("_")[0] for k in keys)
    assert abs(share["train"] / 4000 - 0.8) < 0.03, share


def test_pipe_urls_stream_from_a_command(shard_set):
    urls = expand_shards(shard_set)
    piped = [f"pipe:cat {u}" for u in urls]
    a, b = take(urls, 6, world=1), take(piped, 6, world=1)
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b, strict=True))


def test_unopenable_shard_is_retried_then_skipped(shard_set, caplog):
    urls = [*expand_shards(shard_set), "pipe:exit 3", "/nonexistent/shard.tar"]
    batches = take(urls, 8, world=1, sampling="resampled", retries=2)
    assert [b.index for b in batches] == list(range(8))


def test_corrupt_members_and_truncated_tar_are_skipped_and_counted(tmp_path):
    good = demo_samples("train", 60)
    bad = [
        {"__key__": "bad_png", "png": b"\x89PNG\r\n\x1a\nnot really a png", "cls": b"1"},
        {"__key__": "empty", "png": b"", "cls": b"2"},
        {"__key__": "no_image", "txt": b"just text"},
    ]
    pattern = write_shards(tmp_path, good[:20] + bad + good[20:], [33, 30])
    urls = expand_shards(pattern)
    second = Path(urls[1])  # truncate the second shard in the middle of a member
    second.write_bytes(second.read_bytes()[: len(second.read_bytes()) // 2 + 100])
    batches = take(urls, 12, world=1, per_epoch=6)
    assert all(b.images.shape == (8, 3, 16, 16) and b.images.dtype == torch.uint8 for b in batches)
    assert sum(b.skipped for b in batches) >= 3 * 2  # the three bad samples in each of two epochs, and more


def test_nothing_readable_is_a_clear_error_not_a_hang(tmp_path):
    path = tmp_path / "empty-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "x", "txt": b"no images here"})
    for sampling in ("exact", "resampled"):
        with pytest.raises(RuntimeError, match="gave no readable sample|in a row could not be decoded"):
            take([str(path)], 1, world=1, sampling=sampling)


def test_reference_and_fast_decode_draw_the_same_crops(shard_set):
    urls = expand_shards(shard_set)
    ref = take(urls, 2, world=1, aug=TrainAugment(16, (0.2, 1.0)))
    fast = take(urls, 2, world=1)
    for a, b in zip(ref, fast, strict=True):  # same crop and flip; resize kernels differ by < 1 grey level
        assert (a.images.float() - b.images.float()).abs().mean() < 0.25


def test_pipe_readers_survive_the_stop_signals(shard_set):
    """Slurm signals every process before a time limit: a worker's pipe: reader that gets SIGUSR1/SIGUSR2
    must go on reading (a killed reader would cut its shard short), as the worker ignores them."""
    urls = expand_shards(shard_set)
    signalled = [f"pipe:kill -USR1 $$; kill -USR2 $$; cat {u}" for u in urls]
    plain, piped = take(urls, 6, workers=1), take(signalled, 6, workers=1)
    assert all(torch.equal(a.images, b.images) for a, b in zip(plain, piped, strict=True))
    assert sum(b.skipped for b in piped) == 0
