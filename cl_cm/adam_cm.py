"""Adam with Critical Momenta (Adam+CM).

Malviya, Mordido, Baratin, Harikandeh, Huang, Lacoste-Julien, Pascanu and
Chandar, "Promoting Exploration in Memory-Augmented Adam using Critical
Momenta", TMLR 2024 (arXiv 2307.09638), Algorithm 1.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from . import _kernels
from .buffer import CriticalBufferOptimizer, GroupTensors

SECOND_MOMENTS = ("aggregated", "gradient")


def adam_cm(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
            exp_avg_sqs: list[Tensor], buffer_sums: list[Tensor], state_steps: list[Tensor], *,
            buffer_weight: float, lr: float, beta1: float, beta2: float, eps: float,
            weight_decay: float, second_moment: str = "aggregated", foreach: bool = False,
            fused: bool = False, workspace: list[Tensor] | None = None) -> None:
    r"""Functional Adam+CM update, steps 1–4 of Alg. 1 in Malviya et al. (2024)::

        m_t = β1·m_{t−1} + (1−β1)·g_t
        d_t = m_t + κ·mean(B)                  buffer_weight = κ/|B|, buffer_sums = ΣB
        v_t = β2·v_{t−1} + (1−β2)·d_t²         ("gradient": (1−β2)·g_t²)
        θ_t = θ_{t−1}·(1−η·wd) − η/(1−β1^t) · d_t / (√(v_t/(1−β2^t)) + ε)

    In the aggregated form this is exactly Adam with β1 = 0 applied to d_t, with
    step size η/(1−β1^t); it runs that way, so that torch's for-loop, foreach
    and fused Adam kernels do the arithmetic. ``buffer_weight = 0`` (empty
    buffer, κ = 0) gives d_t = m_t; with ``"gradient"`` it is then AdamW.
    ``workspace``: tensors shaped like ``params`` to hold d_t (else allocated).
    :func:`_compiled_update` is the same update through torch.compile
    (``AdamCM(compiled=True)``).
    """
    if not params:
        return
    kernel = dict(beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, foreach=foreach, fused=fused)
    if second_moment == "gradient":
        _kernels.torch_adam(params, grads, exp_avgs, exp_avg_sqs, state_steps, beta1=beta1, **kernel)
        if buffer_weight:
            _buffer_term_(params, exp_avg_sqs, buffer_sums, state_steps, buffer_weight * lr,
                          beta1, beta2, eps, foreach or fused)
        return
    _kernels.lerp_(exp_avgs, grads, 1.0 - beta1, foreach or fused)
    aggregated = (_kernels.add(exp_avgs, buffer_sums, buffer_weight, workspace)
                  if buffer_weight else exp_avgs)
    _kernels.torch_adam(params, aggregated, aggregated, exp_avg_sqs, state_steps, beta1=0.0,
                        momentum_correction=beta1, **kernel)


def _compiled_update(params, grads, exp_avgs, exp_avg_sqs, buffer_sums, state_steps, *, buffer_weight,
                     lr, beta1, beta2, eps, weight_decay, rows=None, write=False, occupied=False) -> None:
    """Steps 1–4 of :func:`adam_cm` (aggregated form) through torch.compile,
    one call per step count; with ``rows`` (the buffer rows of this step's
    slot) also step 6, the buffer write, in the same pass: the row becomes
    m_t if ``write`` and ΣB follows (minus the old row if ``occupied``).
    The scalars, computed here in double precision as torch's Adam computes
    them, enter as one small tensor, so that new values (bias corrections,
    κ/|B|, a scheduled lr, which slot is written) do not recompile; a new set
    of parameter shapes does (the first step of each group compiles)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_aggregated_update_, dynamic=False)
    for step, idx in _kernels.group_by_step(state_steps).items():
        t = step + 1
        sub = [_kernels.select(xs, idx) for xs in (params, grads, exp_avgs, exp_avg_sqs)]
        sums = _kernels.select(buffer_sums, idx) if buffer_sums else None
        first = sub[0][0]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        scalars = torch.tensor([1.0 - beta1, buffer_weight, beta2, 1.0 - beta2, 1.0 - lr * weight_decay,
                                lr / (1.0 - beta1 ** t), (1.0 - beta2 ** t) ** 0.5, eps,
                                float(write), float(occupied)], dtype=dtype)
        _COMPILED(*sub, sums, _kernels.select(rows, idx) if rows is not None else None,
                  scalars.to(first.device, non_blocking=True))
        torch._foreach_add_(_kernels.select(state_steps, idx), 1.0)


_COMPILED = None


def _aggregated_update_(params, grads, exp_avgs, exp_avg_sqs, buffer_sums, rows, scalars) -> None:
    """The formulas of :func:`adam_cm`'s docstring, per tensor, for torch.compile:
    m ← m + (1−β1)(g − m); d = m + (κ/|B|)·ΣB; v ← β2·v + (1−β2)·d²;
    θ ← θ·(1−η·wd) − η/(1−β1^t) · d / (√v/√(1−β2^t) + ε), as torch's Adam
    kernels order them; then, with ``rows``, the buffer write of
    :func:`cl_cm.buffer.insert_entry`: row ← m (if written), ΣB ← ΣB − old row
    (if occupied) + new row, with the row rounded to the buffer's dtype."""
    (one_minus_beta1, weight, beta2, one_minus_beta2, shrink, step_size, bias2_sqrt, eps,
     write, occupied) = scalars.unbind()
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        m.lerp_(g, one_minus_beta1.to(m.dtype))
        d = m if buffer_sums is None else m + weight * buffer_sums[i]
        v.mul_(beta2).add_(one_minus_beta2 * d * d)
        p.mul_(shrink).sub_(step_size * d / (v.sqrt() / bias2_sqrt + eps))
        if rows is not None:
            row, total = rows[i], buffer_sums[i]
            new = torch.where(write > 0, m.to(row.dtype), row)
            total.add_(write * (new.to(total.dtype) - occupied * row.to(total.dtype)))
            row.copy_(new)


def _buffer_term_(params, exp_avg_sqs, buffer_sums, steps, scale, beta1, beta2, eps, foreach):
    """θ ← θ − η·(κ/|B|)/(1−β1^t) · ΣB / (√(v_t/(1−β2^t)) + ε): the buffer half
    of d_t when v_t tracks g_t² and the kernel has already applied m_t."""
    for step, idx in _kernels.group_by_step(steps).items():
        ps, vs, ss = (_kernels.select(xs, idx) for xs in (params, exp_avg_sqs, buffer_sums))
        bias2 = (1.0 - beta2 ** step) ** 0.5
        value = -scale / (1.0 - beta1 ** step)
        if foreach:
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, bias2)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ss, denom, value)
        else:
            for p, v, s in zip(ps, vs, ss):
                p.addcdiv_(s, (v.sqrt() / bias2).add_(eps), value=value)


class AdamCM(CriticalBufferOptimizer):
    r"""Adam with Critical Momenta (Malviya et al., TMLR 2024).

    Adam whose update direction adds to the momentum m_t the mean of a small
    buffer of past momenta, d_t = m_t + κ·mean(B). Entries are admitted by
    gradient norm with decaying priority (see :mod:`cl_cm.buffer`), so the
    buffer holds the momenta of recent steep regions and pushes the optimizer
    past narrow basins.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate η.
        betas: (β1, β2), Adam's moment coefficients.
        eps: ε added to the denominator.
        weight_decay: decoupled weight decay (AdamW style).
        buffer_size: C, the number of critical momenta kept (0: no buffer).
        decay: λ, the factor applied to every priority after each step.
        kappa: κ, the weight of mean(B) in d_t (0: Adam with v from m_t²).
        second_moment: ``"aggregated"`` (v from d_t², as in the paper) or
            ``"gradient"`` (v from g_t²; with κ = 0 or C = 0 this is AdamW).
        buffer_dtype: dtype of the stored momenta, e.g. ``torch.bfloat16`` to
            halve their memory; None keeps the parameter's dtype.
        reference_compat: reproduce the authors' implementation
            (chandar-lab/CMOptimizer): priority = sum of per-tensor gradient
            norms, and a first step that moves nothing but weight decay and
            seeds the buffer with the raw gradient g_1.
        foreach, fused: implementation, as in torch.optim.Adam. By default the
            fused kernel where torch has one (CPU, CUDA), else foreach.
        compiled: steps 1–4 through :func:`torch.compile`, one fused kernel
            per tensor (aggregated second moment only). The first step of each
            parameter group compiles (seconds to a minute on a CPU, needs a C++
            compiler there); then it is the fastest path on CPU (README, "Speed").

    The state of every parameter is plain tensors: ``step``, ``exp_avg``,
    ``exp_avg_sq``, ``buffer`` (C × shape), ``buffer_sum`` and the group's
    ``priority`` list; ``state_dict()`` round-trips bit for bit.
    """

    stores = "momentum"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, buffer_size: int = 5,
                 decay: float = 0.7, kappa: float = 1.0, second_moment: str = "aggregated",
                 buffer_dtype: torch.dtype | None = None, reference_compat: bool = False, *,
                 foreach: bool | None = None, fused: bool | None = None, compiled: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        buffer_size=buffer_size, decay=decay, kappa=kappa,
                        second_moment=second_moment, buffer_dtype=buffer_dtype,
                        reference_compat=bool(reference_compat), foreach=foreach, fused=fused,
                        compiled=bool(compiled))
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if group["second_moment"] not in SECOND_MOMENTS:
            raise ValueError(f"Invalid second_moment: {group['second_moment']!r}. "
                             f"Use one of {SECOND_MOMENTS}.")
        if group.get("compiled") and group["second_moment"] != "aggregated":
            raise ValueError("Invalid second_moment with compiled=True: the compiled update supports "
                             "second_moment='aggregated' only; drop compiled=True for 'gradient'.")
        if group["reference_compat"] and group["second_moment"] != "aggregated":
            raise ValueError("Invalid second_moment with reference_compat=True: the authors' "
                             "implementation uses second_moment='aggregated'.")

    def _update(self, group: dict, w: GroupTensors, foreach: bool, fused: bool):
        if group["reference_compat"] and all(float(st["step"]) == 0 for st in w.states):
            return self._reference_first_step(group, w)
        args = self._update_arguments(group, w, foreach, fused)
        if not group.get("compiled"):
            adam_cm(**args, second_moment=group["second_moment"])
            return [st["exp_avg"] for st in w.members]
        # compiled: the kernel also writes this step's entry (step 6 of Alg. 1) in the same pass
        del args["foreach"], args["fused"], args["workspace"]
        rows = None
        if group["buffer_size"]:
            args["buffer_sums"] = [st["buffer_sum"] for st in w.states]  # also while the buffer is empty
            rows = [st["buffer"][w.slot if w.slot is not None else 0] for st in w.states]
            w.inserted = True
        _compiled_update(**args, rows=rows, write=w.slot is not None, occupied=w.occupied)
        return [st["exp_avg"] for st in w.members]

    @staticmethod
    def _reference_first_step(group: dict, w: GroupTensors):
        """The authors' first step: weight decay only, m and v stay zero, the
        step counts, and the buffer is offered the raw gradient g_1."""
        shrink = 1.0 - group["lr"] * group["weight_decay"]
        for p, st in zip(w.params, w.states):
            if shrink != 1.0:
                p.mul_(shrink)
            st["step"] += 1
        return w.member_grads
