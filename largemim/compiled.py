"""Calling a module compiled in place (``nn.Module.compile``, as DeepSpeed's ``engine.compile`` does)
without its compiled code."""

from __future__ import annotations

from torch import nn


def eager_call(module: nn.Module):
    """``module``'s uncompiled call, for forwards off the training path (the reconstruction pictures):
    a call in eval mode at another batch size would compile the module again, taking minutes and a
    recompile slot. Forward hooks still run (ZeRO-3's gathers); an uncompiled module is returned as is."""
    return module._call_impl if getattr(module, "_compiled_call_impl", None) is not None else module
