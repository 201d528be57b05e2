"""Write WebDataset tar shards from an image folder, a file list or another shard set.

Stages: scan the source in a fixed order (:mod:`largemim.data.shard_sources`) -> shuffle with the seed
-> cut into shards (by sample count and/or size) -> write each shard in a worker (``.tmp``, then
renamed) -> write ``manifest.json``.

The cut is a pure function of the source and the options, and its fingerprint is stored next to the
shards (``PREFIX-plan.json``), so an interrupted write resumes exactly: a finished shard is kept when
it holds exactly the keys the plan gives it, anything else is written again. Image bytes are copied
as they are (no re-encode) unless ``resize_long_side`` is set; then an image whose long side is larger
is scaled down and re-encoded as JPEG, and one that cannot be decoded is stored as it is (the trainer
skips and counts it), counted and named in a warning at the end.

Ctrl-C stops the workers at once: the finished shards stay, the partial ones (``.tmp``) are deleted.

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
import signal
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from largemim.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from largemim.data.shard_sources import BLOCK, CLASSES_NAME, IMAGE_KEYS, KEY_RE, Member, Source, SourceSample
from largemim.files import write_atomic
from largemim.progress import progress_bar

log = logging.getLogger(__name__)

# The images one resizes are the huge ones: PIL's default limit (89 M pixels, an error at twice that)
# refuses a large scan or panorama as a "decompression bomb". JPEGs are draft-decoded at a fraction of that.
RESIZE_MAX_PIXELS = 4 * 89_478_485  # 4x PIL's default: 358 M pixels, an error above 716 M (memory per worker)


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


def _utf8(text: str) -> bytes:
    # A file name that is not UTF-8 (b'caf\xe9') comes from the OS as a lone surrogate ('caf\udce9'):
    # encoded back to its own bytes. Valid names encode exactly as before, so stored plans still match.
    return text.encode("utf-8", "surrogateescape")


def plan_fingerprint(shards: list[ShardPlan], options: WriteOptions) -> str:
    """Changes with anything that changes a shard's bytes: inputs (path, size), order, cut, resize."""
    h = hashlib.sha256()
    what = {k: getattr(options, k) for k in ("prefix", "resize_long_side", "jpeg_quality")}
    h.update(_utf8(json.dumps(what, sort_keys=True)))
    for shard in shards:
        h.update(_utf8(f"\n#{shard.name}"))
        for key, sample in shard.samples:
            h.update(_utf8(f"\n{key} {sample.label}"))
            for m in sample.members:
                h.update(_utf8(f" {m.ext}:{m.path}:{m.offset}:{m.size}"))
    return h.hexdigest()


# -- writing one shard (runs in a worker process)


@contextmanager
def _resize_pixel_limit() -> Iterator[None]:
    """PIL's decompression-bomb limit raised to ``RESIZE_MAX_PIXELS`` (and its warning silenced) meanwhile."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    if before is not None:
        Image.MAX_IMAGE_PIXELS = max(before, RESIZE_MAX_PIXELS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def resize_encoded(data: bytes, long_side: int, quality: int) -> bytes | None:
    """JPEG bytes of the image scaled to ``long_side``, or None when it is not larger than that."""
    from PIL import Image

    with _resize_pixel_limit():
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


def _resized(member: Member, data: bytes, options: WriteOptions, failures: list[str]) -> tuple[str, bytes]:
    """(extension, bytes) to store: the image scaled down, or as it is when not larger or not decodable."""
    try:
        small = resize_encoded(data, options.resize_long_side, options.jpeg_quality)
    except Exception as exn:  # noqa: BLE001 - any decoder error: stored as it is, as the trainer skips and counts it
        failures.append(f"{member.where}: {type(exn).__name__}: {exn}")
        return member.ext, data
    return ("jpg", small) if small is not None else (member.ext, data)


def _sample_members(
    sample: SourceSample, options: WriteOptions, open_tars: dict, failures: list[str]
) -> Iterator[tuple[str, bytes]]:
    resized = False
    for m in sample.members:
        data, ext = m.read(open_tars), m.ext
        if options.resize_long_side and not resized and ext in IMAGE_KEYS:
            ext, data = _resized(m, data, options, failures)
            resized = True
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


def _init_pool_worker(ticks: _Ticks) -> None:
    # Ctrl-C signals the terminal's whole process group. A worker that took it would drop its shard half
    # written and go on with the next; the parent stops the workers itself (_stop_workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(ticks)


def _write_tar(path: Path, shard: ShardPlan, options: WriteOptions, failures: list[str]) -> None:
    open_tars: dict[str, io.BufferedReader] = {}
    try:
        with open(path, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for key, sample in shard.samples:
                    for ext, data in _sample_members(sample, options, open_tars, failures):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed: same bytes on every run
                        tar.addfile(info, io.BytesIO(data))
                    _ticks.tick()
            f.flush()
            os.fsync(f.fileno())  # the rename must never expose a shard whose data is not on disk
    finally:
        for handle in open_tars.values():
            handle.close()


def _write_shard(job: tuple[ShardPlan, str, WriteOptions]) -> tuple[int, list[str]]:
    """Write one shard (``.tmp``, then renamed); returns its index and the images it could not resize."""
    shard, out, options = job
    final = Path(out) / shard.name
    tmp = final.with_name(final.name + ".tmp")
    failures: list[str] = []
    try:
        _write_tar(tmp, shard, options, failures)
    except BaseException:  # an error or Ctrl-C: a partial shard is never valid, the rerun writes it whole
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    return shard.index, failures


def shard_keys(path: str | os.PathLike) -> list[str] | None:
    """The sample keys of a finished tar in order of first appearance, or None if it cannot be read."""
    keys: dict[str, None] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                m = KEY_RE.match(info.name)
                if m:
                    keys[m.group(1)] = None
    except (tarfile.TarError, OSError):
        return None
    return list(keys)


# -- the whole write


def _shard_re(prefix: str, suffix: str = "") -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar{suffix}$")


def _remove_partial_shards(out: Path, prefix: str) -> int:
    """Delete ``PREFIX-NNNNNN.tar.tmp`` (left by a crash or Ctrl-C; never a valid shard); returns how many."""
    partial = [p for p in out.iterdir() if _shard_re(prefix, r"\.tmp").match(p.name)]
    for p in partial:
        p.unlink(missing_ok=True)
    return len(partial)


def _inputs_among_outputs(source: Source, out: Path, ours: re.Pattern) -> list[str]:
    """Input files that are also ``PREFIX-NNNNNN.tar`` files of ``out``, which a write unlinks or replaces.

    Names are compared first (cheap, once per input file); only a match has its folder resolved. Tar
    inputs are already resolved by :func:`scan_tars`, and image inputs never match a ``.tar`` name.
    """
    real_out = os.path.realpath(out)
    paths = {m.path for sample in source.samples for m in sample.members}
    hits = [p for p in paths if ours.match(os.path.basename(p))]
    return sorted(p for p in hits if os.path.realpath(os.path.dirname(p)) == real_out)


def _check_inputs_kept(source: Source, out: Path, prefix: str) -> None:
    clash = _inputs_among_outputs(source, out, _shard_re(prefix, r"(\.tmp)?"))
    if clash:
        # Each shard is written to .tmp and renamed over PREFIX-NNNNNN.tar (and --overwrite unlinks them all
        # first), so a source read from those names would be destroyed while it is still being read.
        other_prefix = "" if (out / MANIFEST_NAME).is_file() else f", or use another --prefix than {prefix!r}"
        raise ValueError(
            f"the input includes {len(clash)} file(s) named like the output shards in {out} "
            f"({Path(clash[0]).name}, ...): writing {prefix}-*.tar there would delete or replace them while "
            f"they are read; write the new shards to another folder (--out){other_prefix}"
        )


def _manifest_is_ours(out: Path, prefix: str) -> bool:
    """Whether ``out`` has a manifest of this prefix's shard set; another set's is refused."""
    if not (out / MANIFEST_NAME).is_file():
        return False
    try:
        listed = [s.url for s in Manifest.load(out).shards]
    except (ValueError, KeyError, TypeError):
        return False
    foreign = [u for u in listed if not _shard_re(prefix).match(Path(u).name)]
    if foreign:
        raise ValueError(
            f"{out} already holds another shard set ({foreign[0]!r} in its {MANIFEST_NAME}); the trainer reads "
            "one manifest per folder, so write each set to a folder of its own"
        )
    return bool(listed)


def _check_out_folder(source: Source, out: Path, options: WriteOptions, fingerprint: str, overwrite: bool) -> None:
    """Refuse to destroy the inputs, to mix two shard sets in one folder, or to resume a write planned differently.

    Runs before anything in ``out`` is written, unlinked or replaced (but partial ``.tmp`` shards, never valid).
    """
    _check_inputs_kept(source, out, options.prefix)
    if _remove_partial_shards(out, options.prefix):
        log.info("deleted the partial %s-*.tar.tmp shards of an interrupted write", options.prefix)
    plan_file = out / f"{options.prefix}-plan.json"
    existing = sorted(p for p in out.iterdir() if _shard_re(options.prefix).match(p.name))
    manifest_is_ours = _manifest_is_ours(out, options.prefix)
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
    if manifest_is_ours:  # first: an interrupted overwrite must not leave a manifest counting other shards
        (out / MANIFEST_NAME).unlink()
        (out / CLASSES_NAME).unlink(missing_ok=True)
    for p in existing:
        p.unlink()
    plan_file.unlink(missing_ok=True)


class WorkerDiedError(RuntimeError):
    """A shard-writing process was killed; what was finished is kept for the rerun to resume from."""


class WriteInterrupted(KeyboardInterrupt):
    """Ctrl-C during a write: the finished shards are kept (the same call resumes from them), no ``.tmp`` is left."""

    def __init__(self, complete: int, total: int):
        super().__init__(f"{complete} of {total} shards are complete")
        self.complete, self.total = complete, total


@dataclass
class WrittenShards(Manifest):
    """The manifest written, plus the images that could not be resized and were stored as they are (``path:
    error``; those of the shards written by this call, not of the ones a resumed write kept)."""

    not_resized: list[str] = field(default_factory=list)


def _collect(futures: Iterable[Future], results: dict[int, list[str]]) -> None:
    """Record the shards finished so far (index -> images not resized); errors are raised later, in order."""
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is None:
            index, failures = future.result()
            results[index] = failures


def _stop_workers(children: set[mp.Process]) -> None:
    """End the workers now, mid-shard; returns once they are gone. The pool then finds itself broken and fails
    the shards not started (cancelling them here instead makes Python 3.11's pool raise in its own thread)."""
    for process in children:
        process.terminate()
    for process in children:
        process.join()


def _write_in_workers(
    jobs: list[tuple[ShardPlan, str, WriteOptions]],
    workers: int,
    show: Callable[[int], None],
    results: dict[int, list[str]],
) -> None:
    """Write the shards in ``workers`` processes, one whole shard per task; ``show`` gets the samples written so far.

    A process pool (not ``multiprocessing.Pool``) because a worker that dies (OOM killer, a segfault in a
    decoder) breaks it and fails every pending task at once, where ``Pool`` replaces the worker and waits
    forever for the lost task. As before, a worker's own error is raised once every shard has been tried,
    so the finished shards stay for the next run to keep. On Ctrl-C the workers are ended at once.
    """
    ticks = _Ticks(shared=mp.Value("q", 0))
    before = set(mp.active_children())
    pool = ProcessPoolExecutor(workers, initializer=_init_pool_worker, initargs=(ticks,))
    futures: list[Future] = []
    try:
        futures = [pool.submit(_write_shard, job) for job in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5)
            _collect(done, results)
            show(ticks.shared.value)
        for future in futures:  # the first error in shard order
            future.result()
    except BrokenProcessPool as exn:
        raise WorkerDiedError(
            "a shard-writing worker process died (killed by a signal, most likely the out-of-memory killer) "
            f"with {workers} workers; run again with fewer --workers (or a smaller --resize-long-side). The "
            "shards finished so far are kept and the same command resumes from them"
        ) from exn
    except KeyboardInterrupt:
        _stop_workers(set(mp.active_children()) - before)  # the pool's processes (3.14: terminate_workers)
        _collect(futures, results)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_in_process(jobs: list[tuple[ShardPlan, str, WriteOptions]], bar, results: dict[int, list[str]]) -> None:
    _init_worker(_Ticks(bar=bar))
    try:
        for job in jobs:
            index, failures = _write_shard(job)
            results[index] = failures
    finally:
        _init_worker(_Ticks())


def _unfinished(shards: list[ShardPlan], out: Path, progress: bool) -> list[ShardPlan]:
    """The shards not yet on disk exactly as planned (missing, partial, or holding other samples)."""
    present = {shard.name for shard in shards if (out / shard.name).is_file()}
    if not present:
        return list(shards)
    # Each one's tar headers are read: the time a rerun takes before it writes (minutes for ImageNet on NFS).
    log.info("checking the %d shards already in %s against the plan ...", len(present), out)
    todo = []
    with progress_bar(total=len(present), enabled=progress, desc=f"checking {out}", unit="shard") as bar:
        for shard in shards:
            keys = None
            if shard.name in present:
                keys = shard_keys(out / shard.name)
                bar.update(1)
            if keys != [key for key, _ in shard.samples]:
                todo.append(shard)
    return todo


def _show_progress(bar, done_before: int, written: int) -> None:
    bar.update(done_before + written - bar.n)


def _interrupted(
    out: Path, prefix: str, total: int, todo: list[ShardPlan], stale: set[str], results: dict[int, list[str]]
) -> WriteInterrupted:
    """After Ctrl-C: the partial shards deleted, and the complete ones counted (on disk: a worker stopped
    between its rename and its reply has finished its shard too; ``stale`` files were there before)."""
    _remove_partial_shards(out, prefix)
    new = [s for s in todo if s.index in results or (s.name not in stale and (out / s.name).exists())]
    return WriteInterrupted(total - len(todo) + len(new), total)


def _warn_not_resized(failures: list[str]) -> None:
    if failures:
        log.warning(
            "%d image(s) could not be resized and were stored as they are (the trainer skips and counts those "
            "it cannot decode either): %s%s",
            len(failures), "; ".join(failures[:5]), "; ..." if len(failures) > 5 else "",
        )  # fmt: skip


def write_shards(
    source: Source, out: str | os.PathLike, options: WriteOptions, *, overwrite: bool = False, progress: bool = True
) -> WrittenShards:
    """Write (or finish writing) ``source`` as tar shards in ``out``; returns the manifest written there.

    Raises :class:`WriteInterrupted` (a ``KeyboardInterrupt``) on Ctrl-C, once the workers are stopped and
    the partial shards deleted.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(source.samples, options)
    fingerprint = plan_fingerprint(shards, options)
    _check_out_folder(source, out, options, fingerprint, overwrite)
    body = {"fingerprint": fingerprint, "shards": len(shards), "samples": len(source.samples)}
    write_atomic(out / f"{options.prefix}-plan.json", json.dumps(body, indent=1))

    todo = _unfinished(shards, out, progress)
    stale = {shard.name for shard in todo if (out / shard.name).exists()}  # on disk, but not as planned
    done_samples = len(source.samples) - sum(len(shard.samples) for shard in todo)
    if len(todo) < len(shards):
        log.info("resuming: %d of %d shards are complete, %d to write", len(shards) - len(todo), len(shards), len(todo))

    bar = progress_bar(
        total=len(source.samples), initial=done_samples, unit="img", desc=f"{options.prefix} -> {out}",
        enabled=progress, smoothing=0.05,
    )  # fmt: skip
    jobs = [(shard, str(out), options) for shard in todo]
    results: dict[int, list[str]] = {}  # shard index -> images not resized, for the shards written here
    try:
        if options.workers <= 1 or len(jobs) <= 1:
            _write_in_process(jobs, bar, results)
        else:
            show = partial(_show_progress, bar, done_samples)
            _write_in_workers(jobs, min(options.workers, len(jobs)), show, results)
    except KeyboardInterrupt as exn:
        raise _interrupted(out, options.prefix, len(shards), todo, stale, results) from exn
    finally:
        bar.close()

    failures = [f for index in sorted(results) for f in results[index]]
    _warn_not_resized(failures)
    if source.classes is not None:
        (out / CLASSES_NAME).write_text("\n".join(source.classes) + "\n", encoding="utf-8", errors="surrogateescape")
    written = WrittenShards([ShardInfo(s.name, len(s.samples)) for s in shards], not_resized=failures)
    written.save(out)
    return written
