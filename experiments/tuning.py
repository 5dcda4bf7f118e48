"""``cl-cm tune``: hyperparameters chosen for each arm of a comparison on
validation data only, with Optuna.

An *arm* is one setting of everything but the seed and the tuned
hyperparameters: benchmark, preset, scenario, strategy, optimizer and its
fixed settings, boundary policy. A tune file (TOML or JSON) lists arms the
way a sweep file lists cells, and adds the search space::

    [tune]                     # optional
    out = "runs/tune-pmnist"   # results folder (default: runs/<file name>)
    seeds = [1000, 1001]       # every trial averages these seeds (default: 2 seeds, 1000 and 1001)
    trials = 5                 # per arm (default: the arm's whole grid; required with ranges)
    validation = "holdout"     # or "first_tasks" (with validation_tasks = 3)
    jobs = 2

    [base]                     # RunConfig fields shared by every arm
    benchmark = "permuted_mnist"
    preset = "cpu"

    [grid]                     # the arms: a product, as in a sweep ([[grid]] pools several)
    optimizer = ["adam", "adam_cm"]
    boundary = ["keep", "decay:0.5"]

    [space]                    # the search space, shared by the arms that take each key
    lr = [1e-4, 3e-4, 1e-3, 3e-3]              # a list: Optuna's grid sampler
    kappa = { low = 0.1, high = 2.0 }          # a range (log = true for a log scale): TPE

``[grid.space]`` under a ``[[grid]]`` table adds or overrides keys for that
table's arms only. ``lr`` is required; keys are RunConfig fields (``cl-cm run
--help``) that an arm takes; a key that no arm takes is an error.

The objective of a trial is the final average accuracy on the validation data
(ACC over all experiences), the mean over the seeds:

* ``validation = "holdout"``: a fixed, class-balanced 10 % of each
  experience's training data is held out and never trained on;
* ``validation = "first_tasks"``: the protocol of Chaudhry et al. (2019,
  "Efficient Lifelong Learning with A-GEM"): a separate stream of the first k
  experiences (``validation_tasks``, default 3), drawn with another seed
  (other permutations, rotations or class order), held out as above.

The test data is never read. Trials live in an Optuna storage (a journal file
``DIR/optuna.journal`` unless ``--storage`` names another, such as an RDB URL
shared by workers on several machines); each arm is one Optuna study. A
killed tune resumes where it stopped when run again: the trial that was
running is run again with the same values, resuming its runs from their
checkpoints. Workers sharing a storage never run the same trial twice.
``--jobs N`` starts N workers on this machine; ``--executor ray`` runs each
worker as a task on a Ray cluster (:mod:`experiments.executors`; the folder
and the journal on storage every node sees, or an RDB URL).

When every arm has its trials, ``DIR/tuned.toml`` holds, for each arm, the
chosen values, the validation score with its spread over seeds, the protocol
and the number of trials. ``cl-cm sweep --tuned DIR/tuned.toml`` (or ``tuned =
...`` in ``[base]``) runs each arm with its own chosen values.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import re
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import config as C

#: RunConfig fields that may be tuned (lr is required)
TUNABLE = (*C.OPTIMIZER_FIELDS, *C.STRATEGY_FIELDS, "factor", "min_size", "kappa_start", "kappa_end")
#: RunConfig fields that do not tell arms apart
NOT_ARM = (*C.RUNTIME_FIELDS, "seed", *C.VALIDATION_FIELDS, "sharpness", "sharpness_samples", "sharpness_tasks", "recipe")
DEFAULT_SEEDS = (1000, 1001)
OBJECTIVE = "final average accuracy (ACC) on the held-out validation data, mean over seeds"


# ------------------------------------------------------------------ the spec
@dataclass
class Arm:
    """One arm: its settings (a resolved RunConfig without seed) and its search space."""

    cfg: C.RunConfig
    space: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{C.bench_label(self.cfg)} {self.cfg.preset} {self.cfg.strategy} " + C.run_label(self.cfg)

    @property
    def key(self) -> str:
        """The Optuna study name: the arm's label, readable and unique."""
        return self.label


@dataclass
class TuneSpec:
    arms: list[Arm]
    seeds: tuple[int, ...]
    trials: int | None
    out: str
    jobs: int
    validation: dict[str, Any] = field(default_factory=dict)


_FIELDS = {f.name: f for f in fields(C.RunConfig)}


def _check_value(where: str, key: str, value) -> None:
    """A value that a space may give ``key``: of the setting's type and in its range."""
    try:
        C.checked_value(_FIELDS[key], value)
    except C.ConfigError as e:
        raise C.ConfigError(f"{where} {key}: {e}") from None


def _check_space(space: Any, where: str) -> dict[str, Any]:
    if not isinstance(space, dict):
        raise C.ConfigError(f"{where} must be a table of hyperparameters, got {space!r}")
    C.check_keys(space, where, allowed=TUNABLE)
    for key, value in space.items():
        if isinstance(value, list):
            if not value:
                raise C.ConfigError(f"{where} {key} is an empty list; give at least one value")
            if len(set(map(repr, value))) != len(value):
                raise C.ConfigError(f"{where} {key} lists a value twice: {value}")
            for v in value:
                _check_value(where, key, v)
        elif isinstance(value, dict):
            C.check_keys(value, f"{where} {key}", allowed=("low", "high", "log", "step"))
            if "low" not in value or "high" not in value:
                raise C.ConfigError(f"{where} {key} needs low and high, e.g. {{ low = 1e-4, high = 1e-2, log = true }}")
            low, high = value["low"], value["high"]
            if not all(C.is_number(v) for v in (low, high)):
                raise C.ConfigError(f"{where} {key}: low and high must be finite numbers, got {low!r} and {high!r}")
            if low > high:
                raise C.ConfigError(f"{where} {key}: low ({low}) is greater than high ({high}); swap them")
            if value.get("log") and low <= 0:
                raise C.ConfigError(f"{where} {key}: a log range needs low > 0, got {low}")
            for v in (low, high):
                _check_value(where, key, v)
            if "log" in value and not isinstance(value["log"], bool):
                raise C.ConfigError(f"{where} {key}: log must be true or false, got {value['log']!r}")
            step = value.get("step")
            if step is not None and (not C.is_number(step) or step <= 0):
                raise C.ConfigError(f"{where} {key}: step must be a finite number > 0, got {step!r}")
        else:
            raise C.ConfigError(f"{where} {key} must be a list of values or a range {{ low = ..., high = ... }}, "
                                f"got {value!r}")
    return space


def _probe(value):
    """A value of a space entry, to try whether an arm takes the key."""
    return value[0] if isinstance(value, list) else value["low"]


def _applies(cfg: C.RunConfig, key: str, value) -> bool:
    try:
        C.resolve(dataclasses.replace(cfg, **{key: _probe(value)}))
    except C.ConfigError:
        return False
    return True


def load_spec(path: str | Path | dict, overrides: dict[str, Any] | None = None, trials: int | None = None,
              out: str | None = None, jobs: int | None = None) -> TuneSpec:
    """Read and check a tune file (or its parsed contents); raises
    :class:`ConfigError` before anything is written."""
    from .sweep import expand_grids

    spec = path if isinstance(path, dict) else C.load_file(path)
    path = "tune" if isinstance(path, dict) else path
    C.check_keys(spec, "the tune file", allowed=("tune", "base", "grid", "space"))
    settings = spec.get("tune", {})
    if not isinstance(settings, dict):
        raise C.ConfigError(f"[tune] must be a table, got {settings!r}")
    C.check_keys(settings, "[tune]", allowed=("out", "jobs", "seeds", "trials", "validation", "validation_tasks",
                                              "validation_fraction"))
    seeds = settings.get("seeds", list(DEFAULT_SEEDS))
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(DEFAULT_SEEDS[0], DEFAULT_SEEDS[0] + seeds))
    C.check_seeds(seeds, "[tune] seeds", " (or a count >= 1)")
    trials = trials if trials is not None else settings.get("trials")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise C.ConfigError(f"trials must be an integer >= 1, got {trials!r}")
    validation = {k: settings[k] for k in C.VALIDATION_FIELDS if k in settings}
    validation.setdefault("validation", "holdout")
    if validation["validation"] == "none":
        raise C.ConfigError("[tune] validation must be holdout or first_tasks: tuning never reads the test data")
    base_space = _check_space(spec.get("space", {}), "[space]")
    grids = spec.get("grid", {})
    arms: list[Arm] = []
    seen = set()
    for cells, grid in expand_grids({"base": spec.get("base", {}), "grid": grids}, overrides, with_space=True):
        space = {**base_space, **_check_space(grid.get("space", {}), "[grid.space]")}
        for cfg in cells:
            cfg = dataclasses.replace(cfg, seed=0, out="", tuned=None)
            own = {k: v for k, v in space.items() if _applies(cfg, k, v)}
            fixed = [k for k in own if getattr(cfg, k) is not None and getattr(cfg, k) != getattr(C.RunConfig, k)]
            if fixed:
                raise C.ConfigError(f"{', '.join(fixed)} of arm {C.run_label(cfg)} is set in [base] or [grid] and "
                                    "searched in [space]; remove one")
            arm = Arm(cfg, own)
            if arm.key not in seen:
                seen.add(arm.key)
                arms.append(arm)
    if not arms:
        raise C.ConfigError("the tune file has no arms; list them in [grid] as in a sweep file")
    if not base_space and not any(isinstance(g, dict) and g.get("space") for g in
                                  (grids if isinstance(grids, list) else [grids])):
        raise C.ConfigError("the search space is empty; add [space] with at least lr = [...] or "
                            "lr = { low = ..., high = ..., log = true }")
    for key in set(base_space):
        if not any(key in a.space for a in arms):
            raise C.ConfigError(f"[space] {key} applies to none of the arms ({', '.join(a.label for a in arms)})")
    for arm in arms:
        if "lr" not in arm.space:
            raise C.ConfigError(f"arm {arm.label} has no lr in its search space; [space] must search lr")
        grid_size = _grid_size(arm.space)
        if grid_size is not None and trials is not None and trials < grid_size:
            raise C.ConfigError(f"trials ({trials}) is smaller than the grid of arm {arm.label} ({grid_size} points); "
                                f"set trials >= {grid_size}, or search a range instead of a list")
        if grid_size is None and trials is None:
            raise C.ConfigError(f"arm {arm.label} searches a range; set trials = N in [tune] or pass --trials N")
    for arm in arms:  # the validation settings must be valid for every arm
        C.resolve(dataclasses.replace(arm.cfg, **validation, **{k: _probe(v) for k, v in arm.space.items()}))
    jobs = jobs if jobs is not None else settings.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise C.ConfigError(f"jobs (--jobs or [tune] jobs) must be an integer >= 1, got {jobs!r}")
    out = out if out is not None else settings.get("out", f"runs/{Path(path).stem}")
    if not isinstance(out, str):
        raise C.ConfigError(f"[tune] out must be a folder name, got {out!r}")
    return TuneSpec(arms, tuple(seeds), trials, out, jobs, validation)


def _grid_size(space: dict[str, Any]) -> int | None:
    """Points of a space of lists (None when it has a range)."""
    if not all(isinstance(v, list) for v in space.values()):
        return None
    return math.prod(len(v) for v in space.values())


def budget(spec: TuneSpec, arm: Arm) -> int:
    """Trials of an arm: ``trials``, or the whole grid."""
    size = _grid_size(arm.space)
    return size if spec.trials is None else (min(spec.trials, size) if size is not None else spec.trials)


# ----------------------------------------------------------------- storage
def storage_url(out: str | Path, storage: str | None) -> str:
    return storage or str(Path(out) / "optuna.journal")


def open_storage(url: str):
    """An Optuna storage: a journal file (a path) or any storage URL."""
    import optuna

    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    return url


def _sampler(arm: Arm, seed: int, ask_lock: Path | None = None):
    """Optuna's grid sampler for a space of lists, TPE otherwise. With
    ``ask_lock``, workers sharing a storage choose grid points one at a time:
    the grid sampler picks a point no trial holds yet (``before_trial``), and
    two workers picking at once could both take the same one."""
    import optuna

    if _grid_size(arm.space) is None:
        return optuna.samplers.TPESampler(seed=seed)
    sampler = optuna.samplers.GridSampler(arm.space, seed=seed)
    if ask_lock is not None:
        choose = sampler.before_trial

        def before_trial(study, trial):
            with _file_lock(ask_lock):
                choose(study, trial)

        sampler.before_trial = before_trial
    return sampler


def _suggest(trial, key: str, value):
    """The trial's value of one space entry, through Optuna's suggest API."""
    if isinstance(value, list):
        return trial.suggest_categorical(key, value)
    log, step = bool(value.get("log")), value.get("step")
    if key in _INT_KEYS and all(isinstance(value[k], int) for k in ("low", "high")):
        return trial.suggest_int(key, value["low"], value["high"], log=log, step=int(step or 1))
    return trial.suggest_float(key, float(value["low"]), float(value["high"]), log=log, step=step)


_INT_KEYS = {f.name for f in fields(C.RunConfig) if str(f.type).startswith("int")}


# ------------------------------------------------------------------ trials
def slug(text: str) -> str:
    """A file name from any text: letters, digits and ``.+=-`` only, never ``..``."""
    out = re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("._") or "_"
    return out.replace("..", "_")


def _value_text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def trial_folder(out: str | Path, arm: Arm, params: dict[str, Any]) -> Path:
    """Runs of one trial: named by the arm and the values, so that a trial run
    again with the same values (after a kill, or by another sampler) finds
    and resumes or reads them."""
    values = "-".join(f"{k}{_value_text(v)}" for k, v in sorted(params.items()))
    return (Path(out) / "trials" / slug(f"{C.bench_label(arm.cfg)}-{arm.cfg.preset}") / slug(arm.cfg.strategy)
            / slug(C.run_label(arm.cfg).replace("/", "-")) / slug(values))


def trial_configs(spec: TuneSpec, arm: Arm, params: dict[str, Any], out: str | Path) -> list[C.RunConfig]:
    folder = trial_folder(out, arm, params)
    return [dataclasses.replace(arm.cfg, **params, **spec.validation, seed=seed, out=str(folder / f"seed{seed}"),
                                progress=False) for seed in spec.seeds]


@contextlib.contextmanager
def _file_lock(path: Path, blocking: bool = True):
    """An fcntl lock on ``path`` for the block; yields False at once if another
    process holds it and ``blocking`` is False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _trial_lock(out: Path, study_name: str, number: int) -> Path:
    return out / "locks" / f"{slug(study_name)}-trial{number}.lock"


#: a RUNNING trial younger than this is never taken for stale (its worker may not hold its lock yet)
STALE_AFTER_S = 2.0


def _heal_stale(study, out: Path) -> int:
    """Trials left RUNNING by a killed worker (their lock is free) become
    FAIL, marked stale, and are queued again with the same values, so that
    their runs resume from their checkpoints. Returns how many."""
    import datetime

    import optuna
    from optuna.trial import TrialState

    healed = 0
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.datetime_start and (now - t.datetime_start).total_seconds() < STALE_AFTER_S:
            continue
        with _file_lock(_trial_lock(out, study.study_name, t.number), blocking=False) as free:
            if not free:
                continue
            # as Optuna's own fail_stale_trials and RetryFailedTrialCallback do: the stale trial fails, and
            # a waiting copy (same values, same system attributes: the grid sampler's grid_id) takes its place
            study._storage.set_trial_user_attr(t._trial_id, "stale", True)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=t.params, distributions=t.distributions,
                user_attrs={"retry_of": t.number}, system_attrs=dict(t.system_attrs)))
            healed += 1
    return healed


def _used(study) -> int:
    """Trials that count against an arm's budget: finished (not stale), running or queued."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and not t.user_attrs.get("stale")))


class _Budget:
    """Optuna callback: stop this worker once the arm has its trials (all
    workers together; stale trials of killed workers do not count)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, study, trial) -> None:
        if _used(study) >= self.n:
            study.stop()


class TrialFailed(RuntimeError):
    """A trial's run raised; the trial is recorded as failed and the tune goes on."""


def run_trial(spec: TuneSpec, arm: Arm, params: dict[str, Any], out: Path, threads: int | None,
              ranks: int = 1) -> dict[str, Any]:
    """Train the trial's runs (one per seed; ``ranks`` > 1: each a torchrun of
    that many processes) on validation data; its score and spread."""
    from .executors import run_ranks
    from .runner import run

    scores = []
    for cfg in trial_configs(spec, arm, params, out):
        if threads:
            cfg = dataclasses.replace(cfg, threads=threads)
        metrics = run(cfg, quiet=True) if ranks == 1 else run_ranks(cfg, ranks)
        if metrics.get("eval_split") != "validation":
            raise RuntimeError(f"{cfg.out} was evaluated on {metrics.get('eval_split')!r} data, not validation")
        scores.append(metrics["acc"])
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) if len(scores) > 1 else math.nan
    return {"value": mean, "std": std, "scores": scores}


def worker(spec: TuneSpec, storage: str, out: str | Path, threads: int | None = None, seed: int = 0,
           ranks: int = 1) -> None:
    """Run trials until every arm has its budget (``Study.optimize`` with a
    budget callback); other workers may share the storage."""
    import optuna

    from .checkpoint import CheckpointRefused
    from .data import DataNotFoundError
    from .io import RunLocked

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out = Path(out)
    store = open_storage(storage)
    for arm in spec.arms:
        n_budget = budget(spec, arm)
        with _file_lock(out / "locks" / "ask.lock"):
            study = optuna.create_study(study_name=arm.key, storage=store, direction="maximize",
                                        sampler=_sampler(arm, seed, out / "locks" / "ask.lock"),
                                        load_if_exists=True)
            _heal_stale(study, out)
            if _used(study) >= n_budget and not _waiting(study):
                continue

        def objective(trial, arm=arm, n_budget=n_budget):
            with _file_lock(_trial_lock(out, arm.key, trial.number), blocking=False) as mine:
                if not mine:
                    raise TrialFailed(f"trial {trial.number} is locked by another worker")
                params = {k: _suggest(trial, k, v) for k, v in arm.space.items()}
                try:
                    result = run_trial(spec, arm, params, out, threads, ranks)
                except (C.ConfigError, DataNotFoundError, RunLocked, CheckpointRefused):
                    raise  # every trial would fail alike, or the user must act: stop the tune
                except Exception as e:  # noqa: BLE001 - a failed trial is recorded, the tune goes on
                    message = f"{type(e).__name__}: {e}".splitlines()[0]
                    trial.set_user_attr("error", message)
                    _progress(arm, trial.number, n_budget, params, None, message)
                    raise TrialFailed(message) from None
                trial.set_user_attr("std", result["std"])
                trial.set_user_attr("scores", result["scores"])
                _progress(arm, trial.number, n_budget, params, result, None, trial.study, result["value"])
                return result["value"]

        study.optimize(objective, n_trials=n_budget, callbacks=[_Budget(n_budget)], catch=(TrialFailed,))


def _waiting(study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _progress(arm: Arm, number: int, n_budget: int, params, result, error, study=None, value=None) -> None:
    values = ", ".join(f"{k}={_value_text(v)}" for k, v in sorted(params.items()))
    if result is None:
        line = f"tune: {arm.label}: trial #{number} ({values}) failed: {error}"
    else:
        spread = "" if math.isnan(result["std"]) else f" ± {100 * result['std']:.2f}"
        line = (f"tune: {arm.label}: trial #{number} of {n_budget} ({values}): validation ACC "
                f"{100 * result['value']:.2f}{spread}")
        try:
            best = study.best_trial
            if best.value >= value:
                line += f"; best so far {100 * best.value:.2f} (" + ", ".join(
                    f"{k}={_value_text(v)}" for k, v in sorted(best.params.items())) + ")"
        except ValueError:  # no finished trial yet
            pass
    print(line, flush=True)


# ------------------------------------------------------------ the command
def tune(path: str | Path, out: str | None = None, trials: int | None = None, jobs: int | None = None,
         storage: str | None = None, overrides: dict[str, Any] | None = None, seed: int = 0,
         executor=None, new_journal: bool = False) -> Path:
    """Tune every arm of the file at ``path``; write and return ``tuned.toml``.
    The workers run on ``executor`` (default: this machine, ``jobs``
    processes); on Ray, ``jobs`` workers (default: as many runs as the cluster
    holds at once, at most one per trial), each a task sharing the storage.
    A folder tuned with other arms or grids is refused, unless ``new_journal``:
    then its journal is set aside (:func:`set_aside`) and the new grid tuned,
    reusing the finished trials it shares with the old one."""
    from .data import DataNotFoundError
    from .executors import LocalExecutor
    from .io import RunLocked, read_json, write_json

    spec = load_spec(path, overrides, trials=trials, out=out, jobs=jobs)
    out_dir = Path(spec.out)
    _check_out(out_dir)
    _check_storage(storage)
    record = {"file": str(path), "arms": [a.label for a in spec.arms], "space": {a.label: a.space for a in spec.arms},
              "seeds": list(spec.seeds), "trials": spec.trials, "validation": spec.validation}
    saved = out_dir / "tune.json"
    if saved.exists():
        try:
            previous = read_json(saved)
            if not isinstance(previous, dict):
                raise TypeError("not a table")
        except (OSError, ValueError, TypeError) as e:
            raise C.ConfigError(f"{saved} cannot be read ({type(e).__name__}); choose another --out or delete "
                                "that folder") from None
        changed = sorted(k for k in record if k != "file" and previous.get(k) != record[k])
        if changed and not new_journal:
            raise C.ConfigError(f"{out_dir} holds a tune with other settings ({', '.join(changed)} differ); run "
                                "again with --new-journal to tune the new ones there (finished trials are reused), "
                                "or choose another --out")
        if changed and storage is not None:
            raise C.ConfigError(f"--new-journal starts a new journal in {out_dir}; with --storage, give a new "
                                "storage instead")
        if changed:
            print(f"tune: {', '.join(changed)} changed; the earlier journal is now in {set_aside(out_dir)}; "
                  "finished trials at the same values are reused", flush=True)
    url = storage_url(out_dir, storage)
    executor = executor or LocalExecutor(spec.jobs)
    slot = executor.slot([a.cfg for a in spec.arms])  # before anything is written: a run must fit a node
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(saved, record)
    started = time.perf_counter()
    budgets = [budget(spec, a) for a in spec.arms]
    print(f"tune: {len(spec.arms)} arm(s), {sum(budgets)} trial(s) of {len(spec.seeds)} seed(s) each, validation "
          f"{spec.validation['validation']}, storage {url}", flush=True)
    if len(set(budgets)) > 1:
        print(f"tune: note: the arms get {min(budgets)} to {max(budgets)} trials (their grids differ in size); "
              "set trials = N in [tune] and search ranges for an equal budget", flush=True)
    if executor.remote:  # every worker sees the arms, the folder and the journal at absolute paths
        workers = jobs or max(1, min(sum(budgets), executor.capacity(slot)))
        remote = dataclasses.replace(spec, arms=[Arm(executor.place(a.cfg, slot), a.space) for a in spec.arms])
        shared = url if "://" in url else str(Path(url).absolute())
        call = (remote, shared, str(out_dir.absolute()), slot.threads, seed, slot.ranks)
    else:
        workers, call = spec.jobs, (spec, url, out_dir, slot.threads, seed)
    failed = [o for o in executor.map(worker, [call] * workers, slot) if o.error is not None]
    for o in failed:  # a setting or the data every trial would share: one clear error
        if isinstance(o.error, (C.ConfigError, DataNotFoundError, RunLocked)):
            raise o.error
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers} tune worker(s) failed (" + "; ".join(
            ("lost: " if o.lost else "") + o.message for o in failed) + "); run the same command again to resume")
    result = write_tuned(spec, url, out_dir, path)
    print(f"tune: done in {time.perf_counter() - started:.0f} s; chosen settings in {result}", flush=True)
    return result


#: what set_aside moves: the journal and records of one grid (trial folders stay, to be reused)
JOURNAL_FILES = ("optuna.journal", "tune.json", "tuned.toml", "locks")


def earlier_folder(out_dir: Path, new: bool) -> Path:
    """``out_dir/earlier/N``: the next free N (``new``), else the latest (1 if none)."""
    earlier = out_dir / "earlier"
    numbers = [int(p.name) for p in earlier.iterdir() if p.name.isdigit()] if earlier.is_dir() else []
    return earlier / str(max(numbers, default=0) + 1 if new else max(numbers, default=1))


def set_aside(out_dir: Path) -> Path:
    """Move the journal, ``tune.json``, ``tuned.toml`` and the trial locks of
    ``out_dir`` to ``out_dir/earlier/N`` (the next free N), and return it. The
    trial folders stay: a trial of the new grid at the values of a finished
    one reads its runs instead of repeating them."""
    target = earlier_folder(out_dir, new=True)
    target.mkdir(parents=True)
    for name in JOURNAL_FILES:
        if (out_dir / name).exists():
            (out_dir / name).rename(target / name)
    return target


def _check_out(out_dir: Path) -> None:
    from .io import check_out

    check_out(out_dir)


def _check_storage(storage: str | None) -> None:
    """An Optuna storage URL whose database driver is installed, or a journal
    file that can be written (nothing is connected to or created)."""
    if storage is None:
        return
    if "://" in storage:
        try:
            from sqlalchemy.engine import make_url

            make_url(storage).get_dialect()
        except Exception as e:  # noqa: BLE001 - sqlalchemy's ArgumentError, NoSuchModuleError, ImportError...
            raise C.ConfigError(f"--storage {storage!r} is not a storage URL that Optuna can open "
                                f"({type(e).__name__}); use e.g. sqlite:///tune.db or a journal file path") from None
        return
    path = Path(storage)
    if path.is_dir():
        raise C.ConfigError(f"--storage {storage} is a folder; give a journal file path or a storage URL")
    from .io import check_out

    check_out(path.parent, "--storage's folder")


def results(spec: TuneSpec, storage: str) -> list[dict[str, Any]]:
    """Per arm: its finished trials and the chosen one (None while unfinished)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_storage(storage)
    out = []
    for arm in spec.arms:
        try:
            study = optuna.load_study(study_name=arm.key, storage=store)
            trials = study.get_trials(deepcopy=False)
        except KeyError:
            trials = []
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        failed = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("stale")]
        n_budget = budget(spec, arm)
        finished = len(complete) + len(failed) >= n_budget
        best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
        out.append({"arm": arm, "complete": complete, "failed": failed, "finished": finished, "best": best,
                    "budget": n_budget})
    return out


def write_tuned(spec: TuneSpec, storage: str, out_dir: Path, path) -> Path:
    """``tuned.toml``: the chosen values of every finished arm."""
    from .io import write_text

    lines = ["# Chosen settings per arm, written by cl-cm tune. Objective: " + OBJECTIVE + ".",
             "# The test data was never read. `cl-cm sweep FILE --tuned THIS_FILE` runs each arm with its values.",
             "", "[tune]", f"file = {_toml(str(path))}", f"seeds = {_toml(list(spec.seeds))}",
             *(f"{k} = {_toml(v)}" for k, v in spec.validation.items()), f"objective = {_toml(OBJECTIVE)}", ""]
    unfinished = []
    for r in results(spec, storage):
        arm = r["arm"]
        if not r["finished"] or r["best"] is None:
            unfinished.append(arm.label)
            continue
        best = r["best"]
        settings = {f.name: getattr(arm.cfg, f.name) for f in fields(arm.cfg)
                    if f.name not in NOT_ARM and f.name not in arm.space and getattr(arm.cfg, f.name) is not None}
        lines += ["[[arm]]", f"label = {_toml(arm.label)}", f"settings = {_toml(settings)}",
                  f"chosen = {_toml(dict(sorted(best.params.items())))}",
                  f"validation_acc = {_toml(best.value)}",
                  f"validation_acc_std = {_toml(best.user_attrs.get('std'))}",
                  f"validation_acc_per_seed = {_toml(best.user_attrs.get('scores', []))}",
                  f"trials = {len(r['complete']) + len(r['failed'])}", f"failed_trials = {len(r['failed'])}",
                  f"space = {_toml(arm.space)}"]
        edge = at_edge(arm.space, best.params)
        if edge:
            lines.append(f"at_edge = {_toml(edge)}  # chosen at the end of its grid: the best may lie beyond it")
        lines.append("")
    if unfinished:
        lines += ["# arms whose trials are not all finished (run cl-cm tune again):",
                  f"unfinished = {_toml(unfinished)}", ""]
    target = out_dir / "tuned.toml"
    write_text(target, "\n".join(lines))
    return target


def at_edge(space: dict[str, Any], chosen: dict[str, Any]) -> list[str]:
    """The numeric keys whose chosen value is the lowest or highest of its grid
    (or within 1 % of a range's bound): the grid may not bracket the best."""
    out = []
    for key, value in chosen.items():
        grid = space.get(key)
        if isinstance(grid, list):
            numbers = [v for v in grid if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(numbers) > 1 and value in (min(numbers), max(numbers)):
                out.append(key)
        elif isinstance(grid, dict):
            low, high = grid["low"], grid["high"]
            if high > low and min(abs(value - low), abs(high - value)) <= 0.01 * (high - low):
                out.append(key)
    return out


def _toml(value) -> str:
    """A TOML value (inline tables and arrays of scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if value is None:
        raise ValueError("TOML has no null")
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml(k)


# --------------------------------------------------------- reading tuned.toml
_TUNED_CACHE: dict[tuple[str, float], list[dict[str, Any]]] = {}


def load_tuned(path: str | Path) -> list[dict[str, Any]]:
    """The finished arms of a tuned.toml."""
    if C.path_kind(path, "tuned") != "file":
        raise C.ConfigError(f"tuned file {path} does not exist; run cl-cm tune first, or fix the path")
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _TUNED_CACHE:
        data = C.load_file(path)
        arms = data.get("arm", [])
        if not isinstance(arms, list) or not all(isinstance(a, dict) and isinstance(a.get("settings"), dict)
                                                 and isinstance(a.get("chosen"), dict) for a in arms):
            raise C.ConfigError(f"{path} is not a tuned.toml written by cl-cm tune (no [[arm]] tables with "
                                "settings and chosen)")
        for arm in arms:
            C.check_keys(arm["chosen"], f"{path} (chosen)", allowed=TUNABLE)
            C.check_keys(arm["settings"], f"{path} (settings)", allowed=C.FIELD_NAMES)
        _TUNED_CACHE[key] = arms
    return _TUNED_CACHE[key]


def _matches(arm: dict[str, Any], cfg: C.RunConfig) -> bool:
    chosen, settings = arm["chosen"], arm["settings"]
    return all(settings.get(f.name) == getattr(cfg, f.name) for f in fields(cfg)
               if f.name not in NOT_ARM and f.name not in chosen)


def tuned_arm(cfg: C.RunConfig) -> dict[str, Any] | None:
    """The arm of ``cfg.tuned`` that ``cfg`` belongs to (None without ``tuned``)."""
    if not cfg.tuned:
        return None
    arms = load_tuned(cfg.tuned)
    for arm in arms:
        if _matches(arm, cfg):
            return arm
    unfinished = C.load_file(cfg.tuned).get("unfinished", [])
    label = f"{C.bench_label(cfg)} {cfg.preset} {cfg.strategy} {C.run_label(cfg)}"
    hint = (f"; its arms: {', '.join(a.get('label', '?') for a in arms)}" if arms else "; it has no finished arm")
    if unfinished:
        hint += f" (unfinished: {', '.join(unfinished)})"
    raise C.ConfigError(f"{cfg.tuned} has no arm for {label}{hint}. Tune this arm, or drop tuned for it")


def apply_tuned(cfg: C.RunConfig) -> C.RunConfig:
    """``cfg`` with its arm's chosen values; a value set both ways is refused."""
    arm = tuned_arm(cfg)
    if arm is None:
        return cfg
    clash = [k for k, v in arm["chosen"].items() if getattr(cfg, k) is not None and getattr(cfg, k) != v]
    if clash:
        raise C.ConfigError(f"{', '.join(clash)} is set ({', '.join(f'{k}={getattr(cfg, k)}' for k in clash)}) and "
                            f"also tuned in {cfg.tuned}; remove one")
    return dataclasses.replace(cfg, **arm["chosen"])


def tuned_keys(cfg: C.RunConfig) -> tuple[str, ...]:
    arm = tuned_arm(cfg)
    return tuple(arm["chosen"]) if arm else ()
