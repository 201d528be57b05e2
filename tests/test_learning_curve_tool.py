"""tools/learning_curve.py on a run folder written the way the trainer writes one (real TensorBoard files)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO
from torch.utils.tensorboard import SummaryWriter


def test_prints_the_checks_beside_the_logged_loss(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 1.0 / s, "masked_acc": s / 1000}) for s in range(50, 301, 50))
    )
    (tmp_path / "repr_baselines.json").write_text(
        json.dumps({"random_init": {"knn": 0.5, "linear": 0.6}, "raw_pixels": {"knn": 0.7, "linear": 0.65}})
    )
    writer = SummaryWriter(tmp_path / "tb")
    for step, knn in ((100, 0.61), (200, 0.72), (300, 0.74)):
        writer.add_scalar("repr/knn", knn, step)
        writer.add_scalar("repr/linear", knn + 0.1, step)
    writer.close()
    out = subprocess.run(
        [sys.executable, str(REPO / "tools/learning_curve.py"), str(tmp_path), "--also", "masked_acc"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    # the folder after --also (its help's own example order) was taken as a column name: "run_dir required"
    flipped = subprocess.run(
        [sys.executable, str(REPO / "tools/learning_curve.py"), "--also", "masked_acc", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd="/",
    ).stdout.splitlines()  # fmt: skip
    assert flipped == out
    assert out[0] == "| step | loss | masked_acc | kNN | linear probe |"
    assert out[2] == "| 0 (random init) | – | – | 0.500 | 0.600 |"
    assert out[3:6] == [
        "| 100 | 0.01 | 0.1 | 0.610 | 0.710 |",
        "| 200 | 0.005 | 0.2 | 0.720 | 0.820 |",
        "| 300 | 0.003333 | 0.3 | 0.740 | 0.840 |",
    ]
    assert out[-1] == "Raw pixels: kNN 0.700, linear 0.650."


def test_a_folder_without_checks_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}))
    proc = subprocess.run([sys.executable, str(REPO / "tools/learning_curve.py"), str(tmp_path)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0 and "no representation checks" in proc.stderr
