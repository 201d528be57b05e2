"""Write WebDataset tar shards from an image folder, a file list or another shard set.

Stages: scan the source in a fixed order -> shuffle with the seed -> cut into shards (by sample count
and/or size) -> write each shard in a worker (``.tmp``, then renamed) -> write ``manifest.json``.

The cut is a pure function of the source and the options, and its fingerprint is stored next to the
shards (``PREFIX-plan.json``), so an interrupted write resumes exactly: a finished shard is kept when
it holds exactly the keys the plan gives it, anything else is written again. Image bytes are copied
as they are (no re-encode) unless ``resize_long_side`` is set; then an image whose long side is larger
is scaled down and re-encoded as JPEG.

Each sample is keyed by its position in the shuffled order (``00000000``, ``00000001``, ...): unique,
so WebDataset never merges two neighbours that happened to share a file name.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from largemim.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from largemim.files import write_atomic

log = logging.getLogger(__name__)

# augment.IMAGE_KEYS, repeated so that writing shards never imports torch (seconds per process);
# tests/test_shard_writer.py checks that the two agree.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")

BLOCK = tarfile.BLOCKSIZE  # 512: tar header and data granularity
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then all extensions


@dataclass(frozen=True)
class Member:
    """One file of a sample: a plain file (``offset < 0``) or a byte range inside an uncompressed tar."""

    ext: str
    path: str
    size: int
    offset: int = -1

    def read(self, open_tars: dict[str, io.BufferedReader]) -> bytes:
        if self.offset < 0:
            return Path(self.path).read_bytes()
        f = open_tars.get(self.path)
        if f is None:
            f = open_tars[self.path] = open(self.path, "rb")  # noqa: SIM115 - kept open across samples
        f.seek(self.offset)
        data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path}: truncated member at byte {self.offset} (source changed since the scan?)")
        return data


@dataclass(frozen=True)
class SourceSample:
    members: tuple[Member, ...]
    label: int | None = None  # written as ``.cls``; None when the source has no labels (or carries its own)


@dataclass
class Source:
    samples: list[SourceSample]
    classes: list[str] | None = None  # class names by index, written as classes.txt
    description: str = ""


@dataclass(frozen=True)
class WriteOptions:
    prefix: str = "shard"
    samples_per_shard: int | None = 1000
    shard_mb: float | None = None  # 10^6 bytes; a shard closes at whichever limit comes first
    seed: int | None = 0  # None keeps the source order
    resize_long_side: int | None = None
    jpeg_quality: int = 95
    workers: int = 1

    def __post_init__(self):
        if "/" in self.prefix or not self.prefix:
            raise ValueError(f"prefix {self.prefix!r} must be a non-empty file name stem (no '/')")
        if not self.samples_per_shard and not self.shard_mb:
            raise ValueError("set samples_per_shard or shard_mb (or both) to say where a shard ends")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.shard_mb is not None and self.shard_mb <= 0:
            raise ValueError(f"shard_mb must be > 0, got {self.shard_mb}")
        if self.resize_long_side is not None and self.resize_long_side < 1:
            raise ValueError(f"resize_long_side must be >= 1, got {self.resize_long_side}")

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str
    samples: tuple[tuple[str, SourceSample], ...]  # (key, source)


# -- sources: each lists its samples in a fixed order, so the plan depends on the data and options only


def _ext_of(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found += [Path(dirpath) / f for f in sorted(filenames) if _ext_of(Path(f)) in IMAGE_KEYS]
    return found


def _file_sample(path: Path, label: int | None) -> SourceSample:
    return SourceSample((Member(_ext_of(path), str(path), path.stat().st_size),), label)


def scan_folder(root: str | os.PathLike) -> Source:
    """ImageNet's layout: one sub-folder per class (label = index in sorted order); or a flat folder, unlabelled."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    loose = sorted(p for p in root.iterdir() if p.is_file() and _ext_of(p) in IMAGE_KEYS)
    per_class = {d.name: _images_under(d) for d in sorted(p for p in root.iterdir() if p.is_dir())}
    classes = [name for name, files in per_class.items() if files]  # folders without images are no class
    if classes and loose:
        raise ValueError(
            f"{root} holds both class sub-folders ({classes[0]!r}, ...) and images at its top ({loose[0].name!r}, "
            "...); move the loose images into a class folder, or point at a folder of one kind"
        )
    if not classes:
        if not loose:
            raise ValueError(f"{root} holds no images (looked for {', '.join(IMAGE_KEYS)})")
        return Source([_file_sample(p, None) for p in loose], None, f"{len(loose)} images in {root}")
    samples = [_file_sample(p, i) for i, name in enumerate(classes) for p in per_class[name]]
    return Source(samples, classes, f"{len(samples)} images in {len(classes)} classes under {root}")


def scan_list(list_path: str | os.PathLike) -> Source:
    """One image path per line, optionally ``<TAB>label``; relative paths are relative to the list's folder.

    Integer labels are used as they are; other labels are numbered in sorted order (and named in classes.txt).
    """
    list_path = Path(list_path).resolve()
    rows: list[tuple[Path, str | None]] = []
    for n, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        path, _, label = line.rstrip("\r\n").partition("\t")
        path = (list_path.parent / path.strip()).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{list_path}:{n}: no image at {path}")
        rows.append((path, label.strip() or None))
    if not rows:
        raise ValueError(f"{list_path} lists no image")
    labelled = [label is not None for _, label in rows]
    if any(labelled) and not all(labelled):
        n = labelled.index(not labelled[0]) + 1
        raise ValueError(f"{list_path}: some lines have a label and some do not (e.g. entry {n}); label all or none")
    if not labelled[0]:
        return Source([_file_sample(p, None) for p, _ in rows], None, f"{len(rows)} images listed in {list_path}")
    names = [label for _, label in rows]
    if all(re.fullmatch(r"-?\d+", s) for s in names):
        return Source([_file_sample(p, int(s)) for p, s in rows], None, f"{len(rows)} images listed in {list_path}")
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    samples = [_file_sample(p, index[s]) for p, s in rows]
    return Source(samples, classes, f"{len(rows)} images in {len(classes)} classes listed in {list_path}")


def _check_end(tar: tarfile.TarFile, url: str) -> None:
    """Python's ``tarfile`` reads a tar cut inside a header (or at a member's end) as one that ends there:
    the members after the cut would go missing without a word. A whole tar has a zero block (the end
    marker) where its last member ends."""
    tar.fileobj.seek(tar.offset)
    end = tar.fileobj.read(BLOCK)
    if len(end) < BLOCK or end.count(0) != BLOCK:
        raise tarfile.ReadError(f"no end-of-archive block after the member ending at byte {tar.offset}")


def _tar_samples(url: str) -> Iterator[SourceSample]:
    try:
        with tarfile.open(url, "r:") as tar:
            key, members = None, []
            for info in tar:
                if not info.isfile() or Path(info.name).name.startswith("__"):
                    continue
                m = _KEY_RE.match(info.name)
                if m is None:
                    continue
                if m.group(1) != key and members:
                    yield SourceSample(tuple(members))
                    members = []
                key = m.group(1)
                members.append(Member(m.group(2).lower(), url, info.size, info.offset_data))
            if members:
                yield SourceSample(tuple(members))
            _check_end(tar, url)
    except (tarfile.ReadError, EOFError) as exn:
        with open(url, "rb") as f:
            head = f.read(6)
        if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):  # gzip, bzip2, xz, zstd
            raise ValueError(f"{url} is a compressed tar ({exn}); decompress it first (e.g. gunzip)") from None
        raise ValueError(f"{url} is damaged or truncated ({exn}); write it again, or leave it out of --tars") from None


def scan_tars(urls: Iterable[str | os.PathLike]) -> Source:
    """Samples of existing (uncompressed) tar shards, every member kept; grouped by key as WebDataset does."""
    urls = [str(Path(u).resolve()) for u in urls]
    samples = [s for url in urls for s in _tar_samples(url)]
    if not samples:
        raise ValueError(f"the {len(urls)} tar(s) given hold no sample")
    classes = None
    folders = {Path(u).parent for u in urls}
    if len(folders) == 1 and (next(iter(folders)) / "classes.txt").is_file():
        classes = (next(iter(folders)) / "classes.txt").read_text().splitlines()
    return Source(samples, classes, f"{len(samples)} samples in {len(urls)} tar(s)")


# -- the plan: shuffled, keyed, cut into shards


def _tar_bytes(size: int) -> int:
    return BLOCK + math.ceil(size / BLOCK) * BLOCK


def _sample_bytes(sample: SourceSample) -> int:
    cls = _tar_bytes(len(str(sample.label))) if sample.label is not None else 0
    return sum(_tar_bytes(m.size) for m in sample.members) + cls


def plan_shards(samples: list[SourceSample], options: WriteOptions) -> list[ShardPlan]:
    """Shuffle (seeded) then cut: shard i always gets the same samples for the same source and options.

    A shard ends at ``samples_per_shard`` samples or before it would pass ``shard_mb`` (sizes as read,
    before any resize), whichever comes first; a sample bigger than ``shard_mb`` gets a shard of its own.
    """
    order = list(range(len(samples)))
    if options.seed is not None:
        random.Random(options.seed).shuffle(order)  # Python's shuffle is stable across versions
    width = max(8, len(str(len(samples) - 1)))
    max_count = options.samples_per_shard or len(samples)
    max_bytes = math.inf
    if options.shard_mb:  # a tar ends with two zero blocks, then pads to a whole record
        max_bytes = (int(options.shard_mb * 1e6) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE - 2 * BLOCK
    shards: list[ShardPlan] = []
    current: list[tuple[str, SourceSample]] = []
    current_bytes = 0
    for position, i in enumerate(order):
        size = _sample_bytes(samples[i])
        if current and (len(current) == max_count or current_bytes + size > max_bytes):
            shards.append(ShardPlan(len(shards), options.shard_name(len(shards)), tuple(current)))
            current, current_bytes = [], 0
        current.append((f"{position:0{width}d}", samples[i]))
        current_bytes += size
    if current:
        shards.append(ShardPlan(len(shards), options.shard_name(len(shards)), tuple(current)))
    return shards


def plan_fingerprint(shards: list[ShardPlan], options: WriteOptions) -> str:
    """Changes with anything that changes a shard's bytes: inputs (path, size), order, cut, resize."""
    h = hashlib.sha256()
    what = {k: getattr(options, k) for k in ("prefix", "resize_long_side", "jpeg_quality")}
    h.update(json.dumps(what, sort_keys=True).encode())
    for shard in shards:
        h.update(f"\n#{shard.name}".encode())
        for key, sample in shard.samples:
            h.update(f"\n{key} {sample.label}".encode())
            for m in sample.members:
                h.update(f" {m.ext}:{m.path}:{m.offset}:{m.size}".encode())
    return h.hexdigest()


# -- writing one shard (runs in a worker process)


def resize_encoded(data: bytes, long_side: int, quality: int) -> bytes | None:
    """JPEG bytes of the image scaled to ``long_side``, or None when it is not larger than that."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if max(w, h) <= long_side:
        return None
    scale = long_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if img.mode not in ("RGB", "L"):
        from largemim.data.augment import decode_rgb  # grey/palette/CMYK/alpha/16-bit -> RGB, as training sees it

        img = decode_rgb(data)
    elif img.format == "JPEG":
        # DCT-domain reduction to at least twice the target, as Image.thumbnail does: fast, and the
        # bicubic below still has a 2x margin to antialias from.
        img.draft(img.mode, (size[0] * 2, size[1] * 2))
    img = img.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _sample_members(sample: SourceSample, options: WriteOptions, open_tars: dict) -> Iterator[tuple[str, bytes]]:
    resized = False
    for m in sample.members:
        data, ext = m.read(open_tars), m.ext
        if options.resize_long_side and not resized and ext in IMAGE_KEYS:
            try:
                small = resize_encoded(data, options.resize_long_side, options.jpeg_quality)
            except Exception as exn:  # noqa: BLE001 - name the file, then stop: the plan has no room for a gap
                where = m.path if m.offset < 0 else f"{m.path} (member at byte {m.offset})"
                raise ValueError(f"cannot resize {where}: {exn}; remove or fix it and run again") from exn
            resized = True
            if small is not None:
                data, ext = small, "jpg"
        yield ext, data
    if sample.label is not None:
        yield "cls", str(sample.label).encode()


class _Ticks:
    """Counts written samples for the progress bar: in-process it moves the bar, across processes a shared int."""

    def __init__(self, bar=None, shared=None):
        self.bar, self.shared = bar, shared

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.shared is not None:
            with self.shared.get_lock():
                self.shared.value += 1


_ticks = _Ticks()  # replaced in each worker process (or in-process for one worker)


def _init_worker(ticks: _Ticks) -> None:
    global _ticks
    _ticks = ticks


def _write_shard(job: tuple[ShardPlan, str, WriteOptions]) -> int:
    shard, out, options = job
    final = Path(out) / shard.name
    tmp = final.with_name(final.name + ".tmp")
    open_tars: dict[str, io.BufferedReader] = {}
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for key, sample in shard.samples:
                    for ext, data in _sample_members(sample, options, open_tars):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed: same bytes on every run
                        tar.addfile(info, io.BytesIO(data))
                    _ticks.tick()
            f.flush()
            os.fsync(f.fileno())  # the rename below must never expose a shard whose data is not on disk
    finally:
        for handle in open_tars.values():
            handle.close()
    os.replace(tmp, final)
    return shard.index


def shard_keys(path: str | os.PathLike) -> list[str] | None:
    """The sample keys of a finished tar in order of first appearance, or None if it cannot be read."""
    keys: dict[str, None] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                m = _KEY_RE.match(info.name)
                if m:
                    keys[m.group(1)] = None
    except (tarfile.TarError, OSError):
        return None
    return list(keys)


# -- the whole write


def _inputs_among_outputs(source: Source, out: Path, ours: re.Pattern) -> list[str]:
    """Input files that are also ``PREFIX-NNNNNN.tar`` files of ``out``, which a write unlinks or replaces.

    Names are compared first (cheap, once per input file); only a match has its folder resolved. Tar
    inputs are already resolved by :func:`scan_tars`, and image inputs never match a ``.tar`` name.
    """
    real_out = os.path.realpath(out)
    paths = {m.path for sample in source.samples for m in sample.members}
    hits = [p for p in paths if ours.match(os.path.basename(p))]
    return sorted(p for p in hits if os.path.realpath(os.path.dirname(p)) == real_out)


def _check_out_folder(source: Source, out: Path, options: WriteOptions, fingerprint: str, overwrite: bool) -> None:
    """Refuse to destroy the inputs, to mix two shard sets in one folder, or to resume a write planned differently.

    Runs before anything in ``out`` is written, unlinked or replaced.
    """
    plan_file = out / f"{options.prefix}-plan.json"
    ours = re.compile(rf"^{re.escape(options.prefix)}-\d{{6}}\.tar(\.tmp)?$")
    clash = _inputs_among_outputs(source, out, ours)
    if clash:
        # Each shard is written to .tmp and renamed over PREFIX-NNNNNN.tar (and --overwrite unlinks them all
        # first), so a source read from those names would be destroyed while it is still being read.
        other_prefix = "" if (out / MANIFEST_NAME).is_file() else f", or use another --prefix than {options.prefix!r}"
        raise ValueError(
            f"the input includes {len(clash)} file(s) named like the output shards in {out} "
            f"({Path(clash[0]).name}, ...): writing {options.prefix}-*.tar there would delete or replace them while "
            f"they are read; write the new shards to another folder (--out){other_prefix}"
        )
    existing = sorted(p for p in out.iterdir() if ours.match(p.name))
    if (out / MANIFEST_NAME).is_file():
        try:
            listed = [s.url for s in Manifest.load(out).shards]
        except (ValueError, KeyError, TypeError):
            listed = []
        foreign = [u for u in listed if not ours.match(Path(u).name)]
        if foreign:
            raise ValueError(
                f"{out} already holds another shard set ({foreign[0]!r} in its {MANIFEST_NAME}); the trainer reads "
                "one manifest per folder, so write each set to a folder of its own"
            )
    try:
        stored = json.loads(plan_file.read_text()).get("fingerprint") if plan_file.is_file() else None
    except (ValueError, AttributeError):  # left empty or torn by a crash: as if there were none
        stored = None
    if stored == fingerprint or not (existing or stored):
        return
    if not overwrite:
        why = "were written from different inputs or options" if stored else "have no plan file to resume from"
        raise FileExistsError(
            f"the {len(existing)} {options.prefix}-*.tar file(s) in {out} {why}; pass overwrite=True "
            "(--overwrite) to replace them, or write to another folder"
        )
    for p in existing:
        p.unlink()
    plan_file.unlink(missing_ok=True)


class WorkerDiedError(RuntimeError):
    """A shard-writing process was killed; what was finished is kept for the rerun to resume from."""


def _write_in_workers(
    jobs: list[tuple[ShardPlan, str, WriteOptions]], workers: int, show: Callable[[int], None]
) -> None:
    """Write the shards in ``workers`` processes, one whole shard per task; ``show`` gets the samples written so far.

    A process pool (not ``multiprocessing.Pool``) because a worker that dies (OOM killer, a segfault in a
    decoder) breaks it and fails every pending task at once, where ``Pool`` replaces the worker and waits
    forever for the lost task. As before, a worker's own error is raised once every shard has been tried,
    so the finished shards stay for the next run to keep.
    """
    ticks = _Ticks(shared=mp.Value("q", 0))
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(ticks,))
    try:
        futures = [pool.submit(_write_shard, job) for job in jobs]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.5)
            show(ticks.shared.value)
        for future in futures:  # the first error in shard order
            future.result()
    except BrokenProcessPool as exn:
        raise WorkerDiedError(
            "a shard-writing worker process died (killed by a signal, most likely the out-of-memory killer) "
            f"with {workers} workers; run again with fewer --workers (or a smaller --resize-long-side). The "
            "shards finished so far are kept and the same command resumes from them"
        ) from exn
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # also on Ctrl-C: no new shard starts


def write_shards(
    source: Source, out: str | os.PathLike, options: WriteOptions, *, overwrite: bool = False, progress: bool = True
) -> Manifest:
    """Write (or finish writing) ``source`` as tar shards in ``out``; returns the manifest written there."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(source.samples, options)
    fingerprint = plan_fingerprint(shards, options)
    _check_out_folder(source, out, options, fingerprint, overwrite)
    body = {"fingerprint": fingerprint, "shards": len(shards), "samples": len(source.samples)}
    write_atomic(out / f"{options.prefix}-plan.json", json.dumps(body, indent=1))

    todo, done_samples = [], 0
    for shard in shards:
        if shard_keys(out / shard.name) == [key for key, _ in shard.samples]:
            done_samples += len(shard.samples)
        else:
            todo.append(shard)
    if done_samples:
        log.info("resuming: %d of %d shards are complete, %d to write", len(shards) - len(todo), len(shards), len(todo))

    from tqdm import tqdm

    bar = tqdm(
        total=len(source.samples), initial=done_samples, unit="img", desc=f"{options.prefix} -> {out}",
        disable=not progress, smoothing=0.05, dynamic_ncols=True,
    )  # fmt: skip
    jobs = [(shard, str(out), options) for shard in todo]
    try:
        if options.workers <= 1 or len(jobs) <= 1:
            _init_worker(_Ticks(bar=bar))
            try:
                for job in jobs:
                    _write_shard(job)
            finally:
                _init_worker(_Ticks())
        else:
            _write_in_workers(jobs, min(options.workers, len(jobs)), lambda n: bar.update(done_samples + n - bar.n))
    finally:
        bar.close()

    manifest = Manifest([ShardInfo(s.name, len(s.samples)) for s in shards])
    if source.classes is not None:
        (out / "classes.txt").write_text("\n".join(source.classes) + "\n")
    manifest.save(out)
    return manifest
