"""data2vec (Baevski et al., "data2vec: A General Framework for Self-supervised Learning in Speech,
Vision and Language"), for images: regress a teacher's contextual features of the hidden patches.

The teacher is an exponential moving average of the student ViT (all of it: patch embedding, blocks,
norms), sees the whole image, and gives the targets: for each of its top ``target_layers`` blocks, the
output of the block's feed-forward network before the residual connection adds it (the paper's choice,
Section 3.3; fairseq's released vision config takes the block output after the residual instead),
normalised without parameters, then averaged over the blocks. The normalisation (``target_norm``) is by
default an instance norm of each channel over the patch tokens (class token excluded): data2vec 2.0's
choice for images and v1's for speech. v1's paper names a layer norm of each patch token over its
channels for vision (``target_norm=layer``); in the Fashion-MNIST learning run it collapsed (patch
features grew alike: target spread 0.23 -> 0.11 and kNN 0.58 -> 0.52, below the random encoder's 0.625,
by step 900), where the instance norm, which makes every channel vary across the patches, learned.
fairseq's released v1 vision config layer-norms the average instead. The student sees the image with
block-masked patches (60 %) replaced by a mask token and a linear head regresses the targets of the
hidden patches with smooth L1 (beta 2) or MSE, summed over the channels and scaled by 1/sqrt(D), then
averaged over the hidden patches: fairseq's scale, so that its gradient clip (3.0) means the same here
(a mean over the channels too would make the gradients sqrt(D) times smaller and the clip that much
looser).

The decay rises linearly from ``ema_start`` to ``ema_end`` over ``ema_steps`` optimizer steps; the
trainer calls ``after_step(step)`` on every rank after each optimizer step. The teacher's parameters are
frozen (``requires_grad=False``: not in the optimizer); its fp32 average lives in the ``ema_master``
buffer, so checkpoints hold it at every ZeRO stage (see ``ema.py``).

Memory: per encoder parameter the teacher adds its weight in the training dtype plus the fp32 master,
6 bytes in bf16 (8 in fp32), divided by the number of ranks under ZeRO-3: ViT-B (86 M parameters)
0.48 GiB, ViT-L (303 M) 1.69 GiB, ViT-H/14 (631 M) 3.5 GiB, ViT-g/14 (1.01 B) 5.7 GiB on each rank
under ZeRO 0-2. Its forward pass runs without autograd and folds each target block's output into one
fp32 running sum (batch x tokens x width), so its activations are about one block's. Compute: one more
full-image forward per step. Measured on one H200 (tools/gpu_check_objectives.py: bf16, 224 px, batch
64, ZeRO-2, against SimMIM of the same size, whose student also sees every patch): peak memory +0.49 GiB
for ViT-B and +1.72 GiB for ViT-L; step time +5 ms (67 -> 71 ms) and +81 ms (154 -> 235 ms).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from largemim.config import Config
from largemim.models.vit import ViTEncoder, init_mim_weights
from largemim.objectives.ema import check_twins, ema_update, load_master, local_numel
from largemim.objectives.mask_token import embed_with_mask_token
from largemim.objectives.masking import MaskGenerator


class Data2Vec(nn.Module):
    def __init__(
        self,
        encoder: ViTEncoder,
        masks: MaskGenerator,
        target_layers: int = 6,
        ema: tuple[float, float, int] = (0.999, 0.9999, 10000),
        loss: str = "smooth_l1",
        beta: float = 2.0,
        init: bool = True,
        target_norm: str = "instance",
    ):
        super().__init__()
        if not 1 <= target_layers <= len(encoder.blocks):
            raise ValueError(f"target_layers={target_layers} must be between 1 and the depth {len(encoder.blocks)}")
        self.encoder, self.masks = encoder, masks
        if target_norm not in ("layer", "instance"):
            raise ValueError(f"target_norm={target_norm!r} must be layer or instance")
        self.target_layers, self.loss_name, self.beta = target_layers, loss, beta
        self.target_norm = target_norm
        self.ema_start, self.ema_end, self.ema_steps = ema
        self.teacher = ViTEncoder(encoder.size, encoder.img_size, encoder.patch_size, encoder.in_chans)
        self.teacher.requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.width))
        self.head = nn.Linear(encoder.width, encoder.width)
        check_twins(self.encoder, self.teacher)
        # .float(): inside deepspeed.zero.Init every new floating tensor is created in the training dtype
        self.register_buffer("ema_master", torch.zeros(local_numel(list(self.teacher.parameters()))).float())
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        if init:  # False when parameters are created partitioned (ZeRO-3): the builder inits them gathered
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        init_mim_weights(self)
        for s, t in zip(self.encoder.parameters(), self.teacher.parameters(), strict=True):
            t.copy_(s)  # the teacher starts as the student
        self.ema_updates.zero_()  # the master is filled from the teacher at the first update

    @torch.no_grad()
    def after_init_from(self, loaded: set[str]) -> None:
        """After weights were loaded over the initialisation (``model.init_from``): a teacher the weights did
        not carry (an MAE, timm or HF encoder) starts as the loaded student, and the fp32 master is refilled
        from the teacher at the first update. Under ZeRO-3, call with the parameters gathered."""
        if not any(k.startswith("teacher.") for k in loaded):
            for s, t in zip(self.encoder.parameters(), self.teacher.parameters(), strict=True):
                t.copy_(s)
        self.ema_updates.zero_()

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token"}

    def ema_decay(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (1-based)."""
        if self.ema_steps <= 0 or step >= self.ema_steps:
            return self.ema_end
        return self.ema_start + (self.ema_end - self.ema_start) * step / self.ema_steps

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Move the teacher towards the student; on every rank (a collective under ZeRO-3)."""
        pairs = list(zip(self.encoder.parameters(), self.teacher.parameters(), strict=True))
        ema_update(self.ema_master, pairs, self.ema_decay(step), first=int(self.ema_updates) == 0)
        self.ema_updates += 1

    @torch.no_grad()
    def load_saved_state(self, saved: list[dict]) -> list[str]:
        """After a load that left the teacher out (DeepSpeed's universal format): the teacher and its fp32
        master from the module states that each rank of the run that saved them wrote, resliced for this
        run's ranks. Returns the names restored."""
        if int(saved[0]["ema_updates"]) == 0:
            return []  # saved before the first update: the teacher is still the initial student
        load_master(self.ema_master, [s["ema_master"] for s in saved], list(self.teacher.parameters()))
        self.ema_updates.copy_(saved[0]["ema_updates"])
        return ["teacher.*", "ema_master", "ema_updates"]

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(N, L, D) fp32: the top blocks' FFN outputs of the teacher, each normalised (``target_norm``),
        averaged."""
        total: list[torch.Tensor] = []  # one fp32 running sum, not K captured outputs

        def add(_module, _inputs, out: torch.Tensor) -> None:
            patches = out[:, 1:, :].float()
            if self.target_norm == "layer":
                normed = F.layer_norm(patches, patches.shape[-1:])
            else:
                normed = F.instance_norm(patches.transpose(1, 2)).transpose(1, 2)
            total[:] = [total[0] + normed] if total else [normed]

        hooks = [block.mlp.register_forward_hook(add) for block in self.teacher.blocks[-self.target_layers :]]
        try:
            self.teacher(images)  # a module call, so that ZeRO-3 gathers the teacher's own parameters
        finally:
            for h in hooks:
                h.remove()
        return total[0] / self.target_layers

    def regression(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed over the D channels / sqrt(D), averaged over the hidden patches (fairseq's scale)."""
        if self.loss_name == "mse":
            per_value = F.mse_loss(pred, target)
        else:
            per_value = F.smooth_l1_loss(pred, target, beta=self.beta)
        return per_value * math.sqrt(pred.shape[-1])

    def forward(
        self, images: torch.Tensor, noise: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``mask`` (N, L) bool fixes the hidden patches; without it they are drawn."""
        mask = self.masks.resolve(images.shape[0], images.device, noise, mask)
        dtype = self.head.weight.dtype  # bf16/fp16 under a mixed-precision engine
        x = images.to(dtype)
        targets = self.targets(x)
        tokens = embed_with_mask_token(self.encoder, x, mask, self.mask_token)
        h = self.encoder.forward_tokens(tokens)[:, 1:, :]
        index = self.masks.hidden_index(mask).unsqueeze(-1).expand(-1, -1, h.shape[-1])
        pred = self.head(torch.gather(h, 1, index)).float()
        target = torch.gather(targets, 1, index)
        with torch.no_grad():  # spread across hidden patches, per channel: a collapse shows as both falling
            target_std = target.flatten(0, 1).std(dim=0).mean()
            pred_std = pred.detach().flatten(0, 1).std(dim=0).mean()
        return {
            "loss": self.regression(pred, target),
            "target_std": target_std,
            "pred_std": pred_std,
            "mask": mask.float(),
        }


def build_data2vec(cfg: Config, make_encoder: Callable[[], ViTEncoder], init: bool) -> Data2Vec:
    o = cfg.objective
    return Data2Vec(
        make_encoder(), MaskGenerator.from_config(cfg), o.target_layers, (o.ema_start, o.ema_end, o.ema_steps),
        o.regression_loss, o.smooth_l1_beta, init=init, target_norm=o.target_norm,
    )  # fmt: skip
