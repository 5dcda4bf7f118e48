"""Gradient norms: per tensor, safe from overflow, and summed over the shards
of FSDP2's sharded tensors.

Used for the priorities of the buffer (step 5 of Adam+CM's Alg. 1,
p_t = ‖g_t‖₂) and for the radius of SAM's perturbation.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def squared_norms(tensors: Sequence[Tensor], shard_groups: Sequence | None = None) -> list[float]:
    """‖t‖² of every tensor, as host floats, read from the device in one
    transfer; a sharded tensor (a DTensor of FSDP2) gives the squared norm of
    the whole tensor, its shards' summed with one all-reduce for all of them.
    With ``shard_groups``, ``tensors`` are already local shards and
    ``shard_groups`` their process groups (see :func:`local_view`).

    The norms are taken by ``torch._foreach_norm`` in the tensors' precision
    (float32 at least): one fast pass. A float32 sum of squares overflows for
    finite elements above about 1.8e19, so a norm that comes out infinite or
    NaN is taken again in float64 for that tensor alone (rare, hence cheap);
    one that is still not finite comes from a NaN or Inf element. The squares
    are formed in float64, where they cannot overflow.
    """
    if shard_groups is None:
        local = [local_view(t) for t in tensors]
        views, groups = [t for t, _ in local], [g for _, g in local]
    else:
        views, groups = list(tensors), list(shard_groups)
    if not views:
        return []
    norms = torch.empty(len(views), dtype=torch.float64, device=views[0].device)
    for dtype in (torch.float32, torch.float64):
        idx = [i for i, t in enumerate(views) if (t.dtype == torch.float64) == (dtype == torch.float64)]
        if idx:
            part = torch._foreach_norm([views[i] for i in idx], 2, dtype=dtype)
            norms[idx] = torch.stack(list(part)).to(torch.float64)
    values = reduce_shards(norms.square(), groups).tolist()
    suspect = [i for i, v in enumerate(values) if not math.isfinite(v) and views[i].dtype != torch.float64]
    if suspect:
        again = torch.stack([torch.linalg.vector_norm(views[i], dtype=torch.float64) for i in suspect])
        again = reduce_shards(again.square(), [groups[i] for i in suspect]).tolist()
        for i, v in zip(suspect, again):
            values[i] = v
    return values


def all_reduce_sum(values: Tensor, group) -> Tensor:
    """Sum ``values`` over the ranks of ``group`` (one collective)."""
    import torch.distributed as dist

    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def reduce_shards(values: Tensor, groups: Sequence) -> Tensor:
    """Sum, over the ranks, the entries of the 1-D ``values`` whose tensor is
    sharded (its entry of ``groups`` is a process group, see :func:`local_view`);
    unsharded entries stay as they are. One all-reduce for all of them: FSDP2
    shards every tensor over the same mesh."""
    group = next((g for g in groups if g is not None), None)
    if group is None:
        return values
    mask = torch.tensor([g is not None for g in groups], device=values.device)
    values = values.clone()
    values[mask] = all_reduce_sum(values[mask].contiguous(), group)
    return values


def local_view(t: Tensor) -> tuple[Tensor, object | None]:
    """(the tensor this rank holds, the process group it is sharded over).

    A plain tensor (single process, or DDP, where gradients arrive already
    averaged) is its own view with no group. A DTensor from FSDP2's
    ``fully_shard`` on a 1-D mesh gives its local shard and the mesh's group,
    over which its squared norm must be summed."""
    if type(t) in (Tensor, torch.nn.Parameter) or not _DTENSOR:
        return t, None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return t, None
    placements = t.placements
    if all(isinstance(pl, Replicate) for pl in placements):
        return t.to_local(), None
    if len(placements) != 1 or not isinstance(placements[0], Shard):
        raise NotImplementedError(f"cl_cm optimizers support DTensor parameters sharded on a 1-D mesh "
                                  f"(FSDP2's fully_shard), not placements {placements}")
    return t.to_local(), t.device_mesh.get_group()


_DTENSOR = torch.distributed.is_available()
