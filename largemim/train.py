"""Entry point: ``torchrun ... -m largemim.train --config RECIPE [key=value ...]``.

Reads the config, joins the process group, trains (resuming from the run folder if it holds a
complete checkpoint), prints the representation check, and leaves.
"""

from __future__ import annotations

import argparse
import json
import sys

from largemim.config import ConfigError, load_config
from largemim.distributed import init_distributed, teardown
from largemim.health import TrainingDiverged
from largemim.launch.slurm_env import report_end
from largemim.run_log import setup_console
from largemim.signals import catch_early


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="largemim-train", description=__doc__)
    ap.add_argument("--config", help="YAML recipe, e.g. largemim/recipes/mae_vit_base_patch16.yaml")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed CLI
    ap.add_argument("overrides", nargs="*", help="dotted overrides: data.shards=... run.dir=... optim.lr=1e-4")
    return ap.parse_args(argv)


def format_summary(summary: dict) -> str:
    if "final" not in summary:
        return ""
    base = summary.get("baselines", {})
    rows = [("raw pixels", base.get("raw_pixels")), ("random-init encoder", base.get("random_init"))]
    rows.append((f"pre-trained encoder (step {summary['end_step']})", summary["final"]))
    lines = ["representation check (held-out labelled images):", f"  {'features':<34} {'kNN':>7} {'linear':>7}"]
    lines += [f"  {name:<34} {r['knn']:>7.4f} {r['linear']:>7.4f}" for name, r in rows if r]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # SLURM signals every process of a step, possibly while this one is still starting: from here
        # on a stop signal is recorded (and ignored in forked loader workers) until the loop takes over.
        catch_early(list(cfg.checkpoint.stop_signals))
    except (ConfigError, ValueError) as e:
        print(f"largemim: config error: {e}", file=sys.stderr)
        return 2
    env = init_distributed()
    setup_console(env.rank)
    from largemim.trainer import train  # after the process group: imports DeepSpeed's engine

    code = 0
    try:
        summary = train(cfg, env)
        report_end(env.local_rank, summary["stopped_early"], summary["end_step"])  # for slurm/job_lib.sh
        if env.rank == 0:
            table = format_summary(summary)
            if table:
                print(table, flush=True)
                print("summary: " + json.dumps(summary), flush=True)
    except ConfigError as e:
        print(f"largemim: config error: {e}", file=sys.stderr)
        code = 2
    except TrainingDiverged as e:  # raised on every rank together: the message says what was kept and what to do
        if env.rank == 0:
            print(f"largemim: training stopped: {e}", file=sys.stderr)
        code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    if code:
        sys.exit(code)  # no barrier: other ranks may be stuck; let the launcher tear them down
    teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
