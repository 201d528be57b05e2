#!/usr/bin/env python
"""Check data.decode=device on a device against the same batch decoded on the CPU: pixels of every good
file (grey and 4:4:4 JPEGs among them, all sent on to the device), and a truncated file refused in the
worker, before either decode (nvJPEG would decode it without error). Run by tools/gpu_check.sh on a CUDA
machine; on a CPU machine it compares the CPU with itself (a smoke test of the script). Exit status 0
only if every check holds.

    python tools/check_device_decode.py --device cuda
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.data.device_decode import DeviceDecodeAugment  # noqa: E402


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields, sharp-edged shapes and fine grain: what makes a reduced JPEG decode differ.
    (tests/test_fast_decode.py draws its test images with this one.)"""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 64, width // 64, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-6, 7, (height, width, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(25):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(20, 200)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    files = [jpeg(photo_like(w, h, i), quality=90) for i, (w, h) in enumerate([(500, 375), (1600, 1200)] * 8)]
    files += [jpeg(photo_like(640, 480, 99).convert("L"), quality=90)]  # grey
    files += [jpeg(photo_like(800, 600, 98), quality=90, subsampling=0)]  # 4:4:4 chroma
    broken = jpeg(photo_like(700, 500, 97))
    # A valid header and a third of the data: fewer rows than any crop reaches down to (a crop of scale >= 0.2
    # is at least 0.39 of the height), so the worker's CPU decode refuses it whatever the crop.
    files += [broken[: len(broken) // 3]]
    aug = DeviceDecodeAugment(args.size, (0.2, 1.0))
    items, refused = [], []
    for i, d in enumerate(files):
        try:
            items.append(aug(d, np.random.default_rng(i)))
        except OSError:  # the worker's decode refused it: the stream skips and counts the sample
            refused.append(i)
    sent = sum(it.file is not None for it in items)  # the rest were decoded in the worker
    batch = aug.collate(items)
    on_device, failed_device = batch.decode(args.device)
    on_cpu, failed_cpu = batch.decode("cpu")
    diff = (on_device.cpu() - on_cpu).abs()  # grey levels
    per_image = diff.mean(dim=(1, 2, 3))
    print(f"device {args.device}: {len(files)} files, {sent} sent on to the device, refused in the worker "
          f"{refused}, failed on device {failed_device}, on CPU {failed_cpu}")  # fmt: skip
    print(f"mean |device - CPU| per image, grey levels: {np.round(per_image.numpy(), 3).tolist()}")
    print(f"max |device - CPU|: {diff.max().item():.1f}; share of pixels off by more than 4: "
          f"{(diff > 4).float().mean().item():.4f}")  # fmt: skip
    ok = per_image.max().item() < 2.0 and failed_device == failed_cpu == 0
    ok = ok and refused == [len(files) - 1] and sent == len(files) - 1  # only the truncated file kept back
    why = "disagree beyond rounding, a good file failed or was kept back, or the truncated one was not refused"
    print("OK" if ok else f"MISMATCH: nvJPEG and libjpeg {why}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
