"""A run's record of its Slurm jobs, and the status view built from it.

``RUN_DIR/slurm/chain.jsonl`` gets one line per event: ``submitted`` (by largemim-submit), then, from rank
0 inside the job, ``started`` (with the step it resumes from), and ``finished``, ``requeued``, ``stopped``
or ``failed`` (with the step it reached). A requeued job keeps its Slurm job id, so one id can have
several starts; a run submitted again (after a cap or a cancel) adds a new id. Appending one short line
is atomic enough for a status view; nothing reads this file to decide anything.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from largemim.run_log import jsonl_records

CHAIN = "chain.jsonl"


def record(slurm_dir: Path, event: str, **fields) -> None:
    slurm_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"event": event, "time": time.time(), **fields})
    with open(slurm_dir / CHAIN, "a") as f:
        f.write(line + "\n")


def read(slurm_dir: Path) -> list[dict]:
    path = slurm_dir / CHAIN
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return events


def slurm_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """{job id: {"State": ..., "Restarts": ...}} from squeue/scontrol (live jobs) and sacct (ended ones)."""
    out: dict[str, dict[str, str]] = {}
    for jid in job_ids:
        try:
            text = subprocess.run(
                ["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            text = ""
        fields = dict(w.split("=", 1) for w in text.split() if "=" in w)
        if fields.get("JobState"):
            out[jid] = {"State": fields["JobState"], "Restarts": fields.get("Restarts", "")}
    missing = [j for j in job_ids if j not in out]
    if missing:
        cmd = ["sacct", "-o", "JobID,State", "--parsable2", "-X"]
        for jid in missing:
            cmd += ["-j", jid]
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            text = ""
        for line in text.splitlines()[1:]:
            parts = line.split("|")
            if len(parts) >= 2 and parts[0] in missing:
                out[parts[0]] = {"State": parts[1].split()[0] if parts[1] else "UNKNOWN", "Restarts": ""}
    return out


def _clock(t: float) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(t))


def _last_record(path: Path) -> dict | None:
    """The last readable line of a JSON-lines file (metrics.jsonl, eval.jsonl); None if there is none."""
    if not path.is_file():
        return None
    records, _ = jsonl_records(path.read_text(errors="replace"))
    return records[-1][1] if records else None


def _last_metrics(run_dir: Path) -> dict | None:
    return _last_record(run_dir / "metrics.jsonl")


def _newest_checkpoint(run_dir: Path) -> int | None:
    ckpt = run_dir / "checkpoints"
    steps = [int(d.name[5:]) for d in ckpt.glob("step_*") if (d / "COMPLETE").is_file() and d.name[5:].isdigit()]
    return max(steps) if steps else None


def format_status(run_dir: Path, query_slurm: bool = True) -> str:
    """The job chain of ``run_dir``: ids, Slurm states, starts and requeues, steps; then progress and loss."""
    run_dir = Path(run_dir)
    events = read(run_dir / "slurm")
    if not events:
        return f"{run_dir}: no Slurm jobs recorded ({run_dir / 'slurm' / CHAIN} does not exist)"
    order: list[str] = []
    by_job: dict[str, list[dict]] = {}
    for e in events:
        jid = str(e.get("job_id", "?"))
        if jid not in by_job:
            order.append(jid)
            by_job[jid] = []
        by_job[jid].append(e)
    states = slurm_states(order) if query_slurm else {}
    total = next((e["total_steps"] for e in reversed(events) if e.get("total_steps")), None)

    lines = [f"run {run_dir}"]
    for jid in order:
        evs = by_job[jid]
        sub = next((e for e in evs if e["event"] == "submitted"), {})
        starts = [e for e in evs if e["event"] == "started"]
        state = states.get(jid, {}).get("State") or "(not known to Slurm any more)"
        cap = sub.get("max_requeues")
        head = f"job {jid}: {state}, {max(0, len(starts) - 1)} requeue(s)"
        head += f" (cap {cap})" if cap is not None else ""
        if sub.get("nodes"):
            head += f", {sub['nodes']} node(s) x {sub.get('tasks_per_node', 1)} task(s)"
        if sub.get("signal"):
            head += f", requeue signal {sub['signal']}@{sub.get('signal_delay_s')}s"
        lines.append(head)
        for e in evs:
            what = e["event"]
            if what == "submitted":
                detail = ""
            elif what == "started":
                nodes = ",".join(e.get("nodes", []))
                detail = f"from step {e.get('step', 0)} on {nodes} (restart {e.get('restart', 0)})"
            elif what in ("finished", "requeued", "stopped"):
                detail = f"at step {e.get('step')}" + (f": {e['reason']}" if e.get("reason") else "")
            else:  # failed
                detail = e.get("error", "")
            lines.append(f"  {_clock(e['time'])}  {what:<9} {detail}".rstrip())
    last = _last_metrics(run_dir)
    ckpt = _newest_checkpoint(run_dir)
    progress = "progress: "
    if last:
        progress += f"step {last['step']}" + (f" of {total}" if total else "")
        if "loss" in last:
            progress += f", last loss {last['loss']:.4f}"
    else:
        progress += "no step logged yet"
    progress += f"; newest complete checkpoint: {'step ' + str(ckpt) if ckpt is not None else 'none'}"
    lines.append(progress)
    check = _last_record(run_dir / "eval.jsonl")
    if check and "knn" in check and "linear" in check:
        knn, linear = check["knn"], check["linear"]
        lines.append(f"representation check: step {check['step']}, kNN {knn:.3f}, linear {linear:.3f}")
    return "\n".join(lines)
