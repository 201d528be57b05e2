"""TrainAugment's crop, flip and normalise, decoding no more pixels than the crop needs.

The crop is drawn from the image's header size (``Image.open`` reads only the header), with the same
``crop_params`` and the same RNG draws as :class:`~largemim.data.augment.TrainAugment`, so the two give
the same crop and flip for the same generator. A JPEG is then decoded by libjpeg at 1/2, 1/4 or 1/8
scale (DCT scaling, ``Image.draft``) when the crop stays at least the output size at that scale, so
a reduced decode is never upsampled. The crop box is mapped into the decoded image (rounded to whole
pixels of it: a shift of under half a pixel of the output) and cropped as a view, then resized by
torch's uint8 antialiased bicubic, which matches PIL's bicubic to within one grey level and is several
times faster than ``Image.resize`` (the resize, not the decode, is most of the reference pipeline's
time on ImageNet-size images). ``tools/bench_loader.py`` measures the gain.

Grey images are resized in one channel and repeated to RGB at the output size; rarer modes (CMYK,
palette, alpha, 16-bit) go through :func:`~largemim.data.augment.decode_rgb` first.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from largemim.data.augment import crop_params, decode_rgb

DCT_SCALES = (8, 4, 2)  # the reductions libjpeg applies while decoding (as Image.draft chooses them)


def dct_scale(crop_w: int, crop_h: int, out_size: int) -> int:
    """The largest JPEG decode reduction that keeps a crop of crop_w x crop_h at least out_size on both sides."""
    for s in DCT_SCALES:
        if crop_w >= out_size * s and crop_h >= out_size * s:
            return s
    return 1


def _pixels(img: Image.Image) -> torch.Tensor:
    """(H, W, C) uint8 tensor of the image's pixels."""
    arr = np.asarray(img)  # read-only: backed by the bytes PIL hands out; nothing below writes to it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about read-only arrays
        t = torch.from_numpy(arr)
    return t.unsqueeze(-1) if t.ndim == 2 else t


class FastTrainAugment:
    """RandomResizedCrop(scale, bicubic) + horizontal flip + normalise, from raw bytes; TrainAugment's interface."""

    def __init__(self, img_size: int, scale, mean, std, hflip: bool = True, ratio=(3 / 4, 4 / 3)):
        self.img_size, self.scale, self.ratio, self.hflip = img_size, tuple(scale), tuple(ratio), hflip
        self.mean, self.std = list(mean), list(std)
        # normalise((x / 255 - mean) / std) as one multiply and one add on the resized pixels
        std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self._mul = 1.0 / (255.0 * std_t)
        self._add = -torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def crop_uint8(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        """The cropped, resized and flipped image as a (3, img_size, img_size) uint8 tensor."""
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        top, left, h, w = crop_params(width, height, self.scale, self.ratio, rng)
        flip = self.hflip and rng.random() < 0.5  # drawn after the crop, as TrainAugment does
        s = 1
        if img.mode not in ("RGB", "L"):  # rarer modes: the reference conversion of the whole image
            img = decode_rgb(data)
        elif img.format == "JPEG":
            s = dct_scale(w, h, self.img_size)
            if s > 1:
                # Asks for the image at 1/s (PIL picks the largest reduction with size >= request) and
                # reads back the reduction it applied (none if the file cannot be drafted).
                drafted = img.draft(img.mode, (width // s, height // s))
                s = round(width / drafted[1][2]) if drafted else 1
        # libjpeg's reduced pixel i covers source pixels [i*s, (i+1)*s): the box maps by 1/s, rounded to
        # whole pixels of the decoded image. Cropping in PIL before the array copy packs only the region.
        x0, y0 = round(left / s), round(top / s)
        x1 = min(img.width, max(x0 + 1, round((left + w) / s)))
        y1 = min(img.height, max(y0 + 1, round((top + h) / s)))
        crop = _pixels(img.crop((x0, y0, x1, y1))).permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w), channels-last
        # torch's uint8 antialiased bicubic (a = -0.5, as PIL's) on a channels-last view is several
        # times faster than PIL's resize and within one grey level of it.
        out = F.interpolate(crop, size=(self.img_size, self.img_size), mode="bicubic", antialias=True)[0]
        if flip:
            out = out.flip(-1)
        return out.repeat(3, 1, 1) if out.shape[0] == 1 else out

    def __call__(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        x = self.crop_uint8(data, rng).to(torch.float32)
        return x.mul_(self._mul).add_(self._add)
