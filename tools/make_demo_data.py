#!/usr/bin/env python
"""Write the demo data shipped in data/fashion_mnist/: real Fashion-MNIST photos as tar shards.

Source: Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``), the
official IDX files of Zalando's Fashion-MNIST (MIT licence). Each sample is a 28x28 grey PNG
(``.png``) and its class id (``.cls``). Train shards come from the official training split, test
shards from the official test split; a manifest.json lists every shard's sample count.
"""

from __future__ import annotations

import argparse
import gzip
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.data.manifest import Manifest, ShardInfo  # noqa: E402

SRC = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(images) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x, y


def write_split(out: Path, prefix: str, x: np.ndarray, y: np.ndarray, per_shard: int) -> Manifest:
    manifest = Manifest()
    for start in range(0, len(x), per_shard):
        name = f"{prefix}-{start // per_shard:06d}.tar"
        # Fixed mtime so the shards are byte-identical on every rebuild.
        with wds.TarWriter(str(out / name), mtime=0) as sink:
            for i in range(start, min(start + per_shard, len(x))):
                buf = io.BytesIO()
                Image.fromarray(x[i], mode="L").save(buf, format="PNG", optimize=True)
                sink.write({"__key__": f"{prefix}_{i:06d}", "png": buf.getvalue(), "cls": str(int(y[i]))})
        manifest.shards.append(ShardInfo(name, min(per_shard, len(x) - start)))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "fashion_mnist")
    ap.add_argument("--train", type=int, default=8000, help="images from the official training split")
    ap.add_argument("--test", type=int, default=2000, help="images from the official test split")
    ap.add_argument("--per-shard", type=int, default=1000)
    args = ap.parse_args()
    if not (SRC / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"{SRC} has no Fashion-MNIST files: run 'apt-get install dataset-fashion-mnist' first")
    for split in ("train", "test"):  # only a folder of this tool's own files is replaced
        folder = args.out / split
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        foreign = sorted(n for n in names if not n.startswith((split, "manifest")))
        if foreign:
            sys.exit(f"{folder} holds files this tool did not write ({', '.join(foreign[:3])}): give another --out")
    for split in ("train", "test"):
        folder = args.out / split
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        stem = "train" if split == "train" else "t10k"
        x, y = read_idx(SRC / f"{stem}-images-idx3-ubyte.gz", SRC / f"{stem}-labels-idx1-ubyte.gz")
        n = args.train if split == "train" else args.test
        manifest = write_split(folder, split, x[:n], y[:n], args.per_shard)
        manifest.save(folder)
        print(f"{folder}: {len(manifest.shards)} shards, {manifest.total_samples} samples")
    (args.out / "classes.txt").write_text("\n".join(CLASSES) + "\n")


if __name__ == "__main__":
    main()
