"""Checkpoints that are complete or ignored: save through the engine, mark complete, keep the last K.

A checkpoint is ``checkpoints/step_XXXXXXXX/`` (DeepSpeed's files, written by every rank) plus a
``COMPLETE`` marker that rank 0 writes atomically only after every rank has finished writing. Start-up
resumes from the newest folder with a marker, so a job killed mid-save falls back to the previous
checkpoint, which is never touched by a later save.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            m = TAG_RE.match(d.name)
            if m and (d / MARKER).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def read_marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank = max(1, keep_last), rank

    def save(self, engine, step: int, client_state: dict) -> Path:
        tag = tag_for(step)
        t0 = time.time()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()  # every rank's shards are on disk before the marker says so
        folder = self.dir / tag
        if self.rank == 0:
            meta = {
                "step": step,
                "world_size": dist.get_world_size(),
                "zero_stage": engine.zero_optimization_stage(),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            _write_atomic(folder / MARKER, json.dumps(meta))
            self._prune()
            log.info("saved checkpoint %s in %.1fs", folder, time.time() - t0)
        dist.barrier()
        return folder

    def _prune(self) -> None:
        complete = complete_checkpoints(self.dir)
        for _, folder in complete[: -self.keep_last]:
            shutil.rmtree(folder, ignore_errors=True)
        newest = complete[-1][0] if complete else -1
        for d in self.dir.iterdir():  # half-written folders left by an earlier crash
            m = TAG_RE.match(d.name)
            if m and int(m.group(1)) < newest and not (d / MARKER).is_file():
                log.warning("removing incomplete checkpoint %s (a save that was interrupted)", d)
                shutil.rmtree(d, ignore_errors=True)

    def latest(self) -> tuple[int, Path] | None:
        complete = complete_checkpoints(self.dir)
        return complete[-1] if complete else None

    def universal_dir(self, folder: Path) -> Path:
        return self.dir / "universal" / folder.name

    def needs_universal(self, world_size: int, force: bool = False) -> Path | None:
        """The newest checkpoint's folder if it must be loaded through DeepSpeed's universal format:
        its ZeRO-1/2/3 optimizer shards were written by another number of data-parallel ranks (or
        ``force``). ZeRO-0 checkpoints hold whole tensors and load at any world size."""
        found = self.latest()
        if found is None:
            return None
        meta = read_marker(found[1])
        if meta.get("zero_stage", 0) == 0 and not force:
            return None
        return found[1] if force or meta.get("world_size") != world_size else None

    def convert_to_universal(self, folder: Path) -> Path:
        """Convert ``folder`` once (rank 0; the others wait) and return the converted copy.

        Runs ``deepspeed.checkpoint.ds_to_universal --inject_missing_state`` (the flag is needed for
        ZeRO-1/2) in a subprocess into a temporary folder, renamed into place when complete, so an
        interrupted conversion is redone rather than half-used. A converted copy is reused.
        """
        out = self.universal_dir(folder)
        if self.rank == 0 and not (out / MARKER).is_file():
            meta = read_marker(folder)
            log.warning(
                "checkpoint %s was written by %s ranks with ZeRO-%s; converting it to DeepSpeed's universal "
                "format for %d ranks (optimizer state included)", folder, meta.get("world_size"),
                meta.get("zero_stage"), dist.get_world_size(),
            )  # fmt: skip
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [
                sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
                "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
                "--num_merge_workers", "1",
            ]  # fmt: skip
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"converting {folder} to the universal format failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
                )
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            _write_atomic(out / MARKER, json.dumps({**meta, "universal": True}))
            log.info("converted to %s in %.1fs", out, time.time() - t0)
        dist.barrier()
        return out

    def load_latest(self, engine, universal: Path | None = None) -> dict | None:
        """Load the newest complete checkpoint into ``engine`` (through its universal copy if given);
        its client state, or None if there is none."""
        found = self.latest()
        if found is None:
            return None
        step, folder = found
        meta = read_marker(folder)
        world = dist.get_world_size()
        if universal is None and meta.get("world_size") != world and engine.zero_optimization_stage() > 0:
            raise RuntimeError(
                f"checkpoint {folder} was written by {meta.get('world_size')} data-parallel ranks, this run has "
                f"{world}; it must be loaded through the universal format (see Checkpointer.needs_universal)"
            )
        source = universal if universal is not None else folder
        _, client = engine.load_checkpoint(
            str(source.parent), tag=source.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client is None:
            raise RuntimeError(f"checkpoint {source} could not be loaded (DeepSpeed returned nothing); see the log")
        client.setdefault("step", step)
        if universal is not None:
            restore_module_state(engine, folder)
        log.info("resumed from %s (step %d)%s", folder, step, " via its universal copy" if universal else "")
        return client


def restore_module_state(engine, folder: Path) -> None:
    """Put back what a universal load leaves out: buffers and frozen parameters (a dVAE's step counter,
    data2vec's EMA teacher and its fp32 master), from the original checkpoint's module states.

    DeepSpeed's universal format carries only the trained parameters and their optimizer state. The module
    states of the run that saved the checkpoint are read from rank 0's file (ZeRO 0-2: the whole module)
    or from every rank's file (ZeRO-3). A module with rank-local state (data2vec's master holds this
    rank's ZeRO-3 slices) restores it itself through ``load_saved_state(saved_module_states)``, resliced
    for this run's ranks; the other buffers and whole frozen parameters are copied back by name. Frozen
    parameters partitioned by ZeRO-3 outside such a module (fixed sin-cos positions, a BEiT tokenizer)
    are rebuilt at start-up, so they keep their built values.
    """
    from largemim.convert.safe_load import load_torch
    from largemim.objectives.ema import is_partitioned

    module = engine.module
    meta = read_marker(folder)
    if meta.get("zero_stage", 0) >= 3:
        files = [folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(int(meta["world_size"]))]
    else:
        files = [folder / "mp_rank_00_model_states.pt"]
    saved = [load_torch(f, mmap=True).get("module", {}) for f in files]
    restored: list[str] = []
    if hasattr(module, "load_saved_state"):  # a collective under ZeRO-3: every rank calls it
        restored += module.load_saved_state(saved)
    handled = tuple(n.rstrip("*") for n in restored)
    extras = {n: b for n, b in module.named_buffers()}
    extras.update({n: p for n, p in module.named_parameters() if not p.requires_grad and not is_partitioned(p)})
    with torch.no_grad():
        for name, tensor in extras.items():
            value = saved[0].get(name)
            if name.startswith(handled) or value is None or value.shape != tensor.shape:
                continue
            tensor.copy_(value.to(tensor.dtype))
            restored.append(name)
    missing = sorted(n for n in set(extras) - set(restored) if not n.startswith(handled))
    log.info("restored %d buffers/frozen tensors from %s%s", len(restored), folder,
             f"; not in the checkpoint: {', '.join(missing[:4])}" if missing else "")  # fmt: skip
