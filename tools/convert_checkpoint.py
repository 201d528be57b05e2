#!/usr/bin/env python
"""Convert largemim checkpoints to and from other formats.

  consolidate  run folder or checkpoint folder (any ZeRO stage) -> one fp32 MIM state dict
               (.safetensors, or .pt)
  to-timm      encoder -> timm VisionTransformer (folder for timm's local-dir:, or a .safetensors)
  to-hf        whole MAE -> Hugging Face ViTMAEForPreTraining folder; with --encoder-only, the encoder
               of any objective -> a ViTModel folder
  to-official  whole MAE -> the reference MAE code's {'model': state_dict} .pth
  import       reference-MAE .pth, timm ViT weights, a Hugging Face ViTMAE or ViTModel folder -> a
               largemim .safetensors for model initialisation
  inspect      what a run's newest checkpoint (or a checkpoint folder) holds, and whether it is complete

SRC of to-* may be a run folder, a checkpoint folder, or any file the converters read. Torch pickles
are opened weights-only; a file that needs a full unpickle is refused unless --trust-pickle is given.

  python tools/convert_checkpoint.py consolidate runs/mae_base runs/mae_base/model.safetensors
  python tools/convert_checkpoint.py to-timm runs/mae_base exports/vit_base_timm
  python tools/convert_checkpoint.py to-hf runs/mae_base exports/vit_mae_base_hf
  python tools/convert_checkpoint.py import mae_visualize_vit_base.pth weights/mae_base.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # conversion never needs a GPU

from largemim.convert import (  # noqa: E402
    IncompleteCheckpointError,
    MIMArch,
    UnsafePickleError,
    consolidate,
    load_init_weights,
    save_weights,
)
from largemim.convert.weights_io import check_weights_path, describe  # noqa: E402

log = logging.getLogger("convert")


def _source(args, need_arch: bool = True) -> tuple[dict, MIMArch | None]:
    """Weights and architecture of SRC; --config supplies the architecture when SRC does not carry it."""
    weights = load_init_weights(
        args.src, img_size=getattr(args, "img_size", None), trust_pickle=args.trust_pickle,
        heads=getattr(args, "heads", None), decoder_heads=getattr(args, "decoder_heads", None),
    )  # fmt: skip
    arch = _with_config(weights.arch, args)
    if arch is None and need_arch:
        raise ValueError(f"{args.src} does not say its architecture (heads, mask ratio); pass --config "
                         "RUN_DIR/config.yaml or the recipe it was trained with")  # fmt: skip
    log.info("read %s (%s): %s", args.src, weights.source_format, describe(weights.state_dict))
    if arch is not None:
        _check_fits(weights.state_dict, arch, args)
    return weights.state_dict, arch


def _with_config(arch: MIMArch | None, args) -> MIMArch | None:
    """The architecture given by --config where SRC stores none; one that contradicts SRC's is refused."""
    if not args.config:
        return arch
    from largemim.config import load_config

    given = MIMArch.from_config(load_config(args.config), **(arch.info if arch else {}))
    if arch is not None:
        differ = _differences(arch, given)
        if differ:
            raise ValueError(f"{args.src} stores its own architecture, and --config {args.config} differs from "
                             f"it ({'; '.join(differ[:6])}): leave --config out")  # fmt: skip
    return given


def _differences(stored: MIMArch, given: MIMArch) -> list[str]:
    """What the exports write that two architectures disagree on (not training-only settings)."""
    fields = {
        "model": ("size", "patch_size", "img_size", "in_chans", "decoder_dim", "decoder_depth", "decoder_heads"),
        "objective": ("name", "mask_ratio", "norm_pix_loss"),
    }
    out = []
    for section, names in fields.items():
        a, b = getattr(stored, section), getattr(given, section)
        out += [f"{section}.{k}: {getattr(a, k)!r} vs {getattr(b, k)!r}" for k in names
                if getattr(a, k) != getattr(b, k)]  # fmt: skip
    return out


def _check_fits(sd: dict, arch: MIMArch, args) -> None:
    """The weights must have the shapes of the architecture they are exported as: an export under the
    wrong --config would write a folder that fails to load, or loads and computes something else."""
    from largemim.objectives.ema import is_run_state

    try:
        want = {k: tuple(v.shape) for k, v in arch.build("meta").state_dict().items()}
    except Exception as e:  # noqa: BLE001 - e.g. a BEiT whose tokenizer file is not here: nothing to check against
        log.warning("could not build %s to check the weights' shapes against (%s)", arch.model.size, e)
        return
    have = {k: tuple(v.shape) for k, v in sd.items() if not is_run_state(k)}
    extra = sorted(set(have) - set(want))
    bad = [f"{k} {have[k]} vs {want[k]}" for k in have.keys() & want.keys() if have[k] != want[k]]
    # An encoder alone (timm or reference-MAE encoder weights) is a whole source; anything else must be
    # whole, or the export would load with the missing tensors left at random values.
    encoder_only = all(k.startswith("encoder.") for k in have)
    missing = sorted(k for k in set(want) - set(have)
                     if not is_run_state(k) and (k.startswith("encoder.") or not encoder_only))  # fmt: skip
    if extra or bad or missing:
        raise ValueError(f"{args.src} does not fit the architecture it is exported as (model.size="
                         f"{arch.model.size}, patch {arch.model.patch_size}, img {arch.model.img_size}): "
                         f"shape mismatches {bad[:4]}, unexpected {extra[:4]}, missing {missing[:4]}"
                         f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}; is --config the run's "
                         "own, and the file whole?")  # fmt: skip


def cmd_consolidate(args) -> dict:
    check_weights_path(args.out)  # before the merge, which takes minutes for a large model
    sd, arch = consolidate(args.src, trust_pickle=args.trust_pickle)
    arch = _with_config(arch, args)
    if arch is not None:
        _check_fits(sd, arch, args)
    log.info("writing %s", args.out)
    path = save_weights(sd, args.out, arch)
    summary = {"written": str(path), "weights": describe(sd), "bytes": path.stat().st_size}
    if arch is not None:
        summary.update(step=arch.info.get("step"), zero_stage=arch.info.get("zero_stage"), size=arch.model.size)
    return summary


def cmd_to_timm(args) -> dict:
    from largemim.convert.timm_format import export_timm

    sd, arch = _source(args)
    return export_timm(sd, arch, args.out)


def cmd_to_hf(args) -> dict:
    from largemim.convert.hf_vitmae import export_hf, export_hf_encoder

    sd, arch = _source(args)
    if args.encoder_only:
        return export_hf_encoder(sd, arch, args.out)
    if arch.objective.name != "mae" or not any(k.startswith("decoder_") for k in sd):
        what = "an encoder only" if arch.objective.name == "mae" else f"a {arch.objective.name} model"
        raise ValueError(f"{args.src} holds {what}, and to-hf writes ViTMAEForPreTraining, an MAE with its "
                         "decoder: add --encoder-only for a ViTModel of the encoder")  # fmt: skip
    return export_hf(sd, arch, args.out)


def cmd_to_official(args) -> dict:
    from largemim.convert.official_mae import save_official

    sd, _ = _source(args, need_arch=False)  # the reference format is names and tensors only
    return save_official(sd, args.out, epoch=args.epoch)


def cmd_import(args) -> dict:
    weights = load_init_weights(
        args.src, args.img_size, args.trust_pickle, heads=args.heads, decoder_heads=args.decoder_heads
    )
    if args.img_size is not None and not weights.source_format.startswith("timm"):
        have = weights.arch.model.img_size if weights.arch is not None else None
        if have != args.img_size:
            raise ValueError(f"--img-size {args.img_size}: only timm ViT weights are resampled here; {args.src} "
                             f"holds {weights.source_format} weights at {have or 'an unknown size'} px: leave "
                             "--img-size out")  # fmt: skip
    path = save_weights(weights.state_dict, args.out, weights.arch)
    encoder_only = not any(not k.startswith("encoder.") for k in weights.state_dict)
    return {"written": str(path), "source_format": weights.source_format, "weights": describe(weights.state_dict),
            "encoder_only": encoder_only, "use": f"model.init_from={path}"}  # fmt: skip


def cmd_inspect(args) -> dict:
    import zipfile

    from largemim.convert.consolidate import checkpoint_files, resolve_checkpoint

    folder = resolve_checkpoint(args.src)
    files = checkpoint_files(folder)
    damaged = []
    for f in files.model_files + files.optim_files:  # the zip directory at each file's end: a truncated
        try:  # file has none (cheap: the tensor data is not read)
            zipfile.ZipFile(f).close()
        except (zipfile.BadZipFile, OSError) as e:
            damaged.append(f"{f.name} ({e})")
    if damaged:
        raise IncompleteCheckpointError(f"{folder} has damaged files: {', '.join(damaged)}; use an earlier "
                                        "checkpoint of the run")  # fmt: skip
    return {"checkpoint": str(folder), "step": files.step, "zero_stage": files.zero_stage,
            "world_size": files.world_size, "complete": True,
            "files": [f.name for f in files.model_files + files.optim_files],
            "bytes": sum(f.stat().st_size for f in files.model_files + files.optim_files)}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str, out_help: str | None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("src", help="run folder, checkpoint folder, or weights file/folder")
        if out_help:
            p.add_argument("out", help=out_help)
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow a full unpickle of torch files that the weights-only loader refuses "
                            "(can run code from the file: only for files you trust)")  # fmt: skip
        p.set_defaults(fn=fn)
        return p

    p = add("consolidate", cmd_consolidate, "ZeRO checkpoint -> one fp32 MIM state dict",
            "output file: .safetensors (default format) or .pt")  # fmt: skip
    p.add_argument("--config", help="YAML config giving the architecture, if the checkpoint lacks one")
    for name, fn, help_, out_help in [
        ("to-timm", cmd_to_timm, "encoder -> timm VisionTransformer", "output folder, or a .safetensors file"),
        ("to-hf", cmd_to_hf, "MAE -> Hugging Face ViTMAEForPreTraining folder", "output folder"),
        ("to-official", cmd_to_official, "MAE -> reference MAE {'model': ...} .pth", "output .pth file"),
    ]:
        p = add(name, fn, help_, out_help)
        p.add_argument("--config", help="YAML config giving the architecture, if SRC lacks one")
        p.add_argument("--heads", type=int, default=None, help="encoder heads of foreign weights, if the size "
                       "table cannot tell")  # fmt: skip
        p.add_argument("--decoder-heads", type=int, default=None, help="decoder heads of reference-MAE weights "
                       "whose decoder is not MAE's 512 wide")  # fmt: skip
        if name == "to-official":
            p.add_argument("--epoch", type=int, default=None, help="epoch to record in the file")
        if name == "to-hf":
            p.add_argument("--encoder-only", action="store_true",
                           help="write the encoder as a transformers ViTModel (any objective: MAE, SimMIM, BEiT, "
                                "data2vec) instead of ViTMAEForPreTraining")  # fmt: skip
    p = add("import", cmd_import, "reference MAE / timm / Hugging Face weights -> largemim .safetensors",
            "output .safetensors (use it as model.init_from)")  # fmt: skip
    p.add_argument("--img-size", type=int, default=None, help="resample a timm pos_embed to this resolution")
    p.add_argument("--heads", type=int, default=None, help="encoder heads, if the size table cannot tell")
    p.add_argument("--decoder-heads", type=int, default=None, help="decoder heads (MAE's 512-wide decoder: 16)")
    add("inspect", cmd_inspect, "what a checkpoint holds and whether it is complete", None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(relativeCreated)7.0f ms] %(message)s")
    try:
        summary = args.fn(args)
    except (IncompleteCheckpointError, UnsafePickleError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"convert_checkpoint {args.command}: {e}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.time() - t0, 1)
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:>{width}}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
