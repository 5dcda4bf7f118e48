"""A grid of runs from one config file, resumable.

The file (TOML or JSON) has up to three tables::

    [sweep]                 # optional: defaults for the command line
    out = "runs/readme"     # results folder of the sweep
    jobs = 1                # parallel processes

    [base]                  # RunConfig fields shared by every cell
    benchmark = "permuted_mnist"
    preset = "cpu"

    [grid]                  # RunConfig fields, each a list; the sweep is their product
    optimizer = ["adam", "adam_cm"]
    strategy = ["naive"]
    boundary = ["keep", "decay:0.5"]   # policy[:factor[:min_size]]
    seed = [0, 1, 2]

``[[grid]]`` (an array of tables) gives several grids whose cells are
pooled. Boundary policies only multiply optimizers that have a buffer;
duplicate cells are dropped. Every cell runs in ``<out>/<benchmark>-<preset>/<strategy>/<policy>/seed<S>``;
finished cells are skipped and unfinished ones resume from their last
completed experience, so a killed sweep is finished by running it again.
The cells run on this machine (``--jobs`` processes) or, with ``--executor
ray``, as tasks on a Ray cluster (:mod:`experiments.executors`), with the same
folders, locks and resumption; a cell that raised is reported with its
message and never retried.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
import traceback
from pathlib import Path
from typing import Any

from . import config as C
from .executors import LocalExecutor, error_line, run_ranks
from .io import RunLocked, write_text
from .launch import rank_and_world


def parse_policy(text: str) -> dict[str, Any]:
    """``"decay:0.5"`` -> boundary decay with factor 0.5; ``"shrink:0.5:1"`` adds min_size 1."""
    parts = str(text).split(":")
    if len(parts) > 3 or not parts[0]:
        raise C.ConfigError(f"cannot read boundary policy {text!r}; write policy[:factor[:min_size]], e.g. decay:0.5")
    try:
        out: dict[str, Any] = {"boundary": parts[0]}
        if len(parts) > 1:
            out["factor"] = float(parts[1])
        if len(parts) > 2:
            out["min_size"] = int(parts[2])
    except ValueError:
        raise C.ConfigError(f"cannot read boundary policy {text!r}; write policy[:factor[:min_size]]") from None
    return out


def cell_folder(out: str | Path, cfg: C.RunConfig, varied: list[str]) -> Path:
    """Folder of one cell; grid keys other than the usual ones are named in it.
    Every part is made a safe file name (no path separators, no ``..``)."""
    from .tuning import slug

    usual = {"optimizer", "strategy", "boundary", "seed", "benchmark", "preset", "factor", "min_size", "scenario",
             "reset_moments", "kappa_schedule"}
    extra = "".join(f"-{k}{getattr(cfg, k)}" for k in varied if k not in usual)
    return (Path(out) / slug(f"{C.bench_label(cfg)}-{cfg.preset}") / slug(cfg.strategy) /
            slug(C.policy_label(cfg).replace("/", "-") + extra) / f"seed{int(cfg.seed)}")


def expand(spec: dict[str, Any], out: str | Path, overrides: dict[str, Any] | None = None) -> list[C.RunConfig]:
    """The resolved RunConfigs of a sweep spec, without duplicates."""
    C.check_keys(spec, "the sweep file", allowed=("sweep", "base", "grid"))
    if not isinstance(spec.get("sweep", {}), dict):
        raise C.ConfigError(f"[sweep] must be a table (out, jobs), got {spec['sweep']!r}")
    C.check_keys(spec.get("sweep", {}), "[sweep]", allowed=("out", "jobs"))
    cells, seen = [], set()
    for grid_cells, grid in expand_grids(spec, overrides):
        for cell in grid_cells:
            cell = dataclasses.replace(cell, out=str(cell_folder(out, cell, list(grid))))
            if cell.out not in seen:
                seen.add(cell.out)
                cells.append(cell)
    return cells


def expand_grids(spec: dict[str, Any], overrides: dict[str, Any] | None = None, with_space: bool = False):
    """For each ``[grid]`` table (or each of ``[[grid]]``): its resolved cells
    and the table. ``with_space`` lets a table carry a ``space`` sub-table (tune files)."""
    if not isinstance(spec.get("base", {}), dict):
        raise C.ConfigError(f"[base] must be a table of settings, got {spec['base']!r}")
    base = C.from_mapping({**spec.get("base", {}), **(overrides or {})}, "[base]")
    grids = spec.get("grid", {})
    for grid in (grids if isinstance(grids, list) else [grids]):
        if not isinstance(grid, dict):
            raise C.ConfigError(f"[grid] must be a table of lists, got {grid!r}")
        cells = dict(grid)
        if with_space:
            cells.pop("space", None)
        yield _expand_grid(base, cells), grid


def _expand_grid(base: C.RunConfig, grid: dict[str, Any]) -> list[C.RunConfig]:
    C.check_keys(grid, "[grid]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise C.ConfigError(f"[grid] {key} must be a non-empty list, got {values!r}")
    policies = [parse_policy(p) for p in grid.pop("boundary", [base.boundary])]
    keys = list(grid)
    cells = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        cfg = dataclasses.replace(base, **dict(zip(keys, combo)))
        for policy in (policies if cfg.optimizer in C.BUFFERED else [{}]):
            cells.append(C.resolve(dataclasses.replace(cfg, **policy)))
    return cells


def _run_cell(cfg_dict: dict[str, Any], threads: int | None, ranks: int = 1) -> tuple[str, str]:
    """Run one cell (in this process or a worker; ``ranks`` > 1: as a torchrun
    of that many processes); returns (folder, status)."""
    from .runner import run

    cfg = C.RunConfig(**cfg_dict)
    if threads:
        cfg = dataclasses.replace(cfg, threads=cfg.threads or threads)
    already = (Path(cfg.out) / "metrics.json").exists()
    try:
        if ranks > 1:
            run_ranks(cfg, ranks)
        else:
            run(dataclasses.replace(cfg, progress=False), quiet=True)
    except RunLocked:
        return cfg.out, "running elsewhere"
    except Exception:  # noqa: BLE001 - one broken cell must not stop the sweep ...
        if rank_and_world()[1] > 1:
            raise  # ... except under torchrun, where the ranks would wait for each other forever
        write_text(Path(cfg.out) / "error.txt", traceback.format_exc())  # atomic: never through a planted link
        return cfg.out, f"{FAILED_IN_RUN}: {error_line(sys.exc_info()[1])} (see error.txt)"
    return cfg.out, "done before" if already else "done"


#: the two kinds of failure a sweep reports: the run raised (never retried), or its worker or node was lost
FAILED_IN_RUN, FAILED_ON_NODE = "failed in the run", "failed on the node"


def run_sweep(spec: dict[str, Any], out: str | Path, jobs: int = 1, overrides: dict[str, Any] | None = None,
              progress: bool = True, executor=None) -> dict[str, str]:
    """Run every cell on ``executor`` (default: this machine, ``jobs``
    processes); returns {folder: status}."""
    from tqdm.auto import tqdm

    cells = expand(spec, out, overrides)
    names = [str(Path(cell.out).relative_to(out)) for cell in cells]
    executor = executor or LocalExecutor(jobs)
    slot = executor.slot(cells)
    cells = [executor.place(cell, slot) for cell in cells]
    statuses: dict[str, str] = {}
    bar = tqdm(total=len(cells), desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    for outcome in executor.map(_run_cell, [(cell.to_dict(), slot.threads, slot.ranks) for cell in cells], slot):
        cell = cells[outcome.index]
        if outcome.error is None:
            folder, status = outcome.value
        else:  # the call never returned: its worker or node was lost (Ray retried it once), or it could not start
            folder = cell.out
            status = f"{FAILED_ON_NODE if outcome.lost else FAILED_IN_RUN}: {outcome.message}"
            with contextlib.suppress(OSError):
                Path(folder).mkdir(parents=True, exist_ok=True)
                write_text(Path(folder) / "error.txt", f"{status}\nRun the sweep again to resume this run.\n")
        statuses[folder] = status
        bar.set_postfix_str(names[outcome.index])
        bar.update(1)
    bar.close()
    return statuses
