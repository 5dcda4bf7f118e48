"""The results folder of one run, for every kind of run (continual, supervised, toy).

``managed_run`` owns the folder's life cycle: a lock, a refusal when the
folder holds a run with other settings, ``config.json`` (every setting, the
environment and the protocol) written first, the training, then
``metrics.json`` written last and atomically. A folder with ``metrics.json``
is finished: running it again only reads it. A folder without it is resumed
by the training function from its own checkpoint.

A failed run never blocks its corrected rerun: only a folder with something
to protect (``metrics.json`` or a checkpoint) refuses other settings; the
``config.json`` of a run that never completed a checkpoint is replaced. A run
refused for its settings or its data during training (``ConfigError``,
``DataNotFoundError``) leaves nothing behind, and one whose loss became
non-finite drops its checkpoints (a rerun with the same settings would fail
the same way). A finished run's folder keeps no ``error.txt`` of an
earlier failure.

A setting added to the library after a run was made is absent from that run's
``config.json``; it counts as the setting's default, since a new setting's
default keeps the behaviour from before it existed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from .io import check_no_links, read_json, run_lock, write_json


def environment() -> dict[str, Any]:
    """Versions, commit and command line, recorded with every run."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "torchvision", "avalanche-lib", "numpy", "seaborn", "cl-cm"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    import torch

    from .launch import rank_and_world

    # threads and ranks change the summation order, hence a run's float32 round-off
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "git_commit": commit, "git_dirty": dirty, "command": sys.argv,
            "torch_threads": torch.get_num_threads(), "world_size": rank_and_world()[1]}


def managed_run(out: str | Path, settings: dict[str, Any], runtime_keys, protocol: str,
                train: Callable[[Path], dict[str, Any]], provenance: dict[str, str] | None = None,
                defaults: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
    """Run ``train(out)`` in the folder ``out`` unless it is finished; return
    (metrics, whether they were computed now).

    Under torch.distributed (torchrun) every rank trains, and only rank 0
    touches the folder: it holds the lock and writes config, checkpoints and
    metrics; it sends the other ranks the metrics of a finished run, so that
    they need not share its file system. ``defaults`` stand for settings absent
    from an earlier ``config.json`` (see the module's docstring)."""
    import torch.distributed as dist

    from strategies import NonFiniteLossError

    from .checkpoint import notice, remove_interrupted_writes
    from .config import ConfigError
    from .data import DataNotFoundError
    from .launch import rank_and_world

    out = Path(out)
    rank, world = rank_and_world()
    if rank != 0:
        finished = [None]
        dist.broadcast_object_list(finished)  # rank 0's metrics when the run is finished
        if finished[0] is not None:
            return finished[0], False
        metrics = train(out)
        dist.barrier()  # rank 0 has written metrics.json
        return metrics, True
    made = _missing_ancestors(out)  # the folders this run makes, removed again when it is refused
    if (out / "metrics.json").exists() and not (out / "config.json").exists():
        raise ConfigError(f"{out} holds results without the config.json that says which settings made them; "
                          "choose another --out or delete that folder")
    try:
        with run_lock(out):
            check_no_links(out)
            removed = remove_interrupted_writes(out)
            if removed:
                notice(f"removed {len(removed)} temporary file(s) of an interrupted write in {out}")
            saved, done = out / "config.json", out / "metrics.json"
            to_protect = done.exists() or _has_checkpoint(out)
            write_config = True
            if saved.exists():
                previous = _previous_settings(saved, to_protect)
                previous = {**(defaults or {}), **previous}
                changed = sorted(k for k in settings if k not in runtime_keys and previous.get(k) != settings[k])
                if changed and to_protect:
                    raise ConfigError(f"{out} holds a run with other settings ({', '.join(changed)} differ); "
                                      "choose another --out or delete that folder")
                if changed:
                    notice(f"{out} held the settings of a run that never completed a checkpoint ({', '.join(changed)} "
                           "differ); they are replaced by these")
                write_config = bool(changed)
            finished = [_read_metrics(done) if done.exists() else None]
            if world > 1:
                dist.broadcast_object_list(finished)
            if finished[0] is not None:
                _forget_failure(out)
                return finished[0], False
            if write_config:
                record = {"config": settings, "environment": environment(), "protocol": protocol}
                if provenance:
                    record["provenance"] = provenance  # where each setting came from: given, preset, default, tuned
                write_json(saved, record)
            try:
                metrics = train(out)
            except (ConfigError, DataNotFoundError):
                if write_config and not _has_checkpoint(out):  # refused before any progress: leave no trace
                    saved.unlink()
                raise
            except NonFiniteLossError:
                _remove_checkpoints(out)
                raise
            write_json(done, metrics)
            _remove_checkpoints(out)
            _forget_failure(out)
            if world > 1:
                dist.barrier()
    finally:
        if made and out.is_dir() and {p.name for p in out.iterdir()} <= {".lock"}:
            with contextlib.suppress(OSError):  # folders made for a run that was refused: gone again
                (out / ".lock").unlink()
                for folder in made:
                    folder.rmdir()
    return metrics, True


def _forget_failure(out: Path) -> None:
    """A finished run keeps no ``error.txt`` of an earlier failure: it would mislead."""
    with contextlib.suppress(FileNotFoundError):
        (out / "error.txt").unlink()


def _missing_ancestors(out: Path) -> list[Path]:
    """``out`` and its parents that do not exist yet, deepest first."""
    missing = []
    while not out.exists() and out != out.parent:
        missing.append(out)
        out = out.parent
    return missing


def _has_checkpoint(out: Path) -> bool:
    return any(out.glob("checkpoint*"))


def _remove_checkpoints(out: Path) -> None:
    for leftover in out.glob("checkpoint*"):
        leftover.unlink()


def _previous_settings(saved: Path, to_protect: bool) -> dict[str, Any]:
    """The settings in a run's config.json; an unreadable one is refused when
    the folder has results to protect, and replaced otherwise."""
    from .config import ConfigError

    try:
        previous = read_json(saved)["config"]
        if not isinstance(previous, dict):
            raise TypeError("config is not a table")
        return previous
    except (OSError, ValueError, KeyError, TypeError) as e:
        if to_protect:
            raise ConfigError(f"{saved} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}), so the run "
                              "in its folder cannot be checked against these settings; choose another --out or "
                              "delete that folder") from None
        return {}


def _read_metrics(done: Path) -> dict[str, Any]:
    from .config import ConfigError

    try:
        metrics = read_json(done)
        if not isinstance(metrics, dict):
            raise TypeError("not a table")
        return metrics
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{done} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); delete it to "
                          "train that run again") from None


class RunKind:
    """What one kind of run (continual, supervised, toy) declares; :func:`execute`
    runs every kind through the same life cycle:

    1. ``resolve``: settings completed (presets) and checked, before anything is written;
    2. ``label``: the name that tells the run apart (in its folder's name, where the
       kind names folders after it, and in its summary);
    3. the results folder checked (``folder``), torch's threads set, ``prepare`` (what
       must exist before a folder is written, e.g. the checkpoint key);
    4. :func:`managed_run`: ``config.json`` (``settings``, ``protocol``, ``provenance``),
       ``train``, ``metrics.json``;
    5. ``summary``: printed on rank 0 unless quiet.
    """

    #: settings that may differ between a run and its resumption (they do not change results)
    runtime_keys: tuple[str, ...] = ()

    def resolve(self, cfg):
        return cfg

    def label(self, cfg) -> str:
        raise NotImplementedError

    def folder(self, cfg) -> str | Path:
        """The run's results folder, as given (an empty ``out`` is refused, not read as ".")."""
        return cfg.out

    def settings(self, cfg) -> dict[str, Any]:
        return cfg.to_dict()

    def defaults(self, cfg) -> dict[str, Any]:
        """Each setting's default, for settings absent from an older ``config.json``."""
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cfg)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}

    def protocol(self, cfg) -> str:
        return ""

    def provenance(self, cfg) -> dict[str, str] | None:
        return None

    def prepare(self, cfg) -> None:
        """Before the folder is written (after it is checked)."""

    def train(self, cfg, out: Path, quiet: bool) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self, metrics: dict[str, Any], cfg) -> str:
        raise NotImplementedError


def execute(kind: RunKind, cfg, *, quiet: bool = False) -> dict[str, Any]:
    """Run, resume or just read the run ``cfg`` of ``kind`` (see
    :class:`RunKind`); return its metrics. Safe to call again after a crash."""
    from .io import check_out
    from .launch import rank_and_world

    cfg = kind.resolve(cfg)
    out = kind.folder(cfg)
    check_out(out)
    threads = getattr(cfg, "threads", None)
    if threads:  # before config.json records the environment
        import torch

        torch.set_num_threads(threads)
    kind.prepare(cfg)
    metrics, _ = managed_run(out, kind.settings(cfg), kind.runtime_keys, kind.protocol(cfg),
                             lambda folder: kind.train(cfg, folder, quiet), provenance=kind.provenance(cfg),
                             defaults=kind.defaults(cfg))
    if not quiet and rank_and_world()[0] == 0:
        print(kind.summary(metrics, cfg))
    return metrics
