"""TrainAugment's crop, flip and resize, decoding no more of the JPEG than the crop needs.

The crop is drawn from the image's header size (``Image.open`` reads only the header), with the same
``crop_params`` and the same RNG draws as :class:`~largemim.data.augment.TrainAugment`, so the two give
the same crop and flip for the same generator. A JPEG is then decoded by libjpeg at 1/2, 1/4 or 1/8
scale (DCT scaling, ``Image.draft``) when the crop stays at least the output size at that scale, so
a reduced decode is never upsampled, and only down to the crop's bottom row (:func:`load_top_rows`):
libjpeg reads a baseline JPEG top-down, so the rows below the crop are never entropy-decoded, which
is most of the decode's time. The crop box is mapped into the decoded image (rounded to whole pixels
of it: a shift of under half a pixel of the output) and cropped as a view, then resized by torch's
uint8 antialiased bicubic, which matches PIL's bicubic to within one grey level and is several times
faster than ``Image.resize`` (the resize, not the decode, is most of the reference pipeline's time on
ImageNet-size images). The result stays uint8: it is normalised on the training device
(:class:`~largemim.data.augment.Normalise`). ``tools/bench_loader.py`` measures the gain.

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


def load_top_rows(img: Image.Image, rows: int) -> bool:
    """Decode only a JPEG's top ``rows`` rows into ``img``; False where that could not be confirmed.

    libjpeg writes a baseline JPEG's rows top-down, entropy-decoding as it goes, so stopping at the
    crop's bottom row saves the rest of the file's decoding (a progressive JPEG is read whole first and
    saves only the colour conversion). Pillow decodes the rows its tile's extents name; asked for fewer
    than the image has, libjpeg's end-of-image check then reports the unread rows as a broken stream,
    which is expected here. Whether the rows were all decoded is read back from the image: Pillow
    allocates it zeroed and the decoder writes whole rows in order, so the last row asked for must hold
    a non-zero pixel and the next one none. Otherwise (a black last row, a decoder error before it, a
    Pillow that behaves differently) the caller decodes the whole image, as the reference does.
    A file that ends before ``rows`` is an error, as in a full decode; a file damaged only below them
    is used, with the pixels a whole decode gives above the damage (a whole decode would refuse it).
    """
    if len(img.tile) != 1 or not hasattr(img.tile[0], "_replace") or rows >= img.height:
        return False  # several tiles, or a Pillow without named tiles (< 11.1): not handled
    tile = img.tile[0]
    if tuple(tile.extents) != (0, 0, img.width, img.height):
        return False
    img.tile = [tile._replace(extents=(0, 0, img.width, rows))]
    try:
        img.load()
    except OSError:
        if img.tile:  # raised before decoding finished: the file ended early (truncated)
            raise
    edge = np.frombuffer(img.crop((0, rows - 1, img.width, rows + 1)).tobytes(), dtype=np.uint8)
    last, below = np.split(edge, 2)
    return bool(last.any()) and not below.any()


class FastTrainAugment:
    """RandomResizedCrop(scale, bicubic) + horizontal flip from raw bytes, as (3, S, S) uint8 pixels;
    TrainAugment's interface and, within JPEG-scaling error, its output."""

    def __init__(self, img_size: int, scale, hflip: bool = True, ratio=(3 / 4, 4 / 3)):
        self.img_size, self.scale, self.ratio, self.hflip = img_size, tuple(scale), tuple(ratio), hflip
        # JPEGs decoded only down to the crop, and partial decodes redone whole (tests, tools/bench_loader.py)
        self.partial_decodes = self.partial_fallbacks = 0

    def _prepare(self, img: Image.Image, data: bytes, crop_w: int, crop_h: int) -> tuple[Image.Image, int]:
        """The opened image, a JPEG set to decode at the largest reduction the crop allows; the reduction."""
        if img.mode not in ("RGB", "L"):  # rarer modes: the reference conversion of the whole image
            return decode_rgb(data), 1
        s = dct_scale(crop_w, crop_h, self.img_size) if img.format == "JPEG" else 1
        if s > 1:
            # Asks for the image at 1/s (PIL picks the largest reduction with size >= request) and reads
            # back the reduction it applied (none if the file cannot be drafted).
            width, height = img.size
            drafted = img.draft(img.mode, (width // s, height // s))
            s = round(width / drafted[1][2]) if drafted else 1
        return img, s

    def __call__(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        img = Image.open(io.BytesIO(data))  # reads the header only
        width, height = img.size
        top, left, h, w = crop_params(width, height, self.scale, self.ratio, rng)
        flip = self.hflip and rng.random() < 0.5  # drawn after the crop, as TrainAugment does
        img, s = self._prepare(img, data, w, h)
        # libjpeg's reduced pixel i covers source pixels [i*s, (i+1)*s): the box maps by 1/s, rounded to
        # whole pixels of the decoded image.
        x0, y0 = round(left / s), round(top / s)
        x1 = min(img.width, max(x0 + 1, round((left + w) / s)))
        y1 = min(img.height, max(y0 + 1, round((top + h) / s)))
        if img.format == "JPEG" and y1 < img.height:
            if load_top_rows(img, y1):
                self.partial_decodes += 1
            else:
                self.partial_fallbacks += 1
                img, s = self._prepare(Image.open(io.BytesIO(data)), data, w, h)  # all of it (same box)
        # Cropping in PIL before the array copy packs only the region.
        crop = _pixels(img.crop((x0, y0, x1, y1))).permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w), channels-last
        # torch's uint8 antialiased bicubic (a = -0.5, as PIL's) on a channels-last view is several
        # times faster than PIL's resize and within one grey level of it.
        out = F.interpolate(crop, size=(self.img_size, self.img_size), mode="bicubic", antialias=True)[0]
        if flip:
            out = out.flip(-1)
        return out.repeat(3, 1, 1) if out.shape[0] == 1 else out
