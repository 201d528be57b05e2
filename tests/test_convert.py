"""Checkpoint conversion: ZeRO 0-3 consolidation against the engine's own weights, and every format
checked by the library that will load it (timm strict load + features, transformers clean load + loss,
the reference MAE's names), round trips, refusals (incomplete checkpoints, unsafe pickles).

The slow tests share one torchrun launch (tests/ds_checkpoint_helper.py) that trains and saves six
short runs: ZeRO 0-3 in fp32, and ZeRO 0 and 3 in bf16.
"""

from __future__ import annotations

import argparse
import fractions
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from largemim.config import ModelConfig, ObjectiveConfig
from largemim.convert import (
    IncompleteCheckpointError,
    MIMArch,
    UnsafePickleError,
    apply_init_weights,
    consolidate,
    load_init_weights,
    load_torch,
)
from largemim.convert.hf_vitmae import export_hf, import_hf
from largemim.convert.official_mae import load_official, save_official, to_official
from largemim.convert.timm_format import export_timm
from largemim.convert.weights_io import read_metadata, save_weights
from largemim.models.pos_embed import sincos_2d

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "ds_checkpoint_helper.py"
RUNS = ["0", "1", "2", "3", "0:bf16", "3:bf16"]


def _cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _noise(n: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, length, generator=torch.Generator().manual_seed(seed))


def _tiny_arch(mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> MIMArch:
    model = ModelConfig(size="nano", img_size=32, patch_size=8, decoder_dim=64, decoder_depth=2, decoder_heads=4)
    return MIMArch(model, ObjectiveConfig(mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss), (0.5,) * 3, (0.25,) * 3)


def _tiny_model(arch: MIMArch) -> torch.nn.Module:
    """A nano MAE whose every tensor differs from every other (a swapped name would show)."""
    torch.manual_seed(0)
    model = arch.build("cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Formats, on a randomly initialised nano MAE (fast).


@pytest.mark.parametrize("mask_ratio,norm_pix_loss", [(0.75, True), (0.5, False)])
def test_hf_export_loads_clean_and_gives_same_loss(tmp_path, mask_ratio, norm_pix_loss):
    transformers = pytest.importorskip("transformers")
    arch = _tiny_arch(mask_ratio, norm_pix_loss)
    model = _tiny_model(arch)
    export_hf(model.state_dict(), arch, tmp_path / "hf")
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    hf.eval()
    x, noise = _images(), _noise(3, 16)
    with torch.no_grad():
        ours, theirs = model(x, noise=noise), hf(pixel_values=x, noise=noise)
    assert torch.equal(ours["mask"], theirs.mask)
    assert ours["mask"].sum().item() == 3 * (16 - int(16 * (1 - mask_ratio)))
    torch.testing.assert_close(theirs.logits, ours["pred"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.loss, ours["loss"], rtol=1e-5, atol=1e-6)


def test_hf_round_trip_is_lossless(tmp_path):
    arch = _tiny_arch()
    sd = _tiny_model(arch).state_dict()
    export_hf(sd, arch, tmp_path / "hf")
    back, arch_back = import_hf(tmp_path / "hf")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert arch_back.model == arch.model and arch_back.objective == arch.objective


def test_timm_export_loads_strict_and_gives_same_features(tmp_path):
    arch = _tiny_arch()
    model = _tiny_model(arch)
    summary = export_timm(model.state_dict(), arch, tmp_path / "timm")
    vit = timm.create_model(summary["timm_model"], pretrained=False, **summary["timm_kwargs"])
    vit.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    from_folder = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert from_folder.num_classes == 0 and tuple(from_folder.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    x = _images()
    with torch.no_grad():
        ours = model.encoder(x)
        torch.testing.assert_close(vit.eval().forward_features(x), ours)
        torch.testing.assert_close(from_folder.eval().forward_features(x), ours)


def _timm_vit(**kwargs) -> torch.nn.Module:
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4) | kwargs
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def test_timm_vit_with_head_imports_as_encoder(tmp_path):
    vit = _timm_vit(num_classes=10)
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")
    weights = load_init_weights(tmp_path / "vit.pth")
    assert all(k.startswith("encoder.") for k in weights.state_dict)
    assert "encoder.head.weight" not in weights.state_dict
    mae = weights.arch.build("cpu").eval()
    missing = apply_init_weights(mae, weights)
    assert missing and all(not k.startswith("encoder.") for k in missing)  # decoder left at its init
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(mae.encoder(x), vit.forward_features(x))
    bigger = load_init_weights(tmp_path / "vit.pth", img_size=48)  # 4x4 -> 6x6 patch grid
    assert bigger.state_dict["encoder.pos_embed"].shape == (1, 37, 64) and bigger.arch.model.img_size == 48


@pytest.mark.parametrize("kwargs,reason", [({"reg_tokens": 4}, "register tokens"), ({"global_pool": "avg"}, "avg")])
def test_timm_vit_features_largemim_lacks_are_refused(tmp_path, kwargs, reason):
    from safetensors.torch import save_file

    save_file(_timm_vit(num_classes=0, **kwargs).state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match=reason):
        load_init_weights(tmp_path / "vit.safetensors")


def _reference_mae_names(depth: int, decoder_depth: int) -> set[str]:
    """Parameter names of facebookresearch/mae models_mae.MaskedAutoencoderViT."""
    block = [
        f"{m}.{p}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    ]
    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    names |= {f"blocks.{i}.{b}" for i in range(depth) for b in block}
    names |= {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight"}
    names |= {"decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    return names | {f"decoder_blocks.{i}.{b}" for i in range(decoder_depth) for b in block}


def test_official_mae_round_trip_is_lossless(tmp_path):
    arch = _tiny_arch()
    sd = _tiny_model(arch).state_dict()
    save_official(sd, tmp_path / "mae.pth")
    raw = torch.load(tmp_path / "mae.pth", weights_only=True)
    assert set(raw["model"]) == _reference_mae_names(depth=4, decoder_depth=2)
    back, arch_back = load_official(tmp_path / "mae.pth", decoder_heads=4)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert arch_back.model == arch.model
    # As the reference code's own training checkpoints look: optimizer state, epoch, argparse args.
    torch.save({**raw, "optimizer": {"state": {}}, "epoch": 7, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "r.pth")
    back, arch_back = load_official(tmp_path / "r.pth", decoder_heads=4)
    assert arch_back.info["epoch"] == 7 and all(torch.equal(back[k], sd[k]) for k in sd)


def test_official_encoder_only_release_initialises_the_encoder(tmp_path):
    arch = _tiny_arch()
    model = _tiny_model(arch)
    official = to_official(model.state_dict())
    encoder_only = {k: v for k, v in official.items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": encoder_only}, tmp_path / "mae_pretrain.pth")
    weights = load_init_weights(tmp_path / "mae_pretrain.pth")
    fresh = arch.build("cpu")
    missing = apply_init_weights(fresh, weights)
    assert set(missing) == {k for k in model.state_dict() if not k.startswith("encoder.")}
    assert all(torch.equal(fresh.encoder.state_dict()[k], v) for k, v in model.encoder.state_dict().items())


def test_folder_exports_replace_the_previous_export_whole_or_not_at_all(tmp_path, monkeypatch):
    import largemim.convert.hf_vitmae as hf_vitmae

    arch, out = _tiny_arch(), tmp_path / "hf"
    sd = _tiny_model(arch).state_dict()
    export_hf(sd, arch, out)
    first = (out / "model.safetensors").read_bytes()
    (out / "preprocessor_config.json").write_text("{}")  # to be replaced, like the rest

    def disk_full(path, obj):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the weights are written, then the config fails
        m.setattr(hf_vitmae, "dump_json", disk_full)
        with pytest.raises(OSError, match="No space"):
            export_hf({k: v * 2 for k, v in sd.items()}, arch, out)
    assert (out / "model.safetensors").read_bytes() == first and (out / "preprocessor_config.json").is_file()
    export_hf(sd, replace(arch, mean=None, std=None), out)  # no normalisation: no preprocessor config
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial or previous folder left
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files this export does not write \\(notes.txt\\)"):
        export_hf(sd, arch, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_consolidation_keeps_integer_buffers_exact():
    """A BEiT's tokenizer id is an int64 hash: an fp32 round trip would change it (and the tokenizer check)."""
    from largemim.convert.consolidate import _fp32

    tokenizer_id = torch.tensor(4949498559009812781)
    assert _fp32(tokenizer_id).item() == 4949498559009812781
    assert _fp32(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32


def test_file_needing_full_unpickle_is_refused_without_trust(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": {"w": torch.ones(2)}, "note": fractions.Fraction(1, 3)}, path)
    with pytest.raises(UnsafePickleError, match=r"fractions\.Fraction.*--trust-pickle"):
        load_torch(path)
    assert load_torch(path, trust_pickle=True)["note"] == fractions.Fraction(1, 3)
    assert _cli()(["import", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()


def test_weights_missing_what_the_architecture_is_read_from_are_a_named_error(tmp_path, capsys):
    """A partial or foreign state dict is a message naming the missing tensors, not a KeyError traceback."""
    from safetensors.torch import save_file

    partial = {"decoder_embed.weight": torch.zeros(16, 8), "mask_token": torch.zeros(1, 1, 16)}  # decoder only
    save_file(partial, tmp_path / "partial.safetensors")
    assert _cli()(["import", str(tmp_path / "partial.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    assert "lack encoder.patch_embed.proj.weight" in capsys.readouterr().err
    timm_like = {"cls_token": torch.zeros(1, 1, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}
    save_file(timm_like, tmp_path / "nopos.safetensors")
    assert _cli()(["import", str(tmp_path / "nopos.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    assert "no pos_embed" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------------------------------------------
# Real DeepSpeed checkpoints (one torchrun launch for the module).


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds_runs")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER),
           str(out), "--runs", *RUNS]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Warning" not in ln]
        pytest.fail("checkpoint helper failed:\n" + "\n".join(lines[-40:]))
    return out


@pytest.mark.slow
def test_every_checkpoint_file_is_synced_before_it_counts(runs):
    """Each rank fsyncs the files its engine wrote, and the folder, before the COMPLETE marker is written: a
    power cut after the marker (and the pruning of older checkpoints) must not leave torn shards behind it.
    DeepSpeed's own save is a bare torch.save."""
    synced = {line for f in runs.glob("fsynced_rank*.txt") for line in f.read_text().split()}
    for run in RUNS:
        stage, _, precision = run.partition(":")
        folder = runs / (f"zero{stage}" if not precision else f"zero{stage}_{precision}") / "checkpoints/step_00000002"
        files = sorted(p for p in folder.iterdir() if p.is_file())
        assert len(files) >= 2 and (folder / "COMPLETE") in files, files
        # the marker is synced as COMPLETE.tmp, then renamed (write_atomic)
        unsynced = [p.name for p in files if not {str(p.resolve()), f"{p.resolve()}.tmp"} & synced]
        assert not unsynced and str(folder.resolve()) in synced, (run, unsynced)


def _engine_dtypes(run: Path) -> dict[str, str]:
    with safe_open(str(run / "engine_params.safetensors"), "pt") as f:
        return json.loads(f.metadata()["dtypes"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_consolidate_equals_engine_weights(runs, stage):
    run = runs / f"zero{stage}"
    engine = load_file(run / "engine_params.safetensors")
    dtypes = set(_engine_dtypes(run).values())
    assert dtypes == {"torch.float32"}, (
        f"an fp32 run's engine holds {dtypes} weights: engine.build_model passes both a config and dtype= to "
        "deepspeed.zero.Init, and DeepSpeed 0.19.8 then ignores the dtype and picks bf16 on a CPU"
    )
    sd, arch = consolidate(run)
    assert sd.keys() == engine.keys()
    assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], engine[k]) for k in sd)
    # Frozen sin-cos embeddings come through (ZeRO-1's shards lack them) with their exact values.
    assert torch.equal(sd["encoder.pos_embed"][0], sincos_2d(128, 8))
    assert torch.equal(sd["decoder_pos_embed"][0], sincos_2d(128, 8))
    assert arch.model.size == "micro" and arch.info["zero_stage"] == stage and arch.info["step"] == 2
    # Trained: every trainable tensor moved away from a fresh model's.
    fresh = arch.build("cpu").state_dict()
    assert all(not torch.equal(sd[k], fresh[k]) for k in sd if "pos_embed" not in k)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_consolidate_16bit_run_gives_fp32_masters(runs, stage):
    """The engine holds bf16 weights; consolidation gives the fp32 masters, which round to them."""
    engine = load_file(runs / f"zero{stage}_bf16" / "engine_params.safetensors")  # bf16 values, stored as fp32
    assert set(_engine_dtypes(runs / f"zero{stage}_bf16").values()) == {"torch.bfloat16"}
    sd, _ = consolidate(runs / f"zero{stage}_bf16")
    assert sd.keys() == engine.keys()
    assert all(torch.equal(sd[k].bfloat16().float(), engine[k]) for k in sd)
    assert any(not torch.equal(sd[k], engine[k]) for k in sd)  # more precision than the bf16 copy
    # the frozen sin-cos tables have no fp32 master: put back exactly, not as their bf16 rounding
    assert torch.equal(sd["encoder.pos_embed"][0], sincos_2d(128, 8))
    assert torch.equal(sd["decoder_pos_embed"][0], sincos_2d(sd["decoder_pos_embed"].shape[-1], 8))


@pytest.mark.slow
def test_cli_exports_a_trained_run(runs, tmp_path):
    main, run = _cli(), runs / "zero3"
    sd, arch = consolidate(run)
    assert main(["consolidate", str(run), str(tmp_path / "mae.safetensors")]) == 0
    assert main(["consolidate", str(run / "checkpoints" / "step_00000002"), str(tmp_path / "mae.pt")]) == 0
    from_file = load_file(tmp_path / "mae.safetensors")
    from_pt = torch.load(tmp_path / "mae.pt", weights_only=True)
    assert all(torch.equal(from_file[k], sd[k]) and torch.equal(from_pt[k], sd[k]) for k in sd)
    assert read_metadata(tmp_path / "mae.safetensors").model == arch.model == read_metadata(tmp_path / "mae.pt").model

    model = arch.build("cpu").eval()
    model.load_state_dict(sd, strict=True)
    x, noise = _images(), _noise(3, 64)
    assert main(["to-timm", str(tmp_path / "mae.safetensors"), str(tmp_path / "timm")]) == 0
    vit = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), model.encoder(x))

    transformers = pytest.importorskip("transformers")
    assert main(["to-hf", str(run), str(tmp_path / "hf")]) == 0
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        ours, theirs = model(x, noise=noise), hf.eval()(pixel_values=x, noise=noise)
    torch.testing.assert_close(theirs.loss, ours["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.logits, ours["pred"], rtol=1e-5, atol=1e-5)

    # Refused: one rank's DeepSpeed file as weights, a --config that contradicts the stored architecture,
    # and weights that do not fit the architecture they are exported as.
    step = run / "checkpoints" / "step_00000002"
    assert main(["to-hf", str(step / "zero_pp_rank_0_mp_rank_00_model_states.pt"), str(tmp_path / "x")]) == 2
    other = yaml.safe_load((run / "config.yaml").read_text())
    other["model"]["decoder_dim"] = 2 * other["model"]["decoder_dim"]
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    assert main(["to-hf", str(run), str(tmp_path / "x"), "--config", str(tmp_path / "other.yaml")]) == 2
    save_weights(sd, tmp_path / "bare.safetensors")  # no architecture stored: --config is the only one
    assert main(["to-hf", str(tmp_path / "bare.safetensors"), str(tmp_path / "x"), "--config",
                 str(tmp_path / "other.yaml")]) == 2  # fmt: skip
    assert not (tmp_path / "x").exists()
    assert main(["to-hf", str(tmp_path / "bare.safetensors"), str(tmp_path / "x"), "--config",
                 str(run / "config.yaml")]) == 0  # fmt: skip
    assert main(["to-hf", str(tmp_path / "bare.safetensors"), str(tmp_path / "y")]) == 2  # no architecture known
    assert main(["to-official", str(tmp_path / "bare.safetensors"), str(tmp_path / "bare.pth")]) == 0  # needs none

    assert main(["to-official", str(tmp_path / "mae.pt"), str(tmp_path / "mae.pth")]) == 0
    out = tmp_path / "back.safetensors"
    assert main(["import", str(tmp_path / "mae.pth"), str(out)]) == 2  # decoder not MAE's 512: heads unknown
    assert main(["import", str(tmp_path / "mae.pth"), str(out), "--decoder-heads", "4"]) == 0
    assert main(["to-hf", str(tmp_path / "mae.pth"), str(tmp_path / "hf_from_pth")]) == 2  # the same: heads unknown
    assert main(["to-hf", str(tmp_path / "mae.pth"), str(tmp_path / "hf_from_pth"), "--decoder-heads", "4"]) == 0
    back = load_file(out)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert read_metadata(out).model == arch.model


@pytest.mark.slow
def test_init_from_a_run_folder(runs):
    weights = load_init_weights(runs / "zero1")
    model = weights.arch.build("cpu")
    assert apply_init_weights(model, weights) == []
    engine = load_file(runs / "zero1" / "engine_params.safetensors")
    assert all(torch.equal(v, engine[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_incomplete_checkpoints_are_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "zero3", run)
    folder = run / "checkpoints" / "step_00000002"
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(IncompleteCheckpointError, match="missing: zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        consolidate(run)
    assert _cli()(["consolidate", str(run), str(tmp_path / "x.safetensors")]) == 2
    (folder / "COMPLETE").unlink()
    with pytest.raises(IncompleteCheckpointError, match="step_00000002 lack the COMPLETE marker"):
        consolidate(run)
    with pytest.raises(IncompleteCheckpointError, match="no COMPLETE marker"):
        consolidate(folder)


class _RunsCode:
    """A pickle that makes a folder when it is loaded: stands for code in a file nobody checked."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.slow
def test_conversion_refuses_what_would_be_wrong_or_unsafe(runs, tmp_path, capsys):
    """Review findings: each of these exited 0 with a wrong or partial result, ran unchecked pickles, or
    failed only after the long merge."""
    main, run = _cli(), tmp_path / "run"
    shutil.copytree(runs / "zero3", run)
    folder = run / "checkpoints" / "step_00000002"
    sd, arch = consolidate(run)

    # A stray DeepSpeed-like file beside the shards: zero_to_fp32 globs and fully unpickles every
    # *_optim_states.pt; consolidation shows it only the checked files.
    marker = tmp_path / "code_ran"
    torch.save({"x": _RunsCode(marker)}, folder / "stray_optim_states.pt")
    again, _ = consolidate(run)
    assert not marker.exists()
    assert all(torch.equal(again[k], sd[k]) for k in sd)

    # An output name it cannot write is refused before the merge; so is a --config that contradicts the
    # checkpoint's own architecture (it used to replace it silently).
    assert main(["consolidate", str(run), str(tmp_path / "no_suffix")]) == 2
    assert "unknown weights format" in capsys.readouterr().err
    other = yaml.safe_load((run / "config.yaml").read_text())
    other["objective"]["mask_ratio"] = 0.5  # same shapes, different model
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    assert (
        main(["consolidate", str(run), str(tmp_path / "c.safetensors"), "--config", str(tmp_path / "other.yaml")]) == 2
    )
    assert "differs from it (objective.mask_ratio: 0.75 vs 0.5)" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()

    # Weights missing a tensor: to-hf and to-official wrote exports that loaded with random values there.
    partial = {k: v for k, v in sd.items() if k not in ("decoder_norm.weight", "encoder.blocks.1.mlp.fc2.weight")}
    save_weights(partial, tmp_path / "partial.safetensors", arch)
    for cmd, out in (("to-hf", "hf"), ("to-official", "o.pth"), ("to-timm", "t")):
        assert main([cmd, str(tmp_path / "partial.safetensors"), str(tmp_path / out)]) == 2, cmd
        assert "missing ['decoder_norm.weight', 'encoder.blocks.1.mlp.fc2.weight']" in capsys.readouterr().err, cmd
        assert not (tmp_path / out).exists()
    encoder = {k: v for k, v in sd.items() if k.startswith("encoder.")}  # an encoder alone is whole
    save_weights(encoder, tmp_path / "encoder.safetensors", arch)
    assert main(["to-official", str(tmp_path / "encoder.safetensors"), str(tmp_path / "enc.pth")]) == 0
    assert main(["to-hf", str(tmp_path / "encoder.safetensors"), str(tmp_path / "hf")]) == 2
    assert "holds an encoder only" in capsys.readouterr().err

    assert main(["to-official", str(run), str(tmp_path / "mae.pth")]) == 0  # the reference format, decoder too

    # to-timm writes a folder or a .safetensors, not a folder named like a torch file.
    assert main(["to-timm", str(run), str(tmp_path / "vit.pth")]) == 2 and not (tmp_path / "vit.pth").exists()
    # --img-size resamples timm weights only; it was ignored for the others.
    assert (
        main(
            [
                "import",
                str(tmp_path / "mae.pth"),
                str(tmp_path / "i.safetensors"),
                "--img-size",
                "48",
                "--decoder-heads",
                "4",
            ]
        )
        == 2
    )
    assert "only timm ViT weights are resampled" in capsys.readouterr().err

    # A truncated shard: inspect said complete; consolidation failed without naming the file.
    shard = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["inspect", str(run)]) == 2
    assert "damaged files: zero_pp_rank_1_mp_rank_00_optim_states.pt" in capsys.readouterr().err
    assert main(["consolidate", str(run), str(tmp_path / "d.safetensors")]) == 2
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt cannot be read" in capsys.readouterr().err


def test_hf_export_of_a_model_without_an_mae_decoder_is_a_named_error(tmp_path, capsys):
    model = ModelConfig(size="nano", img_size=32, patch_size=8)
    arch = MIMArch(model, ObjectiveConfig(name="simmim", mask_ratio=0.6, mask_patch_size=8), (0.5,) * 3, (0.25,) * 3)
    save_weights(arch.build("cpu").state_dict(), tmp_path / "simmim.safetensors", arch)
    assert _cli()(["to-hf", str(tmp_path / "simmim.safetensors"), str(tmp_path / "hf")]) == 2
    assert "holds a simmim model, and to-hf writes ViTMAEForPreTraining" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name", ["mae", "simmim", "data2vec"])
def test_hf_encoder_export_gives_the_encoders_features(tmp_path, name):
    """to-hf --encoder-only: a transformers ViTModel folder of any objective's encoder, loading clean
    (without ViTModel's untrained pooler) and computing the same tokens."""
    transformers = pytest.importorskip("transformers")
    model = ModelConfig(size="nano", img_size=32, patch_size=8, decoder_dim=64, decoder_depth=2, decoder_heads=4)
    objective = ObjectiveConfig(name=name, mask_ratio=0.6 if name != "mae" else 0.75, mask_patch_size=8,
                                min_block_patches=2, target_layers=2)  # fmt: skip
    arch = MIMArch(model, objective, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    mim = arch.build("cpu").eval()
    with torch.no_grad():
        for p in mim.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_weights(mim.state_dict(), tmp_path / "w.safetensors", arch)
    assert _cli()(["to-hf", str(tmp_path / "w.safetensors"), str(tmp_path / "hf"), "--encoder-only"]) == 0
    vit, info = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False,
                                                      output_loading_info=True)  # fmt: skip
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(pixel_values=x).last_hidden_state, mim.encoder(x), rtol=1e-5, atol=1e-5)
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5] * 3 and processor["size"] == {"height": 32, "width": 32}
    # and back, from our folder and from one transformers wrote itself (with its pooler, left out)
    transformers.ViTModel.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "resaved")
    encoder = {k: v for k, v in mim.state_dict().items() if k.startswith("encoder.")}
    for folder in ("hf", "resaved"):
        out = tmp_path / f"{folder}.safetensors"
        assert _cli()(["import", str(tmp_path / folder), str(out)]) == 0
        back = load_file(out)
        assert back.keys() == encoder.keys() and all(torch.equal(back[k], encoder[k]) for k in encoder), folder
