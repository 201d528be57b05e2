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
import pickle
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from largemim.files import fsync_path, write_atomic
from largemim.signals import held

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
UNIVERSAL_LAYOUT = 2  # a universal copy loadable under ZeRO-1/2 and ZeRO-3 alike (_either_stage_global_state)
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


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _converted_from(out: Path, meta: dict) -> bool:
    """Whether ``out`` is a finished universal copy of the checkpoint whose marker says ``meta`` (a copy of
    an earlier checkpoint of the same step, since deleted and written again, is not)."""
    try:
        done = read_marker(out)
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or being replaced by rank 0
        return False
    return (
        done.get("saved_at") == meta.get("saved_at")
        and done.get("world_size") == meta.get("world_size")
        and done.get("layout") == UNIVERSAL_LAYOUT  # older copies lack the files either ZeRO stage needs
    )


@contextmanager
def _synced_writes(engine):
    """Every file this rank's engine writes is fsynced once written, and its folder after the save: the
    marker, written next and synced itself, must never outlive (a power cut, a kernel panic) shards still
    in the page cache, or a resume would fail on a torn file after the older checkpoints were pruned.
    DeepSpeed's ``TorchCheckpointEngine.save`` is a bare ``torch.save``; each rank syncs what it wrote
    itself (on a shared file system only the writer's client holds the dirty pages)."""
    saver = getattr(engine, "checkpoint_engine", None)
    original = getattr(saver, "save", None)
    if original is None:
        log.warning("this DeepSpeed engine has no checkpoint_engine.save: checkpoint files are not fsynced")
        yield
        return
    folders: set[Path] = set()

    def save(state_dict, path, *args, **kwargs):
        original(state_dict, path, *args, **kwargs)
        fsync_path(Path(path))
        folders.add(Path(path).parent)

    own = vars(saver).get("save")  # an instance's own save, if something set one (else the class's)
    saver.save = save
    try:
        yield
    finally:
        if own is None:
            del saver.save
        else:
            saver.save = own
    for folder in folders:
        fsync_path(folder)


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank = max(1, keep_last), rank
        self._agreed: tuple[int, Path] | tuple[()] | None = None  # agree_on_latest's pick (() = none)

    def save(self, engine, step: int, client_state: dict) -> Path:
        tag = tag_for(step)
        t0 = time.time()
        stale = self.dir / tag
        if self.rank == 0 and stale.is_dir() and not (stale / MARKER).is_file():
            # An interrupted save of this step (perhaps by another number of ranks): its leftover shards
            # must not mix with the new ones. Never raises here: the other ranks wait at the barrier.
            log.warning("removing incomplete checkpoint %s before saving that step again", stale)
            shutil.rmtree(stale, ignore_errors=True)
            if stale.exists():
                log.warning("could not remove all of %s: files of the new save replace those of the same name", stale)
        dist.barrier()
        with _synced_writes(engine):
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()  # every rank's shards are on disk (synced) before the marker says so
        folder = self.dir / tag
        if self.rank == 0:
            meta = {
                "step": step,
                "world_size": dist.get_world_size(),
                "zero_stage": engine.zero_optimization_stage(),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            write_atomic(folder / MARKER, json.dumps(meta))
            self._prune()
            log.info("saved checkpoint %s in %.1fs", folder, time.time() - t0)
        dist.barrier()
        self._agreed = None  # the newest is now this one
        return folder

    def _prune(self) -> None:
        complete = complete_checkpoints(self.dir)
        for _, folder in complete[: -self.keep_last]:
            shutil.rmtree(folder, ignore_errors=True)
        kept = {folder.name for _, folder in complete[-self.keep_last :]}
        universal = self.dir / "universal"
        if universal.is_dir():  # converted copies go with their checkpoints (each is a full fp32 + Adam copy)
            for d in universal.iterdir():
                if d.name.split(".")[0] not in kept:
                    if d.is_dir():
                        shutil.rmtree(d, ignore_errors=True)
                    else:
                        d.unlink(missing_ok=True)
        newest = complete[-1][0] if complete else -1
        for d in self.dir.iterdir():  # half-written folders left by an earlier crash
            m = TAG_RE.match(d.name)
            if m and int(m.group(1)) < newest and not (d / MARKER).is_file():
                log.warning("removing incomplete checkpoint %s (a save that was interrupted)", d)
                shutil.rmtree(d, ignore_errors=True)

    def latest(self) -> tuple[int, Path] | None:
        if self._agreed is not None:
            return self._agreed or None
        complete = complete_checkpoints(self.dir)
        return complete[-1] if complete else None

    def agree_on_latest(self, wait_s: float = 120.0) -> tuple[int, Path] | None:
        """Rank 0 picks the checkpoint to resume from and every rank takes its pick (a collective).

        Each rank listing shared storage itself could see different newest folders (an NFS client's
        cached listing): they would load different steps. A rank that does not yet see rank 0's pick
        waits for it, then fails with a message naming the folder.
        """
        from largemim.distributed import broadcast_from_rank0  # here: the converters import this module

        self._agreed = None
        found = self.latest() if self.rank == 0 else None
        box = [None if found is None else found[0]]  # the step: rank 0's path may not be another node's
        broadcast_from_rank0(box)
        found = None if box[0] is None else (box[0], self.dir / tag_for(box[0]))
        if found is not None:
            deadline = time.time() + wait_s
            while not (found[1] / MARKER).is_file():
                if time.time() > deadline:
                    raise RuntimeError(
                        f"rank {self.rank} does not see checkpoint {found[1]}, which rank 0 resumes from: the run "
                        "folder must be on storage that every node shares (run.dir)"
                    )
                time.sleep(1.0)
        self._agreed = found or ()
        return found

    def universal_dir(self, folder: Path) -> Path:
        return self.dir / "universal" / folder.name

    def needs_universal(self, world_size: int, zero_stage: int, force: bool = False) -> Path | None:
        """The newest checkpoint's folder if it must be loaded through DeepSpeed's universal format: its
        ZeRO-1/2/3 optimizer shards were written by another number of data-parallel ranks, or under ZeRO-3
        for a ZeRO-1/2 run or the other way round (their files differ), or ``force``. ZeRO-0 checkpoints
        hold whole tensors and load at any world size, but only into a ZeRO-0 run (and a ZeRO-1/2/3
        checkpoint only into a ZeRO-1/2/3 run): a clear error, before the model is built."""
        found = self.latest()
        if found is None:
            return None
        meta = read_marker(found[1])
        saved = int(meta.get("zero_stage", 0))
        if (saved == 0) != (zero_stage == 0):
            from largemim.config import ConfigError

            raise ConfigError(
                f"checkpoint {found[1]} was saved with ZeRO-{saved} and this run's ds_config is ZeRO-{zero_stage}: "
                f"a ZeRO-0 checkpoint holds the whole optimizer state, the others hold it in per-rank shards, and "
                f"DeepSpeed cannot load one into the other. Resume with a ZeRO-{saved} ds_config "
                f"(ds_configs/zero{saved}.json) and change the stage in a new run that starts from this one's "
                f"weights (model.init_from=<its consolidated weights>, see tools/convert_checkpoint.py; the "
                f"optimizer state starts afresh)"
            )
        if saved == 0 and not force:
            return None
        if force or meta.get("world_size") != world_size or (saved >= 3) != (zero_stage >= 3):
            return found[1]
        return None

    def convert_to_universal(self, folder: Path) -> Path:
        """Convert ``folder`` once (rank 0; the others wait) and return the converted copy.

        Runs ``deepspeed.checkpoint.ds_to_universal --inject_missing_state`` (the flag is needed for
        ZeRO-1/2) in a subprocess into a temporary folder, renamed into place when complete, so an
        interrupted conversion is redone rather than half-used. A converted copy is reused.
        """
        out = self.universal_dir(folder)
        meta = read_marker(folder)
        failed = out.with_name(out.name + ".failed")
        if self.rank == 0 and not _converted_from(out, meta):
            try:
                self._convert(folder, out, meta, failed)
            except BaseException as e:  # the other ranks wait on the file system: tell them, however it failed
                write_atomic(failed, f"{type(e).__name__}: {e}"[-3000:])
                raise
        elif self.rank != 0:
            # A ViT-g's conversion can outlast a collective's timeout: wait on the file system, not a barrier.
            waited = time.time()
            while not _converted_from(out, meta):
                if _mtime(failed) >= waited - 5:
                    raise RuntimeError(f"rank 0 failed to convert {folder} to the universal format (see its log)")
                if time.time() - waited > 4 * 3600:  # rank 0 died without a word and nothing ended this rank
                    raise RuntimeError(f"no universal copy of {folder} after 4 hours: is rank 0 still running?")
                time.sleep(2.0)
        dist.barrier()
        return out

    def _convert(self, folder: Path, out: Path, meta: dict, failed: Path) -> None:
        log.warning(
            "checkpoint %s was written by %s ranks with ZeRO-%s; converting it to DeepSpeed's universal "
            "format for %d ranks (optimizer state included)", folder, meta.get("world_size"),
            meta.get("zero_stage"), dist.get_world_size(),
        )  # fmt: skip
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cpus = len(os.sched_getaffinity(0))  # DeepSpeed's defaults (4 and 2), within this rank's CPUs
        cmd = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
            "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", str(min(4, cpus)),
            "--num_merge_workers", str(min(2, cpus)),
        ]  # fmt: skip
        t0 = time.time()
        failed.unlink(missing_ok=True)
        # The stop signals never reach the converter (held: Slurm signals every process of the job); this
        # rank takes one that came meanwhile when the conversion is done, and stops after its first step.
        with held():
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"converting {folder} to the universal format failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        _both_model_state_names(tmp)
        _either_stage_global_state(tmp / "zero")
        for root, _, names in os.walk(tmp):  # on disk before its marker (see _synced_writes)
            for name in names:
                fsync_path(Path(root, name))
            fsync_path(Path(root))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        write_atomic(out / MARKER, json.dumps({**meta, "universal": True, "layout": UNIVERSAL_LAYOUT}))
        log.info("converted to %s in %.1fs", out, time.time() - t0)

    def _unloadable(self, source: Path, folder: Path, error: Exception) -> RuntimeError:
        """The error for a checkpoint DeepSpeed cannot read: names it, and how to fall back to the one before."""
        older = [f for _, f in complete_checkpoints(self.dir) if f.name < folder.name]
        return RuntimeError(_unloadable_message(source, folder, error, older[-1] if older else None))

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
        try:
            _, client = engine.load_checkpoint(
                str(source.parent), tag=source.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except ValueError as e:
            if "number of parameter groups" not in str(e) or universal is not None:
                raise
            # ZeRO-3 checkpoints written before largemim put the matrices in a weight-decay group (all of
            # their parameters were in one group): the universal format maps the state by parameter name.
            raise RuntimeError(
                f"checkpoint {folder} has another number of optimizer parameter groups than this run ({e}); "
                "resume with checkpoint.load_universal=true, which loads it parameter by parameter"
            ) from None
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            if not _unreadable(e):
                raise  # not damage (out of memory, a model that changed, ...): DeepSpeed's own error
            raise self._unloadable(source, folder, e) from e
        if client is None:
            raise RuntimeError(f"checkpoint {source} could not be loaded (DeepSpeed returned nothing); see the log")
        client.setdefault("step", step)
        _unshare_step_counts(engine)  # also in checkpoints saved by a run that resumed through the bug below
        if universal is not None:
            restore_module_state(engine, folder)
        log.info("resumed from %s (step %d)%s", folder, step, " via its universal copy" if universal else "")
        return client


def _unreadable(error: BaseException) -> bool:
    """An error that says a checkpoint file is missing, cut short or not a file torch wrote."""
    if isinstance(error, (EOFError, pickle.UnpicklingError, FileNotFoundError)):
        return True
    text = str(error)
    return any(s in text for s in ("PytorchStreamReader", "central directory", "unexpected EOF", "Ran out of input"))


def _unloadable_message(source: Path, folder: Path, error: Exception, previous: Path | None) -> str:
    if source != folder:  # the universal copy was read: it is made again once removed
        fallback = f"remove {source} (the run converts {folder} again)"
    elif previous is not None:
        fallback = f"remove {folder / MARKER} and the run resumes from the previous complete checkpoint, {previous}"
    else:
        fallback = "there is no older complete checkpoint to fall back to"
    return (
        f"could not read checkpoint {source} ({type(error).__name__}: {str(error)[:300]}). If its files are "
        f"damaged (a disk or quota problem while saving, a file removed by hand), {fallback}"
    )


def _both_model_state_names(folder: Path) -> None:
    """A universal load takes the weights and optimizer state from ``zero/`` and only counters and the
    client state from a model-states file, which DeepSpeed looks for under its own stage's name: ZeRO-3
    ``zero_pp_rank_0_mp_rank_00_model_states.pt``, ZeRO-1/2 ``mp_rank_00_model_states.pt``. Both names are
    given (a hard link, else a copy), so a checkpoint of either kind resumes under the other."""
    zero12, zero3 = folder / "mp_rank_00_model_states.pt", folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    for have, want in ((zero12, zero3), (zero3, zero12)):
        if have.is_file() and not want.exists():
            try:
                os.link(have, want)
            except OSError:
                shutil.copyfile(have, want)


def _either_stage_global_state(zero: Path) -> None:
    """Make a universal copy loadable under ZeRO-1/2 and ZeRO-3 alike. DeepSpeed 0.19.8's ZeRO-3 load
    reads Adam's step and the group settings from ``zero/optimizer_state.pt``'s ``optimizer_state_dict``,
    which only a ZeRO-3 source writes; its ZeRO-1/2 load reads the step from each parameter's ``step.pt``
    (without it Adam would start counting again: a bias correction that multiplies the first update by
    ~10), each tensor from a ``{"param": ...}`` (a ZeRO-3 source saves bare tensors) and wants a
    ``ds_version``, all of which only a ZeRO-1/2 source writes. What one lacks is added from the
    other. Settings the run configures are put back after the load (``reapply_optim_config``)."""
    import deepspeed

    from largemim.convert.safe_load import load_torch

    path = zero / "optimizer_state.pt"
    if not path.is_file():
        return
    # written just now by ds_to_universal from this run's own checkpoint
    state = load_torch(path, trust_pickle=True)
    steps = sorted(zero.glob("*/step.pt"))
    changed = False
    if "optimizer_state_dict" not in state and steps and "param_groups" in state:
        step = load_torch(steps[0], trust_pickle=True)
        state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
        changed = True
    if not steps and "optimizer_state_dict" in state:  # a ZeRO-3 source: bare tensors, no step.pt
        step = state["optimizer_state_dict"]["state"][0]["step"]
        for d in (d for d in zero.iterdir() if d.is_dir()):  # one folder per parameter
            for f in d.glob("*.pt"):
                value = load_torch(f)
                if torch.is_tensor(value):  # the ZeRO-1/2 load wants {"param": ..., "cat_dim": ...}
                    torch.save({"param": value, "cat_dim": 0}, f)
            torch.save(step, d / "step.pt")
    if "ds_version" not in state:
        state["ds_version"] = deepspeed.__version__
        changed = True
    if changed:
        torch.save(state, path)


def _unshare_step_counts(engine) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load gives every parameter group the same ``step`` tensor, and
    torch's Adam counts it up in place: with two groups (decay and no decay) it rose twice per optimizer
    step, and the second group's bias correction went wrong. Each state gets its own copy."""
    seen: set[int] = set()
    for state in engine.optimizer.optimizer.state.values() if hasattr(engine.optimizer, "optimizer") else []:
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


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
