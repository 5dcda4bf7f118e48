"""The ``cl-cm`` command line.

    cl-cm run --benchmark permuted_mnist --strategy naive --optimizer adam_cm --boundary decay --factor 0.5 \\
              --seed 0 --preset cpu --data-root data --out runs/one
    cl-cm run --config my_run.toml [--seed 1 ...]     # a config file stands in for the flags
    cl-cm sweep experiments/configs/readme_comparison.toml [--out runs/readme] [--jobs 2]
    cl-cm report runs/readme

``cl-cm run --help`` lists every setting with its default.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import config as C


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cl-cm", description="Adam+CM continual-learning experiments.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="one continual-learning run", description=C.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", help="TOML or JSON file of settings; flags given as well override it")
    C.add_arguments(run)

    sweep = sub.add_parser("sweep", help="a grid of runs from a config file (resumable)",
                           description=__import__("experiments.sweep", fromlist=["x"]).__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("file", help="sweep file (TOML or JSON)")
    sweep.add_argument("--out", help="results folder (default: the file's [sweep] out, else runs/<file name>)")
    sweep.add_argument("--jobs", type=int, help="parallel processes (default: the file's [sweep] jobs, else 1)")
    sweep.add_argument("--data-root", help="overrides [base] data_root")
    sweep.add_argument("--device", help="overrides [base] device")
    sweep.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    sweep.add_argument("--report", action="store_true", help="write the report when the sweep is done")

    report = sub.add_parser("report", help="the forgetting analysis of every run under a folder")
    report.add_argument("folder")
    report.add_argument("--out", help="report folder (default: FOLDER/report)")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .data import DataNotFoundError
    from .io import RunLocked

    try:
        if args.command == "run":
            from .runner import run

            run(C.from_args(args))
        elif args.command == "sweep":
            return _sweep(args)
        elif args.command == "report":
            from .report import render

            if not Path(args.folder).is_dir():
                raise C.ConfigError(f"{args.folder} is not a folder")
            print(f"report: {render(args.folder, args.out)}")
    except (C.ConfigError, DataNotFoundError, RunLocked) as e:
        print(f"cl-cm: error: {e}", file=sys.stderr)
        return 2
    return 0


def _sweep(args) -> int:
    from .sweep import expand, run_sweep

    spec = C.load_file(args.file)
    settings = spec.get("sweep", {})
    out = args.out or settings.get("out") or f"runs/{Path(args.file).stem}"
    jobs = args.jobs or settings.get("jobs", 1)
    overrides = {k: v for k, v in (("data_root", args.data_root), ("device", args.device)) if v}
    if args.dry_run:
        for cell in expand(spec, out, overrides):
            print(cell.out)
        return 0
    statuses = run_sweep(spec, out, jobs, overrides)
    failed = {k: v for k, v in statuses.items() if v.startswith("failed")}
    print(f"sweep: {len(statuses)} runs in {out}: " + ", ".join(
        f"{sum(v == s for v in statuses.values())} {s}" for s in sorted(set(statuses.values()))))
    for folder, status in failed.items():
        print(f"  {folder}: {status}", file=sys.stderr)
    if args.report:
        from .report import render

        print(f"report: {render(out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
