"""data.decode=device: the worker draws crops from headers, the training process decodes on its device.

Runs on the CPU device here (torchvision's libjpeg decode), which is the same code path as nvJPEG on CUDA
but for the decode call; ``tools/gpu_check.sh`` runs the CUDA one.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, demo_samples, write_shards
from PIL import Image
from test_fast_decode import SIZE, assert_same_pixels, encode, modes, photo_like, psnr, to_pixels

from largemim.data.augment import TrainAugment
from largemim.data.device_decode import DeviceDecodeAugment, EncodedImages
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
    broken = good[: len(good) // 2]  # a valid header: only the device decode can find it broken
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
