"""Sharpness of a loss at the model's current parameters: the top Hessian
eigenvalue and the Hessian trace.

Malviya et al. (2024) report that Adam+CM settles in flatter minima than Adam;
these two numbers check that claim, and record how sharp each task's solution
is in continual learning.

* :func:`top_hessian_eigenvalue`: power iteration on Hessian-vector products,
  as in Yao, Gholami, Keutzer and Mahoney, "PyHessian: Neural Networks Through
  the Lens of the Hessian" (2020), and Golmant et al.'s ``hessian-eigenthings``.
* :func:`hessian_trace`: Hutchinson's estimator tr(H) = E[vᵀHv] for Rademacher
  v (Hutchinson, "A stochastic estimator of the trace of the influence matrix
  for Laplacian smoothing splines", 1990), also as in PyHessian.

Hessian-vector products use double backpropagation (Pearlmutter, 1994):
Hv = ∇_θ(∇_θL · v). The loss is the sample-weighted average over all batches,
L = (1/N) Σ_b n_b · criterion(model(x_b), y_b), with ``criterion`` returning the
batch mean, so H is the Hessian of the average loss over the N samples given.

``data`` is a re-iterable of batches (a list of tuples or a DataLoader without
random augmentation); a batch is ``(inputs, targets, *rest)`` and ``rest``
(e.g. Avalanche's task labels) is ignored. Batches are moved to the device of
the model's first trainable parameter. Only parameters with
``requires_grad=True`` count. The model keeps its current mode: the caller
chooses (usually ``model.eval()``; in train mode Dropout makes Hv random and
BatchNorm uses batch statistics). Parameters, ``.grad`` fields and buffers
(e.g. BatchNorm running statistics) are left as they were.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["top_hessian_eigenvalue", "hessian_trace", "EigenvalueInfo", "TraceInfo"]

Criterion = Callable[[Any, Any], Tensor]

# Hutchinson's early stop trusts the standard error only after this many samples.
MIN_TRACE_SAMPLES = 10


@dataclass(frozen=True)
class EigenvalueInfo:
    """Result of :func:`top_hessian_eigenvalue` with ``return_info=True``.

    ``value``: the last Rayleigh quotient vᵀHv; ``iterations``: Hessian-vector
    products done; ``converged``: whether the relative change fell below
    ``tol``; ``history``: the Rayleigh quotient after each iteration.
    """

    value: float
    iterations: int
    converged: bool
    history: list[float]


@dataclass(frozen=True)
class TraceInfo:
    """Result of :func:`hessian_trace` with ``return_info=True``.

    ``value``: the mean of the samples vᵀHv; ``stderr``: its standard error
    (sample standard deviation / √samples; NaN for one sample); ``samples``:
    how many were drawn; ``converged``: ``None`` without ``tol``, else whether
    stderr ≤ tol·|value| was reached; ``history``: the individual vᵀHv.
    """

    value: float
    stderr: float
    samples: int
    converged: bool | None
    history: list[float]


# ------------------------------------------------------------------ helpers
def _trainable(model: nn.Module) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad")
    return params


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if type(obj) in (list, tuple):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def _batch_size(x: Any, y: Any) -> int:
    for t in (x, y):
        if isinstance(t, Tensor) and t.dim() > 0:
            return t.shape[0]
    return len(x)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Σ a·b over all tensors, accumulated in float64."""
    return math.fsum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()).item()
                     for x, y in zip(a, b))


def _random(params: Sequence[Tensor], gen: torch.Generator, rademacher: bool) -> list[Tensor]:
    """One random vector shaped like ``params``, drawn on the CPU so that a seed
    gives the same vector on every device."""
    out = []
    for p in params:
        if rademacher:
            r = torch.randint(0, 2, p.shape, generator=gen).mul_(2).sub_(1)
        else:
            r = torch.randn(p.shape, generator=gen)
        out.append(r.to(device=p.device, dtype=p.dtype))
    return out


def _hvp(model: nn.Module, criterion: Criterion, data: Iterable, params: list[Tensor],
         v: list[Tensor]) -> list[Tensor]:
    """H·v for the sample-weighted average loss over ``data``."""
    device = params[0].device
    out = [torch.zeros_like(p) for p in params]
    total = 0
    with torch.enable_grad():
        for batch in data:
            x, y = _to(batch[0], device), _to(batch[1], device)
            n = _batch_size(x, y)
            if n == 0:
                continue
            loss = criterion(model(x), y)
            if loss.dim() != 0:
                raise ValueError("criterion must return a scalar (use mean reduction)")
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            used = [(g, u) for g, u in zip(grads, v) if g is not None and g.requires_grad]
            if used:
                hv = torch.autograd.grad([g for g, _ in used], params,
                                         grad_outputs=[u for _, u in used], allow_unused=True)
                for o, h in zip(out, hv):
                    if h is not None:
                        o.add_(h.detach(), alpha=n)
            total += n
    if total == 0:
        raise ValueError("data is empty: no samples to compute the loss over")
    return [o.div_(total) for o in out]


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers (BatchNorm running statistics in train mode)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)


# ------------------------------------------------------------------ public
def top_hessian_eigenvalue(model: nn.Module, criterion: Criterion, data: Iterable, *,
                           iters: int = 100, tol: float = 1e-4, seed: int = 0,
                           return_info: bool = False) -> float | EigenvalueInfo:
    """The Hessian eigenvalue of largest magnitude, by power iteration.

    Starting from a Gaussian vector (a ``torch.Generator`` seeded with
    ``seed``: the same seed gives exactly the same result on the CPU), repeat
    v ← Hv/‖Hv‖ and stop when the Rayleigh quotient λ = vᵀHv (‖v‖ = 1) changes
    by at most ``tol``·|λ| between iterations. One Hessian-vector product per
    iteration, each a full pass over ``data``.

    Power iteration finds the eigenvalue of largest *magnitude*, with its sign.
    At a minimum H is positive semi-definite and this is the largest eigenvalue,
    the usual sharpness; away from one, a large negative eigenvalue can win. The
    convergence rate is |λ₂/λ₁|, so a small gap needs more iterations (and a
    small change per iteration does not bound the error then).

    If ``iters`` is exhausted first, a :class:`RuntimeWarning` is issued and the
    last estimate returned (``converged=False`` in the info).

    Returns:
        λ as a float, or an :class:`EigenvalueInfo` if ``return_info``.
    """
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if tol < 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    params = _trainable(model)
    gen = torch.Generator().manual_seed(seed)
    v = _random(params, gen, rademacher=False)
    norm = math.sqrt(_dot(v, v))
    v = [t / norm for t in v]
    history: list[float] = []
    converged = False
    with _buffers_kept(model):
        for i in range(iters):
            hv = _hvp(model, criterion, data, params, v)
            history.append(_dot(v, hv))
            if i > 0 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
                converged = True
                break
            norm = math.sqrt(_dot(hv, hv))
            if norm == 0.0:  # Hv = 0: v is in the null space (H = 0 almost surely)
                converged = True
                break
            v = [t / norm for t in hv]
    if not converged:
        warnings.warn(f"top_hessian_eigenvalue did not converge in {iters} iterations "
                      f"(tol={tol}); returning the last estimate", RuntimeWarning, stacklevel=2)
    info = EigenvalueInfo(history[-1], len(history), converged, history)
    return info if return_info else info.value


def hessian_trace(model: nn.Module, criterion: Criterion, data: Iterable, *,
                  samples: int = 100, tol: float | None = None, seed: int = 0,
                  return_info: bool = False) -> float | TraceInfo:
    """The Hessian trace by Hutchinson's estimator: the mean of vᵀHv over
    ``samples`` Rademacher vectors v (entries ±1, from a ``torch.Generator``
    seeded with ``seed``).

    Each sample is unbiased with variance 2·Σ_{i≠j} H_ij², so a diagonal
    Hessian gives the exact trace with every sample. With ``tol``, sampling
    stops early once the standard error is at most ``tol``·|mean| (checked
    from the :data:`MIN_TRACE_SAMPLES`-th sample on); if ``samples`` run out
    first, a :class:`RuntimeWarning` is issued. Without ``tol``, exactly
    ``samples`` are drawn and no convergence is claimed.

    Returns:
        the estimate as a float, or a :class:`TraceInfo` (with the standard
        error) if ``return_info``.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if tol is not None and tol < 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    params = _trainable(model)
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    converged: bool | None = None if tol is None else False
    with _buffers_kept(model):
        for _ in range(samples):
            v = _random(params, gen, rademacher=True)
            history.append(_dot(v, _hvp(model, criterion, data, params, v)))
            if (tol is not None and len(history) >= MIN_TRACE_SAMPLES
                    and _stderr(history) <= tol * abs(_mean(history))):
                converged = True
                break
    if converged is False:
        warnings.warn(f"hessian_trace did not reach a relative standard error of {tol} "
                      f"in {samples} samples", RuntimeWarning, stacklevel=2)
    info = TraceInfo(_mean(history), _stderr(history), len(history), converged, history)
    return info if return_info else info.value


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def _stderr(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return math.nan
    m = _mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
