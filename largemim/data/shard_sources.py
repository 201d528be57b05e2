"""What a shard set is written from: an image folder (ImageNet's layout), a file list, or existing tar
shards, each scanned into samples in a fixed order (so the plan of ``shard_writer`` depends on the data
and the options only), with their labels and class names.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from largemim.progress import progress_bar

log = logging.getLogger(__name__)

# augment.IMAGE_KEYS, repeated so that writing shards never imports torch (seconds per process);
# tests/test_shard_writer.py checks that the two agree.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")
BLOCK = tarfile.BLOCKSIZE  # 512: tar header and data granularity
CLASSES_NAME = "classes.txt"  # class names by label, one a line, next to the manifest
KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then all extensions


@dataclass(frozen=True)
class Member:
    """One file of a sample: a plain file (``offset < 0``) or a byte range inside an uncompressed tar."""

    ext: str
    path: str
    size: int
    offset: int = -1

    @property
    def where(self) -> str:
        return self.path if self.offset < 0 else f"{self.path} (member at byte {self.offset})"

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


def _ext_of(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _dir_id(path: str | os.PathLike) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _images_under(folder: Path, above: tuple[int, int], read: Callable[[int], None] | None = None) -> list[Path]:
    """Image files under ``folder``, links followed, each folder read once: a link loop (``up -> ..``) or a
    link back to ``above`` (the folder of all classes) would otherwise repeat the same images without end.
    ``read`` is called after each folder read with the number of images in it."""
    found, seen, revisits = [], {above}, []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = _dir_id(dirpath)
        if here in seen:
            dirnames.clear()
            revisits.append(dirpath)
            continue
        seen.add(here)
        dirnames.sort()
        images = [Path(dirpath) / f for f in sorted(filenames) if _ext_of(Path(f)) in IMAGE_KEYS]
        found += images
        if read is not None:
            read(len(images))
    if revisits:
        log.warning(
            "%s: %d linked folder(s) lead back to a folder already read (%s, ...); read once, not again",
            folder, len(revisits), revisits[0],
        )  # fmt: skip
    return found


def _file_sample(path: Path, label: int | None) -> SourceSample:
    return SourceSample((Member(_ext_of(path), str(path), path.stat().st_size),), label)


def _file_samples(files: list[tuple[Path, int | None]], desc: str, progress: bool) -> list[SourceSample]:
    """One ``stat`` per image for its size: on a network file system about as long as the walk itself."""
    with progress_bar(files, enabled=progress, desc=desc, unit="img") as bar:
        return [_file_sample(path, label) for path, label in bar]


def _walk_classes(root: Path, folders: list[Path], progress: bool) -> dict[str, list[Path]]:
    """Each class folder's images; the bar counts the images found and the folders read (total unknown)."""
    above = _dir_id(root)
    with progress_bar(enabled=progress, desc=f"scanning {root}", unit="img") as bar:
        read = 0

        def count(images: int) -> None:
            nonlocal read
            read += 1
            bar.set_postfix(folders=read, refresh=False)
            bar.update(images)

        return {d.name: _images_under(d, above, count) for d in folders}


class UnknownClassError(ValueError):
    """The input has a class that the class list given (``classes=``, make_shards' ``--classes``) lacks."""

    def __init__(self, name: str, where: str, origin: str = "the class list given"):
        self.name, self.where = name, where
        super().__init__(self.message(origin))

    def message(self, origin: str) -> str:
        return (
            f"{self.where}: class {self.name!r} is not in {origin}; add it at the end of the list (the other "
            "labels keep their numbers), or leave its images out"
        )


def load_classes(path: str | os.PathLike) -> list[str]:
    """Class names by label, one a line: the ``classes.txt`` written next to another split's shards."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"class list {path} does not exist; give the {CLASSES_NAME} of the train split's shards"
        )
    names = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    if not names:
        raise ValueError(f"{path} names no class; give the {CLASSES_NAME} written next to the train shards")
    first: dict[str, int] = {}
    for n, name in enumerate(names, 1):
        if not name.strip():
            raise ValueError(f"{path}:{n}: blank line; write one class name a line (line n is label n-1)")
        if name in first:
            raise ValueError(f"{path}:{n}: class {name!r} again (also on line {first[name]}); name each class once")
        first[name] = n
    return names


def _warn_empty_folders(root: Path, empty: list[str], classes: list[str]) -> None:
    shown = ", ".join(repr(name) for name in empty[:5]) + (", ..." if len(empty) > 5 else "")
    log.warning(
        "%s: %d sub-folder(s) hold no images and are no class (%s); labels number the other %d folders, so a "
        "split missing a class numbers them differently: pass --classes TRAIN_OUT/%s (classes=) so labels "
        "agree with another split",
        root, len(empty), shown, len(classes), CLASSES_NAME,
    )  # fmt: skip


def scan_folder(root: str | os.PathLike, classes: list[str] | None = None, *, progress: bool = True) -> Source:
    """ImageNet's layout: one sub-folder per class; or a flat folder, unlabelled.

    Labels are indices in ``classes`` when given (every class folder with images must be in it: give the
    train split's list to a validation split), else in the sorted names of the folders that hold images.
    ``progress`` shows the walk and the sizing on stderr (minutes for ImageNet on network storage).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    loose = sorted(p for p in root.iterdir() if p.is_file() and _ext_of(p) in IMAGE_KEYS)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if folders:  # ImageNet over a network file system: a minute or more of listing and stat-ing
        log.info("scanning %d sub-folders of %s ...", len(folders), root)
    per_class = _walk_classes(root, folders, progress and bool(folders))
    sizes = f"reading sizes in {root}"
    found = [name for name, files in per_class.items() if files]  # folders without images are no class
    if found and loose:
        raise ValueError(
            f"{root} holds both class sub-folders ({found[0]!r}, ...) and images at its top ({loose[0].name!r}, "
            "...); move the loose images into a class folder, or point at a folder of one kind"
        )
    if not found:
        if not loose:
            raise ValueError(f"{root} holds no images (looked for {', '.join(IMAGE_KEYS)})")
        if classes is not None:
            raise ValueError(f"{root} has no class sub-folders (its images are unlabelled); leave out the class list")
        samples = _file_samples([(p, None) for p in loose], sizes, progress)
        return Source(samples, None, f"{len(loose)} images in {root}")
    given = classes is not None
    if not given:
        classes = found
        empty = [name for name, files in per_class.items() if not files]
        if empty:
            _warn_empty_folders(root, empty, classes)
    index = {c: i for i, c in enumerate(classes)}
    for name in found:
        if name not in index:
            raise UnknownClassError(name, f"class folder {root / name} ({len(per_class[name])} images)")
    samples = _file_samples([(p, index[name]) for name in found for p in per_class[name]], sizes, progress)
    used = f"{len(found)} of {len(classes)}" if given else f"{len(classes)}"
    return Source(samples, classes, f"{len(samples)} images in {used} classes under {root}")


def _list_rows(list_path: Path, progress: bool) -> list[tuple[int, Path, str | None]]:
    """(line number, image path, label or None) of each entry; every path an existing image file. One ``stat``
    a line: minutes for millions of files on network storage, so ``progress`` counts the lines on stderr."""
    rows = []
    lines = list_path.read_text().splitlines()
    with progress_bar(lines, enabled=progress, desc=f"checking {list_path}", unit="line") as bar:
        for n, line in enumerate(bar, 1):
            if not line.strip() or line.startswith("#"):
                continue
            path, _, label = line.rstrip("\r\n").partition("\t")
            path = (list_path.parent / path.strip()).resolve()
            if _ext_of(path) not in IMAGE_KEYS:  # the member's extension is how a reader knows it is an image
                raise ValueError(
                    f"{list_path}:{n}: {path} is not named as an image (extension {path.suffix or 'none'!r}); list "
                    f"image files only, named .{', .'.join(IMAGE_KEYS)} (any case)"
                )
            if not path.is_file():
                raise FileNotFoundError(f"{list_path}:{n}: no image at {path}")
            rows.append((n, path, label.strip() or None))
    if not rows:
        raise ValueError(f"{list_path} lists no image")
    return rows


def scan_list(list_path: str | os.PathLike, classes: list[str] | None = None, *, progress: bool = True) -> Source:
    """One image path per line, optionally ``<TAB>label``; relative paths are relative to the list's folder.

    With ``classes``, every label is a class name and its label is the name's index there (give the train
    split's list to a validation split). Without, integer labels are used as they are and other labels
    are numbered in sorted order (and named in classes.txt). ``progress`` shows the check of the listed
    files and the sizing on stderr.
    """
    list_path = Path(list_path).resolve()
    rows = _list_rows(list_path, progress)
    sizes = f"reading sizes of the images listed in {list_path}"
    labelled = [label is not None for _, _, label in rows]
    if any(labelled) and not all(labelled):
        n = labelled.index(not labelled[0]) + 1
        raise ValueError(f"{list_path}: some lines have a label and some do not (e.g. entry {n}); label all or none")
    if not labelled[0]:
        if classes is not None:
            raise ValueError(f"{list_path} has no labels (path<TAB>class per line); leave out the class list")
        samples = _file_samples([(p, None) for _, p, _ in rows], sizes, progress)
        return Source(samples, None, f"{len(rows)} images listed in {list_path}")
    names = [label for _, _, label in rows]
    if classes is None and all(re.fullmatch(r"-?\d+", s) for s in names):
        samples = _file_samples([(p, int(s)) for _, p, s in rows], sizes, progress)
        return Source(samples, None, f"{len(rows)} images listed in {list_path}")
    given = classes is not None
    classes = classes if given else sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    for n, _, name in rows:
        if name not in index:
            raise UnknownClassError(name, f"{list_path}:{n}")
    samples = _file_samples([(p, index[s]) for _, p, s in rows], sizes, progress)
    used = f"{len(set(names))} of {len(classes)}" if given else f"{len(classes)}"
    return Source(samples, classes, f"{len(rows)} images in {used} classes listed in {list_path}")


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
                m = KEY_RE.match(info.name)
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


def scan_tars(urls: Iterable[str | os.PathLike], *, progress: bool = True) -> Source:
    """Samples of existing (uncompressed) tar shards, every member kept; grouped by key as WebDataset does.

    Every header of every tar is read (thousands of tars on network storage: minutes); ``progress`` counts
    the tars read, and the samples found so far, on stderr.
    """
    urls = [str(Path(u).resolve()) for u in urls]
    samples = []
    with progress_bar(urls, enabled=progress, desc="reading tar headers", unit="tar") as bar:
        for url in bar:
            samples += _tar_samples(url)
            bar.set_postfix(samples=len(samples), refresh=False)
    if not samples:
        raise ValueError(f"the {len(urls)} tar(s) given hold no sample")
    classes = None
    folders = {Path(u).parent for u in urls}
    if len(folders) == 1 and (next(iter(folders)) / CLASSES_NAME).is_file():
        classes = (next(iter(folders)) / CLASSES_NAME).read_text(encoding="utf-8", errors="surrogateescape")
        classes = classes.splitlines()
    return Source(samples, classes, f"{len(samples)} samples in {len(urls)} tar(s)")
