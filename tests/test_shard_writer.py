"""The shard writer on real images: counts, manifest, labels, bytes kept, determinism, resume, resize."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import demo_samples
from conftest import write_shards as write_test_shards
from PIL import Image

from largemim.data import augment
from largemim.data.manifest import Manifest
from largemim.data.shard_sources import (
    IMAGE_KEYS,
    Member,
    SourceSample,
    UnknownClassError,
    load_classes,
    scan_folder,
    scan_list,
    scan_tars,
)
from largemim.data.shard_writer import WriteOptions, plan_fingerprint, plan_shards, shard_keys, write_shards

REPO = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, str(REPO / "tools" / "make_shards.py")]
FMNIST_TRAIN = REPO / "data" / "fashion_mnist" / "train"
WALLPAPERS = Path("/usr/share/wallpapers")


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus fine texture: compresses and resizes like a photo, unlike flat noise."""
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageNet's layout: 3 classes, 23 images in JPEG and PNG of varied sizes and modes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    counts = {"n01_cat": 9, "n02_dog": 8, "n03_fish": 6}
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = photo_like(rng, int(rng.integers(40, 120)), int(rng.integers(40, 120)))
            if i % 3 == 0:
                (root / name / f"img_{c}_{i}.png").write_bytes(encode(img.convert("L") if i % 2 else img, "PNG"))
            else:
                (root / name / f"img_{c}_{i}.JPEG").write_bytes(encode(img, "JPEG", quality=90))
    (root / "empty_folder").mkdir()  # no images: not a class
    (root / "n01_cat" / "notes.txt").write_text("not an image")
    return root


def read_samples(folder: Path) -> list[dict]:
    """Every sample of the folder's shards, in manifest order, read by WebDataset itself."""
    manifest = Manifest.load(folder)
    urls = [str(folder / s.url) for s in manifest.shards]
    return list(wds.tarfile_samples([{"url": u} for u in urls]))


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


class DyingMember(Member):
    """Reads like a plain file, but kills its worker process outright (as the OOM killer would) while
    ``LARGEMIM_TEST_KILL_BELOW`` holds the pid of the test process; picklable, being defined at module level."""

    def read(self, open_tars: dict) -> bytes:
        if os.environ.get("LARGEMIM_TEST_KILL_BELOW", str(os.getpid())) != str(os.getpid()):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read(open_tars)


def test_image_keys_match_the_decoder():
    assert IMAGE_KEYS == augment.IMAGE_KEYS


def test_folder_counts_labels_manifest_and_bytes(image_folder: Path, tmp_path: Path):
    source = scan_folder(image_folder)
    assert source.classes == ["n01_cat", "n02_dog", "n03_fish"]
    out = tmp_path / "shards"
    manifest = write_shards(source, out, WriteOptions(prefix="train", samples_per_shard=5), progress=False)

    assert [s.samples for s in manifest.shards] == [5, 5, 5, 5, 3]
    assert [s.url for s in manifest.shards] == [f"train-{i:06d}.tar" for i in range(5)]
    assert manifest.total_samples == 23 and Manifest.load(out).total_samples == 23
    assert (out / "classes.txt").read_text().split() == source.classes
    assert not list(out.glob("*.tmp"))
    for s in manifest.shards:
        assert len(shard_keys(out / s.url)) == s.samples

    originals = {p.read_bytes(): source.classes.index(p.parent.name) for p in image_folder.rglob("img_*")}
    samples = read_samples(out)
    assert len(samples) == 23 and len({s["__key__"] for s in samples}) == 23
    for s in samples:
        image = s.get("jpg", s.get("png"))
        assert image in originals, "image bytes must be copied unchanged"
        assert int(s["cls"]) == originals.pop(image)
        assert ("jpg" in s) == (Image.open(io.BytesIO(image)).format == "JPEG")
    assert not originals
    # shuffled: the classes are not in folder order along the shards
    labels = [int(s["cls"]) for s in samples]
    assert labels != sorted(labels)


def test_same_seed_same_bytes_other_seed_other_order(image_folder: Path, tmp_path: Path):
    source = scan_folder(image_folder)
    for name, seed in (("a", 7), ("b", 7), ("c", 8), ("d", None)):
        write_shards(source, tmp_path / name, WriteOptions(samples_per_shard=6, seed=seed, workers=2), progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert shard_bytes(tmp_path / "a") != shard_bytes(tmp_path / "c")
    unshuffled = [int(s["cls"]) for s in read_samples(tmp_path / "d")]
    assert unshuffled == sorted(unshuffled)
    assert Counter(unshuffled) == Counter(int(s["cls"]) for s in read_samples(tmp_path / "c"))


def test_size_limit(image_folder: Path, tmp_path: Path):
    source = scan_folder(image_folder)
    total = sum(m.size for s in source.samples for m in s.members)
    limit_mb = total / 4 / 1e6 + 0.02  # a few shards
    by_size = WriteOptions(samples_per_shard=None, shard_mb=limit_mb)
    manifest = write_shards(source, tmp_path / "o", by_size, progress=False)
    assert len(manifest.shards) >= 3 and manifest.total_samples == 23
    for s in manifest.shards:
        assert (tmp_path / "o" / s.url).stat().st_size <= limit_mb * 1e6
    # both limits: whichever comes first
    both = write_shards(source, tmp_path / "p", WriteOptions(samples_per_shard=2, shard_mb=limit_mb), progress=False)
    assert all(s.samples <= 2 for s in both.shards) and both.total_samples == 23


def test_plan_is_deterministic(image_folder: Path):
    options = WriteOptions(samples_per_shard=4, seed=3)
    a = plan_shards(scan_folder(image_folder).samples, options)
    b = plan_shards(scan_folder(image_folder).samples, options)
    assert a == b


def test_resume_after_an_interrupted_write(image_folder: Path, tmp_path: Path):
    source = scan_folder(image_folder)
    options = WriteOptions(samples_per_shard=4, seed=1)
    reference = tmp_path / "reference"
    write_shards(source, reference, options, progress=False)

    # Interrupt a write for real: a source file vanishes after the scan, so the shard that needs it fails.
    out = tmp_path / "out"
    plan = plan_shards(source.samples, options)
    victim = Path(plan[3].samples[1][1].members[0].path)
    saved = victim.read_bytes()
    victim.unlink()
    with pytest.raises(FileNotFoundError):
        write_shards(source, out, options, progress=False)
    victim.write_bytes(saved)
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished == [plan[i].name for i in range(3)]  # one worker: shards 0-2 done, 3 failed
    assert not list(out.glob("*.tmp")), "the failed shard's partial .tmp is deleted"
    assert not (out / "manifest.json").exists()

    # Also: a finished shard with the wrong samples (as from a crash before the plan file existed) is redone.
    with tarfile.open(out / plan[1].name, "w") as tar:
        info = tarfile.TarInfo("00000000.jpg")
        tar.addfile(info, io.BytesIO(b""))
    kept = {name: os.stat(out / name).st_ino for name in (plan[0].name, plan[2].name)}

    manifest = write_shards(source, out, options, progress=False)
    assert manifest.total_samples == 23
    assert {name: os.stat(out / name).st_ino for name in kept} == kept, "finished shards must not be rewritten"
    assert shard_bytes(out) == shard_bytes(reference)
    assert not list(out.glob("*.tmp"))

    # Running again once complete writes nothing; a different plan in the same folder is refused.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    write_shards(source, out, options, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    other = WriteOptions(samples_per_shard=4, seed=2)
    with pytest.raises(FileExistsError, match="different inputs or options"):
        write_shards(source, out, other, progress=False)
    write_shards(source, out, other, overwrite=True, progress=False)
    assert shard_bytes(out) != shard_bytes(reference)


def test_the_folder_scan_and_the_resume_check_show_progress(image_folder: Path, tmp_path: Path, capsys):
    """Review finding: walking ImageNet over network storage and a rerun's check of the finished shards took
    minutes each with nothing on screen. The walk counts images and folders (its total is unknown)."""
    (image_folder / "n02_dog" / "more").mkdir()  # a folder below a class folder is read (and counted) too
    capsys.readouterr()
    source = scan_folder(image_folder, progress=False)
    assert capsys.readouterr().err == ""
    source = scan_folder(image_folder)
    err = capsys.readouterr().err
    assert f"scanning {image_folder}: 23img" in err and "folders=5]" in err, err
    assert f"reading sizes in {image_folder}: 100%" in err and "23/23" in err, err

    out = tmp_path / "out"
    options = WriteOptions(samples_per_shard=5)
    write_shards(source, out, options, progress=False)
    (out / options.shard_name(4)).unlink()  # one shard to write again: 4 of the 5 to check
    capsys.readouterr()
    write_shards(source, out, options, progress=False)
    assert capsys.readouterr().err == ""
    (out / options.shard_name(4)).unlink()
    write_shards(source, out, options)
    err = capsys.readouterr().err
    assert f"checking {out}: 100%" in err and "4/4 [" in err, err


def test_reshard_fashion_mnist_tars(tmp_path: Path, capsys):
    urls = [str(FMNIST_TRAIN / f"train-00000{i}.tar") for i in (0, 1)]
    capsys.readouterr()
    assert len(scan_tars(urls, progress=False).samples) == 2000
    assert capsys.readouterr().err == ""
    source = scan_tars(urls)  # every header of thousands of tars: minutes, so a bar (review finding)
    err = capsys.readouterr().err
    assert "reading tar headers: 100%" in err and "2/2 [" in err and "samples=2000]" in err, err
    assert len(source.samples) == 2000
    manifest = write_shards(source, tmp_path / "fm", WriteOptions(samples_per_shard=300, workers=2), progress=False)
    assert [s.samples for s in manifest.shards] == [300] * 6 + [200]
    got = read_samples(tmp_path / "fm")
    want = list(wds.tarfile_samples([{"url": u} for u in urls]))
    assert Counter((s["png"], s["cls"]) for s in got) == Counter((s["png"], s["cls"]) for s in want)
    assert all(set(s) == {"__key__", "__url__", "png", "cls"} for s in got)


def test_file_list_with_named_and_numbered_labels(image_folder: Path, tmp_path: Path, capsys):
    files = sorted(image_folder.rglob("img_*"))
    named = tmp_path / "named.txt"
    named.write_text("# path<TAB>label\n" + "".join(f"{p}\t{p.parent.name[4:]}\n" for p in files))
    capsys.readouterr()
    source = scan_list(named, progress=False)
    assert capsys.readouterr().err == ""
    # Review finding: a list of millions of files on network storage was checked and sized in silence.
    assert scan_list(named).samples == source.samples
    err = capsys.readouterr().err
    assert f"checking {named}: 100%" in err and "24/24 [" in err, err  # every line counted, the comment too
    assert f"reading sizes of the images listed in {named}: 100%" in err and "23/23 [" in err, err
    assert source.classes == ["cat", "dog", "fish"]
    manifest = write_shards(source, tmp_path / "named", WriteOptions(samples_per_shard=10), progress=False)
    assert manifest.total_samples == len(files)
    by_bytes = {p.read_bytes(): p.parent.name[4:] for p in files}
    for s in read_samples(tmp_path / "named"):
        assert source.classes[int(s["cls"])] == by_bytes[s.get("jpg", s.get("png"))]

    numbered = tmp_path / "sub" / "numbered.txt"  # relative paths are relative to the list's folder
    numbered.parent.mkdir()
    numbered.write_text("".join(f"{os.path.relpath(p, numbered.parent)}\t{40 + i % 2}\n" for i, p in enumerate(files)))
    source = scan_list(numbered)
    assert source.classes is None and {s.label for s in source.samples} == {40, 41}

    unlabelled_mix = tmp_path / "mix.txt"
    unlabelled_mix.write_text(f"{files[0]}\t1\n{files[1]}\n")
    with pytest.raises(ValueError, match="label all or none"):
        scan_list(unlabelled_mix)


def test_resize_long_side(tmp_path: Path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "flat"
    folder.mkdir()
    big = photo_like(rng, 800, 600)
    files = {
        "big.jpg": encode(big, "JPEG", quality=92),
        "big_rgba.png": encode(photo_like(rng, 300, 700).convert("RGBA"), "PNG"),
        "big_grey.jpg": encode(big.convert("L"), "JPEG"),
        "small.png": encode(photo_like(rng, 200, 150), "PNG"),
        "edge.jpg": encode(photo_like(rng, 256, 100), "JPEG"),  # exactly the limit: kept
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    source = scan_folder(folder)
    assert source.classes is None
    write_shards(source, tmp_path / "o", WriteOptions(samples_per_shard=10, resize_long_side=256), progress=False)
    samples = read_samples(tmp_path / "o")
    assert len(samples) == 5 and all("cls" not in s for s in samples)
    kept = [s for s in samples if s.get("jpg", s.get("png")) in files.values()]
    assert sorted(s.get("jpg", s.get("png")) for s in kept) == sorted(files[n] for n in ("small.png", "edge.jpg"))
    resized = [Image.open(io.BytesIO(s["jpg"])) for s in samples if s not in kept]
    assert sorted((im.format, im.size, im.mode) for im in resized) == [
        ("JPEG", (110, 256), "RGB"),
        ("JPEG", (256, 192), "L"),
        ("JPEG", (256, 192), "RGB"),
    ]
    colour = next(np.asarray(im, dtype=float) for im in resized if im.mode == "RGB" and im.size == (256, 192))
    expected = np.asarray(big.resize((256, 192), Image.BICUBIC), dtype=float)
    assert np.abs(colour - expected).mean() < 4.0  # the same picture, not just the same size


@pytest.mark.skipif(not (WALLPAPERS / "Kite").is_dir(), reason="plasma-workspace-wallpapers not installed")
def test_resize_real_photos(tmp_path: Path):
    photos = [WALLPAPERS / n / "contents/images/1280x800.jpg" for n in ("Kite", "Path", "BytheWater")]
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    write_shards(scan_list(listing), tmp_path / "o", WriteOptions(resize_long_side=640), progress=False)
    sizes = [Image.open(io.BytesIO(s["jpg"])).size for s in read_samples(tmp_path / "o")]
    assert sizes == [(640, 400)] * 3


def test_cli(image_folder: Path, tmp_path: Path):
    cmd = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--folder", str(image_folder)]
    cmd += ["--out", str(tmp_path / "cli"), "--prefix", "val", "--samples-per-shard", "10", "--workers", "1"]
    run = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "3 shards, 23 samples" in run.stdout
    assert "folders=" not in run.stderr and "%|" not in run.stderr, run.stderr  # --no-progress: no bar at all
    assert [s.samples for s in Manifest.load(tmp_path / "cli").shards] == [10, 10, 3]
    again = subprocess.run(cmd + ["--seed", "5", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    listing = tmp_path / "list.txt"  # unlabelled: another plan, refused after the list is read
    listing.write_text("".join(f"{p}\n" for p in sorted(image_folder.rglob("img_*"))))
    listed = subprocess.run([*TOOL, "--list", str(listing), *cmd[4:], "--no-progress"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert listed.returncode != 0 and "--overwrite" in listed.stderr, listed.stderr
    assert "%|" not in listed.stderr, listed.stderr  # --no-progress reaches the --list scan


def test_resharding_into_the_source_folder_is_refused(tmp_path: Path):
    """Re-sharding a folder into itself under the same prefix would unlink or replace the very tars being read."""
    folder = tmp_path / "wds"
    write_test_shards(folder, demo_samples("train", 60), [20, 20, 20], prefix="shard")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    cmd = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--tars", str(folder), "--out", str(folder)]
    cmd += ["--samples-per-shard", "25", "--workers", "1", "--no-progress"]
    for extra in (["--overwrite"], []):
        run = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=120)
        assert run.returncode != 0
        assert "shard-000000.tar" in run.stderr and "another folder" in run.stderr, run.stderr
        assert "--overwrite" not in run.stderr, "the fix is another folder, never --overwrite"
        assert "tar headers" not in run.stderr, run.stderr  # --no-progress reaches the --tars scan
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "the source shards must be intact"

    # Without a manifest naming them, another prefix in the same folder is also a way out, and the message says so.
    (folder / "manifest.json").unlink()
    source = scan_tars(sorted(folder.glob("*.tar")))
    with pytest.raises(ValueError, match="another --prefix"):
        write_shards(source, folder, WriteOptions(samples_per_shard=25), overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in folder.glob("*.tar")} == {n: b for n, b in before.items() if ".tar" in n}
    manifest = write_shards(source, folder, WriteOptions(prefix="v2", samples_per_shard=25), progress=False)
    assert [s.samples for s in manifest.shards] == [25, 25, 10]


def test_a_killed_worker_is_an_error_and_the_rerun_resumes(image_folder: Path, tmp_path: Path, monkeypatch):
    source = scan_folder(image_folder)
    options = WriteOptions(samples_per_shard=4, seed=None, workers=2)  # unshuffled: sample 13 is in shard 3
    reference = tmp_path / "reference"
    write_shards(source, reference, options, progress=False)

    member = source.samples[13].members[0]
    dying = DyingMember(member.ext, member.path, member.size, member.offset)  # same fields, same plan
    source.samples[13] = SourceSample((dying,), source.samples[13].label)
    out = tmp_path / "out"
    monkeypatch.setenv("LARGEMIM_TEST_KILL_BELOW", str(os.getpid()))
    with pytest.raises(RuntimeError, match="worker process died.*fewer --workers.*resumes"):
        write_shards(source, out, options, progress=False)  # before the fix: waits forever
    assert not (out / "manifest.json").exists()
    finished = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    assert "shard-000003.tar" not in finished

    monkeypatch.delenv("LARGEMIM_TEST_KILL_BELOW")
    write_shards(source, out, options, progress=False)
    assert {n: (out / n).stat().st_ino for n in finished} == finished, "finished shards must be kept"
    assert shard_bytes(out) == shard_bytes(reference)
    assert not list(out.glob("*.tmp"))


def test_damaged_inputs_and_leftovers_get_errors_that_name_them(image_folder: Path, tmp_path: Path):
    """Review findings: a plan file left empty by a crash blocked every rerun (--overwrite too) with a
    JSON error; a truncated input tar was reported as compressed, in a traceback; a damaged manifest
    was a bare JSONDecodeError or TypeError; --samples-per-shard 0 silently meant 1000."""
    tool = [sys.executable, str(REPO / "tools" / "make_shards.py")]
    cmd = [*tool, "--folder", str(image_folder), "--out", str(tmp_path / "out"), "--samples-per-shard", "10",
           "--workers", "1", "--no-progress"]  # fmt: skip
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-plan.json").write_text("")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert [s.samples for s in Manifest.load(tmp_path / "out").shards] == [10, 10, 3]

    folder = tmp_path / "wds"
    write_test_shards(folder, demo_samples("train", 40), [20, 20], prefix="shard")
    tar = folder / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    run = subprocess.run([*tool, "--tars", str(folder), "--out", str(tmp_path / "re"), "--no-progress"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "shard-000001.tar is damaged or truncated" in run.stderr, run.stderr

    for text, why in (("{", "is not valid JSON"), ('{"format": "largemim-shards/1", "shards": [{"n": 3}]}',
                                                  "a shard entry is not")):  # fmt: skip
        (folder / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match=why) as info:
            Manifest.load(folder)
        assert str(folder / "manifest.json") in str(info.value)

    run = subprocess.run([*cmd[:-5], "--samples-per-shard", "0", "--no-progress"], capture_output=True, text=True)
    assert run.returncode != 0 and "--samples-per-shard must be >= 1" in run.stderr


def test_a_tar_cut_inside_a_header_or_between_members_is_refused(tmp_path: Path):
    """Python's tarfile reads a tar cut inside a header (or right after a member) as a shorter whole tar:
    the samples after the cut were dropped without a word. The missing end-of-archive block names it."""
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(3):
            data = bytes([i]) * 700
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert len(scan_tars([whole]).samples) == 3
    with tarfile.open(whole) as tar:
        third = tar.getmembers()[2].offset  # where the third header starts
    for name, cut in (("in-header.tar", third + 100), ("at-boundary.tar", third)):
        bad = tmp_path / name
        bad.write_bytes(whole.read_bytes()[:cut])
        with pytest.raises(ValueError, match=rf"{name} is damaged or truncated \(no end-of-archive block"):
            scan_tars([bad])


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=timeout)


def test_an_image_that_cannot_be_resized_is_stored_as_it_is_and_reported(tmp_path: Path, caplog):
    """Review finding: one undecodable image, or one beyond PIL's decompression-bomb limit (exactly the huge
    images one resizes), aborted the whole write with --resize-long-side."""
    folder = tmp_path / "flat"
    folder.mkdir()
    files = {
        "empty.jpg": b"",
        "broken.png": b"\x89PNG\r\n\x1a\n" + bytes(200),
        "photo.jpg": encode(photo_like(np.random.default_rng(2), 800, 600), "JPEG"),
        # 13400 x 13400 = 180 M pixels: PIL refuses it as a bomb by default (above twice 89 M); 2 MB of JPEG
        "huge.jpg": encode(Image.new("L", (13400, 13400), 128), "JPEG", quality=50),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    options = WriteOptions(samples_per_shard=1, resize_long_side=256)
    with caplog.at_level("WARNING", logger="largemim.data.shard_writer"):
        written = write_shards(scan_folder(folder), tmp_path / "o", options, progress=False)
    assert written.total_samples == 4
    stored = [s.get("jpg", s.get("png")) for s in read_samples(tmp_path / "o")]
    assert files["empty.jpg"] in stored and files["broken.png"] in stored, "kept byte for byte"
    sizes = sorted(Image.open(io.BytesIO(b)).size for b in stored if b not in (files["empty.jpg"], files["broken.png"]))
    assert sizes == [(256, 192), (256, 256)], "the huge image is resized too"
    assert sorted(Path(f.split(":")[0]).name for f in written.not_resized) == ["broken.png", "empty.jpg"]
    assert "2 image(s) could not be resized" in caplog.text and "empty.jpg" in caplog.text

    # In worker processes (their counts come back to the parent), through the command line.
    run = run_tool("--folder", str(folder), "--out", str(tmp_path / "cli"), "--resize-long-side", "256",
                   "--samples-per-shard", "1", "--workers", "2", "--no-progress")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "4 shards, 4 samples; 2 image(s) could not be resized" in run.stdout
    assert "broken.png" in run.stderr and "Traceback" not in run.stderr


def test_overwrite_deletes_the_old_manifest_and_classes_with_the_old_shards(image_folder: Path, tmp_path: Path):
    """Review finding: an interrupted --overwrite left the old manifest, whose counts fit the old shards."""
    source = scan_folder(image_folder)
    out = tmp_path / "out"
    write_shards(source, out, WriteOptions(samples_per_shard=5), progress=False)
    assert (out / "manifest.json").is_file() and (out / "classes.txt").is_file()
    victim = Path(source.samples[-1].members[0].path)
    saved = victim.read_bytes()
    victim.unlink()  # the new write fails part way
    with pytest.raises(FileNotFoundError):
        write_shards(source, out, WriteOptions(samples_per_shard=4, seed=None), overwrite=True, progress=False)
    assert not (out / "manifest.json").exists() and not (out / "classes.txt").exists()
    victim.write_bytes(saved)
    written = write_shards(source, out, WriteOptions(samples_per_shard=4, seed=None), progress=False)
    assert [s.samples for s in Manifest.load(out).shards] == [s.samples for s in written.shards] == [4] * 5 + [3]
    assert (out / "classes.txt").read_text().split() == source.classes


def test_leftover_partial_shards_are_deleted_not_counted(image_folder: Path, tmp_path: Path):
    """Review finding: a PREFIX-NNNNNN.tar.tmp left by a crash (``rm out/*.tar`` keeps it) counted as a shard
    and forced --overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000007.tar.tmp").write_bytes(b"partial")
    (out / "other-000000.tar.tmp").write_bytes(b"not ours")
    write_shards(scan_folder(image_folder), out, WriteOptions(samples_per_shard=10), progress=False)
    assert sorted(p.name for p in out.glob("*.tmp")) == ["other-000000.tar.tmp"]
    assert Manifest.load(out).total_samples == 23


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(image_folder: Path, tmp_path: Path, workers: int):
    """Review finding: Ctrl-C reached the workers too, which left their shard as .tmp, went on writing queued
    shards and printed tracebacks. A FIFO among the images holds one shard's writer still (a real file
    read, blocked until the test writes to it), so that Ctrl-C lands mid-shard every time."""
    fifo = image_folder / "n02_dog" / "zz_slow.jpg"
    os.mkfifo(fifo)
    source = scan_folder(image_folder)
    options = WriteOptions(samples_per_shard=4, seed=0, workers=workers)
    plan = plan_shards(source.samples, options)
    slow = next(s.name for s in plan if any(m.path == str(fifo) for _, x in s.samples for m in x.members))
    out = tmp_path / "out"
    cmd = [*TOOL, "--folder", str(image_folder), "--out", str(out), "--samples-per-shard", "4", "--workers",
           str(workers), "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    others = {s.name for s in plan} - {slow}
    deadline = time.monotonic() + 60
    try:
        while not (out / (slow + ".tmp")).exists() or (workers > 1 and not others <= {p.name for p in out.iterdir()}):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the test failed: leave no writer blocked on the FIFO
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert proc.returncode == 130, stderr
    assert f"interrupted: {len(finished)} of {len(plan)} shards are complete; run the same command to resume" in stderr
    assert "Traceback" not in stderr and not list(out.glob("*.tmp"))
    before_slow = next(s.index for s in plan if s.name == slow)  # one worker writes the shards in order
    assert slow not in finished and len(finished) == (len(plan) - 1 if workers > 1 else before_slow)
    time.sleep(0.3)
    assert sorted(p.name for p in out.glob("*.tar*")) == finished, "no worker goes on writing"

    kept = {name: (out / name).stat().st_ino for name in finished}
    feeder = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)  # an empty image: EOF
    feeder.start()
    try:
        written = write_shards(source, out, options, progress=False)
    finally:
        if feeder.is_alive():  # the write failed before reading the FIFO: release the feeder
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        feeder.join(timeout=10)
    assert written.total_samples == 24 and not list(out.glob("*.tmp"))
    assert {name: (out / name).stat().st_ino for name in kept} == kept, "finished shards must be kept"


def test_file_names_that_are_not_utf8(tmp_path: Path):
    """Review finding: a folder named with a Latin-1 byte (b'caf\\xe9') crashed the plan fingerprint."""
    root = tmp_path / "images"
    for name in (b"caf\xe9", b"tea"):
        folder = os.path.join(os.fsencode(root), name)
        os.makedirs(folder)
        with open(os.path.join(folder, b"img.png"), "wb") as f:
            f.write(encode(photo_like(np.random.default_rng(3), 40, 30), "PNG"))
    source = scan_folder(root)
    assert source.classes == ["caf\udce9", "tea"]
    out = tmp_path / "out"
    assert write_shards(source, out, WriteOptions(samples_per_shard=1), progress=False).total_samples == 2
    assert (out / "classes.txt").read_bytes() == b"caf\xe9\ntea\n", "the name's own bytes"
    assert load_classes(out / "classes.txt") == source.classes
    assert scan_folder(root, load_classes(out / "classes.txt")).samples == source.samples


def test_the_plan_fingerprint_of_utf8_names_is_unchanged():
    """Shards written before stay resumable: the digest below was computed by the earlier code."""
    samples = [SourceSample((Member("jpg", f"/data/caf\u00e9/{i:03d}.jpg", 1000 + i),), i % 3) for i in range(10)]
    samples.append(SourceSample((Member("png", "/data/x.tar", 700, 1536), Member("cls", "/data/x.tar", 1, 2560))))
    options = WriteOptions(prefix="train", samples_per_shard=4, seed=5, resize_long_side=256)
    digest = plan_fingerprint(plan_shards(samples, options), options)
    assert digest == "27edfbb1addd81c71832c2e5bdbb7e4eaa6712ded7ff9b57a719627ab8218e85"


def test_a_list_entry_that_is_not_named_as_an_image_is_refused(image_folder: Path, tmp_path: Path):
    """Review finding: a listed file without an image extension became a member (``00000000.``) no reader decodes."""
    good = next(image_folder.rglob("*.JPEG"))
    for name in ("picture", "anim.gif"):
        (tmp_path / name).write_bytes(good.read_bytes())
        listing = tmp_path / f"{name}.txt"
        listing.write_text(f"{good}\n{tmp_path / name}\n")
        with pytest.raises(ValueError, match=rf"{name}.txt:2: .*{name} is not named as an image.*\.jpg, \.jpeg"):
            scan_list(listing)


def test_a_symlink_loop_in_a_class_folder_is_read_once(image_folder: Path, tmp_path: Path):
    """Review finding: ``cls/up -> ..`` made os.walk (links followed) read the same images again and again."""
    (image_folder / "n01_cat" / "up").symlink_to("..")
    (image_folder / "n02_dog" / "sub").mkdir()
    (image_folder / "n02_dog" / "sub" / "again").symlink_to("..")
    extra = tmp_path / "extra_fish"  # a link that is no loop is still followed
    extra.mkdir()
    for i in range(2):
        (extra / f"x{i}.png").write_bytes(encode(photo_like(np.random.default_rng(i), 30, 30), "PNG"))
    (image_folder / "n03_fish" / "elsewhere").symlink_to(extra)
    source = scan_folder(image_folder)
    paths = [s.members[0].path for s in source.samples]
    assert len(paths) == len(set(paths)) == 25
    assert Counter(s.label for s in source.samples) == Counter({0: 9, 1: 8, 2: 8})


def test_classes_from_the_train_split_number_a_validation_split_alike(image_folder: Path, tmp_path: Path, caplog):
    """Review finding: a split missing one class's images numbered the classes differently from train."""
    train = tmp_path / "train"
    write_shards(scan_folder(image_folder), train, WriteOptions(samples_per_shard=50), progress=False)
    classes = load_classes(train / "classes.txt")
    for p in (image_folder / "n02_dog").iterdir():  # the validation split: no dog images
        p.unlink()
    with caplog.at_level("WARNING", logger="largemim.data.shard_sources"):
        alone = scan_folder(image_folder)
    assert alone.classes == ["n01_cat", "n03_fish"]  # as before, with a warning that says what to do
    assert "'n02_dog'" in caplog.text and "--classes TRAIN_OUT/classes.txt" in caplog.text

    val = scan_folder(image_folder, classes)
    assert val.classes == classes and Counter(s.label for s in val.samples) == Counter({0: 9, 2: 6})
    write_shards(val, tmp_path / "val", WriteOptions(samples_per_shard=50), progress=False)
    assert (tmp_path / "val" / "classes.txt").read_text().splitlines() == classes
    by_bytes = {p.read_bytes(): p.parent.name for p in image_folder.rglob("img_*")}
    for s in read_samples(tmp_path / "val"):
        assert classes[int(s["cls"])] == by_bytes[s.get("jpg", s.get("png"))]

    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{p}\t{p.parent.name}\n" for p in sorted(image_folder.rglob("img_*"))))
    assert [s.label for s in scan_list(listing, classes).samples] == [s.label for s in val.samples]
    listing.write_text(listing.read_text() + f"{next(image_folder.rglob('img_*'))}\tn09_bird\n")
    with pytest.raises(UnknownClassError, match=r"val.txt:16: class 'n09_bird' is not in"):
        scan_list(listing, classes)

    (image_folder / "n09_bird").mkdir()
    (image_folder / "n09_bird" / "b.png").write_bytes(encode(photo_like(np.random.default_rng(4), 30, 30), "PNG"))
    run = run_tool("--folder", str(image_folder), "--out", str(tmp_path / "val2"), "--classes",
                   str(train / "classes.txt"), "--no-progress")  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"class 'n09_bird' is not in {train / 'classes.txt'}; add it at the end" in run.stderr
    assert not (tmp_path / "val2").exists()


def test_cli_errors_are_one_line(image_folder: Path, tmp_path: Path):
    """Review finding: bad options given to WriteOptions, and errors while writing, were tracebacks."""
    base = ["--folder", str(image_folder), "--workers", "1", "--no-progress"]
    (tmp_path / "a_file").write_text("")
    for extra, expected in (
        (["--out", str(tmp_path / "o"), "--resize-long-side", "0"], "error: resize_long_side must be >= 1"),
        (["--out", str(tmp_path / "o"), "--prefix", "a/b"], "error: prefix 'a/b' must be"),
        (["--out", str(tmp_path / "a_file" / "o")], "error: "),  # an OSError from the write: --out under a file
    ):
        run = run_tool(*base, *extra)
        assert run.returncode == 1 and expected in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    assert os.access(REPO / "tools" / "make_shards.py", os.X_OK), "its --help example runs it directly"
