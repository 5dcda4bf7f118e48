"""Adam's moments zeroed at experience boundaries, for any Adam-family
optimizer: a fresh Adam at every task, as optimizer studies of continual
learning compare against (for example Mirzadeh et al. 2020 re-create the
optimizer at every task)."""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin

#: the per-parameter state of torch's Adam/AdamW and of cl_cm's Adam family that a fresh start zeroes
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


def reset_moments(optimizer: torch.optim.Optimizer) -> int:
    """Zero m, v (and AMSGrad's max v) and the step count of every parameter,
    in place, so that the next step is Adam's first (bias corrections
    restart); anything else in the state (a critical buffer) is kept.
    Returns the number of parameters reset."""
    base = getattr(optimizer, "base_optimizer", optimizer)  # SAM shares its base optimizer's state
    count = 0
    with torch.no_grad():
        for state in base.state.values():
            touched = False
            for key in MOMENT_KEYS:
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    value.zero_()
                    touched = True
                elif value is not None:
                    state[key] = type(value)(0)
                    touched = True
            count += touched
    return count


class ResetMomentsPlugin(SupervisedPlugin):
    """Zero the strategy's Adam moments and step counts before every
    experience after the first (:func:`reset_moments`). Unlike Avalanche's
    ``train(..., reset_optimizer_state=True)``, a critical buffer survives:
    its fate is the :class:`~strategies.CriticalMomentaPlugin`'s policy."""

    def __init__(self) -> None:
        super().__init__()
        #: number of boundaries at which the moments were reset
        self.resets = 0

    def before_training_exp(self, strategy, **kwargs):
        if strategy.clock.train_exp_counter > 0:
            if "betas" not in strategy.optimizer.defaults and "betas" not in getattr(
                    getattr(strategy.optimizer, "base_optimizer", None), "defaults", {}):
                raise TypeError(f"ResetMomentsPlugin needs an Adam-family optimizer, not "
                                f"{type(strategy.optimizer).__name__}")
            reset_moments(strategy.optimizer)
            self.resets += 1
