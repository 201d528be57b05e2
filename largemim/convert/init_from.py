"""Initialise a largemim model from weights in any format the converters read.

``load_init_weights(path)`` recognises the format by looking at the file, and returns a largemim MIM
state dict (whole MAE, or encoder only):

- a largemim run folder or checkpoint folder (any ZeRO stage; consolidated on the fly),
- a file ``consolidate`` or the import commands wrote (``encoder.*`` keys),
- a reference-MAE checkpoint (``{'model': ...}`` with ``decoder_*`` keys),
- a timm ViT state dict, or a released ``mae_pretrain_*.pth`` (encoder only, timm names),
- a timm ``local-dir`` folder, or a Hugging Face ``ViTMAEForPreTraining`` folder.

``apply_init_weights(model, weights)`` loads it into a freshly built model, refusing unknown names and
shape mismatches, and returns the names it left at their initial values (the decoder, when the
weights are an encoder only).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from largemim.convert.arch import MIMArch
from largemim.objectives.ema import is_run_state

log = logging.getLogger(__name__)


@dataclass
class InitWeights:
    state_dict: dict[str, torch.Tensor]  # largemim MIM names
    arch: MIMArch | None
    source_format: str


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_init_weights(
    path: str | Path,
    img_size: int | None = None,
    trust_pickle: bool = False,
    heads: int | None = None,
    decoder_heads: int | None = None,
) -> InitWeights:
    """Read weights of any supported format as a largemim MIM state dict (see the module docstring).

    ``img_size`` resamples the position embedding of encoder-only timm weights to that resolution;
    ``heads``/``decoder_heads`` are needed only where the weights cannot tell them (a foreign
    checkpoint whose width is in several rows of the size table, a decoder narrower than MAE's 512).
    """
    from largemim.convert import hf_vitmae, official_mae, timm_format
    from largemim.convert.consolidate import consolidate
    from largemim.convert.weights_io import load_weights

    path = Path(path)
    if path.is_dir():
        cfg = _json(path / "config.json")
        if cfg.get("model_type") == "vit_mae":
            sd, arch = hf_vitmae.import_hf(path, trust_pickle)
            return InitWeights(sd, arch, "huggingface-vitmae")
        if cfg.get("model_type") == "vit":  # transformers ViTModel / ViTForImageClassification
            sd, arch = hf_vitmae.import_hf(path, trust_pickle)
            return InitWeights(sd, arch, "huggingface-vit (encoder only)")
        if "architecture" in cfg and (path / "model.safetensors").is_file():  # timm local-dir export
            sd, _ = load_weights(path / "model.safetensors")
            heads = heads or cfg.get("model_args", {}).get("num_heads")  # the size table's guess otherwise
            sd, arch = timm_format.from_timm(sd, img_size=img_size, heads=heads)
            return InitWeights(sd, arch, "timm")
        sd, arch = consolidate(path, trust_pickle)
        return InitWeights(sd, arch, "largemim-checkpoint")
    sd, arch = load_weights(path, trust_pickle)
    if any(k.startswith("encoder.") for k in sd):
        return InitWeights(sd, arch, "largemim")
    if any(k.startswith("vit.embeddings.") for k in sd):
        return InitWeights(hf_vitmae.from_hf(sd), arch, "huggingface-vitmae")
    if any(official_mae._is_decoder(k) for k in sd):
        sd, arch = official_mae.from_official(sd, heads=heads, decoder_heads=decoder_heads)
        return InitWeights(sd, arch, "reference-mae")
    if "patch_embed.proj.weight" in sd:  # timm ViT and the reference MAE's encoder-only release alike
        sd, arch = timm_format.from_timm(sd, img_size=img_size, heads=heads)
        return InitWeights(sd, arch, "timm-vit (encoder only)")
    raise ValueError(f"{path}: not a format largemim reads (first keys: {list(sd)[:6]})")


def _check_heads(model: nn.Module, weights: InitWeights) -> None:
    """Heads are the one architecture choice shapes cannot reveal: compare with the weights' own record."""
    arch = weights.arch
    if arch is None:
        return
    pairs = [("encoder", getattr(getattr(model, "encoder", None), "blocks", None), arch.size.heads)]
    if any(not k.startswith("encoder.") for k in weights.state_dict):
        pairs.append(("decoder", getattr(model, "decoder_blocks", None), arch.model.decoder_heads))
    for part, blocks, heads in pairs:
        if blocks is not None and len(blocks) and blocks[0].attn.num_heads != heads:
            raise ValueError(
                f"the {part} weights were trained with {heads} attention heads, the model has "
                f"{blocks[0].attn.num_heads}: same shapes, different function; fix the config"
            )


def apply_init_weights(model: nn.Module, weights: InitWeights) -> list[str]:
    """Copy ``weights`` into ``model`` (a largemim MIM model); returns the names it did not cover.

    Under ZeRO-3 call it inside ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``, where the
    parameters are whole. Unknown names and shape mismatches are errors: a silent partial load would
    train from a different starting point than the one asked for.
    """
    own = model.state_dict()
    # an EMA teacher's run-local state (in weight files written before it was left out) is never loaded
    sd = {k: v for k, v in weights.state_dict.items() if not is_run_state(k)}
    extra = sorted(set(sd) - set(own))
    bad = [
        f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    if extra or bad:
        hint = " (a different model.img_size/patch_size or size than the weights?)" if bad else ""
        raise ValueError(f"weights ({weights.source_format}) do not fit the model: unexpected {extra[:6]}, "
                         f"shape mismatches {bad[:6]}{hint}")  # fmt: skip
    _check_heads(model, weights)
    with torch.no_grad():
        result = model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
    if hasattr(model, "after_init_from"):
        model.after_init_from(set(sd))
    missing = sorted(result.missing_keys)
    if missing:
        log.info("initialised %d of %d tensors from %s; left at init: %s%s", len(sd), len(own),
                 weights.source_format, ", ".join(missing[:4]), " ..." if len(missing) > 4 else "")  # fmt: skip
    return missing
