"""Factories for the usual combinations of optimizer and Avalanche strategy."""
from __future__ import annotations

from typing import Any

import torch
from avalanche.training.supervised import AGEM, EWC, GEM, LwF, Naive, Replay, SynapticIntelligence
from torch import nn

from cl_cm import OPTIMIZERS, SAM, make_optimizer, optimizer_options  # noqa: F401 (re-exported)

from .sam import SAMPlugin


# ------------------------------------------------------------------ optimizers
# The optimizers by name live in cl_cm (cl_cm.registry); re-exported here for existing callers.
__all__ = ["OPTIMIZERS", "make_optimizer", "optimizer_options", "STRATEGIES", "COMMON_STRATEGY_ARGS",
           "strategy_options", "make_strategy"]


# ------------------------------------------------------------------ strategies
#: name -> (Avalanche strategy class, its own hyperparameters with their defaults)
STRATEGIES: dict[str, tuple[type, dict[str, Any]]] = {
    "naive": (Naive, {}),
    "ewc": (EWC, {"ewc_lambda": 1.0, "mode": "separate", "decay_factor": None}),
    "si": (SynapticIntelligence, {"si_lambda": 1.0, "eps": 1e-7}),
    "lwf": (LwF, {"alpha": 1.0, "temperature": 2.0}),
    "replay": (Replay, {"mem_size": 200}),
    "gem": (GEM, {"patterns_per_exp": 64, "memory_strength": 0.5}),
    "agem": (AGEM, {"patterns_per_exp": 64, "sample_size": 64}),
}

#: arguments every strategy takes, with make_strategy's defaults
COMMON_STRATEGY_ARGS: dict[str, Any] = {
    "criterion": None,          # CrossEntropyLoss()
    "train_mb_size": 32,
    "train_epochs": 1,
    "eval_mb_size": 256,
    "device": None,             # Avalanche's default: "cpu"
    "plugins": None,
    "evaluator": None,          # Avalanche's default evaluator
    "eval_every": -1,
}


def strategy_options(name: str) -> dict[str, Any]:
    """The keyword arguments of strategy ``name`` with make_strategy's defaults."""
    _, own = _lookup(STRATEGIES, name, "strategy")
    return {**COMMON_STRATEGY_ARGS, **own}


def make_strategy(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs):
    """Build Avalanche strategy ``name`` (naive, ewc, si, lwf, replay, gem,
    agem) around ``model`` and ``optimizer``.

    Defaults are in :data:`STRATEGIES` and :data:`COMMON_STRATEGY_ARGS`. A
    :class:`cl_cm.SAM` optimizer gets a :class:`~strategies.SAMPlugin` added to
    ``plugins``. GEM needs the ``quadprog`` package (a dependency of cl_cm).
    """
    cls, _ = _lookup(STRATEGIES, name, "strategy")
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


def _lookup(table: dict, name: str, kind: str):
    key = name.lower() if isinstance(name, str) else name
    if key not in table:
        raise ValueError(f"Unknown {kind} {name!r}; choose one of {', '.join(table)}.")
    return table[key]


def _check_kwargs(where: str, kwargs: dict, allowed: dict) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{where} got unknown argument(s) {', '.join(map(repr, unknown))}; "
                         f"it takes: {', '.join(allowed)}.")
