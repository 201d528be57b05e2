"""Opening torch pickles without running code from them.

Every ``.pt``/``.pth`` file a converter reads goes through ``load_torch``: torch's weights-only
unpickler, which builds tensors, containers and primitives and refuses any other Python object. A few
plain data classes that DeepSpeed and the reference MAE code put into their files are allowed by name
(``SAFE_GLOBALS``): a loss-scaler record, an enum, a two-int dataclass, an ``argparse.Namespace``.
Anything else is refused with ``UnsafePickleError`` unless the caller passes ``trust_pickle=True``
(``--trust-pickle`` on the command line), because a full unpickle of a file from an untrusted source
can execute arbitrary code.

DeepSpeed's own ``zero_to_fp32`` always unpickles fully (``weights_only=False``); ``check_files`` runs
the weights-only unpickler over those files first (memory-mapped, so tensor data is not read), so a
file only reaches the full unpickler after its byte stream was shown to name nothing but allowed
classes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Plain data records found in real checkpoint files; "module:qualname". Each has no __setstate__ or
# __reduce__ of its own, so unpickling one only sets attributes on a fresh instance.
SAFE_GLOBAL_NAMES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO optimizer states (fp32, bf16)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # ZeRO optimizer states (fp16)
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO optimizer states: an int enum
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 param_slice_mappings: (numel, start)
)
# The reference MAE code saves its argparse arguments next to the weights (misc.save_model).
SAFE_GLOBALS_ALWAYS: tuple[Any, ...] = (argparse.Namespace,)

_UNSUPPORTED_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class UnsafePickleError(RuntimeError):
    """A file needs a full unpickle, which can run code; refused unless the user trusts the file."""


def _safe_globals() -> list[Any]:
    found = list(SAFE_GLOBALS_ALWAYS)
    for name in SAFE_GLOBAL_NAMES:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: its files name other classes
            log.debug("safe global %s not importable", name)
    return found


def _refusal(path: Path, error: Exception) -> UnsafePickleError:
    match = _UNSUPPORTED_RE.search(str(error))
    what = f"the Python object {match.group(1)}" if match else "objects that are not tensors or plain containers"
    return UnsafePickleError(
        f"{path} holds {what}, which torch's weights-only loader will not build. Loading it needs a full "
        "unpickle, and unpickling a file can run arbitrary code from whoever wrote it. If you trust where "
        "this file came from, pass --trust-pickle (trust_pickle=True)."
    )


def load_torch(path: str | Path, trust_pickle: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` onto the CPU, weights-only (plus ``SAFE_GLOBALS``) unless ``trust_pickle``.

    With ``mmap`` the tensors stay on disk until touched (zip-format files only; others load fully).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return _load(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise _refusal(path, e) from None
        log.warning("%s: loading with a full unpickle (--trust-pickle)", path)
        return _load(path, weights_only=False, mmap=mmap)


def _load(path: Path, weights_only: bool, mmap: bool) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e).lower():  # legacy (non-zip) format cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=weights_only)
            raise
    except RuntimeError as e:
        if "zip archive" in str(e) or "central directory" in str(e):
            raise RuntimeError(
                f"{path} cannot be read ({e}): the file is truncated or damaged; if it belongs to a "
                "checkpoint, use an earlier checkpoint of the run"
            ) from None
        raise


def check_files(paths: Iterable[str | Path], trust_pickle: bool = False) -> None:
    """Raise ``UnsafePickleError`` if any file needs more than the weights-only unpickler.

    Reads each file's pickle stream only (tensor data is memory-mapped, not read), so it is cheap
    even for the optimizer shards of a large model.
    """
    if trust_pickle:
        return
    for path in paths:
        obj = load_torch(path, trust_pickle=False, mmap=True)
        del obj
