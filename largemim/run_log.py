"""What a run reports, from rank 0: console lines with rate and ETA, TensorBoard, metrics.jsonl (one line
per logged step) and eval.jsonl (one line per evaluation, e.g. the representation check)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from largemim.files import write_atomic

log = logging.getLogger("largemim")


def setup_console(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def jsonl_records(text: str) -> tuple[list[tuple[str, dict]], int]:
    """A JSON-lines file's (metrics.jsonl, eval.jsonl) lines with their records, and how many lines were
    torn (a run killed while writing can leave a partial or zero-filled line): those are left out."""
    records, torn = [], 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            torn += bool(line.strip("\x00 \t"))
            continue
        if isinstance(record, dict):
            records.append((line, record))
    return records, torn


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint (the resumed run logs them again), and
    a line the kill tore (a node crash can leave a partial or zero-filled tail). Replaced whole: a
    crash during the rewrite leaves the old file."""
    if not path.exists():
        return
    records, torn = jsonl_records(path.read_text(errors="replace"))
    kept = [line for line, record in records if record.get("step", 0) <= step]
    if torn:
        log.warning("%s: dropped %d unreadable line(s) (a run killed while writing)", path, torn)
    write_atomic(path, "".join(ln + "\n" for ln in kept))


class RunLog:
    """Writes only on rank 0; other ranks get a RunLog whose methods do nothing."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        total_steps: int,
        tensorboard: bool,
        resume_step: int,
        flops_per_image: int | None = None,
        peak_tflops: float | None = None,
        world_size: int = 1,
    ):
        self.active = rank == 0
        self.total = total_steps
        self.flops_per_image, self.peak_tflops, self.world_size = flops_per_image, peak_tflops, world_size
        self.writer = None
        if not self.active:
            return
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.eval_path = Path(run_dir) / "eval.jsonl"
        for path in (self.metrics_path, self.eval_path):
            _truncate_after(path, resume_step)
        self.metrics = open(self.metrics_path, "a")  # noqa: SIM115 - held open for the whole run
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Flushed every 15 s (not 120): a run that dies (a non-finite loss raises) keeps its last scalars.
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1, flush_secs=15)
        self._t0, self._step0 = time.time(), resume_step

    def restart_clock(self, step: int) -> None:
        self._t0, self._step0 = time.time(), step

    def step(self, step: int, scalars: dict[str, float], images_per_step: int) -> None:
        if not self.active:
            return
        elapsed = time.time() - self._t0
        done = step - self._step0
        rate = done * images_per_step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done else 0.0
        record = {"step": step, **scalars, "images_per_s": rate}
        if self.flops_per_image:  # achieved model TFLOP/s per device, and MFU where the peak is known
            record["tflops_per_device"] = rate * self.flops_per_image / self.world_size / 1e12
            if self.peak_tflops:
                record["mfu"] = record["tflops_per_device"] / self.peak_tflops
        record["time"] = time.time()
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.writer:
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            for k in ("images_per_s", "tflops_per_device", "mfu"):
                if k in record:
                    self.writer.add_scalar(f"train/{k}", record[k], step)
        extra = "".join(f" {k} {v:.4g}" for k, v in scalars.items() if k not in ("loss", "lr"))
        mfu = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
        log.info(
            "step %d/%d loss %.4f lr %.3e%s | %.1f img/s%s | eta %s",
            step, self.total, scalars["loss"], scalars["lr"], extra, rate, mfu, format_duration(eta),
        )  # fmt: skip

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """An evaluation's results at ``step`` (e.g. prefix "repr": knn, linear): a line of eval.jsonl and
        TensorBoard's ``prefix/*``."""
        if not self.active:
            return
        with open(self.eval_path, "a") as f:
            f.write(json.dumps({"step": step, "eval": prefix, **values, "time": time.time()}) + "\n")
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, image, step: int) -> None:
        if self.active and self.writer:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.active:
            self.metrics.close()
            if self.writer:
                self.writer.close()
