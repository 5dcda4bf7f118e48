"""Adam with Critical Momenta (Adam+CM).

Malviya, Mordido, Baratin, Harikandeh, Huang, Lacoste-Julien, Pascanu and
Chandar, "Promoting Exploration in Memory-Augmented Adam using Critical
Momenta", TMLR 2024 (arXiv 2307.09638), Algorithm 1. For each parameter
group, at step t with gradient g_t:

1. m_t = β1·m_{t−1} + (1−β1)·g_t
2. d_t = m_t + κ·mean(B), with B the buffer as it stood after step t−1
3. v_t = β2·v_{t−1} + (1−β2)·d_t²            (``second_moment="gradient"``: g_t²)
4. θ_t = θ_{t−1}·(1−η·wd) − η/(1−β1^t) · d_t / (√(v_t/(1−β2^t)) + ε)
5. p_t = ‖g_t‖₂ over the whole group
6. store (p_t, m_t) in a free slot, or in place of the lowest priority if p_t
   is higher, or drop it
7. multiply every priority by λ (``decay``)

Read top to bottom: :func:`adam_cm` is steps 1–4 and the write of step 6 for
a list of tensors; :func:`_reference_loop` is that update written per tensor
(the readable reference, and the ``foreach=False`` path); the fast paths are
alternatives to it: :func:`_torch_kernels` (torch's foreach or fused Adam
kernel) and :func:`_compiled_body` (``compiled=True``). All of them take the
step numbers from :class:`~cl_cm.torch_adam.StepScalars` and write the buffer
with :func:`cl_cm.buffer.write_row_`. The class :class:`AdamCM` at the bottom
adds what its base :class:`~cl_cm.buffered_optimizer.CriticalBufferOptimizer`
does for every buffered optimizer: steps 5–7 (the priorities and the choice of
slot), gathering the tensors, checkpoints and the buffer controls.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from . import buffer
from .buffered_optimizer import CriticalBufferOptimizer, GroupTensors
from .compiled import PerTensorCompiled
from .torch_adam import StepScalars, Workspace, advance, per_tensor_steps, select, torch_adam

SECOND_MOMENTS = ("aggregated", "gradient")


def adam_cm(params: list[Tensor], grads: list[Tensor | None], exp_avgs: list[Tensor],
            exp_avg_sqs: list[Tensor], buffer_sums: list[Tensor], state_steps: list[Tensor], *,
            buffer_weight: float, lr: float, beta1: float, beta2: float, eps: float,
            weight_decay: float, second_moment: str = "aggregated", buffers: list[Tensor] | None = None,
            buffer_scales: list[Tensor] | None = None, slot: int | None = None, replace: bool = False,
            foreach: bool = False, fused: bool = False, compiled: bool = False,
            workspace: Workspace | None = None) -> None:
    r"""Functional Adam+CM: steps 1–4 of Alg. 1 for every tensor with a
    gradient, the write of step 6 for every tensor, and the step counts.

    ``buffer_weight`` is κ/|B| and ``buffer_sums`` are ΣB (so that
    κ·mean(B) = buffer_weight·ΣB); they may be empty when buffer_weight is 0
    and there is no buffer. ``buffers`` are the ``(C, *shape)`` buffers
    (``buffer_scales`` their scales, for the 8-bit buffer): when ``slot`` is
    not None, m_t is stored in their row ``slot`` and ΣB follows, minus the
    old row when ``replace``. A tensor whose grad is None is not updated and
    stores its unchanged m. ``state_steps`` count the steps taken; each tensor
    uses its own t (a parameter that joined later has its own bias
    corrections). The path: ``compiled`` (aggregated second moment only),
    else ``fused`` or ``foreach`` (torch's kernels), else the per-tensor
    reference loop. ``workspace`` holds d_t on the kernel paths.
    """
    if not params:
        return
    active, scalars, steps = per_tensor_steps(grads, state_steps, lr, beta1, beta2, eps, weight_decay, buffer_weight)
    rows, scales = buffer.slot_rows(buffers, buffer_scales, slot)
    if compiled:
        _compiled_update(params, grads, exp_avgs, exp_avg_sqs, buffer_sums, steps, buffers, buffer_scales,
                         slot, replace)
    elif foreach or fused:
        sub = [select(xs, active) if xs else xs for xs in (params, grads, exp_avgs, exp_avg_sqs, buffer_sums)]
        _torch_kernels(*sub, select(steps, active), second_moment, foreach, fused, workspace)
        if rows is not None:                                               # 6.
            buffer.write_rows_(buffer_sums, rows, exp_avgs, replace, scales)
    else:
        _reference_loop(params, grads, exp_avgs, exp_avg_sqs, buffer_sums, steps, second_moment,
                        rows, scales, replace)
    advance([state_steps[i] for i in active])


def _reference_loop(params, grads, exp_avgs, exp_avg_sqs, buffer_sums, steps: list[StepScalars | None],
                    second_moment, rows, scales, replace) -> None:
    """Steps 1–4 and 6 of Alg. 1, one tensor at a time, in the order of
    torch's single-tensor Adam (so that with an empty buffer and
    ``second_moment="gradient"`` it is AdamW bit for bit)."""
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        if g is not None:
            if s.weight_decay != 0:
                p.mul_(s.shrink)                                           # θ ← θ·(1 − η·wd)
            m.lerp_(g, 1 - s.beta1)                                        # 1. m_t = β1·m + (1−β1)·g_t
            d = m.add(buffer_sums[i], alpha=s.weight) if s.weight else m   # 2. d_t = m_t + κ/|B|·ΣB
            u = d if second_moment == "aggregated" else g
            v.mul_(s.beta2).addcmul_(u, u, value=1 - s.beta2)              # 3. v_t = β2·v + (1−β2)·d_t²
            denom = (v.sqrt() / s.bias2_sqrt).add_(s.eps)                  # 4. √(v_t/(1−β2^t)) + ε
            p.addcdiv_(d, denom, value=-s.step_size)                       #    θ ← θ − η/(1−β1^t)·d_t/denom
        if rows is not None:                                               # 6. the buffer keeps m_t
            buffer.write_row_(buffer_sums[i], rows[i], m, replace, None if scales is None else scales[i])


def _torch_kernels(params, grads, exp_avgs, exp_avg_sqs, buffer_sums, steps: list[StepScalars],
                   second_moment, foreach, fused, workspace) -> None:
    """Steps 1–4 through torch's foreach or fused Adam kernel, one call per
    step number t.

    Aggregated: m_t is formed first, then the kernel runs Adam with β1 = 0 on
    d_t, with step size η/(1−β1^t) and weight decay wd·(1−β1^t) (so that the
    decay η·wd is unchanged): with β1 = 0 Adam's first moment *is* its input
    and its bias correction is 1, so that this is exactly steps 3–4. Gradient:
    the kernel is AdamW itself (m_t and v_t from g_t), and the buffer's half of
    d_t is added after: θ ← θ − η/(1−β1^t)·(κ/|B|)·ΣB / (√(v_t/(1−β2^t)) + ε).
    """
    if not params:
        return
    weight = steps[0].weight
    if second_moment == "aggregated":
        torch._foreach_lerp_(exp_avgs, grads, 1 - steps[0].beta1)             # 1.
        directions = exp_avgs
        if weight:                                                             # 2.
            out = workspace.like(params) if workspace is not None else [torch.empty_like(p) for p in params]
            directions = [torch.add(m, s, alpha=weight, out=o) for m, s, o in zip(exp_avgs, buffer_sums, out)]
    for s, idx in _by_scalars(steps).items():
        ps, vs = select(params, idx), select(exp_avg_sqs, idx)
        if second_moment == "aggregated":                                      # 3.–4.
            ds = select(directions, idx)
            torch_adam(ps, ds, ds, vs, s.t, beta1=0.0, beta2=s.beta2, lr=s.step_size,
                       weight_decay=s.weight_decay * s.bias_correction1, eps=s.eps, foreach=foreach, fused=fused)
            continue
        torch_adam(ps, select(grads, idx), select(exp_avgs, idx), vs, s.t, beta1=s.beta1, beta2=s.beta2,
                   lr=s.lr, weight_decay=s.weight_decay, eps=s.eps, foreach=foreach, fused=fused)
        if weight:
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, s.bias2_sqrt)
            torch._foreach_add_(denom, s.eps)
            torch._foreach_addcdiv_(ps, select(buffer_sums, idx), denom, -weight * s.step_size)


def _by_scalars(steps: list[StepScalars]) -> dict[StepScalars, list[int]]:
    out: dict[StepScalars, list[int]] = {}
    for i, s in enumerate(steps):
        out.setdefault(s, []).append(i)
    return out


def _compiled_body(params, grads, exp_avgs, exp_avg_sqs, buffer_sums, rows, scales, numbers) -> None:
    """Steps 1–4 and 6 per tensor for torch.compile (``compiled=True``): the
    formulas of :func:`_reference_loop` with every number read from a row of
    ``numbers``, so that new values do not recompile, and no branch on them:
    a tensor without a gradient (active = 0) keeps θ, m and v; a step that
    stores nothing (write = 0) keeps the old row. Inductor fuses each
    tensor's update and buffer write into one pass."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        (one_minus_beta1, weight, beta2, one_minus_beta2, shrink, step_size, bias2_sqrt, eps,
         active, write, replace) = numbers[i].unbind()
        on = active > 0
        m_t = m.lerp(g, one_minus_beta1.to(m.dtype))                           # 1.
        d = m_t if buffer_sums is None else m_t + weight * buffer_sums[i]      # 2.
        v_t = v * beta2 + one_minus_beta2 * d * d                              # 3.
        p_t = p * shrink - step_size * d / (v_t.sqrt() / bias2_sqrt + eps)     # 4.
        m.copy_(torch.where(on, m_t, m))
        v.copy_(torch.where(on, v_t, v))
        p.copy_(torch.where(on, p_t, p))
        if rows is not None:                                                   # 6.
            buffer.write_row_(buffer_sums[i], rows[i], m, replace, None if scales is None else scales[i], write)


_COMPILED = PerTensorCompiled(_compiled_body)


def _compiled_update(params, grads, exp_avgs, exp_avg_sqs, buffer_sums, steps: list[StepScalars | None],
                     buffers, buffer_scales, slot, replace) -> None:
    """:func:`_compiled_body` over the group's tensors. A tensor without a
    gradient gets its momentum as placeholder gradient (unused: inactive).
    When no entry is stored, row 0 goes in with write = 0."""
    write = slot is not None
    row = slot if write else 0
    flags = (float(write), float(replace or not write))
    numbers = [(1 - s.beta1, s.weight, s.beta2, 1 - s.beta2, s.shrink, s.step_size, s.bias2_sqrt, s.eps, 1.0)
               + flags if s is not None else (0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0) + flags
               for s in steps]
    _COMPILED([params, [m if g is None else g for g, m in zip(grads, exp_avgs)], exp_avgs, exp_avg_sqs,
               buffer_sums or None, None if buffers is None else [b[row] for b in buffers],
               None if buffer_scales is None else [s[row] for s in buffer_scales]],
              numbers, dtype=torch.float64 if params[0].dtype == torch.float64 else torch.float32)


class AdamCM(CriticalBufferOptimizer):
    r"""Adam with Critical Momenta (Malviya et al., TMLR 2024).

    Adam whose update direction adds to the momentum m_t the mean of a small
    buffer of past momenta, d_t = m_t + κ·mean(B). Entries are admitted by
    gradient norm with decaying priority (see :mod:`cl_cm.buffer`), so the
    buffer holds the momenta of recent steep regions and pushes the optimizer
    past narrow basins.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate η (a float, or a 1-element tensor as torch's Adam takes).
        betas: (β1, β2), Adam's moment coefficients.
        eps: ε added to the denominator.
        weight_decay: decoupled weight decay (AdamW style).
        buffer_size: C, the number of critical momenta kept (0: no buffer).
        decay: λ, the factor applied to every priority after each step.
        kappa: κ, the weight of mean(B) in d_t (0: Adam with v from m_t²).
        second_moment: ``"aggregated"`` (v from d_t², as in the paper) or
            ``"gradient"`` (v from g_t²; with κ = 0 or C = 0 this is AdamW).
        buffer_dtype: how the momenta are stored: None keeps the parameter's
            dtype; ``torch.bfloat16`` halves their memory; ``torch.int8`` (or
            "int8", "8bit") stores int8 codes with one float32 scale per block
            of 256 elements, about a quarter of float32's memory. Names such as
            "bfloat16" are accepted too.
        reference_compat: reproduce the authors' implementation
            (chandar-lab/CMOptimizer): priority = sum of per-tensor gradient
            norms, and a first step that moves nothing but weight decay and
            seeds the buffer with the raw gradient g_1.
        foreach, fused: implementation, as in torch.optim.Adam. By default the
            fused kernel where torch has one (CPU, CUDA), else foreach.
        compiled: steps 1–4 and the buffer write through :func:`torch.compile`,
            one fused pass per tensor (aggregated second moment only). The
            first step compiles (seconds on a CPU, which needs a C++ compiler),
            once per process for any number of groups and shapes.

    The state of every parameter is plain tensors: ``step``, ``exp_avg``,
    ``exp_avg_sq``, ``buffer`` (C × shape), ``buffer_sum``, ``buffer_scale``
    (8-bit buffer only) and the group's ``priority`` list; ``state_dict()``
    round-trips bit for bit.
    """

    _identity_keys = ("second_moment",)

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, buffer_size: int = 5,
                 decay: float = 0.7, kappa: float = 1.0, second_moment: str = "aggregated",
                 buffer_dtype: torch.dtype | str | None = None, reference_compat: bool = False, *,
                 foreach: bool | None = None, fused: bool | None = None, compiled: bool = False) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         buffer_size=buffer_size, decay=decay, kappa=kappa, buffer_dtype=buffer_dtype,
                         foreach=foreach, fused=fused, second_moment=second_moment,
                         reference_compat=reference_compat, compiled=compiled)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if group["second_moment"] not in SECOND_MOMENTS:
            raise ValueError(f"Invalid second_moment: {group['second_moment']!r}. Use one of {SECOND_MOMENTS}.")
        for flag in ("reference_compat", "compiled"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"Invalid {flag}: {group[flag]!r}. Use True or False.")
        if group["compiled"] and group["second_moment"] != "aggregated":
            raise ValueError("Invalid second_moment with compiled=True: the compiled update supports "
                             "second_moment='aggregated' only; drop compiled=True for 'gradient'.")
        if group["reference_compat"] and group["second_moment"] != "aggregated":
            raise ValueError("Invalid second_moment with reference_compat=True: the authors' "
                             "implementation uses second_moment='aggregated'.")

    def _priority(self, group: dict, squared_norms: list[float]) -> float:
        """Step 5: ‖g_t‖₂ over the group; with ``reference_compat`` the authors'
        sum of the per-tensor norms."""
        if group["reference_compat"]:
            return sum(q ** 0.5 for q in squared_norms)
        return super()._priority(group, squared_norms)

    def _update(self, group: dict, w: GroupTensors, slot: int | None, replace: bool) -> None:
        if group["reference_compat"] and all(float(st["step"]) == 0 for st, g in zip(w.states, w.grads)
                                             if g is not None):
            self._reference_first_step(group, w, slot, replace)
            return
        foreach = fused = False
        if not group["compiled"]:
            foreach, fused = self._implementation(group, [p for p, g in zip(w.params, w.grads) if g is not None])
        adam_cm(**self._tensors(group, w, slot), second_moment=group["second_moment"], replace=replace,
                foreach=foreach, fused=fused, compiled=group["compiled"], workspace=self._workspace)

    @staticmethod
    def _reference_first_step(group: dict, w: GroupTensors, slot: int | None, replace: bool) -> None:
        """The authors' first step: weight decay only, m and v stay zero, the
        step counts, and the buffer is offered the raw gradient g_1."""
        shrink = 1.0 - float(group["lr"]) * group["weight_decay"]
        for p, g in zip(w.params, w.grads):
            if g is not None and shrink != 1.0:
                p.mul_(shrink)
        if slot is not None:
            buffer.write_entries(w.states, w.grads, slot, replace)
        advance([st["step"] for st, g in zip(w.states, w.grads) if g is not None])
