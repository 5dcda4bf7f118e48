"""Settings: every argument of ``cl-cm run`` (:class:`RunConfig`), ``cl-cm
supervised`` (:class:`SupervisedConfig`) and ``cl-cm toy``
(:class:`ToyConfig`), each with its default, its help and its valid values,
declared once. Flags, config files and sweeps all go through them. Importing
this module imports neither torch nor Avalanche, so that ``--help`` and bad
settings answer at once.

Protocol settings (experiences, epochs, batch size, data subset, model) left
at None take the value of the chosen preset from
``experiments/protocols/<benchmark>.toml``; optimizer and strategy settings
left at None take the defaults of :func:`cl_cm.make_optimizer` and
:func:`strategies.make_strategy`.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cl_cm.names import BUFFERED, OPTIMIZER_NAMES, has_buffer
from strategies.names import BOUNDARIES, KAPPA_SCHEDULES, PLUGIN_SETTINGS, RECIPES, STRATEGY_NAMES, strategy_options

#: benchmark -> its scenarios (Hsu et al. 2018, "Re-evaluating Continual Learning Scenarios"), the default first
SCENARIOS = {
    "permuted_mnist": ("domain",),
    "rotated_mnist": ("domain",),
    "split_mnist": ("class", "task", "domain"),
    "split_cifar10": ("class",),
    "split_cifar100": ("task",),
}
BENCHMARKS = tuple(SCENARIOS)
PROTOCOL_DIR = Path(__file__).parent / "protocols"
VALIDATION = ("none", "holdout", "first_tasks")
#: model -> the benchmarks it takes (mlp: 28x28 MNIST images; the ResNets: 3x32x32 CIFAR images)
MODELS = {"mlp": ("permuted_mnist", "rotated_mnist", "split_mnist"),
          "slim_resnet18": ("split_cifar10", "split_cifar100"),
          "mt_slim_resnet18": ("split_cifar10", "split_cifar100")}
#: classes of the benchmarks that split their classes into experiences
SPLIT_CLASSES = {"split_mnist": 10, "split_cifar10": 10, "split_cifar100": 100}


def _f(default, help: str, group: str, choices=None, shown=None, several=None, grid_default=None):
    """A setting: its default, its help for users, its group in ``--help``,
    its choices, and (``shown``) what a None default means, for ``--help``.
    ``several``: the name of a flag that takes several values, one run each
    (``cl-cm toy --seeds 0 1``), whose default is ``grid_default`` if given,
    else the setting's default."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "shown": shown,
                                            "several": several, "grid_default": grid_default})


@dataclass
class OptimizerSettings:
    """Optimizer hyperparameters shared by every kind of run (None: the
    default of :func:`strategies.make_optimizer`)."""

    lr: float | None = _f(None, "learning rate", "optimizer", shown="sgd 0.01, Adam family 1e-3")
    weight_decay: float | None = _f(None, "decoupled weight decay", "optimizer", shown="0")
    momentum: float | None = _f(None, "SGD momentum", "optimizer", shown="0")
    beta1: float | None = _f(None, "Adam family: beta1, decay of the first moment m", "optimizer", shown="0.9")
    beta2: float | None = _f(None, "Adam family: beta2, decay of the second moment v", "optimizer", shown="0.999")
    buffer_size: int | None = _f(None, "C, critical momenta kept", "optimizer", shown="5")
    decay: float | None = _f(None, "lambda, priority decay per step", "optimizer", shown="0.7")
    kappa: float | None = _f(None, "kappa, weight of mean(B)", "optimizer", shown="1.0")
    second_moment: str | None = _f(None, "Adam+CM: aggregated (the paper's) or gradient", "optimizer",
                                   shown="aggregated")
    rho: float | None = _f(None, "SAM radius", "optimizer", shown="0.05")
    adaptive: bool | None = _f(None, "adaptive SAM", "optimizer", shown="off")
    buffer_dtype: str | None = _f(None, "how the buffer stores entries: float32, bfloat16, int8 (8-bit, block-scaled)",
                                  "optimizer", shown="the parameters' dtype")


@dataclass
class RuntimeSettings:
    """Where and how a run executes; none of it changes results."""

    out: str = _f("runs/run", "folder of this run's results", "runtime")
    data_root: str = _f("data", "folder holding (or receiving) the data sets", "runtime")
    download: bool = _f(True, "let torchvision download missing data (--no-download: fail at once)", "runtime")
    device: str | None = _f(None, "cpu, cuda, cuda:1, ...", "runtime", shown="cuda if available")
    threads: int | None = _f(None, "torch CPU threads", "runtime", shown="torch's choice")
    eval_batch_size: int = _f(512, "evaluation mini-batch size", "runtime")
    progress: bool = _f(True, "progress bars", "runtime")
    tuned: str | None = _f(None, "tuned.toml written by cl-cm tune: the run takes its arm's chosen settings", "runtime")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunConfig(OptimizerSettings, RuntimeSettings):
    """Every setting of ``cl-cm run``."""

    # ---- what to run
    benchmark: str = _f("permuted_mnist", "continual-learning benchmark", "run", BENCHMARKS)
    scenario: str | None = _f(None, "task (one head per experience), domain (one shared head over the "
                              "experience's classes) or class (one head over all classes); split_mnist takes "
                              "all three, the other benchmarks one", "run", shown="the benchmark's own")
    strategy: str = _f("naive", "Avalanche strategy", "run", STRATEGY_NAMES)
    optimizer: str = _f("adam", "optimizer", "run", OPTIMIZER_NAMES)
    preset: str = _f("cpu", "protocol preset: smoke (CI, seconds), cpu (minutes on 2 cores), paper "
                     "(the full protocol, for a GPU); see experiments/protocols/", "run")
    seed: int = _f(0, "seed of everything random: initialisation, permutations, data order", "run")
    recipe: str | None = _f(None, "a named setup: recommended = adam_cm with second_moment gradient and the "
                            "shrink 0.5 boundary policy (docs/results.md); settings given with it must agree",
                            "run", tuple(RECIPES))
    # ---- buffer annealing (optimizers with a buffer: adam_cm, adam_cg, adam_cm_sam)
    boundary: str = _f("keep", "buffer policy at experience boundaries", "buffer", BOUNDARIES)
    factor: float | None = _f(None, "factor of the decay and shrink policies, in (0, 1]", "buffer")
    min_size: int = _f(0, "smallest capacity the shrink policy leaves", "buffer")
    kappa_schedule: str = _f("constant", "kappa within each experience", "buffer", KAPPA_SCHEDULES)
    kappa_start: float | None = _f(None, "kappa at the start of each experience", "buffer",
                                   shown="the value of --kappa")
    kappa_end: float | None = _f(None, "kappa at the end of each experience (linear, cosine)", "buffer")
    reset_moments: bool = _f(False, "Adam family: zero m, v and the step count at each boundary (a buffer is "
                             "kept; the boundary policy decides its fate)", "buffer")
    # ---- protocol (default: the preset's value)
    n_experiences: int | None = _f(None, "number of experiences", "protocol")
    epochs: int | None = _f(None, "training epochs per experience", "protocol")
    batch_size: int | None = _f(None, "training mini-batch size", "protocol")
    train_per_class: int | None = _f(None, "training samples per class used (0: all)", "protocol")
    test_per_class: int | None = _f(None, "test samples per class used (0: all)", "protocol")
    model: str | None = _f(None, "mlp, slim_resnet18 or mt_slim_resnet18", "protocol")
    width: int | None = _f(None, "hidden units (mlp) or base channels nf (resnets)", "protocol")
    augment: bool | None = _f(None, "random crop and flip on CIFAR training images", "protocol")
    # ---- strategy (default: strategies.make_strategy's)
    ewc_lambda: float | None = _f(None, "EWC penalty weight", "strategy", shown="1.0")
    si_lambda: float | None = _f(None, "SI penalty weight", "strategy", shown="1.0")
    lwf_alpha: float | None = _f(None, "LwF distillation weight", "strategy", shown="1.0")
    lwf_temperature: float | None = _f(None, "LwF temperature", "strategy", shown="2.0")
    mem_size: int | None = _f(None, "Replay memory size", "strategy", shown="200")
    patterns_per_exp: int | None = _f(None, "GEM/A-GEM patterns stored per experience", "strategy", shown="64")
    sample_size: int | None = _f(None, "A-GEM reference sample size", "strategy", shown="64")
    memory_strength: float | None = _f(None, "GEM margin", "strategy", shown="0.5")
    reset_optimizer_state: bool = _f(False, "Avalanche's train(exp, reset_optimizer_state=True) at every "
                                     "experience: a fresh optimizer state, buffer included", "strategy")
    # ---- validation (cl-cm tune): never the test data
    validation: str = _f("none", "none: train on the training data, evaluate on the test data; holdout: train on "
                         "all but a fixed class-balanced fraction of each experience's training data and evaluate "
                         "on that fraction; first_tasks: as holdout, on a separate stream of the first "
                         "validation_tasks experiences drawn with another seed (Chaudhry et al. 2019)",
                         "validation", VALIDATION)
    validation_fraction: float = _f(0.1, "fraction of each class held out for validation", "validation")
    validation_tasks: int = _f(3, "experiences of the tuning stream of validation = first_tasks", "validation")
    # ---- measurements and runtime
    sharpness: bool = _f(False, "record the top Hessian eigenvalue on every seen experience after each one", "run")
    sharpness_samples: int = _f(128, "samples per experience for --sharpness", "run")
    sharpness_tasks: str = _f("seen", "with --sharpness: seen (every experience seen so far, after each one) or "
                              "learned (only the experience just learned: the diagonal, far cheaper)", "run")


#: config fields that do not change results (they may differ between a run and its resumption)
RUNTIME_FIELDS = ("data_root", "download", "out", "device", "threads", "progress", "eval_batch_size", "tuned")
PROTOCOL_FIELDS = ("n_experiences", "epochs", "batch_size", "train_per_class", "test_per_class", "model",
                   "width", "augment")
OPTIMIZER_FIELDS = ("lr", "weight_decay", "momentum", "beta1", "beta2", "buffer_size", "decay", "kappa",
                    "second_moment", "rho", "adaptive", "buffer_dtype")
#: config field -> the optimizer argument it sets (beta1 and beta2 are the two halves of ``betas``)
OPTIMIZER_ARGUMENT = {"beta1": "betas", "beta2": "betas"}
VALIDATION_FIELDS = ("validation", "validation_fraction", "validation_tasks")
#: config name -> make_strategy argument
STRATEGY_FIELDS = {"ewc_lambda": "ewc_lambda", "si_lambda": "si_lambda", "lwf_alpha": "alpha",
                   "lwf_temperature": "temperature", "mem_size": "mem_size",
                   "patterns_per_exp": "patterns_per_exp", "sample_size": "sample_size",
                   "memory_strength": "memory_strength"}
BUFFER_FIELDS = tuple(k for k in PLUGIN_SETTINGS if k != "reset_moments")
#: what makes an arm of a comparison, apart from its benchmark, protocol and strategy: the optimizer,
#: its settings, the plugin's (buffer policy, κ schedule, moments reset) and Avalanche's optimizer reset
ARM_FIELDS = ("optimizer", *OPTIMIZER_FIELDS, *PLUGIN_SETTINGS, "reset_optimizer_state")
FIELD_NAMES = tuple(f.name for f in fields(RunConfig))


# ------------------------------------------------------------ cl-cm supervised
TASKS = ("cifar10", "cifar100", "ptb")
IMAGE_PROTOCOL = ("epochs", "batch_size", "model", "width", "train_per_class", "test_per_class", "augment",
                  "lr_schedule", "sharpness_samples")
LM_PROTOCOL = ("epochs", "batch_size", "model", "width", "layers", "dropout", "bptt", "clip",
               "max_train_tokens", "lr_schedule")


@dataclass
class SupervisedConfig(OptimizerSettings, RuntimeSettings):
    """Every setting of ``cl-cm supervised``."""

    task: str = _f("cifar10", "supervised benchmark", "run", TASKS)
    optimizer: str = _f("adam", "optimizer", "run", OPTIMIZER_NAMES)
    preset: str = _f("cpu", "protocol preset (smoke, cpu, paper, ...): see experiments/protocols/<task>.toml",
                     "run")
    seed: int = _f(0, "seed of initialisation, data order, augmentation and dropout", "run")
    # ---- protocol (default: the preset's value)
    epochs: int | None = _f(None, "training epochs", "protocol")
    batch_size: int | None = _f(None, "mini-batch size (PTB: parallel token streams)", "protocol")
    model: str | None = _f(None, "slim_resnet18, resnet34 (CIFAR) or lstm (PTB)", "protocol")
    width: int | None = _f(None, "base channels (ResNets) or hidden units (LSTM)", "protocol")
    train_per_class: int | None = _f(None, "CIFAR training images per class (0: all)", "protocol")
    test_per_class: int | None = _f(None, "CIFAR test images per class (0: all)", "protocol")
    augment: bool | None = _f(None, "CIFAR random crop and flip", "protocol")
    lr_schedule: str | None = _f(None, "cosine (to 0 over training) or constant", "protocol")
    layers: int | None = _f(None, "LSTM layers", "protocol")
    dropout: float | None = _f(None, "LSTM dropout", "protocol")
    bptt: int | None = _f(None, "truncated backpropagation length in tokens", "protocol")
    clip: float | None = _f(None, "gradient-norm clipping (0: none)", "protocol")
    max_train_tokens: int | None = _f(None, "PTB training tokens used (0: all)", "protocol")
    sharpness_samples: int | None = _f(None, "CIFAR training images for the final top Hessian eigenvalue "
                                       "(0: skip)", "protocol")
    # ---- measurements
    stats_every: int = _f(25, "iterations between two buffer-statistics records", "run")


class ConfigError(ValueError):
    """A configuration that cannot run, with what to change."""


# ------------------------------------------------------------ valid values
@dataclass(frozen=True)
class Range:
    """The values a numeric setting takes: finite, between ``low`` and
    ``high`` (None: unbounded), each bound included unless ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a finite number"
        low, high = (f"{v}" if isinstance(v, int) or v is None else f"{v:g}" for v in (self.low, self.high))
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        return kind


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Range(0, low_open=True), Range(0), Range(1)
BELOW_ONE = Range(0, 1, high_open=True)
#: the largest seed: numpy's generators (seeded by Avalanche) take seeds below 2**32
MAX_SEED = 2**32 - 1

#: setting -> its valid values: a :class:`Range` for numbers, a tuple of names for text (fields
#: declared with ``choices`` use those). Every number must also be finite and of its field's type.
VALID: dict[str, Range | tuple] = {
    # optimizer (cl_cm's and torch's own checks, plus finiteness)
    "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "momentum": BELOW_ONE, "beta1": BELOW_ONE, "beta2": BELOW_ONE,
    "buffer_size": NON_NEGATIVE, "decay": Range(0, 1), "kappa": NON_NEGATIVE, "rho": NON_NEGATIVE,
    "second_moment": ("aggregated", "gradient"),
    "sharpness_tasks": ("seen", "learned"),
    "buffer_dtype": ("float32", "float64", "bfloat16", "float16", "int8"),  # names of cl_cm.buffer.DTYPE_NAMES
    # runtime
    "threads": AT_LEAST_ONE, "eval_batch_size": AT_LEAST_ONE,
    # run and buffer annealing
    "seed": Range(0, MAX_SEED), "factor": Range(0, 1, low_open=True), "min_size": NON_NEGATIVE,
    "kappa_start": NON_NEGATIVE, "kappa_end": NON_NEGATIVE,
    # protocol
    "n_experiences": AT_LEAST_ONE, "epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE,
    "train_per_class": NON_NEGATIVE, "test_per_class": NON_NEGATIVE, "width": AT_LEAST_ONE,
    "model": tuple(MODELS),
    # strategy
    "ewc_lambda": NON_NEGATIVE, "si_lambda": NON_NEGATIVE, "lwf_alpha": NON_NEGATIVE, "lwf_temperature": POSITIVE,
    "mem_size": AT_LEAST_ONE, "patterns_per_exp": AT_LEAST_ONE, "sample_size": AT_LEAST_ONE,
    "memory_strength": NON_NEGATIVE,
    # validation and measurements
    "validation_fraction": Range(0, 1, low_open=True, high_open=True), "validation_tasks": AT_LEAST_ONE,
    "sharpness_samples": AT_LEAST_ONE,
}


#: valid values of the settings of a supervised run (see :data:`VALID`)
SUPERVISED_VALID = {**VALID, "model": ("slim_resnet18", "resnet34", "lstm"), "lr_schedule": ("cosine", "constant"),
         "layers": AT_LEAST_ONE, "dropout": BELOW_ONE, "bptt": AT_LEAST_ONE, "clip": NON_NEGATIVE,
         "max_train_tokens": NON_NEGATIVE, "sharpness_samples": NON_NEGATIVE, "stats_every": AT_LEAST_ONE}


# ------------------------------------------------------------------ cl-cm toy
#: the 2-D landscapes of :mod:`experiments.toy`
LANDSCAPES = ("goldstein_price", "ackley", "sharp_wide")
TOY_OPTIMIZERS = ("adam", "adam_cg", "adam_sam", "adam_cm")


@dataclass
class ToyConfig:
    """One toy run: every optimizer from the same random starts on one
    landscape. ``cl-cm toy`` makes one run per landscape, sharpness and seed
    it is given."""

    landscape: str = _f("sharp_wide", "2-D landscapes", "toy", LANDSCAPES, several="landscapes",
                        grid_default=LANDSCAPES)
    sharpness: float = _f(0.3, "widths s of the sharp minimum of sharp_wide; several give the escape ratio "
                          "against sharpness", "toy", several="sharpness")
    optimizers: tuple[str, ...] = _f(TOY_OPTIMIZERS, "optimizers compared", "toy")
    starts: int = _f(100, "random starts per run", "toy")
    steps: int = _f(300, "optimizer steps per start", "toy")
    lr: float = _f(0.05, "learning rate of every optimizer", "toy")
    rho: float = _f(0.05, "SAM radius (adam_sam, adam_cm_sam)", "toy")
    seed: int = _f(0, "seeds of the starts", "toy", several="seeds")
    extra: dict = field(default_factory=dict)   # optimizer settings, e.g. {"kappa": 2.0} (Python only)


#: valid values of the settings of a toy run
TOY_VALID = {"sharpness": POSITIVE, "starts": AT_LEAST_ONE, "steps": AT_LEAST_ONE, "lr": POSITIVE,
             "rho": NON_NEGATIVE, "seed": Range(0, MAX_SEED)}


def toy_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cl-cm toy``, one per setting of :class:`ToyConfig`; a
    setting with ``several`` takes several values (one run each)."""
    group = parser.add_argument_group("toy settings")
    for f in fields(ToyConfig):
        meta = f.metadata
        if "group" not in meta:
            continue
        listed = meta["several"] is not None or f.name == "optimizers"
        default = meta["grid_default"] or ((f.default,) if meta["several"] else f.default)
        kind = str if f.name == "optimizers" else _kind(f)
        group.add_argument("--" + (meta["several"] or f.name), nargs="+" if listed else None, type=kind,
                           choices=meta["choices"], default=list(default) if listed else default,
                           help=f"{meta['help']} (default: {_help_default(default)})",
                           metavar=None if meta["choices"] else (meta["several"] or f.name).upper())


def toy_configs(args: argparse.Namespace) -> list[ToyConfig]:
    """The runs of ``cl-cm toy``, each setting checked (its type and range;
    the flag named in the error); the sharpness multiplies sharp_wide only."""
    def number(flag, value, rule, integer):
        if not is_number(value, integer) or not rule.admits(value):
            raise ConfigError(f"{flag} must be {rule.describe(integer)}, got {value!r}")

    for f in fields(ToyConfig):
        if f.name in TOY_VALID:
            flag = f.metadata["several"] or f.name
            values = getattr(args, flag)
            for value in (values if f.metadata["several"] else [values]):
                number(f"--{flag}", value, TOY_VALID[f.name], _kind(f) is int)
    for name in args.optimizers:
        check_choice("optimizer (--optimizers)", name, OPTIMIZER_NAMES)
    for name in args.landscapes:
        check_choice("landscape (--landscapes)", name, LANDSCAPES)
    shared = {k: getattr(args, k) for k in ("starts", "steps", "lr", "rho")}
    return [ToyConfig(landscape=landscape, sharpness=sharpness, optimizers=tuple(args.optimizers), seed=seed,
                      **shared)
            for landscape in args.landscapes
            for sharpness in (args.sharpness if landscape == "sharp_wide" else args.sharpness[:1])
            for seed in args.seeds]

def check_seeds(seeds, what: str, alternative: str = "") -> list[int]:
    """``seeds`` if it is a non-empty list of integers in [0, MAX_SEED]; else a
    ConfigError naming ``what`` (a flag, or a file's table and key) and any
    ``alternative`` form it also takes."""
    if not isinstance(seeds, list) or not seeds or not all(is_number(s, integer=True) and 0 <= s <= MAX_SEED
                                                            for s in seeds):
        raise ConfigError(f"{what} must be a non-empty list of integers in [0, {MAX_SEED}]{alternative}, "
                          f"got {seeds!r}")
    return seeds


def is_number(value, integer: bool = False) -> bool:
    """A finite int (or, unless ``integer``, float or an int that a float holds), not a bool."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    try:
        return integer or math.isfinite(float(value))
    except OverflowError:  # an int beyond the floats
        return False


def _shown(value, limit: int = 60) -> str:
    """``repr(value)``, shortened to ``limit`` characters for the error line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def checked_value(f: dataclasses.Field, value, valid=None):
    """``value`` for field ``f`` if it is of the field's type and valid (an
    int given for a float becomes a float); else :class:`ConfigError` naming
    the setting and what it takes."""
    valid = VALID if valid is None else valid
    name, kind, rule = f.name, _kind(f), valid.get(f.name)
    if value is None:
        if _optional(f):
            return None
        raise ConfigError(f"{name} needs a value (default: {f.default!r})")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {_shown(value)}")
        return value
    if kind in (int, float):
        integer = kind is int
        rule = rule if isinstance(rule, Range) else Range()
        if not is_number(value, integer) or not rule.admits(value):
            raise ConfigError(f"{name} must be {rule.describe(integer)}, got {_shown(value)}")
        return value if integer else float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a text value, got {_shown(value)}")
    choices = f.metadata.get("choices") or (rule if isinstance(rule, tuple) else None)
    if choices:
        check_choice(name, value, choices)
    return value


def check_values(cfg, valid=None):
    """``cfg`` with every value checked by :func:`checked_value`."""
    changes = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        new = checked_value(f, value, valid)
        if new is not value and type(new) is not type(value):
            changes[f.name] = new
    return dataclasses.replace(cfg, **changes) if changes else cfg


def check_device(device: str | None) -> None:
    """A device this machine has: cpu, cuda, cuda:N (N below the GPU count), mps."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return
    if dev.type == "mps" and torch.backends.mps.is_available():
        return
    raise ConfigError(f"device {device!r} is not available here; use cpu or cuda[:N]")


def path_kind(path, what: str) -> str:
    """"missing", "file" or "folder": what a path given by the user names. A
    path that cannot even be looked up (a NUL character, a name too long, a
    folder without permission) is a :class:`ConfigError` naming the setting."""
    try:
        if "\0" in str(path):
            raise ValueError("it holds a NUL character")
        p = Path(path).expanduser()
        if not p.exists():
            return "missing"
        return "folder" if p.is_dir() else "file"
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{what} {_shown(str(path))} cannot be used as a path ({reason})") from None


def check_data_root(data_root: str) -> None:
    if path_kind(data_root, "data_root") == "file":
        raise ConfigError(f"data_root {data_root} is a file; give the folder that holds the data sets")


def check_components(cfg) -> None:
    """Build the run's optimizer on a dummy parameter, and its buffer plugin,
    so that their own checks (combinations of settings) speak before anything
    is written."""
    import torch

    from cl_cm import make_optimizer

    try:
        make_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))], **optimizer_kwargs(cfg))
        if getattr(cfg, "boundary", None) is not None and has_buffer(cfg.optimizer):
            from strategies import CriticalMomentaPlugin

            CriticalMomentaPlugin(cfg.boundary, cfg.factor, cfg.min_size, cfg.kappa_schedule, cfg.kappa_start,
                                  cfg.kappa_end)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def check_keys(keys, where: str, allowed=FIELD_NAMES) -> None:
    """Raise :class:`ConfigError` for an unknown key, suggesting the closest."""
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(allowed)}"
            raise ConfigError(f"unknown key {key!r} in {where}{hint}")


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON file into a dict."""
    kind = path_kind(path, "config file")
    path = Path(path)
    if kind == "missing":
        raise ConfigError(f"config file {path} does not exist")
    if kind != "file":
        raise ConfigError(f"config file {path} is not a file; give a TOML or JSON file")
    try:
        text = path.read_bytes()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text.decode())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of settings, not a {type(data).__name__}")
    return data


def from_mapping(values: dict[str, Any], where: str, base=None, cls=None):
    """A config (``cls``, default RunConfig) from a flat mapping of field names (a config file)."""
    if cls is None:
        cls = type(base) if base is not None else RunConfig
    check_keys(values, where, allowed=tuple(f.name for f in fields(cls)))
    check_recipe_given(values, where)
    return dataclasses.replace(base or cls(), **values)


def check_recipe_given(values: dict[str, Any], where: str) -> None:
    """A ConfigError where ``values`` (settings given explicitly: a file's, the
    flags') names a recipe and gives one of its settings another value, even
    that setting's default (which :func:`apply_recipe`, seeing only the
    config, cannot tell from a setting left unset)."""
    recipe = values.get("recipe")
    if recipe is None:
        return
    check_choice("recipe", recipe, tuple(RECIPES))
    for key, value in RECIPES[recipe].items():
        if key in values and values[key] != value:
            raise ConfigError(f"{where}: recipe {recipe} sets {key} = {value!r}, but {key} = {values[key]!r} was "
                              "given; drop one of them")


def protocol(name: str, preset: str, allowed=PROTOCOL_FIELDS) -> dict[str, Any]:
    """The protocol table ``[preset]`` of ``protocols/<name>.toml``, plus its
    ``_description`` and the file's ``_scenario``."""
    path = PROTOCOL_DIR / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"unknown benchmark or task {name!r}")
    table = load_file(path)
    presets = [k for k, v in table.items() if isinstance(v, dict)]
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r} for {name}; choose one of {', '.join(presets)}")
    values = dict(table[preset])
    description = values.pop("description", "")
    check_keys(values, f"{path} [{preset}]", allowed=allowed)
    return {**values, "_scenario": table.get("scenario", ""), "_description": description}


def fill_protocol(cfg, name: str, allowed):
    """``cfg`` with every protocol field left at None taken from its preset."""
    preset = protocol(name, cfg.preset, allowed)
    filled = {k: preset[k] for k in allowed if getattr(cfg, k) is None and k in preset}
    missing = [k for k in allowed if getattr(cfg, k) is None and k not in preset]
    if missing:
        raise ConfigError(f"preset {cfg.preset!r} of {name} does not set {missing}; pass them as flags")
    return dataclasses.replace(cfg, **filled)


def check_choice(name: str, value, allowed) -> None:
    """Raise :class:`ConfigError` when ``value`` is not one of ``allowed``, suggesting the closest."""
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown {name} {value!r}{hint}; choose one of {', '.join(map(str, allowed))}")


def check_optimizer_settings(cfg) -> None:
    """Optimizer settings given explicitly must be ones that the optimizer takes."""
    from cl_cm import optimizer_options

    accepted = optimizer_options(cfg.optimizer)
    wrong = [k for k in OPTIMIZER_FIELDS if getattr(cfg, k) is not None and OPTIMIZER_ARGUMENT.get(k, k) not in accepted]
    if wrong:
        takes = [k for k in OPTIMIZER_FIELDS if OPTIMIZER_ARGUMENT.get(k, k) in accepted]
        raise ConfigError(f"{', '.join(wrong)} does not apply to optimizer {cfg.optimizer!r}; it takes "
                          f"{', '.join(takes)}")


def has_moments(optimizer: str) -> bool:
    """Whether ``optimizer`` keeps Adam's moments m and v (the Adam family)."""
    from cl_cm import optimizer_options

    return "betas" in optimizer_options(optimizer)


def apply_recipe(cfg: RunConfig) -> RunConfig:
    """The settings of ``cfg.recipe`` (:data:`strategies.names.RECIPES`)
    where ``cfg`` leaves them at their defaults; a ConfigError where it gives
    another value (:func:`check_recipe_given`, over the settings ``cfg``
    sets away from their defaults)."""
    if cfg.recipe is None:
        return cfg
    keys = RECIPES[cfg.recipe] if cfg.recipe in RECIPES else {}
    unset = {k for k in keys if getattr(cfg, k) is None or getattr(cfg, k) == getattr(RunConfig, k)}
    check_recipe_given({"recipe": cfg.recipe, **{k: getattr(cfg, k) for k in keys if k not in unset}}, "settings")
    return dataclasses.replace(cfg, **{k: RECIPES[cfg.recipe][k] for k in unset})


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill protocol fields from the preset and, with ``tuned``, the arm's
    chosen settings from a tuned.toml; check every setting (its type, its
    range, and the combinations that the benchmark, model, optimizer and
    strategy take): a config that resolves runs."""
    cfg = apply_recipe(check_values(cfg))
    for name, allowed in (("benchmark", BENCHMARKS), ("strategy", STRATEGY_NAMES),
                          ("optimizer", OPTIMIZER_NAMES), ("boundary", BOUNDARIES),
                          ("kappa_schedule", KAPPA_SCHEDULES), ("validation", VALIDATION)):
        check_choice(name, getattr(cfg, name), allowed)
    if cfg.scenario is None:
        cfg = dataclasses.replace(cfg, scenario=SCENARIOS[cfg.benchmark][0])
    if cfg.scenario not in SCENARIOS[cfg.benchmark]:
        raise ConfigError(f"{cfg.benchmark} has no scenario {cfg.scenario!r}; it takes "
                          f"{', '.join(SCENARIOS[cfg.benchmark])}")
    cfg = fill_protocol(cfg, cfg.benchmark, PROTOCOL_FIELDS)
    if cfg.tuned:
        from .tuning import apply_tuned

        cfg = apply_tuned(cfg)
    check_optimizer_settings(cfg)
    if not has_buffer(cfg.optimizer):
        changed = [k for k in BUFFER_FIELDS if getattr(cfg, k) != getattr(RunConfig, k)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} only apply to optimizers with a buffer "
                              f"({', '.join(BUFFERED)}), not {cfg.optimizer!r}")
    if cfg.reset_moments and not has_moments(cfg.optimizer):
        raise ConfigError(f"reset_moments applies to the Adam family, not {cfg.optimizer!r}")
    takes = strategy_options(cfg.strategy)
    wrong = [k for k, arg in STRATEGY_FIELDS.items() if getattr(cfg, k) is not None and arg not in takes]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} does not apply to strategy {cfg.strategy!r}")
    cfg = check_values(cfg)  # the preset's and the tuned values too
    if cfg.benchmark not in MODELS[cfg.model]:
        takes = [m for m, benchmarks in MODELS.items() if cfg.benchmark in benchmarks]
        raise ConfigError(f"model {cfg.model!r} does not take {cfg.benchmark} images; use {' or '.join(takes)}")
    if cfg.model == "mt_slim_resnet18" and cfg.scenario != "task":
        raise ConfigError(f"model 'mt_slim_resnet18' has one head per task: it needs --scenario task, not "
                          f"{cfg.scenario!r}; use slim_resnet18")
    classes = SPLIT_CLASSES.get(cfg.benchmark)
    if classes and classes % cfg.n_experiences:
        ok = [n for n in range(1, classes + 1) if classes % n == 0]
        raise ConfigError(f"n_experiences {cfg.n_experiences}: the {classes} classes of {cfg.benchmark} do not "
                          f"split into that many equal experiences; use one of {', '.join(map(str, ok))}")
    if cfg.validation == "first_tasks" and cfg.validation_tasks > cfg.n_experiences:
        raise ConfigError(f"validation_tasks ({cfg.validation_tasks}) must not exceed n_experiences "
                          f"({cfg.n_experiences})")
    if cfg.strategy == "agem":  # A-GEM draws sample_size // (experiences in memory) samples from each
        stored = (cfg.validation_tasks if cfg.validation == "first_tasks" else cfg.n_experiences) - 1
        sample_size = cfg.sample_size if cfg.sample_size is not None else strategy_options("agem")["sample_size"]
        if sample_size < stored:
            raise ConfigError(f"sample_size {sample_size}: A-GEM draws sample_size // (experiences in its memory) "
                              f"samples from each, and its memory reaches {stored} experiences; use sample_size "
                              f">= {stored}")
    check_device(cfg.device)
    check_data_root(cfg.data_root)
    check_components(cfg)
    return cfg


def optimizer_kwargs(cfg) -> dict[str, Any]:
    """The optimizer's keyword arguments given by ``cfg`` (None: the optimizer's default)."""
    out = {k: getattr(cfg, k) for k in OPTIMIZER_FIELDS if getattr(cfg, k) is not None and k not in OPTIMIZER_ARGUMENT}
    if cfg.beta1 is not None or cfg.beta2 is not None:
        from cl_cm import optimizer_options

        default = optimizer_options(cfg.optimizer)["betas"]
        out["betas"] = (default[0] if cfg.beta1 is None else cfg.beta1, default[1] if cfg.beta2 is None else cfg.beta2)
    return out


def strategy_kwargs(cfg: RunConfig) -> dict[str, Any]:
    return {arg: getattr(cfg, k) for k, arg in STRATEGY_FIELDS.items() if getattr(cfg, k) is not None}


def bench_label(cfg) -> str:
    """``split_mnist-task``: the benchmark, and its scenario where it has several."""
    scenario = cfg["scenario"] if isinstance(cfg, dict) else cfg.scenario
    benchmark = cfg["benchmark"] if isinstance(cfg, dict) else cfg.benchmark
    return benchmark + (f"-{scenario}" if len(SCENARIOS.get(benchmark, ())) > 1 and scenario else "")


def policy_label(cfg: RunConfig) -> str:
    """``adam``, ``adam+resetm``, ``adam_cm/keep``, ``adam_cm/decay0.5``, ``adam_cm/shrink0.5min1``..."""
    resetm = "+resetm" if cfg.reset_moments else ""
    if not has_buffer(cfg.optimizer):
        return cfg.optimizer + resetm
    label = cfg.boundary + (f"{cfg.factor:g}" if cfg.factor is not None else "")
    if cfg.min_size:
        label += f"min{cfg.min_size}"
    if cfg.kappa_schedule != "constant":
        label += f"+{cfg.kappa_schedule}"
    return f"{cfg.optimizer}/{label}{resetm}"


def run_label(cfg: RunConfig, exclude=()) -> str:
    """The policy label plus every optimizer or strategy setting given
    explicitly, except those in ``exclude`` (tuned ones): what tells the arms
    of a comparison apart."""
    extra = {k: getattr(cfg, k) for k in (*OPTIMIZER_FIELDS, *STRATEGY_FIELDS) if getattr(cfg, k) is not None}
    if cfg.kappa_schedule != "constant":
        extra.update(kappa_start=cfg.kappa_start, kappa_end=cfg.kappa_end)
    if cfg.reset_optimizer_state:
        extra["reset_optimizer_state"] = True
    extra = {k: v for k, v in extra.items() if k not in exclude and v is not None}
    return " ".join([policy_label(cfg)] + [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in sorted(extra.items())])


def provenance(cfg: RunConfig, tuned_keys=()) -> dict[str, str]:
    """Where each result-changing setting of a resolved config came from:
    ``tuned``, ``preset <name>``, ``default`` or ``given`` (a flag, a config
    file or a sweep)."""
    preset = protocol(cfg.benchmark, cfg.preset)
    out = {}
    for f in fields(cfg):
        if f.name in RUNTIME_FIELDS:
            continue
        value = getattr(cfg, f.name)
        if f.name in tuned_keys:
            out[f.name] = f"tuned ({cfg.tuned})"
        elif cfg.recipe and f.name in RECIPES[cfg.recipe]:
            out[f.name] = f"recipe {cfg.recipe}"
        elif f.name in PROTOCOL_FIELDS and preset.get(f.name) == value:
            out[f.name] = f"preset {cfg.preset}"
        elif f.name == "scenario" and value == SCENARIOS[cfg.benchmark][0]:
            out[f.name] = "default"
        elif value is None or value == f.default:
            out[f.name] = "default"
        else:
            out[f.name] = "given"
    return out


# ------------------------------------------------------------------- argparse
#: what the settings of each group default to, when their own default is None
GROUP_HELP = {
    "protocol": "Left unset, each takes the value of the chosen --preset (experiments/protocols/).",
    "optimizer": "Left unset, each takes the optimizer's own default, shown in parentheses.",
    "strategy": "Left unset, each takes the strategy's default, shown in parentheses.",
    "buffer": "At experience boundaries and within each experience. All but --reset-moments apply to the "
              "optimizers with a buffer: " + ", ".join(BUFFERED) + "; --reset-moments to the Adam family.",
}


def _help_default(value) -> str:
    """A default as ``--help`` shows it: on/off, a list joined by spaces, else its text."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, cls=None) -> None:
    """One flag per field of ``cls`` (default RunConfig), grouped, each with
    its one default (or what a None default means) in its help."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls or RunConfig):
        meta = f.metadata
        if "group" not in meta:
            continue
        name = meta["group"]
        if name not in groups:
            groups[name] = parser.add_argument_group(f"{name} settings", GROUP_HELP.get(name))
        group = groups[name]
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f)
        default = meta["shown"] if meta["shown"] is not None else f.default
        help_text = meta["help"] if default is None else f"{meta['help']} (default: {_help_default(default)})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, type=kind, choices=meta["choices"], default=argparse.SUPPRESS,
                               help=help_text, metavar=f.name.upper() if not meta["choices"] else None)


def _kind(f: dataclasses.Field):
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


def from_args(args: argparse.Namespace, cls=None):
    """Config file first (``--config``), then the flags given on the command line."""
    cls = cls or RunConfig
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    base, given = cls(), {}
    if getattr(args, "config", None):
        given = load_file(args.config)
        base = from_mapping(given, str(args.config), cls=cls)
    check_recipe_given({**given, **values}, "the command line")
    return dataclasses.replace(base, **values)
