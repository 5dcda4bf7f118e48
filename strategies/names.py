"""The strategies and buffer policies by name, with their options.

Names and defaults only, without torch or Avalanche, so that settings can be
checked (and ``--help`` printed) before either is imported. The Avalanche
classes behind the strategy names are in :mod:`strategies.factory`; the
policies are applied by :class:`strategies.CriticalMomentaPlugin`.
"""
from __future__ import annotations

from typing import Any

#: buffer policies at an experience boundary (:class:`~strategies.CriticalMomentaPlugin`)
BOUNDARIES = ("keep", "reset", "decay", "shrink")
#: shapes of κ within each experience (:func:`~strategies.kappa_at`)
KAPPA_SCHEDULES = ("constant", "linear", "cosine")

#: named setups, each the optimizer, its settings and the buffer policy it stands for:
#: ``recommended`` is Adam+CM as the study of docs/results.md recommends for continual learning
#: (:func:`strategies.recommended`, ``CriticalMomentaPlugin.recipe``, ``cl-cm run --recipe``)
RECIPES: dict[str, dict[str, Any]] = {
    "recommended": {"optimizer": "adam_cm", "second_moment": "gradient", "boundary": "shrink", "factor": 0.5},
}
#: the settings of :class:`~strategies.CriticalMomentaPlugin` (its arguments): the buffer's policy at
#: boundaries, the κ schedule and the moments reset; in a recipe, the keys that configure the plugin
PLUGIN_SETTINGS = ("boundary", "factor", "min_size", "kappa_schedule", "kappa_start", "kappa_end", "reset_moments")

#: strategy name -> its own hyperparameters with make_strategy's defaults
STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {
    "naive": {},
    "ewc": {"ewc_lambda": 1.0, "mode": "separate", "decay_factor": None},
    "si": {"si_lambda": 1.0, "eps": 1e-7},
    "lwf": {"alpha": 1.0, "temperature": 2.0},
    "replay": {"mem_size": 200},
    "gem": {"patterns_per_exp": 64, "memory_strength": 0.5},
    "agem": {"patterns_per_exp": 64, "sample_size": 64},
}
STRATEGY_NAMES = tuple(STRATEGY_OPTIONS)

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


def check_strategy(name: str) -> str:
    """``name`` in lower case if it names a strategy, else a ``ValueError`` listing them."""
    key = name.lower() if isinstance(name, str) else name
    if key not in STRATEGY_OPTIONS:
        raise ValueError(f"Unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}.")
    return key


def strategy_options(name: str) -> dict[str, Any]:
    """The keyword arguments of strategy ``name`` with make_strategy's defaults."""
    return {**COMMON_STRATEGY_ARGS, **STRATEGY_OPTIONS[check_strategy(name)]}
