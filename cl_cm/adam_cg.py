"""Adam with Critical Gradients (Adam+CG), the memory baseline of Adam+CM.

McRae, Parthasarathi, Assran and Chandar, "Memory Augmented Optimizers for
Deep Learning", ICLR 2022; compared against in Malviya et al. (TMLR 2024).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from . import _kernels
from .buffer import CriticalBufferOptimizer, GroupTensors


def adam_cg(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
            exp_avg_sqs: list[Tensor], buffer_sums: list[Tensor], state_steps: list[Tensor], *,
            buffer_weight: float, lr: float, beta1: float, beta2: float, eps: float,
            weight_decay: float, foreach: bool = False, fused: bool = False,
            workspace: list[Tensor] | None = None) -> None:
    r"""Functional Adam+CG update: AdamW on the aggregated gradient
    ĝ_t = g_t + κ·mean(B), which feeds both moments (McRae et al. 2022, Alg. 1;
    buffer_weight = κ/|B|, buffer_sums = ΣB; ``workspace`` holds ĝ_t if given)."""
    if not params:
        return
    aggregated = (_kernels.add(grads, buffer_sums, buffer_weight, workspace)
                  if buffer_weight else grads)
    _kernels.torch_adam(params, aggregated, exp_avgs, exp_avg_sqs, state_steps, beta1=beta1,
                        beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
                        foreach=foreach, fused=fused)


class AdamCG(CriticalBufferOptimizer):
    r"""Adam with Critical Gradients (McRae et al., ICLR 2022).

    The buffer (same rules as :class:`~cl_cm.AdamCM`: priority ‖g_t‖ over the
    group, decayed by ``decay`` every step) stores raw gradients, and
    ĝ_t = g_t + κ·mean(B) replaces g_t in both of Adam's moments. Weight decay
    is decoupled, as in AdamW and :class:`~cl_cm.AdamCM`.

    Arguments are those of :class:`~cl_cm.AdamCM` without ``second_moment``
    and ``reference_compat``.
    """

    stores = "gradient"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, buffer_size: int = 5,
                 decay: float = 0.7, kappa: float = 1.0, buffer_dtype: torch.dtype | None = None, *,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        buffer_size=buffer_size, decay=decay, kappa=kappa,
                        buffer_dtype=buffer_dtype, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def _update(self, group: dict, w: GroupTensors, foreach: bool, fused: bool):
        adam_cg(**self._update_arguments(group, w, foreach, fused))
        return w.member_grads
