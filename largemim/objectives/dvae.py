"""BEiT's stage 1: a discrete VAE that turns an image into a grid of token ids (objective ``dvae``).

A conv encoder maps each image to logits over ``vocab_size`` codes on a grid that matches the ViT's
patch grid (one code per patch: the encoder downsamples by exactly ``model.patch_size``); a
Gumbel-softmax sample of them (DALL-E's relaxation, Ramesh et al. 2021) picks a mixture of codebook
vectors per position, and a conv decoder reconstructs the image. The loss is the pixel MSE (on the
normalised images the trainer feeds) plus ``kl_weight`` x KL(q || uniform) per position, which keeps
the codebook in use. The temperature decays exponentially from ``temp_start`` to ``temp_end`` over
``temp_steps`` optimizer steps; the step count is a buffer in the state dict, so a resumed run
continues at the same temperature.

The trained model is written as a frozen tokenizer (``save_tokenizer``; ``tools/export_tokenizer.py``
does it from a run folder): a safetensors file whose metadata says the grid, vocabulary, image size and
normalisation it was trained with, which BEiT checks against its own config before training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from largemim.config import Config, ConfigError
from largemim.files import replacing, write_atomic
from largemim.models.vit import ViTEncoder
from largemim.objectives.pictures import rows, to_pixels

FORMAT = "largemim-dvae-tokenizer"
METADATA_KEY = "largemim_tokenizer"  # safetensors metadata key holding TokenizerMeta as JSON
TRAINING_ONLY = ("num_updates",)  # state-dict entries a frozen tokenizer file leaves out


def downsample_factors(patch_size: int) -> list[int]:
    """Strides whose product is ``patch_size``: halvings first, then the odd rest (14 -> [2, 7])."""
    factors, rest = [], patch_size
    while rest % 2 == 0 and rest > 1:
        factors.append(2)
        rest //= 2
    if rest > 1:
        factors.append(rest)
    return factors


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Codebook(nn.Module):
    """``vocab_size`` vectors of ``width``; called on soft one-hots (N, V, g, g) or on ids (N, g, g)."""

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, width))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dtype == torch.long:
            return F.embedding(z, self.weight).permute(0, 3, 1, 2)
        return torch.einsum("nvhw,vd->ndhw", z.to(self.weight.dtype), self.weight)


class DVAE(nn.Module):
    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int = 3,
        vocab_size: int = 8192,
        hidden: int = 64,
        temp_start: float = 1.0,
        temp_end: float = 1 / 16,
        temp_steps: int = 5000,
        kl_weight: float = 0.01,
        init: bool = True,
    ):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.vocab_size, self.hidden, self.grid_size = vocab_size, hidden, img_size // patch_size
        self.temp_start, self.temp_end, self.temp_steps, self.kl_weight = temp_start, temp_end, temp_steps, kl_weight
        factors = downsample_factors(patch_size)
        enc: list[nn.Module] = [nn.Conv2d(in_chans, hidden, 3, padding=1)]
        for f in factors:
            enc += [ResBlock(hidden), nn.Conv2d(hidden, hidden, f, stride=f)]
        enc += [ResBlock(hidden), nn.ReLU(), nn.Conv2d(hidden, vocab_size, 1)]
        self.enc = nn.Sequential(*enc)
        self.codebook = Codebook(vocab_size, hidden)
        dec: list[nn.Module] = [ResBlock(hidden)]
        for f in reversed(factors):
            dec += [nn.ConvTranspose2d(hidden, hidden, f, stride=f), ResBlock(hidden)]
        dec += [nn.ReLU(), nn.Conv2d(hidden, in_chans, 3, padding=1)]
        self.dec = nn.Sequential(*dec)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))  # optimizer steps taken
        if init:  # False when parameters are created partitioned (ZeRO-3): the builder inits them gathered
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.reset_parameters()
            if isinstance(m, ResBlock):  # every residual branch starts as the identity
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
        nn.init.normal_(self.codebook.weight, std=1.0)
        self.num_updates.zero_()

    def no_weight_decay(self) -> set[str]:
        return {"codebook.weight"}

    def after_step(self, step: int) -> None:
        self.num_updates.fill_(step)

    def temperature(self) -> torch.Tensor:
        """Exponential decay, a tensor (no host sync): start x (end/start)^(min(step, steps)/steps)."""
        progress = self.num_updates.clamp(max=self.temp_steps).double() / self.temp_steps
        return (self.temp_start * (self.temp_end / self.temp_start) ** progress).float()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, V, g, g) code logits in fp32."""
        return self.enc(images.to(self.codebook.weight.dtype)).float()

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, g*g) token ids, patches in row-major order (the ViT's patch order)."""
        return self.logits(images).argmax(dim=1).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from ids (N, g*g) or (N, g, g), or from soft one-hots (N, V, g, g)."""
        if z.dtype == torch.long and z.dim() == 2:
            z = z.view(z.shape[0], self.grid_size, self.grid_size)
        return self.dec(self.codebook(z))

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``noise`` is accepted for the common objective interface and not used."""
        logits = self.logits(images)
        tau = self.temperature().to(logits.device)
        gumbel = -torch.empty_like(logits).exponential_().log()  # torch's global RNG, seeded per micro-step
        z = ((logits + gumbel) / tau).softmax(dim=1)
        recon = self.decode(z)
        mse = F.mse_loss(recon.float(), images.float())
        log_q = logits.log_softmax(dim=1)
        kl = (log_q.exp() * log_q).sum(dim=1).mean() + math.log(self.vocab_size)  # KL(q || uniform) per position
        loss = mse + self.kl_weight * kl
        with torch.no_grad():
            counts = torch.bincount(logits.argmax(dim=1).flatten(), minlength=self.vocab_size).float()
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
            usage = (counts > 0).float().mean()
        return {
            "loss": loss,
            "recon_mse": mse.detach(),
            "kl": kl.detach(),
            "temperature": tau.detach(),
            "codebook_usage": usage,  # share of the vocabulary this micro-batch's hard codes use
            "perplexity": perplexity,  # of the hard codes' histogram over this micro-batch
        }

    @torch.no_grad()
    def picture(self, images: torch.Tensor, noise, mean, std) -> torch.Tensor:
        """original | decoded from the hard codes (what BEiT predicts) | decoded from the soft codes at the
        current temperature, without Gumbel noise."""
        logits = self.logits(images)
        hard = self.decode(logits.argmax(dim=1))
        soft = self.decode((logits / self.temperature().to(logits.device)).softmax(dim=1))
        return rows(*(to_pixels(x, mean, std) for x in (images, hard, soft)))


def build_dvae(cfg: Config, make_encoder: Callable[[], ViTEncoder], init: bool) -> DVAE:
    """No ViT: ``make_encoder`` is not called; the dVAE's token grid is the configured ViT's patch grid."""
    m, o = cfg.model, cfg.objective
    del make_encoder
    return DVAE(
        m.img_size, m.patch_size, m.in_chans, o.vocab_size, o.dvae_hidden, o.dvae_temp_start, o.dvae_temp_end,
        o.dvae_temp_steps, o.dvae_kl_weight, init=init,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The frozen tokenizer file.


@dataclass(frozen=True)
class TokenizerMeta:
    vocab_size: int
    grid_size: int
    image_size: int
    patch_size: int
    in_chans: int
    hidden: int
    mean: tuple[float, ...]  # the normalisation of the images it was trained on
    std: tuple[float, ...]
    source: str = ""  # the run (and checkpoint) it was exported from
    format: str = FORMAT
    version: int = 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TokenizerMeta:
        d = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kwargs)

    def build(self) -> DVAE:
        return DVAE(self.image_size, self.patch_size, self.in_chans, self.vocab_size, self.hidden, init=False)


def save_tokenizer(state_dict: dict[str, torch.Tensor], meta: TokenizerMeta, path: str | Path) -> Path:
    """Write a dVAE's weights (fp32) and ``meta`` as a safetensors file, plus the metadata as JSON beside
    it (``PATH.json``, for people; readers use the copy inside the safetensors file)."""
    from safetensors.torch import save_file

    model = meta.build()  # checks that the weights are a whole dVAE of the described shape
    weights = {k: v for k, v in state_dict.items() if k not in TRAINING_ONLY}
    model.load_state_dict({**weights, **{k: getattr(model, k) for k in TRAINING_ONLY}}, strict=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
    with replacing(path) as tmp:  # synced, and readable by others (safetensors creates its files 0600)
        save_file(tensors, str(tmp), metadata={METADATA_KEY: meta.to_json()})
    write_atomic(Path(str(path) + ".json"), json.dumps(json.loads(meta.to_json()), indent=1) + "\n")
    return path


def read_tokenizer_meta(path: str | Path) -> TokenizerMeta:
    """The metadata of a tokenizer file, checked to describe its own weights; reads no weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tokenizer {str(path)!r} does not exist; write one with tools/export_tokenizer.py")
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
            shape = f.get_slice("codebook.weight").get_shape() if "codebook.weight" in f.keys() else None  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a file that is not one of its own
        raise ConfigError(f"tokenizer {str(path)!r} is not a readable safetensors file: {e}") from None
    if text is None:
        raise ConfigError(f"{path} has no {METADATA_KEY!r} metadata: not a tokenizer from tools/export_tokenizer.py")
    meta = TokenizerMeta.from_json(text)
    if meta.format != FORMAT:
        raise ConfigError(f"{path} is a {meta.format!r} file, not a {FORMAT!r}")
    if shape is None or list(shape) != [meta.vocab_size, meta.hidden]:
        raise ConfigError(
            f"{path}: codebook.weight has shape {shape}, its metadata says {meta.vocab_size} codes of {meta.hidden}"
        )
    return meta


def file_id(path: str | Path) -> int:
    """The first 8 bytes of the file's SHA-256 as a signed int64: stored in BEiT's state dict, so that a
    resumed run notices a tokenizer file that changed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def load_tokenizer(path: str | Path, device: torch.device | str = "cpu") -> tuple[DVAE, TokenizerMeta]:
    """The frozen dVAE of a tokenizer file, in fp32 and eval mode, with ``requires_grad`` off."""
    from safetensors.torch import load_file

    meta = read_tokenizer_meta(path)
    model = meta.build()
    weights = load_file(str(path))
    model.load_state_dict({**weights, "num_updates": model.num_updates}, strict=True)
    model.requires_grad_(False)
    return model.to(device).eval(), meta
