"""SimMIM, the dVAE -> BEiT hand-off and data2vec end to end: the real training loop under torchrun, 2 ranks,
gloo, real DeepSpeed engines (ZeRO-2 and ZeRO-3, bf16 and fp32, activation checkpointing; data2vec's
teacher at every ZeRO stage), real tar shards; resume after a lost checkpoint gives the same losses and
logged scalars as the uninterrupted run.

Two launches of tests/objectives_e2e_helper.py (several trainings each): the dVAE runs, then, after
tools/export_tokenizer.py wrote their tokenizers, the BEiT, SimMIM and data2vec runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, free_port, read_metrics, trainer_env

pytestmark = pytest.mark.slow

STEPS = 8
RECIPES = REPO / "largemim/recipes"
ZERO3_NOTHING_PERSISTENT = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "stage3_param_persistence_threshold": 0,
    }  # fmt: skip
}  # every parameter partitioned between uses (the 224 px case), unlike zero3.json's tiny-model case


def _run(
    recipe: str, run_dir: Path, shards: str, ds: str, precision: str, *extra: str, resume_at=None, steps=STEPS,
    resume_overrides=(),
):  # fmt: skip
    overrides = [
        *TINY, f"data.shards={shards}", f"ds_config={ds}", f"train.precision={precision}", f"train.steps={steps}",
        f"checkpoint.every_steps={steps // 2}", f"log.image_every_steps={steps // 2}", *extra,
    ]  # fmt: skip
    return {"recipe": str(RECIPES / recipe), "run_dir": str(run_dir), "overrides": overrides, "resume_at": resume_at,
            "steps": steps, "resume_overrides": list(resume_overrides)}  # fmt: skip


def _launch(plan: list[dict], folder: Path, timeout: int = 900) -> None:
    path = folder / f"plan_{len(list(folder.glob('plan_*.json')))}.json"
    path.write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests/objectives_e2e_helper.py"), str(path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"helper failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def _check_run(run: dict, key: str = "loss") -> dict[int, dict]:
    """Finite, falling loss over the run; with a resume, steps after it equal the uninterrupted run's."""
    run_dir, steps = Path(run["run_dir"]), run["steps"]
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, steps + 1)), run_dir
    values = [metrics[s][key] for s in range(1, steps + 1)]
    assert all(v == v and abs(v) < 1e6 for v in values), (run_dir, values)
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, (run_dir, values)
    assert (run_dir / f"checkpoints/step_{steps:08d}/COMPLETE").is_file()
    if run["resume_at"]:
        lines = (run_dir / "metrics_straight.jsonl").read_text().splitlines()
        straight = {r["step"]: r for r in map(json.loads, lines)}
        for step in range(run["resume_at"] + 1, steps + 1):
            for name, value in straight[step].items():
                if name not in ("time", "images_per_s", "tflops_per_device", "mfu"):
                    assert metrics[step][name] == value, (run_dir, step, name, value, metrics[step][name])
    return metrics


def _export(run_dir: Path) -> Path:
    out = subprocess.run(
        [sys.executable, str(REPO / "tools/export_tokenizer.py"), str(run_dir)],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path == run_dir / "tokenizer.safetensors" and path.is_file()
    return path


# the dVAE learns more slowly than the ViT objectives: 16 steps at lr 6e-3 (5e-2 x global batch 32 / 256)
DVAE = ["objective.vocab_size=64", "objective.dvae_hidden=16", "objective.dvae_temp_steps=6", "optim.base_lr=5e-2"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, shard_set) -> dict:
    """dVAE runs under ZeRO-2 bf16 (with a resume), ZeRO-3 fp32 and ZeRO-0 bf16, and the tokenizers exported
    from them (each stage's checkpoint is consolidated differently)."""
    folder = tmp_path_factory.mktemp("dvae")
    runs = {
        "zero2_bf16": _run("dvae_tiny_cpu.yaml", folder / "zero2", shard_set, "ds_configs/zero2.json", "bf16", *DVAE,
                           resume_at=8, steps=16),
        "zero3_fp32": _run("dvae_tiny_cpu.yaml", folder / "zero3", shard_set, "ds_configs/zero3.json", "fp32", *DVAE,
                           steps=16),
        "zero0_bf16": _run("dvae_tiny_cpu.yaml", folder / "zero0", shard_set, "ds_configs/zero0.json", "bf16", *DVAE,
                           steps=16),  # consolidated from the 16-bit weights' fp32 masters in the optimizer state
    }  # fmt: skip
    _launch(list(runs.values()), folder)
    return {"runs": runs, "files": {k: _export(Path(r["run_dir"])) for k, r in runs.items()}}


def test_dvae_trains_resumes_and_exports_a_tokenizer(tokenizers):
    from largemim.objectives.dvae import load_tokenizer, read_tokenizer_meta

    for run in tokenizers["runs"].values():
        metrics = _check_run(run)
        _check_run(run, "recon_mse")
        last = metrics[16]
        assert {"recon_mse", "kl", "temperature", "codebook_usage", "perplexity"} <= set(last)
        assert last["temperature"] == pytest.approx(0.0625)  # 1 -> 1/16 over 6 of the 16 steps
        assert 0 < last["codebook_usage"] <= 1 and last["perplexity"] >= 1
        assert (Path(run["run_dir"]) / "reconstructions/step_00000016.png").is_file()
    for path in tokenizers["files"].values():
        meta = read_tokenizer_meta(path)
        assert (meta.vocab_size, meta.grid_size, meta.image_size, meta.in_chans) == (64, 4, 16, 3)
        assert meta.mean == (0.286, 0.286, 0.286) and "step 16" in meta.source
        model, _ = load_tokenizer(path)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_beit_simmim_data2vec_under_zero2_and_zero3(tmp_path, shard_set, tokenizers):
    ds3_cold = tmp_path / "zero3_nothing_persistent.json"
    ds3_cold.write_text(json.dumps(ZERO3_NOTHING_PERSISTENT))
    z2, z3 = "ds_configs/zero2.json", "ds_configs/zero3.json"
    beit = ["objective.vocab_size=64", "objective.min_block_patches=2"]
    d2v = ["objective.target_layers=2", "objective.min_block_patches=2", "objective.ema_start=0.99",
           "objective.ema_end=0.999", "objective.ema_steps=8"]  # fmt: skip
    simmim = ["objective.mask_patch_size=8"]
    tok2, tok3 = (f"objective.tokenizer={tokenizers['files'][k]}" for k in ("zero2_bf16", "zero3_fp32"))
    runs = {
        "beit_z2_bf16": _run("beit_tiny_cpu.yaml", tmp_path / "beit2", shard_set, z2, "bf16", *beit, tok2,
                             resume_at=4),
        "beit_z3_fp32_ckpt": _run("beit_tiny_cpu.yaml", tmp_path / "beit3", shard_set, z3, "fp32", *beit, tok3,
                                  "model.grad_ckpt_every=1"),
        "simmim_z2_bf16_ckpt": _run("simmim_tiny_cpu.yaml", tmp_path / "simmim2", shard_set, z2, "bf16", *simmim,
                                    "model.grad_ckpt_every=1", resume_at=4),
        "simmim_z3_bf16": _run("simmim_tiny_cpu.yaml", tmp_path / "simmim3", shard_set, str(ds3_cold), "bf16",
                               *simmim),
        "d2v_z2_bf16_ckpt": _run("data2vec_tiny_cpu.yaml", tmp_path / "d2v2", shard_set, z2, "bf16", *d2v,
                                 "model.grad_ckpt_every=1", resume_at=4),
        "d2v_z0_fp32": _run("data2vec_tiny_cpu.yaml", tmp_path / "d2v0", shard_set, "ds_configs/zero0.json", "fp32",
                            *d2v, "objective.ema_steps=-1", resume_at=4),  # the EMA ramp spans the run
        "d2v_z1_bf16": _run("data2vec_tiny_cpu.yaml", tmp_path / "d2v1", shard_set, "ds_configs/zero1.json", "bf16",
                            *d2v, resume_at=4),
        "d2v_z3_fp32": _run("data2vec_tiny_cpu.yaml", tmp_path / "d2v3", shard_set, z3, "fp32", *d2v, resume_at=4),
        # resumed through DeepSpeed's universal format: the teacher and its fp32 master come back too
        "d2v_z2_fp32_universal": _run("data2vec_tiny_cpu.yaml", tmp_path / "d2v2u", shard_set, z2, "fp32", *d2v,
                                      resume_at=4, resume_overrides=["checkpoint.load_universal=true"]),
        # the same under ZeRO-3, where each rank's master holds its own slices: resliced on load
        "d2v_z3_fp32_universal": _run("data2vec_tiny_cpu.yaml", tmp_path / "d2v3u", shard_set, str(ds3_cold),
                                      "fp32", *d2v, resume_at=4, resume_overrides=["checkpoint.load_universal=true"]),
        "d2v_z3_bf16_cold": _run("data2vec_tiny_cpu.yaml", tmp_path / "d2v3c", shard_set, str(ds3_cold), "bf16",
                                 *d2v, resume_at=4),
    }  # fmt: skip
    _launch(list(runs.values()), tmp_path)
    for name, run in runs.items():
        metrics = _check_run(run)
        if name.startswith("beit"):
            assert 0 <= metrics[STEPS]["masked_acc"] <= 1
            assert metrics[STEPS]["masked_acc"] > metrics[1]["masked_acc"]
        if name.startswith("d2v"):
            assert metrics[STEPS]["target_std"] > 0.3 and metrics[STEPS]["pred_std"] > 0
        if not name.startswith("d2v"):
            assert (Path(run["run_dir"]) / f"reconstructions/step_{STEPS:08d}.png").is_file()
    _check_teacher(Path(runs["d2v_z3_bf16_cold"]["run_dir"]))
    resolved = yaml.safe_load((Path(runs["d2v_z0_fp32"]["run_dir"]) / "config.yaml").read_text())
    assert resolved["objective"]["ema_steps"] == STEPS


def _check_teacher(run_dir: Path) -> None:
    """The consolidated ZeRO-3 checkpoint holds a teacher that is an average of past students: not the
    initial weights, not the final student."""
    from largemim.convert.consolidate import consolidate

    sd, _ = consolidate(run_dir)
    assert "ema_master" not in sd  # rank-local training state (under ZeRO-3, rank 0's slices only)
    for name in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight"):
        teacher, student = sd[f"teacher.{name}"], sd[f"encoder.{name}"]
        assert teacher.shape == student.shape and not sd[f"teacher.{name}"].equal(student)
        assert (teacher - student).abs().max() < 0.5
