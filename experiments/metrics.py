"""Continual-learning metrics from the accuracy matrix, in one place.

R is T×T: R[k][i] is the test accuracy on experience i after training on
experiences 0..k (Lopez-Paz & Ranzato, "Gradient Episodic Memory", NeurIPS
2017, Sec. 4). Rows may be partial while a run is in progress.
"""
from __future__ import annotations

import math
from typing import Sequence

Matrix = Sequence[Sequence[float]]


def _square(r: Matrix) -> int:
    t = len(r)
    if t == 0 or any(len(row) != t for row in r):
        raise ValueError(f"the accuracy matrix must be T×T with T >= 1; got rows of lengths {[len(x) for x in r]}")
    return t


def average_accuracy(r: Matrix) -> float:
    """ACC = mean over i of R[T−1][i]: accuracy on every experience at the end."""
    t = _square(r)
    return sum(r[t - 1]) / t


def backward_transfer(r: Matrix) -> float:
    """BWT = mean over i < T−1 of R[T−1][i] − R[i][i] (GEM, Eq. 3): negative
    when learning later experiences hurts earlier ones. NaN when T = 1."""
    t = _square(r)
    if t == 1:
        return math.nan
    return sum(r[t - 1][i] - r[i][i] for i in range(t - 1)) / (t - 1)


def forgetting(r: Matrix) -> float:
    """F = mean over i < T−1 of max_{i <= k < T−1} R[k][i] − R[T−1][i]: the
    best accuracy on i before the end minus the final one (Chaudhry et al.,
    "Riemannian Walk", ECCV 2018, Eq. 3). NaN when T = 1."""
    t = _square(r)
    if t == 1:
        return math.nan
    return sum(max(r[k][i] for k in range(i, t - 1)) - r[t - 1][i] for i in range(t - 1)) / (t - 1)


def learning_accuracy(r: Matrix) -> float:
    """LA = mean over i of R[i][i]: accuracy on each experience right after
    learning it (Riemer et al., "Learning to Learn without Forgetting", ICLR 2019)."""
    t = _square(r)
    return sum(r[i][i] for i in range(t)) / t


def summary(r: Matrix) -> dict[str, float]:
    """All four metrics of a complete accuracy matrix."""
    return {"acc": average_accuracy(r), "bwt": backward_transfer(r), "forgetting": forgetting(r),
            "learning_accuracy": learning_accuracy(r)}
