"""Adam with Critical Gradients (Adam+CG), the memory baseline of Adam+CM.

McRae, Parthasarathi, Assran and Chandar, "Memory Augmented Optimizers for
Deep Learning", ICLR 2022, Alg. 1; compared against in Malviya et al. (TMLR
2024). The buffer (same rules as Adam+CM's: priority ‖g_t‖ over the group,
decayed by λ every step) stores raw gradients, and the aggregated gradient

    ĝ_t = g_t + κ·mean(B)

replaces g_t in both of Adam's moments (AdamW's decoupled weight decay).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from . import buffer
from .buffered_optimizer import CriticalBufferOptimizer, GroupTensors
from .torch_adam import Workspace, advance, per_tensor_steps, select, torch_adam


def adam_cg(params: list[Tensor], grads: list[Tensor | None], exp_avgs: list[Tensor],
            exp_avg_sqs: list[Tensor], buffer_sums: list[Tensor], state_steps: list[Tensor], *,
            buffer_weight: float, lr: float, beta1: float, beta2: float, eps: float,
            weight_decay: float, buffers: list[Tensor] | None = None, buffer_scales: list[Tensor] | None = None,
            slot: int | None = None, replace: bool = False, foreach: bool = False, fused: bool = False,
            workspace: Workspace | None = None) -> None:
    r"""Functional Adam+CG: AdamW on ĝ_t = g_t + κ·mean(B) (buffer_weight =
    κ/|B|, buffer_sums = ΣB) for every tensor with a gradient, then g_t (zeros
    for a tensor without gradient) written to row ``slot`` of ``buffers``, and
    the step counts; the arguments are those of :func:`~cl_cm.adam_cm`.
    ``fused``/``foreach``: torch's kernels; else the per-tensor loop."""
    if not params:
        return
    active, scalars, steps = per_tensor_steps(grads, state_steps, lr, beta1, beta2, eps, weight_decay, buffer_weight)
    rows, scales = buffer.slot_rows(buffers, buffer_scales, slot)
    if foreach or fused:
        ps, gs, ms, vs = (select(xs, active) for xs in (params, grads, exp_avgs, exp_avg_sqs))
        aggregated = gs
        if buffer_weight:
            sums = select(buffer_sums, active)
            out = workspace.like(ps) if workspace is not None else [torch.empty_like(p) for p in ps]
            aggregated = [torch.add(g, s, alpha=buffer_weight, out=o) for g, s, o in zip(gs, sums, out)]
        for t, s in scalars.items():
            idx = [i for i, a in enumerate(active) if steps[a] is s]
            torch_adam(select(ps, idx), select(aggregated, idx), select(ms, idx), select(vs, idx), t,
                       beta1=s.beta1, beta2=s.beta2, lr=s.lr, weight_decay=s.weight_decay, eps=s.eps,
                       foreach=foreach, fused=fused)
        if rows is not None:
            buffer.write_rows_(buffer_sums, rows, grads, replace, scales)
    else:
        for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
            if g is not None:
                if s.weight_decay != 0:
                    p.mul_(s.shrink)                                          # θ ← θ·(1 − η·wd)
                gh = g.add(buffer_sums[i], alpha=s.weight) if s.weight else g  # ĝ_t = g_t + κ/|B|·ΣB
                m.lerp_(gh, 1 - s.beta1)                                      # m_t = β1·m + (1−β1)·ĝ_t
                v.mul_(s.beta2).addcmul_(gh, gh, value=1 - s.beta2)           # v_t = β2·v + (1−β2)·ĝ_t²
                denom = (v.sqrt() / s.bias2_sqrt).add_(s.eps)
                p.addcdiv_(m, denom, value=-s.step_size)                      # θ ← θ − η/(1−β1^t)·m_t/denom
            if rows is not None:                                              # the buffer keeps g_t
                buffer.write_row_(buffer_sums[i], rows[i], g, replace, None if scales is None else scales[i])
    advance([state_steps[i] for i in active])


class AdamCG(CriticalBufferOptimizer):
    r"""Adam with Critical Gradients (McRae et al., ICLR 2022).

    The buffer (same rules as :class:`~cl_cm.AdamCM`: priority ‖g_t‖ over the
    group, decayed by ``decay`` every step) stores raw gradients, and
    ĝ_t = g_t + κ·mean(B) replaces g_t in both of Adam's moments. Weight decay
    is decoupled, as in AdamW and :class:`~cl_cm.AdamCM`.

    Arguments are those of :class:`~cl_cm.AdamCM` without ``second_moment``,
    ``reference_compat`` and ``compiled``.
    """

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, buffer_size: int = 5,
                 decay: float = 0.7, kappa: float = 1.0, buffer_dtype: torch.dtype | str | None = None, *,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         buffer_size=buffer_size, decay=decay, kappa=kappa, buffer_dtype=buffer_dtype,
                         foreach=foreach, fused=fused)

    def _update(self, group: dict, w: GroupTensors, slot: int | None, replace: bool) -> None:
        foreach, fused = self._implementation(group, [p for p, g in zip(w.params, w.grads) if g is not None])
        adam_cg(**self._tensors(group, w, slot), replace=replace, foreach=foreach, fused=fused,
                workspace=self._workspace)
