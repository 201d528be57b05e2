"""One fp32 state dict of the whole MIM model from a largemim checkpoint written at any ZeRO stage.

ZeRO 1-3 keep the fp32 master weights split across the ranks' optimizer shards; DeepSpeed's
``zero_to_fp32`` merges them. It does not cover everything, so this module adds:

- stage 0, which ``zero_to_fp32`` cannot read (DeepSpeed#6699): the weights are ``module`` in
  ``mp_rank_00_model_states.pt``; under bf16/fp16 that copy is 16-bit, and the fp32 masters are taken
  from the optimizer state saved beside it (``fp32_groups``), matched to names through largemim's own
  parameter groups and checked against the 16-bit copy;
- frozen parameters (the fixed sin-cos ``pos_embed``/``decoder_pos_embed``): ZeRO-1 checkpoints do not
  record them for ``zero_to_fp32`` (it returns 108 of 110 tensors), so they come from ``module``;
- completeness: only a checkpoint with largemim's ``COMPLETE`` marker and every rank's shard file for
  the world size it records is read;
- safety: every file passes the weights-only unpickler (``safe_load.check_files``) before DeepSpeed's
  full unpickle sees it.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from largemim.checkpoint import MARKER, TAG_RE, complete_checkpoints, read_marker
from largemim.convert.arch import MIMArch
from largemim.convert.safe_load import check_files, load_torch
from largemim.objectives.ema import is_run_state

log = logging.getLogger(__name__)


class IncompleteCheckpointError(RuntimeError):
    """The checkpoint was not fully written (no marker, or shard files missing)."""


@dataclass(frozen=True)
class CheckpointFiles:
    folder: Path
    step: int
    world_size: int
    zero_stage: int
    model_files: tuple[Path, ...]
    optim_files: tuple[Path, ...]

    @property
    def rank0_model_file(self) -> Path:
        return self.model_files[0]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (its newest complete checkpoint), a ``checkpoints`` folder,
    or a checkpoint folder itself."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (give a run folder or a checkpoints/step_XXXXXXXX folder)")
    if TAG_RE.match(path.name) or (path / MARKER).exists() or any(path.glob("*_model_states.pt")):
        return path
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    complete = complete_checkpoints(ckpt_dir)
    if complete:
        step, newest = complete[-1]
        newer = sorted(d.name for d in ckpt_dir.iterdir() if (m := TAG_RE.match(d.name)) and int(m.group(1)) > step)
        if newer:
            log.warning(
                "skipping %s: no %s marker (interrupted saves); using %s", ", ".join(newer), MARKER, newest.name
            )
        return newest
    partial = sorted(d.name for d in ckpt_dir.iterdir() if TAG_RE.match(d.name)) if ckpt_dir.is_dir() else []
    if partial:
        raise IncompleteCheckpointError(
            f"{ckpt_dir} has no complete checkpoint: {', '.join(partial)} lack the {MARKER} marker that is "
            "written once every rank has saved (interrupted saves); nothing to convert"
        )
    raise FileNotFoundError(f"no checkpoints under {path} (expected {path}/checkpoints/step_XXXXXXXX/)")


def _optim_names(folder: Path, world: int) -> list[str]:
    # bf16 runs write bf16_zero_pp_rank_*; use whichever prefix the folder has.
    prefix = "bf16_" if any(folder.glob("bf16_zero_pp_rank_*_optim_states.pt")) else ""
    return [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]


def checkpoint_files(folder: str | Path) -> CheckpointFiles:
    """The files a complete checkpoint must have, checked; ``IncompleteCheckpointError`` names what is missing."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise IncompleteCheckpointError(
            f"{folder} has no {MARKER} marker: the save was interrupted or is still running (the marker is "
            "written only after every rank has finished writing). Use an earlier checkpoint of the run."
        )
    meta = read_marker(folder)
    try:
        step, world, stage = int(meta["step"]), int(meta["world_size"]), int(meta["zero_stage"])
    except (KeyError, TypeError, ValueError):
        raise IncompleteCheckpointError(f"{folder / MARKER} is not a largemim marker: {meta}") from None
    if stage == 3:
        model = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    else:
        model = ["mp_rank_00_model_states.pt"]
    optim = _optim_names(folder, world) if stage > 0 else []
    missing = [n for n in model + optim if not (folder / n).is_file()]
    if missing:
        raise IncompleteCheckpointError(
            f"{folder} is incomplete: a ZeRO-{stage} checkpoint of {world} ranks needs {len(model + optim)} "
            f"files and these are missing: {', '.join(missing)}"
        )
    return CheckpointFiles(
        folder, step, world, stage, tuple(folder / n for n in model), tuple(folder / n for n in optim)
    )  # fmt: skip


def _arch_from_checkpoint(states: dict, folder: Path, files: CheckpointFiles) -> MIMArch | None:
    info = {"step": files.step, "zero_stage": files.zero_stage, "world_size": files.world_size, "source": str(folder)}
    cfg = states.get("config")
    if isinstance(cfg, dict) and "model" in cfg:
        return MIMArch.from_config_dict(cfg, **info)
    run_yaml = folder.parent.parent / "config.yaml"  # run_dir/checkpoints/step_X -> run_dir/config.yaml
    if run_yaml.is_file():
        from omegaconf import OmegaConf

        log.warning("%s has no saved config; using %s (the run's current config)", folder, run_yaml)
        return MIMArch.from_config_dict(OmegaConf.to_container(OmegaConf.load(run_yaml)), **info)
    log.warning("%s: no config found; heads, mask ratio and normalisation will have to be given", folder)
    return None


def _stage0_masters(states: dict, arch: MIMArch | None) -> dict[str, torch.Tensor]:
    """fp32 master weights of a 16-bit ZeRO-0 run, by name; {} when ``module`` is already fp32."""
    module = states["module"]
    if all(v.dtype == torch.float32 for v in module.values()):
        return {}
    opt = states.get("optimizer")
    groups = opt.get("fp32_groups") or opt.get("fp32_groups_flat") if isinstance(opt, dict) else None
    if not groups:
        log.warning("ZeRO-0 checkpoint holds 16-bit weights and no fp32 masters: writing the 16-bit values in fp32")
        return {}
    if arch is None:
        log.warning("no config to match the fp32 master weights to names: writing the 16-bit weights in fp32")
        return {}
    from largemim.engine import param_groups  # the groups the engine gave the optimizer, in its order

    model = arch.build("meta")
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
    if len(by_group) != len(groups):
        log.warning("optimizer has %d groups, largemim builds %d: using the 16-bit weights", len(groups), len(by_group))
        return {}
    masters = {}
    for group_names, tensors in zip(by_group, groups, strict=True):
        if isinstance(tensors, torch.Tensor):  # one flat buffer per group (FP16_Optimizer)
            tensors = torch.split(tensors, [module[n].numel() for n in group_names])
        if len(tensors) != len(group_names):
            log.warning("optimizer group sizes differ from largemim's parameter groups: using the 16-bit weights")
            return {}
        for name, t in zip(group_names, tensors, strict=True):
            low = module[name]
            t = t.reshape(low.shape) if t.numel() == low.numel() else t
            if t.shape != low.shape or not torch.equal(t.to(low.dtype), low):
                log.warning("fp32 master of %s does not round to the saved weight: using the 16-bit weights", name)
                return {}
            masters[name] = t
    return masters


def consolidate(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], MIMArch | None]:
    """fp32 state dict of the whole MIM model in a run's newest complete checkpoint (or the given one),
    and the architecture from its saved config."""
    folder = resolve_checkpoint(path)
    files = checkpoint_files(folder)
    all_files = files.model_files + files.optim_files
    t0 = time.time()
    log.info("checkpoint %s: step %d, ZeRO-%d, %d ranks, %d files, %.1f MiB", folder, files.step, files.zero_stage,
             files.world_size, len(all_files), sum(f.stat().st_size for f in all_files) / 2**20)  # fmt: skip
    check_files(all_files, trust_pickle)
    states = load_torch(files.rank0_model_file, trust_pickle=trust_pickle, mmap=True)
    if int(states.get("dp_world_size", files.world_size)) != files.world_size:
        raise IncompleteCheckpointError(
            f"{folder}: marker says {files.world_size} ranks, DeepSpeed's model states say {states['dp_world_size']}"
        )
    arch = _arch_from_checkpoint(states, folder, files)
    module = states["module"]
    if files.zero_stage == 0:
        masters = _stage0_masters(states, arch)
        sd = {k: masters.get(k, v) for k, v in module.items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        log.info("merging %d optimizer shards with deepspeed.utils.zero_to_fp32", len(files.optim_files))
        # zero_to_fp32 fully unpickles every *_model_states.pt / *_optim_states.pt in the folder: show it
        # only the files checked above (a stray file there could run code otherwise)
        with tempfile.TemporaryDirectory(prefix="largemim-consolidate-") as staged:
            (Path(staged) / folder.name).mkdir()
            for f in all_files:
                (Path(staged) / folder.name / f.name).symlink_to(f.resolve())
            sd = dict(get_fp32_state_dict_from_zero_checkpoint(staged, tag=folder.name))
        for k, v in module.items():  # frozen parameters that zero_to_fp32 left out (ZeRO-1)
            if k not in sd:
                if v.numel() == 0:  # ZeRO-3 keeps only placeholders in module
                    raise RuntimeError(f"{folder}: {k} is neither in the optimizer shards nor in the model states")
                log.info("%s: frozen, not in the optimizer shards; taken from the model states", k)
                sd[k] = v
    missing = [k for k in module if k not in sd]
    if missing:
        raise RuntimeError(f"{folder}: consolidation lost {missing}")
    # Run-local training state (data2vec's fp32 EMA master: under ZeRO-3 each rank holds its own slice, and
    # rank 0's file has only that slice) is not part of the model: a run initialised from these weights
    # rebuilds it from the teacher.
    dropped = [k for k in module if is_run_state(k)]
    if dropped:
        log.info("left out run-local training state: %s", ", ".join(dropped))
    # the model's own order; integer buffers (a BEiT tokenizer's id) keep their dtype: fp32 would round them
    sd = {k: _fp32(sd[k]) for k in module if k not in dropped}
    _exact_sincos(sd)
    log.info("consolidated %d tensors in %.1fs", len(sd), time.time() - t0)
    return sd, arch


SINCOS_KEYS = ("encoder.pos_embed", "decoder_pos_embed")  # fixed, frozen: never trained


def _exact_sincos(sd: dict[str, torch.Tensor]) -> None:
    """A 16-bit run's frozen sin-cos tables come out of its checkpoint rounded to bf16/fp16 (a frozen
    parameter has no fp32 master): they are put back exactly, as every other export of them has them.
    Only where the saved table is that table, rounded; anything else is left as it is."""
    from largemim.models.pos_embed import sincos_2d

    for key in SINCOS_KEYS:
        table = sd.get(key)
        if table is None or table.ndim != 3 or table.shape[-1] % 4:
            continue
        grid = math.isqrt(table.shape[1] - 1)
        if grid * grid != table.shape[1] - 1:
            continue
        exact = sincos_2d(table.shape[-1], grid).unsqueeze(0).to(table.dtype)
        if not torch.equal(table, exact) and torch.allclose(table, exact, rtol=0, atol=1e-2):
            sd[key] = exact


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return (t.float() if t.is_floating_point() else t).contiguous()
