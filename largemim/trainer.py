"""The training loop: build the parts, resume, step, log, save, stop on request."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from largemim.checkpoint import Checkpointer
from largemim.config import Config, make_plan, save_resolved
from largemim.data.augment import TrainAugment
from largemim.data.sources import count_samples, expand_shards
from largemim.data.stream import StreamSpec, build_train_loader
from largemim.distributed import DistEnv
from largemim.engine import build_engine, build_model, load_ds_json
from largemim.monitor import Monitor
from largemim.run_log import RunLog
from largemim.signals import StopOnSignal

log = logging.getLogger("largemim")


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The torch RNG seed for one micro-step (the MAE mask noise): a function of the position alone,
    so a resumed run draws the same masks as an uninterrupted one, whatever the world size was."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def _mean_across_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    if dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def train(cfg: Config, env: DistEnv) -> dict:
    """Run (or resume) the configured training to its end or to a stop request. Returns a summary."""
    urls = expand_shards(cfg.data.shards)
    num_samples = cfg.data.num_samples or count_samples(urls)
    plan = make_plan(cfg, env.world_size, num_samples)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if env.rank == 0:
        save_resolved(cfg, run_dir)
        log.info(
            "plan: %d steps of global batch %d (%.1f steps per epoch of %d samples), lr %.3e, warm-up %d, world %d",
            plan.total_steps, plan.global_batch, plan.steps_per_epoch, num_samples, plan.lr, plan.warmup_steps,
            plan.world_size,
        )  # fmt: skip
    ds_json = load_ds_json(cfg.ds_config)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, ds_json)
    engine = build_engine(model, cfg, plan, ds_json)

    ckpt = Checkpointer(run_dir, cfg.checkpoint.keep_last, env.rank)
    data_state = {
        "micro_batches_per_epoch": plan.micro_batches_per_epoch,
        "workers": cfg.data.workers,
        "seed": cfg.run.seed,
        "shards": len(urls),
    }
    client = ckpt.load_latest(engine)
    start = 0
    if client is not None:
        start = int(client["step"])
        saved = client.get("data", {})
        changed = {k: (saved.get(k), v) for k, v in data_state.items() if k != "position" and saved.get(k) != v}
        if changed:
            log.warning("data settings changed since the checkpoint %s: the batch stream will differ", changed)
    ga = plan.grad_accum

    monitor = Monitor(cfg, engine, run_dir, env.device, env.rank)
    run_log = RunLog(run_dir, env.rank, plan.total_steps, cfg.log.tensorboard, start)
    summary: dict = {"start_step": start, "total_steps": plan.total_steps}
    if monitor.has_eval:
        summary["baselines"] = monitor.baselines()

    augment = TrainAugment(cfg.model.img_size, cfg.data.crop_scale, cfg.data.mean, cfg.data.std, cfg.data.hflip)
    spec = StreamSpec(
        tuple(urls), cfg.train.micro_batch, plan.micro_batches_per_epoch, env.rank, env.world_size,
        cfg.run.seed, cfg.data.shuffle_buffer,
    )  # fmt: skip
    loader = iter(build_train_loader(spec, augment, cfg.data.workers, start * ga, env.device.type == "cuda"))
    stopper = StopOnSignal(list(cfg.checkpoint.stop_signals), env.device)

    def save(step: int) -> None:
        state = {"step": step, "data": {**data_state, "position": step * ga}, "config": asdict(cfg)}
        ckpt.save(engine, step, state)

    step, last_saved = start, start
    loss_sum = torch.zeros((), device=env.device)
    skipped = 0
    run_log.restart_clock(start)
    engine.train()
    while step < plan.total_steps:
        for micro in range(ga):
            batch = next(loader)
            if batch.index != step * ga + micro:
                raise RuntimeError(
                    f"data stream out of order: got micro-batch {batch.index}, expected {step * ga + micro}"
                )
            if step == start and micro == 0:
                monitor.set_fixed_images(batch.images)
            skipped += batch.skipped
            images = batch.images.to(env.device, non_blocking=True)
            torch.manual_seed(step_seed(cfg.run.seed, step, micro, env.rank))
            out = engine(images)
            engine.backward(out["loss"])
            engine.step()
            loss_sum += out["loss"].detach().float()
        step += 1
        if step % cfg.log.every_steps == 0 or step == plan.total_steps:
            n = cfg.log.every_steps if step % cfg.log.every_steps == 0 else step % cfg.log.every_steps
            loss = _mean_across_ranks(loss_sum / (n * ga))
            loss_sum.zero_()
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {step}; lower optim.base_lr, set optim.grad_clip, or use "
                    "train.precision=bf16 (resume restarts from the last checkpoint)"
                )
            scalars = {"loss": loss, "lr": engine.get_lr()[0]}
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                scalars["grad_norm"] = float(grad_norm)
            if skipped:
                scalars["skipped_samples"] = float(skipped)
            run_log.step(step, scalars, plan.global_batch)
        if cfg.log.image_every_steps and step % cfg.log.image_every_steps == 0:
            monitor.reconstruction(step, run_log)
        if monitor.has_eval and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < plan.total_steps:
            result = monitor.representation()
            run_log.scalars("repr", result, step)
            log.info(
                "representation check at step %d: kNN %.4f, linear probe %.4f", step, result["knn"], result["linear"]
            )
        if step % cfg.checkpoint.every_steps == 0 and step < plan.total_steps:
            save(step)
            last_saved = step
        if stopper.agreed():
            log.warning("stopping at step %d on %s: saving", step, stopper.received or "another rank's signal")
            if last_saved != step:
                save(step)
            summary.update(stopped_early=True, end_step=step)
            run_log.close()
            return summary
    if last_saved != step:
        save(step)
    monitor.reconstruction(step, run_log)
    if monitor.has_eval:
        result = monitor.representation()
        run_log.scalars("repr", result, step)
        summary["final"] = result
    run_log.close()
    summary.update(stopped_early=False, end_step=step)
    return summary
