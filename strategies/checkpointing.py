"""What Avalanche's checkpoints (``avalanche.checkpointing``) need to save and
load a whole strategy: torch's optimizer classes found by reference, and the
plugins' loader iterators set aside."""
from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Iterator

# Plugins that keep an iterator over a loader of theirs: (iterator attribute, loader attribute).
# A-GEM draws its memory batches from ``buffer_dliter = iter(buffer_dataloader)``,
# a generator, which pickle cannot copy.
PLUGIN_ITERATORS = (("buffer_dliter", "buffer_dataloader"),)


def optimizers_by_reference() -> None:
    """Let dill pickle torch's optimizer classes by reference.

    Avalanche's checkpoints pickle the strategy with dill, which finds a class
    through its module's attribute on the parent package. ``torch.optim``
    deletes those attributes (``torch.optim.sgd``, ...), so dill would copy
    torch's optimizer classes by value and fail; putting the loaded modules
    back lets it pickle them by reference, as plain pickle does. Call it
    before saving or loading a checkpoint; calling it again does nothing new."""
    import torch.optim

    for name, module in list(sys.modules.items()):
        if name.startswith("torch.optim.") and name.count(".") == 2 and module is not None:
            setattr(torch.optim, name.rsplit(".", 1)[1], module)


@contextlib.contextmanager
def iterators_set_aside(strategy) -> Iterator[None]:
    """Save a checkpoint without the plugins' iterators. They are recreated
    on loading (:func:`restore_iterators`), which is exact only for an
    iterator not started yet, as A-GEM's is after an experience (it makes a
    new one in ``after_training_exp``); a started one is refused rather than
    restarted."""
    aside = []
    for plugin in strategy.plugins:
        for name, _ in PLUGIN_ITERATORS:
            value = getattr(plugin, name, None)
            if inspect.isgenerator(value):
                if inspect.getgeneratorstate(value) != inspect.GEN_CREATED:
                    raise RuntimeError(f"{type(plugin).__name__}.{name} has been started; a checkpoint cannot "
                                       "restore its position")
                aside.append((plugin, name, value))
                setattr(plugin, name, None)
    try:
        yield
    finally:
        for plugin, name, value in aside:
            setattr(plugin, name, value)


def restore_iterators(strategy) -> None:
    """After loading a checkpoint: the iterators :func:`iterators_set_aside` left out, made afresh."""
    for plugin in strategy.plugins:
        for name, loader in PLUGIN_ITERATORS:
            if hasattr(plugin, name) and getattr(plugin, name) is None and getattr(plugin, loader, None) is not None:
                setattr(plugin, name, iter(getattr(plugin, loader)))
