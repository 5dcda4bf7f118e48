"""Checkpoints of unfinished runs: nothing in a results folder can run code,
and a fault never needs a hand repair.

**Authenticated checkpoints.** A continual-learning run checkpoints the whole
Avalanche strategy after every experience (Avalanche's ``save_checkpoint``, a
dill pickle): model, optimizer, plugins, the strategy's own memories (EWC's
importances, SI's trajectories, LwF's previous model, the Replay, GEM and
A-GEM buffers), the evaluator's metric history and the random number
generators. Unpickling such a file runs whatever code it names, so a planted
file would run code on resume. Rewriting every strategy's state as plain
tensors would re-implement Avalanche's checkpointing strategy by strategy
(and put the bit-identical resumption of each at risk), so the file keeps
Avalanche's contents and carries an authentication tag instead:
HMAC-SHA256 (RFC 2104) of the contents under a secret key of the user's. A
file whose tag does not match (made by someone else, edited, or written
before tags existed) is never unpickled: :class:`CheckpointRefused` says what
happened and what to do. The key is ``$CL_CM_CHECKPOINT_KEY`` when set
(clusters whose nodes do not share a home folder; tests), otherwise 32 random
bytes created once in ``~/.config/cl-cm/checkpoint.key`` (``$XDG_CONFIG_HOME``
when set) with mode 0600; a key file that other users can read is refused, as
ssh refuses such keys. A shared results folder stays readable (config.json,
metrics.json, the report); only its unfinished runs cannot be resumed by
another user, who restarts them instead.

Supervised runs checkpoint plain tensors, loaded with
``torch.load(weights_only=True)``, which never runs code; they skip the tag.

**Faults heal themselves.** A new checkpoint is written to a temporary file,
flushed to disk, and renamed over ``checkpoint.*`` only when complete; the one
it replaces is kept as ``checkpoint.prev.*``. A kill at any moment therefore
leaves a complete checkpoint (the new one or the previous one); one that is
incomplete all the same (a truncated or empty file, a full disk) is passed
over with a message for the previous one, and a run with no complete
checkpoint starts again from its beginning. Temporary files of an interrupted
write are removed at the next start (:func:`remove_interrupted_writes`).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable

KEY_ENV = "CL_CM_CHECKPOINT_KEY"
MAGIC = b"cl-cm checkpoint, HMAC-SHA256\n"
_LENGTH = 8  # bytes of the payload length (big-endian)
_TAG = hashlib.sha256().digest_size
HEADER = len(MAGIC) + _LENGTH + _TAG


class CheckpointRefused(Exception):
    """A checkpoint that is not authenticated by this user's key: never loaded."""


class CheckpointIncomplete(Exception):
    """A checkpoint cut short (empty, truncated): passed over for the previous one."""


def notice(message: str) -> None:
    print(f"cl-cm: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the key
def key_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "cl-cm" / "checkpoint.key"


def secret_key() -> bytes:
    """This user's checkpoint key: ``$CL_CM_CHECKPOINT_KEY``, else the key
    file, created on first use (mode 0600, written whole before it appears)."""
    from .config import ConfigError

    if os.environ.get(KEY_ENV) is not None:
        key = os.environ[KEY_ENV].encode()
        if len(key) < 16:
            raise ConfigError(f"{KEY_ENV} is too short to be a secret ({len(key)} characters); use at least 16, "
                              "e.g. the output of: python -c 'import secrets; print(secrets.token_hex(32))'")
        return key
    path = key_path()
    try:
        if not path.exists():
            _make_key(path)
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot make or read the checkpoint key {path} ({e.strerror}); set {KEY_ENV} to a "
                          "secret of at least 16 characters instead") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"checkpoint key {path} can be read or written by other users (mode "
                          f"{stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
    key = text.strip().encode()
    if len(key) < 16:
        raise ConfigError(f"checkpoint key {path} is too short to be a secret; delete it and a new one is made")
    return key


def _make_key(path: Path) -> None:
    """32 random bytes (hex) in ``path``, mode 0600, written whole before the file appears."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _tag(key: bytes, length: bytes, payload: bytes) -> bytes:
    return hmac.new(key, MAGIC + length + payload, hashlib.sha256).digest()


def seal(payload: bytes, key: bytes | None = None) -> bytes:
    """``payload`` with a header: the format line, its length and its HMAC-SHA256 tag."""
    length = len(payload).to_bytes(_LENGTH, "big")
    return MAGIC + length + _tag(key or secret_key(), length, payload) + payload


def unseal(data: bytes, where: str | Path, key: bytes | None = None) -> bytes:
    """The payload of a sealed checkpoint, once its tag is checked; raises
    :class:`CheckpointIncomplete` for a file cut short and
    :class:`CheckpointRefused` for anything else that does not authenticate."""
    if len(data) < HEADER and MAGIC.startswith(data[: len(MAGIC)]):
        raise CheckpointIncomplete(f"{where} is incomplete ({len(data)} bytes, shorter than its header)")
    if not data.startswith(MAGIC):
        raise CheckpointRefused(
            f"{where} has no authentication tag (it was not written by this version of cl-cm, or was replaced); "
            "it was not loaded, so nothing in it ran. Delete it to restart that run from its beginning")
    length = data[len(MAGIC): len(MAGIC) + _LENGTH]
    tag, payload = data[len(MAGIC) + _LENGTH: HEADER], data[HEADER:]
    expected = int.from_bytes(length, "big")
    if len(payload) < expected:
        raise CheckpointIncomplete(f"{where} is incomplete ({len(payload)} of {expected} bytes)")
    if len(payload) > expected or not hmac.compare_digest(tag, _tag(key or secret_key(), length, payload)):
        raise CheckpointRefused(
            f"{where} does not carry your key's authentication tag (written by another user or key, or "
            f"modified); it was not loaded, so nothing in it ran. Delete it to restart that run from its "
            f"beginning, or set {KEY_ENV} to the key that wrote it")
    return payload


# --------------------------------------------------------- the two files
class Checkpoints:
    """The checkpoint of the run in ``folder``: ``name`` (the newest) and
    ``prev`` (the one before), written whole or not at all, sealed when
    ``authenticate``."""

    def __init__(self, folder: str | Path, name: str = "checkpoint.pkl", authenticate: bool = True) -> None:
        self.folder = Path(folder)
        self.current = self.folder / name
        stem, dot, suffix = name.partition(".")
        self.previous = self.folder / f"{stem}.prev{dot}{suffix}"
        self.authenticate = authenticate

    def save(self, write: Callable[[BinaryIO], None]) -> None:
        """``write(file)`` into memory, then to disk: a temporary file, flushed,
        renamed over the newest checkpoint, whose predecessor becomes ``prev``."""
        buffer = io.BytesIO()
        write(buffer)
        data = seal(buffer.getvalue()) if self.authenticate else buffer.getvalue()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{self.current.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if self.current.exists():
                os.replace(self.current, self.previous)
            os.replace(tmp, self.current)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _sync_folder(self.folder)

    def load(self, read: Callable[[BinaryIO], Any]) -> Any | None:
        """``read(file)`` of the newest complete checkpoint (None when there is
        none). An incomplete one is passed over with a message; an
        unauthenticated one raises :class:`CheckpointRefused` before it is read."""
        passed_over = []
        for path in (self.current, self.previous):
            if not path.exists():
                continue
            try:
                data = path.read_bytes()
                if self.authenticate:
                    payload = unseal(data, path)
                else:
                    payload = data
                    if not payload:
                        raise CheckpointIncomplete(f"{path} is empty")
                try:
                    value = read(io.BytesIO(payload))
                except CheckpointRefused:
                    raise
                except Exception as e:  # noqa: BLE001 - an unauthenticated file that does not load is incomplete
                    if self.authenticate:
                        raise
                    raise CheckpointIncomplete(f"{path} cannot be read ({type(e).__name__}: "
                                               f"{str(e).splitlines()[0] if str(e) else 'damaged'})") from None
            except CheckpointIncomplete as e:
                passed_over.append(path)
                notice(f"{e}; passing over it")
                continue
            if passed_over:
                notice(f"resuming from the previous checkpoint {path}")
            _remove(passed_over)
            return value
        if passed_over:
            notice(f"no complete checkpoint in {self.folder}; the run starts again from its beginning")
        _remove(passed_over)
        return None

    def remove(self) -> None:
        for path in (self.current, self.previous):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def exists(self) -> bool:
        return self.current.exists() or self.previous.exists()


def _remove(paths) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sync_folder(folder: Path) -> None:
    """Make the renames durable (fsync of the folder; not every system has it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_interrupted_writes(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.<name>.<...>.tmp``) that a killed write
    left in ``folder``; call it while holding the folder's lock, so that no
    live write is touched. Returns what it removed."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
