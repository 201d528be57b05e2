"""What a converter must know about a model that its weights do not say.

Attention heads, the mask ratio, ``norm_pix_loss`` and the data normalisation are not in any tensor's
shape. They travel as the run's own ``model``/``objective`` config sections (and ``data.mean/std``):
read from a checkpoint's saved config, stored in the metadata of every file ``consolidate`` writes,
and, for foreign checkpoints, inferred from the shapes where the size table makes that unambiguous.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from largemim.config import Config, ModelConfig, ObjectiveConfig
from largemim.models.sizes import VIT_SIZES, ViTSize

METADATA_KEY = "largemim"  # safetensors metadata key holding MIMArch.to_json()


def _from_dict(cls, values: dict):
    """A config dataclass from a dict that may come from an older or newer largemim (unknown keys dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
    return cls(**kwargs)


@dataclass
class MIMArch:
    model: ModelConfig
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    mean: tuple[float, ...] | None = None  # data normalisation the model was trained with
    std: tuple[float, ...] | None = None
    info: dict = field(default_factory=dict)  # provenance: step, zero_stage, source, ...

    @property
    def size(self) -> ViTSize:
        if self.model.size not in VIT_SIZES:
            raise ValueError(f"model size {self.model.size!r} is not in largemim's size table ({', '.join(VIT_SIZES)})")
        return VIT_SIZES[self.model.size]

    @classmethod
    def from_config(cls, cfg: Config, **info) -> MIMArch:
        return cls(cfg.model, cfg.objective, tuple(cfg.data.mean), tuple(cfg.data.std), dict(info))

    @classmethod
    def from_config_dict(cls, cfg: dict, **info) -> MIMArch:
        """From ``dataclasses.asdict(Config)`` as the trainer saves it in every checkpoint."""
        data = cfg.get("data", {})
        mean, std = data.get("mean"), data.get("std")
        return cls(
            _from_dict(ModelConfig, cfg["model"]),
            _from_dict(ObjectiveConfig, cfg.get("objective", {})),
            tuple(mean) if mean else None,
            tuple(std) if std else None,
            dict(info),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": dataclasses.asdict(self.model),
                "objective": dataclasses.asdict(self.objective),
                "data": {"mean": self.mean, "std": self.std},
                "info": self.info,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> MIMArch:
        d = json.loads(text)
        arch = cls.from_config_dict(d)
        arch.info = d.get("info", {})
        return arch

    def to_config(self) -> Config:
        cfg = Config()
        cfg.model, cfg.objective = self.model, self.objective
        if self.mean is not None:
            cfg.data.mean, cfg.data.std = self.mean, self.std
        return cfg

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The MIM model (encoder + objective head) this describes, initialised as for training."""
        from largemim.objectives import build_objective

        with torch.device(device):
            return build_objective(self.to_config(), init=torch.device(device).type != "meta")


def infer_arch(
    state_dict: dict[str, torch.Tensor], heads: int | None = None, decoder_heads: int | None = None
) -> MIMArch:
    """Recover the architecture of a MAE (or encoder-only) state dict in largemim names from its shapes.

    Width, depth, MLP size, patch size, channels and image size come from the tensors; the size name
    (and so the heads) from the row of the size table with that width, depth and MLP size. A decoder of
    width 512 gets the reference MAE's 16 heads; other decoder widths need ``decoder_heads``.
    """
    sd = state_dict
    needed = ("encoder.patch_embed.proj.weight", "encoder.blocks.0.mlp.fc1.weight", "encoder.pos_embed")
    missing = [k for k in needed if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:4]) or "none"
        raise ValueError(
            f"cannot infer the architecture: the weights lack {', '.join(missing)} (largemim MAE names); "
            f"their first keys are: {sample}. Is this the file you meant? (largemim reads its own checkpoints "
            "and weights, the reference MAE's, timm ViTs and Hugging Face ViTMAE)"
        )
    w = sd["encoder.patch_embed.proj.weight"]
    width, in_chans, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})
    mlp_dim = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    num_patches = sd["encoder.pos_embed"].shape[1] - 1
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions, not a square grid")
    matches = [n for n, s in VIT_SIZES.items() if (s.width, s.depth, s.mlp_dim) == (width, depth, mlp_dim)]
    if heads is not None:
        matches = [n for n in matches if VIT_SIZES[n].heads == heads]
    if not matches:
        raise ValueError(
            f"no row of largemim's size table has width {width}, depth {depth}, MLP {mlp_dim}"
            + (f" and {heads} heads" if heads else "")
            + f"; known sizes: {', '.join(f'{n}={s.width}x{s.depth}' for n, s in VIT_SIZES.items())}"
        )
    model = ModelConfig(size=matches[0], patch_size=patch, img_size=grid * patch, in_chans=in_chans)
    if "decoder_embed.weight" in sd:
        dec_dim = sd["decoder_embed.weight"].shape[0]
        dec_depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
        if decoder_heads is None:
            if dec_dim != 512:
                raise ValueError(f"decoder width {dec_dim} is not MAE's 512: give the decoder's number of heads")
            decoder_heads = 16
        model.decoder_dim, model.decoder_depth, model.decoder_heads = dec_dim, dec_depth, decoder_heads
    return MIMArch(model)
