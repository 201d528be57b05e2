#!/usr/bin/env python
"""Write WebDataset tar shards (PREFIX-000000.tar, ...) and their manifest.json from images.

Sources (one of):
  --folder DIR   ImageNet's layout: one sub-folder per class (.cls = index in sorted order, or in
                 --classes; names in classes.txt); a folder with no sub-folders gives unlabelled samples
  --list FILE    one image path per line, optionally followed by <TAB>label (paths relative to FILE's folder)
  --tars SHARDS  existing uncompressed shards to re-shard: a folder, or a pattern like
                 /d/train-{000000..000099}.tar (all members of each sample are kept)

Labels number the classes that have images in this split. For a validation split, pass the train
split's class list (--classes TRAIN_OUT/classes.txt) so that both number the classes alike.

The samples are shuffled with --seed, then cut into shards of --samples-per-shard samples and/or
--shard-mb MB (sizes as read, before --resize-long-side). Image bytes are copied as they are unless
--resize-long-side is given; an image that cannot be resized is stored as it is and reported. Running
the same command again after an interruption (Ctrl-C included) keeps the finished shards and writes the
rest. Re-sharding --tars writes to another folder (or prefix): the inputs are never replaced.

Example:
  tools/make_shards.py --folder /data/imagenet/train --out /data/imagenet-wds/train --prefix train \\
      --shard-mb 500 --workers 16
  tools/make_shards.py --folder /data/imagenet/val --out /data/imagenet-wds/val --prefix val \\
      --classes /data/imagenet-wds/train/classes.txt --shard-mb 500 --workers 16
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.data.shard_sources import Source, UnknownClassError, load_classes, scan_folder, scan_list, scan_tars  # noqa: E402
from largemim.data.shard_writer import WorkerDiedError, WriteInterrupted, WriteOptions, write_shards  # noqa: E402
from largemim.data.sources import expand_shards  # noqa: E402


def tar_urls(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise ValueError(f"{path} holds no .tar file")
        return urls
    return expand_shards(spec)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", type=Path, help="image folder (class sub-folders = labels)")
    src.add_argument("--list", type=Path, help="file list: path[<TAB>label] per line")
    src.add_argument("--tars", help="folder or brace pattern of existing tar shards to re-shard")
    ap.add_argument("--out", type=Path, required=True, help="output folder (one shard set per folder)")
    ap.add_argument("--prefix", default="shard", help="shard names are PREFIX-000000.tar, ... (default: shard)")
    ap.add_argument(
        "--classes", type=Path, default=None, metavar="FILE",
        help="class names by label, one a line (e.g. the train split's classes.txt): labels are indices in it, "
        "and every class folder of --folder (label of --list) with images must be there; default: the classes "
        "with images here, sorted",
    )  # fmt: skip
    ap.add_argument("--samples-per-shard", type=int, default=None, help="samples per shard (default 1000 if no MB)")
    ap.add_argument(
        "--shard-mb", type=float, default=None,
        help="close a shard before it passes this many MB, counted on the sizes before --resize-long-side "
        "(resized shards come out smaller)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    ap.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    ap.add_argument("--resize-long-side", type=int, default=None, help="scale larger images down to this long side")
    ap.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded (resized) images")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="writer processes")
    ap.add_argument("--overwrite", action="store_true", help="replace PREFIX-*.tar of another plan (not inputs)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return ap


def read_source(args: argparse.Namespace) -> Source:
    classes = load_classes(args.classes) if args.classes else None
    try:
        if args.folder:
            return scan_folder(args.folder, classes, progress=not args.no_progress)
        if args.list:
            return scan_list(args.list, classes, progress=not args.no_progress)
    except UnknownClassError as exn:
        raise ValueError(exn.message(str(args.classes))) from None
    return scan_tars(tar_urls(args.tars), progress=not args.no_progress)


def write_options(args: argparse.Namespace) -> WriteOptions:
    if (args.samples_per_shard is not None and args.samples_per_shard < 1) or (
        args.shard_mb is not None and args.shard_mb <= 0
    ):
        raise ValueError("--samples-per-shard must be >= 1 and --shard-mb > 0")
    return WriteOptions(
        prefix=args.prefix,
        samples_per_shard=args.samples_per_shard if args.samples_per_shard or args.shard_mb else 1000,
        shard_mb=args.shard_mb,
        seed=None if args.no_shuffle else args.seed,
        resize_long_side=args.resize_long_side,
        jpeg_quality=args.jpeg_quality,
        workers=args.workers,
    )


def interrupted(message: str) -> None:
    """Ctrl-C: one line, no traceback, the shell's status for SIGINT."""
    print(message, file=sys.stderr)
    raise SystemExit(130)


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.classes and args.tars:
        ap.error("--classes applies to --folder and --list (the samples of --tars keep their own labels)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        options = write_options(args)
        source = read_source(args)
    except KeyboardInterrupt:
        interrupted("interrupted while reading the input; nothing was written")
    except (ValueError, OSError) as exn:  # bad options, a missing or unreadable input
        raise SystemExit(f"error: {exn}") from None
    print(f"source: {source.description}", file=sys.stderr)
    try:
        written = write_shards(source, args.out, options, overwrite=args.overwrite, progress=not args.no_progress)
    except WriteInterrupted as exn:
        interrupted(f"interrupted: {exn.complete} of {exn.total} shards are complete; run the same command to resume")
    except KeyboardInterrupt:  # while planning or checking the output folder
        interrupted("interrupted before writing began; run the same command to start again")
    except (FileExistsError, ValueError, WorkerDiedError) as exn:
        raise SystemExit(f"error: {exn}") from None
    except OSError as exn:  # an input that vanished, a full disk: the finished shards are kept
        raise SystemExit(
            f"error: {exn}; fix that and run the same command to resume (finished shards are kept)"
        ) from None
    summary = f"{args.out}: {len(written.shards)} shards, {written.total_samples} samples"
    if written.not_resized:
        summary += f"; {len(written.not_resized)} image(s) could not be resized and were stored as they are"
    print(summary)


if __name__ == "__main__":
    main()
