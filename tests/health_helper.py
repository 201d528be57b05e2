"""Helper for tests/test_health.py, run under torchrun with 2 ranks: real DeepSpeed engines whose weights
get one NaN or inf on rank 1 only; ``nonfinite_parameters`` must name the tensor there and nowhere else.
Writes one JSON line per case to OUT.

    torchrun --nproc_per_node 2 tests/health_helper.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.config import load_config, make_plan  # noqa: E402
from largemim.distributed import init_distributed, teardown  # noqa: E402
from largemim.engine import build_engine, build_model, load_ds_json  # noqa: E402
from largemim.health import TrainingDiverged, nonfinite_parameters  # noqa: E402
from largemim.trainer import check_fit_to_save  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = [("zero2", "bf16"), ("zero3", "bf16"), ("zero3", "fp32")]


def run_case(stage: str, precision: str, env) -> dict:
    rank = env.rank
    cfg = load_config(
        REPO / "largemim/recipes/mae_tiny_cpu.yaml",
        [
            "data.shards=x",
            "train.steps=3",
            "train.warmup_steps=1",
            f"ds_config={REPO / 'ds_configs' / stage}.json",
            f"train.precision={precision}",
            "model.img_size=24",
            "model.patch_size=3",  # a 27-value pred bias
        ],  # fmt: skip
    )
    ds_json = load_ds_json(cfg.ds_config)
    torch.manual_seed(0)
    engine = build_engine(build_model(cfg, ds_json), cfg, make_plan(cfg, 2, 10_000), ds_json)
    result = {"case": f"{stage}:{precision}", "clean": nonfinite_parameters(engine.module)}
    name, param = next((n, p) for n, p in engine.module.named_parameters() if "blocks.0.attn.qkv.weight" in n)
    local = param.ds_tensor if hasattr(param, "ds_tensor") else param.data  # ZeRO-3: this rank's slice
    result["local_numel"], result["visible_numel"] = local.numel(), param.data.numel()
    for bad in ("nan", "inf"):
        keep = local.view(-1)[-1].clone()
        if rank == 1:
            local.view(-1)[-1] = float(bad)
        found = nonfinite_parameters(engine.module)
        # what a check of the visible tensors alone would see (under ZeRO-3 they are empty between uses)
        naive = [n for n, p in engine.module.named_parameters() if p.numel() and not torch.isfinite(p).all()]
        counts = torch.tensor([len(found)], dtype=torch.float64)
        dist.all_reduce(counts)
        result[bad] = {"found": found, "naive": naive, "all_ranks": int(counts.item())}
        local.view(-1)[-1] = keep
    result["name"] = name
    # what the trainer does before a save: every rank raises, naming the tensor found on rank 1 only
    if rank == 1:
        local.view(-1)[-1] = float("nan")
    try:
        total = check_fit_to_save(engine.module, None, 1, 7, 3, Path(sys.argv[1]).parent / "ckpt", env.device)
        result["save_check"] = f"passed, {total} skipped"
    except TrainingDiverged as e:
        result["save_check"] = str(e)
    local.view(-1)[-1] = keep
    result["clean_save_check"] = check_fit_to_save(engine.module, None, 1, 7, 3, Path("/nonexistent"), env.device)
    # ZeRO-3 pads the last partition of a tensor whose size the world size does not divide, and leaves the
    # padding uninitialised: garbage there is not the model's, and must not stop the run
    odd = [(n, p) for n, p in engine.module.named_parameters() if hasattr(p, "ds_tensor") and p.ds_numel % 2]
    if odd:
        n, p = odd[0]
        if rank == 1:
            p.ds_tensor.view(-1)[-1] = float("nan")  # rank 1 holds the second half: its last value is padding
        result["padded"] = {"name": n, "numel": p.ds_numel, "found": nonfinite_parameters(engine.module)}
    engine.destroy()
    return result


def main() -> None:
    env = init_distributed()
    results = [run_case(*case, env) for case in CASES]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, results)
    if env.rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(gathered))
    dist.barrier()
    teardown(0)


if __name__ == "__main__":
    main()
