"""Decode and augment one image with an explicit RNG, so a sample's crop and flip are reproducible.

Training augments return uint8 pixels: loader workers hand over a quarter of the bytes a float batch
would take, and :class:`Normalise` turns them into the model's input on the training device.

RandomResizedCrop parameters follow torchvision's ``RandomResizedCrop.get_params`` (ten tries at a
scale and log-uniform aspect ratio, then a centre crop fallback) but draw from a per-sample
``numpy.random.Generator`` instead of torch's global RNG, which differs per loader worker and resume.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")


def crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode_rgb(data: bytes) -> Image.Image:
    """Any PIL-readable image (grey, palette, CMYK, alpha, 16-bit, float) as 8-bit RGB."""
    img = Image.open(io.BytesIO(data))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: scale to 8 bits, not clip
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = max(float(arr.max()), 0.0) if arr.size else 0.0
        if img.mode.startswith("I;16"):
            peak = 65535.0
        elif img.mode == "F" and top <= 1.0:  # float images are usually 0..1 (PIL's own convert clips to 0/1)
            peak = 1.0
        else:
            peak = max(top, 1.0)
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))  # alpha over white
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


class TrainAugment:
    """RandomResizedCrop(scale, bicubic) + horizontal flip, from raw bytes, as (3, S, S) uint8 pixels."""

    def __init__(self, img_size: int, scale, hflip: bool = True, ratio=(3 / 4, 4 / 3)):
        self.img_size, self.scale, self.ratio, self.hflip = img_size, tuple(scale), tuple(ratio), hflip

    def __call__(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        img = decode_rgb(data)
        top, left, h, w = crop_params(img.width, img.height, self.scale, self.ratio, rng)
        img = TF.resized_crop(img, top, left, h, w, [self.img_size, self.img_size], TF.InterpolationMode.BICUBIC)
        if self.hflip and rng.random() < 0.5:
            img = TF.hflip(img)
        return TF.pil_to_tensor(img)


class Normalise:
    """``(pixels / 255 - mean) / std`` as float32, for pixels 0..255 (uint8, or float from device decoding).

    Run on the training device after the copy: one multiply-add there, instead of a float conversion in
    every loader worker and four times the bytes through pinned memory and PCIe. Out of place, so a
    batch kept aside (the device decoder's fallback) is never changed."""

    def __init__(self, mean, std):
        std_t = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
        self._mul = 1.0 / (255.0 * std_t)
        self._add = -torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1) / std_t
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.device not in self._on:
            self._on[pixels.device] = (self._mul.to(pixels.device), self._add.to(pixels.device))
        mul, add = self._on[pixels.device]
        return torch.addcmul(add, pixels.to(torch.float32), mul)


class EvalTransform:
    """Resize the whole image to img_size x img_size (bicubic) and normalise: no randomness."""

    def __init__(self, img_size: int, mean, std):
        self.img_size, self.mean, self.std = img_size, list(mean), list(std)

    def __call__(self, data: bytes) -> torch.Tensor:
        img = decode_rgb(data).resize((self.img_size, self.img_size), Image.BICUBIC)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)


def image_bytes(sample: dict) -> bytes | None:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None
