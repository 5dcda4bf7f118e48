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
message and never retried. Missing data or a setting refused at run time
stops the sweep: every cell would fail the same way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

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


def _run_cell(cfg_dict: dict[str, Any], threads: int | None, ranks: int = 1,
              report: Callable[[int, int], None] | None = None) -> tuple[str, str, str | None]:
    """Run one cell (in this process or a worker; ``ranks`` > 1: as a torchrun
    of that many processes); returns (folder, status, shared): ``shared`` is
    the error in one line when the cell failed in a way every cell would
    share (missing data, a bad setting), else None. ``report(done, total)``
    is called after each experience (not for a torchrun). A run that succeeds
    removes the ``error.txt`` of an earlier failure (:func:`~experiments.results.managed_run`)."""
    from .data import DataNotFoundError
    from .runner import run

    cfg = C.RunConfig(**cfg_dict)
    if threads:
        cfg = dataclasses.replace(cfg, threads=cfg.threads or threads)
    already = (Path(cfg.out) / "metrics.json").exists()
    try:
        if ranks > 1:
            run_ranks(cfg, ranks)
        else:
            run(dataclasses.replace(cfg, progress=False), quiet=True, on_experience=report)
    except RunLocked:
        return cfg.out, "running elsewhere", None
    except Exception as e:  # noqa: BLE001 - one broken cell must not stop the sweep ...
        if rank_and_world()[1] > 1:
            raise  # ... except under torchrun, where the ranks would wait for each other forever
        write_text(Path(cfg.out) / "error.txt", traceback.format_exc())  # atomic: never through a planted link
        shared = isinstance(e, (C.ConfigError, DataNotFoundError))  # ... nor one that every cell would share
        return (cfg.out, f"{FAILED_IN_RUN}: {error_line(e)} (see error.txt)",
                f"{type(e).__name__}: {' '.join(str(e).split())}" if shared else None)
    return cfg.out, "done before" if already else "done", None


#: the two kinds of failure a sweep reports: the run raised (never retried), or its worker or node was lost
FAILED_IN_RUN, FAILED_ON_NODE = "failed in the run", "failed on the node"
#: the status of a cell never started, the sweep having stopped on a failure every cell would share
NOT_STARTED = "not started"
#: how the sweep says it stopped
STOPPED = "stopped: every run would fail the same way"


def run_sweep(spec: dict[str, Any], out: str | Path, jobs: int = 1, overrides: dict[str, Any] | None = None,
              progress: bool = True, executor=None,
              on_experience: Callable[[str, int, int], None] | None = None) -> dict[str, str]:
    """Run every cell on ``executor`` (default: this machine, ``jobs``
    processes); returns {folder: status}.

    The bar counts experiences (every cell's, finished before or not) and
    moves as each is checkpointed (on Ray: as each run ends);
    ``on_experience(folder, done, total)`` is called then too. A failure is
    printed on stderr when it happens, with its folder; one that every cell
    would share (missing data, a bad setting) stops the sweep: no further
    cell starts, and those never started have the status ``not started``."""
    from tqdm.auto import tqdm

    from .data import stream_length

    cells = expand(spec, out, overrides)
    names = [str(Path(cell.out).relative_to(out)) for cell in cells]
    executor = executor or LocalExecutor(jobs)
    slot = executor.slot(cells)
    cells = [executor.place(cell, slot) for cell in cells]
    lengths = [stream_length(cell) for cell in cells]
    counted = [0] * len(cells)  # experiences of each cell counted on the bar
    statuses: dict[str, str] = {}
    stopped: list[str] = []  # the shared failure's message, once one happened
    printed: set[str] = set()
    speak = rank_and_world()[0] == 0
    bar = tqdm(total=sum(lengths), desc="sweep", unit="exp", disable=not progress, dynamic_ncols=True)

    def advance(index: int, done: int) -> None:
        step = min(done, lengths[index]) - counted[index]
        if step > 0:
            counted[index] += step
            bar.update(step)

    def report(index: int, done: int, total: int) -> None:
        advance(index, done)
        bar.set_postfix_str(names[index])
        if on_experience:
            on_experience(cells[index].out, done, total)

    def say(line: str) -> None:
        if speak:
            tqdm.write(line, file=sys.stderr)

    calls = [(cell.to_dict(), slot.threads, slot.ranks) for cell in cells]
    for outcome in executor.map(_run_cell, calls, slot, stop=lambda: bool(stopped), report=report):
        cell = cells[outcome.index]
        shared = None
        if outcome.error is None:
            folder, status, shared = outcome.value
        else:  # the call never returned: its worker or node was lost (Ray retried it once), or it could not start
            folder = cell.out
            status = f"{FAILED_ON_NODE if outcome.lost else FAILED_IN_RUN}: {outcome.message}"
            with contextlib.suppress(OSError):
                Path(folder).mkdir(parents=True, exist_ok=True)
                write_text(Path(folder) / "error.txt", f"{status}\nRun the sweep again to resume this run.\n")
        statuses[folder] = status
        if shared and not stopped:
            stopped.append(shared)
            say(f"sweep: {STOPPED}: {shared} (in {folder}/error.txt)")
        elif status.startswith("failed") and status not in printed:  # each distinct failure once, as it happens
            say(f"sweep: {names[outcome.index]} {status.replace('see error.txt', f'in {folder}/error.txt')}")
        printed.add(status)
        advance(outcome.index, lengths[outcome.index])
        bar.set_postfix_str(names[outcome.index])
    bar.close()
    for cell in cells:
        statuses.setdefault(cell.out, NOT_STARTED)
    return statuses
