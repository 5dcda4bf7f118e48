"""torch.compile for an update written per tensor, over the tensors of any
number of parameter groups, without ever falling back to eager silently.

A compiled function over "the tensors of this group" is specialised to their
number and shapes: every parameter group of another shape, and every model
that grows, is another graph, and once dynamo's recompile limit (8 per
function) is reached the rest runs uncompiled, without a word.
:class:`PerTensorCompiled` handles that:

* the tensors go in chunks of :data:`CHUNK` consecutive tensors: a group of
  another shape, or a model that grows, compiles the chunks it changes, once
  each, and chunks of the same shapes (layers that repeat, groups alike)
  share a graph;
* the per-step numbers (bias corrections, lr, κ/|B|, flags) enter as a
  ``(len(chunk), k)`` tensor, one row per tensor, so that new values never
  recompile;
* the compilations allowed are raised to :data:`RECOMPILE_LIMIT` for these
  calls, and hitting the limit raises instead of running eagerly.

Shapes stay static (not dynamic): on the CPU, inductor's kernels for static
shapes run as fast as torch's fused Adam per byte moved and compile faster,
and the Python cost per call is lower.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Sequence

import torch
from torch import Tensor

#: Tensors per compiled call.
CHUNK = 32
#: Graphs allowed per compiled function (distinct chunks of shapes in one process).
RECOMPILE_LIMIT = 1024


class PerTensorCompiled:
    """``fn(*lists, scalars)`` through torch.compile over chunks of the lists
    (see the module's docstring).

    ``fn`` takes ``len(lists)`` lists of tensors (a list may be None) and a
    ``(n, k)`` tensor holding the numbers of each tensor.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._compiled = None

    def __call__(self, lists: Sequence[list[Tensor] | None], scalars: list[Sequence[float]],
                 dtype: torch.dtype = torch.float32) -> None:
        """Run on every position of ``lists`` (each list aligned with the
        first) with ``scalars[i]`` the numbers of position i, in ``dtype``."""
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, fullgraph=True, dynamic=False)
        by_device = defaultdict(list)
        for i, t in enumerate(lists[0]):
            by_device[t.device].append(i)
        with _compile_settings():
            for device, idx in by_device.items():
                for start in range(0, len(idx), CHUNK):
                    part = idx[start:start + CHUNK]
                    table = torch.tensor([scalars[i] for i in part], dtype=dtype)
                    self._compiled(*(None if xs is None else [xs[i] for i in part] for xs in lists),
                                   table.to(device, non_blocking=True))


@contextlib.contextmanager
def _compile_settings():
    """A compilation limit that raises when hit, for the calls of this module only."""
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(recompile_limit=RECOMPILE_LIMIT, accumulated_recompile_limit=RECOMPILE_LIMIT,
                             fail_on_recompile_limit_hit=True):
        yield
