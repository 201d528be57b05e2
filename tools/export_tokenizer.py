#!/usr/bin/env python
"""Write the frozen BEiT tokenizer of a dVAE run (objective.name=dvae): one safetensors file with the
dVAE's fp32 weights and metadata (grid, vocabulary, image size, normalisation), plus the metadata as
JSON beside it. BEiT runs read it with objective.tokenizer=PATH.

  python tools/export_tokenizer.py runs/dvae_vit_base                 # -> runs/dvae_vit_base/tokenizer.safetensors
  python tools/export_tokenizer.py runs/dvae_vit_base/checkpoints/step_00050000 exports/dvae_b16.safetensors

SRC is a run folder (its newest complete checkpoint is used) or a checkpoint folder, written at any
ZeRO stage; the checkpoint is merged into one fp32 state dict by largemim.convert.consolidate.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # exporting never needs a GPU

from largemim.objectives.dvae import TokenizerMeta, save_tokenizer  # noqa: E402

log = logging.getLogger("export_tokenizer")


def export_tokenizer(src: str | Path, out: str | Path | None = None, trust_pickle: bool = False) -> Path:
    """Consolidate the dVAE checkpoint in ``src`` and write its tokenizer file; returns the file's path
    (default: ``tokenizer.safetensors`` in the run folder)."""
    from largemim.convert.consolidate import consolidate, resolve_checkpoint

    folder = resolve_checkpoint(src)
    state_dict, arch = consolidate(folder, trust_pickle=trust_pickle)
    if arch is None:
        raise SystemExit(f"{folder}: no saved config, so the dVAE's shape is unknown")
    if arch.objective.name != "dvae":
        raise SystemExit(f"{folder} is a {arch.objective.name!r} run, not a dVAE (objective.name=dvae)")
    m, o = arch.model, arch.objective
    meta = TokenizerMeta(
        vocab_size=o.vocab_size,
        grid_size=m.img_size // m.patch_size,
        image_size=m.img_size,
        patch_size=m.patch_size,
        in_chans=m.in_chans,
        hidden=o.dvae_hidden,
        mean=tuple(arch.mean or ()),
        std=tuple(arch.std or ()),
        source=f"{folder} (step {arch.info.get('step')})",
    )
    if len(meta.mean) != m.in_chans or len(meta.std) != m.in_chans:
        raise SystemExit(f"{folder}: the saved config has no data.mean/std for {m.in_chans} channels")
    run_dir = folder.parent.parent  # run_dir/checkpoints/step_X
    path = save_tokenizer(state_dict, meta, out or run_dir / "tokenizer.safetensors")
    log.info("wrote %s: %d codes on a %dx%d grid for %d px images", path, meta.vocab_size, meta.grid_size,
             meta.grid_size, meta.image_size)  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="dVAE run folder or checkpoint folder")
    ap.add_argument("out", nargs="?", help="tokenizer file to write (default: SRC_RUN/tokenizer.safetensors)")
    ap.add_argument("--trust-pickle", action="store_true", help="allow checkpoint files that need a full unpickle")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = export_tokenizer(args.src, args.out, args.trust_pickle)
    except (FileNotFoundError, ValueError) as e:
        print(f"export_tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
