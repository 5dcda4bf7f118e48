"""Avalanche integration of cl_cm: Adam+CM in any Avalanche strategy.

``from strategies import CriticalMomentaPlugin``
"""
from .batched_loading import BatchedLoadingPlugin
from .critical_momenta import BOUNDARIES, KAPPA_SCHEDULES, CriticalMomentaPlugin, buffered_optimizer, kappa_at
from .data_parallel import DataParallelPlugin, avalanche_as_single_process
from .evaluation import SelectiveEvaluationPlugin
from .finite_loss import FiniteLossPlugin, NonFiniteLossError, skipped_steps
from .factory import (COMMON_STRATEGY_ARGS, OPTIMIZERS, STRATEGIES, make_optimizer, make_strategy,
                      optimizer_options, strategy_options)
from .metrics import BUFFER_STAT_KEYS, BufferStatsMetric, ParameterDistanceMetric, buffer_metrics
from .moments import ResetMomentsPlugin, reset_moments
from .sam import SAMPlugin

__all__ = [
    "CriticalMomentaPlugin", "SAMPlugin", "ResetMomentsPlugin", "reset_moments", "ParameterDistanceMetric",
    "BatchedLoadingPlugin", "SelectiveEvaluationPlugin", "DataParallelPlugin", "avalanche_as_single_process",
    "BufferStatsMetric", "buffer_metrics", "make_strategy", "FiniteLossPlugin", "NonFiniteLossError", "skipped_steps",
    "make_optimizer", "optimizer_options", "strategy_options", "kappa_at", "buffered_optimizer",
    "BOUNDARIES", "KAPPA_SCHEDULES", "BUFFER_STAT_KEYS", "OPTIMIZERS", "STRATEGIES", "COMMON_STRATEGY_ARGS",
]
