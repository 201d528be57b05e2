"""SimMIM, BEiT (dVAE tokenizer + masked token prediction) and data2vec, in-process on nano models:
mask generators, losses against direct computations, the tokenizer file, the EMA teacher, and each
objective overfitting a fixed batch. The DeepSpeed runs are in test_objectives_e2e.py."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from largemim.config import ConfigError, check_objective, load_config, make_plan
from largemim.engine import param_groups
from largemim.objectives import OBJECTIVES, build_objective
from largemim.objectives.beit import BEiT
from largemim.objectives.data2vec import Data2Vec
from largemim.objectives.dvae import DVAE, TokenizerMeta, load_tokenizer, read_tokenizer_meta, save_tokenizer
from largemim.objectives.ema import ema_update, reslice_master
from largemim.objectives.masking import MaskGenerator, block_mask, num_hidden, random_mask, simmim_mask

REPO = Path(__file__).resolve().parents[1]
NANO = ["data.shards=unused", "model.size=nano", "model.img_size=16", "model.patch_size=4"]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(autouse=True)
def one_thread():
    """Small CPU ops on a shared machine run several times faster on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nano_cfg(name: str, *overrides: str):
    cfg = load_config(None, [*NANO, f"objective.name={name}", *overrides])
    check_objective(cfg)
    return cfg


def make_tokenizer(path: Path, img_size: int = 16, patch: int = 4, vocab: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    dvae = DVAE(img_size, patch, 3, vocab, hidden=8)
    meta = TokenizerMeta(vocab, img_size // patch, img_size, patch, 3, 8, MEAN, STD, source="test")
    return save_tokenizer(dvae.state_dict(), meta, path)


# ---------------------------------------------------------------------------------------------------
# Mask generators


def _components(mask: np.ndarray) -> int:
    """4-connected regions of hidden patches."""
    seen, count = np.zeros_like(mask), 0
    for i, j in zip(*np.nonzero(mask), strict=True):
        if seen[i, j]:
            continue
        count += 1
        stack, seen[i, j] = [(i, j)], True
        while stack:
            a, b = stack.pop()
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < mask.shape[0] and 0 <= d < mask.shape[1] and mask[c, d] and not seen[c, d]:
                    seen[c, d] = True
                    stack.append((c, d))
    return count


@pytest.mark.parametrize(
    "kind, grid, ratio, extra",
    [("random", 14, 0.5, {}), ("block", 14, 0.4, {"min_block": 16}), ("block", 14, 0.6, {"min_block": 16}),
     ("block", 8, 0.4, {"min_block": 4}), ("block", 4, 0.6, {"min_block": 16}), ("simmim", 14, 0.6, {"unit": 2}),
     ("simmim", 8, 0.6, {"unit": 2}), ("simmim", 12, 0.75, {"unit": 3})],
)  # fmt: skip
def test_masks_hide_exact_counts_and_are_seeded(kind, grid, ratio, extra):
    gen = MaskGenerator(kind, grid, ratio, **extra)
    masks = gen(300, torch.Generator().manual_seed(1))
    assert masks.dtype == torch.bool and masks.shape == (300, grid * grid)
    assert (masks.sum(1) == gen.num_hidden).all(), masks.sum(1).unique()
    if kind == "simmim":
        assert gen.num_hidden == num_hidden((grid // extra["unit"]) ** 2, ratio) * extra["unit"] ** 2
    else:
        assert gen.num_hidden == grid * grid - int(grid * grid * (1 - ratio))  # MAE's rounding
    assert torch.equal(masks, gen(300, torch.Generator().manual_seed(1)))  # a generator fixes the masks
    assert not torch.equal(masks, gen(300, torch.Generator().manual_seed(2)))
    torch.manual_seed(5)  # without one, torch's global RNG (which the trainer seeds per micro-step)
    a = gen(20)
    torch.manual_seed(5)
    assert torch.equal(a, gen(20))


def test_block_masks_are_blocks():
    """BEiT's shape statistics: few connected regions of hidden patches, nearly all of them inside a
    region, every position hidden sometimes; random masks of the same count look nothing like that."""
    g = torch.Generator().manual_seed(0)
    grid = 14
    for masks, blocky in ((block_mask(400, grid, 0.4, 16, g), True), (random_mask(400, grid, 0.4, g), False)):
        m = masks.view(-1, grid, grid).numpy()
        regions = np.mean([_components(x) for x in m])
        padded = np.pad(m, ((0, 0), (1, 1), (1, 1)))
        neighbours = padded[:, :-2, 1:-1].astype(int) + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
        inside = (neighbours[m] >= 2).mean()
        if blocky:
            assert regions < 2.5 and inside > 0.95, (regions, inside)
            assert m.mean(0).min() > 0.01  # no position is never hidden
        else:
            assert regions > 15 and inside < 0.6, (regions, inside)


def test_block_mask_fills_exactly_when_no_block_fits():
    """On a 4x4 grid no block of >= 16 patches fits (BEiT's blocks are narrower than the grid): the
    hidden patches grow from one seed patch instead, still one region, still the exact count."""
    masks = block_mask(200, 4, 0.6, 16, torch.Generator().manual_seed(0))
    assert (masks.sum(1) == 10).all()
    assert all(_components(x) == 1 for x in masks.view(-1, 4, 4).numpy())


def test_simmim_masks_are_aligned_squares():
    masks = simmim_mask(50, 14, 0.6, 2, torch.Generator().manual_seed(0)).view(50, 7, 2, 7, 2)
    per_square = masks.sum(dim=(2, 4))  # each 2x2 square of patches is hidden or visible as a whole
    assert set(per_square.unique().tolist()) == {0, 4}
    assert ((per_square == 4).sum(dim=(1, 2)) == math.ceil(49 * 0.6)).all()


def test_mask_generator_from_config_and_given_masks():
    cfg = nano_cfg("simmim", "objective.mask_patch_size=8", "objective.mask_ratio=0.6")
    gen = MaskGenerator.from_config(cfg)
    assert (gen.kind, gen.grid, gen.unit) == ("simmim", 4, 2) and gen.num_hidden == 12
    assert MaskGenerator.from_config(nano_cfg("beit", f"objective.tokenizer={__file__}")).kind == "block"
    mask = gen(3)
    assert torch.equal(gen.resolve(3, torch.device("cpu"), mask=mask), mask)
    with pytest.raises(ValueError, match="hiding"):
        gen.resolve(3, torch.device("cpu"), mask=torch.zeros(3, 16, dtype=torch.bool))
    idx = gen.hidden_index(mask)
    assert idx.shape == (3, 12) and torch.equal(idx, torch.stack([m.nonzero().flatten() for m in mask]))


# ---------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.name=simmim", "objective.mask=blocks"], "objective.mask='blocks'"),
        (["objective.name=simmim", "objective.mask_patch_size=6"], "multiple of model.patch_size 4"),
        (["objective.name=mae", "objective.mask=block"], "MAE drops the hidden patches"),
        (["objective.name=dvae", "objective.dvae_temp_end=2.0"], "temperature must fall"),
        (["objective.name=dvae", "eval.train_shards=x"], "no ViT encoder"),
        (["objective.name=beit"], "objective.tokenizer must name"),
        (["objective.name=beit", "objective.tokenizer=/nonexistent.safetensors"], "does not exist"),
        (["objective.name=data2vec", "objective.target_layers=5"], "between 1 and the encoder depth \\(4\\)"),
        (["objective.name=data2vec", "objective.ema_start=0.9999", "objective.ema_end=0.99"], "EMA decay"),
        (["objective.name=data2vec", "objective.target_layers=2", "objective.regression_loss=l1"], "smooth_l1 or mse"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_objective(load_config(None, [*NANO, *overrides]))


def test_recipes_load_and_plan():
    """Every recipe of these objectives passes the config checks (the 224 px ones with their ??? filled)."""
    recipes = sorted(p for p in (REPO / "largemim/recipes").glob("*.yaml") if p.name.split("_")[0] in
                     ("simmim", "beit", "dvae", "data2vec"))  # fmt: skip
    assert len(recipes) == 16  # ViT-B, ViT-L, tiny CPU and the learning run, per objective
    for path in recipes:
        cfg = load_config(path, ["data.shards=x", f"objective.tokenizer={__file__}"])
        check_objective(cfg)
        make_plan(cfg, world_size=8, num_samples=1_281_167)
        assert cfg.objective.name == path.name.split("_")[0]


# ---------------------------------------------------------------------------------------------------
# The registry: every objective builds, on the meta device too, and keeps frozen parts out of the optimizer


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_builds_and_steps(tmp_path, name):
    tok = make_tokenizer(tmp_path / "tok.safetensors")
    cfg = nano_cfg(name, f"objective.tokenizer={tok}", "objective.vocab_size=32", "objective.target_layers=2",
                   "objective.min_block_patches=2", "objective.mask_patch_size=8", "model.decoder_dim=32",
                   "model.decoder_depth=1", "model.decoder_heads=2")  # fmt: skip
    with torch.device("meta"):
        build_objective(cfg, init=False)
    torch.manual_seed(0)
    model = build_objective(cfg)
    out = model(torch.randn(2, 3, 16, 16))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    trainable = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in trainable) == p.requires_grad, n
        if p.requires_grad and not n.endswith("pos_embed"):
            assert p.grad is not None, n
    assert all(isinstance(v, torch.Tensor) for v in out.values())


# ---------------------------------------------------------------------------------------------------
# SimMIM


def test_simmim_loss_is_l1_on_hidden_pixels_only():
    model = build_objective(nano_cfg("simmim", "objective.mask_patch_size=8")).eval()
    images = torch.randn(2, 3, 16, 16)
    mask = MaskGenerator.from_config(nano_cfg("simmim", "objective.mask_patch_size=8"))(2)
    out = model(images, mask=mask)
    pred = out["pred"]
    total, count = 0.0, 0
    for n in range(2):
        for i in range(4):
            for j in range(4):
                if not mask[n, i * 4 + j]:
                    continue
                pix = images[n, :, i * 4 : (i + 1) * 4, j * 4 : (j + 1) * 4].permute(1, 2, 0).reshape(-1)
                total += (pred[n, i * 4 + j] - pix).abs().sum().item()
                count += pix.numel()  # hidden pixels x channels
    assert out["loss"].item() == pytest.approx(total / count, rel=1e-5)
    # the hidden patches' pixels never reach the encoder: change them, the prediction stays
    up = mask.view(2, 1, 4, 4).float().repeat_interleave(4, 2).repeat_interleave(4, 3)
    changed = images + 5.0 * up * torch.randn_like(images)
    assert torch.allclose(model(changed, mask=mask)["pred"], pred, atol=1e-6)
    assert not torch.allclose(model(images + 0.5, mask=mask)["pred"], pred)
    picture = model.picture(images, None, MEAN, STD)  # original | masked | prediction | pasted
    assert picture.shape == (3, 2 * 17 + 1, 4 * 17 + 1) and picture.min() >= 0 and picture.max() <= 1


# ---------------------------------------------------------------------------------------------------
# dVAE and the tokenizer file


def test_dvae_temperature_decays_exponentially_and_resumes_from_its_state():
    cfg = nano_cfg("dvae", "objective.vocab_size=32", "objective.dvae_hidden=8", "objective.dvae_temp_start=1.0",
                   "objective.dvae_temp_end=0.0625", "objective.dvae_temp_steps=100")  # fmt: skip
    model = build_objective(cfg)
    assert model.temperature().item() == pytest.approx(1.0)
    model.after_step(50)
    assert model.temperature().item() == pytest.approx(0.25)  # halfway in log space
    model.after_step(500)
    assert model.temperature().item() == pytest.approx(0.0625)
    model.after_step(25)
    fresh = build_objective(cfg)
    fresh.load_state_dict(model.state_dict())  # the step count is part of the state
    assert fresh.temperature().item() == pytest.approx(0.5)
    out = fresh(torch.randn(4, 3, 16, 16))
    assert set(out) == {"loss", "recon_mse", "kl", "temperature", "codebook_usage", "perplexity"}
    assert all(v.ndim == 0 for v in out.values())
    assert 0 < out["codebook_usage"].item() <= 1 and 1 <= out["perplexity"].item() <= 32
    assert out["kl"].item() >= 0 and out["temperature"].item() == pytest.approx(0.5)
    picture = fresh.picture(torch.randn(3, 3, 16, 16), None, MEAN, STD)
    assert picture.shape[0] == 3 and picture.min() >= 0 and picture.max() <= 1


def test_dvae_builds_no_vit(monkeypatch):
    """The dVAE only borrows the ViT's patch grid: the registry's encoder factory is never called for it."""
    import largemim.objectives as registry

    def no_vit(cfg):
        raise AssertionError("a ViT was built for the dVAE")

    monkeypatch.setattr(registry, "build_encoder", no_vit)
    assert isinstance(build_objective(nano_cfg("dvae")), DVAE)
    with pytest.raises(AssertionError, match="a ViT was built"):
        build_objective(nano_cfg("mae"))


def test_dvae_grid_matches_the_patch_grid():
    for img, patch in ((224, 16), (224, 14), (32, 4)):
        model = DVAE(img, patch, 3, vocab_size=16, hidden=4)
        assert model.tokens(torch.randn(1, 3, img, img)).shape == (1, (img // patch) ** 2)


def test_tokenizer_file_round_trip(tmp_path):
    path = make_tokenizer(tmp_path / "tok.safetensors")
    meta = read_tokenizer_meta(path)
    assert (meta.vocab_size, meta.grid_size, meta.image_size, meta.mean) == (32, 4, 16, MEAN)
    assert Path(str(path) + ".json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    # readable by the others a BEiT stage-2 run may run as (safetensors creates its files 0600)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    loaded, _ = load_tokenizer(path)
    torch.manual_seed(0)
    original = DVAE(16, 4, 3, 32, hidden=8)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(loaded.tokens(x), original.tokens(x))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    (tmp_path / "bad.safetensors").write_bytes(b"not a tokenizer")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        read_tokenizer_meta(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------------------
# BEiT


def test_beit_predicts_frozen_tokenizer_ids_of_hidden_patches(tmp_path):
    tok = make_tokenizer(tmp_path / "tok.safetensors")
    cfg = nano_cfg("beit", f"objective.tokenizer={tok}", "objective.vocab_size=32", "objective.min_block_patches=2",
                   "data.mean=[0.4,0.4,0.4]", "data.std=[0.2,0.2,0.2]")  # fmt: skip
    model: BEiT = build_objective(cfg)
    assert not any("tokenizer" in n for n, _ in model.named_parameters())
    assert [k for k in model.state_dict() if "tokenizer" in k] == ["tokenizer_id"]
    images = torch.randn(2, 3, 16, 16)
    mask = model.masks(2)
    out = model(images, mask=mask)
    dvae, meta = load_tokenizer(tok)
    own = ((images * 0.2 + 0.4) - 0.5) / 0.25  # this run's normalisation -> the tokenizer's
    ids = dvae.tokens(own)
    assert torch.equal(out["ids"], ids)
    x = model.encoder.forward_tokens(
        (model.encoder.patch_embed(images) * ~mask[..., None] + model.mask_token * mask[..., None])
        + model.encoder.pos_embed[:, 1:]
    )[:, 1:]
    logits = model.lm_head(x[mask])
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits, ids[mask]).item(), rel=1e-5)
    assert out["masked_acc"].item() == pytest.approx((logits.argmax(-1) == ids[mask]).float().mean().item())
    picture = model.picture(images, None, cfg.data.mean, cfg.data.std)
    assert picture.shape[0] == 3


def test_beit_targets_ignore_autocast(tmp_path):
    """train.autocast runs the whole forward under bf16 autocast; the frozen tokenizer's ids (the targets)
    must still be its fp32 ones: without the guard about a tenth of them changed (a trained tokenizer)."""
    tok = make_tokenizer(tmp_path / "tok.safetensors", vocab=256)
    cfg = nano_cfg("beit", f"objective.tokenizer={tok}", "objective.vocab_size=256", "objective.min_block_patches=2")
    model: BEiT = build_objective(cfg)
    images = torch.randn(64, 3, 16, 16)
    fp32 = model.tokenizer.tokens(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.tokenizer.tokens(images)
        dvae, _ = load_tokenizer(tok)  # the guard's absence, for contrast: the same call without it differs
        unguarded = dvae.tokens(model.tokenizer._to_own_normalisation(images))
    assert torch.equal(mixed, fp32)
    assert not torch.equal(unguarded, fp32)


def test_beit_refuses_a_tokenizer_that_does_not_fit(tmp_path):
    tok = make_tokenizer(tmp_path / "tok.safetensors", img_size=32, patch=8, vocab=64)  # a 4x4 grid at 32 px
    with pytest.raises(ConfigError, match=r"image size 32 \(model.img_size is 16\).*vocab_size is 32; set it to 64"):
        build_objective(nano_cfg("beit", f"objective.tokenizer={tok}", "objective.vocab_size=32"))
    tok8 = make_tokenizer(tmp_path / "tok8.safetensors", img_size=16, patch=2, vocab=32)
    with pytest.raises(ConfigError, match="8x8 token grid"):
        build_objective(nano_cfg("beit", f"objective.tokenizer={tok8}", "objective.vocab_size=32"))
    tok3 = make_tokenizer(tmp_path / "tok3.safetensors")
    model = build_objective(nano_cfg("beit", f"objective.tokenizer={tok3}", "objective.vocab_size=32"))
    state = model.state_dict()
    make_tokenizer(tok3, seed=1)  # the file changes under a run that is resumed
    resumed = build_objective(nano_cfg("beit", f"objective.tokenizer={tok3}", "objective.vocab_size=32"))
    resumed.load_state_dict(state)
    with pytest.raises(RuntimeError, match="differs from the one this run was trained with"):
        resumed(torch.randn(1, 3, 16, 16))


# ---------------------------------------------------------------------------------------------------
# data2vec


def d2v_cfg(*overrides):
    return nano_cfg("data2vec", "objective.target_layers=2", "objective.min_block_patches=2", *overrides)


@pytest.mark.parametrize("norm", ["layer", "instance"])
def test_data2vec_targets_are_normed_ffn_outputs_of_top_blocks(norm):
    model: Data2Vec = build_objective(d2v_cfg(f"objective.target_norm={norm}"))
    images = torch.randn(2, 3, 16, 16)
    teacher = model.teacher
    x = torch.cat([teacher.cls_token + teacher.pos_embed[:, :1].expand(2, -1, -1), teacher.embed_patches(images)], 1)
    ffn = []
    for block in teacher.blocks:  # timm's Block, written out: FFN output before its residual
        x = x + block.attn(block.norm1(x))
        y = block.mlp(block.norm2(x))
        ffn.append(y[:, 1:])
        x = x + y
    expected = []
    dim = 1 if norm == "instance" else 2  # per channel over the patches, or per patch over the channels
    for y in ffn[-2:]:
        mu, var = y.mean(dim, keepdim=True), y.var(dim, unbiased=False, keepdim=True)
        expected.append((y - mu) / torch.sqrt(var + 1e-5))
    assert torch.allclose(model.targets(images), sum(expected) / 2, atol=1e-5)


@pytest.mark.parametrize("loss", ["smooth_l1", "mse"])
def test_data2vec_loss_is_summed_over_channels_over_sqrt_dim(loss):
    """fairseq's scale: per hidden patch, the sum over the D channels / sqrt(D); then the mean over patches."""
    model: Data2Vec = build_objective(d2v_cfg(f"objective.regression_loss={loss}", "objective.smooth_l1_beta=0.5"))
    pred, target = torch.randn(7, 32), torch.randn(7, 32)
    diff = (pred - target).abs()
    per_value = torch.where(diff < 0.5, 0.5 * diff**2 / 0.5, diff - 0.25) if loss == "smooth_l1" else diff**2
    expected = (per_value.sum(-1) / 32**0.5).mean()
    assert model.regression(pred, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_data2vec_teacher_is_an_ema_of_the_student():
    model: Data2Vec = build_objective(d2v_cfg("objective.ema_start=0.9", "objective.ema_end=0.99",
                                              "objective.ema_steps=10"))  # fmt: skip
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(torch.equal(s, t) for s, t in zip(model.encoder.parameters(), model.teacher.parameters(), strict=True))
    assert [model.ema_decay(s) for s in (0, 5, 10, 20)] == pytest.approx([0.9, 0.945, 0.99, 0.99])
    before = [t.clone() for t in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    model.after_step(5)
    for s, t, t0 in zip(model.encoder.parameters(), model.teacher.parameters(), before, strict=True):
        assert torch.allclose(t, 0.945 * t0 + 0.055 * s, atol=1e-6)
    assert torch.equal(model.ema_master, torch.cat([t.detach().flatten() for t in model.teacher.parameters()]))
    assert int(model.ema_updates) == 1
    state = model.state_dict()  # the teacher and its fp32 master are model state: checkpoints hold them
    assert "ema_master" in state and any(k.startswith("teacher.") for k in state)


def test_weight_decay_groups_see_zero3_partitioned_shapes():
    """Under ZeRO-3 (zero.Init) each rank holds an empty 1-D slice of every parameter, its shape in
    ds_shape: matrices must still be decayed (they had all gone to the no-decay group)."""
    model = build_objective(nano_cfg("mae"))
    whole = param_groups(model, 0.05)
    for p in model.parameters():  # what zero.Init leaves on a rank
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    sliced = param_groups(model, 0.05)
    assert [len(g["params"]) for g in sliced] == [len(g["params"]) for g in whole]
    assert len(whole[0]["params"]) > 0 and whole[0]["weight_decay"] == 0.05 and whole[1]["weight_decay"] == 0.0


def test_data2vec_init_from_encoder_weights_starts_the_teacher_as_the_loaded_student():
    """model.init_from with an encoder-only file (an MAE, timm or HF encoder): the teacher must not stay at
    the random initialisation, and a stale master from a weights file is never loaded."""
    from largemim.convert.init_from import InitWeights, apply_init_weights

    model: Data2Vec = build_objective(d2v_cfg())
    model.after_step(1)  # a used master and count, as in a model that trained
    donor = build_objective(d2v_cfg())
    with torch.no_grad():
        for p in donor.encoder.parameters():
            p.add_(torch.randn_like(p))
    encoder = {f"encoder.{k}": v for k, v in donor.encoder.state_dict().items()}
    stale = {"ema_master": torch.randn(3), "ema_updates": torch.tensor(7)}  # another run's, another shape
    apply_init_weights(model, InitWeights({**encoder, **stale}, None, "test"))
    for s, t, d in zip(model.encoder.parameters(), model.teacher.parameters(), donor.encoder.parameters(), strict=True):
        assert torch.equal(s, d) and torch.equal(t, d)
    assert int(model.ema_updates) == 0  # the master is refilled from the loaded teacher at the first update
    model.after_step(1)
    assert torch.equal(model.ema_master, torch.cat([t.detach().flatten() for t in model.teacher.parameters()]))


def _zero3_slices(wholes: list[torch.Tensor], rank: int, world: int) -> torch.Tensor:
    """What DeepSpeed ZeRO-3 gives ``rank``: each parameter flattened, zero-padded to a multiple of the
    world size, cut into equal parts."""
    parts = []
    for w in wholes:
        part = -(-w.numel() // world)
        parts.append(F.pad(w, (0, part * world - w.numel()))[rank * part : (rank + 1) * part])
    return torch.cat(parts)


@pytest.mark.parametrize("old,new", [(3, 2), (2, 3), (1, 4), (4, 1), (2, 2), (5, 7)])
def test_ema_master_reslices_to_another_world_size(old, new):
    numels = [7, 1, 16, 33, 128, 5]
    wholes = [torch.randn(n) for n in numels]
    saved = [_zero3_slices(wholes, r, old) for r in range(old)]
    for rank in range(new):
        assert torch.equal(reslice_master(saved, numels, rank, new), _zero3_slices(wholes, rank, new))
    with pytest.raises(ValueError, match="another model"):
        reslice_master(saved, [*numels, 3], 0, new)


def test_data2vec_bf16_teacher_moves_through_its_fp32_master():
    """A bf16 teacher updated in bf16 with decay 0.9999 would never change; the fp32 master accumulates."""
    model: Data2Vec = build_objective(d2v_cfg("objective.ema_start=0.9999", "objective.ema_end=0.9999"))
    model.to(torch.bfloat16)
    model.ema_master.data = model.ema_master.data.float()  # buffers stay fp32 under DeepSpeed
    start = [t.clone() for t in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.05)
    for step in range(1, 201):
        model.after_step(step)
    # the master moved every element by (1 - 0.9999^200) x (student - start), about 1e-3; the bf16 teacher
    # is the master rounded
    offset = 0
    for s, t, t0 in zip(model.encoder.parameters(), model.teacher.parameters(), start, strict=True):
        master = model.ema_master[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
        expected = (1 - 0.9999**200) * (s.float() - t0.float())
        assert torch.allclose(master - t0.float(), expected, atol=1e-6, rtol=1e-3)
        assert torch.equal(t, master.to(torch.bfloat16))
    moved = sum(int((t != t0).sum()) for t, t0 in zip(model.teacher.parameters(), start, strict=True))
    assert moved > 0.5 * sum(t.numel() for t in start)  # all but the weights whose bf16 ulp exceeds 2e-3
    naive_moved = 0
    for s, t0 in zip(model.encoder.parameters(), start, strict=True):  # the same EMA in bf16 arithmetic
        naive = t0.clone()
        for _ in range(200):
            naive = 0.9999 * naive + 0.0001 * s
        naive_moved += int((naive != t0).sum())
    assert naive_moved < 0.05 * sum(t.numel() for t in start)  # stands nearly still
    master = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="not fp32"):
        ema_update(master, [], 0.9, first=True)


def test_data2vec_loss_is_the_regression_on_hidden_patches():
    for loss, fn in (("smooth_l1", lambda p, t: F.smooth_l1_loss(p, t, beta=2.0)), ("mse", F.mse_loss)):
        model: Data2Vec = build_objective(d2v_cfg(f"objective.regression_loss={loss}"))
        images, mask = torch.randn(2, 3, 16, 16), model.masks(2)
        out = model(images, mask=mask)
        h = model.encoder.forward_tokens(
            (model.encoder.patch_embed(images) * ~mask[..., None] + model.mask_token * mask[..., None])
            + model.encoder.pos_embed[:, 1:]
        )[:, 1:]
        expected = fn(model.head(h[mask]), model.targets(images)[mask]) * h.shape[-1] ** 0.5  # fairseq's scale
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert out["target_std"].item() > 0.3  # normalised targets: spread across patches, not a constant


# ---------------------------------------------------------------------------------------------------
# Each objective overfits a fixed batch (masks drawn anew every step, as in training)


def _overfit(model, steps: int, lr: float = 2e-3) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    images = torch.randn(8, 3, 16, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(1, steps + 1):
        out = model(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if hasattr(model, "after_step"):
            model.after_step(step)
        losses.append(out["loss"].item())
    return losses, out


def _fell(losses: list[float], factor: float) -> bool:
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    return last < first / factor


def test_simmim_overfits_a_batch():
    torch.manual_seed(0)
    losses, _ = _overfit(build_objective(nano_cfg("simmim", "objective.mask_patch_size=8")), 250)
    assert _fell(losses, 2.5), losses[::25]


def test_dvae_overfits_a_batch():
    torch.manual_seed(0)
    cfg = nano_cfg("dvae", "objective.vocab_size=64", "objective.dvae_hidden=32", "objective.dvae_temp_steps=100")
    losses, out = _overfit(build_objective(cfg), 250)
    assert _fell(losses, 2.5), losses[::25]
    assert out["temperature"].item() == pytest.approx(0.0625)


def test_beit_overfits_a_batch(tmp_path):
    tok = make_tokenizer(tmp_path / "tok.safetensors")
    torch.manual_seed(0)
    cfg = nano_cfg("beit", f"objective.tokenizer={tok}", "objective.vocab_size=32", "objective.min_block_patches=2")
    losses, out = _overfit(build_objective(cfg), 250)
    assert _fell(losses, 4), losses[::25]
    assert out["masked_acc"].item() > 0.8


def test_data2vec_overfits_a_batch():
    """The regression falls well below what predicting zero (the targets' mean) would cost, against a
    teacher that moves all along."""
    torch.manual_seed(0)
    cfg = d2v_cfg("objective.ema_start=0.999", "objective.ema_end=0.9999", "objective.ema_steps=100",
                  "objective.mask_ratio=0.5")  # fmt: skip
    model = build_objective(cfg)
    losses, out = _overfit(model, 300)
    torch.manual_seed(0)
    targets = model.targets(torch.randn(8, 3, 16, 16))  # the batch _overfit trained on
    predict_zero = model.regression(torch.zeros_like(targets), targets).item()
    assert np.mean(losses[-10:]) < 0.5 * predict_zero, (losses[::25], predict_zero)
    assert out["pred_std"].item() > 0.3  # not collapsed to a constant


def test_objective_config_round_trips_through_replace():
    """The new ObjectiveConfig fields are plain dataclass fields (the converters copy configs around)."""
    cfg = d2v_cfg()
    o = replace(cfg.objective, target_layers=3)
    assert o.target_layers == 3 and o.mask_kind() == "block"
