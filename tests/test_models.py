import numpy as np
import pytest
import timm
import torch

from largemim.models import VIT_SIZES, ViTEncoder
from largemim.models.pos_embed import sincos_2d

TIMM_SIZES = [name for name, s in VIT_SIZES.items() if s.timm_name]


@pytest.mark.parametrize("name", TIMM_SIZES)
def test_every_size_builds_on_meta_and_matches_timm(name):
    size = VIT_SIZES[name]
    patch = 14 if "patch14" in size.timm_name else 16
    with torch.device("meta"):
        ours = ViTEncoder(name, img_size=224, patch_size=patch)
        ref = timm.create_model(size.timm_name, pretrained=False, num_classes=0)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_giant_is_timm_and_eva_vit_g():
    g = VIT_SIZES["giant"]
    assert (g.width, g.depth, g.heads, g.mlp_dim) == (1408, 40, 16, 6144)


def test_patch_and_image_size_are_parameters():
    with torch.device("meta"):
        enc = ViTEncoder("large", img_size=448, patch_size=14)
    assert enc.num_patches == 32 * 32 and enc.pos_embed.shape == (1, 1 + 1024, 1024)


def _mae_reference_sincos(dim, grid):
    """The reference MAE code's get_2d_sincos_pos_embed, restated in numpy for the test."""
    gh, gw = np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_matches_reference_mae_layout():
    ours = sincos_2d(64, 7).numpy()
    assert np.allclose(ours, _mae_reference_sincos(64, 7), atol=1e-6)


def test_encoder_runs_on_any_subset_of_patches():
    enc = ViTEncoder("nano", img_size=16, patch_size=4).eval()
    enc.init_weights()
    tokens = enc.embed_patches(torch.randn(2, 3, 16, 16))
    assert enc.forward_tokens(tokens[:, :5]).shape == (2, 6, 64)
    full = enc.forward_tokens(tokens)
    assert torch.allclose(full, enc(torch.randn(2, 3, 16, 16)) * 0 + full)  # shape-compatible full pass
    assert full.shape == (2, 17, 64)


def test_activation_checkpointing_gives_same_loss_and_grads():
    from largemim.objectives.mae import MAE, MAEDecoderSpec

    torch.manual_seed(0)
    model = MAE(ViTEncoder("nano", 16, 4), MAEDecoderSpec(32, 1, 2))
    images, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    results = []
    for every in (0, 1, 2):
        model.zero_grad()
        model.encoder.set_grad_checkpointing(every)
        loss = model(images, noise=noise)["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads, results[0][1], strict=False))
