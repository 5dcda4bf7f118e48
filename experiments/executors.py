"""Where the runs of a sweep and the workers of a tune execute.

* ``local`` (:class:`LocalExecutor`): this machine; the calls one after
  another in this process (``--jobs 1``), or in a pool of ``--jobs`` processes
  sharing the cores.
* ``ray`` (:class:`RayExecutor`): a Ray cluster (``--address``, else
  ``RAY_ADDRESS``, else a local Ray instance sized to this machine); each call
  is a Ray task that asks for the CPUs and GPUs of one run
  (``--cpus-per-run``, ``--gpus-per-run``).

An executor decides where a call runs, never what it does: a cell of a sweep
takes its folder's lock, reads a finished run and resumes an unfinished one
from its checkpoint (:mod:`experiments.results`) wherever it runs, so a sweep
killed on Ray is finished by running it again, on Ray or locally.

A call ends in one of three ways (:class:`Outcome`): its value; the exception
it raised (a bad setting, missing data), never retried; or the loss of its
worker or node (killed, out of memory, node down): Ray runs such a task once
more (``max_retries=1, retry_exceptions=False``), and a task lost twice comes
back with Ray's message.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import os
import re
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import config as C
from .pool import call_reporting, read_reports, start_worker

EXECUTORS = ("local", "ray")
INSTALL_RAY = 'pip install -e ".[ray]"'


@dataclass
class Outcome:
    """How call number ``index`` ended: its ``value``, or its ``error``; ``lost``
    when the error is the loss of its worker or node rather than its own."""

    index: int
    value: Any = None
    error: BaseException | None = None
    lost: bool = False

    @property
    def message(self) -> str:
        return error_line(self.error)


def error_line(error: BaseException) -> str:
    """``Type: first line of the message``: an error in one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


@dataclass(frozen=True)
class Slot:
    """What each call gets: Ray's resources (CPUs, GPUs), the torch threads of
    its runs (None: torch's choice) and the processes of each run (``ranks`` > 1:
    a torchrun of that many ranks, one GPU each; see :func:`run_ranks`)."""

    cpus: float
    gpus: float
    threads: int | None
    ranks: int = 1


class LocalExecutor:
    """This machine: ``jobs`` = 1 runs the calls one after another in this
    process (what they raise propagates, as in a plain loop); more runs them in
    a pool of that many spawned processes, each run with cores // jobs threads."""

    remote = False

    def __init__(self, jobs: int = 1) -> None:
        self.jobs = max(1, int(jobs or 1))

    def slot(self, cfgs: Sequence[C.RunConfig]) -> Slot:
        threads = None if self.jobs == 1 else max(1, (os.cpu_count() or 1) // self.jobs)
        return Slot(cpus=threads or 1, gpus=0, threads=threads)

    def place(self, cfg: C.RunConfig, slot: Slot) -> C.RunConfig:
        return cfg

    def map(self, fn: Callable, calls: Sequence[tuple], slot: Slot, stop: Callable[[], bool] | None = None,
            report: Callable[..., None] | None = None) -> Iterator[Outcome]:
        """``fn(*args)`` for every args of ``calls``; each outcome as it comes.

        ``stop()``, asked after each outcome: once true, no further call starts
        (the pool's calls not started yet are cancelled; those already running
        end and are yielded). ``report``: each call gets ``report=send`` and
        ``send(*message)`` in the call becomes ``report(index, *message)`` here,
        before the call's outcome (from pool workers through a pipe, read while
        waiting)."""
        stop = stop or (lambda: False)
        if self.jobs == 1:
            for i, args in enumerate(calls):
                if stop():
                    return
                extra = {"report": functools.partial(report, i)} if report else {}
                yield Outcome(i, fn(*args, **extra))
            return
        context = multiprocessing.get_context("spawn")
        queue = context.SimpleQueue() if report else None
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=context, initializer=start_worker,
                                 initargs=(queue, os.getpid())) as pool:
            futures = {(pool.submit(call_reporting, fn, i, *args) if report else pool.submit(fn, *args)): i
                       for i, args in enumerate(calls)}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2 if report else None, return_when=FIRST_COMPLETED)
                    read_reports(queue, report)
                    for future in sorted(done, key=futures.get):
                        if future.cancelled():
                            continue
                        try:
                            outcome = Outcome(futures[future], future.result())
                        except BrokenProcessPool as e:  # a worker process died: the pool is gone
                            outcome = Outcome(futures[future], error=e, lost=True)
                        except Exception as e:  # noqa: BLE001 - reported with its call
                            outcome = Outcome(futures[future], error=e)
                        yield outcome
                    if stop():
                        pending = {f for f in pending if not f.cancel()}  # the running ones go on
            finally:
                for future in pending:
                    future.cancel()
            read_reports(queue, report)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def import_ray():
    """The ``ray`` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise C.ConfigError(f"--executor ray needs Ray, which is not installed: {INSTALL_RAY} "
                            '(or pip install "ray[default]")') from None
    return ray


class RayExecutor:
    """A Ray cluster: every call is a Ray task asking for ``cpus_per_run`` CPUs
    and ``gpus_per_run`` GPUs, retried once when its worker or node is lost,
    never when it raises. ``jobs`` caps the tasks in flight (None: as many as
    the cluster schedules). Joins the cluster at ``address`` (else
    ``RAY_ADDRESS``, else starts a local instance sized to this machine, shut
    down on exit); a process already connected to Ray keeps its connection."""

    remote = True

    def __init__(self, address: str | None = None, cpus_per_run: float | None = None,
                 gpus_per_run: float | None = None, jobs: int | None = None) -> None:
        if cpus_per_run is not None and not cpus_per_run > 0:
            raise C.ConfigError(f"--cpus-per-run must be > 0, got {cpus_per_run}")
        if gpus_per_run is not None and not gpus_per_run >= 0:
            raise C.ConfigError(f"--gpus-per-run must be >= 0, got {gpus_per_run}")
        if gpus_per_run is not None and gpus_per_run > 1 and gpus_per_run != int(gpus_per_run):
            raise C.ConfigError(f"--gpus-per-run above 1 must be a whole number, got {gpus_per_run}")
        if jobs is not None and jobs < 1:
            raise C.ConfigError(f"--jobs must be >= 1, got {jobs}")
        self.ray = import_ray()
        self.cpus_per_run, self.gpus_per_run, self.jobs = cpus_per_run, gpus_per_run, jobs
        self.started = not self.ray.is_initialized()
        if self.started:
            try:
                self.ray.init(address=address or None)
            except ConnectionError as e:
                raise C.ConfigError(f"cannot join the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: "
                                    f"{str(e).splitlines()[0]}; start it with `ray start --head`, or drop "
                                    "--address (and RAY_ADDRESS) for a local instance") from None

    # ------------------------------------------------------------ resources
    def _nodes(self) -> list[dict[str, float]]:
        return [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]

    def capacity(self, slot: Slot) -> int:
        """How many calls of ``slot`` the cluster's live nodes hold at once."""
        total = 0
        for res in self._nodes():
            fit = int(res.get("CPU", 0) // slot.cpus)
            if slot.gpus:
                fit = min(fit, int(res.get("GPU", 0) // slot.gpus))
            total += fit
        return total

    def slot(self, cfgs: Sequence[C.RunConfig]) -> Slot:
        """Each run's CPUs (default: its ``threads``, else 1) and GPUs (default:
        1 for a run on a GPU, i.e. ``device`` cuda, or no device on a cluster
        with GPUs; else 0); its torch threads are its CPUs."""
        if self.gpus_per_run is not None:
            gpus = self.gpus_per_run
        else:
            has_gpu = any(res.get("GPU", 0) > 0 for res in self._nodes())
            gpus = 1.0 if any(str(c.device).startswith("cuda") if c.device else has_gpu for c in cfgs) else 0.0
        cpus = self.cpus_per_run or float(max((c.threads for c in cfgs if c.threads), default=1))
        ranks = int(gpus) if gpus > 1 else 1  # several GPUs: a torchrun of one rank per GPU
        slot = Slot(cpus=cpus, gpus=gpus, threads=max(1, int(cpus) // ranks), ranks=ranks)
        if cfgs and self.capacity(slot) == 0:
            largest = max(self._nodes(), key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
            raise C.ConfigError(f"no node of the Ray cluster offers {cpus:g} CPUs and {gpus:g} GPUs for a run (the "
                                f"largest has {largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs); "
                                "lower --cpus-per-run or --gpus-per-run, or run on the CPU (--device cpu)")
        return slot

    def place(self, cfg: C.RunConfig, slot: Slot) -> C.RunConfig:
        """``cfg`` as a task must see it: paths absolute (a worker's working
        folder is not this one's; the folders must be on storage every node
        sees, at the same path) and the device explicit (a task that asked for
        no GPU must not take one)."""
        changes: dict[str, Any] = {k: str(Path(getattr(cfg, k)).absolute()) for k in ("out", "data_root", "tuned")
                                   if getattr(cfg, k)}
        if not cfg.device:
            changes["device"] = "cuda" if slot.gpus else "cpu"
        return dataclasses.replace(cfg, **changes)

    # ---------------------------------------------------------------- calls
    def map(self, fn: Callable, calls: Sequence[tuple], slot: Slot, stop: Callable[[], bool] | None = None,
            report: Callable[..., None] | None = None) -> Iterator[Outcome]:
        """``fn(*args)`` as a Ray task for every args of ``calls``; each
        outcome as it comes. Tasks still in flight when the caller stops
        reading are cancelled. Once ``stop()`` is true no further task is
        submitted (those submitted already run: all of them when ``jobs`` is
        None). ``report`` is not passed on: on Ray a call reports only its end."""
        stop = stop or (lambda: False)
        ray = self.ray
        task = ray.remote(fn).options(num_cpus=slot.cpus, num_gpus=slot.gpus, max_retries=1,
                                      retry_exceptions=False)
        limit = self.jobs or len(calls)
        pending: dict[Any, int] = {}
        submitted = 0
        try:
            while (submitted < len(calls) and not stop()) or pending:
                while submitted < len(calls) and len(pending) < limit and not stop():
                    pending[task.remote(*calls[submitted])] = submitted
                    submitted += 1
                [ref], _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ref)
                try:
                    outcome = Outcome(index, ray.get(ref))
                except ray.exceptions.RayTaskError as e:  # the call raised: its own error, not retried
                    outcome = Outcome(index, error=e.cause if isinstance(e.cause, BaseException) else e)
                except ray.exceptions.RayError as e:  # its worker or node was lost, twice: Ray retried once
                    outcome = Outcome(index, error=e, lost=True)
                yield outcome
        finally:
            for ref in pending:
                with contextlib.suppress(Exception):  # the connection may be gone already
                    ray.cancel(ref)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()


def run_ranks(cfg: C.RunConfig, ranks: int) -> dict[str, Any]:
    """``cl-cm run`` of ``cfg`` as ``torchrun --standalone`` of ``ranks``
    processes on this node (on GPUs one each: the GPUs Ray gave the task); its
    metrics. Folder, lock and resumption are those of a run in one process;
    the run's own errors come back as ConfigError, RunLocked or RuntimeError
    with torchrun's output."""
    import json
    import subprocess
    import sys
    import tempfile

    from .io import RunLocked, read_json

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="cl_cm_run_") as f:
        json.dump({**settings, "progress": False}, f)
        f.flush()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={ranks}", "-m", "experiments.cli", "run", "--config", f.name],
                              capture_output=True, text=True)
    if done.returncode == 0:
        return read_json(Path(cfg.out) / "metrics.json")
    said = [line.split("cl-cm: error: ", 1)[1] for line in done.stderr.splitlines() if "cl-cm: error: " in line]
    if said:  # the command's one-line error (every rank says it; the first is enough)
        raise (RunLocked if "is being run by another process" in said[0] else C.ConfigError)(said[0])
    raised = [m.group(1) for m in _RANK_ERROR.finditer(done.stderr)]  # "[rank0]: ValueError: ..." lines
    tail = "\n".join(done.stderr.strip().splitlines()[-80:])
    raise RuntimeError(f"{raised[0] if raised else 'exited with code ' + str(done.returncode)} (torchrun of "
                       f"{ranks} ranks)\n{tail}")


_RANK_ERROR = re.compile(r"^\[rank\d+\]: ((?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception): .*)$", re.M)


def make_executor(kind: str, jobs: int | None = None, address: str | None = None, cpus_per_run: float | None = None,
                  gpus_per_run: float | None = None):
    """The executor named ``kind``; None for ``local`` (the sweep or tune makes
    its own pool of ``--jobs`` processes)."""
    if kind not in EXECUTORS:
        raise C.ConfigError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if kind == "local":
        given = [flag for flag, v in (("--address", address), ("--cpus-per-run", cpus_per_run),
                                      ("--gpus-per-run", gpus_per_run)) if v is not None]
        if given:
            raise C.ConfigError(f"{', '.join(given)} only apply to --executor ray")
        return None
    return RayExecutor(address, cpus_per_run, gpus_per_run, jobs)
