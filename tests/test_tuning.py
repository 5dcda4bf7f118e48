"""cl-cm tune: hyperparameters chosen on validation data only, Optuna storage,
resumption, parallel workers, tuned.toml feeding a sweep, bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from experiments import config as C
from experiments.cli import main as cli
from experiments.data import build_benchmark, holdout_split
from experiments.io import read_json

from .fakedata import write_mnist

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(root, n_train=400, n_test=120)
    return root


def tune_file(path: Path, data_root, space: str, grid: str = 'optimizer = ["adam"]', extra: str = "") -> Path:
    seeds = "" if "seeds" in extra else "seeds = [0, 1]"
    path.write_text(f"""
[tune]
{seeds}
{extra}
[base]
benchmark = "permuted_mnist"
preset = "smoke"
data_root = "{data_root}"
download = false
threads = 1
[grid]
{grid}
[space]
{space}
""")
    return path


def chosen(out: Path) -> dict:
    return {a["label"]: a["chosen"] for a in tomllib.loads((out / "tuned.toml").read_text())["arm"]}


# ---------------------------------------------------------- validation split
def test_holdout_split_is_class_balanced_fixed_and_disjoint():
    import torch

    targets = torch.arange(200) % 4
    kept, held = holdout_split(targets, 0.1)
    assert set(kept.tolist()).isdisjoint(held.tolist()) and len(kept) + len(held) == 200
    assert torch.bincount(targets[held]).tolist() == [5, 5, 5, 5]
    again_kept, again_held = holdout_split(targets, 0.1)
    assert torch.equal(held, again_held) and torch.equal(kept, again_kept)


@pytest.mark.parametrize("benchmark", ["permuted_mnist", "rotated_mnist", "split_mnist"])
def test_validation_data_is_held_out_of_training_and_never_the_test_data(data_root, benchmark):
    import torch

    def rows(stream):
        return {tuple(x.flatten().tolist()) for exp in stream for x, *_ in exp.dataset}

    base = C.resolve(C.RunConfig(benchmark=benchmark, preset="smoke", data_root=str(data_root), download=False))
    tested = build_benchmark(base)
    held = build_benchmark(C.resolve(C.RunConfig(**{**base.to_dict(), "validation": "holdout"})))
    assert held.eval_split == "validation" and tested.eval_split == "test"
    train, valid, test = rows(held.scenario.train_stream), rows(held.scenario.test_stream), rows(tested.scenario.test_stream)
    assert valid and train.isdisjoint(valid) and valid.isdisjoint(test)
    # the held-out rows are training rows of the untouched protocol
    assert valid <= rows(tested.scenario.train_stream)
    assert len(train) + len(valid) == len(rows(tested.scenario.train_stream))
    first = build_benchmark(C.resolve(C.RunConfig(**{**base.to_dict(), "validation": "first_tasks",
                                                     "validation_tasks": 2})))
    assert first.n_experiences == 2 and len(first.scenario.train_stream) == 2
    if benchmark != "split_mnist":  # another stream: other permutations / rotations than the reported one
        a, b = first.scenario.train_stream[1].dataset, held.scenario.train_stream[1].dataset
        assert not torch.equal(torch.stack([a[i][0] for i in range(5)]), torch.stack([b[i][0] for i in range(5)]))


# ---------------------------------------------------------------- the search
def test_a_planted_search_picks_the_learning_rate_that_does_not_diverge(data_root, tmp_path, capsys):
    spec = tune_file(tmp_path / "t.toml", data_root, "lr = [1000.0, 0.003]",
                     grid='optimizer = ["adam", "adam_cm"]')
    assert cli(["tune", str(spec), "--out", str(tmp_path / "t")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("validation ACC") == 4  # a progress line per finished trial
    assert chosen(tmp_path / "t") == {"permuted_mnist smoke naive adam": {"lr": 0.003},
                                      "permuted_mnist smoke naive adam_cm/keep": {"lr": 0.003}}
    tuned = tomllib.loads((tmp_path / "t" / "tuned.toml").read_text())
    arm = tuned["arm"][0]
    assert arm["at_edge"] == ["lr"]  # 0.003 is the lowest of its grid: the best may lie beyond it
    assert arm["trials"] == 2 and len(arm["validation_acc_per_seed"]) == 2 and tuned["tune"]["validation"] == "holdout"
    assert arm["validation_acc"] == pytest.approx(sum(arm["validation_acc_per_seed"]) / 2)
    runs = list((tmp_path / "t" / "trials").rglob("metrics.json"))
    assert len(runs) == 8 and all(read_json(r)["eval_split"] == "validation" for r in runs)
    # running it again finishes at once with the same choices
    assert cli(["tune", str(spec), "--out", str(tmp_path / "t")]) == 0
    assert chosen(tmp_path / "t")["permuted_mnist smoke naive adam"] == {"lr": 0.003}


def test_tuning_never_reads_the_test_data(data_root, tmp_path):
    import shutil

    import numpy as np

    noisy = tmp_path / "noisy"
    shutil.copytree(data_root, noisy)
    raw = noisy / "MNIST" / "raw"
    rng = np.random.default_rng(1)
    header = (raw / "t10k-images-idx3-ubyte").read_bytes()[:16]
    (raw / "t10k-images-idx3-ubyte").write_bytes(header + rng.integers(0, 256, 120 * 784, dtype=np.uint8).tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes()[:8]
                                                 + rng.integers(0, 10, 120, dtype=np.uint8).tobytes())
    texts = []
    for root, name in ((data_root, "clean"), (noisy, "noise")):
        spec = tune_file(tmp_path / f"{name}.toml", root, "lr = [0.0003, 0.003]\nkappa = [0.5, 1.0]",
                         grid='optimizer = ["adam_cm"]')
        assert cli(["tune", str(spec), "--out", str(tmp_path / name)]) == 0
        texts.append([line for line in (tmp_path / name / "tuned.toml").read_text().splitlines()
                      if not line.startswith("file =")])
    assert texts[0] == texts[1]


def test_a_range_is_searched_with_tpe_within_its_bounds(data_root, tmp_path):
    spec = tune_file(tmp_path / "r.toml", data_root, "lr = { low = 1e-4, high = 1e-2, log = true }",
                     extra="trials = 3\nseeds = [0]")
    assert cli(["tune", str(spec), "--out", str(tmp_path / "r")]) == 0
    arm = tomllib.loads((tmp_path / "r" / "tuned.toml").read_text())["arm"][0]
    assert arm["trials"] == 3 and 1e-4 <= arm["chosen"]["lr"] <= 1e-2


# ------------------------------------------------------- tuned.toml -> sweep
def test_tuned_settings_feed_a_sweep_and_config_json_says_where_they_came_from(data_root, tmp_path, capsys):
    spec = tune_file(tmp_path / "t.toml", data_root, "lr = [0.0003, 0.003]\nkappa = [0.5, 1.0]",
                     grid='optimizer = ["adam", "adam_cm"]\nboundary = ["decay:0.5"]')
    assert cli(["tune", str(spec), "--out", str(tmp_path / "t")]) == 0
    picks = chosen(tmp_path / "t")
    sweep = tmp_path / "s.toml"
    sweep.write_text(f"""
[base]
benchmark = "permuted_mnist"
preset = "smoke"
data_root = "{data_root}"
download = false
threads = 1
tuned = "{tmp_path / 't' / 'tuned.toml'}"
[grid]
optimizer = ["adam", "adam_cm"]
boundary = ["decay:0.5"]
seed = [0, 1]
""")
    assert cli(["sweep", str(sweep), "--out", str(tmp_path / "s")]) == 0
    record = read_json(tmp_path / "s" / "permuted_mnist-smoke" / "naive" / "adam_cm-decay0.5" / "seed1" / "config.json")
    cm = picks["permuted_mnist smoke naive adam_cm/decay0.5"]
    assert record["config"]["lr"] == cm["lr"] and record["config"]["kappa"] == cm["kappa"]
    assert record["provenance"]["lr"].startswith("tuned") and record["provenance"]["kappa"].startswith("tuned")
    assert record["provenance"]["epochs"] == "preset smoke" and record["provenance"]["factor"] == "given"
    adam = read_json(tmp_path / "s" / "permuted_mnist-smoke" / "naive" / "adam" / "seed0" / "config.json")
    assert adam["config"]["lr"] == picks["permuted_mnist smoke naive adam"]["lr"] and adam["config"]["kappa"] is None
    # the report keeps one row per arm and shows the tuned values
    assert cli(["report", str(tmp_path / "s")]) == 0
    report = (tmp_path / "s" / "report" / "report.md").read_text()
    assert f"| `adam_cm/decay0.5` | 2 | {cm['lr']:g} | kappa={cm['kappa']:g}, lr={cm['lr']:g} |" in report


# ------------------------------------------------- kills and parallel workers
def _tune_command(spec, out, *extra):
    return [sys.executable, "-m", "experiments.cli", "tune", str(spec), "--out", str(out), *extra]


def test_a_killed_tune_resumes_and_chooses_as_an_uninterrupted_one(data_root, tmp_path):
    spec = tune_file(tmp_path / "k.toml", data_root, "lr = [0.0003, 0.001, 0.003]", extra="seeds = [0, 1, 2]")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert cli(["tune", str(spec), "--out", str(tmp_path / "whole")]) == 0
    proc = subprocess.Popen(_tune_command(spec, tmp_path / "killed"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # kill in the middle of the second trial, after one of its runs has finished
        if "trial #0" in line:
            break
    deadline = time.time() + 60
    while time.time() < deadline and len(list((tmp_path / "killed" / "trials").rglob("metrics.json"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "tuned.toml").exists()
    resumed = subprocess.run(_tune_command(spec, tmp_path / "killed"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert chosen(tmp_path / "killed") == chosen(tmp_path / "whole")
    whole = tomllib.loads((tmp_path / "whole" / "tuned.toml").read_text())["arm"][0]
    again = tomllib.loads((tmp_path / "killed" / "tuned.toml").read_text())["arm"][0]
    assert again["validation_acc_per_seed"] == whole["validation_acc_per_seed"] and again["trials"] == 3
    # the trial the kill interrupted was taken for stale and run again with the same values
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "killed" / "optuna.journal")))
    trials = optuna.load_study(study_name="permuted_mnist smoke naive adam", storage=storage).get_trials()
    stale = [t for t in trials if t.user_attrs.get("stale")]
    assert len(stale) == 1 and any(t.user_attrs.get("retry_of") == stale[0].number and t.params == stale[0].params
                                   and t.state.name == "COMPLETE" for t in trials)


def test_two_workers_sharing_one_storage_never_run_the_same_trial_twice(data_root, tmp_path):
    import optuna
    from optuna.trial import TrialState

    spec = tune_file(tmp_path / "p.toml", data_root, "lr = [0.0001, 0.0003, 0.001, 0.003]\nkappa = [0.5, 1.0]",
                     grid='optimizer = ["adam", "adam_cm"]')
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(_tune_command(spec, tmp_path / "p", "--storage", storage), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    for name, size in (("permuted_mnist smoke naive adam", 4), ("permuted_mnist smoke naive adam_cm/keep", 8)):
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.COMPLETE,))
        params = [tuple(sorted(t.params.items())) for t in trials]
        assert len(params) == size and len(set(params)) == size
    assert len(list((tmp_path / "p" / "trials").rglob("metrics.json"))) == 2 * (4 + 8)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("space,grid,message", [
    ("", 'optimizer = ["adam"]', "search space is empty"),
    ("lr = [0.001]\nlearning_rate = [0.1]", 'optimizer = ["adam"]', "unknown key 'learning_rate'"),
    ("lr = { low = 0.1, high = 0.001 }", 'optimizer = ["adam"]', "low (0.1) is greater than high (0.001)"),
    ("lr = []", 'optimizer = ["adam"]', "empty list"),
    ("kappa = [0.5]", 'optimizer = ["adam_cm"]', "has no lr in its search space"),
    ("lr = [0.001]\nkappa = [0.5]", 'optimizer = ["adam", "sgd"]', "kappa applies to none of the arms"),
    ("lr = { low = 1e-4, high = 1e-2 }", 'optimizer = ["adam"]', "set trials = N"),
])
def test_bad_tune_files_fail_with_one_line_before_writing(data_root, tmp_path, capsys, space, grid, message):
    spec = tune_file(tmp_path / "bad.toml", data_root, space, grid=grid)
    assert cli(["tune", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("cl-cm: error:")
    assert not (tmp_path / "out").exists()


def test_a_tuned_file_whose_arms_do_not_match_the_sweep_is_refused(data_root, tmp_path, capsys):
    spec = tune_file(tmp_path / "t.toml", data_root, "lr = [0.001]")
    assert cli(["tune", str(spec), "--out", str(tmp_path / "t")]) == 0
    sweep = tmp_path / "s.toml"
    sweep.write_text(f'[base]\nbenchmark = "permuted_mnist"\npreset = "smoke"\ndata_root = "{data_root}"\n'
                     '[grid]\noptimizer = ["adam", "sgd"]\nseed = [0]\n')
    assert cli(["sweep", str(sweep), "--out", str(tmp_path / "s"), "--tuned", str(tmp_path / "t" / "tuned.toml")]) == 2
    err = capsys.readouterr().err
    assert "has no arm for permuted_mnist smoke naive sgd" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()
    # a tuned value also given explicitly is refused
    sweep.write_text(f'[base]\nbenchmark = "permuted_mnist"\npreset = "smoke"\ndata_root = "{data_root}"\n'
                     '[grid]\noptimizer = ["adam"]\nlr = [0.01]\nseed = [0]\n')
    assert cli(["sweep", str(sweep), "--out", str(tmp_path / "s"), "--tuned", str(tmp_path / "t" / "tuned.toml")]) == 2
    assert "also tuned in" in capsys.readouterr().err


def test_an_extended_grid_is_refused_then_tuned_with_new_journal_reusing_finished_trials(data_root, tmp_path, capsys):
    """The way to widen a grid whose choice sat at an edge: --new-journal sets the old
    journal aside and reuses the trials at values both grids share."""
    out = tmp_path / "t"
    spec = tune_file(tmp_path / "t.toml", data_root, "lr = [0.0003, 0.001]", extra="seeds = [0]")
    assert cli(["tune", str(spec), "--out", str(out)]) == 0
    first = {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("metrics.json")}
    assert len(first) == 2
    spec = tune_file(tmp_path / "t.toml", data_root, "lr = [0.001, 0.003]", extra="seeds = [0]")
    capsys.readouterr()
    assert cli(["tune", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "other settings (space differ)" in err and "--new-journal" in err and len(err.strip().splitlines()) == 1
    assert not (out / "earlier").exists()
    assert cli(["tune", str(spec), "--out", str(out), "--new-journal"]) == 0
    assert "earlier journal is now in" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "earlier" / "1").iterdir()) == ["locks", "optuna.journal", "tune.json",
                                                                        "tuned.toml"]
    arm = tomllib.loads((out / "tuned.toml").read_text())["arm"][0]
    assert arm["space"] == {"lr": [0.001, 0.003]} and arm["trials"] == 2
    now = {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("metrics.json")}
    assert len(now) == 3  # one new run (lr 0.003); the run at lr 0.001 was read, not repeated
    assert all(now[p] == t for p, t in first.items())
    # with nothing changed, the flag sets nothing aside
    assert cli(["tune", str(spec), "--out", str(out), "--new-journal"]) == 0
    assert sorted(p.name for p in (out / "earlier").iterdir()) == ["1"]
