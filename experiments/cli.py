"""The ``cl-cm`` command line.

    cl-cm run --benchmark permuted_mnist --strategy naive --optimizer adam_cm --boundary decay --factor 0.5 \\
              --seed 0 --preset cpu --data-root data --out runs/one
    cl-cm run --config my_run.toml [--seed 1 ...]     # a config file stands in for the flags
    cl-cm sweep experiments/configs/readme_comparison.toml [--out runs/readme] [--jobs 2]
    cl-cm sweep experiments/configs/readme_comparison.toml --executor ray [--address HOST:6379]   # on a Ray cluster
    cl-cm report runs/readme
    torchrun --nproc_per_node 2 -m experiments.cli run|sweep|supervised ...   # data split across ranks

cl-cm run --help lists every setting with its default.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from . import config as C


class UsageError(Exception):
    """A command line that argparse cannot read (reported in one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block): the flag and what it takes."""

    def error(self, message: str):
        raise UsageError(f"{message} ({self.prog} --help lists the settings)")


RUN_HELP = """\
Train one continual-learning run: the experiences of a benchmark one after another, with an Avalanche strategy
and an optimizer. The folder --out receives config.json (every setting), a checkpoint after each experience (a
killed run resumes where it stopped) and, at the end, metrics.json (the accuracy matrix, ACC, BWT, forgetting,
timings, buffer statistics). Settings come from the flags, a --config file, or both (flags win). Protocol
settings left unset take the values of --preset; optimizer and strategy settings left unset take their own
defaults."""

SWEEP_HELP = """\
Run every cell of a grid from a TOML or JSON file, one folder per cell; finished cells are skipped and
unfinished ones resume, so running a sweep again finishes it. The file has up to three tables:

  [sweep]                  command-line defaults: out = "runs/readme", jobs = 1
  [base]                   settings shared by every cell (any cl-cm run setting)
  [grid]                   settings given as lists; the sweep runs their product
                           (boundary = ["keep", "decay:0.5"]: policy[:factor[:min_size]])

Several [[grid]] tables pool their cells. Boundary policies only multiply optimizers with a buffer."""

TUNE_HELP = """\
Choose each arm's hyperparameters on validation data (never the test data), with Optuna; resumable. The file
has [tune] (trials, jobs, out), [base] (shared settings), [grid] (the arms) and [space] (the hyperparameters
searched and their values). The result, tuned.toml, gives each arm's chosen settings to cl-cm run --tuned and
cl-cm sweep --tuned."""

STUDY_HELP = """\
For every study file (or every one in a folder): tune each arm on validation data, then run it with the chosen
settings on the test data over the study's seeds, and write a report. Resumable: run it again to finish it."""

SUPERVISED_HELP = """\
Train one model with one optimizer on CIFAR-10, CIFAR-100 (test accuracy, and the top Hessian eigenvalue at the
end) or Penn Treebank (validation and test perplexity): the paper's supervised benchmarks. --optimizers and
--seeds run several, one folder each under --out; a checkpoint after every epoch lets a killed run resume.
Protocol settings left unset take the values of --preset."""

TOY_HELP = """\
Compare optimizers on 2-D landscapes (goldstein_price, ackley, sharp_wide): from random starts, how far each
travels, where it ends, and how often it escapes to the basin of a lower minimum. One run per landscape,
sharpness and seed, each in its own folder under --out with a plot of trajectories."""

REPORT_HELP = """\
Write the report (tables and figures) of every finished run under a folder."""


NEW_JOURNAL_HELP = ("where a folder was tuned over other arms or grids (an extended grid), set its journal aside "
                    "(OUT/earlier/N) and tune the new ones, reusing finished trials at the same values")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="cl-cm", description="Adam+CM continual-learning experiments.",
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="one continual-learning run", description=RUN_HELP)
    run.add_argument("--config", help="TOML or JSON file of settings; flags given as well override it")
    C.add_arguments(run)

    sweep = sub.add_parser("sweep", help="a grid of runs from a config file (resumable)", description=SWEEP_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("file", help="sweep file (TOML or JSON)")
    sweep.add_argument("--out", help="results folder (default: the file's [sweep] out, else runs/<file name>)")
    sweep.add_argument("--jobs", type=int, help="parallel processes; with --executor ray, at most this many runs at "
                                                "once (default: the file's [sweep] jobs, else 1; with --executor ray, "
                                                "as many as the cluster holds)")
    sweep.add_argument("--data-root", help="overrides [base] data_root")
    sweep.add_argument("--device", help="overrides [base] device")
    sweep.add_argument("--tuned", help="tuned.toml of cl-cm tune: each cell runs with its arm's chosen settings "
                                       "(overrides [base] tuned)")
    sweep.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    sweep.add_argument("--report", action="store_true", help="write the report when the sweep is done")
    _executor_arguments(sweep)

    tune = sub.add_parser("tune", help="choose each arm's hyperparameters on validation data (Optuna; resumable)",
                          description=TUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    tune.add_argument("file", help="tune file (TOML or JSON): [tune], [base], [grid] and [space]")
    tune.add_argument("--out", help="results folder (default: the file's [tune] out, else runs/<file name>)")
    tune.add_argument("--trials", type=int, help="trials per arm (default: [tune] trials, else each arm's whole grid)")
    tune.add_argument("--jobs", type=int, help="parallel worker processes; with --executor ray, worker tasks "
                                               "(default: [tune] jobs, else 1; with --executor ray, as many runs as "
                                               "the cluster holds at once)")
    tune.add_argument("--storage", help="Optuna storage URL shared by workers, e.g. sqlite:///tune.db or "
                                        "postgresql://... (default: the journal file OUT/optuna.journal)")
    tune.add_argument("--data-root", help="overrides [base] data_root")
    tune.add_argument("--device", help="overrides [base] device")
    tune.add_argument("--new-journal", action="store_true", help=NEW_JOURNAL_HELP)
    _executor_arguments(tune)

    study = sub.add_parser("study", help="tune every arm on validation data, then run it on the test data, for a "
                                         "folder of study files (resumable)",
                           description=STUDY_HELP)
    study.add_argument("target", nargs="?", default="experiments/studies",
                       help="a study file or a folder of them (default: experiments/studies)")
    study.add_argument("--out", default="runs/study", help="results folder (default: runs/study)")
    study.add_argument("--jobs", type=int, help="parallel processes (default: 1; on Ray: as many runs as the "
                                                "cluster holds at once)")
    study.add_argument("--quick", action="store_true", help="only the arms each study lists as quick")
    study.add_argument("--data-root", help="overrides [base] data_root")
    study.add_argument("--device", help="overrides [base] device")
    looks = study.add_mutually_exclusive_group()
    looks.add_argument("--dry-run", action="store_true", help="list the studies and their arms, and exit")
    looks.add_argument("--timings", action="store_true", help="print what each study file took under --out (runs, "
                       "wall and training minutes), and exit")
    study.add_argument("--new-journal", action="store_true", help=NEW_JOURNAL_HELP)
    study.add_argument("--tune-seeds", type=int, nargs="+", metavar="SEED",
                       help="tune every arm over these seeds (a trial's score: their mean validation ACC) in place of "
                            "each file's [tune] seeds; over a study tuned before, with --new-journal")
    _executor_arguments(study)

    sup = sub.add_parser("supervised", help="CIFAR-10/100 or Penn Treebank training, the paper's benchmarks",
                         description=SUPERVISED_HELP)
    sup.add_argument("--config", help="TOML or JSON file of settings; flags given as well override it")
    sup.add_argument("--optimizers", nargs="+", help="run every one of these (default: --optimizer)")
    sup.add_argument("--seeds", nargs="+", type=int, help="run every one of these seeds (default: --seed)")
    sup.add_argument("--report", action="store_true", help="write the report of --out at the end")
    C.add_arguments(sup, C.SupervisedConfig)

    toy = sub.add_parser("toy", help="optimizers on 2-D landscapes: exploration and escape", description=TOY_HELP)
    C.toy_arguments(toy)
    toy.add_argument("--out", default="runs/toy", help="results folder (default: runs/toy)")
    toy.add_argument("--report", action="store_true", help="write the report of --out at the end")

    report = sub.add_parser("report", help="the report of every run under a folder", description=REPORT_HELP)
    report.add_argument("folder")
    report.add_argument("--out", help="report folder (default: FOLDER/report)")
    report.add_argument("--reference", default="adam",
                        help="label of the arm the others are compared with (default: adam)")
    return ap


def _executor_arguments(parser: argparse.ArgumentParser) -> None:
    """--executor and the Ray options (docs/distributed.md)."""
    group = parser.add_argument_group("where the runs execute (docs/distributed.md)")
    group.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="local: processes on this machine (--jobs); ray: one Ray task per run on a Ray cluster, "
                            "the results folder on storage every node sees (default: local)")
    group.add_argument("--address", help="Ray cluster to join, e.g. 10.0.0.1:6379 or auto (default: $RAY_ADDRESS, "
                                         "else a local Ray instance sized to this machine)")
    group.add_argument("--cpus-per-run", type=float, help="CPUs Ray reserves for each run, also its torch threads "
                                                          "(default: the runs' threads, else 1)")
    group.add_argument("--gpus-per-run", type=float, help="GPUs Ray reserves for each run; a fraction shares a GPU "
                                                          "(default: 1 for runs on a GPU: --device cuda, or no device "
                                                          "on a cluster with GPUs; else 0)")


def _executor(args):
    """The executor the flags ask for (None: this machine's processes)."""
    from .executors import make_executor

    return make_executor(args.executor, args.jobs, args.address, args.cpus_per_run, args.gpus_per_run)


def main(argv=None) -> int:
    """``cl-cm``: exit code 0 on success, 2 for settings, data or a results
    folder that cannot be used (one line on stderr saying what to change), 1
    for runs that failed (a non-finite loss, failed sweep cells)."""
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        print(f"cl-cm: error: {e}", file=sys.stderr)
        return 2
    from strategies.errors import NonFiniteLossError

    from .checkpoint import CheckpointRefused
    from .data import DataNotFoundError
    from .io import RunLocked
    from .launch import process_group_from_env

    try:
        if args.command in ("run", "sweep", "supervised"):
            if args.command != "supervised":
                # Importing Avalanche's strategies creates a logger (Avalanche's AETraining evaluator), which
                # Avalanche refuses on ranks other than 0 once a process group exists: import them first.
                import strategies.factory  # noqa: F401
            with process_group_from_env():  # under torchrun: data split across ranks, rank 0 writes
                if args.command == "run":
                    from .runner import run

                    run(C.from_args(args))
                    return 0
                return _sweep(args) if args.command == "sweep" else _supervised(args)
        elif args.command == "study":
            from .study import describe, run_study, timings

            _check_count("--jobs", args.jobs)
            overrides = _overrides(args)
            if args.dry_run:
                print("\n".join(describe(args.target, overrides, args.quick, args.out, args.tune_seeds)))
                return 0
            if args.timings:
                print("\n".join(timings(args.target, args.out, args.quick)))
                return 0
            executor = _executor(args)
            with executor or contextlib.nullcontext():
                summary = run_study(args.target, args.out, args.jobs if executor else args.jobs or 1, args.quick,
                                    overrides, executor=executor, new_journal=args.new_journal,
                                    tune_seeds=args.tune_seeds)
            print(f"study: {sum(s['runs'] for s in summary['studies'])} reported runs, "
                  f"{summary['runs_failed']} failed, {summary['seconds'] / 60:.1f} min")
            return 1 if summary["runs_failed"] else 0
        elif args.command == "tune":
            from .tuning import tune

            overrides = _overrides(args)
            if args.executor != "local":
                from .tuning import load_spec

                load_spec(args.file, overrides, trials=args.trials, out=args.out, jobs=args.jobs)  # before Ray starts
            executor = _executor(args)
            with executor or contextlib.nullcontext():
                tune(args.file, out=args.out, trials=args.trials, jobs=args.jobs, storage=args.storage,
                     overrides=overrides, executor=executor, new_journal=args.new_journal)
        elif args.command == "toy":
            return _toy(args)
        elif args.command == "report":
            from .report import render

            if C.path_kind(args.folder, "the report folder") != "folder":
                raise C.ConfigError(f"{args.folder} is not a folder")
            _check_out(args.out or Path(args.folder) / "report")
            print(f"report: {render(args.folder, args.out, reference=args.reference)}")
    except (C.ConfigError, DataNotFoundError, RunLocked, CheckpointRefused) as e:
        print(f"cl-cm: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"cl-cm: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _check_count(flag: str, value, least: int = 1) -> None:
    if value is not None and value < least:
        raise C.ConfigError(f"{flag} must be an integer >= {least}, got {value}")


def _check_out(path, what: str = "--out") -> None:
    from .io import check_out

    check_out(path, what)


def _overrides(args) -> dict:
    """--data-root, --device (and --tuned) given on the command line, checked as the settings they override."""
    names = ("data_root", "device", "tuned")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k, None)}
    if "device" in overrides:
        C.check_device(overrides["device"])
    if "data_root" in overrides:
        C.check_data_root(overrides["data_root"])
    return overrides


def _sweep(args) -> int:
    from .sweep import expand, run_sweep

    spec = C.load_file(args.file)
    settings = spec.get("sweep", {})
    if not isinstance(settings, dict):
        raise C.ConfigError(f"[sweep] of {args.file} must be a table (out, jobs), got {settings!r}")
    C.check_keys(settings, "[sweep]", allowed=("out", "jobs"))
    out = args.out if args.out is not None else settings.get("out", f"runs/{Path(args.file).stem}")
    jobs = args.jobs if args.jobs is not None else settings.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise C.ConfigError(f"jobs (--jobs or [sweep] jobs) must be an integer >= 1, got {jobs!r}")
    if not isinstance(out, str):
        raise C.ConfigError(f"[sweep] out must be a folder name, got {out!r}")
    overrides = _overrides(args)
    if args.dry_run:
        for cell in expand(spec, out, overrides):
            print(cell.out)
        return 0
    from .launch import rank_and_world

    rank, world = rank_and_world()
    if world > 1 and (jobs > 1 or args.executor != "local"):
        raise C.ConfigError(f"under torchrun a sweep runs its cells one after another on all {world} ranks; "
                            "set --jobs 1 (or jobs = 1 in [sweep]) and --executor local")
    _check_out(out)
    if args.executor != "local":
        expand(spec, out, overrides)  # bad input fails here, before Ray starts
    executor = _executor(args)
    with executor or contextlib.nullcontext():
        statuses = run_sweep(spec, out, jobs, overrides, progress=rank == 0, executor=executor)
    if rank != 0:
        return 0
    kinds = [v.split(":")[0] for v in statuses.values()]  # done, done before, running elsewhere, failed in the run...
    print(f"sweep: {len(statuses)} runs in {out}: " + ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds))))
    failed = sorted((v, k) for k, v in statuses.items() if v.startswith("failed"))
    for i, (status, folder) in enumerate(failed):  # the runs that raised, then those lost with their worker or node
        same = i and failed[i - 1][0] == status
        print(f"  {folder}: {'the same failure' if same else status}", file=sys.stderr)
    if args.report:
        from .report import render

        print(f"report: {render(out)}")
    from .sweep import NOT_STARTED

    return 2 if NOT_STARTED in statuses.values() else 1 if failed else 0  # 2: stopped for data or settings


def _supervised(args) -> int:
    from . import supervised as S

    base = C.from_args(args, S.SupervisedConfig)
    out = args.out if "out" in vars(args) else f"runs/supervised-{base.task}"
    cells = S.grid(base, args.optimizers or [base.optimizer], args.seeds or [base.seed], out)
    _check_out(out)
    from .launch import rank_and_world

    for cell in cells:
        S.run(cell)
    if args.report and rank_and_world()[0] == 0:
        from .report import render

        print(f"report: {render(out)}")
    return 0


def _toy(args) -> int:
    from .results import execute
    from .toy import ToyRun

    cfgs = C.toy_configs(args)
    _check_out(args.out)
    kind = ToyRun(args.out)
    for cfg in cfgs:
        execute(kind, cfg)
    if args.report:
        from .report import render

        print(f"report: {render(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
