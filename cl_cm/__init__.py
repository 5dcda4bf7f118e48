"""cl_cm: Adam with Critical Momenta and its baselines, for continual learning.

``from cl_cm import AdamCM, AdamCG, SAM``; or by name:
``cl_cm.make_optimizer("adam_cm", model.parameters(), lr=1e-3)``.

The names are loaded on first use, so that ``cl_cm.names`` (which optimizers
exist and which keep a buffer) is available without importing torch.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

#: public name -> the module that defines it
_HOMES = {
    "AdamCM": "adam_cm", "adam_cm": "adam_cm",
    "AdamCG": "adam_cg", "adam_cg": "adam_cg",
    "SAM": "sam",
    "CriticalBufferOptimizer": "buffered_optimizer",
    "OPTIMIZERS": "registry", "OptimizerSpec": "registry", "buffered": "registry", "make_optimizer": "registry",
    "optimizer_options": "registry",
    "skipped_steps": "registry",
    "has_buffer": "names",
}

__all__ = ["AdamCM", "AdamCG", "SAM", "CriticalBufferOptimizer", "adam_cm", "adam_cg", "OPTIMIZERS",
           "OptimizerSpec", "make_optimizer", "optimizer_options", "buffered", "has_buffer", "skipped_steps",
           "__version__"]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        try:  # a submodule: cl_cm.norms, cl_cm.sharpness, ...
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # found once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``cl_cm.adam_cm`` and ``cl_cm.adam_cg`` name the functional cores, as
    they did when this package imported everything at once, also after the
    import system binds the submodules of the same names."""

    def __setattr__(self, name, value):
        if name in ("adam_cm", "adam_cg") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
