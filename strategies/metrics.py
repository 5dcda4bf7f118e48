"""Buffer statistics, parameter distances and task-incremental accuracy as
Avalanche metrics, so they reach Avalanche's loggers."""
from __future__ import annotations

import math

from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name

from cl_cm import buffered

BUFFER_STAT_KEYS = ("size", "capacity", "mean_priority", "replacement_rate", "exploration",
                    "cosine_similarity")
EMIT_AT = ("iteration", "epoch", "experience")


class BufferStatsMetric(PluginMetric):
    """The optimizer's :meth:`~cl_cm.AdamCM.buffer_stats` as metric values.

    One metric object reads ``buffer_stats()`` once per emission and reports
    one value per key, named ``Buffer_<key>/train_phase/train_stream/ExpNNN``:

    * ``size`` and ``capacity`` of the buffer;
    * ``replacement_rate`` since the previous emission;
    * ``exploration`` = ‖mean(B)‖ / ‖m‖;
    * ``cosine_similarity``: mean pairwise cosine of the stored entries, the
      paper's gradient-cancellation diagnostic (high for CM, low for CG);
    * ``mean_priority``.

    ``every`` is "iteration", "epoch" (default) or "experience". With an
    optimizer without a buffer (plain Adam, SGD) it reports nothing, so one
    evaluator serves every optimizer of a comparison. Text, interactive,
    TensorBoard and W&B loggers show the values; Avalanche's CSVLogger writes
    only its fixed accuracy and loss columns.
    """

    def __init__(self, every: str = "epoch", keys=BUFFER_STAT_KEYS) -> None:
        super().__init__()
        if every not in EMIT_AT:
            raise ValueError(f"Unknown every={every!r}; use one of {EMIT_AT}.")
        unknown = set(keys) - set(BUFFER_STAT_KEYS)
        if unknown:
            raise ValueError(f"Unknown buffer statistics {sorted(unknown)}; choose from {BUFFER_STAT_KEYS}.")
        self.every = every
        self.keys = tuple(keys)
        self._last: dict[str, float] = {}

    def reset(self) -> None:
        self._last = {}

    def result(self) -> dict[str, float]:
        return dict(self._last)

    def _emit(self, strategy):
        opt = buffered(strategy.optimizer)
        if opt is None:
            return None
        stats = opt.buffer_stats()
        self._last = {k: float(stats[k]) for k in self.keys}
        x = strategy.clock.train_iterations
        return [MetricValue(self, get_metric_name(f"Buffer_{k}", strategy, add_experience=True, add_task=False),
                            v, x) for k, v in self._last.items()]

    @property
    def active_callbacks(self) -> frozenset[str]:
        """The one callback at which it reads the statistics (what
        :class:`strategies.SelectiveEvaluationPlugin` forwards to it)."""
        return frozenset({"after_training_exp" if self.every == "experience" else f"after_training_{self.every}"})

    def after_training_iteration(self, strategy):
        return self._emit(strategy) if self.every == "iteration" else None

    def after_training_epoch(self, strategy):
        return self._emit(strategy) if self.every == "epoch" else None

    def after_training_exp(self, strategy):
        return self._emit(strategy) if self.every == "experience" else None

    def __str__(self) -> str:
        return "BufferStats"


def buffer_metrics(every: str = "epoch", keys=BUFFER_STAT_KEYS) -> list[PluginMetric]:
    """The buffer metrics, for ``EvaluationPlugin(*buffer_metrics(), ...)``."""
    return [BufferStatsMetric(every=every, keys=keys)]


class ParameterDistanceMetric(PluginMetric):
    """How far training moves the parameters: after each experience k,
    ``Distance_experience`` = ‖θ_k − θ_{k−1}‖₂ (from the start of the
    experience) and ``Distance_init`` = ‖θ_k − θ_0‖₂ (from initialisation),
    over all parameters. A parameter created during training (a new head)
    counts from its value when it first appears. The distance travelled per
    task is the quantity Mirzadeh et al. (2020, "Understanding the Role of
    Training Regimes in Continual Learning", Sec. 3) relate to forgetting."""

    def __init__(self) -> None:
        super().__init__()
        self._init: dict[str, object] = {}
        self._start: dict[str, object] = {}
        self._last: dict[str, float] = {}

    def reset(self) -> None:
        self._last = {}

    def result(self) -> dict[str, float]:
        return dict(self._last)

    def before_training_exp(self, strategy):
        params = {name: p.detach().clone() for name, p in strategy.model.named_parameters()}
        for name, value in params.items():
            self._init.setdefault(name, value)
        self._start = params
        return None

    def after_training_exp(self, strategy):
        import torch

        per_exp = init = torch.zeros((), dtype=torch.float64)
        for name, p in strategy.model.named_parameters():
            now = p.detach().double()
            start = self._start.get(name, self._init.get(name))
            first = self._init.get(name, start)
            if start is not None:
                per_exp = per_exp + (now - start.double()).pow(2).sum()
            if first is not None:
                init = init + (now - first.double()).pow(2).sum()
        self._last = {"experience": float(per_exp.sqrt()), "init": float(init.sqrt())}
        x = strategy.clock.train_iterations
        return [MetricValue(self, get_metric_name(f"Distance_{k}", strategy, add_experience=True, add_task=False),
                            v, x) for k, v in self._last.items()]

    def __str__(self) -> str:
        return "ParameterDistance"


class TaskILAccuracy(PluginMetric):
    """Accuracy with the logits masked to the classes of the evaluated
    experience: the task-incremental accuracy of a single-head model (van de
    Ven & Tolias 2019, "Three scenarios for continual learning": task-IL
    evaluation of a class-IL model). One value per evaluated experience,
    named ``Top1_TaskIL_Acc_Exp/eval_phase/test_stream/ExpNNN``."""

    def __init__(self):
        super().__init__()
        self.correct = self.total = 0

    def reset(self):
        self.correct = self.total = 0

    def result(self):
        return self.correct / self.total if self.total else math.nan

    def before_eval_exp(self, strategy):
        self.reset()

    def after_eval_iteration(self, strategy):
        import torch

        classes = torch.tensor(sorted(strategy.experience.classes_in_this_experience),
                               device=strategy.mb_output.device)
        pred = classes[strategy.mb_output[:, classes].argmax(dim=1)]
        self.correct += int((pred == strategy.mb_y).sum())
        self.total += len(strategy.mb_y)

    def after_eval_exp(self, strategy):
        name = f"Top1_TaskIL_Acc_Exp/eval_phase/test_stream/Exp{strategy.experience.current_experience:03d}"
        return [MetricValue(self, name, self.result(), strategy.clock.train_iterations)]

    def __str__(self):
        return "Top1_TaskIL_Acc_Exp"
