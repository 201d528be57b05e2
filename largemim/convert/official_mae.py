"""largemim MAE <-> the reference MAE code's checkpoints (facebookresearch/mae, ``models_mae.py``).

The reference code saves ``{'model': state_dict, 'optimizer': ..., 'epoch': ..., 'scaler': ...,
'args': Namespace}``; its released ``mae_pretrain_vit_*.pth`` hold ``{'model': encoder only}`` and
``mae_visualize_vit_*.pth`` the whole model. Its names are largemim's without the ``encoder.`` prefix
(both use timm's ``Block``), so conversion is a rename, checked against a model built from the
architecture, and lossless both ways.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from largemim.convert.arch import MIMArch, infer_arch
from largemim.convert.safe_load import load_torch
from largemim.convert.weights_io import describe, unwrap_state_dict
from largemim.files import replacing

log = logging.getLogger(__name__)

PREFIX = "encoder."
DECODER_KEYS = ("decoder_", "mask_token")  # top-level names of the reference MAE's decoder


def _is_decoder(key: str) -> bool:
    return key.startswith(DECODER_KEYS)


def to_official(mim_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference-MAE state dict of a largemim MAE (drop the ``encoder.`` prefix)."""
    out = {}
    for k, v in mim_sd.items():
        if k.startswith(PREFIX):
            out[k[len(PREFIX) :]] = v
        elif _is_decoder(k):
            out[k] = v
        else:
            raise ValueError(f"{k!r} is neither an encoder nor a decoder parameter of largemim's MAE")
    return out


def from_official(
    official_sd: dict[str, torch.Tensor], heads: int | None = None, decoder_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], MIMArch]:
    """largemim MAE state dict (``encoder.*`` + decoder names) and its arch from a reference-MAE one.

    An encoder-only checkpoint (the released ``mae_pretrain_*``) gives encoder keys only; a fine-tuned
    one's ``head.*``/``fc_norm.*`` are dropped with a note. The result is checked name by name and
    shape by shape against the largemim model of the inferred architecture.
    """
    sd, dropped = {}, []
    for k, v in official_sd.items():
        if k.startswith(("head.", "fc_norm.")):
            dropped.append(k)
        elif _is_decoder(k):
            sd[k] = v
        else:
            sd[PREFIX + k] = v
    if dropped:
        log.info("dropped fine-tuning keys not in an MAE: %s", ", ".join(sorted(dropped)[:6]))
    arch = infer_arch(sd, heads=heads, decoder_heads=decoder_heads)
    want = {k: tuple(v.shape) for k, v in arch.build("meta").state_dict().items()}
    if not any(_is_decoder(k) for k in sd):
        want = {k: s for k, s in want.items() if k.startswith(PREFIX)}
        log.info("encoder-only checkpoint: no decoder weights")
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    bad = [f"{k} {have[k]} vs {want[k]}" for k in want.keys() & have.keys() if have[k] != want[k]]
    if missing or extra or bad:
        raise ValueError(f"not a reference-MAE state dict of a size largemim builds: missing {missing[:6]}, "
                         f"unexpected {extra[:6]}, shape mismatches {bad[:6]}")  # fmt: skip
    return sd, arch


def load_official(
    path: str | Path, trust_pickle: bool = False, heads: int | None = None, decoder_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], MIMArch]:
    """Read a reference-MAE ``.pth`` (weights-only; its ``args`` Namespace is allowed) and convert it."""
    obj = load_torch(path, trust_pickle=trust_pickle)
    sd, arch = from_official(unwrap_state_dict(obj, path), heads, decoder_heads)
    arch.info = {"source": str(path)}
    if isinstance(obj, dict) and "epoch" in obj:
        arch.info["epoch"] = int(obj["epoch"])
    return sd, arch


def save_official(mim_sd: dict[str, torch.Tensor], out: str | Path, epoch: int | None = None) -> dict:
    """Write ``{'model': state_dict}`` (plus ``epoch`` if given) the way the reference code reads it."""
    out = Path(out)
    sd = {k: v.contiguous() for k, v in to_official(mim_sd).items()}
    payload: dict = {"model": sd}
    if epoch is not None:
        payload["epoch"] = epoch
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        torch.save(payload, tmp)
    load = "checkpoint = torch.load(path, weights_only=True); model.load_state_dict(checkpoint['model'])"
    return {"written": str(out), "weights": describe(sd), "load": load}
