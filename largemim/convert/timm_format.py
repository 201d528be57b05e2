"""largemim encoder <-> timm ``VisionTransformer`` (class token, absolute position embedding, no head).

The encoder's parameter names are timm's, so export strips the ``encoder.`` prefix and checks every
name and shape against a timm model built on the meta device; import does the reverse and refuses
(with the reason) the timm features largemim's encoder does not have: register tokens, layer scale,
q/k norm, average pooling with ``fc_norm``, a position embedding without a class-token slot.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from largemim.convert.arch import MIMArch, infer_arch
from largemim.convert.weights_io import atomic_folder, describe, save_weights

log = logging.getLogger(__name__)

PREFIX = "encoder."
HEAD_PREFIXES = ("head.", "head_drop.")  # a classifier head: not part of an encoder, dropped on import


def encoder_keys(mim_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder part of a MIM state dict, without the ``encoder.`` prefix."""
    out = {k[len(PREFIX) :]: v for k, v in mim_sd.items() if k.startswith(PREFIX)}
    if not out:
        raise ValueError(f"no '{PREFIX}*' keys: not a largemim MIM state dict (first keys: {list(mim_sd)[:5]})")
    return out


def timm_model_args(arch: MIMArch) -> tuple[str, dict]:
    """timm model name and ``create_model`` kwargs that build exactly this encoder with no head.

    The name is the size table's timm model (or ViT-Ti as a carrier for sizes timm lacks); the kwargs
    spell out every dimension, so they are right whatever the name's defaults.
    """
    s, m = arch.size, arch.model
    name = s.timm_name or "vit_tiny_patch16_224"
    kwargs = {
        "num_classes": 0,
        "img_size": m.img_size,
        "patch_size": m.patch_size,
        "in_chans": m.in_chans,
        "embed_dim": s.width,
        "depth": s.depth,
        "num_heads": s.heads,
        "mlp_ratio": s.mlp_ratio,
    }
    return name, kwargs


def create_call(name: str, kwargs: dict, pretrained: bool = False) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"timm.create_model({name!r}, pretrained={pretrained}, {args})"


def build_timm(arch: MIMArch, device: str | torch.device = "meta"):
    import timm

    name, kwargs = timm_model_args(arch)
    with torch.device(device):
        return timm.create_model(name, pretrained=False, **kwargs)


def _check_against(model, sd: dict[str, torch.Tensor], what: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = [f"{k} {have[k]} vs {want[k]}" for k in want.keys() & have.keys() if want[k] != have[k]]
    if missing or extra or shapes:
        raise ValueError(f"{what}: missing {missing[:6]}, unexpected {extra[:6]}, shape mismatches {shapes[:6]}")


def to_timm(mim_sd: dict[str, torch.Tensor], arch: MIMArch) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` state dict of the encoder, checked against timm's own model."""
    sd = encoder_keys(mim_sd)
    _check_against(build_timm(arch, "meta"), sd, "encoder does not match timm's VisionTransformer")
    return sd


def export_timm(mim_sd: dict[str, torch.Tensor], arch: MIMArch, out: str | Path) -> dict:
    """Write the encoder for timm: a ``.safetensors`` file, or a folder (``config.json`` +
    ``model.safetensors``) that ``timm.create_model("local-dir:FOLDER", pretrained=True)`` builds and
    loads by itself. Returns a summary."""
    out = Path(out)
    if out.suffix in (".pt", ".pth", ".bin"):
        raise ValueError(f"{out}: to-timm writes a folder (for timm's local-dir:) or a .safetensors file; "
                         "give a folder name or one ending in .safetensors")  # fmt: skip
    sd = to_timm(mim_sd, arch)
    name, kwargs = timm_model_args(arch)
    load = f"model = {create_call(name, kwargs)}; model.load_state_dict(state_dict, strict=True)"
    summary = {"written": str(out), "weights": describe(sd), "timm_model": name, "timm_kwargs": kwargs, "load": load}
    if out.suffix == ".safetensors":
        save_weights(sd, out)
        return summary
    import importlib.util

    if importlib.util.find_spec("huggingface_hub") is None:  # timm's save_for_hf asserts it is installed
        raise ValueError(f"{out}: a timm folder export needs huggingface_hub (pip install huggingface_hub); "
                         "or give an output file ending in .safetensors")  # fmt: skip
    from timm.models import save_for_hf

    model = build_timm(arch, "meta")
    model.load_state_dict(sd, strict=True, assign=True)  # meta -> real tensors, no second copy
    data = {"mean": tuple(arch.mean), "std": tuple(arch.std)} if arch.mean else None
    with atomic_folder(out, {"config.json", "model.safetensors"}) as tmp:
        save_for_hf(model, str(tmp), safe_serialization=True, data_config=data,
                    model_config={"pretrained_cfg": {"tag": "largemim", "license": None}})  # fmt: skip
    summary["load_folder"] = f"timm.create_model('local-dir:{out}', pretrained=True)"
    return summary


def from_timm(
    timm_sd: dict[str, torch.Tensor], img_size: int | None = None, heads: int | None = None
) -> tuple[dict[str, torch.Tensor], MIMArch]:
    """A timm ViT state dict as largemim encoder weights (``encoder.*`` keys, no decoder) and its arch.

    A classifier head is dropped. With ``img_size`` the position embedding is resampled (bicubic, as
    timm does) to that resolution's patch grid.
    """
    sd = {k: v for k, v in timm_sd.items() if not k.startswith(HEAD_PREFIXES)}
    dropped = sorted(set(timm_sd) - set(sd))
    if dropped:
        log.info("dropped the classifier head: %s", ", ".join(dropped))
    if any(k.startswith("fc_norm.") for k in sd) and "norm.weight" not in sd:
        raise ValueError("this timm ViT pools by averaging (global_pool='avg', fc_norm); largemim's encoder ends "
                         "in a norm on all tokens and uses the class token: not convertible")  # fmt: skip
    sd = {k: v for k, v in sd.items() if not k.startswith("fc_norm.")}  # Identity when pooling by token
    markers = (".ls1.", ".ls2.", ".q_norm.", ".k_norm.")
    prefixes = ("reg_token", "norm_pre.", "patch_embed.norm.", "attn_pool.")
    unsupported = sorted(k for k in sd if k.startswith(prefixes) or any(m in k for m in markers))
    if unsupported:
        raise ValueError(f"timm features largemim's encoder does not have (register tokens, layer scale, "
                         f"q/k norm, pre-norm, attention pooling): {unsupported[:6]}")  # fmt: skip
    if "cls_token" not in sd:
        raise ValueError("no cls_token: largemim's encoder needs a class-token ViT")
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError("no pos_embed or patch_embed.proj.weight: largemim's encoder needs a ViT with learned "
                         "or fixed absolute position embeddings and a convolutional patch embedding")  # fmt: skip
    num_patch_pos = sd["pos_embed"].shape[1] - 1
    if round(num_patch_pos**0.5) ** 2 != num_patch_pos and round((num_patch_pos + 1) ** 0.5) ** 2 == num_patch_pos + 1:
        raise ValueError("pos_embed has no slot for the class token (timm no_embed_class=True); largemim's "
                         "encoder adds a position to the class token too: not convertible")  # fmt: skip
    w = sd["patch_embed.proj.weight"]
    if img_size is not None:
        grid = img_size // w.shape[-1]
        if grid * grid != num_patch_pos:
            from timm.layers import resample_abs_pos_embed

            log.info("resampling pos_embed from %d to %dx%d patch positions", num_patch_pos, grid, grid)
            sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=[grid, grid], num_prefix_tokens=1)
    mim = {PREFIX + k: v for k, v in sd.items()}
    arch = infer_arch(mim, heads=heads)
    encoder = arch.build("meta").encoder
    _check_against(encoder, sd, "timm state dict does not fit a largemim encoder")
    return mim, arch
