"""Errors raised by the plugins, importable without torch or Avalanche."""
from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf: the run's results would be meaningless."""
