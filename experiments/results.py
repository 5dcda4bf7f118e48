"""The results folder of one run, for every kind of run (continual, supervised, toy).

``managed_run`` owns the folder's life cycle: a lock, a refusal when the
folder holds a run with other settings, ``config.json`` (every setting, the
environment and the protocol) written first, the training, then
``metrics.json`` written last and atomically. A folder with ``metrics.json``
is finished: running it again only reads it. A folder without it is resumed
by the training function from its own checkpoint.
"""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from .io import read_json, run_lock, write_json


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
                train: Callable[[Path], dict[str, Any]], provenance: dict[str, str] | None = None
                ) -> tuple[dict[str, Any], bool]:
    """Run ``train(out)`` in the folder ``out`` unless it is finished; return
    (metrics, whether they were computed now).

    Under torch.distributed (torchrun) every rank trains, and only rank 0
    touches the folder: it holds the lock and writes config, checkpoints and
    metrics; it sends the other ranks the metrics of a finished run, so that
    they need not share its file system."""
    import torch.distributed as dist

    from .config import ConfigError
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
    with run_lock(out):
        saved = out / "config.json"
        if saved.exists():
            previous = read_json(saved)["config"]
            changed = sorted(k for k in settings if k not in runtime_keys and previous.get(k) != settings[k])
            if changed:
                raise ConfigError(f"{out} holds a run with other settings ({', '.join(changed)} differ); "
                                  "choose another --out or delete that folder")
        finished = [read_json(out / "metrics.json") if (out / "metrics.json").exists() else None]
        if world > 1:
            dist.broadcast_object_list(finished)
        if finished[0] is not None:
            return finished[0], False
        if not saved.exists():
            record = {"config": settings, "environment": environment(), "protocol": protocol}
            if provenance:
                record["provenance"] = provenance  # where each setting came from: given, preset, default, tuned
            write_json(saved, record)
        metrics = train(out)
        write_json(out / "metrics.json", metrics)
        for leftover in out.glob("checkpoint.*"):
            leftover.unlink()
        if world > 1:
            dist.barrier()
    return metrics, True
