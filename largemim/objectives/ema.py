"""An exponential moving average of one module's parameters into a twin (data2vec's teacher), in fp32,
correct whether the parameters are whole (ZeRO 0-2) or partitioned across ranks (ZeRO-3).

Why an fp32 master: a mixed-precision engine casts every parameter, frozen ones included, to bf16 or
fp16, and an EMA step of (1 - 0.9999) x difference is far below half an ulp of a bf16 weight (8
significant bits), so a 16-bit teacher would never move. The average is kept in an fp32 buffer (DeepSpeed
keeps buffers in fp32 and never partitions them) and rounded into the teacher's weights after each update.

Under ZeRO-3 each rank holds a flat, padded slice of every parameter (``param.ds_tensor``): the slice's
bounds depend only on the number of elements, so a student and a teacher parameter of the same shape are
cut identically and each rank updates its own slice with no communication; the master then holds only
this rank's slices (1/N of the teacher) and, being a buffer, is saved in this rank's own model-states
file. A resume at another world size rebuilds each rank's slices from the saved ones
(:func:`reslice_master`). Parameters that ZeRO-3 keeps gathered between steps ("persistent", below
``stage3_param_persistence_threshold``) are re-gathered from the updated slices.

This is the only file of the objectives that touches DeepSpeed's parameter attributes (``ds_id``,
``ds_tensor``, ``ds_status``, ``ds_persist``, ``partition``, ``all_gather``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Buffer names of an EMA teacher's training state that belong to one run's ranks, not to the model: the
# fp32 master (under ZeRO-3, this rank's slices) and its update count. Weight files leave them out; a run
# initialised from weights refills the master from the teacher at its first update.
RUN_STATE = frozenset({"ema_master", "ema_updates"})


def is_run_state(name: str) -> bool:
    """Whether state-dict key ``name`` is one of RUN_STATE (at any depth)."""
    return name.rsplit(".", 1)[-1] in RUN_STATE


def is_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def local_part(p: nn.Parameter) -> torch.Tensor:
    """The elements of ``p`` this rank holds, flat: its ZeRO-3 slice, or the whole parameter."""
    return (p.ds_tensor if is_partitioned(p) else p.data).view(-1)


def local_numel(params: Sequence[nn.Parameter]) -> int:
    return sum(local_part(p).numel() for p in params)


def check_twins(student: nn.Module, teacher: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(student, teacher) parameter pairs, checked to have the same names, shapes and local slices."""
    s, t = list(student.named_parameters()), list(teacher.named_parameters())
    if [(n, p.shape) for n, p in s] != [(n, p.shape) for n, p in t]:
        raise ValueError("the EMA teacher's parameters differ from the student's in names or shapes")
    for (name, ps), (_, pt) in zip(s, t, strict=True):
        if is_partitioned(ps) != is_partitioned(pt) or local_part(ps).shape != local_part(pt).shape:
            raise ValueError(
                f"{name}: the student's local slice {tuple(local_part(ps).shape)} and the teacher's "
                f"{tuple(local_part(pt).shape)} differ; both must be built under the same ZeRO-3 partitioning"
            )
        if getattr(pt, "ds_secondary_tensor", None) is not None or hasattr(local_part(pt), "ds_quant_scale"):
            raise NotImplementedError("EMA teacher with ZeRO++ (hpZ or quantized weights) is not supported")
    return [(ps, pt) for (_, ps), (_, pt) in zip(s, t, strict=True)]


@torch.no_grad()
def ema_update(
    master: torch.Tensor, pairs: Sequence[tuple[nn.Parameter, nn.Parameter]], decay: float, first: bool
) -> None:
    """master <- decay x master + (1 - decay) x student, then teacher <- master (rounded to its dtype).

    ``master`` is the fp32 flat concatenation of the teacher's local parts; ``first`` fills it from the
    teacher (which the objective initialised as a copy of the student) before the first update.
    """
    if master.dtype != torch.float32:
        raise RuntimeError(
            f"the EMA master is {master.dtype}, not fp32: this DeepSpeed casts buffers to the training dtype "
            "(buffer_dtype set, or a DeepSpeed older than the one in requirements.txt); the teacher would not move"
        )
    expected = local_numel([t for _, t in pairs])
    if master.numel() != expected:
        raise RuntimeError(
            f"the EMA master holds {master.numel()} elements but the teacher's local parts have {expected}: the "
            "model was partitioned after it was built (build it under deepspeed.zero.Init for ZeRO-3)"
        )
    offset = 0
    for s, t in pairs:
        tp, sp = local_part(t), local_part(s)
        view = master[offset : offset + tp.numel()]
        offset += tp.numel()
        if first:
            view.copy_(tp)
        view.lerp_(sp.to(device=view.device, dtype=torch.float32), 1.0 - decay)
        tp.copy_(view)
    _regather([t for _, t in pairs])


def full_numel(p: nn.Parameter) -> int:
    """Elements of the whole parameter, partitioned or not."""
    return p.ds_numel if is_partitioned(p) else p.numel()


def reslice_master(saved: Sequence[torch.Tensor], numels: Sequence[int], rank: int, world: int) -> torch.Tensor:
    """This rank's EMA master for ``world`` ZeRO-3 ranks (``world=1``: whole parameters, ZeRO 0-2), from the
    masters that ``len(saved)`` ranks saved (one whole master if the run that saved it was not ZeRO-3).

    ZeRO-3 pads a parameter of ``n`` elements to a multiple of the world size and gives rank ``r`` the
    elements ``[r * p, (r + 1) * p)`` with ``p = ceil(n / world)``; a master is those slices concatenated
    over the parameters in order. Each parameter is put back together from the old slices, then cut again.
    """
    old = len(saved)
    offsets = [0] * old
    out = []
    for n in numels:
        old_part, new_part = -(-n // old), -(-n // world)
        whole = torch.cat([m[o : o + old_part] for m, o in zip(saved, offsets, strict=True)])[:n]
        offsets = [o + old_part for o in offsets]
        piece = whole[rank * new_part : (rank + 1) * new_part]
        out.append(torch.nn.functional.pad(piece, (0, new_part - piece.numel())))
    sizes = [m.numel() for m in saved]
    if offsets != sizes:
        raise ValueError(
            f"the saved EMA masters hold {sizes} elements, but the teacher's parameters split over {old} ranks "
            f"need {offsets}: the checkpoint is of another model"
        )
    return torch.cat(out)


@torch.no_grad()
def load_master(master: torch.Tensor, saved: Sequence[torch.Tensor], teacher: Sequence[nn.Parameter]) -> None:
    """Fill this rank's ``master`` from the masters saved by the ranks of another run (any world size, any
    ZeRO stage), then the teacher's local parts from it (every rank calls this: a collective under ZeRO-3)."""
    rank, world = 0, 1
    partitioned = [p for p in teacher if is_partitioned(p)]
    if partitioned:  # the rank and size of the group DeepSpeed partitions over, which must be the whole world
        group = partitioned[0].ds_process_group
        rank = torch.distributed.get_rank(group=group)
        world = torch.distributed.get_world_size(group=group)
        if world != torch.distributed.get_world_size():
            raise NotImplementedError(
                f"the teacher is partitioned over {world} of {torch.distributed.get_world_size()} ranks (MiCS or "
                "hpZ): restoring its EMA master at another world size is not supported there"
            )
    master.copy_(reslice_master([m.float() for m in saved], [full_numel(p) for p in teacher], rank, world))
    offset = 0
    for t in teacher:
        tp = local_part(t)
        tp.copy_(master[offset : offset + tp.numel()].view_as(tp))
        offset += tp.numel()
    _regather(teacher)


def _regather(teacher: Sequence[nn.Parameter]) -> None:
    """Under ZeRO-3, drop the stale whole copies of teacher parameters that are gathered right now and
    gather the persistent ones again from their updated slices (every rank calls this: a collective)."""
    gathered = [p for p in teacher if is_partitioned(p) and p.ds_status.name == "AVAILABLE"]
    if not gathered:
        return
    gathered[0].partition(param_list=gathered)  # frees the whole copies; the slices already hold the update
    persistent = [p for p in gathered if getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].all_gather(param_list=persistent)
