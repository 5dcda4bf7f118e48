"""A run whose training loss becomes NaN or Inf stops and says so, instead of
finishing with meaningless numbers."""
from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin

from cl_cm.registry import skipped_steps  # noqa: F401 (re-exported)

from .errors import NonFiniteLossError


class FiniteLossPlugin(SupervisedPlugin):
    """Raises :class:`NonFiniteLossError` at the end of a training epoch in
    which the loss of some iteration was NaN or Inf.

    Each iteration adds ``loss − loss`` to a sum on the loss's device: 0 for
    a finite loss, NaN for a NaN or infinite one (and never an overflow). The
    sum is read once per epoch, so the check costs no host-device
    synchronisation per iteration."""

    def __init__(self) -> None:
        super().__init__()
        self._sum: torch.Tensor | None = None
        self._epoch = 0

    def before_training_exp(self, strategy, **kwargs):
        self._epoch = 0

    def before_training_epoch(self, strategy, **kwargs):
        self._sum = None
        self._epoch += 1

    def after_training_iteration(self, strategy, **kwargs):
        loss = strategy.loss.detach()
        zero_or_nan = loss - loss
        if self._sum is None:
            self._sum = zero_or_nan
        else:
            self._sum.add_(zero_or_nan)

    def after_training_epoch(self, strategy, **kwargs):
        total, self._sum = self._sum, None
        if total is not None and not torch.isfinite(total):
            lr = ", ".join(f"{g['lr']:g}" for g in strategy.optimizer.param_groups)
            raise NonFiniteLossError(
                f"the training loss became NaN or Inf in experience {strategy.clock.train_exp_counter} "
                f"(epoch {self._epoch}) with learning rate {lr}; the run stopped, since its "
                "numbers would be meaningless. Lower the learning rate (or check the data and settings)")
