"""BEiT (Bao et al., "BEiT: BERT Pre-Training of Image Transformers"), stage 2: masked token prediction.

A frozen dVAE tokenizer (stage 1, objective ``dvae``, written by ``tools/export_tokenizer.py``) maps
each image to one token id per patch. The ViT sees every patch, with block-wise masked ones (about 40 %)
replaced by a learnable mask token, and a linear head predicts the ids of the hidden patches under
cross-entropy.

The tokenizer is not part of the module's parameters or state: it is read from ``objective.tokenizer``
on first use, kept in fp32 outside DeepSpeed's reach (never trained, cast, partitioned or saved in
checkpoints), and fed the images in its own normalisation. Its file's SHA-256 prefix is a buffer, so a
resumed run refuses a tokenizer file that changed. The builder checks the file's grid, vocabulary,
image size and channels against the run's config before anything is trained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from largemim.compiled import eager_call
from largemim.config import Config, ConfigError
from largemim.models.vit import ViTEncoder, init_mim_weights
from largemim.objectives.dvae import DVAE, TokenizerMeta, file_id, load_tokenizer, read_tokenizer_meta
from largemim.objectives.mask_token import embed_with_mask_token
from largemim.objectives.masking import MaskGenerator
from largemim.objectives.pictures import rows, to_pixels

log = logging.getLogger(__name__)


class FrozenTokenizer:
    """A tokenizer file, loaded on first use on the images' device. Deliberately not an ``nn.Module``, so
    that the objective holding it does not register it (see the module docstring)."""

    def __init__(self, path: str, meta: TokenizerMeta, data_mean, data_std):
        self.path, self.meta = path, meta
        self.id = file_id(path)
        self.model: DVAE | None = None
        # images arrive normalised with the run's mean/std; the tokenizer wants its own
        self.data_mean, self.data_std = tuple(data_mean), tuple(data_std)

    def _load(self, device: torch.device) -> DVAE:
        if self.model is None or self.model.codebook.weight.device != device:
            self.model, _ = load_tokenizer(self.path, device)
        return self.model

    def _to_own_normalisation(self, images: torch.Tensor) -> torch.Tensor:
        def col(v):
            return torch.tensor(v, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)

        pixels = images.float() * col(self.data_std) + col(self.data_mean)
        return (pixels - col(self.meta.mean)) / col(self.meta.std)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids, in fp32 whatever the training precision: also under ``train.autocast``, whose
        bf16 convolutions would change about a tenth of the ids (the targets) against the tokenizer's own."""
        with torch.autocast(images.device.type, enabled=False):
            return self._load(images.device).tokens(self._to_own_normalisation(images))

    @torch.no_grad()
    def decode_pixels(self, ids: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (N, C, H, W) on the CPU decoded from token ids."""
        with torch.autocast(ids.device.type, enabled=False):
            decoded = self._load(ids.device).decode(ids)
        return to_pixels(decoded, self.meta.mean, self.meta.std)


def check_tokenizer(meta: TokenizerMeta, cfg: Config, path: str) -> None:
    """The tokenizer must cut the image into the ViT's patch grid and have the configured vocabulary."""
    m, o = cfg.model, cfg.objective
    grid = m.img_size // m.patch_size
    wrong = []
    if meta.image_size != m.img_size:
        wrong.append(f"image size {meta.image_size} (model.img_size is {m.img_size})")
    if meta.grid_size != grid:
        wrong.append(f"a {meta.grid_size}x{meta.grid_size} token grid (the ViT's patch grid is {grid}x{grid})")
    if meta.vocab_size != o.vocab_size:
        wrong.append(f"{meta.vocab_size} codes (objective.vocab_size is {o.vocab_size}; set it to {meta.vocab_size})")
    if meta.in_chans != m.in_chans:
        wrong.append(f"{meta.in_chans} input channels (model.in_chans is {m.in_chans})")
    if wrong:
        raise ConfigError(
            f"tokenizer {path} does not fit this run: it has {'; '.join(wrong)}. Train a dVAE with this run's "
            "model.img_size and model.patch_size (objective.name=dvae) and export it with tools/export_tokenizer.py"
        )


class BEiT(nn.Module):
    def __init__(self, encoder: ViTEncoder, masks: MaskGenerator, tokenizer: FrozenTokenizer, init: bool = True):
        super().__init__()
        self.encoder, self.masks, self.tokenizer = encoder, masks, tokenizer
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.width))
        self.lm_head = nn.Linear(encoder.width, tokenizer.meta.vocab_size)
        self.register_buffer("tokenizer_id", torch.tensor(tokenizer.id, dtype=torch.long))
        self._checked_id = False  # compared with the file once, after any checkpoint load
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_checked_id", False))
        if init:  # False when parameters are created partitioned (ZeRO-3): the builder inits them gathered
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        init_mim_weights(self)
        self.tokenizer_id.fill_(self.tokenizer.id)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token"}

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        if not self._checked_id:  # a loaded checkpoint holds the id of the file it was trained with
            if self.tokenizer_id.item() != self.tokenizer.id:
                raise RuntimeError(
                    f"the tokenizer file {self.tokenizer.path} differs from the one this run was trained with "
                    "(its SHA-256 changed); point objective.tokenizer at the original file"
                )
            self._checked_id = True
        return self.tokenizer.tokens(images)

    def forward(
        self, images: torch.Tensor, noise: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``mask`` (N, L) bool fixes the hidden patches; without it they are drawn."""
        mask = self.masks.resolve(images.shape[0], images.device, noise, mask)
        ids = self.targets(images)
        dtype = self.lm_head.weight.dtype  # bf16/fp16 under a mixed-precision engine
        tokens = embed_with_mask_token(self.encoder, images.to(dtype), mask, self.mask_token)
        x = self.encoder.forward_tokens(tokens)[:, 1:, :]
        index = self.masks.hidden_index(mask)  # (N, K)
        hidden = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        logits = self.lm_head(hidden).float()  # (N, K, V)
        target = torch.gather(ids, 1, index)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        predicted = logits.detach().argmax(dim=-1)
        return {
            "loss": loss,
            "masked_acc": (predicted == target).float().mean(),
            "mask": mask.float(),
            "predicted": predicted,  # (N, K) ids at the positions of hidden_index(mask)
            "ids": ids,
        }

    @torch.no_grad()
    def picture(self, images: torch.Tensor, noise, mean, std) -> torch.Tensor:
        """original | masked | the tokenizer's decoding of the true ids | of the ids with the hidden ones
        predicted by the ViT; masks from a fixed seed."""
        mask = self.masks(images.shape[0], torch.Generator().manual_seed(0)).to(images.device)
        out = eager_call(self)(images, mask=mask)  # not compiled again (train.compile)
        filled = out["ids"].scatter(1, self.masks.hidden_index(mask), out["predicted"])
        g, p = self.masks.grid, self.encoder.patch_size
        hide = mask.view(-1, 1, g, g).float().repeat_interleave(p, 2).repeat_interleave(p, 3).cpu()
        original = to_pixels(images, mean, std)
        masked = original * (1 - hide) + 0.5 * hide
        return rows(original, masked, self.tokenizer.decode_pixels(out["ids"]), self.tokenizer.decode_pixels(filled))


def build_beit(cfg: Config, make_encoder: Callable[[], ViTEncoder], init: bool) -> BEiT:
    """Reads only the tokenizer's metadata here (the weights on first use), so that no module is built
    inside ZeRO-3's partitioning context besides the objective itself."""
    path = cfg.objective.tokenizer
    if not path:
        raise ConfigError("objective.tokenizer must name a tokenizer file (tools/export_tokenizer.py writes one)")
    meta = read_tokenizer_meta(path)
    check_tokenizer(meta, cfg, path)
    if (tuple(meta.mean), tuple(meta.std)) != (tuple(cfg.data.mean), tuple(cfg.data.std)):
        log.info("tokenizer %s was trained on mean %s std %s; converting this run's images", path, meta.mean, meta.std)
    tokenizer = FrozenTokenizer(path, meta, cfg.data.mean, cfg.data.std)
    return BEiT(make_encoder(), MaskGenerator.from_config(cfg), tokenizer, init=init)
