"""Every optimizer of the comparisons, by name, with its options.

``make_optimizer("adam_cm", model.parameters(), lr=1e-3, buffer_size=5)``
builds one; ``optimizer_options("adam_cm")`` lists the keyword arguments it
takes with their defaults. The defaults are read from the classes' own
signatures (``AdamCM.__init__``, ``torch.optim.AdamW.__init__``, ``SAM``'s
``rho`` and ``adaptive``), so each has one home; an entry changes one only
where the comparison needs it, and says why.

=============  =====================================================
name           optimizer
=============  =====================================================
sgd            ``torch.optim.SGD`` (lr 0.01)
adam           ``torch.optim.AdamW`` with weight_decay 0: decoupled
               decay as in AdamCM, so comparisons differ in the buffer only
adam_cg        :class:`~cl_cm.AdamCG`
adam_sam       :class:`~cl_cm.SAM` around AdamW (weight_decay 0)
adam_cm        :class:`~cl_cm.AdamCM`
adam_cm_sam    :class:`~cl_cm.SAM` around AdamCM
=============  =====================================================
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch.optim import Optimizer

from .adam_cg import AdamCG
from .adam_cm import AdamCM
from .buffered_optimizer import CriticalBufferOptimizer
from .names import BUFFERED, OPTIMIZER_NAMES, check_name, has_buffer  # noqa: F401 (has_buffer re-exported)
from .sam import SAM


def _own_options(cls: type, skip: tuple[str, ...] = ("self", "params")) -> dict[str, Any]:
    """The keyword arguments of ``cls`` with their defaults, from its signature."""
    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = p.default
    return out


@dataclass(frozen=True)
class OptimizerSpec:
    """One named optimizer: a class, optionally wrapped in :class:`SAM`, and
    the defaults that differ from the class's own."""

    name: str
    cls: type[Optimizer]
    sam: bool = False
    changed: Mapping[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """Every keyword argument this optimizer takes, with its default."""
        out = _own_options(self.cls)
        if self.sam:
            out.update(_own_options(SAM, skip=("self", "params", "base_optimizer")))
        out.update(self.changed)
        return out

    @property
    def buffered(self) -> bool:
        """Whether it keeps a buffer of critical entries (Adam+CM, Adam+CG)."""
        return issubclass(self.cls, CriticalBufferOptimizer)

    def __call__(self, params: Iterable, **kwargs) -> Optimizer:
        options = self.options()
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise ValueError(f"make_optimizer({self.name!r}) got unknown argument(s) "
                             f"{', '.join(map(repr, unknown))}; it takes: {', '.join(options)}.")
        for key, value in kwargs.items():
            _check_finite(key, value)
        if isinstance(kwargs.get("betas"), list):
            kwargs["betas"] = tuple(kwargs["betas"])
        args = {**self.changed, **kwargs}
        if self.sam:
            return SAM(params, self.cls, **args)
        return self.cls(params, **args)


def _check_finite(key: str, value: Any) -> None:
    values = value if isinstance(value, (tuple, list)) else [value]
    for v in values:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = float(v)
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isfinite(v):
            raise ValueError(f"Invalid {key}: {value!r}. {key} must be finite.")


_NO_DECAY = {"weight_decay": 0.0}  # AdamW's default is 0.01; the comparisons use decay only where asked

#: name -> :class:`OptimizerSpec`; calling an entry builds the optimizer.
OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    OptimizerSpec("sgd", torch.optim.SGD, changed={"lr": 0.01}),
    OptimizerSpec("adam", torch.optim.AdamW, changed=_NO_DECAY),
    OptimizerSpec("adam_cg", AdamCG),
    OptimizerSpec("adam_sam", torch.optim.AdamW, sam=True, changed=_NO_DECAY),
    OptimizerSpec("adam_cm", AdamCM),
    OptimizerSpec("adam_cm_sam", AdamCM, sam=True),
)}
if tuple(OPTIMIZERS) != OPTIMIZER_NAMES or {n for n, s in OPTIMIZERS.items() if s.buffered} != set(BUFFERED):
    raise ImportError("cl_cm.names and cl_cm.registry disagree on the optimizers or on which keep a buffer")


def _spec(name: str) -> OptimizerSpec:
    return OPTIMIZERS[check_name(name)]


def optimizer_options(name: str) -> dict[str, Any]:
    """The keyword arguments of optimizer ``name`` with their defaults."""
    return _spec(name).options()


def make_optimizer(name: str, params: Iterable, **kwargs) -> Optimizer:
    """Build optimizer ``name`` (sgd, adam, adam_cg, adam_sam, adam_cm, adam_cm_sam).

    Every constructor argument of the class (and SAM's ``rho`` and
    ``adaptive``) is accepted; unknown keyword arguments and non-finite
    numbers raise a ``ValueError`` that names them.
    """
    return _spec(name)(params, **kwargs)


def buffered(optimizer: Optimizer) -> CriticalBufferOptimizer | None:
    """The optimizer that holds the buffer: ``optimizer`` itself (AdamCM,
    AdamCG), the base optimizer of a :class:`SAM` around one, or None."""
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    return base if isinstance(base, CriticalBufferOptimizer) else None


def skipped_steps(optimizer: Optimizer) -> int:
    """Optimizer steps skipped for NaN/Inf gradients: ``skipped_steps`` of a
    cl_cm optimizer (AdamCM, AdamCG) and of a SAM wrapper with its base
    optimizer; 0 for torch's optimizers, which never skip a step."""
    base = getattr(optimizer, "base_optimizer", None)
    return int(getattr(optimizer, "skipped_steps", 0)) + (int(getattr(base, "skipped_steps", 0)) if base else 0)
