"""``data.decode=device``: JPEGs decoded on the training device (nvJPEG on CUDA), cropped, resized and
flipped there, so loader workers only read headers and draw crops.

A loader worker reads each image's header (``Image.open`` reads no pixels), draws the crop and flip with
the same ``crop_params`` and RNG draws as :class:`~largemim.data.augment.TrainAugment`, and passes the
file's bytes on untouched. The training process decodes a micro-batch's JPEGs in one
``torchvision.io.decode_jpeg(list, device=...)`` call (batched nvJPEG on a CUDA device), then crops each
image, resizes it with antialiased bicubic (rounded to whole grey levels, as the CPU paths' uint8 resize)
and flips it on the device; the trainer normalises the batch there, as for every decode mode. Images
nvJPEG does not take (PNG and other formats, CMYK, palette, 16-bit) are decoded by
:class:`~largemim.data.fast_decode.FastTrainAugment` in the worker, with the crop already drawn. So are
JPEGs cut short (no end-of-image marker after the last scan, :func:`jpeg_complete`): nvJPEG decodes a
truncated file without error (measured on an H200: garbage below the cut), where libjpeg in the worker
refuses it, so the stream skips and counts the sample as on the CPU paths (a crop wholly above the cut is
decoded from those rows, as with ``data.decode=fast``). A batch that fails to decode is decoded one file
at a time; a file that still fails is skipped, counted, and its place taken by a good image of the
batch, as on the CPU paths.

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

CHUNK = 32  # files decoded per call: bounds the full-size images alive on the device at once


@dataclass
class PendingImage:
    """One sample as a worker hands it on: a JPEG file to decode on the device with its crop, or pixels.

    Plain bytes and a numpy array, not tensors: tensors would each cross from the loader worker through
    their own shared-memory file descriptor (hundreds per batch in flight)."""

    file: bytes | None  # the JPEG file; None when ``ready`` holds the pixels
    box: tuple[int, int, int, int]  # (top, left, height, width) of the crop in source pixels
    flip: bool
    ready: np.ndarray | None = None  # (3, S, S) uint8, decoded in the worker (not a JPEG nvJPEG takes)


class EncodedImages:
    """A micro-batch whose JPEGs are decoded on the training device by :meth:`decode`."""

    def __init__(self, items: list[PendingImage], img_size: int):
        self.items, self.img_size = items, img_size

    def __len__(self) -> int:
        return len(self.items)

    def decode(self, device: torch.device | str, fallback: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """(float32 pixels 0..255 of shape (B, 3, S, S) on ``device``, number of files that failed).

        A file that fails is replaced by a good image of the batch; if none decodes, ``fallback`` (the
        previous micro-batch's images) stands in, so one rank never stops alone while the others wait in
        a collective. Decoding goes ``CHUNK`` files at a time, each image cropped and resized as soon as
        its chunk is decoded.
        """
        device = torch.device(device)
        out: list[torch.Tensor | None] = [None] * len(self.items)
        for i, item in enumerate(self.items):
            if item.ready is not None:
                out[i] = torch.from_numpy(item.ready).to(device).float()
        jpegs = [i for i, it in enumerate(self.items) if it.ready is None]
        failed = 0
        for start in range(0, len(jpegs), CHUNK):
            chunk = jpegs[start : start + CHUNK]
            files = [torch.frombuffer(bytearray(self.items[i].file), dtype=torch.uint8) for i in chunk]
            for i, img in zip(chunk, _decode_files(files, device), strict=True):
                if img is None:
                    failed += 1
                else:
                    out[i] = self._crop(img, self.items[i])
        good = [x for x in out if x is not None]
        if not good:
            if fallback is not None and fallback.shape[0] == len(out):
                return fallback, failed
            raise RuntimeError(
                f"none of the {len(out)} JPEGs of a micro-batch could be decoded on {device}; check data.shards "
                "or use data.decode=fast"
            )
        return torch.stack([x if x is not None else good[i % len(good)] for i, x in enumerate(out)]), failed

    def _crop(self, img: torch.Tensor, item: PendingImage) -> torch.Tensor:
        """(3, S, S) float pixels 0..255: crop, antialiased bicubic resize rounded to whole levels, flip."""
        top, left, h, w = item.box
        crop = img[:, top : top + h, left : left + w].unsqueeze(0).float()
        S = self.img_size
        x = F.interpolate(crop, size=(S, S), mode="bicubic", antialias=True)[0].round_().clamp_(0, 255)
        return x.flip(-1) if item.flip else x


def _decode_files(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG files to (3, H, W) uint8 on ``device``: in one batched call, or one by one (None for a
    file that fails) when the batch fails. Running out of device memory is raised, not taken for a bad file.

    On CUDA, torchvision's decoder allocates its outputs on the current stream but writes them from its
    own stream without waiting for the current one, so memory just freed by kernels still queued (the
    previous step's) could be overwritten under them: the current stream is synchronised first."""
    if not files:
        return []
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; they still work.
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        try:
            return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for f in files:
            try:
                out.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=device))
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                out.append(None)
        return out


def jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG file has its end-of-image marker (FF D9) after its last scan: False for a file cut short.

    Entropy-coded data never holds the bytes FF D9 (a data byte FF is written FF 00, restart markers are
    FF D0-D7), so a complete baseline or progressive file has no start-of-scan marker (FF DA) after its
    last FF D9. An EXIF thumbnail's own scan and end-of-image come before the main image's scan, so a cut
    main image is still found. Bytes after the end-of-image that hold FF DA make a whole file look cut:
    it is then decoded in the worker, correctly, only more slowly. Searching from the end reads little
    more than the bytes after the last FF D9."""
    eoi = data.rfind(b"\xff\xd9")
    return eoi >= 0 and data.find(b"\xff\xda", eoi + 2) < 0


class DeviceDecodeAugment:
    """The worker half of ``data.decode=device``: draws crops from headers; TrainAugment's interface."""

    def __init__(self, img_size: int, scale, hflip: bool = True, ratio=(3 / 4, 4 / 3)):
        self.img_size, self.scale, self.ratio, self.hflip = img_size, tuple(scale), tuple(ratio), hflip
        self._cpu = FastTrainAugment(img_size, scale, hflip, ratio)

    def __call__(self, data: bytes, rng: np.random.Generator) -> PendingImage:
        img = Image.open(io.BytesIO(data))  # header only
        width, height = img.size
        # A JPEG cut short is not sent on: nvJPEG would decode it without error, garbage below the cut.
        if img.format == "JPEG" and img.mode in ("RGB", "L") and jpeg_complete(data):
            box = crop_params(width, height, self.scale, self.ratio, rng)
            flip = self.hflip and rng.random() < 0.5  # drawn after the crop, as TrainAugment does
            return PendingImage(bytes(data), box, flip)
        # Not a JPEG nvJPEG decodes to RGB, or one cut short: the worker decodes it (same RNG draws: same crop
        # and flip). libjpeg refuses a truncated file whose crop needs rows past the cut (as data.decode=fast
        # does); the stream skips and counts the sample.
        return PendingImage(None, (0, 0, 0, 0), False, self._cpu(data, rng).numpy())

    def collate(self, items: list[PendingImage]) -> EncodedImages:
        return EncodedImages(items, self.img_size)
