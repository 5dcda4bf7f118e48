"""Sharpness-Aware Minimization around any base optimizer.

Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for
Efficiently Improving Generalization", ICLR 2021 (SAM); Kwon, Kim, Park and
Choi, "ASAM: Adaptive Sharpness-Aware Minimization", ICML 2021 (adaptive).
Adam+SAM is ``SAM(params, torch.optim.Adam)``; Adam+CM+SAM is
``SAM(params, AdamCM)``, the combination of Malviya et al. (2024), Sec. 5.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from .adam_cm import AdamCM
from .buffered_optimizer import _is_real
from .norms import squared_norms


class SAM(Optimizer):
    r"""SAM: ascend to the worst point within radius ρ, then let the base
    optimizer step with the gradient found there.

    Each step has two halves:

    1. :meth:`first_step` moves θ to θ + e, e = ρ·T²g / ‖Tg‖ (T = 1 for SAM,
       T = |θ| elementwise for adaptive SAM), with the norm over all groups;
    2. after a second forward/backward at θ + e, :meth:`second_step` restores θ
       exactly and runs the base optimizer's step with that gradient.

    :meth:`step` does both when given a closure that recomputes the loss
    (zeroing gradients first, as torch closures do), and returns the loss at
    θ. Without a closure, :meth:`step` completes a pending :meth:`first_step`,
    which is what ``torch.amp.GradScaler.step(sam)`` needs: the perturbation
    depends only on the gradient's direction, so a scaled gradient gives the
    same e.

    Args:
        params: parameters or parameter groups.
        base_optimizer: the optimizer *class* to wrap (default :class:`AdamCM`).
        rho: ρ ≥ 0, the radius of the neighbourhood (per group if given there).
        adaptive: use adaptive SAM (scale-invariant radius).
        **kwargs: the base optimizer's arguments (lr, betas, buffer_size, ...).

    Parameter groups are shared with the base optimizer, so LR schedulers
    work; ``state`` and ``state_dict`` are the base optimizer's. The buffer
    controls of Adam+CM live on :attr:`base_optimizer`. A step whose gradient
    (at θ or at θ + e) contains NaN or Inf is skipped and counted in
    :attr:`skipped_steps`, with θ restored.
    """

    # torch.amp.GradScaler hands SAM ``grad_scale`` and ``found_inf`` instead of
    # skipping ``step()``, so that an overflowing step still restores θ.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, base_optimizer: type[Optimizer] = AdamCM,
                 rho: float = 0.05, adaptive: bool = False, **kwargs) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(f"Invalid base_optimizer: {base_optimizer!r}. Pass an optimizer class "
                            "such as cl_cm.AdamCM or torch.optim.Adam, not an instance.")
        _check_rho(rho)
        self.skipped_steps = 0
        self._backup: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._first_finite = True
        super().__init__(params, dict(rho=rho, adaptive=bool(adaptive), **kwargs))
        #: The wrapped optimizer, sharing ``param_groups`` with this one.
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    # The state is the base optimizer's, so that code which resets or edits
    # ``optimizer.state`` (Avalanche does) reaches the moments and buffers.
    @property
    def state(self):
        base = self.__dict__.get("base_optimizer")
        return base.state if base is not None else self.__dict__.setdefault("_early_state", defaultdict(dict))

    @state.setter
    def state(self, value) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.state = value
        else:
            self.__dict__["_early_state"] = value

    def add_param_group(self, param_group: dict) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:  # called by Optimizer.__init__
            super().add_param_group(param_group)
            _check_rho(self.param_groups[-1]["rho"])
            return
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("adaptive", self.defaults["adaptive"])
        _check_rho(param_group["rho"])
        base.add_param_group(param_group)

    def __getstate__(self) -> dict:
        if self._backup is not None:
            raise RuntimeError("SAM cannot be pickled between first_step() and second_step(): the "
                               "parameters are perturbed. Call second_step() first.")
        state = super().__getstate__()
        state.pop("state")  # it is the base optimizer's, pickled with it
        return {**state, "base_optimizer": self.base_optimizer, "skipped_steps": self.skipped_steps,
                "_backup": None, "_first_finite": True}

    def state_dict(self) -> dict:
        if self._backup is not None:
            raise RuntimeError("SAM.state_dict() was called between first_step() and second_step(): "
                               "the parameters are perturbed. Call second_step() first.")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups

    def _with_grad(self):
        return [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save θ and move to θ + e (one host sync, for the norm)."""
        if self._backup is not None:
            self._restore()
            self._skip("first_step() came again before second_step(); the pending perturbation was undone")
        pairs = self._with_grad()
        scaled = [(torch.abs(p) * p.grad) if group["adaptive"] else p.grad for group, p in pairs]
        norm = math.sqrt(sum(squared_norms(scaled))) if scaled else 0.0
        self._backup = [(p, p.detach().clone()) for _, p in pairs]
        self._first_finite = math.isfinite(norm)
        if self._first_finite:
            for group, p in pairs:
                e = p.grad * (group["rho"] / (norm + 1e-12))
                if group["adaptive"]:
                    e.mul_(p).mul_(p)
                p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore θ and let the base optimizer step with the gradient at θ + e."""
        if self._backup is None:
            raise RuntimeError("SAM.second_step() needs a first_step() before it.")
        self._restore()
        grads = [p.grad for _, p in self._with_grad()]
        finite = self._first_finite and all(math.isfinite(x) for x in squared_norms(grads)) if grads else True
        if finite:
            self.base_optimizer.step()
        else:
            self._skip("a gradient was NaN or Inf")
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def _second_step_from_scaler(self) -> None:
        """second_step(), honouring the ``found_inf``/``grad_scale`` attributes
        that torch.amp.GradScaler sets on optimizers with
        ``_step_supports_amp_scaling``."""
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if found_inf is not None and float(found_inf) > 0:
            self._restore()
            self._skip("GradScaler found an Inf or NaN gradient")
            return
        if grad_scale is not None:
            for _, p in self._with_grad():
                p.grad.div_(grad_scale.to(p.grad.device, p.grad.dtype))
        self.second_step()

    def _restore(self) -> None:
        for p, saved in self._backup:
            p.copy_(saved)
        self._backup = None

    def _skip(self, why: str) -> None:
        self.skipped_steps += 1
        warnings.warn(f"SAM: skipped a step ({why}); skipped_steps = {self.skipped_steps}.",
                      RuntimeWarning, stacklevel=3)

    def step(self, closure: Callable | None = None):
        """One SAM step. With a closure: evaluate at θ, perturb, evaluate at
        θ + e, restore and step; return the loss at θ. Without one: complete a
        pending :meth:`first_step`."""
        if closure is None:
            if self._backup is not None:
                self._second_step_from_scaler()
                return None
            raise ValueError("SAM.step() needs a closure that zeroes the gradients, recomputes the loss "
                             "and calls backward(); or call first_step() and second_step() yourself. "
                             "Inside an Avalanche strategy, add strategies.SAMPlugin() to its plugins.")
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss


def _check_rho(rho) -> None:
    if not _is_real(rho) or not (math.isfinite(rho) and rho >= 0.0):
        raise ValueError(f"Invalid rho: {rho!r}. rho must be a finite float >= 0.")
