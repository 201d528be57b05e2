#!/usr/bin/env python
"""Build two sets of real JPEG photos as tar shards, for the data-loader benchmark (tools/bench_loader.py).

  imagenet_like/  ~500x375 (long side 500, ImageNet's usual shapes), a few hundred images
  web_size/       long side 1024..2048, a couple of hundred images

Sources, from Debian's packages (nothing is downloaded from elsewhere):
  plasma-workspace-wallpapers  11 real photographs at 2560x1600 (GPL-2+/LGPL-3); installed with apt-get
  opencv-doc                   ~20 real sample photos of 512..1282 px (Apache-2.0/BSD-3); unpacked with
                               'apt-get download' + 'dpkg -x' into a temporary folder (no install)

Each image is a seeded random region of a photo, scaled down (Lanczos) to its target size and
re-encoded at a random JPEG quality of 80..95, so no two images share their bytes. The label is the
source photo (classes.txt names it). Output: OUT/{imagenet_like,web_size}/photos-*.tar + manifest.json.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.data.shard_sources import scan_list  # noqa: E402
from largemim.data.shard_writer import WriteOptions, write_shards  # noqa: E402

WALLPAPERS = Path("/usr/share/wallpapers")
WALLPAPER_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
                    "Grey", "Kite", "OneStandsOut", "Path", "summer_1am")  # fmt: skip  # the rest is digital art
OPENCV_DATA = Path("usr/share/doc/opencv-doc/examples/data")
OPENCV_PHOTOS = ("aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg",
                 "butterfly.jpg", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left.jpg",
                 "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png",
                 "smarties.png", "squirrel_cls.jpg", "stuff.jpg")  # fmt: skip  # colour photographs only
ASPECTS = ((4, 3), (3, 2), (1, 1), (3, 4), (2, 3), (16, 9))  # width:height, as photos come


def apt(*args: str, cwd: Path | None = None) -> bool:
    """Run apt-get; on failure refresh the package lists once and try again."""
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=120", *args]
    for attempt in range(2):
        if subprocess.run(cmd, cwd=cwd).returncode == 0:
            return True
        if attempt == 0:
            subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=120", "update"])
    return False


def wallpaper_photos() -> list[Path]:
    def paths() -> list[Path]:
        return [WALLPAPERS / n / "contents" / "images" / "2560x1600.jpg" for n in WALLPAPER_PHOTOS]

    if not all(p.is_file() for p in paths()):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            sys.exit("run 'apt-get install --no-install-recommends plasma-workspace-wallpapers' as root first")
        apt("install", "-y", "--no-install-recommends", "plasma-workspace-wallpapers")
    missing = [p for p in paths() if not p.is_file()]
    if missing:
        sys.exit(f"plasma-workspace-wallpapers did not install ({missing[0]} is missing); see apt-get's output above")
    return paths()


def opencv_photos(scratch: Path) -> list[Path]:
    """OpenCV's sample photos, unpacked from its doc package without installing it (its MathJax dependency)."""
    installed = Path("/") / OPENCV_DATA
    if not installed.is_dir():
        if not shutil.which("apt-get") or not apt("download", "opencv-doc", cwd=scratch):
            print("warning: could not fetch opencv-doc; using the wallpaper photos only", file=sys.stderr)
            return []
        deb = next(scratch.glob("opencv-doc_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(scratch / "opencv")], check=True)
        deb.unlink()
        installed = scratch / "opencv" / OPENCV_DATA
    return [installed / n for n in OPENCV_PHOTOS if (installed / n).is_file()]


def target_size(rng: random.Random, long_side: int) -> tuple[int, int]:
    aw, ah = rng.choice(ASPECTS)
    return (long_side, round(long_side * ah / aw)) if aw >= ah else (round(long_side * aw / ah), long_side)


def make_images(
    photos: list[Image.Image], names: list[str], count: int, long_sides: tuple[int, int], folder: Path, seed: int
) -> Path:
    """Write ``count`` JPEGs cut from ``photos`` into ``folder``; returns a file list with the source as label."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    lines = []
    for i in range(count):
        fits: list[int] = []
        while not fits:  # a shape no photo is large enough for (a tall 2048 px image) is drawn again
            tw, th = target_size(rng, rng.randint(*long_sides))
            fits = [j for j, p in enumerate(photos) if p.width >= tw and p.height >= th]
        j = rng.choice(fits)
        photo = photos[j]
        k = rng.uniform(1.0, min(photo.width / tw, photo.height / th, 3.0))  # region = k x target, scaled down
        cw, ch = min(photo.width, round(tw * k)), min(photo.height, round(th * k))
        x, y = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
        img = photo.crop((x, y, x + cw, y + ch))
        if (cw, ch) != (tw, th):
            img = img.resize((tw, th), Image.LANCZOS)
        path = folder / f"{i:05d}.jpg"
        img.save(path, format="JPEG", quality=rng.randint(80, 95))
        lines.append(f"{path.name}\t{names[j]}\n")
    listing = folder / "list.txt"
    listing.write_text("".join(lines))
    return listing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, default=Path(__file__).resolve().parents[1] / "build" / "photo_sets")
    ap.add_argument("--imagenet", type=int, default=400, help="ImageNet-like images (long side 500)")
    ap.add_argument("--web", type=int, default=200, help="web-size images (long side 1024..2048)")
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="photo_sets_") as tmp:
        scratch = Path(tmp)
        big = wallpaper_photos()
        small = opencv_photos(scratch)
        print(f"sources: {len(big)} wallpaper photos, {len(small)} OpenCV photos", file=sys.stderr)
        load = [Image.open(p).convert("RGB") for p in big + small]
        names = [p.parts[-4] if p.is_relative_to(WALLPAPERS) else p.stem for p in big + small]
        sets = {
            "imagenet_like": (load, names, args.imagenet, (500, 500)),
            "web_size": (load[: len(big)], names[: len(big)], args.web, (1024, 2048)),
        }
        for k, (name, (photos, labels, count, sides)) in enumerate(sets.items()):
            listing = make_images(photos, labels, count, sides, scratch / name, args.seed * 1000 + k)
            out = args.out / name
            options = WriteOptions(prefix="photos", samples_per_shard=args.per_shard, seed=args.seed)
            manifest = write_shards(scan_list(listing, progress=False), out, options, overwrite=True, progress=False)
            print(f"{out}: {len(manifest.shards)} shards, {manifest.total_samples} JPEGs")


if __name__ == "__main__":
    main()
