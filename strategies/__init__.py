"""Avalanche integration of cl_cm: Adam+CM in any Avalanche strategy.

``from strategies import CriticalMomentaPlugin``

Each name is imported on first use, so that :mod:`strategies.names` (the
strategies and buffer policies by name) and :mod:`strategies.errors` are
available without importing torch or Avalanche.
"""
from __future__ import annotations

import importlib

#: public name -> the module that defines it (a submodule, or cl_cm)
_HOMES = {
    "BatchedLoadingPlugin": "batched_loading",
    "CriticalMomentaPlugin": "critical_momenta", "buffered_optimizer": "critical_momenta",
    "kappa_at": "critical_momenta",
    "BOUNDARIES": "names", "KAPPA_SCHEDULES": "names", "COMMON_STRATEGY_ARGS": "names",
    "strategy_options": "names",
    "DataParallelPlugin": "data_parallel", "avalanche_as_single_process": "data_parallel",
    "SelectiveEvaluationPlugin": "evaluation",
    "FiniteLossPlugin": "finite_loss", "skipped_steps": "finite_loss",
    "NonFiniteLossError": "errors",
    "STRATEGIES": "factory", "make_strategy": "factory",
    "OPTIMIZERS": "cl_cm", "make_optimizer": "cl_cm", "optimizer_options": "cl_cm",  # the optimizers' home
    "BUFFER_STAT_KEYS": "metrics", "BufferStatsMetric": "metrics", "ParameterDistanceMetric": "metrics",
    "TaskILAccuracy": "metrics", "buffer_metrics": "metrics",
    "ResetMomentsPlugin": "moments", "reset_moments": "moments",
    "SAMPlugin": "sam",
    "ProgressBars": "progress",
    "recommended": "recipes", "recipe_parts": "recipes", "RECIPES": "names",
}

__all__ = [
    "CriticalMomentaPlugin", "SAMPlugin", "ResetMomentsPlugin", "reset_moments", "ParameterDistanceMetric",
    "BatchedLoadingPlugin", "SelectiveEvaluationPlugin", "DataParallelPlugin", "avalanche_as_single_process",
    "BufferStatsMetric", "TaskILAccuracy", "buffer_metrics", "make_strategy", "FiniteLossPlugin",
    "NonFiniteLossError", "skipped_steps", "ProgressBars", "make_optimizer", "optimizer_options",
    "strategy_options", "kappa_at", "buffered_optimizer", "BOUNDARIES", "KAPPA_SCHEDULES", "BUFFER_STAT_KEYS",
    "OPTIMIZERS", "STRATEGIES", "COMMON_STRATEGY_ARGS", "recommended", "recipe_parts", "RECIPES",
]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        try:  # a submodule: strategies.checkpointing, ...
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(home if home == "cl_cm" else f"{__name__}.{home}"), name)
    globals()[name] = value  # found once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
