"""Results on disk: atomic writes (a crash never leaves a half-written file)
and a per-run lock (two processes never work on the same run)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, flush it to
    disk, then rename it over ``path``: readers see the old file or the new
    one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _clean(obj):
    """JSON-safe: NaN and infinities become null (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented, strict JSON (NaN written as null)."""
    atomic_write(path, lambda f: json.dump(_clean(obj), f, indent=2, sort_keys=False, allow_nan=False))


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def check_out(path: str | Path, what: str = "--out") -> None:
    """Raise :class:`~experiments.config.ConfigError` unless ``path`` is a
    folder, or can become one, that this process can write in; creates
    nothing (a probe file in the nearest existing folder is removed at once)."""
    from .config import ConfigError, path_kind

    if not str(path).strip():
        raise ConfigError(f"{what} is empty; give a folder")
    if path_kind(path, what) == "file":
        raise ConfigError(f"{what} {path} is a file; give a folder")
    path = Path(path)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, so that folder cannot be made; give another folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".cl-cm-probe-", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot write in {existing} ({e.strerror}); give a folder you can "
                          "write to") from None


def check_no_links(folder: str | Path) -> None:
    """Raise :class:`~experiments.config.ConfigError` when ``folder`` holds a
    symbolic link: writing a results file through one would write elsewhere."""
    from .config import ConfigError

    for path in Path(folder).iterdir():
        if path.is_symlink():
            raise ConfigError(f"{path} is a symbolic link; a results folder holds plain files only: delete it")


class RunLocked(RuntimeError):
    """Another process holds the run's lock."""


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Exclusive lock on ``folder/.lock`` for the life of the block; raises
    :class:`RunLocked` at once if another process holds it. The lock dies with
    its process, so a killed run never leaves a stale lock."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:  # never through a symbolic link: a planted .lock must not open (and so touch) a file elsewhere
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        from .config import ConfigError

        raise ConfigError(f"{folder / '.lock'} is a symbolic link; a results folder holds plain files only: "
                          "delete it") from None
    with os.fdopen(fd, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{folder} is being run by another process") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
