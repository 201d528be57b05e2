"""The FLOP formula against published reference numbers and against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from largemim.config import Config, ConfigError
from largemim.flops import (
    encoder_forward_flops,
    forward_flops,
    known_device,
    mfu,
    peak_tflops,
    train_flops_per_image,
)
from largemim.objectives import build_objective


def make_cfg(size="nano", img=32, patch=4, mask=0.75, dec=(32, 2, 4), chans=3) -> Config:
    cfg = Config()
    cfg.model.size, cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans = size, img, patch, chans
    cfg.model.decoder_dim, cfg.model.decoder_depth, cfg.model.decoder_heads = dec
    cfg.objective.mask_ratio = mask
    return cfg


def counted(fn) -> int:
    # On the CPU, SDPA dispatches to _scaled_dot_product_flash_attention_for_cpu, which torch's
    # counter has no formula for (torch 2.14); the math backend spells attention out as two bmm's,
    # which it counts. On CUDA the flash/efficient kernels are counted directly.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "size,patch,train_gflop,full_forward_gflop",
    [("base", 16, 58, 35), ("large", 16, 124, 123), ("huge", 14, 291, 335), ("giant", 14, 440, 534)],
)
def test_reference_values(size, patch, train_gflop, full_forward_gflop):
    cfg = make_cfg(size, img=224, patch=patch, mask=0.75, dec=(512, 8, 16))
    assert train_flops_per_image(cfg) / 1e9 == pytest.approx(train_gflop, rel=0.02)
    assert encoder_forward_flops(cfg).forward / 1e9 == pytest.approx(full_forward_gflop, rel=0.02)


@pytest.mark.parametrize(
    "size,img,patch,mask,dec",
    [
        ("nano", 32, 4, 0.75, (32, 2, 4)),
        ("nano", 32, 8, 0.5, (64, 1, 4)),
        ("micro", 32, 4, 0.9, (48, 2, 3)),
        ("micro", 48, 8, 0.6, (128, 1, 8)),
    ],
)
def test_mae_forward_matches_counted(size, img, patch, mask, dec):
    torch.manual_seed(0)
    cfg = make_cfg(size, img, patch, mask, dec)
    model = build_objective(cfg)
    batch = 2
    images = torch.randn(batch, 3, img, img)
    assert counted(lambda: model(images)) == batch * forward_flops(cfg).forward


def test_encoder_full_forward_matches_counted():
    cfg = make_cfg("micro", 32, 4, dec=(32, 1, 4))
    encoder = build_objective(cfg).encoder
    images = torch.randn(3, 3, 32, 32)
    assert counted(lambda: encoder(images)) == 3 * encoder_forward_flops(cfg).forward


def test_backward_is_twice_forward_except_patch_embedding():
    """3 x forward overstates training by exactly one patch-embedding forward: nothing needs the
    gradient with respect to the images, so the embedding's backward has one matmul, not two."""
    cfg = make_cfg("nano", 32, 4, 0.75, (32, 2, 4))
    model = build_objective(cfg)
    images = torch.randn(2, 3, 32, 32)
    fc = forward_flops(cfg)
    assert counted(lambda: model(images)["loss"].backward()) == 2 * (fc.train - fc.patch_embed)


def test_unknown_objective_is_a_config_error():
    cfg = make_cfg()
    cfg.objective.name = "dvae"
    with pytest.raises(ConfigError, match="dvae"):
        forward_flops(cfg)


@pytest.mark.parametrize(
    "name,precision,peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H20", "bf16", 148.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-PCIE-40GB", "fp16", 312.0),
        ("NVIDIA A10G", "bf16", 70.0),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("Tesla V100-SXM2-32GB", "fp16", 125.0),
        ("Tesla V100-SXM2-32GB", "bf16", None),  # no bf16 tensor cores: no MFU rather than a wrong one
        ("cpu", "bf16", None),
        ("Some Future Accelerator", "bf16", None),
    ],
)
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_peak_override_and_labels():
    assert peak_tflops("cpu", "bf16", override=1.5) == 1.5
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", override=280.0) == 280.0
    assert known_device("NVIDIA A100-SXM4-80GB") == "A100"  # not the A10 row, though "a10" is a substring
    assert known_device("NVIDIA GH200 480GB") == "H200 SXM"
    assert known_device("cpu") is None


def test_mfu():
    # 1000 images/s x 100 GFLOP = 100 TFLOP/s on a 312 TFLOP/s device
    assert mfu(1000.0, 100e9, 312.0) == pytest.approx(100 / 312)
    assert mfu(1000.0, 100e9, None) is None


@pytest.mark.parametrize("name,mask", [("simmim", 0.6), ("data2vec", 0.5)])
def test_other_objectives_forward_matches_counted(name, mask):
    """The training forward of SimMIM and data2vec (the teacher's forward included) against the counter."""
    torch.manual_seed(0)
    cfg = make_cfg("nano", 32, 4, mask)
    cfg.objective.name = name
    cfg.objective.mask = "random"
    cfg.objective.target_layers = 2
    model = build_objective(cfg).train()
    images = torch.randn(2, 3, 32, 32)
    fc = forward_flops(cfg)
    assert counted(lambda: model(images)) == 2 * (fc.forward + fc.no_grad)
