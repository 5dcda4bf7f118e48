"""SAM inside Avalanche strategies."""
from __future__ import annotations

from avalanche.core import SupervisedPlugin

from cl_cm import SAM


class SAMPlugin(SupervisedPlugin):
    """Runs SAM's second forward/backward pass inside any Avalanche strategy.

    Avalanche's loop computes the loss at θ, calls ``backward`` and then
    ``optimizer.step()``. In ``before_update`` this plugin moves θ to θ + e
    (:meth:`cl_cm.SAM.first_step`) and re-runs the strategy's own ``forward``,
    ``criterion``, ``before_backward`` callbacks (regularisers such as EWC, SI
    and LwF add their penalties there), ``backward`` and ``after_backward``
    callbacks (A-GEM and GEM project the gradient there). The strategy's
    ``optimizer.step()`` then restores θ and steps with the gradient at θ + e.
    ``strategy.loss`` and ``strategy.mb_output`` are put back to their values
    at θ, so loss and accuracy metrics are those of the unperturbed model.

    :func:`strategies.make_strategy` adds it when the optimizer is a SAM.
    """

    def before_update(self, strategy, **kwargs):
        opt = strategy.optimizer
        if not isinstance(opt, SAM):
            raise TypeError(f"SAMPlugin needs a cl_cm.SAM optimizer; the strategy has {type(opt).__name__}. "
                            "Build it with cl_cm.SAM(params, base_optimizer, rho=...) or remove the plugin.")
        loss, output = strategy.loss, strategy.mb_output
        opt.first_step(zero_grad=True)
        strategy.mb_output = strategy.forward()
        strategy.loss = strategy._make_empty_loss()
        strategy.loss += strategy.criterion()
        strategy._before_backward(**kwargs)
        strategy.backward()
        strategy._after_backward(**kwargs)
        strategy.loss, strategy.mb_output = loss, output
