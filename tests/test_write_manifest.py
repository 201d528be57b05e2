"""tools/write_manifest.py: the manifest of an existing shard set, counted as the training stream reads it."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import REPO, demo_samples, served, write_shards

from largemim.data.count_shards import count_shard
from largemim.data.fast_decode import FastTrainAugment
from largemim.data.sources import expand_shards, sample_counts
from largemim.data.stream import ShardStream, StreamSpec

TOOL = [sys.executable, str(REPO / "tools" / "write_manifest.py"), "--no-progress"]


def stream_count(url: str) -> int:
    """The samples the training stream gets from one shard."""
    spec = StreamSpec(((url,),), 8, 1, 0, 1, 0, 10)
    return len(list(ShardStream(spec, FastTrainAugment(16, (0.2, 1.0)))._samples_of(iter([(url, 0, None)]), set())))


def odd_tar(path: Path, compress: bool = False) -> None:
    """Members webdataset groups in its own way: metadata files, a folder entry, a name with no extension,
    keys that come back after another (a new sample each time), a repeated member, keys in sub-folders."""
    png = demo_samples("train", 1)[0]["png"]
    names = ["__index__", "__cache__/z.png", "__meta__.json", "a.png", "a.cls", "README", "b.png", "a.json",
             "dir/c.png", "dir/c.cls", "dir/c.cls", "d.seg.png", "d.cls", "x/__cache__/y.png", "e.png"]  # fmt: skip
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name in names:
            data = png if name.endswith(".png") else b"1"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(raw.getvalue()) if compress else raw.getvalue())


def test_counts_are_the_samples_the_stream_reads(tmp_path):
    for compress in (False, True):
        path = tmp_path / f"odd-{compress}.tar"
        odd_tar(path, compress)
        count = count_shard(str(path))
        assert count.damage is None and count.samples == stream_count(str(path)) == 8, compress
    urls = expand_shards(write_shards(tmp_path / "set", demo_samples("train", 300), [100, 200]))
    assert [count_shard(u).samples for u in urls] == [stream_count(u) for u in urls] == [100, 200]


def test_a_set_without_a_manifest_gets_the_one_make_shards_would_write(tmp_path):
    pattern = write_shards(tmp_path / "set", demo_samples("train", 300), [100, 120, 80])
    manifest = tmp_path / "set" / "manifest.json"
    written = json.loads(manifest.read_text())
    manifest.unlink()
    with pytest.raises(ValueError, match="no shard manifest at .*tools/write_manifest.py"):
        sample_counts(expand_shards(pattern))
    done = subprocess.run([*TOOL, pattern], capture_output=True, text=True, check=True)
    assert "3 shards counted, 300 samples" in done.stdout
    assert json.loads(manifest.read_text())["shards"] == written["shards"]
    assert sum(sample_counts(expand_shards(pattern)).values()) == 300  # what the trainer reads
    # A folder's other entries are kept; a count that changed is reported.
    body = json.loads(manifest.read_text())
    body["shards"][0]["samples"] = 99
    body["shards"].append({"url": "later-000000.tar", "samples": 5})
    manifest.write_text(json.dumps(body))
    one = str(tmp_path / "set" / "shard-000000.tar")
    done = subprocess.run([*TOOL, one], capture_output=True, text=True, check=True)
    assert "1 shards counted, 100 samples; 3 other entries kept; 1 changed (e.g. shard-000000.tar: 99 -> 100)" in (
        done.stdout
    )
    assert {s["url"]: s["samples"] for s in json.loads(manifest.read_text())["shards"]}["later-000000.tar"] == 5


def test_a_damaged_shard_is_named_and_nothing_written_unless_allowed(tmp_path):
    pattern = write_shards(tmp_path / "set", demo_samples("train", 200), [100, 100])
    (tmp_path / "set" / "manifest.json").unlink()
    cut = tmp_path / "set" / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[:30_000])  # a copy that stopped half-way
    done = subprocess.run([*TOOL, pattern], capture_output=True, text=True)
    assert done.returncode != 0 and not (tmp_path / "set" / "manifest.json").exists()
    assert f"damaged: {cut}:" in done.stderr and "1 of 2 shards are damaged" in done.stderr
    done = subprocess.run([*TOOL, pattern, "--allow-damaged"], capture_output=True, text=True, check=True)
    counts = json.loads((tmp_path / "set" / "manifest.json").read_text())["shards"]
    assert counts[0] == {"url": "shard-000000.tar", "samples": 100} and 0 < counts[1]["samples"] < 100


def test_remote_shards_are_counted_through_their_reader_and_the_upload_named(tmp_path):
    shutil.copytree(Path(write_shards(tmp_path / "set", demo_samples("train", 150), [70, 80])).parent, tmp_path / "w")
    (tmp_path / "w" / "manifest.json").unlink()
    with served(tmp_path) as site:
        pattern = f"{site}/w/shard-{{000000..000001}}.tar"
        refused = subprocess.run([*TOOL, pattern], capture_output=True, text=True)
        assert refused.returncode != 0 and "is remote: give --out FILE" in refused.stderr
        out = tmp_path / "manifest.json"
        done = subprocess.run([*TOOL, pattern, "--out", str(out)], capture_output=True, text=True, check=True)
        assert f"upload it to {site}/w/manifest.json" in done.stdout
        shutil.copy(out, tmp_path / "w" / "manifest.json")  # the upload
        assert sample_counts(expand_shards(pattern)) == dict(zip(expand_shards(pattern), (70, 80), strict=True))
