"""Buffer annealing across task boundaries: what happens to Adam+CM's memory
of critical momenta when a new experience begins, and how much weight (κ) the
buffer gets within each experience."""
from __future__ import annotations

import math
import numbers
import warnings

from avalanche.core import SupervisedPlugin

from cl_cm import CriticalBufferOptimizer, buffered

from .names import BOUNDARIES, KAPPA_SCHEDULES


def kappa_at(schedule: str, start: float, end: float, progress: float) -> float:
    """κ at ``progress`` ∈ [0, 1] through an experience: constant (start),
    linear from start to end, or cosine annealing from start to end
    (Loshchilov & Hutter's SGDR shape, one half-period per experience)."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"Unknown kappa_schedule {schedule!r}; use one of {KAPPA_SCHEDULES}.")


def buffered_optimizer(optimizer) -> CriticalBufferOptimizer:
    """The optimizer that holds the buffer: ``optimizer`` itself, or the base
    optimizer of a :class:`cl_cm.SAM`. Raises ``TypeError`` if there is none."""
    base = buffered(optimizer)
    if base is None:
        raise TypeError(
            "CriticalMomentaPlugin needs an optimizer with a critical buffer: cl_cm.AdamCM, cl_cm.AdamCG, "
            f"or cl_cm.SAM around one; the strategy's optimizer is {type(optimizer).__name__}. "
            "Build it with cl_cm.AdamCM(model.parameters(), ...) or strategies.make_optimizer('adam_cm', ...), "
            "or drop the plugin for this optimizer.")
    return base


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"Invalid {name}: {value!r}. It must lie in (0, 1], e.g. {name}=0.5.")
    return float(value)


class CriticalMomentaPlugin(SupervisedPlugin):
    """Adam+CM (or Adam+CG) in any Avalanche strategy, with buffer annealing.

    At every experience boundary (before training each experience after the
    first) it applies ``boundary``:

    * ``"keep"``: the buffer carries over unchanged;
    * ``"reset"``: the buffer is emptied;
    * ``"decay"``: stored momenta and their priorities are multiplied by
      ``factor``, so old-task momenta weigh less and are replaced sooner;
    * ``"shrink"``: capacity becomes max(``min_size``, floor(capacity·``factor``)),
      keeping the highest-priority entries; capacity 0 frees the buffer.

    Within each experience, κ (the weight of mean(B) in d_t) follows
    ``kappa_schedule`` from ``kappa_start`` to ``kappa_end`` over the
    experience's iterations, restarting at every experience: ``"constant"``
    (κ = ``kappa_start``, or the optimizer's own κ when None), ``"linear"`` or
    ``"cosine"``. ``kappa_start=None`` means each group's κ when the plugin
    first sees it.

    ``reset_moments=True`` also zeroes Adam's m, v and step counts at each
    boundary, keeping the buffer. Avalanche's own
    ``strategy.train(exp, reset_optimizer_state=True)`` is different: it
    replaces the whole optimizer state, buffer included, *before* this plugin
    runs, so every policy then starts from an empty buffer (the plugin warns).

    The plugin reads ``strategy.optimizer`` afresh at every callback, so
    strategies that replace their optimizer keep working; parameters added by a
    growing model get buffers from the optimizer itself.
    """

    @classmethod
    def recipe(cls, name: str = "recommended", **kwargs) -> "CriticalMomentaPlugin":
        """The plugin with the boundary policy of a named recipe
        (:data:`strategies.names.RECIPES`; ``kwargs`` add to it). Pair it with
        the recipe's optimizer: :func:`strategies.recommended` builds both."""
        from .recipes import recipe_parts

        return cls(**{**recipe_parts(name)[2], **kwargs})

    def __init__(self, boundary: str = "keep", factor: float | None = None, min_size: int = 0,
                 kappa_schedule: str = "constant", kappa_start: float | None = None,
                 kappa_end: float | None = None, reset_moments: bool = False) -> None:
        super().__init__()
        if boundary not in BOUNDARIES:
            raise ValueError(f"Unknown boundary {boundary!r}; use one of {BOUNDARIES}.")
        if boundary in ("decay", "shrink"):
            if factor is None:
                raise ValueError(f"boundary={boundary!r} needs a factor in (0, 1], e.g. factor=0.5.")
            factor = _check_fraction("factor", factor)
        elif factor is not None:
            raise ValueError(f"factor is only used by boundary='decay' or 'shrink', not {boundary!r}; remove it.")
        if isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral) or min_size < 0:
            raise ValueError(f"Invalid min_size: {min_size!r}. It must be an int >= 0.")
        if min_size and boundary != "shrink":
            raise ValueError("min_size is only used by boundary='shrink'; remove it.")
        if kappa_schedule not in KAPPA_SCHEDULES:
            raise ValueError(f"Unknown kappa_schedule {kappa_schedule!r}; use one of {KAPPA_SCHEDULES}.")
        for name, value in (("kappa_start", kappa_start), ("kappa_end", kappa_end)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not (math.isfinite(value) and value >= 0)):
                raise ValueError(f"Invalid {name}: {value!r}. It must be a finite float >= 0.")
        if kappa_schedule == "constant" and kappa_end is not None:
            raise ValueError("kappa_end is only used by kappa_schedule='linear' or 'cosine'; remove it.")
        if kappa_schedule != "constant" and kappa_end is None:
            raise ValueError(f"kappa_schedule={kappa_schedule!r} needs kappa_end, e.g. kappa_end=0.0.")
        self.boundary = boundary
        self.factor = factor
        self.min_size = int(min_size)
        self.kappa_schedule = kappa_schedule
        self.kappa_start = kappa_start
        self.kappa_end = kappa_end
        self.reset_moments = bool(reset_moments)
        #: Number of boundaries at which the policy was applied.
        self.boundaries_applied = 0
        self._starts: list[float] = []
        self._iteration = 0
        self._iterations = 1
        self._size_at_end: int | None = None

    # ------------------------------------------------------------ callbacks
    def before_training_exp(self, strategy, **kwargs):
        opt = buffered_optimizer(strategy.optimizer)
        if strategy.clock.train_exp_counter > 0:
            self._apply_boundary(opt)
        self._start_experience(strategy, opt)

    def before_training_iteration(self, strategy, **kwargs):
        if self.kappa_schedule == "constant":
            return
        opt = buffered_optimizer(strategy.optimizer)
        self._record_starts(opt)
        progress = self._iteration / max(self._iterations - 1, 1)
        for group, start in zip(opt.param_groups, self._starts):
            group["kappa"] = kappa_at(self.kappa_schedule, start, self.kappa_end, progress)
        self._iteration += 1

    def after_training_exp(self, strategy, **kwargs):
        self._size_at_end = buffered_optimizer(strategy.optimizer).buffer_stats(reset=False)["size"]

    # -------------------------------------------------------------- helpers
    def _apply_boundary(self, opt: CriticalBufferOptimizer) -> None:
        size = opt.buffer_stats(reset=False)["size"]
        if size == 0 and self._size_at_end and self.boundary != "reset":
            warnings.warn(
                f"CriticalMomentaPlugin(boundary={self.boundary!r}): the buffer was already empty at this "
                "boundary, because the optimizer state was replaced before the plugin ran (Avalanche's "
                "train(..., reset_optimizer_state=True) does this). To reset Adam's moments but keep or "
                "anneal the buffer, train without reset_optimizer_state and pass reset_moments=True.",
                RuntimeWarning, stacklevel=3)
        if self.reset_moments:
            opt.reset_moments()
        if self.boundary == "reset":
            opt.reset_buffer()
        elif self.boundary == "decay":
            opt.decay_buffer(self.factor)
        elif self.boundary == "shrink":
            opt.resize_buffer([max(self.min_size, math.floor(g["buffer_size"] * self.factor))
                               for g in opt.param_groups])
        self.boundaries_applied += 1

    def _record_starts(self, opt: CriticalBufferOptimizer) -> None:
        for group in opt.param_groups[len(self._starts):]:
            self._starts.append(group["kappa"] if self.kappa_start is None else self.kappa_start)

    def _start_experience(self, strategy, opt: CriticalBufferOptimizer) -> None:
        self._record_starts(opt)
        self._iteration = 0
        if self.kappa_schedule == "constant":
            if self.kappa_start is not None:
                for group in opt.param_groups:
                    group["kappa"] = self.kappa_start
            return
        try:
            self._iterations = len(strategy.dataloader) * strategy.train_epochs
        except TypeError:
            raise ValueError(
                f"kappa_schedule={self.kappa_schedule!r} needs the number of iterations of each experience, "
                "but the strategy's dataloader has no len(); use kappa_schedule='constant'.") from None
