import re

import pytest

from largemim.config import ConfigError, load_config, make_plan, save_resolved

BASE = ["data.shards=/x/train-{0..9}.tar"]


def test_recipe_and_overrides_merge():
    cfg = load_config("largemim/recipes/mae_tiny_cpu.yaml", ["optim.lr=1e-4", "data.crop_scale=[0.3,1.0]"])
    assert cfg.model.size == "micro" and cfg.optim.lr == 1e-4 and cfg.data.crop_scale == (0.3, 1.0)
    assert cfg.data.shards.endswith("{000000..000007}.tar")  # braces survive the override syntax


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("data.shard=x", "data.shard", "data.shards"),
        ("optim.lrr=1", "optim.lrr", "optim.lr"),
        ("modle.size=base", "modle", "model"),
        ("train.step=3", "train.step", "train.steps"),
    ],
)
def test_unknown_key_names_it_and_suggests(override, key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*BASE, override])
    assert f"unknown config key {key!r}" in str(e.value) and repr(suggestion) in str(e.value)


def test_unknown_key_in_recipe_names_the_file(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("optim:\n  weight_decai: 0.1\n")
    with pytest.raises(ConfigError, match=r"'optim.weight_decai' in .*r.yaml; did you mean 'optim.weight_decay'"):
        load_config(bad, BASE)


def test_bad_type_and_missing_value():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, [*BASE, "train.steps=many"])
    with pytest.raises(ConfigError, match="data.shards must be set"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])


def _cfg(*over):
    return load_config(None, [*BASE, "train.steps=100", *over])


def test_derived_checks_name_the_fix():
    with pytest.raises(
        ConfigError, match="img_size 225 is not a multiple of model.patch_size 16; use img_size 224 or 240"
    ):
        make_plan(_cfg("model.img_size=225"), 1, 10_000)
    with pytest.raises(ConfigError, match="mask_ratio=1.0 must be strictly between 0 and 1"):
        make_plan(_cfg("objective.mask_ratio=1.0"), 1, 10_000)
    with pytest.raises(
        ConfigError, match=r"global_batch 4096 != micro_batch 64 x grad_accum 2 x world size 8 = 1024.*grad_accum=8"
    ):
        make_plan(_cfg("train.global_batch=4096", "train.grad_accum=2"), 8, 100_000)
    with pytest.raises(
        ConfigError, match="global_batch 4096 is not divisible by micro_batch 64 x world size 24 = 1536"
    ):
        make_plan(_cfg("train.global_batch=4096"), 24, 100_000)
    with pytest.raises(ConfigError, match="not in the size table.*did you mean 'huge'"):
        make_plan(_cfg("model.size=hug"), 1, 10_000)
    with pytest.raises(ConfigError, match="exactly one of train.steps"):
        make_plan(_cfg("train.epochs=3"), 1, 10_000)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        make_plan(_cfg(), 4, 100)
    with pytest.raises(ConfigError, match=r"run.seed=-1 must be >= 0"):
        make_plan(_cfg("run.seed=-1"), 1, 10_000)


def test_intervals_and_keep_last_are_checked_before_the_run():
    """Review finding: checkpoint.every_steps=0 died after step 1 with a bare ZeroDivisionError, and
    keep_last=0 silently kept one checkpoint."""
    for bad, said in (
        ("checkpoint.every_steps=0", "checkpoint.every_steps=0 must be >= 1"),
        ("log.every_steps=-5", "log.every_steps=-5 must be >= 1"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be >= 1"),
        ("log.image_every_steps=-1", "log.image_every_steps=-1 must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=re.escape(said)):
            make_plan(_cfg(bad), 1, 10_000)
    make_plan(_cfg("log.image_every_steps=0", "eval.every_steps=0", "checkpoint.keep_last=1"), 1, 10_000)


def test_values_that_would_fail_late_are_refused_naming_their_key(tmp_path):
    """Review findings: a wrong-length tuple said "bad value for None"; in_chans != 3, decoder heads that do
    not divide the width, a negative grad_ckpt_every, patch_size 0 and negative steps failed at build time or
    in the first step, or ran silently wrong; the old "bfloat16" JSON key turned an fp32 run into bf16."""
    from largemim.engine import load_ds_json

    with pytest.raises(ConfigError, match=r"bad value for 'optim.betas' .*length 1 does not match"):
        load_config(None, [*BASE, "optim.betas=[0.9]"])
    for bad, said in (
        ("model.in_chans=1", "model.in_chans=1: the data pipeline decodes every image to RGB"),
        (
            "model.decoder_heads=5",
            "model.decoder_dim=512 must be a multiple of 4 (its sin-cos positions) and of model.decoder_heads=5",
        ),
        ("model.decoder_dim=510", "model.decoder_dim=510 must be a multiple of 4"),
        ("model.grad_ckpt_every=-1", "model.grad_ckpt_every=-1 must be >= 0"),
        ("model.patch_size=0", "model.patch_size (0) and model.img_size (224) must be >= 1"),
        ("train.steps=-5", "train.steps (-5) and train.epochs (0.0) must not be negative"),
    ):
        with pytest.raises(ConfigError, match=re.escape(said)):
            make_plan(_cfg(bad), 1, 10_000)
    legacy = tmp_path / "ds.json"
    legacy.write_text('{"bfloat16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match="'bfloat16' -> train.precision"):
        load_ds_json(legacy)


def test_divergence_advice_names_the_setting_in_force():
    """optim.lr, when set, is the learning rate in force (base_lr is then unused); remedies already in
    place are not suggested."""
    from largemim.trainer import divergence_advice

    said = divergence_advice(_cfg("optim.lr=3e-4", "optim.grad_clip=1.0", "train.precision=bf16"))
    assert said == "lower optim.lr (now 0.0003)", said
    said = divergence_advice(_cfg("train.precision=fp16"))
    assert "optim.base_lr (now 0.00015)" in said and "optim.grad_clip" in said and "precision=bf16" in said


def test_grad_accum_is_derived_from_global_batch():
    plan = make_plan(_cfg("train.global_batch=4096", "train.micro_batch=32"), 16, 1_000_000)
    assert plan.grad_accum == 8 and plan.global_batch == 4096


def test_epochs_convert_to_steps_and_lr_scales_with_batch():
    cfg = load_config(
        None, [*BASE, "train.epochs=2.5", "train.warmup_epochs=0.5", "train.micro_batch=32", "train.grad_accum=2"]
    )
    plan = make_plan(cfg, world_size=4, num_samples=10_000)
    assert plan.global_batch == 256
    assert plan.micro_batches_per_epoch == 10_000 // (32 * 4)  # 78 per rank
    assert plan.total_steps == 98  # ceil(2.5 * 78 / 2)
    assert plan.warmup_steps == 20  # round(0.5 * 39)
    assert plan.lr == pytest.approx(1.5e-4)  # base_lr * 256 / 256


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("largemim/recipes/mae_tiny_cpu.yaml", ["train.steps=7"])
    path = save_resolved(cfg, tmp_path)
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "recipe", sorted(p.name for p in __import__("pathlib").Path("largemim/recipes").glob("*.yaml"))
)
def test_every_recipe_loads_and_plans(recipe):
    cfg = load_config(f"largemim/recipes/{recipe}", ["data.shards=/x/train-{0..9}.tar"])
    world = 2 if "cpu" in recipe or "fmnist" in recipe else 8
    if recipe.startswith("beit"):  # stage 2 checks its tokenizer file before anything starts
        # (a path that is missing whatever runs/ holds: a local dVAE run may have written the recipe's file)
        cfg = load_config(
            f"largemim/recipes/{recipe}",
            ["data.shards=/x/train-{0..9}.tar", "objective.tokenizer=/nonexistent/tokenizer.safetensors"],
        )
        with pytest.raises(ConfigError, match=r"objective.tokenizer.*tools/export_tokenizer.py"):
            make_plan(cfg, world, 1_281_167)
        return
    plan = make_plan(cfg, world, 1_281_167)
    assert plan.total_steps > 0 and plan.global_batch % world == 0


def test_compile_under_zero3_is_refused_before_the_model_is_built():
    from largemim.engine import build_model

    cfg = load_config(None, ["data.shards=x", "train.steps=1", "train.compile=true"])
    with pytest.raises(ConfigError, match="train.compile works with ZeRO 0-2"):
        build_model(cfg, {"zero_optimization": {"stage": 3}})


def test_compile_takes_auto_true_false_from_overrides_and_recipes(tmp_path):
    assert load_config(None, ["data.shards=x"]).train.compile == "auto"
    assert load_config(None, ["data.shards=x", "train.compile=True"]).train.compile == "true"
    assert load_config(None, ["data.shards=x", "train.compile=off"]).train.compile == "false"
    assert load_config(None, ["data.shards=x", "train.compile=1"]).train.compile == "true"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  compile: false\n")  # a YAML bool
    assert load_config(recipe, ["data.shards=x"]).train.compile == "false"
    with pytest.raises(ConfigError, match="train.compile='maybe' must be auto, true or false"):
        load_config(None, ["data.shards=x", "train.compile=maybe"])


def test_compile_auto_compiles_only_where_it_was_measured_faster(monkeypatch):
    import largemim.engine as engine

    def choice(*overrides, ds=None):
        cfg = load_config(None, ["data.shards=x", "train.steps=1", *overrides])
        return engine.compile_choice(cfg, ds or {"zero_optimization": {"stage": 2}})

    assert choice() == (False, "no CUDA device")  # this machine
    monkeypatch.setattr(engine, "cuda_wanted", lambda: True)
    assert choice()[0] is True
    assert choice("train.compile=false") == (False, "train.compile=false")
    assert choice("objective.name=simmim") == (False, "objective simmim, not mae")
    assert choice(ds={"zero_optimization": {"stage": 3}}) == (False, "ZeRO-3")
    assert choice("train.autocast=true") == (False, "not DeepSpeed's bf16 mode")
    assert choice("train.precision=fp16") == (False, "not DeepSpeed's bf16 mode")
    assert choice("model.grad_ckpt_every=2") == (False, "activation checkpointing")
    assert choice("train.compile=true", "model.grad_ckpt_every=2")[0] is True


def test_eager_call_runs_a_compiled_module_without_compiling_it_again():
    """The reconstruction pictures call the module in eval mode at another batch size: compiled, that
    would be one more compile (minutes for a ViT-H on a GPU) and a recompile slot."""
    import torch

    from largemim.compiled import eager_call

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = torch.nn.Linear(4, 2)
    m.compile(backend=counting_backend)
    m(torch.ones(3, 4))
    assert len(graphs) == 1
    out = eager_call(m)(torch.ones(5, 4))
    assert len(graphs) == 1 and out.shape == (5, 2)
    plain = torch.nn.Linear(4, 2)
    assert eager_call(plain) is plain


def test_grad_clip_off_reaches_deepspeed_as_off():
    """DeepSpeed clips at 1.0 when gradient_clipping is absent: optim.grad_clip=0 must be written as 0."""
    from deepspeed.runtime.config import get_gradient_clipping

    from largemim.engine import full_ds_config

    for clip, expected in (("0", 0.0), ("2.5", 2.5)):
        cfg = load_config(None, ["data.shards=x", "train.steps=1", f"optim.grad_clip={clip}"])
        ds = full_ds_config(cfg, make_plan(cfg, 1, 1000), {"zero_optimization": {"stage": 2}})
        assert get_gradient_clipping(ds) == expected
    assert get_gradient_clipping({}) == 1.0  # why: DeepSpeed's own default


def test_deepspeeds_synchronising_throughput_timer_is_off_unless_asked_for():
    from deepspeed.utils.config import get_timers_config

    from largemim.engine import full_ds_config

    cfg = load_config(None, ["data.shards=x", "train.steps=1"])
    ds = full_ds_config(cfg, make_plan(cfg, 1, 1000), {"zero_optimization": {"stage": 2}})
    assert get_timers_config(ds).enabled is False
    other = {"zero_optimization": {"stage": 2}, "timers": {}}  # a timers section without "throughput"
    assert get_timers_config(full_ds_config(cfg, make_plan(cfg, 1, 1000), other)).enabled is False
    assert get_timers_config({}).enabled is True and get_timers_config({}).synchronized is True  # DeepSpeed's default
    mine = {"zero_optimization": {"stage": 2}, "timers": {"throughput": {"enabled": True, "synchronized": False}}}
    kept = get_timers_config(full_ds_config(cfg, make_plan(cfg, 1, 1000), mine))
    assert kept.enabled is True and kept.synchronized is False


def test_check_grad_overflow_is_a_bf16_mode_switch():
    from deepspeed.runtime.precision_config import get_bfloat16_config

    from largemim.engine import full_ds_config

    for value in ("true", "false"):
        cfg = load_config(None, ["data.shards=x", "train.steps=1", f"train.check_grad_overflow={value}"])
        ds = full_ds_config(cfg, make_plan(cfg, 1, 1000), {"zero_optimization": {"stage": 2}})
        assert get_bfloat16_config(ds).check_grad_overflow is (value == "true")
    for other in ("train.precision=fp16", "train.autocast=true"):
        with pytest.raises(ConfigError, match="check_grad_overflow=false applies to DeepSpeed's bf16 mode"):
            cfg = load_config(None, ["data.shards=x", "train.steps=1", "train.check_grad_overflow=false", other])
            make_plan(cfg, 1, 1000)


def test_skipping_the_overflow_check_is_refused_where_deepspeed_ignores_it():
    from largemim.engine import build_model

    cfg = load_config(None, ["data.shards=x", "train.steps=1", "train.check_grad_overflow=false"])
    for stage in (0, 3):
        with pytest.raises(ConfigError, match="has an effect under ZeRO-1/2 only"):
            build_model(cfg, {"zero_optimization": {"stage": stage}})


@pytest.mark.parametrize("name,ratio", [("mae", 0.75), ("simmim", 0.6), ("beit", 0.4), ("data2vec", 0.6)])
def test_mask_ratio_defaults_to_the_objectives_own(name, ratio, tmp_path):
    data = "data.shards=x.tar"
    assert load_config(None, [data, f"objective.name={name}"]).objective.mask_ratio == ratio
    assert load_config(None, [data, f"objective.name={name}", "objective.mask_ratio=0.75"]).objective.mask_ratio == 0.75
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"objective:\n  name: {name}\n  mask_ratio: 0.5\n")
    assert load_config(recipe, [data]).objective.mask_ratio == 0.5


def test_shard_counts_that_cannot_be_read_are_one_clear_error(tmp_path):
    """The trainer reads the manifests on rank 0 (and sends them to the others): a set whose epoch length
    needs them and that has none is one message (a config error in the trainer), not a traceback."""
    from largemim.run_counts import CountsUnavailable, run_shard_counts

    with pytest.raises(CountsUnavailable, match="cannot count the samples of shards such as 'pipe:cat /x.tar'"):
        run_shard_counts(["pipe:cat /x.tar"], True, 0, tmp_path)
    assert run_shard_counts(["pipe:cat /x.tar"], False, 0, tmp_path) == {}  # data.num_samples set
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(CountsUnavailable, match="no shard manifest at .*set data.num_samples"):
        run_shard_counts([str(tmp_path / "a.tar")], True, 0, tmp_path)
