"""data.decode=device: the worker draws crops from headers, the training process decodes on its device.

Runs on the CPU device here (torchvision's libjpeg decode), which is the same code path as nvJPEG on CUDA
but for the decode call; ``tools/gpu_check.sh`` runs the CUDA one.
"""

from __future__ import annotations

import io
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, demo_samples, write_shards
from PIL import ExifTags, Image
from test_fast_decode import SIZE, assert_same_pixels, encode, modes, photo_like, psnr, to_pixels

from largemim.data.augment import TrainAugment
from largemim.data.device_decode import DeviceDecodeAugment, EncodedImages, jpeg_complete
from largemim.data.stream import ShardStream, StreamSpec, build_train_loader


@pytest.fixture(scope="module")
def pair():
    return DeviceDecodeAugment(SIZE, (0.2, 1.0)), TrainAugment(SIZE, (0.2, 1.0))


def decode_one(aug: DeviceDecodeAugment, data: bytes, seed: int) -> torch.Tensor:
    images, failed = aug.collate([aug(data, np.random.default_rng(seed))]).decode("cpu")
    assert failed == 0
    return images[0]


@pytest.mark.parametrize("name", ["jpeg", "jpeg-large", "L-jpeg-large", "CMYK-jpeg", "RGBA-png", "I;16-png"])
def test_same_crop_flip_and_pixels_as_the_reference(pair, name):
    """Full-size decode on the device, then the crop the reference draws from the same generator."""
    dev, ref = pair
    jpegs = {"jpeg": photo_like(500, 375), "jpeg-large": photo_like(1600, 1200, seed=2)}
    data = encode(jpegs[name], "JPEG", quality=90) if name in jpegs else modes()[name]
    for seed in range(4):
        a, b = decode_one(dev, data, seed), ref(data, np.random.default_rng(seed))
        assert a.shape == b.shape == (3, SIZE, SIZE) and a.dtype == torch.float32 and b.dtype == torch.uint8
        if name == "L-jpeg-large":  # the worker's reduced-scale decode of a grey JPEG is not involved: libjpeg's
            assert psnr(a, b) > 40.0  # grey-to-RGB conversion differs from PIL's by rounding only
        else:
            assert_same_pixels(a, b, f"{name} seed {seed}")


def test_only_jpegs_travel_undecoded(pair):
    dev, _ = pair
    jpeg = dev(encode(photo_like(300, 200), "JPEG"), np.random.default_rng(0))
    png = dev(encode(photo_like(300, 200), "PNG"), np.random.default_rng(0))
    cmyk = dev(modes()["CMYK-jpeg"], np.random.default_rng(0))
    assert jpeg.file is not None and jpeg.ready is None
    assert png.file is None and png.ready.shape == (3, SIZE, SIZE) and png.ready.dtype == np.uint8
    assert cmyk.file is None  # nvJPEG takes no CMYK: decoded in the worker


def test_an_undecodable_file_is_counted_and_replaced(pair):
    dev, _ = pair
    good = encode(photo_like(400, 300), "JPEG")
    # A bogus Huffman table (code counts past 256): the header and the end-of-image marker pass the worker's
    # checks, and only the decode finds the file broken.
    dht = good.find(b"\xff\xc4")
    broken = good[: dht + 5] + b"\xff" * 16 + good[dht + 21 :]
    items = [dev(d, np.random.default_rng(i)) for i, d in enumerate([good, broken, good])]
    images, failed = dev.collate(items).decode("cpu")
    assert failed == 1 and images.shape == (3, 3, SIZE, SIZE) and torch.isfinite(images).all()
    assert torch.equal(images[1], images[0]) or torch.equal(images[1], images[2])  # a good image took its place
    with pytest.raises(RuntimeError, match="none of the 1 JPEGs"):
        dev.collate([items[1]]).decode("cpu")
    # with the previous micro-batch as a stand-in, a batch of nothing but broken files does not stop the rank
    previous = images[:1]
    stand_in, failed = dev.collate([items[1]]).decode("cpu", fallback=previous)
    assert failed == 1 and stand_in is previous


def cut_short(data: bytes, where: str) -> bytes:
    """A JPEG cut after a third of its scan data (fewer rows than any crop of scale >= 0.2 reaches down
    to: the crop is at least sqrt(0.2 * 3/4) = 0.39 of the height), or a progressive one between or
    in the middle of its scans."""
    scans = [m.start() for m in re.finditer(b"\xff\xda", data)]
    if where == "third":
        return data[: scans[0] + (len(data) - scans[0]) // 3]
    assert len(scans) > 5, "not a progressive JPEG"
    return data[: scans[3]] if where == "between-scans" else data[: (scans[3] + scans[4]) // 2]


@pytest.mark.parametrize("kind,where", [("baseline", "third"), ("progressive", "between-scans"),
                                        ("progressive", "mid-scan")])  # fmt: skip
def test_a_jpeg_cut_short_is_decoded_in_the_worker_not_sent_on(pair, kind, where):
    """nvJPEG decodes a truncated JPEG without error (garbage below the cut): the worker does not send one
    on; its CPU decode (libjpeg) refuses it, which the stream counts. Whole JPEGs of every kind are sent on."""
    dev, _ = pair
    img = photo_like(480, 360, seed=6)
    whole = encode(img, "JPEG", quality=90, progressive=kind == "progressive")
    cut = cut_short(whole, where)
    assert jpeg_complete(whole) and not jpeg_complete(cut)
    for options in ({}, {"progressive": True}, {"restart_marker_rows": 1}, {"subsampling": 0}):
        assert dev(encode(img, "JPEG", quality=90, **options), np.random.default_rng(0)).file is not None
    assert dev(encode(img.convert("L"), "JPEG", progressive=True), np.random.default_rng(0)).file is not None
    for seed in range(4):
        with pytest.raises(OSError, match="truncated"):
            dev(cut, np.random.default_rng(seed))


def test_a_jpeg_cut_short_is_skipped_and_counted_by_the_stream(tmp_path):
    """Through ShardStream: the cut files are skipped and counted in the worker (Batch.skipped), their places
    taken by good images, and nothing fails in the training process's decode."""
    files = [encode(photo_like(200, 150, seed=s), "JPEG", quality=90) for s in range(6)]
    files.insert(2, cut_short(files[0], "third"))
    files.insert(5, cut_short(encode(photo_like(200, 150, seed=7), "JPEG", progressive=True), "mid-scan"))
    write_shards(tmp_path, [{"__key__": f"{i:04d}", "jpg": f, "cls": b"0"} for i, f in enumerate(files)], [8])
    url = str(tmp_path / "shard-000000.tar")
    spec = StreamSpec(((url,),), 4, 2, rank=0, world_size=1, seed=0, shuffle_buffer=1, sampling="exact",
                      lanes=1, expected={url: 8})  # fmt: skip
    stream = iter(ShardStream(spec, DeviceDecodeAugment(32, (0.2, 1.0))))
    batches = [next(stream) for _ in range(2)]  # one epoch: every sample once
    assert sum(b.skipped for b in batches) == 2
    for b in batches:
        images, failed = b.images.decode("cpu")
        assert failed == 0 and images.shape == (4, 3, 32, 32)
        assert sum(it.file is not None for it in b.images.items) == 4  # the places taken by good JPEGs


def with_exif_thumbnail(data: bytes, thumbnail: bytes) -> bytes:
    """``data`` with an EXIF APP1 segment after its SOI holding ``thumbnail`` as IFD1's JPEG, as cameras write."""
    tiff = b"II*\0" + struct.pack("<I", 8)  # little-endian TIFF, IFD0 at offset 8
    tiff += struct.pack("<HI", 0, 14)  # IFD0: no entries, IFD1 at 8 + 6
    entries = ((0x0201, 14 + 30), (0x0202, len(thumbnail)))  # JPEGInterchangeFormat (after IFD1) and its length
    tiff += struct.pack("<H", 2) + b"".join(struct.pack("<HHII", tag, 4, 1, v) for tag, v in entries)
    payload = b"Exif\0\0" + tiff + struct.pack("<I", 0) + thumbnail  # IFD1 ends with no next IFD
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def test_a_cut_main_image_behind_a_whole_exif_thumbnail_is_found(pair):
    """The thumbnail's scan and end-of-image come first in the file: the main image's cut is still found."""
    dev, ref = pair
    thumbnail = encode(photo_like(160, 120, seed=8), "JPEG", quality=80)
    whole = with_exif_thumbnail(encode(photo_like(480, 360, seed=9), "JPEG", quality=90), thumbnail)
    opened = Image.open(io.BytesIO(whole))
    ifd1 = opened.getexif().get_ifd(ExifTags.IFD.IFD1)  # where EXIF readers find the thumbnail
    start = len(b"Exif\0\0") + ifd1[0x0201]
    assert opened.info["exif"][start : start + ifd1[0x0202]] == thumbnail and opened.size == (480, 360)
    cut = whole[: whole.rfind(b"\xff\xda") + (len(whole) - whole.rfind(b"\xff\xda")) // 3]
    assert b"\xff\xd9" in cut  # the thumbnail's end-of-image survives the cut
    assert jpeg_complete(whole) and not jpeg_complete(cut)
    assert dev(whole, np.random.default_rng(0)).file is not None
    assert_same_pixels(decode_one(dev, whole, 0), ref(whole, np.random.default_rng(0)), "with a thumbnail")
    for seed in range(4):
        with pytest.raises(OSError, match="truncated"):
            dev(cut, np.random.default_rng(seed))


@pytest.mark.parametrize("trailer", [
    pytest.param(b"\0" * 64, id="zeros"),
    pytest.param(b"\xff\xda\x00\x0c" + bytes(range(200)), id="start-of-scan-and-bytes"),
    pytest.param(b"\xff\xd8\xff\xda" + b"\xff" * 9, id="start-of-image-and-of-scan"),
])  # fmt: skip
def test_bytes_after_the_end_of_image_change_no_pixels(pair, trailer):
    """A whole JPEG with bytes after its end-of-image: decoded as without them, on the device or (where the
    bytes hold FF DA, so the file looks cut short) in the worker."""
    dev, ref = pair
    clean = encode(photo_like(500, 375, seed=10), "JPEG", quality=90)
    data = clean + trailer
    assert (dev(data, np.random.default_rng(0)).file is None) == (b"\xff\xda" in trailer)
    for seed in range(3):
        assert_same_pixels(decode_one(dev, data, seed), ref(clean, np.random.default_rng(seed)), f"seed {seed}")


def test_decoding_in_chunks_gives_the_same_batch(pair, monkeypatch):
    dev, _ = pair
    files = [encode(photo_like(320 + 16 * i, 240), "JPEG") for i in range(5)] + [encode(photo_like(200, 200), "PNG")]
    batch = dev.collate([dev(d, np.random.default_rng(i)) for i, d in enumerate(files)])
    whole, _ = batch.decode("cpu")
    monkeypatch.setattr("largemim.data.device_decode.CHUNK", 2)
    chunked, failed = batch.decode("cpu")
    assert failed == 0 and torch.equal(whole, chunked)


def test_stream_batches_equal_the_reference_stream(tmp_path):
    """Real images in tar shards (as RGB JPEGs, every fifth a grey PNG) through the loader with 2 workers:
    the device path gives the reference pipeline's batches."""
    samples = []
    for i, s in enumerate(demo_samples("train", 96)):
        img = Image.open(io.BytesIO(s["png"])).resize((84, 84), Image.BICUBIC)
        fmt = ("png", "PNG", {}) if i % 5 == 0 else ("jpg", "JPEG", {"quality": 95})
        img = img if i % 5 == 0 else img.convert("RGB")
        samples.append({"__key__": s["__key__"], fmt[0]: encode(img, fmt[1], **fmt[2]), "cls": s["cls"]})
    pattern = write_shards(tmp_path, samples, [24, 24, 24, 24])
    urls = tuple(str(tmp_path / f"shard-{n:06d}.tar") for n in range(4))
    assert pattern.endswith("shard-{000000..000003}.tar")
    spec = StreamSpec((urls,), 6, 8, rank=0, world_size=1, seed=3, shuffle_buffer=10, lanes=2)
    dev = DeviceDecodeAugment(32, (0.2, 1.0))
    ref = TrainAugment(32, (0.2, 1.0))
    got = iter(build_train_loader(spec, dev, workers=2, start_batch=0, pin=False))
    want = iter(ShardStream(spec, ref))
    for _ in range(6):
        batch, expected = next(got), next(want)
        assert isinstance(batch.images, EncodedImages) and batch.index == expected.index
        assert sum(it.file is not None for it in batch.images.items) >= 3  # mostly JPEGs, decoded below
        images, failed = batch.images.decode("cpu")
        assert failed == 0 and images.shape == expected.images.shape
        # Small upscaled images with hard edges: the device's float resize, rounded once, against PIL's two
        # rounded passes differs by about a tenth of a grey level on average and never by more than three.
        diff = (to_pixels(images) - to_pixels(expected.images)).abs()
        assert diff.mean() < 0.25 and diff.max() < 3.01, f"batch {batch.index}: {diff.mean():.3f}, {diff.max():.2f}"


def test_the_gpu_check_script_runs_on_the_cpu():
    """tools/check_device_decode.py, which tools/gpu_check.sh runs against nvJPEG, on the CPU device."""
    proc = subprocess.run([sys.executable, str(REPO / "tools/check_device_decode.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr[-2000:]
