"""Small helpers shared by the update rules: one list-of-tensors operation, run
either as a single ``torch._foreach_*`` call or as a plain Python loop.

torch's own optimizers keep the same two paths (``foreach=True/False``); the
loop is the readable reference, the foreach call the fast one.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor


def lerp_(xs: list[Tensor], ys: list[Tensor], weight: float, foreach: bool) -> None:
    """x ← x + weight·(y − x) for every pair."""
    if foreach:
        torch._foreach_lerp_(xs, ys, weight)
    else:
        for x, y in zip(xs, ys):
            x.lerp_(y, weight)


def add(xs: list[Tensor], ys: list[Tensor], alpha: float,
        out: list[Tensor] | None = None) -> list[Tensor]:
    """x + alpha·y for every pair, into ``out`` when given (see :class:`Workspace`)."""
    if out is None:
        return [torch.add(x, y, alpha=alpha) for x, y in zip(xs, ys)]
    for x, y, o in zip(xs, ys, out):
        torch.add(x, y, alpha=alpha, out=o)
    return out


class Workspace:
    """Reusable scratch memory for the aggregated momentum or gradient.

    Allocating a model-sized temporary every step costs a page fault per 4 KiB
    on the CPU (about as much as the arithmetic); this keeps one flat tensor per
    (device, dtype) and hands out views. It is not optimizer state: it is never
    saved, and is rebuilt on demand.
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, tensors: list[Tensor]) -> list[Tensor]:
        """Uninitialised tensors shaped like ``tensors`` (views of one buffer per device and dtype)."""
        need: dict[tuple[torch.device, torch.dtype], int] = defaultdict(int)
        for t in tensors:
            need[(t.device, t.dtype)] += t.numel()
        for key, numel in need.items():
            flat = self._flat.get(key)
            if flat is None or flat.numel() < numel:
                self._flat[key] = torch.empty(numel, device=key[0], dtype=key[1])
        offsets: dict[tuple[torch.device, torch.dtype], int] = defaultdict(int)
        out = []
        for t in tensors:
            key = (t.device, t.dtype)
            if not t.is_contiguous():
                out.append(torch.empty_like(t))
                continue
            start = offsets[key]
            out.append(self._flat[key][start:start + t.numel()].view(t.shape))
            offsets[key] = start + t.numel()
        return out

    def clear(self) -> None:
        """Free the scratch memory (it comes back at the next step)."""
        self._flat.clear()


def squared_norms(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """‖t‖² of every tensor, as one 1-D tensor on their device, accumulated in
    ``dtype``: by default float32 at least (float64 for float64 input)."""
    if dtype is None:
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.stack(list(torch._foreach_norm(list(tensors), 2, dtype=dtype))).square()


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


def group_by_step(steps: list[Tensor]) -> dict[float, list[int]]:
    """Indices of the tensors that share a step count.

    A parameter that joins later (``add_param_group``, a growing model) has a
    smaller step than its neighbours, hence different bias corrections.
    """
    groups: dict[float, list[int]] = defaultdict(list)
    for i, step in enumerate(steps):
        groups[float(step)].append(i)
    return groups


def select(xs: list, idx: list[int]) -> list:
    """The items of ``xs`` at ``idx`` (all of them when ``idx`` covers the list)."""
    return xs if len(idx) == len(xs) else [xs[i] for i in idx]


def torch_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], steps: list[Tensor], *, beta1: float, beta2: float,
               lr: float, weight_decay: float, eps: float, foreach: bool, fused: bool,
               momentum_correction: float | None = None) -> None:
    """torch's AdamW kernels (for-loop, foreach or fused), one call per step count.

    With ``momentum_correction=β`` the kernel runs with β1 = 0, step size
    η/(1−β^t) and weight decay wd·(1−β^t): Adam+CM's update of an aggregated
    momentum that was formed outside the kernel (see :func:`cl_cm.adam_cm.adam_cm`).

    ``steps`` are CPU tensors, incremented here; a fused kernel on an
    accelerator gets device copies made by a fill, not a host-to-device copy.
    """
    from torch.optim.adam import adam

    for step, idx in group_by_step(steps).items():
        step_lr, step_wd, step_beta1 = lr, weight_decay, beta1
        if momentum_correction is not None:
            correction = 1.0 - momentum_correction ** (step + 1)
            step_lr, step_wd, step_beta1 = lr / correction, weight_decay * correction, 0.0
        sub = [select(xs, idx) for xs in (params, grads, exp_avgs, exp_avg_sqs, steps)]
        device = sub[0][0].device
        kernel_steps = sub[4]
        if fused and device.type != "cpu":
            kernel_steps = list(torch.full((len(idx),), step, dtype=torch.float32, device=device).unbind())
        adam(sub[0], sub[1], sub[2], sub[3], [], kernel_steps, foreach=foreach, fused=fused,
             decoupled_weight_decay=True, amsgrad=False, beta1=step_beta1, beta2=beta2,
             lr=step_lr, weight_decay=step_wd, eps=eps, maximize=False)
        if kernel_steps is not sub[4]:
            torch._foreach_add_(sub[4], 1.0)
