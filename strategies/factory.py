"""Factories for the usual combinations of optimizer and Avalanche strategy."""
from __future__ import annotations

from typing import Any

import torch
from avalanche.training.supervised import AGEM, EWC, GEM, LwF, Naive, Replay, SynapticIntelligence
from torch import nn

from cl_cm import OPTIMIZERS, SAM, make_optimizer, optimizer_options  # noqa: F401 (re-exported)

from .names import COMMON_STRATEGY_ARGS, STRATEGY_NAMES, STRATEGY_OPTIONS, check_strategy, strategy_options
from .sam import SAMPlugin


# ------------------------------------------------------------------ optimizers
# The optimizers by name live in cl_cm (cl_cm.registry); re-exported here for existing callers.
__all__ = ["OPTIMIZERS", "make_optimizer", "optimizer_options", "STRATEGIES", "COMMON_STRATEGY_ARGS",
           "strategy_options", "make_strategy"]


# ------------------------------------------------------------------ strategies
#: name -> (Avalanche strategy class, its own hyperparameters with their defaults; see strategies.names)
STRATEGIES: dict[str, tuple[type, dict[str, Any]]] = {
    name: (cls, STRATEGY_OPTIONS[name]) for name, cls in (
        ("naive", Naive), ("ewc", EWC), ("si", SynapticIntelligence), ("lwf", LwF), ("replay", Replay),
        ("gem", GEM), ("agem", AGEM))}
if tuple(STRATEGIES) != STRATEGY_NAMES:
    raise ImportError("strategies.names and strategies.factory disagree on the strategies")


def make_strategy(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs):
    """Build Avalanche strategy ``name`` (naive, ewc, si, lwf, replay, gem,
    agem) around ``model`` and ``optimizer``.

    Defaults are in :data:`STRATEGIES` and :data:`COMMON_STRATEGY_ARGS`. A
    :class:`cl_cm.SAM` optimizer gets a :class:`~strategies.SAMPlugin` added to
    ``plugins``. GEM needs the ``quadprog`` package (a dependency of cl_cm).
    """
    cls, _ = STRATEGIES[check_strategy(name)]
    options = strategy_options(name)
    _check_kwargs(f"make_strategy({name!r})", kwargs, options)
    args = {**options, **kwargs}
    if args["criterion"] is None:
        args["criterion"] = nn.CrossEntropyLoss()
    plugins = list(args["plugins"] or [])
    if isinstance(optimizer, SAM) and not any(isinstance(p, SAMPlugin) for p in plugins):
        plugins.insert(0, SAMPlugin())
    args["plugins"] = plugins
    for key in ("device", "evaluator"):
        if args[key] is None:
            del args[key]
    return cls(model=model, optimizer=optimizer, **args)


def _check_kwargs(where: str, kwargs: dict, allowed: dict) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{where} got unknown argument(s) {', '.join(map(repr, unknown))}; "
                         f"it takes: {', '.join(allowed)}.")
