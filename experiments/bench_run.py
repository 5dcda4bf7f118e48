"""Time whole continual-learning runs: ``cl-cm run`` against a plain PyTorch loop doing the same work.

    python -m experiments.bench_run [--benchmark permuted_mnist split_cifar10] [--optimizer adam adam_cm]
        [--preset cpu] [--data-root data] [--threads 1] [--repeats 3] [--json FILE] [--float64]

For every benchmark and optimizer it times, in this process:

* the runner: :func:`experiments.runner.run`, the code behind ``cl-cm run``
  (Avalanche's strategy and training loop, plugins, metrics, checkpoints,
  results folder), in a temporary folder;
* a plain loop: the same data tensors (MNIST or CIFAR-10 through the same
  loaders, subsets, normalisation and permutations as
  :func:`experiments.data.build_benchmark`), the same model and
  initialisation, the same optimizer, the same mini-batches in the same order
  (it draws its random numbers exactly where Avalanche's data loaders and the
  CIFAR augmentation draw theirs), and the same evaluations (every test set
  after every experience), written as a short PyTorch loop.

It prints each side's training time (the sum over experiences of the time in
training, as the runner reports it) and wall time (from the configuration to
the finished results, data loading included, imports not), and the ratios
runner / plain; also the same two in CPU time of this process
(``time.process_time``; for the runner, around Avalanche's ``train``, the
call that the runner times), which a busy shared machine disturbs less. The runs alternate (runner first in even repeats, plain first
in odd ones) so that slow drifts of a shared machine hit both. Both sides
must produce the same accuracy matrix; ``--float64`` runs both in float64 (the
agreement check used by the tests), and any disagreement beyond 1e-9 is an
error. The import time of each side is measured in fresh interpreters
(``--imports``). This is a benchmark, not a test: docs/performance.md
records its output beside the command.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

BENCHMARKS = ("permuted_mnist", "split_cifar10")
#: what each side imports before it can start: a plain script needs torch and torchvision; the runner
#: imports the command line and, when it trains, the Avalanche modules that experiments.runner._train uses
IMPORTS = {
    "plain": "import torch, torchvision",
    "runner": ("import experiments.cli, experiments.runner, experiments.data, strategies, avalanche.checkpointing, "
               "avalanche.evaluation.metrics, avalanche.training.plugins, avalanche.benchmarks, avalanche.models"),
}


def make_config(benchmark: str, optimizer: str, preset: str, data_root: str, threads: int, out: str = "unused"):
    from . import config as C

    return C.resolve(C.RunConfig(benchmark=benchmark, optimizer=optimizer, preset=preset, data_root=data_root,
                                 threads=threads, out=out, download=False, progress=False))


# ------------------------------------------------------------------ the plain loop
def plain_data(cfg) -> tuple[list, list, bool]:
    """Per experience (inputs, targets) for training and for testing, and
    whether training inputs are augmented: the tensors that
    :func:`experiments.data.build_benchmark` puts in its scenario, built
    directly, in the scenario's sample order (see :func:`_by_class`)."""
    from .data import (CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD, ImageTensorDataset, balanced_subset,
                       load_torchvision)

    norm = ImageTensorDataset.normalise
    if cfg.benchmark == "permuted_mnist":
        xtr, ytr, xte, yte = load_torchvision("MNIST", cfg.data_root, cfg.download)
        itr, ite = balanced_subset(ytr, cfg.train_per_class), balanced_subset(yte, cfg.test_per_class)
        gen = torch.Generator().manual_seed(cfg.seed)
        perms = [torch.randperm(28 * 28, generator=gen) for _ in range(cfg.n_experiences)]
        xtr = norm(xtr[itr], (MNIST_MEAN,), (MNIST_STD,)).flatten(1)
        xte = norm(xte[ite], (MNIST_MEAN,), (MNIST_STD,)).flatten(1)
        # one data set per experience: nc_benchmark numbers the classes of experience k 10k..10k+9
        train = [_by_class(xtr[:, p], ytr[itr], 10 * k) for k, p in enumerate(perms)]
        test = [_by_class(xte[:, p], yte[ite], 10 * k) for k, p in enumerate(perms)]
        return train, test, False
    if cfg.benchmark == "split_cifar10":
        xtr, ytr, xte, yte = load_torchvision("CIFAR-10", cfg.data_root, cfg.download)
        itr, ite = balanced_subset(ytr, cfg.train_per_class), balanced_subset(yte, cfg.test_per_class)
        xtr, ytr = norm(xtr[itr], CIFAR10_MEAN, CIFAR10_STD), ytr[itr]
        xte, yte = norm(xte[ite], CIFAR10_MEAN, CIFAR10_STD), yte[ite]
        per = 10 // cfg.n_experiences
        splits = []
        for x, y in ((xtr, ytr), (xte, yte)):
            masks = [(y >= k * per) & (y < (k + 1) * per) for k in range(cfg.n_experiences)]
            splits.append([_by_class(x[m], y[m]) for m in masks])
        return splits[0], splits[1], cfg.augment
    raise ValueError(f"bench_run times {', '.join(BENCHMARKS)}, not {cfg.benchmark!r}")


def _by_class(x: torch.Tensor, y: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x, y`` in the order of Avalanche's nc_benchmark: class by class, the
    classes in the iteration order of the Python set of their scenario-wide
    ids (``offset`` + label), each class in data set order."""
    ids = set(c + offset for c in sorted(y.unique().tolist()))
    order = torch.cat([(y == c - offset).nonzero().flatten() for c in ids])
    return x[order], y[order]


def crop_and_flip(x: torch.Tensor) -> torch.Tensor:
    """4-pixel zero-padded random crop and horizontal flip of every image of
    the batch, drawing per image (x offset, y offset) then the flip, as the
    runner's data set does image by image."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (4, 4, 4, 4))
    out = []
    for img in padded:
        dx, dy = torch.randint(0, 9, (2,)).tolist()
        crop = img[:, dy:dy + h, dx:dx + w]
        out.append(crop.flip(-1) if torch.rand(()) < 0.5 else crop)
    return torch.stack(out)


def _draw_loader_seed() -> int:
    """The one draw from the global generator that torch's DataLoader makes
    when an iteration starts (its workers' base seed), even without workers."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def plain_run(cfg) -> dict[str, Any]:
    """Train and evaluate ``cfg`` (a resolved RunConfig of permuted_mnist or
    split_cifar10, naive strategy) with a plain loop; return its accuracy
    matrices and timings."""
    from strategies import make_optimizer

    from . import config as C
    from .data import Benchmark, build_model

    t_start, cpu_start = time.perf_counter(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, test, augment = plain_data(cfg)
    n_classes = 10
    per = n_classes // cfg.n_experiences if cfg.benchmark == "split_cifar10" else n_classes
    model = build_model(cfg, Benchmark(None, "", n_classes, per, cfg.benchmark == "split_cifar10", False))
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), **C.optimizer_kwargs(cfg))
    masked = cfg.benchmark == "split_cifar10"
    accuracy, accuracy_task_il, train_seconds, train_cpu_seconds = [], [], [], []
    for k, (x_train, y_train) in enumerate(train):
        t0, cpu0 = time.perf_counter(), time.process_time()
        model.train()
        for _ in range(cfg.epochs):
            _draw_loader_seed()
            shuffle = torch.Generator().manual_seed(_draw_loader_seed())  # as RandomSampler seeds itself
            for idx in torch.randperm(len(y_train), generator=shuffle).split(cfg.batch_size):
                x, y = x_train[idx], y_train[idx]
                if augment:
                    x = crop_and_flip(x)
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
        train_seconds.append(time.perf_counter() - t0)
        train_cpu_seconds.append(time.process_time() - cpu0)
        model.eval()
        row, row_task_il = [], []
        with torch.no_grad():
            for j, (x_test, y_test) in enumerate(test):
                _draw_loader_seed()
                classes = torch.arange(j * per, (j + 1) * per)
                correct = correct_task_il = 0
                for xb, yb in zip(x_test.split(cfg.eval_batch_size), y_test.split(cfg.eval_batch_size)):
                    out = model(xb)
                    correct += int((out.max(1)[1] == yb).sum())
                    if masked:
                        correct_task_il += int((classes[out[:, classes].argmax(1)] == yb).sum())
                row.append(correct / len(y_test))
                row_task_il.append(correct_task_il / len(y_test))
        accuracy.append(row)
        accuracy_task_il.append(row_task_il)
    return {"accuracy_matrix": accuracy, "task_il": accuracy_task_il if masked else None,
            "train_seconds": sum(train_seconds), "wall_seconds": time.perf_counter() - t_start,
            "train_cpu_seconds": sum(train_cpu_seconds), "cpu_seconds": time.process_time() - cpu_start}


# ------------------------------------------------------------------ the runner
def runner_run(cfg) -> dict[str, Any]:
    """``cl-cm run`` of ``cfg`` in a fresh temporary folder."""
    import dataclasses

    from .runner import run

    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp, cpu_time_in_training() as train_cpu:
        t0, cpu0 = time.perf_counter(), time.process_time()
        metrics = run(dataclasses.replace(cfg, out=str(Path(tmp) / "run")), quiet=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"accuracy_matrix": metrics["accuracy_matrix"],
            "task_il": metrics["task_il"]["accuracy_matrix"] if "task_il" in metrics else None,
            "train_seconds": metrics["train_seconds"], "wall_seconds": wall,
            "train_cpu_seconds": sum(train_cpu), "cpu_seconds": cpu}


@contextlib.contextmanager
def cpu_time_in_training() -> Iterator[list[float]]:
    """Collects the process CPU time of every call of Avalanche's
    ``BaseSGDTemplate.train`` made inside the block."""
    from avalanche.training.templates.base_sgd import BaseSGDTemplate

    spent: list[float] = []
    original = BaseSGDTemplate.train

    def timed(self, *args, **kwargs):
        t0 = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent.append(time.process_time() - t0)

    BaseSGDTemplate.train = timed
    try:
        yield spent
    finally:
        BaseSGDTemplate.train = original


# ------------------------------------------------------------------ comparison
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def max_difference(a, b) -> float:
    """Largest absolute difference between two accuracy matrices (inf if their shapes differ)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if len(a) != len(b) or any(len(ra) != len(rb) for ra, rb in zip(a, b)):
        return float("inf")
    return max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)


def compare(cfg, repeats: int, dtype: torch.dtype = torch.float32, tolerance: float = 1e-9) -> dict[str, Any]:
    """Run both sides ``repeats`` times, alternating which goes first; return
    their timings, medians and ratios. Raises ``AssertionError`` when their
    accuracy matrices differ by more than ``tolerance``."""
    sides = {"runner": runner_run, "plain": plain_run}
    results: dict[str, list] = {"runner": [], "plain": []}
    with default_dtype(dtype):
        for r in range(repeats):
            for name in (("runner", "plain") if r % 2 == 0 else ("plain", "runner")):
                results[name].append(sides[name](cfg))
    runner, plain = results["runner"][0], results["plain"][0]
    diff = max(max_difference(runner["accuracy_matrix"], plain["accuracy_matrix"]),
               max_difference(runner["task_il"], plain["task_il"]))
    if diff > tolerance:
        raise AssertionError(f"{cfg.benchmark}/{cfg.optimizer}: the runner's and the plain loop's accuracy "
                             f"matrices differ by {diff:.3g}:\nrunner {runner['accuracy_matrix']}\n"
                             f"plain  {plain['accuracy_matrix']}")
    out: dict[str, Any] = {"benchmark": cfg.benchmark, "optimizer": cfg.optimizer, "preset": cfg.preset,
                           "dtype": str(dtype).replace("torch.", ""), "accuracy_difference": diff,
                           "accuracy_matrix": runner["accuracy_matrix"]}
    for key in ("train_seconds", "wall_seconds", "train_cpu_seconds", "cpu_seconds"):
        for name in sides:
            out[f"{name}_{key}"] = [r[key] for r in results[name]]
        out[f"ratio_{key}"] = (statistics.median(out[f"runner_{key}"])
                               / statistics.median(out[f"plain_{key}"]))
    return out


def import_seconds(codes: dict[str, str], repeats: int) -> dict[str, float]:
    """Median wall time of a fresh interpreter that runs each of ``codes``
    (from the repository root, with the environment of this process), the
    interpreters taking turns."""
    root = Path(__file__).resolve().parent.parent
    times: dict[str, list[float]] = {name: [] for name in codes}
    for _ in range(repeats):
        for name, code in codes.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    ap.add_argument("--optimizer", nargs="+", default=["adam", "adam_cm"], help="default: adam adam_cm")
    ap.add_argument("--preset", default="cpu", help="protocol preset (default cpu)")
    ap.add_argument("--data-root", default="data", help="folder holding MNIST and CIFAR-10 (default data)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side per case (default 3)")
    ap.add_argument("--float64", action="store_true", help="run both sides in float64 (agreement check)")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="run each case once on the smoke preset, untimed, first (default: on)")
    ap.add_argument("--imports", action=argparse.BooleanOptionalAction, default=True,
                    help="also time each side's imports in fresh interpreters (default: on)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    from .config import ConfigError
    from .data import DataNotFoundError

    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.float64 else torch.float32
    try:  # settings and data checked before anything runs
        configs = [make_config(b, o, args.preset, args.data_root, args.threads)
                   for b in args.benchmark for o in args.optimizer]
        for cfg in configs[::len(args.optimizer)]:
            plain_data(cfg)
    except (ConfigError, DataNotFoundError) as e:
        ap.error(" ".join(str(e).split()))
    print(f"torch {torch.__version__}; {torch.get_num_threads()} CPU thread(s); {platform.processor() or platform.machine()}; "
          f"preset {args.preset}; {args.repeats} repeat(s); {str(dtype).replace('torch.', '')}")
    cases = []
    for cfg in configs:
        benchmark, optimizer = cfg.benchmark, cfg.optimizer
        if args.warmup:  # untimed: lazy imports, first calls of the kernels
            smoke = make_config(benchmark, optimizer, "smoke", args.data_root, args.threads)
            with default_dtype(dtype):
                runner_run(smoke)
                plain_run(smoke)
        case = compare(cfg, args.repeats, dtype)
        cases.append(case)
        print(f"{benchmark} {optimizer}: accuracy matrices differ by {case['accuracy_difference']:.1g}")
        for label, key in (("training", "train_seconds"), ("wall", "wall_seconds"),
                           ("training CPU", "train_cpu_seconds"), ("wall CPU", "cpu_seconds")):
            print(f"  {label:13s} runner {statistics.median(case['runner_' + key]):7.2f} s   plain "
                  f"{statistics.median(case['plain_' + key]):7.2f} s   ratio {case['ratio_' + key]:.2f}", flush=True)
    result: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "cases": cases}
    if args.imports:
        result["import_seconds"] = import_seconds(IMPORTS, args.repeats)
        imp = result["import_seconds"]
        print(f"imports (fresh interpreter, median of {args.repeats}): runner {imp['runner']:.2f} s, "
              f"plain {imp['plain']:.2f} s")
        for case in cases:
            case["ratio_wall_with_imports"] = (
                (statistics.median(case["runner_wall_seconds"]) + imp["runner"])
                / (statistics.median(case["plain_wall_seconds"]) + imp["plain"]))
            print(f"{case['benchmark']:15s} {case['optimizer']:8s} wall with imports: ratio "
                  f"{case['ratio_wall_with_imports']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
