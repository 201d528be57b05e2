"""Checkpoint conversion: consolidate ZeRO checkpoints; export to and import from timm, Hugging Face and
the reference MAE code. One module per format; ``tools/convert_checkpoint.py`` is the command line.

All state dicts here use largemim's MIM names (``encoder.*`` plus the objective's own, e.g. MAE's
``decoder_*``) unless a function's name says otherwise (``to_timm``, ``to_hf``, ``to_official``).
"""

from largemim.convert.arch import MIMArch, infer_arch
from largemim.convert.consolidate import IncompleteCheckpointError, consolidate
from largemim.convert.init_from import InitWeights, apply_init_weights, load_init_weights
from largemim.convert.safe_load import UnsafePickleError, load_torch
from largemim.convert.weights_io import load_weights, save_weights

__all__ = [
    "IncompleteCheckpointError",
    "InitWeights",
    "MIMArch",
    "UnsafePickleError",
    "apply_init_weights",
    "consolidate",
    "infer_arch",
    "load_init_weights",
    "load_torch",
    "load_weights",
    "save_weights",
]
