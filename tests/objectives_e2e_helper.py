"""Helper for tests/test_objectives_e2e.py, run under torchrun: several real trainings in one process group
(start-up is the slow part on a CPU), each through the real training loop (``largemim.trainer.train``).

PLAN is a JSON list of runs: ``{"recipe": ..., "run_dir": ..., "overrides": [...], "resume_at": k or null}``.
A run with ``resume_at`` trains to its end (saving every k steps), keeps its metrics as
``metrics_straight.jsonl``, deletes the checkpoints after step k as if the job had died there, and runs
the same config again: it resumes from step k and logs steps k+1.. again into ``metrics.jsonl``.

    torchrun --nproc_per_node 2 tests/objectives_e2e_helper.py PLAN.json
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from largemim.checkpoint import complete_checkpoints  # noqa: E402
from largemim.config import check_objective, load_config  # noqa: E402
from largemim.distributed import init_distributed, teardown  # noqa: E402
from largemim.run_log import setup_console  # noqa: E402


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    env = init_distributed()
    setup_console(env.rank)
    from largemim.trainer import train  # after the process group, as largemim.train does

    for run in plan:
        run_dir = Path(run["run_dir"])
        cfg = load_config(run["recipe"], [*run["overrides"], f"run.dir={run_dir}"])
        try:
            check_objective(cfg)
            train(cfg, env)
            if run.get("resume_at"):
                if env.rank == 0:
                    shutil.copy(run_dir / "metrics.jsonl", run_dir / "metrics_straight.jsonl")
                    for step, folder in complete_checkpoints(run_dir / "checkpoints"):
                        if step > run["resume_at"]:
                            shutil.rmtree(folder)
                dist.barrier()
                if run.get("resume_overrides"):
                    again = [*run["overrides"], *run["resume_overrides"], f"run.dir={run_dir}"]
                    cfg = load_config(run["recipe"], again)
                summary = train(cfg, env)
                if summary["start_step"] != run["resume_at"]:
                    raise RuntimeError(f"{run_dir} resumed from step {summary['start_step']}, not {run['resume_at']}")
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # no barrier: the other rank may be stuck in a collective; torchrun ends it
    teardown(0)


if __name__ == "__main__":
    main()
