"""Reading and writing plain state-dict files: safetensors (the default) or weights-only torch pickles.

A safetensors file written here carries the model's ``MIMArch`` (heads, mask ratio, normalisation,
provenance) in its metadata under ``"largemim"``; a ``.pt`` file carries it in a ``<file>.json`` next to
it, so the pickle itself stays a plain ``{name: tensor}`` that ``load_state_dict`` takes as is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from largemim.convert.arch import METADATA_KEY, MIMArch
from largemim.convert.safe_load import load_torch
from largemim.files import fsync_path, replacing, shared_mode, write_atomic

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Wrappers that training scripts put around a state dict, outermost first.
CONTAINER_KEYS = ("model", "state_dict", "module", "model_state")


def _unshared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with storages of their own (safetensors refuses views into a shared buffer,
    which is what DeepSpeed's merged flat partitions are); copies only the tensors that need it."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen or not v.is_contiguous() or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.contiguous().clone()
        if v.numel():
            seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def check_weights_path(path: str | Path) -> Path:
    """``path`` must end in a suffix ``save_weights`` writes: checked before any long work."""
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors (or .pt)")
    return path


def save_weights(sd: dict[str, torch.Tensor], path: str | Path, arch: MIMArch | None = None) -> Path:
    """Write ``sd`` to ``path`` (.safetensors, or .pt/.pth/.bin) atomically; returns the path."""
    path = check_weights_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = _unshared(sd)
    side = Path(str(path) + ".json")  # a torch file's architecture; never an older run's
    with replacing(path) as tmp:
        if path.suffix == ".safetensors":
            meta = {"format": "pt"}  # transformers and timm check this key
            if arch is not None:
                meta[METADATA_KEY] = arch.to_json()
            save_file(sd, str(tmp), metadata=meta)
        else:
            torch.save(sd, tmp)
            # the old sidecar goes first: a crash before the new one is written leaves weights that say
            # nothing of their architecture (a clear error when read), never another file's description
            side.unlink(missing_ok=True)
    if path.suffix != ".safetensors" and arch is not None:
        write_atomic(side, arch.to_json())
    return path


@contextmanager
def atomic_folder(out: str | Path, writes: set[str]) -> Iterator[Path]:
    """A temporary folder to write an export into, put in ``out``'s place only once everything is written:
    a crash leaves the previous export (or nothing), never a mix of new weights and an old config. An
    ``out`` holding files other than ``writes`` is refused rather than replaced."""
    out = Path(out).resolve()  # "." and symlinks: the real folder
    tmp, old = (out.with_name(f".{out.name}.{what}") for what in ("partial", "previous"))
    if old.is_dir() and not out.exists():  # an earlier export died between its two renames
        os.replace(old, out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out} exists and is not a folder")
        other = sorted(p.name for p in out.iterdir() if p.name not in writes)
        if other:
            raise ValueError(f"{out} holds files this export does not write ({', '.join(other[:4])}): give a new "
                             "or empty folder")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                shared_mode(f)
                fsync_path(f)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_path(out)
        fsync_path(out.parent)  # the renames themselves
    except BaseException:
        if old.is_dir() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_metadata(path: str | Path) -> MIMArch | None:
    """The ``MIMArch`` stored with a weights file by ``save_weights``, or None."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        text = meta.get(METADATA_KEY)
    else:
        side = Path(str(path) + ".json")
        text = side.read_text() if side.is_file() else None
    return MIMArch.from_json(text) if text else None


def unwrap_state_dict(obj, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` inside a loaded checkpoint (``{'model': ...}``, ``{'state_dict': ...}``...)."""
    if isinstance(obj, dict) and {"ds_version", "param_shapes"} & set(obj):
        # One rank's DeepSpeed model states: 16-bit weights at best (ZeRO-1/2 bf16), empty placeholders under
        # ZeRO-3; the fp32 weights are spread over the optimizer shards beside it.
        raise ValueError(
            f"{path} is one file of a DeepSpeed checkpoint, not a weights file: pass its folder "
            f"({Path(path).parent}) or the run folder, and the shards are consolidated to fp32"
        )
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path} does not hold a state dict (top-level keys: {keys}); expected {{name: tensor}} "
                     f"or one inside {' / '.join(repr(k) for k in CONTAINER_KEYS)}")  # fmt: skip


def load_weights(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], MIMArch | None]:
    """State dict and stored architecture (if any) of a .safetensors or torch file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path)), read_metadata(path)
    return unwrap_state_dict(load_torch(path, trust_pickle=trust_pickle), path), read_metadata(path)


def describe(sd: dict[str, torch.Tensor]) -> str:
    """One line: tensor count, parameter count, dtypes, bytes."""
    n = sum(v.numel() for v in sd.values())
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    dtypes = ", ".join(sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}))
    return f"{len(sd)} tensors, {n / 1e6:,.2f} M parameters, {dtypes}, {nbytes / 2**20:,.1f} MiB"


def dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
