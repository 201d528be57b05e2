import math

import pytest
import torch

from largemim.models import ViTEncoder
from largemim.objectives.mae import MAE, MAEDecoderSpec, patchify, unpatchify
from largemim.objectives.masking import random_masking_ids


def tiny_mae(**kw):
    torch.manual_seed(0)
    return MAE(ViTEncoder("nano", 32, 4), MAEDecoderSpec(32, 1, 2), **kw)


def test_mask_has_exact_count_and_uniform_positions():
    torch.manual_seed(1)
    noise = torch.rand(4000, 64)
    ids_keep, mask, ids_restore = random_masking_ids(noise, 0.75)
    assert ids_keep.shape == (4000, 16)
    assert (mask.sum(1) == 48).all()  # int(64 * 0.25) = 16 visible
    freq = mask.mean(0)  # every position hidden with probability 0.75
    assert (freq - 0.75).abs().max() < 0.04
    # the kept patches are exactly the smallest-noise ones
    smallest = noise.argsort(1)[:, :16].sort(1).values
    assert torch.equal(ids_keep.sort(1).values, smallest)
    assert torch.equal(torch.gather(mask, 1, ids_keep), torch.zeros_like(ids_keep, dtype=mask.dtype))


def test_noise_fixes_mask_and_loss():
    model = tiny_mae().eval()
    images, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    a, b = model(images, noise=noise), model(images, noise=noise)
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["loss"], b["loss"])
    c = model(images, noise=torch.rand(3, 64))
    assert not torch.equal(a["mask"], c["mask"])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_direct_computation(norm_pix):
    model = tiny_mae(norm_pix_loss=norm_pix).eval()
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    out = model(images, noise=noise)
    # Direct: for each sample and each hidden patch, MSE between prediction and (normalised) pixels.
    p, total, count = 4, 0.0, 0
    for n in range(2):
        for i in range(8):
            for j in range(8):
                idx = i * 8 + j
                if out["mask"][n, idx] == 0:
                    continue
                pix = images[n, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    pix = (pix - pix.mean()) / math.sqrt(pix.var().item() + 1e-6)
                total += ((out["pred"][n, idx] - pix) ** 2).mean().item()
                count += 1
    assert out["loss"].item() == pytest.approx(total / count, rel=1e-5)
    assert out["pred"].shape == (2, 64, 48) and count == 2 * 48


def test_patchify_round_trip():
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3), x)


def test_initialisation_follows_mae():
    model = tiny_mae()
    assert 0.015 < model.encoder.cls_token.std().item() < 0.025
    assert 0.015 < model.mask_token.std().item() < 0.025
    w = model.encoder.patch_embed.proj.weight  # xavier-uniform as a (out, in) linear
    bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.9 * bound
    # linear biases are zero; the patch projection's conv bias keeps torch's default, as in MAE's code
    linear_biases = [n for n, b in model.named_parameters() if n.endswith(".bias") and "patch_embed" not in n]
    assert linear_biases and all(model.get_parameter(n).abs().sum() == 0 for n in linear_biases)
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_only_visible_tokens_enter_the_encoder():
    model = tiny_mae(mask_ratio=0.75)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    model(torch.randn(2, 3, 32, 32))
    assert seen == [1 + 16]  # class token + 25 % of 64 patches


def test_bf16_forward_keeps_fp32_loss():
    model = tiny_mae().to(torch.bfloat16)
    out = model(torch.randn(2, 3, 32, 32))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
