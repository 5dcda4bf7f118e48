"""The optimizers of the comparisons by name, and which keep a buffer.

A table of names without torch, so that command lines and settings files can
be checked (and ``--help`` printed) without importing torch. The registry
(:mod:`cl_cm.registry`) builds each optimizer under these names and checks at
import that its classes agree with :data:`BUFFERED`.
"""
from __future__ import annotations

#: every optimizer ``cl_cm.make_optimizer`` builds, in the order comparisons list them
OPTIMIZER_NAMES = ("sgd", "adam", "adam_cg", "adam_sam", "adam_cm", "adam_cm_sam")

#: the optimizers that keep a buffer of critical entries: Adam+CG, Adam+CM, and SAM around Adam+CM
BUFFERED = ("adam_cg", "adam_cm", "adam_cm_sam")


def check_name(name: str) -> str:
    """``name`` in lower case if it names an optimizer, else a ``ValueError``
    listing the names."""
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}.")
    return key


def has_buffer(name: str) -> bool:
    """Whether optimizer ``name`` keeps a buffer of critical entries (so that
    buffer policies, buffer statistics and κ schedules apply to it)."""
    return check_name(name) in BUFFERED
