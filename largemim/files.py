"""Writing files so that a crash never leaves a half-written one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's: its entries, i.e. renames) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shared_mode(path: Path) -> None:
    """Permissions like any other output (safetensors creates its files private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def replace_durably(tmp: Path, path: Path) -> None:
    """Put the written ``tmp`` in ``path``'s place: synced first, so that a crash leaves the old file or
    the whole new one, the rename synced too, and readable by others."""
    shared_mode(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the new file to: put in ``path``'s place (durably, see
    ``replace_durably``) when the block ends, removed if it raises. A reader (or a crash) sees the old
    file or the new one, never a part of it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, synced and renamed over it."""
    with replacing(path) as tmp:
        tmp.write_text(text)
