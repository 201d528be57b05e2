"""Objective registry: each objective is one module; ``build_objective`` picks it by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from largemim.config import Config, ConfigError
from largemim.models.vit import ViTEncoder
from largemim.objectives.beit import build_beit
from largemim.objectives.data2vec import build_data2vec
from largemim.objectives.dvae import build_dvae
from largemim.objectives.mae import MAE, MAEDecoderSpec
from largemim.objectives.simmim import build_simmim


def _build_mae(cfg: Config, make_encoder: Callable[[], ViTEncoder], init: bool) -> nn.Module:
    m, o = cfg.model, cfg.objective
    spec = MAEDecoderSpec(dim=m.decoder_dim, depth=m.decoder_depth, heads=m.decoder_heads)
    return MAE(make_encoder(), spec, mask_ratio=o.mask_ratio, norm_pix_loss=o.norm_pix_loss, init=init)


# name -> builder(cfg, make_encoder, init): make_encoder() builds the configured ViT (an objective without
# one, the dVAE, does not call it); the built module's forward(images) returns a dict with "loss" and it
# has init_weights() (called by the builder when init=True).
OBJECTIVES: dict[str, Callable[[Config, Callable[[], ViTEncoder], bool], nn.Module]] = {
    "mae": _build_mae,
    "simmim": build_simmim,
    "beit": build_beit,  # stage 2; reads the tokenizer file that a "dvae" run exports
    "dvae": build_dvae,  # BEiT's stage 1: the tokenizer
    "data2vec": build_data2vec,
}


def build_encoder(cfg: Config) -> ViTEncoder:
    m = cfg.model
    return ViTEncoder(m.size, img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans)


def build_objective(cfg: Config, init: bool = True) -> nn.Module:
    name = cfg.objective.name
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name={name!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](cfg, lambda: build_encoder(cfg), init)
