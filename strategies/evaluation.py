"""An evaluation plugin that the strategy calls only where its metrics and loggers act."""
from __future__ import annotations

from avalanche.core import BasePlugin, BaseSGDPlugin, SupervisedPlugin
from avalanche.evaluation import GenericPluginMetric, PluginMetric
from avalanche.training.plugins import EvaluationPlugin

#: classes whose callbacks do nothing: a metric or logger inheriting one of these unchanged ignores that callback
_NO_OP_BASES = (PluginMetric, BasePlugin, BaseSGDPlugin, SupervisedPlugin)


def _callback_names() -> set[str]:
    return {name for base in _NO_OP_BASES for name in dir(base) if name.startswith(("before_", "after_"))}


def acts_on(obj, callback: str) -> bool:
    """Whether metric or logger ``obj`` does anything at ``callback``: the
    callback is in its ``active_callbacks`` when it declares them; else it
    defines the callback other than as one of Avalanche's empty base
    callbacks, and, for Avalanche's generic metrics, the callback belongs to
    the phase (training or evaluation) that the metric measures."""
    declared = getattr(obj, "active_callbacks", None)
    if declared is not None:
        return callback in declared
    impl = getattr(type(obj), callback, None)
    if impl is None or any(impl is getattr(base, callback, None) for base in _NO_OP_BASES):
        return False
    if isinstance(obj, GenericPluginMetric) and impl is getattr(GenericPluginMetric, callback, None):
        mode = getattr(obj, "_mode", None)  # GenericPluginMetric acts only in its own phase
        if mode in ("train", "eval") and ("eval" in callback) != (mode == "eval"):
            return False
    return True


class SelectiveEvaluationPlugin(EvaluationPlugin):
    """Avalanche's :class:`EvaluationPlugin`, except that the strategy calls
    it only at the callbacks where one of its metrics or loggers acts
    (:func:`acts_on`).

    Avalanche's evaluation plugin answers every ``before_*`` and ``after_*``
    callback: a dozen calls per training iteration, each of which switches the
    strategy's experience to logging mode and asks every metric. With
    evaluation-phase metrics (accuracy on the test stream) and per-epoch ones,
    none of them does anything during training iterations. The values
    recorded are the same; only the calls that would find nothing to do are
    skipped (a logger's ``log_metrics`` is then not called with an empty
    list). Same arguments as :class:`EvaluationPlugin`.
    """

    def __init__(self, *metrics, **kwargs):
        super().__init__(*metrics, **kwargs)
        self._callbacks = frozenset(name for name in _callback_names()
                                    if any(acts_on(m, name) for m in [*self.metrics, *self.loggers]))

    def __getattribute__(self, item):
        if (item.startswith(("before_", "after_")) and not hasattr(type(self), item)
                and item not in object.__getattribute__(self, "_callbacks")):
            raise AttributeError(item)  # trigger_plugins skips a plugin without the callback
        return super().__getattribute__(item)
