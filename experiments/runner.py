"""One continual-learning run: Avalanche's training loop, with the accuracy
matrix, timings and buffer statistics written to a results folder, and a
checkpoint after every experience so that a killed run resumes where it
stopped.

A run folder holds:

* ``config.json``: every argument (protocol filled in from the preset), the
  seed, package versions and the git commit;
* ``metrics.json``: the accuracy matrix and the metrics of
  :mod:`experiments.metrics`, timings, buffer statistics (written last, atomically:
  its presence means the run is complete);
* ``checkpoint.pkl`` (and ``checkpoint.prev.pkl``, the one before) while the
  run is unfinished: Avalanche's checkpoint of the whole strategy, RNG states
  included, with an authentication tag (:mod:`experiments.checkpoint`).

A run whose training loss becomes NaN or Inf stops with
:class:`strategies.NonFiniteLossError`; optimizer steps skipped for NaN or
Inf gradients are counted in ``metrics.json`` (``skipped_steps``).
"""
from __future__ import annotations

import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from strategies.checkpointing import iterators_set_aside, optimizers_by_reference, restore_iterators
from strategies.metrics import TaskILAccuracy
from strategies.progress import ProgressBars

from . import config as C
from . import metrics as M
from .checkpoint import secret_key
from .launch import default_device, rank_and_world
from .results import RunKind, execute

ACC_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$")
TASK_IL_KEY = re.compile(r"^Top1_TaskIL_Acc_Exp/eval_phase/test_stream/Exp(\d+)$")
BUFFER_KEY = re.compile(r"^Buffer_(\w+)/train_phase/train_stream/Exp(\d+)$")
DISTANCE_KEY = re.compile(r"^Distance_(experience|init)/train_phase/train_stream/Exp(\d+)$")


class ContinualRun(RunKind):
    """``cl-cm run``: one continual-learning run (:class:`experiments.config.RunConfig`)."""

    runtime_keys = C.RUNTIME_FIELDS

    def __init__(self, on_experience=None):
        self.on_experience = on_experience  # called with (experiences done, total) as they are checkpointed

    def resolve(self, cfg):
        return C.resolve(cfg)

    def label(self, cfg) -> str:
        return C.run_label(cfg)

    def protocol(self, cfg) -> str:
        return C.protocol(cfg.benchmark, cfg.preset)["_description"]

    def provenance(self, cfg) -> dict[str, str]:
        from .tuning import tuned_keys

        return C.provenance(cfg, tuned_keys(cfg))

    def prepare(self, cfg) -> None:
        secret_key()  # the checkpoint key, made or read before anything is written

    def train(self, cfg, out: Path, quiet: bool) -> dict[str, Any]:
        return _train(cfg, out, quiet, self.on_experience)

    def summary(self, metrics: dict[str, Any], cfg) -> str:
        return render_summary(metrics, cfg)


def run(cfg: C.RunConfig, *, quiet: bool = False, on_experience=None) -> dict[str, Any]:
    """Run (or resume, or just read) the run described by ``cfg`` in
    ``cfg.out``; return its metrics. Safe to call again after a crash.
    ``on_experience(done, total)`` is called after each experience is
    checkpointed (and once on resuming, with the experiences done before)."""
    return execute(ContinualRun(on_experience), cfg, quiet=quiet)


def _train(cfg: C.RunConfig, out: Path, quiet: bool, on_experience=None) -> dict[str, Any]:
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.determinism.rng_manager import RNGManager

    from strategies import (BatchedLoadingPlugin, BufferStatsMetric, CriticalMomentaPlugin, DataParallelPlugin,
                            FiniteLossPlugin, ParameterDistanceMetric, ResetMomentsPlugin, SelectiveEvaluationPlugin,
                            avalanche_as_single_process, make_optimizer, make_strategy, skipped_steps)

    from cl_cm import has_buffer

    from .checkpoint import Checkpoints
    from .data import build_benchmark, build_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device) if cfg.device else default_device()
    rank, world = rank_and_world()
    quiet = quiet or rank != 0
    RNGManager.set_random_seeds(cfg.seed)
    bench = build_benchmark(cfg)
    model = build_model(cfg, bench)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), **C.optimizer_kwargs(cfg))
    plugins = [ProgressBars(cfg.progress and not quiet, bench.n_experiences), BatchedLoadingPlugin(),
               FiniteLossPlugin()]
    if has_buffer(cfg.optimizer):
        plugins.insert(0, CriticalMomentaPlugin(cfg.boundary, cfg.factor, cfg.min_size, cfg.kappa_schedule,
                                                cfg.kappa_start, cfg.kappa_end))
    if cfg.reset_moments:
        plugins.insert(0, ResetMomentsPlugin())
    if world > 1:  # torchrun: every global batch split across the ranks, gradients summed
        plugins.insert(0, DataParallelPlugin())
    metrics = [accuracy_metrics(experience=True), BufferStatsMetric(every="epoch"), ParameterDistanceMetric()]
    if bench.task_il_by_masking:
        metrics.append(TaskILAccuracy())
    with warnings.catch_warnings():  # "No loggers specified": the runner reads the metrics itself
        warnings.simplefilter("ignore", UserWarning)
        evaluator = SelectiveEvaluationPlugin(*metrics, loggers=[])
    with avalanche_as_single_process():
        strategy = make_strategy(cfg.strategy, model, optimizer, train_mb_size=cfg.batch_size,
                                 train_epochs=cfg.epochs, eval_mb_size=cfg.eval_batch_size, device=device,
                                 plugins=plugins, evaluator=evaluator, **C.strategy_kwargs(cfg))
        optimizers_by_reference()
        checkpoints = Checkpoints(out, "checkpoint.pkl")
        strategy, start = checkpoints.load(lambda f: maybe_load_checkpoint(strategy, f, map_location=device)) \
            or (strategy, 0)
        restore_iterators(strategy)
        progress = getattr(strategy, "cl_cm_progress", None) or {"accuracy": [], "accuracy_task_il": [],
                                                                   "train_seconds": [], "sharpness": []}
        progress.setdefault("skipped_steps", [])
        scenario = bench.scenario
        if start and on_experience:
            on_experience(start, bench.n_experiences)
        for k in range(start, bench.n_experiences):
            t0 = time.perf_counter()
            strategy.train(scenario.train_stream[k], eval_streams=[],
                           reset_optimizer_state=cfg.reset_optimizer_state)
            progress["train_seconds"].append(time.perf_counter() - t0)
            progress["skipped_steps"].append(skipped_steps(strategy.optimizer))
            results = strategy.eval(scenario.test_stream)
            progress["accuracy"].append(_row(results, ACC_KEY, bench.n_experiences))
            if bench.task_il_by_masking:
                progress["accuracy_task_il"].append(_row(results, TASK_IL_KEY, bench.n_experiences))
            if cfg.sharpness:
                progress["sharpness"].append(_sharpness_row(cfg, strategy, scenario, k))
            strategy.cl_cm_progress = progress
            if rank == 0:
                with iterators_set_aside(strategy):
                    checkpoints.save(lambda f: save_checkpoint(strategy, f))
            if on_experience:
                on_experience(k + 1, bench.n_experiences)
    return _collect(cfg, bench, progress, strategy.evaluator)  # the evaluator of a resumed run is the loaded one


def _row(results: dict, pattern: re.Pattern, n: int) -> list[float]:
    row = [math.nan] * n
    for key, value in results.items():
        match = pattern.match(key)
        if match:
            row[int(match.group(1))] = float(value)
    if any(math.isnan(v) for v in row):
        raise RuntimeError(f"evaluation did not report every experience: {row}")
    return row


def _sharpness_row(cfg, strategy, scenario, k: int) -> list[float | None]:
    """λ_max of the loss on a fixed sample of each experience seen so far
    (None for the ones not seen yet), or with ``sharpness_tasks="learned"``
    of experience ``k`` only (None elsewhere)."""
    wanted = (lambda i: i == k) if cfg.sharpness_tasks == "learned" else (lambda i: i <= k)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and str(cfg.device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):  # measuring never changes the training that follows
        return [_experience_sharpness(cfg, strategy, scenario.train_stream[i]) if wanted(i) else None
                for i in range(len(scenario.train_stream))]


def _experience_sharpness(cfg, strategy, experience) -> float:
    """Top Hessian eigenvalue (:func:`cl_cm.sharpness.top_hessian_eigenvalue`)
    of the training loss on the first ``sharpness_samples`` samples of the
    experience (a fixed sample: the data order of the scenario), with the
    model in eval mode (BatchNorm running statistics, no dropout)."""
    from avalanche.models import avalanche_forward

    from cl_cm.sharpness import top_hessian_eigenvalue

    model = strategy.model
    task = experience.task_label if hasattr(experience, "task_label") else 0

    class OnTask(torch.nn.Module):  # the multi-head forward of the experience's task
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return avalanche_forward(self.inner, x, torch.full((len(x),), task, device=x.device))

    dataset = experience.dataset.eval()
    n = min(cfg.sharpness_samples, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=64)
    was_training = model.training
    model.eval()
    try:
        return top_hessian_eigenvalue(OnTask(), strategy._criterion, list(loader), iters=100, tol=1e-3,
                                      seed=cfg.seed)
    finally:
        model.train(was_training)


def _collect(cfg: C.RunConfig, bench, progress: dict, evaluator) -> dict[str, Any]:
    r = progress["accuracy"]
    out: dict[str, Any] = {"benchmark": cfg.benchmark, "scenario": bench.scenario_kind, "preset": cfg.preset,
                           "strategy": cfg.strategy, "optimizer": cfg.optimizer, "policy": C.policy_label(cfg),
                           "seed": cfg.seed, "n_experiences": bench.n_experiences, "eval_split": bench.eval_split,
                           "accuracy_matrix": r, **M.summary(r),
                           "train_seconds_per_experience": progress["train_seconds"],
                           "train_seconds": sum(progress["train_seconds"]),
                           # optimizer steps skipped for NaN/Inf gradients, in all and after each experience
                           "skipped_steps": progress["skipped_steps"][-1] if progress["skipped_steps"] else 0,
                           "skipped_steps_per_experience": progress["skipped_steps"]}
    if progress["accuracy_task_il"]:
        out["task_il"] = {"accuracy_matrix": progress["accuracy_task_il"], **M.summary(progress["accuracy_task_il"])}
    if progress["sharpness"]:
        out["sharpness_matrix"] = progress["sharpness"]
    series: dict[str, list] = {}
    per_exp: dict[str, list] = {}
    distance: dict[str, list] = {"experience": [None] * bench.n_experiences, "init": [None] * bench.n_experiences}
    for name, (xs, values) in sorted(evaluator.get_all_metrics().items()):
        match = BUFFER_KEY.match(name)
        if match:
            key, exp = match.group(1), int(match.group(2))
            series.setdefault(key, []).extend([[x, exp, v] for x, v in zip(xs, values)])
            per_exp.setdefault(key, [None] * bench.n_experiences)[exp] = values[-1]
        match = DISTANCE_KEY.match(name)
        if match:
            distance[match.group(1)][int(match.group(2))] = values[-1]
    out["distance_per_experience"] = distance["experience"]
    out["distance_from_init"] = distance["init"]
    if series:
        out["buffer_stats"] = {"per_experience": per_exp, "series": series,
                               "series_columns": ["iteration", "experience", "value"]}
    return out


def _pct(x) -> str:
    return "   -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:4.0f}"


def render_summary(m: dict, cfg: C.RunConfig | None = None) -> str:
    """A one-screen summary of a finished run."""
    lines = [f"== {m['benchmark']} ({m['preset']}), {m['scenario']} | {m['strategy']} | {m['policy']} | "
             f"seed {m['seed']}"]
    t = len(m["accuracy_matrix"])
    lines.append("accuracy (%) on experience j (columns) after training experience i (rows):")
    lines.append("      " + "".join(f"{j:>5d}" for j in range(t)))
    for i, row in enumerate(m["accuracy_matrix"]):
        lines.append(f"{i:>5d} " + "".join(f"{_pct(v):>5s}" for v in row))

    def fmt(x, scale=100):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{scale * x:.2f}"
    lines.append(f"ACC {fmt(m['acc'])}%  BWT {fmt(m['bwt'])}  forgetting {fmt(m['forgetting'])}  "
                 f"learning accuracy {fmt(m['learning_accuracy'])}%  (percentage points)")
    if "task_il" in m:
        ti = m["task_il"]
        lines.append(f"task-IL (masked logits): ACC {fmt(ti['acc'])}%  BWT {fmt(ti['bwt'])}  "
                     f"forgetting {fmt(ti['forgetting'])}")
    lines.append(f"training time {m['train_seconds']:.1f} s "
                 f"({', '.join(f'{s:.1f}' for s in m['train_seconds_per_experience'])} per experience)")
    if m.get("skipped_steps"):
        lines.append(f"{m['skipped_steps']} optimizer step(s) skipped for NaN/Inf gradients (parameters left "
                     "unchanged at those steps)")
    if "buffer_stats" in m:
        last = {k: v[-1] for k, v in m["buffer_stats"]["per_experience"].items()}
        lines.append("buffer at the end: " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, (int, float)) else f"{k} n/a" for k, v in last.items()))
    if cfg is not None:
        lines.append(f"results in {cfg.out}")
    return "\n".join(lines)
