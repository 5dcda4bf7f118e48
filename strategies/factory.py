"""Factories for the usual combinations of optimizer and Avalanche strategy."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
from avalanche.training.supervised import AGEM, EWC, GEM, LwF, Naive, Replay, SynapticIntelligence
from torch import nn

from cl_cm import SAM, AdamCG, AdamCM

from .sam import SAMPlugin


# ------------------------------------------------------------------ optimizers
def _sgd(params, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _adam(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
    # decoupled weight decay, as in AdamCM and AdamCG, so that comparisons differ only in the buffer
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _adam_cg(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
             buffer_size: int = 5, decay: float = 0.7, kappa: float = 1.0, buffer_dtype=None):
    return AdamCG(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                  buffer_size=buffer_size, decay=decay, kappa=kappa, buffer_dtype=buffer_dtype)


def _adam_cm(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
             buffer_size: int = 5, decay: float = 0.7, kappa: float = 1.0,
             second_moment: str = "aggregated", buffer_dtype=None):
    return AdamCM(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, buffer_size=buffer_size,
                  decay=decay, kappa=kappa, second_moment=second_moment, buffer_dtype=buffer_dtype)


def _adam_sam(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
              rho: float = 0.05, adaptive: bool = False):
    return SAM(params, torch.optim.AdamW, rho=rho, adaptive=adaptive, lr=lr, betas=betas, eps=eps,
               weight_decay=weight_decay)


def _adam_cm_sam(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, buffer_size: int = 5, decay: float = 0.7, kappa: float = 1.0,
                 second_moment: str = "aggregated", buffer_dtype=None, rho: float = 0.05,
                 adaptive: bool = False):
    return SAM(params, AdamCM, rho=rho, adaptive=adaptive, lr=lr, betas=betas, eps=eps,
               weight_decay=weight_decay, buffer_size=buffer_size, decay=decay, kappa=kappa,
               second_moment=second_moment, buffer_dtype=buffer_dtype)


#: name -> builder; a builder's keyword arguments and defaults are the options of that optimizer.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adam_cg": _adam_cg,
    "adam_sam": _adam_sam,
    "adam_cm": _adam_cm,
    "adam_cm_sam": _adam_cm_sam,
}


def optimizer_options(name: str) -> dict[str, Any]:
    """The keyword arguments of optimizer ``name`` with their defaults."""
    builder = _lookup(OPTIMIZERS, name, "optimizer")
    return {k: p.default for k, p in inspect.signature(builder).parameters.items() if k != "params"}


def make_optimizer(name: str, params: Iterable, **kwargs) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (sgd, adam, adam_cg, adam_sam, adam_cm, adam_cm_sam).

    "adam" is torch's AdamW with weight_decay 0 by default (decoupled decay, as
    in AdamCM); the SAM variants wrap AdamW and AdamCM. Unknown keyword
    arguments raise a ``ValueError`` that lists the valid ones.
    """
    builder = _lookup(OPTIMIZERS, name, "optimizer")
    _check_kwargs(f"make_optimizer({name!r})", kwargs, optimizer_options(name))
    return builder(params, **kwargs)


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
