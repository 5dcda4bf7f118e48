"""Sweeps and tuning on Ray (experiments.executors), on a local Ray instance of
2 CPUs started once for the module: the same metrics as the local executor,
a killed driver or worker, failures of the run against losses of the worker,
tune workers sharing one storage, and what happens without Ray."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from experiments import config as C
from experiments.cli import main as cli
from experiments.io import read_json

from .fakedata import write_mnist

ROOT = Path(__file__).resolve().parent.parent

# 8 epochs of the smoke protocol: each experience lasts long enough (~0.4 s) to kill a run inside it
SWEEP = """
[base]
benchmark = "permuted_mnist"
preset = "smoke"
strategy = "naive"
epochs = 8
data_root = "{root}"
download = false
threads = 1

[grid]
optimizer = ["adam", "adam_cm"]
seed = [0, 1]
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(root, n_train=400, n_test=120)
    return root


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance of 2 CPUs; its workers get this test's HOME (importing
    Avalanche writes ~/.avalanche) and import this checkout."""
    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
                       runtime_env={"env_vars": {"HOME": os.environ["HOME"], "PYTHONPATH": path}})
    yield context.address_info["address"]
    ray.shutdown()
    for key, value in saved.items():  # ray.init sets these for its own child processes
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory, data_root):
    path = tmp_path_factory.mktemp("spec") / "sweep.toml"
    path.write_text(SWEEP.format(root=data_root))
    return path


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, sweep_file):
    """The same sweep on the local executor, one process: the reference."""
    out = tmp_path_factory.mktemp("local")
    assert cli(["sweep", str(sweep_file), "--out", str(out)]) == 0
    return out


def results(out: Path) -> dict[str, dict]:
    """Every run's metrics by its folder under ``out``, timings left out."""
    found = {}
    for path in sorted(out.rglob("metrics.json")):
        metrics = read_json(path)
        found[str(path.parent.relative_to(out))] = {k: v for k, v in metrics.items() if "seconds" not in k}
    return found


def lock_holder(folder: Path) -> int | None:
    """The process that holds ``folder/.lock`` open (a run's lock), if any."""
    target = str(folder / ".lock")
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fds.iterdir()):
                return int(fds.parent.name)
        except OSError:  # the process ended, or is not ours to read
            continue
    return None


def wait_for(condition, what: str, timeout: float = 300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def interrupted(out: Path) -> Path | None:
    """A run with a checkpoint and no metrics yet, once another run has finished."""
    if not any(out.rglob("metrics.json")):
        return None
    return next((p.parent for p in out.rglob("checkpoint.pkl") if not (p.parent / "metrics.json").exists()), None)


# ------------------------------------------------- before Ray is ever imported
IMPORTS = ("import sys, cl_cm, strategies, experiments.cli, experiments.sweep, experiments.tuning, experiments.study\n"
           "from experiments.executors import make_executor\n"
           "assert make_executor('local', 2) is None\n"
           "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n")


def test_importing_the_package_does_not_import_ray():
    """In this process while nothing has imported Ray (this test runs before
    the module's Ray instance starts), else in a fresh interpreter."""
    if "ray" not in sys.modules:
        scope: dict = {}
        exec(IMPORTS, scope)
        assert scope["loaded"] == []
        return
    done = subprocess.run([sys.executable, "-c", IMPORTS + "print(loaded)"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------- sweeps
def test_a_sweep_on_ray_gives_the_metrics_of_the_local_executor(ray_address, sweep_file, local_sweep, tmp_path,
                                                                 capsys):
    out = tmp_path / "ray"
    assert cli(["sweep", str(sweep_file), "--out", str(out), "--executor", "ray"]) == 0
    assert "4 done" in capsys.readouterr().out
    local, remote = results(local_sweep), results(out)
    assert len(local) == 4 and remote == local
    for folder in remote:  # equal thread counts: the condition for bit-identical float32 runs
        config = read_json(out / folder / "config.json")
        assert config["environment"]["torch_threads"] == 1 and config["config"]["device"] == "cpu"


def test_a_killed_driver_is_finished_by_running_the_sweep_again_locally(ray_address, sweep_file, local_sweep,
                                                                        tmp_path, capsys):
    out = tmp_path / "killed"
    # one run at a time: the new job starts one worker, not two importing Avalanche side by side
    driver = subprocess.Popen([sys.executable, "-m", "experiments.cli", "sweep", str(sweep_file), "--out", str(out),
                               "--executor", "ray", "--address", ray_address, "--jobs", "1"], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        checkpointed = wait_for(lambda: interrupted(out) or driver.poll() is not None,
                                "a finished run and a checkpointed one")
        assert isinstance(checkpointed, Path), f"the driver ended first: {driver.stderr.read()[-2000:]}"
    finally:
        driver.kill()
        driver.wait()
    # Ray ends the tasks of a dead driver: their workers die and the runs' locks are freed
    wait_for(lambda: all(lock_holder(p.parent) is None for p in out.rglob(".lock")), "the workers to end", 30)
    finished = {p.parent: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    # one run at a time: killed while its second run was checkpointed, the driver left at most two runs finished
    # and three begun (a begun one resumes from its checkpoint); the others are missing
    assert 1 <= len(finished) <= 2 and len(list(out.glob("*/*/*/seed*"))) <= 3

    assert cli(["sweep", str(sweep_file), "--out", str(out)]) == 0  # again, on the local executor this time
    printed = capsys.readouterr().out
    assert f": {4 - len(finished)} done, {len(finished)} done before" in printed
    assert all(p.stat().st_mtime_ns == finished[p.parent] for p in out.rglob("metrics.json") if p.parent in finished)
    assert results(out) == results(local_sweep)  # the metrics of the uninterrupted sweep


def test_a_worker_killed_during_a_run_is_retried_once_and_the_sweep_finishes(ray_address, sweep_file, local_sweep,
                                                                            tmp_path):
    from experiments.executors import RayExecutor
    from experiments.sweep import run_sweep

    out = tmp_path / "worker"
    statuses = {}
    # one run at a time: the retry finds the other worker idle (and Avalanche imported) rather than starting one
    sweep = threading.Thread(target=lambda: statuses.update(run_sweep(
        C.load_file(sweep_file), out, progress=False, executor=RayExecutor(jobs=1))))
    sweep.start()

    def running() -> tuple[Path, int] | bool | None:
        """A checkpointed run and the worker training it (True: the sweep ended first)."""
        folder = interrupted(out)
        worker = lock_holder(folder) if folder else None
        return (folder, worker) if worker else not sweep.is_alive()

    try:
        found = wait_for(running, "a checkpointed run and its worker")
        assert found is not True, f"the sweep ended before a run could be caught: {statuses}"
        folder, worker = found
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{worker}").exists(), "the worker to die", 10)
        # the only process that was running this run is dead: a finished run now can only come from a retry
        assert not (folder / "metrics.json").exists(), "the kill came too late"
    finally:
        sweep.join(timeout=300)
    assert not sweep.is_alive()
    assert sorted(statuses.values()) == ["done"] * 4 and statuses[str(folder)] == "done"
    assert results(out) == results(local_sweep)


def test_a_bad_setting_fails_once_with_its_message_on_the_terminal(ray_address, data_root, tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text(SWEEP.format(root=data_root).replace("[grid]", "[[grid]]").replace("epochs = 8\n", "")
                    .replace("seed = [0, 1]", "seed = [0]")
                    + '\n[[grid]]\noptimizer = ["adam"]\ntrain_per_class = [100]\n')
    out = tmp_path / "bad"
    assert cli(["sweep", str(spec), "--out", str(out), "--executor", "ray"]) == 1
    captured = capsys.readouterr()
    assert "2 done, 1 failed in the run" in captured.out
    stop = [line for line in captured.err.splitlines() if "every run would fail the same way" in line]
    assert len(stop) == 1 and "ConfigError: train_per_class 100: class 0 has only 40 samples" in stop[0]
    failures = [line for line in captured.err.splitlines() if "failed" in line]
    assert len(failures) == 1
    assert ("failed in the run: ConfigError: train_per_class 100: class 0 has only 40 samples; use at most 40 "
            "(0: all) (see error.txt)") in failures[0]
    folder = Path(failures[0].split(": failed")[0].strip())
    assert "train_per_class100" in str(folder) and "Traceback" in (folder / "error.txt").read_text()
    assert not (folder / "metrics.json").exists()


def test_runs_that_fit_no_node_are_refused_before_anything_runs(ray_address, sweep_file, tmp_path, capsys):
    out = tmp_path / "gpu"
    assert cli(["sweep", str(sweep_file), "--out", str(out), "--executor", "ray", "--gpus-per-run", "1"]) == 2
    err = capsys.readouterr().err
    assert "no node of the Ray cluster offers 1 CPUs and 1 GPUs" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ----------------------------------------------------------------- tuning
def test_tune_workers_on_ray_never_run_the_same_trial_twice(ray_address, data_root, tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    spec = tmp_path / "tune.toml"
    spec.write_text(f"""
[tune]
seeds = [0]
[base]
benchmark = "permuted_mnist"
preset = "smoke"
data_root = "{data_root}"
download = false
threads = 1
[grid]
optimizer = ["adam_cm"]
[space]
lr = [0.0003, 0.001, 0.003]
kappa = [0.5, 1.0]
""")
    out = tmp_path / "tune"
    assert cli(["tune", str(spec), "--out", str(out), "--executor", "ray", "--jobs", "2"]) == 0
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    trials = optuna.load_study(study_name="permuted_mnist smoke naive adam_cm/keep", storage=storage).get_trials()
    params = [tuple(sorted(t.params.items())) for t in trials if t.state == TrialState.COMPLETE]
    assert len(params) == 6 and len(set(params)) == 6
    assert len(list((out / "trials").rglob("metrics.json"))) == 6
    assert tomllib.loads((out / "tuned.toml").read_text())["arm"][0]["trials"] == 6


def test_ray_retries_a_lost_worker_once_and_a_raising_call_never(ray_address, tmp_path):
    from experiments.executors import RayExecutor, Slot

    attempts = tmp_path / "attempts"

    def call(name: str) -> str:  # defined here: Ray ships it by value
        with open(attempts / name, "a") as f:
            f.write(f"{os.getpid()}\n")
        if name == "dies":
            os._exit(1)  # the worker is lost, every time
        if name == "raises":
            raise ValueError("bad setting: lr must be positive")
        return name

    attempts.mkdir()
    names = ["dies", "raises", "returns"]
    outcomes = {names[o.index]: o for o in RayExecutor().map(call, [(n,) for n in names], Slot(1, 0, 1))}
    tries = {n: (attempts / n).read_text().split() for n in names}
    assert len(tries["dies"]) == 2 and len(set(tries["dies"])) == 2  # one retry, on another worker
    assert outcomes["dies"].lost and "WorkerCrashedError" in outcomes["dies"].message
    assert len(tries["raises"]) == 1 and not outcomes["raises"].lost
    assert outcomes["raises"].message == "ValueError: bad setting: lr must be positive"
    assert len(tries["returns"]) == 1 and outcomes["returns"].value == "returns"


def test_a_run_of_several_ranks_is_a_torchrun_inside_its_task(data_root, tmp_path):
    """--gpus-per-run 2 gives each run a torchrun of 2 ranks (one GPU each);
    the same launch on the CPU, with gloo, without Ray."""
    from experiments.sweep import _run_cell

    cfg = C.RunConfig(benchmark="permuted_mnist", preset="smoke", data_root=str(data_root), download=False,
                      device="cpu", out=str(tmp_path / "ranks"))
    assert _run_cell(cfg.to_dict(), 1, 2) == (cfg.out, "done", None)
    config = read_json(tmp_path / "ranks" / "config.json")
    assert config["environment"]["world_size"] == 2 and config["config"]["threads"] == 1
    assert len(read_json(tmp_path / "ranks" / "metrics.json")["accuracy_matrix"]) == 3


# ------------------------------------------------------- without Ray at all
def test_without_ray_the_ray_executor_says_how_to_install_it(sweep_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    assert cli(["sweep", str(sweep_file), "--out", str(tmp_path / "x"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[ray]"' in err
    assert cli(["sweep", str(sweep_file), "--cpus-per-run", "2"]) == 2
    assert "--cpus-per-run only apply to --executor ray" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
