import contextlib
import http.server
import io
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
import webdataset as wds
from conftest import demo_samples, served, write_shards

from largemim.data.augment import TrainAugment
from largemim.data.fast_decode import FastTrainAugment
from largemim.data.readers import open_shard
from largemim.data.shuffle import ShuffleBuffer
from largemim.data.sources import count_samples, expand_shards, manifest_counts, sample_counts
from largemim.data.stream import ShardStream, StreamSpec, build_train_loader, check_exact_split

AUG = FastTrainAugment(16, (0.2, 1.0))


def spec(
    urls,
    rank=0,
    world=2,
    mb=8,
    per_epoch=7,
    seed=3,
    sampling="exact",
    sets=None,
    weights=(),
    retries=3,
    lanes=0,
    counts=True,
):
    """``counts``: the manifests' sample counts, as the trainer passes them (exact mode without them deals
    whole shards, as for shards without a manifest)."""
    sets = sets or (tuple(urls),)
    counts = manifest_counts([u for s in sets for u in s]) if counts else {}
    return StreamSpec(
        tuple(map(tuple, sets)), mb, per_epoch, rank, world, seed, 40, sampling, tuple(weights), retries, lanes, counts
    )


def breaks_once(path, cut, flag) -> str:
    """A pipe: URL whose first read sends ``cut`` bytes of the shard and fails (leaving ``flag``), and whose
    later reads send it whole: a connection dropped once."""
    return f"pipe:if [ -e {flag} ]; then cat {path}; else touch {flag}; head -c {cut} {path}; exit 1; fi"


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


def test_exact_mode_reads_the_whole_deal_before_reading_any_of_it_again(shard_set):
    """The shuffle buffer drains at the end of a pass: a lane's first len(deal) samples are each sample of
    its shards once (a buffer filled across passes let re-reads take the place of unread samples)."""
    urls = expand_shards(shard_set)
    stream = ShardStream(spec(urls, world=1, per_epoch=80), AUG)  # one rank, one lane: the deal is all 640
    keys = [x["__key__"] for x in itertools.islice(stream._raw_samples(0, 0, 1), 640 + 100)]
    assert len(set(keys[:640])) == 640
    assert set(keys[640:]) <= set(keys[:640]) and keys[640:100] != keys[:100]  # the second pass: a new order


def _epoch_keys(urls, world, lanes, mb, per_epoch, epoch=0) -> list[str]:
    """Every sample key all ranks' lanes read for their batches of ``epoch`` (undecoded)."""
    keys = []
    for rank in range(world):
        stream = ShardStream(spec(urls, rank=rank, world=world, mb=mb, per_epoch=per_epoch, lanes=lanes), AUG)
        for lane in range(lanes):
            need = sum(1 for b in range(epoch * per_epoch, (epoch + 1) * per_epoch) if b % lanes == lane) * mb
            keys += [x["__key__"] for x in itertools.islice(stream._raw_samples(epoch, lane, lanes), need)]
    return keys


@pytest.mark.parametrize("world, lanes, mb, per_epoch", [(2, 2, 8, 40), (1, 4, 16, 40), (2, 3, 8, 37), (1, 4, 16, 37)])
def test_exact_mode_reads_every_sample_once_per_epoch(shard_set, world, lanes, mb, per_epoch):
    """Deals are runs of samples, not whole shards: with uneven shards (80-200 samples) and batch counts
    that lanes do not divide, an epoch reads each sample at most once, and all but the N mod
    (ranks x micro-batch) left over (whole shards read 16 % twice and left 16 % unread)."""
    urls = expand_shards(shard_set)
    for epoch in (0, 1):
        keys = _epoch_keys(urls, world, lanes, mb, per_epoch, epoch)
        assert len(keys) == world * per_epoch * mb
        assert len(set(keys)) == len(keys), Counter(keys).most_common(3)
    if world * per_epoch * mb < 640:  # the left-over samples change with the epoch's shuffle
        assert set(_epoch_keys(urls, world, lanes, mb, per_epoch, 0)) != set(_epoch_keys(urls, world, lanes, mb,
                                                                                       per_epoch, 1))  # fmt: skip


def test_exact_mode_goes_on_past_a_lane_whose_deal_cannot_be_read(shard_set, tmp_path):
    """Zero-byte shards that are some lanes' whole deal: those lanes read the epoch's other shards instead
    (skips counted) rather than stopping every rank; a set none of which can be read is still an error."""
    folder = tmp_path / "set"
    shutil.copytree(Path(shard_set.split("{")[0]).parent, folder)
    urls = expand_shards(str(folder / Path(shard_set).name))
    for u in urls[1:]:
        Path(u).write_bytes(b"")  # the manifest still lists their 440 samples; 200 remain readable
    batches = take(urls, 85, world=1, lanes=4, mb=8, per_epoch=80)  # every sample dealt, into epoch 2
    assert [b.index for b in batches] == list(range(85))
    assert sum(b.skipped for b in batches) >= 440
    for u in urls:
        Path(u).write_bytes(b"")
    with pytest.raises(RuntimeError, match="none of the 5 shards gave a readable sample"):
        take(urls, 1, world=1, lanes=4, mb=8, per_epoch=10)


def test_a_shard_unreadable_in_one_epoch_is_read_again_in_the_next(shard_set, tmp_path):
    """A remote shard whose first opens all fail (an outage) is passed over for the rest of that lane's
    epoch, counted once, and read again in the next epoch (it had been dropped for the whole run)."""
    url = expand_shards(shard_set)[4]  # 80 samples
    count = tmp_path / "opens"
    flaky = f"pipe:n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}; [ $n -ge 2 ] && cat {url}"
    stream = ShardStream(spec([flaky], world=1, sampling="resampled", retries=2), AUG)
    dead = set()  # one lane's, for one epoch
    assert list(stream._samples_of(iter([(flaky, 0, None)] * 3), dead)) == []
    assert stream._errors.count == 1  # unknown length: one, and not again for each pass over it
    assert count.read_text().strip() == "2"  # tried twice, then passed over without opening
    assert len(list(stream._samples_of(iter([(flaky, 0, None)]), set()))) == 80  # the next epoch


def test_a_damaged_range_leaves_the_shards_other_ranges_readable(shard_set, tmp_path):
    """Exact deals cut shards into ranges: a range that cannot be read is passed over alone; an earlier
    range of the same shard, dealt to another lane, still reads (a whole-shard mark dropped it)."""
    url = expand_shards(shard_set)[4]  # 80 samples
    with tarfile.open(url) as tar:
        members = tar.getmembers()
    cut = members[2 * 60].offset_data + 10  # inside sample 60's first member (2 members per sample)
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(Path(url).read_bytes()[:cut])
    stream = ShardStream(spec([str(damaged)], world=1, sampling="resampled", retries=1), AUG)
    dead = set()
    assert list(stream._samples_of(iter([(str(damaged), 70, None)]), dead)) == []
    assert dead == {(str(damaged), 70, None)}
    assert len(list(stream._samples_of(iter([(str(damaged), 0, 50)]), dead))) == 50


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
    a, b = take(urls, 6, world=1, counts=False), take(piped, 6, world=1)
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


@pytest.mark.parametrize("workers", [0, 1])
def test_pipe_readers_survive_the_stop_signals(shard_set, workers):
    """Slurm signals every process of the step: the time-limit warning (USR1/USR2) and, on scancel or
    preemption, SIGTERM. A pipe: reader that gets one must go on reading (a killed reader would cut its
    shard short), whether a loader worker or the rank itself (data.workers=0) started it."""
    urls = expand_shards(shard_set)
    signalled = [f"pipe:kill -USR1 $$; kill -USR2 $$; kill -TERM $$; cat {u}" for u in urls]
    plain, piped = take(urls, 6, workers=workers, counts=False), take(signalled, 6, workers=workers)
    assert all(torch.equal(a.images, b.images) for a, b in zip(plain, piped, strict=True))
    assert sum(b.skipped for b in piped) == 0


def test_a_failing_pipe_reader_is_reported_not_silently_short(shard_set):
    """The shield must not hide a reader's real failure: a non-zero exit is one counted, named error; the
    samples it sent are kept but the last (which the failure may have cut short)."""
    url = expand_shards(shard_set)[0]
    whole = len(list(ShardStream(spec([url], world=1), AUG)._samples_of(iter([(url, 0, None)]), set())))
    bad = f"pipe:cat {url}; exit 7"
    stream = ShardStream(spec([bad], world=1, sampling="resampled", retries=1), AUG)
    assert len(list(stream._samples_of(iter([(bad, 0, None)]), set()))) == whole - 1 == 199
    assert stream._errors.count == 1


def test_a_reader_that_breaks_off_is_restarted_where_it_stopped(shard_set, tmp_path):
    """A transient failure in the middle of a shard (a dropped connection) restarts the reader and skips
    what it had already sent: the stream is the same as an unbroken read, and nothing is counted."""
    urls = expand_shards(shard_set)
    flaky = [breaks_once(u, 30000, tmp_path / str(i)) for i, u in enumerate(urls)]
    plain, broken = take(urls, 8, world=1, counts=False), take(flaky, 8, world=1)
    assert all(torch.equal(a.images, b.images) for a, b in zip(plain, broken, strict=True))
    assert sum(b.skipped for b in broken) == 0
    assert len(list(tmp_path.iterdir())) >= 2  # readers did break


def test_a_read_broken_off_inside_a_sample_never_gives_it_half_made(shard_set, tmp_path):
    """Cut between two members of one sample (here after its .cls, before its image), with the reader
    failing: the restarted read gives that sample whole, and the stream equals an unbroken read."""
    url = expand_shards(shard_set)[0]
    with tarfile.open(url) as tar:
        members = tar.getmembers()
    second = next(i for i, m in enumerate(members) if i and m.name.split(".")[0] != members[0].name.split(".")[0])
    key = members[second].name.split(".")[0]
    cut = next(m for m in members[second:] if m.name.split(".")[0] == key and m is not members[second]).offset
    flag = tmp_path / "broke"
    flaky = breaks_once(url, cut, flag)
    plain = list(ShardStream(spec([url], world=1), AUG)._samples_of(iter([(url, 0, None)]), set()))
    stream = ShardStream(spec([flaky], world=1, sampling="resampled"), AUG)
    broken = list(stream._samples_of(iter([(flaky, 0, None)]), set()))
    assert flag.exists() and stream._errors.count == 0
    assert [sorted(k for k in x if not k.startswith("__")) for x in broken] == [
        sorted(k for k in x if not k.startswith("__")) for x in plain
    ]
    assert [x["__key__"] for x in broken] == [x["__key__"] for x in plain]


def test_a_repeated_member_costs_that_member_not_the_rest_of_the_shard(tmp_path):
    path = tmp_path / "dup-000000.tar"
    samples = demo_samples("train", 6)
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            members = [("png", sample["png"]), ("cls", sample["cls"])] + ([("cls", b"9")] if i == 2 else [])
            for ext, data in members:
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stream = ShardStream(spec([str(path)], world=1), AUG)
    assert len(list(stream._samples_of(iter([(str(path), 0, None)]), set()))) == 6
    assert stream._errors.count == 1
    # A read that breaks off after the repeated member and is restarted replays it: still counted once.
    with tarfile.open(path) as tar:
        cut = [m for m in tar.getmembers() if m.name.startswith(samples[4]["__key__"])][0].offset
    flag = tmp_path / "broke"
    flaky = breaks_once(path, cut, flag)
    stream = ShardStream(spec([flaky], world=1, sampling="resampled"), AUG)
    assert len(list(stream._samples_of(iter([(flaky, 0, None)]), set()))) == 6 and flag.exists()
    assert stream._errors.count == 1


@pytest.mark.parametrize("damage", ["zero-filled tail", "cut at a member boundary"])
def test_a_shard_shorter_than_its_manifest_is_counted_as_truncated(tmp_path, damage, caplog):
    """A crash before the data reached the disk leaves zeros (which tar reads as its end); a copy cut
    between members ends cleanly too. The manifest's count tells, and the missing samples are counted."""
    pattern = write_shards(tmp_path / "s", demo_samples("train", 30), [30])
    url = expand_shards(pattern)[0]
    data = Path(url).read_bytes()
    with tarfile.open(url) as tar:  # where the 11th sample's first member starts
        keys = [m.name.split(".")[0] for m in tar.getmembers()]
        boundary = tar.getmembers()[keys.index(sorted(set(keys), key=keys.index)[10])].offset
    damaged = data[:boundary] + bytes(len(data) - boundary) if damage == "zero-filled tail" else data[:boundary]
    Path(url).write_bytes(damaged)
    expected = manifest_counts([url])
    assert expected == {url: 30}
    stream = ShardStream(replace(spec([url], world=1), expected=expected), AUG)
    assert len(list(stream._samples_of(iter([(url, 0, None)]), set()))) == 10
    assert stream._errors.count == 20
    assert "ends after 10 of the 30 samples its manifest lists" in caplog.text


def test_http_shards_stream_through_a_shielded_curl(shard_set):
    """http(s) URLs are read with curl, started with the stop signals ignored: a signalled curl still
    delivers the whole shard, and the batches equal those read from disk."""
    urls = expand_shards(shard_set)
    root = Path(urls[0]).parent
    slow = lambda handler: time.sleep(0.3)  # noqa: E731 - keep curl alive long enough to be signalled
    with served(root, slow) as site:
        web = [f"{site}/{Path(u).name}" for u in urls]
        reader = open_shard(web[0])
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            os.kill(reader.proc.pid, sig)
        assert reader.stream.read() == Path(urls[0]).read_bytes()
        reader.finish()  # exit status 0
        plain, fetched = take(urls, 4, world=1), take(web, 4, world=1)  # both counted (manifests)
        assert all(torch.equal(a.images, b.images) for a, b in zip(plain, fetched, strict=True))
        assert sum(b.skipped for b in fetched) == 0


def test_a_stalled_http_transfer_is_restarted_not_spliced(shard_set, monkeypatch):
    """A server that stalls mid-body: curl gives up (speed limit) and the stream restarts the read,
    skipping what it has. (With curl's own --retry, curl resent the whole body behind the part it had
    already written: a spliced shard, samples lost without a count.)"""
    from largemim.data import readers

    url = expand_shards(shard_set)[0]
    body = Path(url).read_bytes()
    requests = []

    class StallOnce(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server hook's name
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if len(requests) == 1:
                self.wfile.write(body[: len(body) // 3])
                self.wfile.flush()
                release.wait(60)  # stalled, with the connection open, until the test ends
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    fast = [a if a != "300" else "2" for a in readers.CURL]  # give up after 2 s below 1 KiB/s
    monkeypatch.setattr(readers, "CURL", fast)
    release = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StallOnce)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        web = f"http://127.0.0.1:{server.server_port}/{Path(url).name}"
        plain = list(ShardStream(spec([url], world=1), AUG)._samples_of(iter([(url, 0, None)]), set()))
        stream = ShardStream(spec([web], world=1, sampling="resampled", counts=False), AUG)
        got = list(stream._samples_of(iter([(web, 0, None)]), set()))
    finally:
        release.set()
        server.shutdown()
    assert len(requests) == 2 and stream._errors.count == 0
    assert [x["__key__"] for x in got] == [x["__key__"] for x in plain]
    assert all(a["png"] == b["png"] for a, b in zip(got, plain, strict=True))


def test_an_unreadable_url_scheme_is_refused_with_the_pipe_form():
    with pytest.raises(ValueError, match=r"nfs://.*stream it through a command instead, e\.g\. 'pipe:"):
        expand_shards("nfs://b/train-{0..3}.tar")
    for scheme in ("https", "s3", "S3", "gs"):
        assert len(expand_shards(f"{scheme}://host/train-{{0..3}}.tar")) == 4


SIGTERM_FROM_SLURM = """
import itertools, subprocess, sys, time
import psutil, torch
from largemim.data.fast_decode import FastTrainAugment
from largemim.data.sources import expand_shards
from largemim.data.stream import StreamSpec, build_train_loader

urls = tuple(expand_shards(sys.argv[1]))
spec = StreamSpec((urls,), 8, 7, 0, 1, 3, 40, "exact", (), 3, 2)  # 2 lanes: any worker count
aug = FastTrainAugment(16, (0.2, 1.0))
reference = list(itertools.islice(iter(build_train_loader(spec, aug, 0, 0, pin=False)), 6))
batches = iter(build_train_loader(spec, aug, 2, 0, pin=False))
got = [next(batches) for _ in range(2)]
workers = psutil.Process().children()
assert len(workers) == 2, workers
for w in workers:  # from another process, as slurmstepd (or a launcher killing the tree) sends it
    subprocess.run(["kill", "-TERM", str(w.pid)], check=True)
time.sleep(1.0)
assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), "a worker died of SIGTERM"
got += [next(batches) for _ in range(4)]
assert all(torch.equal(a.images, b.images) for a, b in zip(reference, got, strict=True))
del batches  # the rank ends its workers itself (its own SIGTERM, if they linger): no hang at exit
print("ok")
"""


def test_loader_workers_survive_a_sigterm_sent_to_the_whole_step(shard_set):
    """scancel and preemption SIGTERM every process of the step. The workers must live on (torch's handler
    would die of it, and the rank would raise 'DataLoader worker exited unexpectedly' mid-save), the
    stream must go on unchanged, and the rank must still end its workers at exit."""
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_FROM_SLURM, shard_set], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


ORPHANED_WORKER = """
import sys
from largemim.data.fast_decode import FastTrainAugment
from largemim.data.stream import StreamSpec, build_train_loader

stalled = ("pipe:sleep 120",)  # a reader that never sends anything (a stalled server)
spec = StreamSpec((stalled,), 8, 7, 0, 1, 3, 40, "resampled", (), 1, 0)
batches = iter(build_train_loader(spec, FastTrainAugment(16, (0.2, 1.0)), 1, 0, pin=False))
print([w.pid for w in batches._workers][0], flush=True)
next(batches)  # blocks for ever
"""


def test_a_killed_rank_leaves_no_loader_worker_behind():
    """A rank killed outright (SIGKILL, the OOM killer) while its worker waits on a stalled reader: the
    worker, which ignores SIGTERM from anyone but its rank, must still end by itself."""
    rank = subprocess.Popen([sys.executable, "-c", ORPHANED_WORKER], stdout=subprocess.PIPE, text=True)
    worker = psutil.Process(int(rank.stdout.readline()))
    time.sleep(1.0)
    readers = worker.children(recursive=True)
    rank.kill()
    rank.wait()
    try:
        worker.wait(timeout=20)
    except psutil.TimeoutExpired:
        worker.kill()
        raise AssertionError("the orphaned loader worker was still running 20 s after its rank died") from None
    finally:
        for reader in readers:  # stalled and shielded: it would sleep on for two minutes
            with contextlib.suppress(psutil.NoSuchProcess):
                reader.kill()


@pytest.mark.parametrize(
    "url, tool", [("s3://bucket/train.tar", "aws"), ("gs://bucket/train.tar", "gsutil"), ("htgs://b/t.tar", "curl")]
)
def test_object_store_urls_stream_through_their_cli_shielded(shard_set, tmp_path, monkeypatch, url, tool):
    """s3:// (the AWS CLI; webdataset knows no s3), gs:// (gsutil) and htgs:// (curl) start like curl: their
    reader has the step signals ignored and is killable; here the tools are stand-ins that print the shard."""
    local = expand_shards(shard_set)[4]  # 80 samples
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / tool).write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\nkill -USR1 $$\ncat {local}\n')
    (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    stream = ShardStream(spec([url], world=1, sampling="resampled"), AUG)
    assert len(list(stream._samples_of(iter([(url, 0, None)]), set()))) == 80  # survived its own SIGUSR1
    assert stream._errors.count == 0
    args = (tmp_path / "args").read_text().split()
    if tool == "curl":  # htgs: GCS over HTTPS (webdataset's own htgs reader gave curl the gs:// URL)
        assert args[-1] == "https://storage.googleapis.com/b/t.tar" and "-f" in args
    else:
        assert args == (["s3", "cp", url, "-"] if tool == "aws" else ["cat", url])


def test_webdataset_scheme_readers_start_with_the_step_signals_blocked(shard_set, tmp_path, monkeypatch):
    """A scheme only webdataset knows (hf://, or one a user registers in gopen_schemes) is read by
    webdataset's own Pipe; its process starts with the step signals blocked, so a Slurm signal to the job
    step does not cut the shard short."""
    from webdataset.gopen import Pipe, gopen_schemes

    local = expand_shards(shard_set)[4]  # 80 samples
    reader = tmp_path / "reader.py"
    reader.write_text(
        "import os, signal, sys\n"
        "for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):\n"
        "    os.kill(os.getpid(), sig)  # kills an unshielded reader before it sends a byte\n"
        "sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())\n"
    )
    opener = lambda url, mode="rb", bufsize=8192: Pipe([sys.executable, str(reader), local], mode=mode, bufsize=bufsize)  # noqa: E731
    monkeypatch.setitem(gopen_schemes, "wdtest", opener)
    stream = ShardStream(spec(["wdtest://x/train.tar"], world=1, sampling="resampled"), AUG)
    assert len(list(stream._samples_of(iter([("wdtest://x/train.tar", 0, None)]), set()))) == 80
    assert stream._errors.count == 0


def test_a_reader_that_dies_is_named_not_an_empty_file(shard_set, caplog):
    """The tar parser fails first when a reader sends nothing and exits non-zero: the warning names the
    reader's exit status (a mistyped command looked like damaged data)."""
    bad = "pipe:echo nope >&2; exit 5"
    stream = ShardStream(spec([bad], world=1, sampling="resampled", retries=1), AUG)
    with caplog.at_level("WARNING"):
        assert list(stream._samples_of(iter([(bad, 0, None)]), set())) == []
    assert "the reader exited with status 5" in caplog.text


def test_sets_mix_by_sample_count_unless_weighted(shard_set):
    """Default mixing weights are each set's samples (a set of many small shards was over-drawn when
    weighted by shard count); shard counts only where a count is unknown."""
    urls = expand_shards(shard_set)  # 200, 120, 150, 90, 80 samples
    sets = [urls[:1], urls[1:]]
    assert ShardStream(spec(urls, sampling="resampled", sets=sets), AUG)._set_sizes() == [200, 440]
    assert ShardStream(spec(urls, sampling="resampled", sets=sets, counts=False), AUG)._set_sizes() == [1, 4]


def test_the_shuffle_buffer_draws_as_webdatasets():
    """ShuffleBuffer holds webdataset's buffer state in the open: the same draws, so streams are unchanged."""
    for n in (0, 1, 5, 39, 40, 41, 200):
        for size in (1, 2, 7, 40):
            ref = wds.filters._shuffle(iter(range(n)), bufsize=size, initial=size, rng=random.Random(n * size))
            ours = ShuffleBuffer(size, random.Random(n * size)).run(iter(range(n)))
            assert list(ours) == list(ref), (n, size)


class _Counting(ShardStream):
    """Counts the samples its reads go through, the heads read past without decoding included."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.parsed = 0

    def _shard_samples(self, url, first=0, stop=None, dead=None, count=True, where=None, key=None):
        self.parsed += first  # a read starts at the shard's head
        for sample in super()._shard_samples(url, first, stop, dead, count, where, key):
            self.parsed += 1
            yield sample


def _keys(samples) -> list:
    return [s["__key__"] if not s.get("__missing__") else None for s in samples]


@pytest.mark.parametrize("sampling", ["exact", "resampled"])
def test_a_resumed_lane_reads_back_its_buffer_not_its_epoch(tmp_path, sampling):
    """Resuming a lane at its 1600th sample: with the manifests' counts, the shuffle buffer is rebuilt from
    positions and only its samples are read back (a few shards' worth), not the 1600 before it; without
    counts (remote shards) the lane replays them. Both give the uninterrupted stream."""
    urls = expand_shards(write_shards(tmp_path, demo_samples("train", 1800), [75] * 24))
    kw = dict(world=1, per_epoch=225, sampling=sampling)
    full = _keys(itertools.islice(ShardStream(spec(urls, **kw), AUG)._raw_samples(0, 0, 1), 1800))
    for skip in (1, 30, 1600):
        for counts in (True, False):
            stream = _Counting(spec(urls, counts=counts, **kw), AUG)
            got = _keys(itertools.islice(stream._raw_samples(0, 0, 1, skip), 150))
            assert got == full[skip : skip + 150], (skip, counts)
            if skip == 1600:
                if counts:
                    assert stream.parsed < 1600 / 3, stream.parsed
                else:
                    assert stream.parsed >= 1600 + 150, stream.parsed


def test_a_resumed_lane_mixing_sets_gives_the_uninterrupted_stream(shard_set):
    urls = expand_shards(shard_set)
    sets = (tuple(urls[:2]), tuple(urls[2:]))
    kw = dict(world=1, per_epoch=80, sampling="resampled", sets=sets, weights=(0.7, 0.3))
    full = _keys(itertools.islice(ShardStream(spec(urls, **kw), AUG)._raw_samples(0, 0, 1), 600))
    for skip in (1, 57, 450):
        got = _keys(itertools.islice(ShardStream(spec(urls, **kw), AUG)._raw_samples(0, 0, 1, skip), 100))
        assert got == full[skip : skip + 100], skip


def test_a_buffered_sample_lost_since_the_interruption_is_counted_and_its_place_kept(tmp_path):
    """A shard deleted between the interruption and the resume: the buffer's samples from it are counted as
    lost and hold their places (their batches fill them as undecodable ones), so the rest of the stream is
    the uninterrupted one."""
    sizes = [10] * 40
    urls = expand_shards(write_shards(tmp_path, demo_samples("train", 400), sizes))
    kw = dict(world=1, per_epoch=50, sampling="exact")
    stream = ShardStream(spec(urls, **kw), AUG)
    full = list(itertools.islice(stream._raw_samples(0, 0, 1), 400))
    position = {}  # key -> place in the lane's input (exact mode: the deal's parts, in order)
    for url, first, stop in stream.parts_for(0, 0, 1):
        for sample in itertools.islice(stream._shard_samples(url), first, stop):
            position[sample["__key__"]] = len(position)
    skip = 200
    oldest = min(full[skip : skip + 39], key=lambda s: position[s["__key__"]])  # buffered long before the resume
    assert position[oldest["__key__"]] < skip - 10
    lost = oldest["__url__"]
    os.remove(lost)
    resumed = ShardStream(spec(urls, **kw), AUG)
    got = list(itertools.islice(resumed._raw_samples(0, 0, 1, skip), 200))  # the rest of the pass
    gone = [i for i, s in enumerate(got) if s.get("__missing__")]
    assert gone and resumed._errors.count == len(gone)  # each counted once
    assert all(full[skip + i]["__url__"] == got[i]["__url__"] == lost for i in gone)
    assert [s["__key__"] for i, s in enumerate(got) if i not in gone] == [
        s["__key__"] for i, s in enumerate(full[skip:]) if i not in gone
    ]
    batches = take(urls, 5, start=skip // 8, **kw)  # whole batches, the lost places filled
    assert [b.index for b in batches] == list(range(25, 30)) and all(b.images.shape[0] == 8 for b in batches)


def test_remote_shards_are_counted_from_the_manifest_next_to_them(tmp_path):
    """The manifest make_shards wrote is fetched from the shards' remote folder with their own reader:
    remote sets get epochs from their counts, exact deals and a resume that reads back only the buffer."""
    folder = tmp_path / "set"
    local = expand_shards(write_shards(folder, demo_samples("train", 1800), [75] * 24))
    with served(tmp_path) as site:
        web = [f"{site}/set/{Path(u).name}" for u in local]
        assert sample_counts(web) == {w: 75 for w in web} and count_samples(web) == 1800
        kw = dict(world=1, per_epoch=225, sampling="exact")
        full = _keys(itertools.islice(ShardStream(spec(local, **kw), AUG)._raw_samples(0, 0, 1), 1750))
        stream = _Counting(spec(web, **kw), AUG)
        assert stream.spec.expected == sample_counts(web)
        got = _keys(itertools.islice(stream._raw_samples(0, 0, 1, 1600), 150))
        assert got == full[1600:] and stream.parsed < 1600 / 3
        os.remove(folder / "manifest.json")
        assert manifest_counts(web) == {}  # read without counts (whole shards dealt, resume replays)
        with pytest.raises(ValueError, match=r"samples of the shards in http://.*/set: .*status 22.*manifest\.json"):
            sample_counts(web)


def _fake_aws(tmp_path, monkeypatch, script: str) -> None:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "aws").write_text("#!/bin/sh\n" + script)
    (fake / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")


def test_a_remote_manifest_that_cannot_be_fetched_names_the_readers_message(tmp_path, monkeypatch):
    from largemim.data import remote_manifest

    monkeypatch.setattr(remote_manifest, "FETCH_ATTEMPTS", 2)
    _fake_aws(tmp_path, monkeypatch, 'echo "An error occurred (404): Not Found" >&2\nexit 1\n')
    with pytest.raises(ValueError, match=r"s3://b/p: the reader exited with status 1: An error occurred \(404\)"):
        sample_counts(["s3://b/p/train-0.tar"])
    assert manifest_counts(["s3://b/p/train-0.tar"]) == {}  # with data.num_samples: read without counts
    for url in ("pipe:cat /x.tar", "https://h/p/t.tar?X-Amz-Signature=ab/cd", "hf://datasets/o/d/t.tar"):
        assert remote_manifest.manifest_folder(url) is None  # no folder, or a reader that cannot be timed out
        with pytest.raises(ValueError, match=r"cannot count the samples of shards such as .*set data.num_samples"):
            sample_counts([url])


def test_a_remote_manifest_fetch_is_retried_and_timed_out(tmp_path, monkeypatch):
    from largemim.data import remote_manifest

    body = '{"format": "largemim-shards/1", "shards": [{"url": "train-0.tar", "samples": 7}]}'
    flag = tmp_path / "failed-once"
    fail_once = f"[ -e {flag} ] || {{ touch {flag}; echo 'HTTP 503' >&2; exit 1; }}\n"
    _fake_aws(tmp_path, monkeypatch, fail_once + f"echo '{body}'\n")
    assert sample_counts(["s3://b/p/train-0.tar"]) == {"s3://b/p/train-0.tar": 7} and flag.exists()
    _fake_aws(tmp_path, monkeypatch, "exec sleep 30\n")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer in 1 s"):
        remote_manifest.fetch_text("s3://b/p/manifest.json", timeout_s=0.6)
    assert time.monotonic() - started < 10
    # A wrapper that leaves a child holding the pipe (the pipe never ends): its exit is the end.
    _fake_aws(tmp_path, monkeypatch, f"echo '{body}'\nsleep 30 &\nexit 0\n")
    started = time.monotonic()
    assert remote_manifest.fetch_text("s3://b/p/manifest.json", timeout_s=20).strip() == body
    assert time.monotonic() - started < 5


def _shortfalls(batches) -> dict:
    """What the trainer passes a resumed stream: the batches' shortfalls, as StreamSpec.shortfalls."""
    return {tuple(f[:4]): f[4] for b in batches for f in b.shortfalls}


@pytest.mark.parametrize("sampling", ["exact", "resampled"])
def test_a_shard_found_short_before_the_interruption_is_rebuilt_as_it_was_read(tmp_path, sampling):
    """A shard holding fewer samples than its manifest says moves every later position of the lane's input:
    the batch that met it reports the shortfall (which part, where it ended), the trainer saves it, and a
    resume rebuilds the lane with that part cut there: the uninterrupted stream, exactly, still without
    reading what it had consumed."""
    pattern = write_shards(tmp_path, demo_samples("train", 400), [10] * 40)
    urls = expand_shards(pattern)
    with wds.TarWriter(urls[3]) as sink:  # rewritten with 5 of its 10 samples; the manifest still says 10
        for s in list(wds.tarfile_samples([{"url": str(tmp_path / "shard-000010.tar")}]))[:5]:
            sink.write({"__key__": s["__key__"] + "x", "png": s["png"], "cls": s["cls"]})
    kw = dict(world=1, per_epoch=50, sampling=sampling)
    full = _keys(itertools.islice(ShardStream(spec(urls, **kw), AUG)._raw_samples(0, 0, 1), 350))
    batches = take(urls, 25, **kw)  # the run up to its checkpoint at micro-batch 25 (sample 200)
    met = _shortfalls(batches)
    assert met and all(end < 10 for end in met.values())
    resumed = _Counting(replace(spec(urls, **kw), shortfalls=met), AUG)
    assert _keys(itertools.islice(resumed._raw_samples(0, 0, 1, 200), 150)) == full[200:350]
    assert resumed.parsed < 300 and resumed._errors.count == 0  # rebuilt (a replay reads 350), nothing counted twice
    rebuilt = ShardStream(spec(urls, **kw), AUG)  # without the shortfalls: other samples
    assert _keys(itertools.islice(rebuilt._raw_samples(0, 0, 1, 200), 150)) != full[200:350]


def test_a_shard_that_failed_before_the_interruption_and_reads_now_is_rebuilt_as_it_failed(tmp_path):
    """A remote shard that could not be read (after its retries) before the interruption reads fine at the
    resume: the rebuilt lane still leaves it out where the run had, so the stream is the uninterrupted one
    (a replay would have read it and given another)."""
    write_shards(tmp_path / "set", demo_samples("train", 400), [10] * 40)
    failed = []

    def fails_once(handler) -> bool:
        if handler.path.endswith("shard-000007.tar") and not failed:
            failed.append(handler.path)
            handler.send_error(503)
            return True
        return False

    with served(tmp_path, fails_once) as site:
        web = [f"{site}/set/shard-{n:06d}.tar" for n in range(40)]
        kw = dict(world=1, per_epoch=50, sampling="exact", retries=1)
        straight = ShardStream(spec(web, **kw), AUG)
        full = _keys(itertools.islice(straight._raw_samples(0, 0, 1), 350))
        assert failed and straight._errors.count == 10
        met = {tuple(f[:4]): f[4] for f in straight._shortfalls}
        assert list(met.values()) == [0]  # the part gave nothing
        resumed = ShardStream(replace(spec(web, **kw), shortfalls=met), AUG)
        assert _keys(itertools.islice(resumed._raw_samples(0, 0, 1, 200), 150)) == full[200:350]
        replayed = ShardStream(spec(web, **kw), AUG)  # without them: shard 7 reads now, another stream
        assert _keys(itertools.islice(replayed._raw_samples(0, 0, 1, 200), 150)) != full[200:350]


def test_a_shard_longer_than_its_manifest_is_read_to_its_count(tmp_path, caplog):
    """Extra samples past the manifest's count would move every later position (and a rebuilt resume would
    not know): the read stops at the count, with a warning."""
    pattern = write_shards(tmp_path, demo_samples("train", 400), [10] * 40)
    urls = expand_shards(pattern)
    body = json.loads((tmp_path / "manifest.json").read_text())
    body["shards"][3]["samples"] = 8
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    kw = dict(world=1, per_epoch=49, sampling="resampled")
    with caplog.at_level("WARNING"):
        full = _keys(itertools.islice(ShardStream(spec(urls, **kw), AUG)._raw_samples(0, 0, 1), 350))
    assert "holds more samples than the 8 its manifest lists" in caplog.text
    rebuilt = ShardStream(spec(urls, **kw), AUG)
    assert _keys(itertools.islice(rebuilt._raw_samples(0, 0, 1, 200), 150)) == full[200:350]


def test_a_resume_whose_remote_manifest_cannot_be_read_keeps_the_counts_it_started_with(tmp_path, monkeypatch, caplog):
    """The counts of remote shards are kept in the run folder: an outage at a resume must not change how the
    ranks deal their data (or need data.num_samples it did not need at the start)."""
    from largemim.data import remote_manifest
    from largemim.run_counts import SAVED_NAME, CountsUnavailable, run_shard_counts

    monkeypatch.setattr(remote_manifest, "FETCH_ATTEMPTS", 1)
    write_shards(tmp_path / "set", demo_samples("train", 150), [70, 80])
    run = tmp_path / "run"
    with served(tmp_path) as site:
        web = [f"{site}/set/shard-00000{i}.tar" for i in (0, 1)]
        assert run_shard_counts(web, True, 0, run) == {web[0]: 70, web[1]: 80}
        assert json.loads((run / SAVED_NAME).read_text()) == {web[0]: 70, web[1]: 80}
        os.remove(tmp_path / "set" / "manifest.json")  # unreachable now
        with caplog.at_level("WARNING"):
            assert run_shard_counts(web, True, 0, run) == {web[0]: 70, web[1]: 80}
            assert run_shard_counts(web, False, 0, run) == {web[0]: 70, web[1]: 80}
        assert f"come from {run / SAVED_NAME}, as last read: cannot count" in caplog.text and "404" in caplog.text
        with pytest.raises(CountsUnavailable, match="cannot count the samples of the shards in http"):
            run_shard_counts(web, True, 0, tmp_path / "new_run")  # a new run has nothing kept


@pytest.mark.parametrize(
    "sampling, sizes, per_epoch, skip, lost, counts",
    [
        ("resampled", [10] * 10, 30, 100, 3, True),  # a shard drawn again after it gave nothing
        ("resampled", [10] * 10, 30, 100, 3, False),  # the same without counts: replayed, with the cuts
        ("exact", [10] * 40, 50, 392, 7, True),  # resumed after the lane ran past its deal (its second pass)
        ("exact", [10] * 4, 10, 56, 1, True),  # a deal that wraps around the shards: each part twice
    ],
)
def test_a_shard_missing_before_the_interruption_and_back_at_the_resume(tmp_path, sampling, sizes, per_epoch, skip,
                                                                        lost, counts):  # fmt: skip
    """A shard that gave nothing was passed over wherever it came again in that lane's epoch: the resume
    rebuilds the lane so, even with the shard back (a replay would read it)."""
    urls = expand_shards(write_shards(tmp_path, demo_samples("train", sum(sizes)), sizes))
    kept = Path(urls[lost]).read_bytes()
    os.remove(urls[lost])
    kw = dict(world=1, per_epoch=per_epoch, sampling=sampling, retries=1, counts=counts)
    straight = ShardStream(spec(urls, **kw), AUG)
    samples = straight._raw_samples(0, 0, 1)
    head = [s["__key__"] for s in itertools.islice(samples, skip)]
    met = {tuple(f[:4]): f[4] for f in straight._shortfalls}  # what the checkpoint at ``skip`` holds
    tail = _keys(itertools.islice(samples, 60))
    assert met and len(head) == skip
    Path(urls[lost]).write_bytes(kept)
    resumed = ShardStream(replace(spec(urls, **kw), shortfalls=met), AUG)
    assert _keys(itertools.islice(resumed._raw_samples(0, 0, 1, skip), 60)) == tail
