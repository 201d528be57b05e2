"""Helper for tests/test_grad_checks.py, run under torchrun with 2 ranks: real DeepSpeed ZeRO-1/2 engines,
whose gradient norm and inf/NaN test are taken both ways (largemim/grad_checks.py and DeepSpeed's own
loops) on the same gradients. Writes one JSON line per case to OUT.

    torchrun --nproc_per_node 2 tests/grad_checks_helper.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim import grad_checks  # noqa: E402
from largemim.config import load_config, make_plan  # noqa: E402
from largemim.distributed import init_distributed, teardown  # noqa: E402
from largemim.engine import build_engine, build_model, load_ds_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = [  # (ds_config, precision, autocast, micro-batches per optimizer step)
    ("zero2", "bf16", False, 1),
    ("zero1", "bf16", True, 1),
    ("zero2", "fp32", False, 1),
    ("zero2", "bf16", False, 2),  # gradient accumulation: the checks read the summed partition
]  # fp16: DeepSpeed has none on a CPU


class KernelCount(TorchDispatchMode):
    """Operators that are not views (each one a device kernel on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False):
            self.n += 1
        return func(*args, **(kwargs or {}))


def both_ways(opt, fn):
    """fn() with largemim's checks installed, then with DeepSpeed's own; each with its kernel count."""
    with KernelCount() as ours:
        a = fn()
    del opt.get_grad_norm_direct, opt.has_overflow_partitioned_grads_serial  # back to the class's methods
    with KernelCount() as theirs:
        b = fn()
    assert grad_checks.install(opt)
    return a, b, ours.n, theirs.n


def run_case(stage: str, precision: str, autocast: bool, accum: int, rank: int) -> dict:
    cfg = load_config(
        REPO / "largemim/recipes/mae_tiny_cpu.yaml",
        [
            "data.shards=x", "train.steps=3", "train.warmup_steps=1", "train.micro_batch=4",
            f"ds_config={REPO / 'ds_configs' / stage}.json", f"train.precision={precision}",
            f"train.autocast={autocast}", "optim.grad_clip=1.0", f"train.grad_accum={accum}",
        ],
    )  # fmt: skip
    ds_json = load_ds_json(cfg.ds_config)
    torch.manual_seed(0)
    engine = build_engine(build_model(cfg, ds_json), cfg, make_plan(cfg, 2, 10_000), ds_json)
    opt = engine.optimizer
    installed = "get_grad_norm_direct" in vars(opt)
    gen = torch.Generator().manual_seed(rank)
    m = cfg.model
    for micro in range(accum):  # gradients reduced into this rank's partition, no optimizer step yet
        images = torch.randn(cfg.train.micro_batch, m.in_chans, m.img_size, m.img_size, generator=gen)
        engine.backward(engine(images)["loss"])
        if micro < accum - 1:
            engine.step()  # inside an accumulation: only counts the micro-batch
    assert engine.is_gradient_accumulation_boundary()
    norm, norm_ds, kernels, kernels_ds = both_ways(opt, lambda: float(opt.scaled_global_norm()))
    clean, clean_ds, _, _ = both_ways(opt, lambda: opt.has_overflow())
    result = {
        "case": f"{stage}:{precision}:{autocast}:{accum}", "installed": installed, "norm": norm, "norm_ds": norm_ds,
        "kernels": kernels, "kernels_ds": kernels_ds, "tensors": sum(len(g) for g in opt.averaged_gradients.values()),
        "overflow_clean": [clean, clean_ds],
    }  # fmt: skip
    for bad in ("inf", "nan"):  # one value on rank 1 only: both ranks must see the overflow
        grad = opt.averaged_gradients[0][3]
        keep = grad.flatten()[0].clone()
        if rank == 1:
            grad.view(-1)[0] = float(bad)
        hit, hit_ds, _, _ = both_ways(opt, lambda: opt.has_overflow())
        bad_norm, bad_norm_ds, _, _ = both_ways(opt, lambda: float(opt.scaled_global_norm()))
        grad.view(-1)[0] = keep
        result[f"overflow_{bad}"] = [hit, hit_ds]
        result[f"norm_{bad}"] = [bad_norm, bad_norm_ds]
    engine.destroy()
    return result


def main() -> None:
    env = init_distributed()
    results = [run_case(*case, env.rank) for case in CASES]
    if env.rank == 0:
        Path(sys.argv[1]).write_text("".join(json.dumps(r) + "\n" for r in results))
    dist.barrier()
    teardown(0)


if __name__ == "__main__":
    main()
