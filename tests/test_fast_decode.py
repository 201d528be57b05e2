"""FastTrainAugment against the reference TrainAugment: same crops and flips, same pixels within JPEG-scaling error;
its decode stopped at the crop's bottom row gives the whole decode's pixels; Normalise."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import largemim.data.fast_decode as fast_decode
from largemim.data.augment import Normalise, TrainAugment, crop_params, decode_rgb
from largemim.data.fast_decode import FastTrainAugment, dct_scale, load_top_rows
from tools.check_device_decode import photo_like

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # for Normalise
SIZE = 224
WALLPAPERS = Path("/usr/share/wallpapers")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (to_pixels(a) - to_pixels(b)).pow(2).mean().item()
    return 10 * np.log10(255**2 / max(mse, 1e-10))


def assert_same_pixels(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal but for rounding: torch and PIL round and clip the two resize passes' intermediate differently,
    which moves pixels beside hard edges by up to ~15 levels (~0.5% of them on a black-and-white image)
    and the rest by at most one."""
    diff = (to_pixels(a) - to_pixels(b)).abs()
    assert diff.mean() < 0.1 and (diff > 2.5).float().mean() < 0.01, f"{what}: mean {diff.mean():.3f}"


@pytest.fixture(scope="module")
def pair():
    return FastTrainAugment(SIZE, (0.2, 1.0)), TrainAugment(SIZE, (0.2, 1.0))


def large_jpegs() -> list[tuple[str, bytes]]:
    images = [("synthetic", encode(photo_like(1600, 1200), "JPEG", quality=90))]
    for name in ("Kite", "ColorfulCups"):  # real photos, where Debian's plasma-workspace-wallpapers is installed
        path = WALLPAPERS / name / "contents" / "images" / "2560x1600.jpg"
        if path.is_file():
            images.append((name, path.read_bytes()))
    return images


def test_output_shape_dtype_and_range(pair):
    fast, _ = pair
    for data in (encode(photo_like(500, 375), "JPEG"), encode(photo_like(300, 200), "PNG")):
        x = fast(data, np.random.default_rng(0))
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.uint8 and x.is_contiguous()
        assert 50 < x.float().std() < 128  # an image, not a blank


def test_normalise_matches_torchvision_and_leaves_its_input_alone():
    import torchvision.transforms.functional as TF

    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = torch.stack([TF.normalize(p.float() / 255, MEAN, STD) for p in pixels])
    out = Normalise(MEAN, STD)(pixels)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
    as_float = pixels.float()  # the device decoder hands over float pixels, kept as its fallback batch
    assert torch.allclose(Normalise(MEAN, STD)(as_float), expected, atol=1e-5)
    assert torch.equal(as_float, pixels.float())


def test_dct_scale_never_upsamples():
    assert dct_scale(224, 224, 224) == 1 and dct_scale(447, 2000, 224) == 1
    assert dct_scale(448, 448, 224) == 2 and dct_scale(900, 1000, 224) == 4 and dct_scale(5000, 1800, 224) == 8
    for w in range(100, 3000, 37):
        s = dct_scale(w, w + 50, SIZE)
        assert w / s >= SIZE or s == 1


@pytest.mark.parametrize("name,data", [pytest.param(n, d, id=n) for n, d in large_jpegs()])
def test_large_jpeg_matches_reference(pair, name, data):
    fast, ref = pair
    width, height = Image.open(io.BytesIO(data)).size
    scales, scores = [], []
    for seed in range(8):
        _, _, h, w = crop_params(width, height, (0.2, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed))
        scales.append(dct_scale(w, h, SIZE))
        a, b = fast(data, np.random.default_rng(seed)), ref(data, np.random.default_rng(seed))
        scores.append(psnr(a, b))
        assert (to_pixels(a) - to_pixels(b)).abs().mean() < 3.0, f"{name} seed {seed}"
    assert max(scales) >= 2, "the reduced-decode path was not exercised"
    assert min(scores) > 30.0, f"{name}: PSNR {np.round(scores, 1)} dB"


def test_full_size_decode_matches_reference_closely(pair):
    """No DCT scaling (PNG, and small JPEGs): the only difference is the resize kernel's rounding."""
    fast, ref = pair
    for data in (encode(photo_like(640, 480), "PNG"), encode(photo_like(500, 375), "JPEG", quality=90)):
        for seed in range(6):
            a, b = fast(data, np.random.default_rng(seed)), ref(data, np.random.default_rng(seed))
            assert_same_pixels(a, b, f"seed {seed}")


@functools.cache
def modes() -> dict[str, bytes]:
    rgb = photo_like(384, 320, seed=3)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    palette_t = rgb.convert("P", palette=Image.ADAPTIVE, colors=64)
    palette_t.info["transparency"] = 0
    grey16 = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257 + 100).astype(np.uint16))
    return {
        "L-png": encode(rgb.convert("L"), "PNG"),
        "L-jpeg-large": encode(photo_like(1200, 1000, seed=4).convert("L"), "JPEG", quality=92),
        "1-png": encode(rgb.convert("1", dither=Image.Dither.NONE), "PNG"),
        "LA-png": encode(rgba.convert("LA"), "PNG"),
        "RGBA-png": encode(rgba, "PNG"),
        "P-png": encode(rgb.convert("P", palette=Image.ADAPTIVE, colors=64), "PNG"),
        "P-transparent-png": encode(palette_t, "PNG"),
        "CMYK-jpeg": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "I;16-png": encode(grey16, "PNG"),
        "F-tiff": encode(Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0, mode="F"), "TIFF"),
        "RGB-webp": encode(rgb, "WEBP", lossless=True),
    }


@pytest.mark.parametrize("name", sorted(modes()))
def test_every_mode_matches_reference(pair, name):
    fast, ref = pair
    data = modes()[name]
    for seed in range(3):
        a, b = fast(data, np.random.default_rng(seed)), ref(data, np.random.default_rng(seed))
        assert a.shape == b.shape == (3, SIZE, SIZE)
        if name.endswith("-large"):
            assert psnr(a, b) > 30.0
        else:
            assert_same_pixels(a, b, f"{name} seed {seed}")


def test_float_and_16_bit_images_keep_their_contrast():
    """A float TIFF (0..1) and a 16-bit PNG decode to the 8-bit grey they were made from, not to black."""
    grey = np.asarray(photo_like(96, 80, seed=5).convert("L"))
    float01 = Image.fromarray(grey.astype(np.float32) / 255.0, mode="F")
    float_big = Image.fromarray(grey.astype(np.float32) * 4.0, mode="F")  # a range past 1: scaled by its peak
    wide = Image.fromarray(grey.astype(np.uint16) * 257)
    for name, img, fmt in (("F 0..1", float01, "TIFF"), ("F 0..1020", float_big, "TIFF"), ("I;16", wide, "PNG")):
        out = np.asarray(decode_rgb(encode(img, fmt)))
        want = grey * (255.0 / grey.max()) if name == "F 0..1020" else grey
        assert out.shape == (80, 96, 3), name
        assert np.abs(out[..., 0].astype(float) - want).max() <= 1.0, name


def test_crops_and_flips_are_the_reference_ones(pair):
    """On a coordinate-coded image the output's mean colour gives the crop's centre and its gradient the flip."""
    fast, ref = pair
    width, height = 1800, 1400  # large enough for every DCT scale to occur
    xx, yy = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    coded = np.stack([xx, yy, np.full_like(xx, 128)], -1).round().astype(np.uint8)
    data = encode(Image.fromarray(coded), "JPEG", quality=95)
    fast_stats, ref_stats = [], []
    for seed in range(40):
        for aug, stats in ((fast, fast_stats), (ref, ref_stats)):
            px = to_pixels(aug(data, np.random.default_rng(seed)))
            flipped = (px[0, :, -1] - px[0, :, 0]).mean().item() < 0
            stats.append((px[0].mean().item(), px[1].mean().item(), flipped))
    fast_stats, ref_stats = np.array(fast_stats), np.array(ref_stats)
    assert np.array_equal(fast_stats[:, 2], ref_stats[:, 2])
    assert 0.2 < fast_stats[:, 2].mean() < 0.8
    assert np.abs(fast_stats[:, :2] - ref_stats[:, :2]).max() < 1.0  # centre within 1/255 of the image
    assert np.allclose(fast_stats[:, :2].std(0), ref_stats[:, :2].std(0), rtol=0.02)


def whole_decode(data: bytes, draft_to: tuple[int, int] | None = None) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if draft_to:
        img.draft(img.mode, draft_to)
    return np.asarray(img)


@pytest.mark.parametrize(
    "kind", ["baseline", "progressive", "grey", "4:4:4", "restart-markers", "drafted-1/2", "drafted-1/4"]
)
def test_top_rows_are_the_whole_decode_rows(kind):
    img = photo_like(1000, 760, seed=11)
    options = {
        "progressive": {"progressive": True},
        "4:4:4": {"subsampling": 0},
        "restart-markers": {"restart_marker_rows": 1},
    }
    data = encode(img.convert("L") if kind == "grey" else img, "JPEG", quality=88, **options.get(kind, {}))
    draft_to = {"drafted-1/2": (500, 380), "drafted-1/4": (250, 190)}.get(kind)
    full = whole_decode(data, draft_to)
    for rows in (1, 37, full.shape[0] // 2, full.shape[0] - 1):
        part = Image.open(io.BytesIO(data))
        if draft_to:
            part.draft(part.mode, draft_to)
        assert load_top_rows(part, rows), f"{kind}: {rows} rows not confirmed"
        got = np.asarray(part)
        assert np.array_equal(got[:rows], full[:rows]), f"{kind}: rows 0..{rows} differ"
        assert not got[rows:].any(), "rows below the crop were written"


def test_a_black_last_row_falls_back_to_the_whole_decode():
    img = np.asarray(photo_like(900, 700, seed=5)).copy()
    img[300:340] = 0  # a black band: row 320 of the decode is all zero
    data = encode(Image.fromarray(img), "JPEG", quality=95)
    part = Image.open(io.BytesIO(data))
    assert not load_top_rows(part, 320)
    assert load_top_rows(Image.open(io.BytesIO(data)), 290)


def test_stopping_at_the_crop_changes_no_output(pair, monkeypatch):
    """FastTrainAugment with the partial decode against itself decoding every row: identical pixels."""
    fast, _ = pair
    whole = FastTrainAugment(SIZE, (0.2, 1.0))
    files = [encode(photo_like(1400, 1000, seed=s), "JPEG", quality=90) for s in range(3)]
    files.append(encode(photo_like(520, 400, seed=7).convert("L"), "JPEG", quality=90))
    letterboxed = np.asarray(photo_like(1400, 1000, seed=8)).copy()
    letterboxed[600:] = 0  # crops ending in the black band cannot confirm a partial decode: decoded whole
    files.append(encode(Image.fromarray(letterboxed), "JPEG", quality=90))
    partial_before, fallbacks_before = fast.partial_decodes, fast.partial_fallbacks
    outs = [fast(d, np.random.default_rng(seed)) for d in files for seed in range(6)]
    assert fast.partial_decodes - partial_before >= 12, "the partial decode was not exercised"
    assert fast.partial_fallbacks > fallbacks_before, "no crop of the letterboxed image fell back"
    monkeypatch.setattr(fast_decode, "load_top_rows", lambda img, rows: False)
    for i, (d, seed) in enumerate((d, seed) for d in files for seed in range(6)):
        assert torch.equal(outs[i], whole(d, np.random.default_rng(seed))), f"file {i // 6} seed {seed}"


def test_truncated_jpeg_fails_only_if_the_crop_needs_the_missing_rows(pair):
    fast, _ = pair
    data = encode(photo_like(1200, 900, seed=2), "JPEG", quality=90)
    cut = data[: len(data) * 4 // 5]  # about the first 4/5 of the rows survive
    needs_bottom = [s for s in range(200) if sum(crop_params(1200, 900, (0.2, 1.0), (3 / 4, 4 / 3),
                                                             np.random.default_rng(s))[::2]) > 850]  # fmt: skip
    fits_top = [s for s in range(200) if sum(crop_params(1200, 900, (0.2, 1.0), (3 / 4, 4 / 3),
                                                         np.random.default_rng(s))[::2]) < 560]  # fmt: skip
    assert needs_bottom and fits_top
    with pytest.raises(OSError, match="truncated"):
        fast(cut, np.random.default_rng(needs_bottom[0]))
    ok = fast(cut, np.random.default_rng(fits_top[0]))
    assert torch.equal(ok, fast(data, np.random.default_rng(fits_top[0])))
