"""What a run reports: the representation check's read-outs and metrics.jsonl across a resume."""

from __future__ import annotations

import json

import torch

from largemim.evaluation import represent
from largemim.evaluation.represent import LabelledSet, linear_probe_accuracy, pixel_baseline, pixels
from largemim.run_log import RunLog


def test_the_raw_pixel_baseline_pools_large_images():
    """150,528 features at 224 px would need an fp64 probe of tens of GB per rank; pooled to 32 x 32."""
    assert pixels(torch.rand(4, 3, 224, 224)).shape == (4, 3 * 32 * 32)
    small = torch.rand(4, 3, 16, 16)
    assert torch.equal(pixels(small), small.flatten(1))  # small images are used as they are
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    images = torch.rand(40, 3, 64, 64, generator=g) + labels.view(-1, 1, 1, 1).float()  # class = brightness
    result = pixel_baseline(LabelledSet(images[:30], labels[:30]), LabelledSet(images[30:], labels[30:]), k=5)
    assert result["linear"] > 0.9 and 0.0 <= result["knn"] <= 1.0, result  # kNN is cosine: blind to brightness


def test_the_linear_probe_bounds_lbfgs_history(monkeypatch):
    seen, real = [], torch.optim.LBFGS

    def recording(params, **kw):
        seen.append(kw["history_size"])
        return real(params, **kw)

    monkeypatch.setattr(represent.torch.optim, "LBFGS", recording)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 16, generator=g) + 6 * torch.nn.functional.one_hot(y, 16).float()
    assert linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:]) > 0.9
    assert linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:], history_bytes=2e4) > 0.9
    assert seen == [100, 18]  # torch's default while it fits; 2 x 18 copies of a 68-parameter head in 20 kB


def test_a_torn_metrics_line_does_not_stop_the_resume(tmp_path):
    """A node crash can leave a partial or zero-filled last line; the resume drops it (and the lines after
    its checkpoint) and goes on."""
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_bytes(("\n".join(lines) + '\n{"step": 6, "lo').encode() + b"\0" * 64)
    log = RunLog(tmp_path, rank=0, total_steps=10, tensorboard=False, resume_step=4)
    log.step(5, {"loss": 0.5, "lr": 1e-3}, images_per_step=8)
    log.close()
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def _tb_steps(folder, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_a_restart_from_step_0_leaves_one_curve_in_tensorboard(tmp_path):
    """Review finding: a run that died before its first checkpoint and started again from step 0 kept the
    first attempt's scalars beside the new ones (TensorBoard drew a zig-zag): purge from step 1 too."""
    first = RunLog(tmp_path, rank=0, total_steps=10, tensorboard=True, resume_step=0)
    for s in range(1, 6):
        first.step(s, {"loss": 1.0 / s, "lr": 1e-3}, images_per_step=8)
    first.close()
    again = RunLog(tmp_path, rank=0, total_steps=10, tensorboard=True, resume_step=0)
    for s in range(1, 4):
        again.step(s, {"loss": 2.0 / s, "lr": 1e-3}, images_per_step=8)
    again.close()
    assert _tb_steps(tmp_path / "tb") == [1, 2, 3]


def test_the_pictures_show_the_same_images_after_a_resume(tmp_path):
    """Review finding: without a held-out set the pictures showed each start's first batch, so a resumed
    run's reconstructions could not be compared with the earlier ones. The first run's are kept."""
    from largemim.config import load_config
    from largemim.monitor import Monitor

    cfg = load_config(None, ["data.shards=/x/train-{0..9}.tar", "model.img_size=32", "model.patch_size=8"])
    first_batch, resumed_batch = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    Monitor(cfg, None, tmp_path, torch.device("cpu"), rank=0).set_fixed_images(first_batch)
    resumed = Monitor(cfg, None, tmp_path, torch.device("cpu"), rank=0)
    resumed.set_fixed_images(resumed_batch)
    torch.testing.assert_close(resumed.fixed_images, first_batch[:8], atol=2e-3, rtol=1e-3)  # kept as fp16
    other_size = Monitor(cfg, None, tmp_path, torch.device("cpu"), rank=0)
    other_size.set_fixed_images(torch.randn(4, 3, 48, 48))  # another img_size: this run's own images
    assert other_size.fixed_images.shape == (4, 3, 48, 48)


def test_a_corrupt_eval_image_is_skipped_and_counted_not_a_crash(tmp_path, caplog):
    """Review finding: one undecodable image in the eval shards stopped every rank at start-up with a bare
    PIL error naming neither shard nor sample."""
    from conftest import demo_samples, write_shards

    from largemim.data.augment import EvalTransform
    from largemim.evaluation.represent import load_labelled

    samples = demo_samples("test", 12)
    samples[3] = {**samples[3], "png": b"not an image"}
    pattern = write_shards(tmp_path / "eval", samples, [6, 6])
    with caplog.at_level("WARNING"):
        got = load_labelled(pattern, 100, EvalTransform(28, (0.5,) * 3, (0.5,) * 3))
    assert len(got.labels) == 11
    assert got.images.dtype == torch.float16  # half the host memory on every rank (3 GB less at 224 px)
    assert "skipped 1 unreadable sample(s)" in caplog.text and f"sample {samples[3]['__key__']!r}" in caplog.text


def test_eval_shards_are_read_from_object_stores_as_training_shards_are(tmp_path, monkeypatch, caplog):
    """s3:// eval shards (webdataset's own opener knows no s3): read with the training shards' reader,
    here a stand-in AWS CLI that prints the local shard; one that fails is skipped and named."""
    import os

    from conftest import demo_samples, write_shards

    from largemim.data.augment import EvalTransform
    from largemim.evaluation.represent import load_labelled

    write_shards(tmp_path / "eval", demo_samples("test", 12), [6, 6])
    fake = tmp_path / "bin"
    fake.mkdir()
    script = f'case "$3" in *000001*) exit 1;; esac\ncat {tmp_path}/eval/shard-000000.tar\n'
    (fake / "aws").write_text("#!/bin/sh\n" + script)
    (fake / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    with caplog.at_level("WARNING"):
        got = load_labelled("s3://b/eval/shard-{000000..000001}.tar", 100, EvalTransform(28, (0.5,) * 3, (0.5,) * 3))
    assert len(got.labels) == 6
    assert "skipped 1 unreadable" in caplog.text and "shard-000001.tar" in caplog.text


def test_the_eval_decode_shows_progress_on_rank_0_only(tmp_path, capsys):
    """Review finding: every rank decoded the eval images at start-up (6,000 at 224 px: minutes) with nothing
    on screen. One bar, rank 0's: the other ranks decode the same images."""
    from conftest import demo_samples, write_shards

    from largemim.config import load_config
    from largemim.monitor import Monitor

    pattern = write_shards(tmp_path / "eval", demo_samples("test", 30), [20, 10])
    cfg = load_config(
        None,
        ["data.shards=/x/train-{0..9}.tar", "model.img_size=32", "model.patch_size=8", f"eval.train_shards={pattern}",
         f"eval.test_shards={pattern}", "eval.train_samples=25", "eval.test_samples=100"],
    )  # fmt: skip
    capsys.readouterr()
    other = Monitor(cfg, None, tmp_path, torch.device("cpu"), rank=1)
    assert len(other.train_set.labels) == 25 and capsys.readouterr().err == ""
    Monitor(cfg, None, tmp_path, torch.device("cpu"), rank=0)
    err = capsys.readouterr().err
    assert f"decoding {pattern}: 100%" in err and "25/25 [" in err, err
    assert "30/100 [" in err, err  # the test set holds fewer images than asked for: the count says so
