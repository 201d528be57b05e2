"""Helper for tests/test_convert.py, run under torchrun: short real DeepSpeed runs that save checkpoints.

For each run asked for (``STAGE`` or ``STAGE:PRECISION``), in one launched process group (start-up is
the slow part on a CPU): build the model and engine exactly as the trainer does, take a few optimizer
steps on random images, save through largemim's ``Checkpointer`` (DeepSpeed files + COMPLETE marker)
into ``OUT/zeroN`` (``OUT/zeroN_bf16`` for a 16-bit run), then
gather the engine's own parameters (``GatheredParameters`` under ZeRO-3) and write them to
``engine_params.safetensors`` in the run folder: the reference a consolidated checkpoint must equal
(exactly in fp32; after rounding to 16 bits in a 16-bit run, whose engine holds 16-bit weights).
Every path a rank fsyncs is listed in ``OUT/fsynced_rankN.txt``.

    torchrun --nproc_per_node 2 tests/ds_checkpoint_helper.py OUT --runs 0 1 2 3 0:bf16 [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.checkpoint import Checkpointer  # noqa: E402
from largemim.config import load_config, make_plan, save_resolved  # noqa: E402
from largemim.distributed import init_distributed, teardown  # noqa: E402
from largemim.engine import build_engine, build_model, load_ds_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_FSYNCED: list[str] = []  # every path this rank fsynced (written to OUT/fsynced_rankN.txt for the tests)
_real_fsync = os.fsync


def _recorded_fsync(fd: int) -> None:
    _FSYNCED.append(os.readlink(f"/proc/self/fd/{fd}"))
    _real_fsync(fd)


os.fsync = _recorded_fsync  # observed, not replaced: the real fsync still runs


def gathered_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter of ``engine.module``, whole, as the engine holds it (collective under ZeRO-3), in
    fp32 (the engine's dtypes go into the file's metadata)."""
    params = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone().float().contiguous() for n, p in params}
    return {n: p.detach().clone().float().contiguous() for n, p in params}


def run_stage(out: Path, run: str, steps: int, overrides: list[str], world: int, rank: int) -> None:
    stage_text, _, precision = run.partition(":")
    stage, precision = int(stage_text), precision or "fp32"
    run_dir = out / (f"zero{stage}" if precision == "fp32" else f"zero{stage}_{precision}")
    cfg = load_config(
        REPO / "largemim/recipes/mae_tiny_cpu.yaml",
        [
            f"run.dir={run_dir}",
            f"ds_config={REPO / 'ds_configs' / f'zero{stage}.json'}",
            "train.micro_batch=4",
            f"train.steps={steps}",
            "train.warmup_steps=1",
            f"train.precision={precision}",
            "optim.base_lr=5e-2",  # large, so a few steps move every weight visibly away from its init
            *overrides,
        ],
    )
    plan = make_plan(cfg, world, num_samples=10_000)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_resolved(cfg, run_dir)
    ds_json = load_ds_json(cfg.ds_config)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, ds_json)
    engine = build_engine(model, cfg, plan, ds_json)
    gen = torch.Generator().manual_seed(1000 + rank)
    m = cfg.model
    for _ in range(steps):
        images = torch.randn(cfg.train.micro_batch, m.in_chans, m.img_size, m.img_size, generator=gen)
        out_ = engine(images)
        engine.backward(out_["loss"])
        engine.step()
    ckpt = Checkpointer(run_dir, keep_last=2, rank=rank)
    ckpt.save(engine, steps, {"step": steps, "config": asdict(cfg)})
    params = gathered_params(engine)
    if rank == 0:
        dtypes = {n: str(p.dtype) for n, p in engine.module.named_parameters()}
        save_file(params, str(run_dir / "engine_params.safetensors"), metadata={"dtypes": json.dumps(dtypes)})
    dist.barrier()
    engine.destroy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--runs", nargs="+", default=["0", "1", "2", "3"], help="STAGE or STAGE:PRECISION")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides key=value")
    args = ap.parse_args()
    env = init_distributed()
    for run in args.runs:
        run_stage(Path(args.out), run, args.steps, args.overrides, env.world_size, env.rank)
    (Path(args.out) / f"fsynced_rank{env.rank}.txt").write_text("\n".join(_FSYNCED) + "\n")
    sys.stdout.flush()
    teardown(0)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
