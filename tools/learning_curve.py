#!/usr/bin/env python
"""Print a run's learning curve as a Markdown table: the representation check (kNN, linear probe) at each
step it ran, beside the training loss logged at that step, after the random-init and raw-pixel baselines.

Reads RUN_DIR/metrics.jsonl (loss and any other scalar per logged step), RUN_DIR/repr_baselines.json and
the checks in RUN_DIR/eval.jsonl (or, for runs written before it existed, the ``repr/*`` scalars of
RUN_DIR/tb, TensorBoard's event files). Extra columns with ``--also``, e.g.
``--also masked_acc`` for BEiT or ``--also pred_std target_std`` for data2vec.

    python tools/learning_curve.py runs/fmnist_learning
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without pip install -e
from largemim.run_log import jsonl_records  # noqa: E402


def logged_checks(path: Path) -> dict[int, dict[str, float]]:
    """step -> {"knn": ..., "linear": ...} from eval.jsonl (the newest line per step wins)."""
    out: dict[int, dict[str, float]] = {}
    records, _ = jsonl_records(path.read_text(errors="replace"))
    for _, r in records:
        if r.get("eval") == "repr" and "step" in r:
            out[r["step"]] = {k: v for k, v in r.items() if k in ("knn", "linear")}
    return out


def repr_checks(tb_dir: Path) -> dict[int, dict[str, float]]:
    """step -> {"knn": ..., "linear": ...} from the TensorBoard files (the newest value per step wins)."""
    out: dict[int, dict[str, float]] = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith("repr/"):
                for ev in acc.Scalars(tag):
                    out.setdefault(ev.step, {})[tag.removeprefix("repr/")] = ev.value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, nargs="?")
    ap.add_argument(
        "--also", action="extend", nargs="+", default=[], metavar="NAME",
        help="more logged scalars to show, e.g. masked_acc (before or after RUN_DIR)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.run_dir is None and args.also and Path(args.also[-1]).is_dir():
        args.run_dir = Path(args.also.pop())  # "--also a b RUN_DIR": --also took the folder too
    if args.run_dir is None:
        ap.error("give the run folder (RUN_DIR)")
    run = args.run_dir
    if not (run / "metrics.jsonl").is_file():
        sys.exit(f"{run} has no metrics.jsonl: is it a run folder (run.dir of a training)?")
    records, _ = jsonl_records((run / "metrics.jsonl").read_text(errors="replace"))  # torn lines left out
    metrics = {r["step"]: r for _, r in records if "step" in r}
    if (run / "eval.jsonl").is_file():
        checks = logged_checks(run / "eval.jsonl")
    else:
        checks = repr_checks(run / "tb") if (run / "tb").is_dir() else {}
    if not checks:
        sys.exit(
            f"{run} holds no representation checks (eval.jsonl, tb/): set eval.train_shards/test_shards "
            "(and eval.every_steps)"
        )
    baselines = json.loads((run / "repr_baselines.json").read_text()) if (run / "repr_baselines.json").is_file() else {}

    cols = ["loss", *args.also]
    print("| step | " + " | ".join(cols) + " | kNN | linear probe |")
    print("|---" * (len(cols) + 3) + "|")
    init = baselines.get("random_init")
    if init:
        print("| 0 (random init) | " + " | ".join("–" for _ in cols) + f" | {init['knn']:.3f} | {init['linear']:.3f} |")
    for step in sorted(checks):
        logged = metrics.get(step, {})
        cells = [f"{logged[c]:.4g}" if c in logged else "–" for c in cols]
        knn, linear = checks[step].get("knn", float("nan")), checks[step].get("linear", float("nan"))
        print(f"| {step} | " + " | ".join(cells) + f" | {knn:.3f} | {linear:.3f} |")
    raw = baselines.get("raw_pixels")
    if raw:
        print(f"\nRaw pixels: kNN {raw['knn']:.3f}, linear {raw['linear']:.3f}.")


if __name__ == "__main__":
    main()
