"""Model FLOPs per image, device peaks, and model-FLOPs utilisation (MFU).

What is counted: every matrix multiply of the forward pass, at 2 FLOPs per multiply-accumulate —
the patch embedding (a convolution that is one matmul per patch, applied to all patches before
masking), each block's qkv, attention output and two MLP projections, the attention products QK^T
and AV (scaled dot-product attention), and the MAE decoder's embedding (on the visible tokens and the
class token), its blocks (on all patches plus the class token, mask tokens included) and its pixel
predictor (likewise on all tokens, the class token's output being dropped afterwards).

What is not counted: biases, LayerNorms, GELUs, softmax, residual adds, position embeddings, the
gather/scatter of masking, the loss and its per-patch pixel normalisation, and the optimizer step.
They are a few percent of the matmul work at the ViT-B scale and less above it, and they are not
what the matrix units' peak measures.

Training = 3 x forward: the backward pass costs two matmuls per forward matmul (input and weight
gradients). That convention slightly overstates the patch embedding, whose input gradient is never
computed, and ignores recomputation: with activation checkpointing the hardware does more work, but
model FLOPs (and MFU, as in Chowdhery et al. 2022, "PaLM", appendix B) stay the same.

Reference values (224 px, 8 x 512 decoder, 75 % mask), which ``tests/test_flops.py`` checks: training
MAE ViT-B/16 58 GFLOP per image, L/16 124, H/14 291, g/14 440; a full-token encoder forward B/16 35,
L/16 123, H/14 335, g/14 534.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from largemim.config import Config, ConfigError
from largemim.models.sizes import VIT_SIZES


def block_flops(width: int, mlp_dim: int, tokens: int) -> int:
    """Forward FLOPs of one pre-norm transformer block on ``tokens`` tokens (per image)."""
    projections = tokens * (4 * width * width + 2 * width * mlp_dim)  # qkv (3 D^2) + proj (D^2) + fc1, fc2
    attention = 2 * tokens * tokens * width  # QK^T and AV, summed over heads
    return 2 * (projections + attention)


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def _grid(cfg: Config) -> tuple[int, int]:
    """(number of patches, values per patch)."""
    m = cfg.model
    if m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size {m.img_size} is not a multiple of model.patch_size {m.patch_size}")
    return (m.img_size // m.patch_size) ** 2, m.patch_size**2 * m.in_chans


def _size(cfg: Config):
    if cfg.model.size not in VIT_SIZES:
        raise ConfigError(f"model.size={cfg.model.size!r} is not in the size table ({', '.join(VIT_SIZES)})")
    return VIT_SIZES[cfg.model.size]


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per image, by part."""

    patch_embed: int
    encoder: int  # the encoder's blocks
    decoder: int = 0  # an objective's head: for MAE the decoder's embedding, blocks and pixel predictor
    no_grad: int = 0  # forward-only work per training step (data2vec's EMA teacher); counted once

    @property
    def forward(self) -> int:
        return self.patch_embed + self.encoder + self.decoder

    @property
    def train(self) -> int:
        return 3 * self.forward + self.no_grad


def encoder_forward_flops(cfg: Config, tokens: int | None = None) -> FlopCount:
    """The encoder on ``tokens`` tokens (default: every patch plus the class token), patches embedded."""
    size = _size(cfg)
    num_patches, patch_dim = _grid(cfg)
    tokens = num_patches + 1 if tokens is None else tokens
    return FlopCount(
        patch_embed=linear_flops(num_patches, patch_dim, size.width),
        encoder=size.depth * block_flops(size.width, size.mlp_dim, tokens),
    )


def visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches the MAE encoder sees; the same rounding as ``objectives.masking.random_masking_ids``."""
    return int(num_patches * (1 - mask_ratio))


def mae_forward_flops(cfg: Config) -> FlopCount:
    m = cfg.model
    num_patches, patch_dim = _grid(cfg)
    width = _size(cfg).width
    kept = visible_patches(num_patches, cfg.objective.mask_ratio) + 1  # + the class token
    enc = encoder_forward_flops(cfg, tokens=kept)
    full = num_patches + 1
    decoder_mlp = int(m.decoder_dim * 4.0)  # MAEDecoderSpec.mlp_ratio
    decoder = (
        linear_flops(kept, width, m.decoder_dim)
        + m.decoder_depth * block_flops(m.decoder_dim, decoder_mlp, full)
        + linear_flops(full, m.decoder_dim, patch_dim)
    )
    return FlopCount(patch_embed=enc.patch_embed, encoder=enc.encoder, decoder=decoder)


def _hidden(cfg: Config) -> int:
    num_patches, _ = _grid(cfg)
    return num_patches - visible_patches(num_patches, cfg.objective.mask_ratio)


def simmim_forward_flops(cfg: Config) -> FlopCount:
    """All tokens through the encoder; a linear pixel head on every patch token."""
    num_patches, patch_dim = _grid(cfg)
    enc = encoder_forward_flops(cfg)
    return FlopCount(enc.patch_embed, enc.encoder, linear_flops(num_patches, _size(cfg).width, patch_dim))


def beit_forward_flops(cfg: Config) -> FlopCount:
    """All tokens through the encoder; the vocabulary head on the hidden patches. The frozen dVAE
    tokenizer's convolutions are not counted (they are not the ViT's model FLOPs)."""
    enc = encoder_forward_flops(cfg)
    return FlopCount(
        enc.patch_embed, enc.encoder, linear_flops(_hidden(cfg), _size(cfg).width, cfg.objective.vocab_size)
    )


def data2vec_forward_flops(cfg: Config) -> FlopCount:
    """Student: all tokens (mask tokens included) and a linear regression head on the hidden patches;
    teacher: one more full-image encoder forward, without backward."""
    enc = encoder_forward_flops(cfg)
    width = _size(cfg).width
    return FlopCount(enc.patch_embed, enc.encoder, linear_flops(_hidden(cfg), width, width), no_grad=enc.forward)


# objective name -> forward FLOPs per image; one line per objective, next to objectives.OBJECTIVES.
# ("dvae", a convolutional tokenizer, has none: its runs log no MFU.)
FORWARD_FLOPS: dict[str, Callable[[Config], FlopCount]] = {
    "mae": mae_forward_flops,
    "simmim": simmim_forward_flops,
    "beit": beit_forward_flops,
    "data2vec": data2vec_forward_flops,
}


def forward_flops(cfg: Config) -> FlopCount:
    """Forward FLOPs per image of the configured objective (model, mask ratio, decoder)."""
    name = cfg.objective.name
    if name not in FORWARD_FLOPS:
        raise ConfigError(f"no FLOP formula for objective.name={name!r}; known: {sorted(FORWARD_FLOPS)}")
    return FORWARD_FLOPS[name](cfg)


def train_flops_per_image(cfg: Config) -> int:
    """Model FLOPs of one training step per image (forward + backward, no recomputation)."""
    return forward_flops(cfg).train


# ---------------------------------------------------------------------------------------------------
# Peaks: dense (no 2:4 sparsity) matrix throughput in TFLOP/s from the vendors' data sheets.
# "fp32" is plain FP32 (not TF32): what torch runs fp32 matmuls with by default.
# Rows are tried in order and every substring of a row must occur in the lower-cased device name, so
# the more specific names come first ("a100" before "a10", "h200" before "h20", "l40s" before "l4").

_PEAKS: list[tuple[tuple[str, ...], str, dict[str, float]]] = [
    # Hopper. H100 SXM reports "NVIDIA H100 80GB HBM3"; the PCIe card "NVIDIA H100 PCIe".
    (("h100", "pcie"), "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    (("h100", "nvl"), "H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (("h100",), "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    (("h800", "pcie"), "H800 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    (("h800",), "H800 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    (("h200", "nvl"), "H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (("h200",), "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),  # GH200 too
    (("h20",), "H20", {"bf16": 148.0, "fp16": 148.0, "fp32": 44.0}),
    # Blackwell (HGX per-GPU figures).
    (("gb200",), "GB200", {"bf16": 2500.0, "fp16": 2500.0, "fp32": 80.0}),
    (("b200",), "B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0}),
    (("b100",), "B100", {"bf16": 1750.0, "fp16": 1750.0, "fp32": 60.0}),
    # Ampere. A100 SXM and PCIe share their peaks; A800 is the A100's export variant.
    (("a100",), "A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (("a800",), "A800", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    # The A10G (AWS G5) has fewer tensor FLOPs than the A10 (baseten.co, "NVIDIA A10 vs A10G").
    (("a10g",), "A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    (("a10",), "A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    (("a30",), "A30", {"bf16": 165.0, "fp16": 165.0, "fp32": 10.3}),
    (("a40",), "A40", {"bf16": 149.7, "fp16": 149.7, "fp32": 37.4}),
    (("a6000",), "RTX A6000", {"bf16": 154.8, "fp16": 154.8, "fp32": 38.7}),
    # Ada.
    (("l40s",), "L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    (("l40",), "L40", {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5}),
    (("l4",), "L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    (("rtx 4090",), "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),  # fp32 accumulate
    # Volta and Turing: no bf16 tensor cores.
    (("v100s",), "V100S", {"fp16": 130.0, "fp32": 16.4}),
    (("v100", "pcie"), "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (("v100",), "V100 SXM", {"fp16": 125.0, "fp32": 15.7}),
    (("t4",), "T4", {"fp16": 65.0, "fp32": 8.1}),
    # AMD Instinct (torch.cuda.get_device_name on ROCm).
    (("mi300x",), "MI300X", {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4}),
    (("mi325x",), "MI325X", {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4}),
    (("mi250x",), "MI250X", {"bf16": 383.0, "fp16": 383.0, "fp32": 95.7}),
]


def known_device(device_name: str) -> str | None:
    """The table row a device name matches ("NVIDIA H100 80GB HBM3" -> "H100 SXM"), or None."""
    name = device_name.lower()
    for needles, label, _ in _PEAKS:
        if all(n in name for n in needles):
            return label
    return None


def peak_tflops(device_name: str, precision: str, override: float | None = None) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` (as ``torch.cuda.get_device_name()`` spells it) at
    ``precision`` (bf16 | fp16 | fp32).

    ``override`` (a config or command-line value; > 0) wins over the table: use it for a device the
    table lacks or one run at other clocks. None when unknown, on the CPU, or where the device has no
    such precision (bf16 on a V100), so that no MFU is printed rather than a wrong one.
    """
    if override:
        return float(override)
    name = device_name.lower()
    for needles, _, peaks in _PEAKS:
        if all(n in name for n in needles):
            return peaks.get(precision)
    return None


def mfu(images_per_s: float, flops_per_image: float, peak_tflops: float | None) -> float | None:
    """Model-FLOPs utilisation as a fraction of ``peak_tflops`` (per device; None if the peak is unknown)."""
    if not peak_tflops:
        return None
    return images_per_s * flops_per_image / (peak_tflops * 1e12)
