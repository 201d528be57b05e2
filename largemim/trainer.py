"""The training loop: build the parts, resume, step, log, save, stop on request."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from largemim.checkpoint import Checkpointer, complete_checkpoints
from largemim.config import Config, ConfigError, make_plan, save_resolved
from largemim.data.augment import Normalise, TrainAugment
from largemim.data.device_decode import DeviceDecodeAugment, EncodedImages
from largemim.data.fast_decode import FastTrainAugment
from largemim.data.sources import expand_shards, split_sets
from largemim.data.stream import StreamSpec, build_train_loader, check_exact_split
from largemim.distributed import DistEnv
from largemim.engine import build_engine, build_model, load_ds_json, reapply_optim_config, zero_stage
from largemim.flops import peak_tflops, train_flops_per_image
from largemim.health import TrainingDiverged, nonfinite_parameters
from largemim.memory import choose_grad_ckpt
from largemim.monitor import Monitor
from largemim.run_counts import CountsUnavailable, run_shard_counts
from largemim.run_log import RunLog
from largemim.signals import StopOnSignal

log = logging.getLogger("largemim")


def _shard_names_digest(urls: list[str]) -> str:
    """Which shards, in order, by name (a data set moved to another folder streams the same)."""
    names = "\n".join(u.rstrip("/ -").rsplit("/", 1)[-1] for u in urls)
    return hashlib.sha1(names.encode()).hexdigest()[:12]


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The torch RNG seed for one micro-step (the MAE mask noise): a function of the position alone,
    so a resumed run draws the same masks as an uninterrupted one, whatever the world size was."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def _mean_across_ranks(values: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Mean over ``count`` micro-steps and all ranks, in one all-reduce."""
    names = sorted(values)
    stacked = torch.stack([values[k].float() for k in names]) / count
    if dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist(), strict=True))


def _sums_across_ranks(values: list[float], device: torch.device) -> list[int]:
    """Per-rank counts summed over all ranks (every rank calls this; on the device NCCL needs)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _sum_across_ranks(value: int, device: torch.device) -> int:
    return _sums_across_ranks([value], device)[0]


def _gathered_shortfalls(mine: list[tuple], world_size: int) -> dict:
    """Every rank's shard reads that came up short (a collective), for the checkpoint."""
    everyone = [mine]
    if world_size > 1:
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
    by_rank = {str(rank): [list(f) for f in falls] for rank, falls in enumerate(everyone) if falls}
    return {"world_size": world_size, "by_rank": by_rank}


def _saved_shortfalls(client: dict | None, env: DistEnv, changed: dict) -> list[tuple]:
    saved = (client or {}).get("data", {}).get("shortfalls") or {}
    if saved.get("world_size") != env.world_size or changed:  # another deal: they say nothing of its reads
        return []
    return [tuple(f) for f in saved.get("by_rank", {}).get(str(env.rank), [])]


def divergence_advice(cfg: Config) -> str:
    """What to change after a divergence, for this config: the learning rate that is in force (optim.lr
    when set: base_lr is then unused), and only the other remedies not already in place."""
    o, t = cfg.optim, cfg.train
    fixes = [f"lower optim.lr (now {o.lr:g})" if o.lr else f"lower optim.base_lr (now {o.base_lr:g})"]
    if not o.grad_clip:
        fixes.append("set optim.grad_clip (e.g. 1.0)")
    if t.precision == "fp16":
        fixes.append("use train.precision=bf16")
    if not t.check_grad_overflow:
        fixes.append("set train.check_grad_overflow=true (DeepSpeed then skips a step whose gradients hold inf/NaN)")
    return "; ".join(fixes)


GENERIC_ADVICE = "lower the learning rate"  # where the config is not at hand (divergence_advice is)


def _diverged(what: str, ckpt_dir: Path, advice: str = GENERIC_ADVICE) -> TrainingDiverged:
    """The run stops: ``what`` went inf/NaN. Says which checkpoint a resume starts from and what to change."""
    good = complete_checkpoints(ckpt_dir)
    kept = f"a resume starts from {good[-1][1]}" if good else "there is no checkpoint to resume from"
    return TrainingDiverged(f"{what}; nothing was saved after it and {kept}. To go on: {advice}")


def check_fit_to_save(
    module: torch.nn.Module,
    loss_sum: torch.Tensor | None,
    first: int,
    step: int,
    skipped: int,
    ckpt_dir: Path,
    device: torch.device,
    advice: str = GENERIC_ADVICE,
) -> int:
    """Raise TrainingDiverged (on every rank) if the loss summed over steps ``first``..``step`` or any weight
    is inf/NaN: a checkpoint of a diverged run would be the one every resume starts from. The loss is
    checked at log steps; this covers the steps since then, and the weights themselves. Returns
    ``skipped`` (this rank's skipped samples) summed over ranks, in the same collective."""
    bad = nonfinite_parameters(module)
    bad_loss = loss_sum is not None and not bool(torch.isfinite(loss_sum))
    n_bad, n_bad_loss, total = _sums_across_ranks([len(bad), bad_loss, skipped], device)
    if n_bad_loss:
        raise _diverged(f"the loss is inf/NaN in steps {first}-{step}", ckpt_dir, advice)
    if n_bad:  # which tensors, over all ranks (replicated under ZeRO-0/1/2, partitioned under ZeRO-3)
        names: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(names, bad)
        found = sorted({n for rank_names in names for n in rank_names})
        listed = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        what = f"the weights hold inf/NaN after step {step} ({len(found)} tensor(s): {listed})"
        raise _diverged(what, ckpt_dir, advice)
    return total


def _throughput_model(cfg: Config, device: torch.device) -> tuple[int | None, float | None]:
    """(training FLOPs per image, device peak TFLOP/s) for the TFLOP/s and MFU figures, where known."""
    try:
        flops = train_flops_per_image(cfg)
    except (ConfigError, KeyError, NotImplementedError):
        flops = None  # an objective without a FLOP formula: no MFU figure
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return flops, peak_tflops(name, cfg.train.precision, cfg.log.peak_tflops or None)


def _keep_configured_clip(engine, cfg: Config) -> None:
    """DeepSpeed's ZeRO-1/2 optimizer takes the clip value saved in the checkpoint back on load (at the same
    world size, not through the universal format); the run's configured optim.grad_clip wins."""
    saved = getattr(engine.optimizer, "clip_grad", None)
    if saved is not None and float(saved) != float(cfg.optim.grad_clip):
        log.info("optim.grad_clip=%g replaces the clip of %g saved in the checkpoint", cfg.optim.grad_clip, saved)
        engine.optimizer.clip_grad = float(cfg.optim.grad_clip)


def _choose_grad_ckpt(cfg: Config, ds_json: dict, env: DistEnv) -> None:
    """model.grad_ckpt_auto: rank 0 predicts (largemim/memory.py) and every rank takes its choice."""
    budget = cfg.model.grad_ckpt_budget_gib
    if not budget and env.device.type == "cuda":
        budget = torch.cuda.get_device_properties(env.device).total_memory / 2**30 - 1.0
    if not budget:
        log.warning("model.grad_ckpt_auto: no GPU memory to fit on %s; checkpointing stays off", env.device)
        return
    choice = torch.zeros(2, dtype=torch.float64, device=env.device)
    failure: Exception | None = None
    if env.rank == 0:
        try:
            every, need = choose_grad_ckpt(cfg, ds_json, env.world_size, budget)
            choice[:] = torch.tensor([every, need], dtype=torch.float64)
        except Exception as e:  # noqa: BLE001 - the other ranks must hear of any failure, not wait for it
            choice[0], failure = -1, e
    if dist.get_world_size() > 1:
        dist.broadcast(choice, 0)
    if failure is not None:
        raise failure
    if choice[0] < 0:
        raise ConfigError("model.grad_ckpt_auto failed on rank 0 (its error is in the log)")
    cfg.model.grad_ckpt_every = int(choice[0])
    log.info(
        "model.grad_ckpt_auto: grad_ckpt_every=%d (%s); predicted peak with margin %.1f GiB of %.1f GiB",
        cfg.model.grad_ckpt_every, "off" if not cfg.model.grad_ckpt_every else "every k-th encoder block",
        float(choice[1]), budget,
    )  # fmt: skip


def train(cfg: Config, env: DistEnv) -> dict:
    """Run (or resume) the configured training to its end or to a stop request. Returns a summary."""
    sets = [expand_shards(pattern) for pattern in split_sets(cfg.data.shards)]
    urls = [u for s in sets for u in s]
    try:
        expected = run_shard_counts(urls, not cfg.data.num_samples, env.rank, Path(cfg.run.dir))
    except CountsUnavailable as e:
        raise ConfigError(str(e)) from None
    num_samples = cfg.data.num_samples or sum(expected[u] for u in urls)
    plan = make_plan(cfg, env.world_size, num_samples)
    lanes = cfg.data.lanes or max(1, cfg.data.workers)  # sample streams per rank (see data/stream.py)
    counted = all(u in expected for u in urls)  # every shard's sample count known (the manifests)
    if cfg.data.sampling == "exact" and not counted:  # whole shards are dealt
        try:
            check_exact_split(len(urls), env.world_size, lanes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.objective.name == "data2vec" and cfg.objective.ema_steps == -1:
        cfg.objective.ema_steps = plan.total_steps  # the EMA ramp spans the run, whatever its batch and length
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
    ckpt = Checkpointer(run_dir, cfg.checkpoint.keep_last, env.rank)
    universal = None
    ckpt.agree_on_latest()  # every rank resumes from rank 0's pick
    to_convert = ckpt.needs_universal(env.world_size, zero_stage(ds_json), force=cfg.checkpoint.load_universal)
    if to_convert is not None:  # another world size or ZeRO-3 <-> 1/2: load through DeepSpeed's universal format
        universal = ckpt.convert_to_universal(to_convert)
        ds_json = {**ds_json, "checkpoint": {**ds_json.get("checkpoint", {}), "load_universal": True}}
    torch.manual_seed(cfg.run.seed)
    init_from = cfg.model.init_from
    if init_from and ckpt.latest() is not None:
        log.info("model.init_from=%s ignored: resuming from the run folder's checkpoint", init_from)
        init_from = ""
    if cfg.model.grad_ckpt_auto:
        _choose_grad_ckpt(cfg, ds_json, env)
    model = build_model(cfg, ds_json, init_from)
    engine = build_engine(model, cfg, plan, ds_json)

    data_state = {
        "micro_batches_per_epoch": plan.micro_batches_per_epoch,
        "lanes": lanes,
        "seed": cfg.run.seed,
        "shards": len(urls),
        "shard_list": _shard_names_digest(urls),
        "sampling": cfg.data.sampling,
        "micro_batch": cfg.train.micro_batch,
        "shuffle_buffer": cfg.data.shuffle_buffer,
        # the mixing weights in force: the default follows sample counts where all are known (data/stream.py)
        "weights": list(cfg.data.weights) or ("samples" if counted else "shards"),
        "counted": counted,  # exact deals and the default weights follow the sample counts where all are known
        "counts": hashlib.sha1(repr([expected.get(u) for u in urls]).encode()).hexdigest()[:12],  # which counts
    }
    client = ckpt.load_latest(engine, universal)
    start, changed = 0, {}
    if client is not None:
        _keep_configured_clip(engine, cfg)
        reapply_optim_config(engine, cfg, plan)
        start = int(client["step"])
        saved = client.get("data", {})
        # keys a checkpoint of an older largemim lacks are not compared (they would all look changed)
        changed = {k: (saved[k], v) for k, v in data_state.items() if k in saved and saved[k] != v}
        if changed:
            why = ""
            if "counted" in changed:
                why = " (the shards' sample counts were " + ("read)" if counted else "not all read: see rank 0's log)")
            log.warning("data settings changed since the checkpoint %s%s: the batch stream will differ", changed, why)
    ga = plan.grad_accum
    advice = divergence_advice(cfg)
    # undecodable samples skipped by all ranks before this start (saved with each checkpoint)
    skipped_before = int(client.get("data", {}).get("skipped_samples", 0)) if client is not None else 0
    # this rank's shard reads that came up short before the resume point (data/stream.py Shortfall): its
    # lanes are rebuilt with them, as they were read; kept only for the same ranks and data settings
    shortfalls = _saved_shortfalls(client, env, changed)

    monitor = Monitor(cfg, engine, run_dir, env.device, env.rank)
    flops_per_image, peak = _throughput_model(cfg, env.device)
    run_log = RunLog(
        run_dir, env.rank, plan.total_steps, cfg.log.tensorboard, start, flops_per_image, peak, env.world_size
    )
    summary: dict = {"start_step": start, "total_steps": plan.total_steps}
    if monitor.has_eval:
        summary["baselines"] = monitor.baselines(fresh=start == 0 and not init_from)

    d = cfg.data
    augment_cls = {"fast": FastTrainAugment, "reference": TrainAugment, "device": DeviceDecodeAugment}[d.decode]
    augment = augment_cls(cfg.model.img_size, d.crop_scale, d.hflip)
    normalise = Normalise(d.mean, d.std)  # on the device: workers hand over uint8 pixels
    if d.decode == "device" and env.device.type != "cuda":
        log.warning("data.decode=device on %s decodes in the training process; data.decode=fast is faster", env.device)
    spec = StreamSpec(
        tuple(tuple(s) for s in sets), cfg.train.micro_batch, plan.micro_batches_per_epoch, env.rank,
        env.world_size, cfg.run.seed, d.shuffle_buffer, d.sampling, tuple(d.weights), d.open_retries, d.lanes,
        expected, {tuple(f[:4]): f[4] for f in shortfalls},
    )  # fmt: skip
    loader = iter(build_train_loader(spec, augment, cfg.data.workers, start * ga, env.device.type == "cuda"))
    stopper = StopOnSignal(list(cfg.checkpoint.stop_signals), env.device)

    def save(step: int) -> None:
        first = step - window + 1  # the steps summed since the last log line
        loss_sum = sums.get("loss")
        total = skipped_before + check_fit_to_save(
            engine.module, loss_sum, first, step, skipped, ckpt.dir, env.device, advice
        )
        shortfalls[:] = [f for f in shortfalls if f[0] >= step * ga // plan.micro_batches_per_epoch]  # still ahead
        data = {**data_state, "position": step * ga, "skipped_samples": total,
                "shortfalls": _gathered_shortfalls(shortfalls, env.world_size)}  # fmt: skip
        state = {"step": step, "data": data, "config": asdict(cfg)}
        ckpt.save(engine, step, state)

    step, last_saved = start, start

    def stop_here() -> dict:
        """Every rank agreed to stop at ``step``: save it unless just saved, and end the run."""
        log.warning("stopping at step %d on %s", step, stopper.received or "another rank's signal")
        if last_saved != step:
            save(step)
        done = step == plan.total_steps  # nothing left to train: a requeue would only redo what is skipped here
        if done:
            log.warning("that was the last step: the run is complete without its final pictures and evaluation")
        summary.update(stopped_early=not done, end_step=step)
        run_log.close()
        return summary

    sums: dict[str, torch.Tensor] = {}  # loss and any other scalar the objective returns, summed per window
    window = 0  # optimizer steps in sums
    skipped = 0
    last_pixels = None  # data.decode=device: stands in for a micro-batch none of whose files decode
    run_log.restart_clock(start)
    engine.train()
    while step < plan.total_steps:
        for micro in range(ga):
            batch = next(loader)
            if batch.index != step * ga + micro:
                raise RuntimeError(
                    f"data stream out of order: got micro-batch {batch.index}, expected {step * ga + micro}"
                )
            skipped += batch.skipped
            shortfalls.extend(batch.shortfalls)
            if isinstance(batch.images, EncodedImages):  # data.decode=device
                pixels, failed = batch.images.decode(env.device, fallback=last_pixels)
                skipped += failed
                last_pixels = pixels
            else:
                pixels = batch.images.to(env.device, non_blocking=True)
            images = normalise(pixels)
            if step == start and micro == 0:
                monitor.set_fixed_images(images)
            torch.manual_seed(step_seed(cfg.run.seed, step, micro, env.rank))
            out = engine(images)
            engine.backward(out["loss"])
            engine.step()
            for key, value in out.items():
                if torch.is_tensor(value) and value.ndim == 0:
                    sums[key] = sums.get(key, 0) + value.detach().float()
        step += 1
        window += 1
        # e.g. data2vec's EMA teacher update, on every rank; not after a step skipped on inf/NaN gradients
        if hasattr(engine.module, "after_step") and engine.was_step_applied():
            engine.module.after_step(step)
        if step % cfg.log.every_steps == 0 or step == plan.total_steps:
            # steps actually summed: a resumed run's first window, and the last one, can be partial
            means = _mean_across_ranks(sums, window * ga)
            sums.clear()
            window = 0
            loss = means.pop("loss")
            if not np.isfinite(loss):
                raise _diverged(f"the loss is {loss} at step {step}", ckpt.dir, advice)
            scalars = {"loss": loss, "lr": engine.get_lr()[0], **means}
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                scalars["grad_norm"] = float(grad_norm)
            total_skipped = skipped_before + _sum_across_ranks(skipped, env.device)  # all ranks, whole run
            if total_skipped:
                scalars["skipped_samples"] = float(total_skipped)
            run_log.step(step, scalars, plan.global_batch)
        # Before pictures, the representation check and the periodic save: the grace time before the
        # scheduler kills the job goes to the one save that matters. poll reads the previous step's
        # agreement, so a signal stops the run one step after it came (see signals.py).
        if stopper.poll():
            return stop_here()
        if cfg.log.image_every_steps and step % cfg.log.image_every_steps == 0 and step < plan.total_steps:
            monitor.reconstruction(step, run_log)
        if monitor.has_eval and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < plan.total_steps:
            result = monitor.representation()
            if result:  # rank 0
                run_log.scalars("repr", result, step)
                knn, linear = result["knn"], result["linear"]
                log.info("representation check at step %d: kNN %.4f, linear probe %.4f", step, knn, linear)
        if step % cfg.checkpoint.every_steps == 0 and step < plan.total_steps:
            save(step)
            last_saved = step
            # A signal that came during this (long) save: stop now, with nothing more to write, rather
            # than train a step and save it all again in the grace time. Only after a save: each check
            # is a collective and a host sync.
            if stopper.agreed():
                return stop_here()
    if stopper.agreed():  # a signal in the last step(s), which poll has not reported yet
        return stop_here()
    if last_saved != step:
        save(step)
    monitor.reconstruction(step, run_log)
    if monitor.has_eval:
        result = monitor.representation()
        if result:  # rank 0
            run_log.scalars("repr", result, step)
            summary["final"] = result
    run_log.close()
    summary.update(stopped_early=False, end_step=step)
    return summary
