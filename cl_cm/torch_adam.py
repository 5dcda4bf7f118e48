"""What every update path of AdamCM and AdamCG shares with Adam: the step
count, the bias corrections, and torch's own Adam kernels.

* **Step count.** ``state["step"]`` is a CPU float32 tensor per parameter
  (as in torch's Adam), counting the steps that parameter has taken. A step
  groups the tensors by the number t of the step they are about to take
  (:func:`by_step`; a parameter that joined later has a smaller t), every path
  computes with that t, and :func:`advance` adds 1 to the counts once, after
  the update. torch's kernels, which count for themselves, get scratch counts.
* **Bias corrections.** :class:`StepScalars` computes, once per (group, t),
  the numbers of an Adam step, in double precision and in the order of
  torch's ``_single_tensor_adam``: 1 − β1^t, √(1 − β2^t), η/(1 − β1^t) and
  1 − η·wd (decoupled weight decay).
* **torch's kernels.** :func:`torch_adam` runs ``torch.optim.adam.adam``
  (for-loop, foreach or fused) on one step number's tensors; the foreach and
  fused paths of AdamCM and AdamCG are built on it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------ step count
def by_step(state_steps: list[Tensor]) -> dict[int, list[int]]:
    """Indices of the tensors grouped by t, the 1-based number of the step
    they are about to take (their ``state["step"]`` plus one)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, step in enumerate(state_steps):
        groups[int(step) + 1].append(i)
    return groups


def advance(state_steps: list[Tensor]) -> None:
    """Count the step just taken: ``state["step"] += 1`` (once per step, for every path)."""
    if state_steps:
        torch._foreach_add_(state_steps, 1.0)


def select(xs: list, idx: list[int]) -> list:
    """The items of ``xs`` at ``idx`` (all of them when ``idx`` covers the list)."""
    return xs if len(idx) == len(xs) else [xs[i] for i in idx]


# ------------------------------------------------------- bias corrections
@dataclass(frozen=True)
class StepScalars:
    """The numbers of Adam's step t for one parameter group (Kingma and Ba,
    2015, Alg. 1, with AdamW's decoupled weight decay, Loshchilov and Hutter,
    2019), computed as torch's ``_single_tensor_adam`` computes them.

    ``weight`` is κ/|B|, the factor of ΣB in Adam+CM's d_t = m_t + κ·mean(B).
    """

    t: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    weight: float = 0.0

    @classmethod
    def of(cls, group: dict, t: int, weight: float = 0.0) -> "StepScalars":
        beta1, beta2 = group["betas"]
        return cls(t, float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                   float(group["weight_decay"]), float(weight))

    @property
    def bias_correction1(self) -> float:
        """1 − β1^t."""
        return 1 - self.beta1 ** self.t

    @property
    def bias2_sqrt(self) -> float:
        """√(1 − β2^t)."""
        return (1 - self.beta2 ** self.t) ** 0.5

    @property
    def step_size(self) -> float:
        """η / (1 − β1^t)."""
        return self.lr / self.bias_correction1

    @property
    def shrink(self) -> float:
        """1 − η·wd, the decoupled weight decay's factor on θ."""
        return 1 - self.lr * self.weight_decay


# --------------------------------------------------------- torch's kernels
def per_tensor_steps(grads: list[Tensor | None], state_steps: list[Tensor], lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, buffer_weight: float
                     ) -> tuple[list[int], dict[int, "StepScalars"], list["StepScalars | None"]]:
    """(the positions with a gradient, the :class:`StepScalars` of each step
    number t among them, each tensor's StepScalars or None): the per-step
    numbers of a functional core, for tensors that may be at different t."""
    active = [i for i, g in enumerate(grads) if g is not None]
    scalars = {t: StepScalars(t, float(lr), beta1, beta2, eps, weight_decay, buffer_weight)
               for t in by_step([state_steps[i] for i in active])}
    steps = [scalars[int(s) + 1] if g is not None else None for s, g in zip(state_steps, grads)]
    return active, scalars, steps


def implementation(group: dict, params: list[Tensor]) -> tuple[bool, bool]:
    """(foreach, fused) as the user chose them; by default torch's fused Adam
    kernel where every tensor allows it (CPU or CUDA, floating point), else
    foreach."""
    foreach, fused = group["foreach"], group["fused"]
    if foreach is None and fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES
                    and type(p) in (Tensor, torch.nn.Parameter) for p in params)
        foreach = not fused
    return bool(foreach), bool(fused)


def torch_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], t: int, *, beta1: float, beta2: float, lr: float,
               weight_decay: float, eps: float, foreach: bool, fused: bool) -> None:
    """torch's AdamW kernel (for-loop, foreach or fused) for tensors at step
    number t. The kernel counts steps itself: it gets scratch counts holding
    t − 1, so that ``state["step"]`` is only counted by :func:`advance`."""
    from torch.optim.adam import adam

    if not params:
        return
    device = params[0].device
    on_device = fused and device.type != "cpu"
    steps = list(torch.full((len(params),), t - 1.0, dtype=torch.float32,
                            device=device if on_device else "cpu").unbind())
    adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=foreach, fused=fused,
         decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
         lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)


class Workspace:
    """Reusable scratch memory for an aggregated momentum or gradient.

    Allocating a model-sized temporary every step costs a page fault per 4 KiB
    on the CPU (about as much as the arithmetic); this keeps one flat tensor
    per (device, dtype) and hands out views. It is not optimizer state: it is
    never saved, and is rebuilt on demand.
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
