"""Periodic looks at the model during training: representation check and reconstruction pictures.

Both run their forward passes on every rank (under ZeRO-3 a forward pass is collective); rank 0 alone
fits the read-outs and reports.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torchvision.utils import save_image

from largemim.compiled import eager_call
from largemim.config import Config
from largemim.data.augment import EvalTransform
from largemim.distributed import broadcast_from_rank0
from largemim.evaluation.represent import LabelledSet, check_encoder, load_labelled, pixel_baseline
from largemim.files import replacing, write_atomic
from largemim.visualize import reconstruction_grid

log = logging.getLogger(__name__)
BASELINES = "repr_baselines.json"
PICTURE_BATCH = "picture_batch.pt"  # the reconstruction pictures' images when there is no held-out set


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class Monitor:
    def __init__(self, cfg: Config, engine, run_dir: Path, device: torch.device, rank: int):
        self.cfg, self.engine, self.run_dir, self.device, self.rank = cfg, engine, Path(run_dir), device, rank
        e, m, d = cfg.eval, cfg.model, cfg.data
        transform = EvalTransform(m.img_size, d.mean, d.std)
        self.train_set: LabelledSet | None = None
        self.test_set: LabelledSet | None = None
        if e.train_shards and e.test_shards:
            shown = rank == 0  # every rank decodes the same images: one bar
            self.train_set = load_labelled(e.train_shards, e.train_samples, transform, progress=shown)
            self.test_set = load_labelled(e.test_shards, e.test_samples, transform, progress=shown)
        self.fixed_images = self.test_set.images[:8].float() if self.test_set is not None else None
        g = torch.Generator().manual_seed(cfg.run.seed + 12345)
        self.fixed_noise = torch.rand(8, (m.img_size // m.patch_size) ** 2, generator=g)

    @property
    def has_eval(self) -> bool:
        return self.train_set is not None

    def set_fixed_images(self, images: torch.Tensor) -> None:
        """Without a held-out set, the pictures show the first 8 images of the run's first batch: kept in the
        run folder (rank 0's), so a resumed run draws the same ones rather than its own first batch."""
        if self.fixed_images is not None:
            return
        path = self.run_dir / PICTURE_BATCH
        if path.is_file():
            try:
                kept = torch.load(path, map_location="cpu", weights_only=True)
                if kept.shape[1:] == images.shape[1:]:
                    self.fixed_images = kept.float()
                    return
                log.warning("%s holds images of another size: the pictures use this run's first batch", path)
            except Exception as e:  # noqa: BLE001 - a torn or foreign file costs the same pictures only
                log.warning("could not read %s (%s): the pictures use this run's first batch", path, e)
        self.fixed_images = images[:8].cpu()
        if self.rank == 0:
            with replacing(path) as tmp:
                torch.save(self.fixed_images.to(torch.float16), tmp)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        module = self.engine.module
        return module.encoder(images.to(self.device, param_dtype(module)))

    def representation(self) -> dict[str, float]:
        """kNN and linear-probe accuracy on rank 0; {} on the others."""
        module = self.engine.module
        module.eval()
        try:
            return check_encoder(self._encode, self.train_set, self.test_set, k=self.cfg.eval.knn_k, fit=self.rank == 0)
        finally:
            module.train()

    def baselines(self, fresh: bool) -> dict[str, dict[str, float]]:
        """Raw pixels and this run's random-init encoder (``fresh``: nothing trained or loaded yet),
        computed once and kept in the run folder with the eval settings they were computed with; on rank
        0 (others get {}). A run that starts from loaded weights, or turns the check on after step 0, has
        no random-init row: the encoder in hand is not random any more."""
        e = self.cfg.eval
        settings = {
            "train_shards": e.train_shards, "test_shards": e.test_shards, "train_samples": e.train_samples,
            "test_samples": e.test_samples, "knn_k": e.knn_k, "img_size": self.cfg.model.img_size,
        }  # fmt: skip
        path = self.run_dir / BASELINES
        kept: list = [None]  # rank 0 reads the file and decides for all: the forward below is collective
        if self.rank == 0 and path.exists():
            try:
                kept[0] = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                log.warning("%s is unreadable (%s): computing it again", path, e)
            if not isinstance(kept[0], dict):
                kept[0] = None
            elif kept[0].get("settings", settings) != settings:
                log.info("%s was computed with other eval settings: computing it again", path)
                kept[0] = None
        decision = [kept[0] is not None]
        broadcast_from_rank0(decision)
        if decision[0]:
            return kept[0] if self.rank == 0 else {}
        result: dict = {"settings": settings}
        if fresh:
            result["random_init"] = self.representation()
        else:
            log.info("no random-init baseline: the encoder was loaded (model.init_from) or has trained already")
        if self.rank != 0:
            return {}
        result["raw_pixels"] = pixel_baseline(self.train_set, self.test_set, k=e.knn_k)
        write_atomic(path, json.dumps(result, indent=1))
        return result

    @torch.no_grad()
    def reconstruction(self, step: int, run_log) -> Path | None:
        """Save a picture of the fixed batch. An objective draws its own with ``picture(images, noise,
        mean, std) -> (3, H, W)`` if it has one; MAE-style objectives (``pred`` per patch + ``mask``)
        get original | masked | reconstruction | reconstruction with visible patches pasted."""
        module = self.engine.module
        if self.fixed_images is None or not (hasattr(module, "picture") or hasattr(module, "patch_size")):
            return None
        d = self.cfg.data
        module.eval()
        try:
            images = self.fixed_images.to(self.device)
            noise = self.fixed_noise[: len(images)].to(self.device)
            if hasattr(module, "picture"):
                grid = module.picture(images, noise, d.mean, d.std)
            else:
                out = eager_call(module)(images, noise=noise)
                grid = reconstruction_grid(
                    images, out["pred"], out["mask"], module.patch_size, d.mean, d.std, self.cfg.objective.norm_pix_loss
                )
        finally:
            module.train()
        if self.rank != 0:
            return None
        path = self.run_dir / "reconstructions" / f"step_{step:08d}.png"
        path.parent.mkdir(exist_ok=True)
        save_image(grid, path)
        run_log.image("reconstruction", grid, step)
        return path
