"""largemim MAE <-> Hugging Face ``ViTMAEForPreTraining`` folder (``config.json`` + ``model.safetensors``);
the encoder of any objective -> a ``ViTModel`` folder (``export_hf_encoder``).

Weights are written under the names of the published ``facebook/vit-mae-*`` checkpoints (the
transformers 4.x module names), which transformers 4 loads as they are and transformers 5 renames on
load. Differences handled here:

- timm's fused ``attn.qkv`` (rows: all queries, then keys, then values) is split into ``query``,
  ``key`` and ``value``; ``norm1``/``norm2`` are ``layernorm_before``/``layernorm_after``, the MLP is
  ``intermediate.dense``/``output.dense``, the final norm ``vit.layernorm``;
- ``layer_norm_eps`` is 1e-6 (timm's and MAE's; HF's default is 1e-12); ``hidden_act`` "gelu" is the
  exact GELU timm uses;
- ``mask_ratio`` and ``norm_pix_loss`` go into the config, because HF's forward applies them; with the
  same ``noise`` HF keeps the same patches (``int(L * (1 - mask_ratio))`` smallest noise values);
- both fixed sin-cos position embeddings are written as they are (HF keeps them as frozen parameters
  and loads them from the file).

Writing needs no transformers; reading it back for checks does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from largemim.config import ModelConfig, ObjectiveConfig
from largemim.convert.arch import MIMArch
from largemim.convert.safe_load import load_torch
from largemim.convert.weights_io import atomic_folder, describe, dump_json, save_weights, unwrap_state_dict

log = logging.getLogger(__name__)

# (largemim name inside a block, HF name inside a layer); qkv is split separately.
BLOCK_NAMES = (
    ("norm1", "layernorm_before"),
    ("attn.proj", "attention.output.dense"),
    ("norm2", "layernorm_after"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
)
QKV_HF = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
TOP_NAMES = (
    ("encoder.patch_embed.proj", "vit.embeddings.patch_embeddings.projection"),
    ("encoder.cls_token", "vit.embeddings.cls_token"),
    ("encoder.pos_embed", "vit.embeddings.position_embeddings"),
    ("encoder.norm", "vit.layernorm"),
    ("decoder_embed", "decoder.decoder_embed"),
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.decoder_pos_embed"),
    ("decoder_norm", "decoder.decoder_norm"),
    ("decoder_pred", "decoder.decoder_pred"),
)
BLOCK_LISTS = (("encoder.blocks.", "vit.encoder.layer."), ("decoder_blocks.", "decoder.decoder_layers."))
# transformers 5.24's save_pretrained writes decoder layers under this name; read it too.
HF5_DECODER_LAYERS = "decoder.decoder_encoder.layer."


def hf_config(arch: MIMArch) -> dict:
    s, m, o = arch.size, arch.model, arch.objective
    return {
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "hidden_size": s.width,
        "num_hidden_layers": s.depth,
        "num_attention_heads": s.heads,
        "intermediate_size": s.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": m.img_size,
        "patch_size": m.patch_size,
        "num_channels": m.in_chans,
        "qkv_bias": True,
        "decoder_num_attention_heads": m.decoder_heads,
        "decoder_hidden_size": m.decoder_dim,
        "decoder_num_hidden_layers": m.decoder_depth,
        "decoder_intermediate_size": m.decoder_dim * 4,  # MAEDecoderSpec.mlp_ratio
        "mask_ratio": o.mask_ratio,
        "norm_pix_loss": o.norm_pix_loss,
        "torch_dtype": "float32",
    }


def _rename(key: str, to_hf: bool) -> str | None:
    for ours, theirs in TOP_NAMES:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        if key == src or key.startswith(src + "."):
            return dst + key[len(src) :]
    for ours_list, theirs_list in BLOCK_LISTS:
        src_list, dst_list = (ours_list, theirs_list) if to_hf else (theirs_list, ours_list)
        if key.startswith(src_list):
            idx, rest = key[len(src_list) :].split(".", 1)
            for ours, theirs in BLOCK_NAMES:
                src, dst = (ours, theirs) if to_hf else (theirs, ours)
                if rest.startswith(src + "."):
                    return f"{dst_list}{idx}.{dst}{rest[len(src) :]}"
    return None


def to_hf(mim_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``ViTMAEForPreTraining`` state dict (published-checkpoint names) of a largemim MAE."""
    out, unknown = {}, []
    for k, v in mim_sd.items():
        if ".attn.qkv." in k:
            block, param = k.split(".attn.qkv.")
            hf_block = _rename(block + ".norm1.x", True).rsplit(".layernorm_before.", 1)[0]
            for name, part in zip(QKV_HF, v.chunk(3, dim=0), strict=True):
                out[f"{hf_block}.{name}.{param}"] = part.contiguous()
            continue
        new = _rename(k, True)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise ValueError(f"no Hugging Face ViTMAE name for {unknown[:6]}")
    return out


def from_hf(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """largemim MAE state dict from a ``ViTMAEForPreTraining`` one (published-checkpoint names)."""
    hf_sd = {k.replace(HF5_DECODER_LAYERS, "decoder.decoder_layers."): v for k, v in hf_sd.items()}
    out, unknown, qkv = {}, [], {}
    for k, v in hf_sd.items():
        hit = next((q for q in QKV_HF if f".{q}." in k), None)
        if hit is not None:
            layer, param = k.split(f".{hit}.")
            qkv.setdefault((layer, param), {})[hit] = v
            continue
        new = _rename(k, False)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    for (layer, param), parts in qkv.items():
        if len(parts) != 3:
            raise ValueError(f"{layer}: has {sorted(parts)} of query/key/value {param}")
        block = _rename(layer + ".layernorm_before.x", False).rsplit(".norm1.", 1)[0]
        out[f"{block}.attn.qkv.{param}"] = torch.cat([parts[q] for q in QKV_HF], dim=0)
    if unknown:
        raise ValueError(f"not a ViTMAEForPreTraining state dict in the published names: {unknown[:6]}")
    return out


def arch_from_hf_config(cfg: dict) -> MIMArch:
    from largemim.models.sizes import VIT_SIZES

    dims = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"])
    size = next((n for n, s in VIT_SIZES.items() if (s.width, s.depth, s.heads, s.mlp_dim) == dims), None)
    if size is None:
        raise ValueError(f"HF config width/depth/heads/MLP {dims} is not a row of largemim's size table")
    # what shapes cannot show: a different function under the same tensors
    if cfg.get("hidden_act", "gelu") != "gelu" or not cfg.get("qkv_bias", True):
        raise ValueError(f"HF config has hidden_act={cfg.get('hidden_act')!r}, qkv_bias={cfg.get('qkv_bias')}; "
                         "largemim's ViT has the exact GELU and query/key/value biases")  # fmt: skip
    eps = cfg.get("layer_norm_eps", 1e-12)
    if eps != 1e-6:  # facebook/vit-mae-* say 1e-12 though MAE trained with 1e-6: harmless, but not exact
        log.warning("HF config has layer_norm_eps=%g; largemim's LayerNorms use 1e-6 (outputs differ slightly)", eps)
    default = ModelConfig()
    dec_dim = cfg.get("decoder_hidden_size", default.decoder_dim)  # a ViTModel (encoder only) has no decoder
    if cfg.get("decoder_intermediate_size", 4 * dec_dim) != 4 * dec_dim:
        raise ValueError("largemim's MAE decoder has MLP ratio 4; this config's decoder differs")
    model = ModelConfig(
        size=size, patch_size=cfg["patch_size"], img_size=cfg["image_size"], in_chans=cfg.get("num_channels", 3),
        decoder_dim=dec_dim, decoder_depth=cfg.get("decoder_num_hidden_layers", default.decoder_depth),
        decoder_heads=cfg.get("decoder_num_attention_heads", default.decoder_heads),
    )  # fmt: skip
    objective = ObjectiveConfig(mask_ratio=cfg.get("mask_ratio", 0.75), norm_pix_loss=cfg.get("norm_pix_loss", False))
    return MIMArch(model, objective)


def export_hf(mim_sd: dict[str, torch.Tensor], arch: MIMArch, out: str | Path) -> dict:
    """Write a folder ``ViTMAEForPreTraining.from_pretrained(out)`` loads; returns a summary."""
    return _write_folder(out, to_hf(mim_sd), hf_config(arch), arch, "ViTMAEForPreTraining.from_pretrained({!r})")


def _write_folder(out: str | Path, sd: dict[str, torch.Tensor], config: dict, arch: MIMArch, load: str) -> dict:
    """``config.json``, ``model.safetensors`` and (with the run's normalisation) the image processor's
    config, as one folder that replaces ``out`` whole; returns a summary."""
    out = Path(out)
    if out.suffix:
        raise ValueError(f"{out}: the Hugging Face format is a folder; give a folder name")
    written = ["config.json", "model.safetensors"]
    with atomic_folder(out, {*written, "preprocessor_config.json"}) as tmp:
        save_weights(sd, tmp / "model.safetensors")
        dump_json(tmp / "config.json", config)
        if arch.mean is not None:
            dump_json(tmp / "preprocessor_config.json", _preprocessor(arch))
            written.append("preprocessor_config.json")
    return {"written": str(out), "files": written, "weights": describe(sd),
            "load": "transformers." + load.format(str(out))}  # fmt: skip


def hf_vit_config(arch: MIMArch) -> dict:
    """``ViTConfig`` of the encoder alone (``transformers.ViTModel``)."""
    mae = hf_config(arch)
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
            "image_size", "patch_size", "num_channels", "qkv_bias", "torch_dtype")  # fmt: skip
    return {"architectures": ["ViTModel"], "model_type": "vit", **{k: mae[k] for k in keep},
            "encoder_stride": arch.model.patch_size}  # fmt: skip


def _preprocessor(arch: MIMArch) -> dict:
    size = arch.model.img_size
    return {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(arch.mean), "image_std": list(arch.std),
    }  # fmt: skip


def export_hf_encoder(mim_sd: dict[str, torch.Tensor], arch: MIMArch, out: str | Path) -> dict:
    """Write the encoder of any objective (MAE, SimMIM, BEiT, data2vec) as a ``transformers.ViTModel``
    folder: the names of ViTMAE's encoder without its ``vit.`` prefix. ViTModel adds a pooler (a dense
    layer on the class token) that MIM does not train: load with ``add_pooling_layer=False``."""
    encoder = {k: v for k, v in mim_sd.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError("no encoder.* tensors to export")
    sd = {k.removeprefix("vit."): v for k, v in to_hf(encoder).items()}
    return _write_folder(out, sd, hf_vit_config(arch), arch, "ViTModel.from_pretrained({!r}, add_pooling_layer=False)")


def import_hf(folder: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], MIMArch]:
    """largemim state dict and arch from a ``ViTMAEForPreTraining`` folder (the whole MAE) or a ``ViTModel``
    one (the encoder; its pooler, which MIM does not use, is left out)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    kind = cfg.get("model_type")
    if kind not in ("vit_mae", "vit"):
        raise ValueError(f"{folder}/config.json is model_type {kind!r}, not 'vit_mae' or 'vit'")
    hf_sd = _read_hf_weights(folder, trust_pickle)
    if kind == "vit":  # ViTModel names, or ViTForImageClassification's under vit.; no pooler or classifier
        heads = sorted({k.split(".")[0] for k in hf_sd if k.startswith(("pooler.", "classifier."))})
        if heads:
            log.info("%s: left out %s (not part of a MIM encoder)", folder, ", ".join(heads))
        hf_sd = {f"vit.{k.removeprefix('vit.')}": v for k, v in hf_sd.items()
                 if not k.removeprefix("vit.").startswith(("pooler.", "classifier."))}  # fmt: skip
    return from_hf(hf_sd), arch_from_hf_config(cfg)


def _read_hf_weights(folder: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        hf_sd = load_file(str(folder / "model.safetensors"))
    elif index.is_file():
        hf_sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            hf_sd.update(load_file(str(folder / shard)))
    elif (folder / "pytorch_model.bin").is_file():
        hf_sd = unwrap_state_dict(load_torch(folder / "pytorch_model.bin", trust_pickle), folder)
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    return hf_sd
