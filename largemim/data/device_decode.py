"""``data.decode=device``: JPEGs decoded on the training device (nvJPEG on CUDA), cropped, resized, flipped
and normalised there, so loader workers only read headers and draw crops.

A loader worker reads each image's header (``Image.open`` reads no pixels), draws the crop and flip with
the same ``crop_params`` and RNG draws as :class:`~largemim.data.augment.TrainAugment`, and passes the
file's bytes on untouched. The training process decodes a micro-batch's JPEGs in one
``torchvision.io.decode_jpeg(list, device=...)`` call (batched nvJPEG on a CUDA device), then crops each
image, resizes it with antialiased bicubic (rounded to whole grey levels, as the CPU paths' uint8 resize),
flips and normalises it on the device. Images nvJPEG does not take (PNG and other formats, CMYK, palette,
16-bit) are decoded by :class:`~largemim.data.fast_decode.FastTrainAugment` in the worker, with the crop
already drawn. A batch that fails to decode is decoded one file at a time; a file that still fails is
skipped, counted, and its place taken by a good image of the batch, as on the CPU paths.

On a CPU device the same code decodes with libjpeg in the training process: correct (the tests run it)
but slower than ``data.decode=fast``, which decodes in the workers at reduced scale.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from largemim.data.augment import crop_params
from largemim.data.fast_decode import FastTrainAugment


@dataclass
class PendingImage:
    """One sample as a worker hands it on: a JPEG file to decode on the device with its crop, or pixels."""

    file: torch.Tensor | None  # the JPEG's bytes as a 1-D uint8 tensor; None when ``ready`` holds the pixels
    box: tuple[int, int, int, int]  # (top, left, height, width) of the crop in source pixels
    flip: bool
    ready: torch.Tensor | None = None  # (3, S, S) uint8, decoded in the worker (not a JPEG nvJPEG takes)


class EncodedImages:
    """A micro-batch whose JPEGs are decoded on the training device by :meth:`decode`."""

    def __init__(self, items: list[PendingImage], img_size: int, mean, std):
        self.items, self.img_size = items, img_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.items)

    def decode(self, device: torch.device | str) -> tuple[torch.Tensor, int]:
        """(normalised float32 images of shape (B, 3, S, S) on ``device``, number of files that failed)."""
        device = torch.device(device)
        jpegs = [i for i, it in enumerate(self.items) if it.ready is None]
        decoded = dict(zip(jpegs, _decode_files([self.items[i].file for i in jpegs], device), strict=True))
        S = self.img_size
        out: list[torch.Tensor | None] = []
        for i, item in enumerate(self.items):
            if item.ready is not None:
                out.append(item.ready.to(device, non_blocking=True).float())
                continue
            img = decoded[i]
            if img is None:
                out.append(None)
                continue
            top, left, h, w = item.box
            crop = img[:, top : top + h, left : left + w].unsqueeze(0).float()
            x = F.interpolate(crop, size=(S, S), mode="bicubic", antialias=True)[0].round_().clamp_(0, 255)
            out.append(x.flip(-1) if item.flip else x)
        good = [x for x in out if x is not None]
        failed = len(out) - len(good)
        if not good:
            raise RuntimeError(
                f"none of the {len(out)} JPEGs of a micro-batch could be decoded on {device}; check data.shards "
                "or use data.decode=fast"
            )
        images = torch.stack([x if x is not None else good[i % len(good)] for i, x in enumerate(out)])
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1) * 255.0
        return images.sub_(mean).div_(std), failed


def _decode_files(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG files to (3, H, W) uint8 on ``device``: in one batched call, or one by one (None for a
    file that fails) when the batch fails."""
    if not files:
        return []
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; they still work.
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        try:
            return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for f in files:
            try:
                out.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


class DeviceDecodeAugment:
    """The worker half of ``data.decode=device``: draws crops from headers; TrainAugment's interface."""

    def __init__(self, img_size: int, scale, mean, std, hflip: bool = True, ratio=(3 / 4, 4 / 3)):
        self.img_size, self.scale, self.ratio, self.hflip = img_size, tuple(scale), tuple(ratio), hflip
        self.mean, self.std = list(mean), list(std)
        self._cpu = FastTrainAugment(img_size, scale, mean, std, hflip, ratio)

    def __call__(self, data: bytes, rng: np.random.Generator) -> PendingImage:
        img = Image.open(io.BytesIO(data))  # header only
        width, height = img.size
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            box = crop_params(width, height, self.scale, self.ratio, rng)
            flip = self.hflip and rng.random() < 0.5  # drawn after the crop, as TrainAugment does
            return PendingImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip)
        # Not a JPEG nvJPEG decodes to RGB: the worker decodes it (same RNG draws: same crop and flip).
        return PendingImage(None, (0, 0, 0, 0), False, self._cpu.crop_uint8(data, rng))

    def collate(self, items: list[PendingImage]) -> EncodedImages:
        return EncodedImages(items, self.img_size, self.mean, self.std)
