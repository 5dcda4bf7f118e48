"""``cl-cm study``: tune every arm on validation data, then run it on the test
data with its chosen settings, for a folder of study files, resumable.

A study file is a tune file (see :mod:`experiments.tuning`: ``[tune]``,
``[base]``, ``[grid]``, ``[space]``) with a ``[study]`` table::

    [study]
    name = "permuted_mnist_online"     # its folder under --out
    seeds = [0, 1, 2, 3, 4]            # the reported seeds (paired across arms)
    quick = ["adam", "adam_cm/keep"]   # arms (run labels) of the --quick subset

    # optional: arms taken from another study of the folder, by validation score
    best_of = { study = "permuted_mnist_cpu", optimizer = ["adam_cm"], top = 3 }
    # optional in best_of: their search space here, e.g. space = { lr = [1e-4, 3e-4, 1e-3] }

An arm taken by ``best_of`` brings its optimizer, optimizer settings and
buffer policy, never its benchmark, protocol or strategy: it is tuned and
run on this file's ``[base]``, over the ``space`` of ``best_of`` if given,
else this file's search space for its optimizer, else the space it was tuned
over in the other study.

Files run in the order of their names. For each: ``cl-cm tune`` writes
``OUT/tuning/<name>/tuned.toml``; the reporting sweep (each arm × the reported
seeds, every run with its arm's chosen settings) writes
``OUT/results/<name>/``; ``cl-cm report OUT/results`` is the report.
``--quick`` runs only the arms listed in ``quick`` (with the very same tuning
grids and seeds, so their numbers are those of the full study). Running the
command again resumes: finished trials and runs are read, unfinished ones
resumed from their checkpoints.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any

from . import config as C


def study_files(target: str | Path) -> list[Path]:
    """The study files of a folder (sorted by name), or one file."""
    kind = C.path_kind(target, "the study target")
    target = Path(target)
    if kind == "folder":
        files = sorted(p for p in target.iterdir() if p.suffix in (".toml", ".json"))
        if not files:
            raise C.ConfigError(f"{target} holds no study files (*.toml)")
        return files
    if kind == "missing":
        raise C.ConfigError(f"{target} does not exist; give a study file or a folder of them")
    return [target]


def folder_name(value, where: str) -> str:
    """``value`` if it is a plain folder name (letters, digits and ``.+=-_``,
    no path separator, not ``.`` or ``..``); otherwise a ConfigError: names
    from files never become paths outside the results folder."""
    from .tuning import slug

    if not isinstance(value, str) or not value or slug(value) != value:
        raise C.ConfigError(f"{where} must be a plain folder name (letters, digits, . + = - _; no / or ..), "
                            f"got {value!r}")
    return value


def _settings(path: Path) -> dict[str, Any]:
    spec = C.load_file(path)
    study = spec.get("study", {})
    if not isinstance(study, dict):
        raise C.ConfigError(f"{path}: [study] must be a table (name, seeds, quick, best_of)")
    C.check_keys(study, f"[study] of {path}", allowed=("name", "seeds", "quick", "best_of"))
    if "name" not in study:
        raise C.ConfigError(f"{path}: [study] needs a name (its folder)")
    name = folder_name(study["name"], f"{path}: [study] name")
    seeds = C.check_seeds(study.get("seeds", [0, 1, 2, 3, 4]), f"{path}: [study] seeds")
    quick = study.get("quick")
    if quick is not None and (not isinstance(quick, list) or not all(isinstance(q, str) for q in quick)):
        raise C.ConfigError(f"{path}: [study] quick must be a list of arm labels, e.g. [\"adam\"], got {quick!r}")
    best = study.get("best_of")
    if best is not None:
        if not isinstance(best, dict):
            raise C.ConfigError(f"{path}: [study] best_of must be a table {{ study = ..., optimizer = [...], "
                                f"top = N }}, got {best!r}")
        C.check_keys(best, f"[study] best_of of {path}", allowed=BEST_OF_KEYS)
        if "space" in best and (not isinstance(best["space"], dict) or not best["space"]):
            raise C.ConfigError(f"{path}: [study] best_of space must be a table of search values, e.g. "
                                f"space = {{ lr = [1e-4, 3e-4, 1e-3] }}, got {best['space']!r}")
        folder_name(best.get("study"), f"{path}: [study] best_of study")
        top = best.get("top", 3)
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise C.ConfigError(f"{path}: [study] best_of top must be an integer >= 1, got {top!r}")
        optimizers = best.get("optimizer", list(C.BUFFERED))
        if not isinstance(optimizers, list) or not optimizers:
            raise C.ConfigError(f"{path}: [study] best_of optimizer must be a non-empty list, got {optimizers!r}")
        for name_ in optimizers:
            C.check_choice("optimizer in [study] best_of", name_, C.BUFFERED)
    return {"spec": spec, "name": name, "seeds": seeds, "quick": quick, "best_of": best, "path": path}


def _infos(target: str | Path, tune_seeds: list[int] | None = None) -> list[dict[str, Any]]:
    """The study files of ``target``, read; with ``tune_seeds`` (--tune-seeds)
    in place of each file's [tune] seeds."""
    infos = [_settings(p) for p in study_files(target)]
    if tune_seeds is None:
        return infos
    seeds = C.check_seeds(list(tune_seeds), "--tune-seeds")
    return [{**i, "spec": {**i["spec"], "tune": {**i["spec"].get("tune", {}), "seeds": seeds}}} for i in infos]


#: the keys of [study] best_of
BEST_OF_KEYS = ("study", "optimizer", "top", "space")


def arm_grid(cfg: C.RunConfig, base: dict[str, Any]) -> dict[str, list]:
    """A one-cell grid table for the arm ``cfg``: every arm setting that differs
    from ``base`` (the file's [base]), boundary policy written policy[:factor[:min_size]]."""
    from .tuning import NOT_ARM

    skip = {*NOT_ARM, *C.PROTOCOL_FIELDS, "boundary", "factor", "min_size"}
    plain = C.from_mapping(base, "[base]")
    grid = {f.name: [getattr(cfg, f.name)] for f in dataclasses.fields(cfg)
            if f.name not in skip and getattr(cfg, f.name) != getattr(plain, f.name)}
    if cfg.optimizer in C.BUFFERED:
        grid["boundary"] = [cfg.boundary + (f":{cfg.factor:g}" if cfg.factor is not None else "")
                            + (f":{cfg.min_size}" if cfg.min_size else "")]
    return grid


def best_of_space(best: dict[str, Any], arms, optimizer: str | None, recorded=None) -> dict[str, Any] | None:
    """The search space of an arm that ``best`` (best_of) takes: best_of's
    ``space``, else that of this file's arms of its ``optimizer``, else the
    one ``recorded`` in the other study's tuned.toml (None: not known)."""
    return best.get("space") or next((a.space for a in arms if a.cfg.optimizer == optimizer), recorded)


def _tune_spec(info: dict[str, Any], out: Path, quick: bool, overrides) -> dict[str, Any]:
    """The tune file of a study: its own arms, plus those chosen from another
    study by validation score (``best_of``), restricted to the quick arms with
    ``--quick``; one [[grid]] table per arm, each with its whole search space."""
    from .tuning import load_spec, load_tuned

    spec = {k: v for k, v in info["spec"].items() if k != "study"}
    base = spec.get("base", {})
    arms = load_spec(spec, overrides).arms
    best = info["best_of"]
    if best:
        C.check_keys(best, "[study] best_of", allowed=BEST_OF_KEYS)
        source = out / "tuning" / best["study"] / "tuned.toml"
        ranked = sorted((a for a in load_tuned(source)
                         if a["settings"]["optimizer"] in best.get("optimizer", C.BUFFERED)),
                        key=lambda a: -a["validation_acc"])
        strategies = sorted({a.cfg.strategy for a in arms})
        extra = []
        for chosen in ranked[: best.get("top", 3)]:
            # the arm only (optimizer, its settings, buffer policy), on this file's benchmark and strategies;
            # searched over best_of's space, else this file's space for its optimizer, else the one it was chosen from
            settings = {k: v for k, v in chosen["settings"].items() if k in C.ARM_FIELDS}
            cfg = C.from_mapping({**base, **settings, "strategy": strategies[0]}, "best_of")
            space = best_of_space(best, arms, cfg.optimizer, chosen.get("space"))
            if not space:
                raise C.ConfigError(f"{info['name']}: best_of arm {chosen.get('label', cfg.optimizer)!r} has no "
                                    f"search space: give best_of a space, or this file a [[grid]] of optimizer "
                                    f"{cfg.optimizer!r}, or "
                                    f"tune {best['study']} again with cl-cm (its tuned.toml records each space)")
            extra.append({**arm_grid(cfg, base), "strategy": strategies, "space": space})
        arms += load_spec({**spec, "space": {}, "grid": extra}, overrides).arms
    if quick:
        arms = [a for a in arms if C.run_label(a.cfg) in info["quick"]]
        if not arms:
            raise C.ConfigError(f"{info['name']}: none of the quick arms {info['quick']} is an arm of the study")
    return {**{k: v for k, v in spec.items() if k not in ("grid", "space")},
            "grid": [{**arm_grid(a.cfg, base), "space": a.space} for a in arms]}


def _labels(spec: dict[str, Any], overrides) -> list[str]:
    from .sweep import expand_grids

    return [C.run_label(c) for cells, _ in expand_grids(spec, overrides, with_space=True) for c in cells]


def run_study(target: str | Path, out: str | Path = "runs/study", jobs: int = 1, quick: bool = False,
              overrides: dict[str, Any] | None = None, report: bool = True, executor=None,
              new_journal: bool = False, tune_seeds: list[int] | None = None) -> dict[str, Any]:
    """Tune, then run, every study file of ``target`` on ``executor`` (default:
    this machine, ``jobs`` processes), its trials over ``tune_seeds`` in
    place of each file's [tune] seeds if given; returns a summary."""
    from .io import check_out, write_text
    from .sweep import run_sweep
    from .tuning import _toml, tune

    out = Path(out)
    infos = _infos(target, tune_seeds)
    names = [i["name"] for i in infos]
    if len(set(names)) != len(names):
        raise C.ConfigError(f"study names must differ: {names}")
    if quick and not any(i["quick"] for i in infos):
        raise C.ConfigError("no study file lists quick arms ([study] quick = [...])")
    check_out(out)
    for info in infos:  # every study's arms are checked before anything is written
        if not (quick and not info["quick"]) and not info["best_of"]:
            _tune_spec(info, out, quick, overrides)
    started = time.perf_counter()
    summary: dict[str, Any] = {"studies": [], "runs_failed": 0}
    for info in infos:
        if quick and not info["quick"]:
            continue
        spec = _tune_spec(info, out, quick, overrides)
        tune_dir = out / "tuning" / info["name"]
        tune_file = tune_dir / "study-tune.toml"
        tune_dir.mkdir(parents=True, exist_ok=True)
        write_text(tune_file, _spec_toml(spec, _toml))
        print(f"study {info['name']}: tuning ({info['path']})", flush=True)
        tuned = tune(tune_file, out=str(tune_dir), jobs=jobs, overrides=overrides, executor=executor,
                     new_journal=new_journal)
        sweep = {"base": {**spec.get("base", {}), "tuned": str(tuned)},
                 "grid": [{**{k: v for k, v in g.items() if k != "space"}, "seed": info["seeds"]}
                          for g in spec["grid"]]}
        if new_journal:
            moved = set_aside_retuned_runs(sweep, out / "results" / info["name"], tune_dir, overrides)
            if moved:
                print(f"study {info['name']}: {len(moved)} reporting run(s) made at earlier tuned values moved "
                      f"into {tune_dir / 'earlier'}", flush=True)
        print(f"study {info['name']}: {len(info['seeds'])} seeds per arm on the test data", flush=True)
        statuses = run_sweep(sweep, out / "results" / info["name"], jobs, overrides, progress=True,
                             executor=executor)
        failed = [k for k, v in statuses.items() if v.startswith("failed")]
        summary["studies"].append({"name": info["name"], "runs": len(statuses), "failed": failed})
        summary["runs_failed"] += len(failed)
        for folder in failed:
            print(f"  {folder}: {statuses[folder]}", flush=True)
    summary["seconds"] = time.perf_counter() - started
    if report and (out / "results").is_dir():
        from .report import render

        summary["report"] = str(render(out / "results"))
        print(f"report: {summary['report']}", flush=True)
    return summary


def set_aside_retuned_runs(sweep: dict[str, Any], results: Path, tune_dir: Path, overrides=None) -> list[Path]:
    """After ``--new-journal``: move each reporting run of ``results`` made at
    other tuned values than the arm's in ``tuned.toml`` now to
    ``tune_dir/earlier/N/results/`` (N the latest journal set aside), so that
    the arm is run again at its new values; return where they went. A run at
    the same values stays and is read, not repeated."""
    from .io import read_json
    from .sweep import expand
    from .tuning import earlier_folder, tuned_keys

    moved = []
    for cell in expand(sweep, results, overrides):
        saved = Path(cell.out) / "config.json"
        if not saved.exists():
            continue
        recorded = read_json(saved).get("config", {})
        if all(recorded.get(k) == getattr(cell, k) for k in tuned_keys(cell)):
            continue
        target = earlier_folder(tune_dir, new=False) / "results" / Path(cell.out).relative_to(results)
        for k in itertools.count(2):  # never onto a run set aside before
            if not target.exists():
                break
            target = target.with_name(f"{Path(cell.out).name}-{k}")
        target.parent.mkdir(parents=True, exist_ok=True)
        Path(cell.out).rename(target)
        moved.append(target)
    return moved


def _spec_toml(spec: dict[str, Any], toml) -> str:
    """A tune spec as a TOML file (tables of scalars and lists; [[grid]] with [grid.space])."""
    lines = []
    for table in ("tune", "base", "space"):
        if spec.get(table):
            lines.append(f"[{table}]")
            lines += [f"{k} = {toml(v)}" for k, v in spec[table].items()]
            lines.append("")
    for grid in spec["grid"]:
        lines.append("[[grid]]")
        lines += [f"{k} = {toml(v)}" for k, v in grid.items() if k != "space"]
        if grid.get("space"):
            lines.append("[grid.space]")
            lines += [f"{k} = {toml(v)}" for k, v in grid["space"].items()]
        lines.append("")
    return "\n".join(lines)


def describe(target: str | Path, overrides=None, quick: bool = False, out: str | Path = "runs/study",
             tune_seeds: list[int] | None = None) -> list[str]:
    """One line per study file: its arms and the runs it takes (tuning trials
    × tuning seeds, reporting arms × seeds), and a total line (for --dry-run).
    The arms of ``best_of`` are counted from the other study's tuned.toml
    under ``out`` once it exists, else as ``top`` arms over best_of's space or
    this file's for their one optimizer ("?" trials where it is not known yet)."""
    from .tuning import _grid_size, budget, load_spec

    lines, totals, unknown = [], [0, 0], False
    for info in _infos(target, tune_seeds):
        if quick and not info["quick"]:
            continue
        spec = {k: v for k, v in info["spec"].items() if k != "study"}
        labels = _labels(spec, overrides)
        if quick:
            labels = [label for label in labels if label in info["quick"]]
        best = info["best_of"]
        if not best or (Path(out) / "tuning" / best["study"] / "tuned.toml").exists():
            tspec = load_spec(_tune_spec(info, Path(out), quick, overrides), overrides)
            taken, extra_trials = 0, 0
        else:  # best_of's study not tuned yet: its arms are not chosen, their optimizer known if only one is allowed
            tspec = load_spec(_tune_spec({**info, "best_of": None}, Path(out), quick, overrides), overrides)
            taken = best.get("top", 3)
            optimizers = best.get("optimizer", C.BUFFERED)
            space = best_of_space(best, tspec.arms, optimizers[0] if len(optimizers) == 1 else None)
            size = _grid_size(space) if space else None
            extra_trials = taken * size if size is not None else None
        trials = (sum(budget(tspec, a) for a in tspec.arms) + (extra_trials or 0)) * len(tspec.seeds)
        reporting = (len(tspec.arms) + taken) * len(info["seeds"])
        unknown |= extra_trials is None
        totals[0] += trials
        totals[1] += reporting
        extra = f" + top {best.get('top', 3)} of {best['study']}" if best else ""
        lines.append(f"{info['name']}: {len(labels)} arm(s){extra} x {len(info['seeds'])} seeds; runs: {trials}"
                     f"{'+?' if extra_trials is None else ''} tuning + {reporting} reporting: {', '.join(labels)}")
    lines.append(f"total: {totals[0]}{'+?' if unknown else ''} tuning + {totals[1]} reporting runs")
    return lines


def timings(target: str | Path, out: str | Path = "runs/study", quick: bool = False) -> list[str]:
    """What each study file of ``target`` cost under ``out`` (for --timings;
    with ``quick``, the files that have quick arms): its finished tuning
    trials (runs of one tuning seed, those of earlier grids that
    ``--new-journal`` keeps included) and reporting runs, the wall time from
    the first run's ``config.json`` (written when a run starts) to the last
    ``metrics.json`` (written when it ends), by the files' modification
    times, and the training time the runs record (``train_seconds``
    summed); then a total line. A study stopped and resumed counts its pause
    in the wall time. Reporting runs set aside by ``--new-journal`` are not
    counted."""
    from .results import _read_metrics

    lines, total = [], [0, 0, 0.0, 0.0]
    for info in _infos(target):
        if quick and not info["quick"]:
            continue
        runs = [_files_by_name(Path(out) / "tuning" / info["name"] / "trials"),
                _files_by_name(Path(out) / "results" / info["name"])]
        done = [r["metrics.json"] for r in runs]
        ends = [m.stat().st_mtime for ms in done for m in ms]
        if not ends:
            lines.append(f"{info['name']}: no finished run in {out}")
            continue
        started = min((c.stat().st_mtime for r in runs for c in r["config.json"]), default=min(ends))
        wall = (max(ends) - started) / 60
        train = sum(seconds for ms in done for m in ms
                    if C.is_number(seconds := _read_metrics(m).get("train_seconds"))) / 60
        total = [total[0] + len(done[0]), total[1] + len(done[1]), total[2] + wall, total[3] + train]
        lines.append(f"{info['name']}: {len(done[0])} trials + {len(done[1])} reporting runs; "
                     f"wall {wall:.1f} min, training {train:.1f} min")
    lines.append(f"total: {total[0]} trials + {total[1]} reporting runs; wall {total[2]:.1f} min "
                 f"({total[2] / 60:.2f} h), training {total[3]:.1f} min")
    return lines


def _files_by_name(folder: Path) -> dict[str, list[Path]]:
    """The config.json and metrics.json files under ``folder`` (none if it is missing), from one walk."""
    found: dict[str, list[Path]] = {"config.json": [], "metrics.json": []}
    for path in folder.rglob("*.json") if folder.is_dir() else ():
        if path.name in found:
            found[path.name].append(path)
    return found


__all__ = ["run_study", "study_files", "describe", "timings"]
