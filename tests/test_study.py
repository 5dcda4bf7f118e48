"""cl-cm study: tuning then reporting runs for a folder of study files, arms
chosen from another study by validation score, and the --quick subset."""
from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

from experiments.cli import main as cli
from experiments.io import read_json

from .fakedata import write_mnist

STUDY = """
[study]
name = "{name}"
seeds = [0, 1]
{extra}
[tune]
seeds = [7]
[base]
benchmark = "permuted_mnist"
preset = "smoke"
data_root = "{root}"
download = false
threads = 1
strategy = "{strategy}"
{base}
"""

NAIVE_ARMS = """
[[grid]]
optimizer = ["adam"]
[grid.space]
lr = [0.0003, 0.003]
[[grid]]
optimizer = ["adam_cm"]
boundary = ["keep", "reset"]
[grid.space]
lr = [0.0001, 0.001]
"""


def test_a_study_tunes_then_reports_and_its_quick_subset_gives_the_same_numbers(tmp_path, capsys):
    root = write_mnist(tmp_path / "data", n_train=300, n_test=100)
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "10_naive.toml").write_text(
        STUDY.format(name="naive", extra='quick = ["adam", "adam_cm/reset"]', root=root, strategy="naive", base="")
        + NAIVE_ARMS)
    (studies / "20_ewc.toml").write_text(
        STUDY.format(name="ewc", extra='best_of = { study = "naive", optimizer = ["adam_cm"], top = 1 }', root=root,
                     strategy="ewc", base="ewc_lambda = 10.0")
        + '[[grid]]\noptimizer = ["adam"]\n[grid.space]\nlr = [0.0003, 0.003]\n')
    out = tmp_path / "full"
    assert cli(["study", str(studies), "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "naive: 3 arm(s) x 2 seeds; runs: 6 tuning + 6 reporting" in printed
    assert "ewc: 1 arm(s) + top 1 of naive x 2 seeds; runs: 2+? tuning + 4 reporting" in printed  # naive not tuned yet
    assert printed.strip().splitlines()[-1] == "total: 8+? tuning + 10 reporting runs"
    assert cli(["study", str(studies), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli(["study", str(studies), "--dry-run", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "total: 10 tuning + 10 reporting runs"
    tuned = tomllib.loads((out / "tuning" / "naive" / "tuned.toml").read_text())
    best_cm = max((a for a in tuned["arm"] if "adam_cm" in a["label"]), key=lambda a: a["validation_acc"])
    ewc = tomllib.loads((out / "tuning" / "ewc" / "tuned.toml").read_text())
    labels = sorted(a["label"].split(" ", 3)[3] for a in ewc["arm"])
    policy = best_cm["settings"]["boundary"]
    assert labels == sorted(["adam ewc_lambda=10", f"adam_cm/{policy} ewc_lambda=10"])
    metrics = sorted((out / "results").rglob("metrics.json"))
    assert len(metrics) == 2 * 3 + 2 * 2 and all(read_json(m)["eval_split"] == "test" for m in metrics)
    assert (out / "results" / "report" / "report.md").exists()
    # --timings: runs on disk, wall time from the first config.json to the last metrics.json, training summed
    train = {}
    for name, start, minutes in (("naive", 1.0e9, 1.5), ("ewc", 2.0e9, 3.0)):
        folders = [out / "tuning" / name / "trials", out / "results" / name]
        for config in (c for f in folders for c in f.rglob("config.json")):
            os.utime(config, (start, start))
        metrics = sorted(m for f in folders for m in f.rglob("metrics.json"))
        for k, m in enumerate(metrics):
            os.utime(m, (start + 60 * minutes * k / (len(metrics) - 1),) * 2)
        train[name] = sum(read_json(m)["train_seconds"] for m in metrics) / 60
    assert cli(["study", str(studies), "--out", str(out), "--timings"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        f"naive: 6 trials + 6 reporting runs; wall 1.5 min, training {train['naive']:.1f} min",
        f"ewc: 4 trials + 4 reporting runs; wall 3.0 min, training {train['ewc']:.1f} min",
        f"total: 10 trials + 10 reporting runs; wall 4.5 min (0.07 h), training {sum(train.values()):.1f} min"]
    assert cli(["study", str(studies), "--out", str(tmp_path / "none"), "--timings"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"naive: no finished run in {tmp_path / 'none'}"
    broken = tmp_path / "broken" / "results" / "naive" / "run"
    broken.mkdir(parents=True)
    (broken / "metrics.json").write_text("{")
    assert cli(["study", str(studies), "--out", str(tmp_path / "broken"), "--timings"]) == 2
    assert "metrics.json cannot be read" in capsys.readouterr().err
    only = tmp_path / "only-results" / "results" / "naive" / "run"  # reporting runs without tuning trials
    shutil.copytree(next((out / "results" / "naive").rglob("metrics.json")).parent, only)
    assert cli(["study", str(studies), "--out", str(tmp_path / "only-results"), "--timings"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("naive: 0 trials + 1 reporting runs; ")
    # the quick subset: the same grids and seeds for its arms, hence the same numbers
    quick = tmp_path / "quick"
    assert cli(["study", str(studies), "--out", str(quick), "--quick"]) == 0
    got = sorted(p.relative_to(quick / "results") for p in (quick / "results").rglob("metrics.json"))
    assert [str(p).split("/")[3] for p in got] == ["adam", "adam", "adam_cm-reset", "adam_cm-reset"]
    for rel in got:
        assert read_json(quick / "results" / rel)["accuracy_matrix"] == read_json(out / "results" / rel)["accuracy_matrix"]


def test_a_study_folder_without_files_or_names_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(["study", str(tmp_path / "empty")]) == 2
    assert "holds no study files" in capsys.readouterr().err
    (tmp_path / "x.toml").write_text("[study]\nseeds = [0]\n")
    assert cli(["study", str(tmp_path / "x.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "[study] needs a name" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_an_arm_taken_from_another_benchmark_is_tuned_and_run_on_this_one(tmp_path, capsys):
    """best_of brings the arm (optimizer, settings, buffer policy) only: its trials
    and runs use this file's benchmark, over this file's space for its optimizer."""
    root = write_mnist(tmp_path / "data", n_train=300, n_test=100)
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "10_naive.toml").write_text(
        STUDY.format(name="naive", extra="", root=root, strategy="naive", base="") + NAIVE_ARMS)
    (studies / "20_split.toml").write_text(
        STUDY.format(name="split", extra='best_of = { study = "naive", optimizer = ["adam_cm"], top = 1 }', root=root,
                     strategy="naive", base="").replace('benchmark = "permuted_mnist"',
                                                        'benchmark = "split_mnist"\nscenario = "task"')
        + '[[grid]]\noptimizer = ["sgd"]\n[grid.space]\nlr = [0.01, 0.1]\n'
        + '[[grid]]\noptimizer = ["adam_cm"]\nsecond_moment = ["gradient"]\n[grid.space]\nlr = [0.0002, 0.002]\n')
    out = tmp_path / "out"
    assert cli(["study", str(studies), "--out", str(out)]) == 0
    capsys.readouterr()
    split = tomllib.loads((out / "tuning" / "split" / "tuned.toml").read_text())
    assert len(split["arm"]) == 3
    assert all(a["settings"]["benchmark"] == "split_mnist" and a["settings"]["scenario"] == "task"
               for a in split["arm"])
    taken = [a for a in split["arm"] if a["settings"]["optimizer"] == "adam_cm"
             and a["settings"].get("second_moment") != "gradient"]
    assert len(taken) == 1 and taken[0]["space"] == {"lr": [0.0002, 0.002]}  # this file's space for adam_cm
    assert sorted(p.name for p in (out / "tuning" / "split" / "trials").iterdir()) == ["split_mnist-task-smoke"]
    assert sorted(p.name for p in (out / "results" / "split").iterdir()) == ["split_mnist-task-smoke"]


def naive_tuned(out: Path, space: str) -> Path:
    """``out`` holding the tuned.toml of a study "naive" with one Adam+CM arm (``space``: its recorded space)."""
    (out / "tuning" / "naive").mkdir(parents=True)
    (out / "tuning" / "naive" / "tuned.toml").write_text(
        '[[arm]]\nlabel = "permuted_mnist smoke naive adam_cm/keep"\n'
        'settings = { benchmark = "permuted_mnist", optimizer = "adam_cm", boundary = "keep" }\n'
        f'chosen = {{ lr = 0.001 }}\nvalidation_acc = 0.5\n{space}\n')
    return out


def test_an_arm_taken_without_a_search_space_is_refused_before_anything_runs(tmp_path, capsys):
    """A best_of arm needs a space: this file's for its optimizer, or the one its tuned.toml records."""
    root = write_mnist(tmp_path / "data", n_train=60, n_test=20)
    out = naive_tuned(tmp_path / "out", space="")
    study = tmp_path / "20_ewc.toml"
    study.write_text(STUDY.format(name="ewc", extra='best_of = { study = "naive", optimizer = ["adam_cm"], top = 1 }',
                                  root=root, strategy="ewc", base="ewc_lambda = 10.0")
                     + '[[grid]]\noptimizer = ["adam"]\n[grid.space]\nlr = [0.0003, 0.003]\n')
    assert cli(["study", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no search space" in err and "optimizer 'adam_cm'" in err and len(err.strip().splitlines()) == 1
    assert not (out / "tuning" / "ewc").exists() and not (out / "results").exists()


def test_best_of_space_is_the_search_space_of_the_arms_it_takes(tmp_path):
    """``space`` in best_of overrides both this file's space and the recorded one."""
    from experiments.study import _settings, _tune_spec

    out = naive_tuned(tmp_path / "out", space="space = { lr = [0.0001, 0.001] }")
    study = tmp_path / "20_ewc.toml"
    extra = 'best_of = { study = "naive", optimizer = ["adam_cm"], top = 1, space = { lr = [0.001, 0.003, 0.01] } }'
    study.write_text(STUDY.format(name="ewc", extra=extra, root=tmp_path, strategy="ewc", base="ewc_lambda = 10.0")
                     + '[[grid]]\noptimizer = ["adam_cm"]\nboundary = ["reset"]\n[grid.space]\nlr = [0.0003]\n')
    grids = _tune_spec(_settings(study), out, quick=False, overrides=None)["grid"]
    spaces = {g["boundary"][0]: g["space"] for g in grids}
    assert spaces == {"reset": {"lr": [0.0003]}, "keep": {"lr": [0.001, 0.003, 0.01]}}


def test_a_widened_grid_retunes_with_new_journal_and_reruns_only_the_arms_whose_choice_moved(tmp_path, capsys):
    root = write_mnist(tmp_path / "data", n_train=300, n_test=100)
    study = tmp_path / "10_naive.toml"
    arms = ('[[grid]]\noptimizer = ["adam"]\n[grid.space]\nlr = {adam}\n'
            '[[grid]]\noptimizer = ["sgd"]\n[grid.space]\nlr = [1000.0, 0.01]\n')
    text = STUDY.format(name="naive", extra="", root=root, strategy="naive", base="")
    study.write_text(text + arms.format(adam="[1000.0, 0.0003]"))
    out = tmp_path / "out"
    assert cli(["study", str(study), "--out", str(out)]) == 0
    results = out / "results" / "naive"
    runs = sorted(results.rglob("config.json"))
    assert len(runs) == 4
    sgd_times = {p: p.stat().st_mtime_ns for p in runs if "sgd" in str(p)}
    study.write_text(text + arms.format(adam="[1000.0, 0.003]"))  # Adam's choice moves from 0.0003 to 0.003
    capsys.readouterr()
    assert cli(["study", str(study), "--out", str(out)]) == 2
    assert "--new-journal" in capsys.readouterr().err
    assert cli(["study", str(study), "--out", str(out), "--new-journal"]) == 0
    assert "2 reporting run(s) made at earlier tuned values moved" in capsys.readouterr().out
    lrs = {p.parent.parent.name: read_json(p)["config"]["lr"] for p in results.rglob("config.json")}
    assert lrs == {"adam": 0.003, "sgd": 0.01}
    assert {p: p.stat().st_mtime_ns for p in results.rglob("config.json") if "sgd" in str(p)} == sgd_times
    old = list((out / "tuning" / "naive" / "earlier" / "1" / "results").rglob("config.json"))
    assert len(old) == 2 and all(read_json(p)["config"]["lr"] == 0.0003 for p in old)
    assert all(p.parent.joinpath("metrics.json").exists() for p in results.rglob("config.json"))


def test_tune_seeds_replace_each_files_tuning_seeds_and_finished_trials_are_reused(tmp_path, capsys):
    root = write_mnist(tmp_path / "data", n_train=300, n_test=100)
    study = tmp_path / "10_naive.toml"
    study.write_text(STUDY.format(name="naive", extra="", root=root, strategy="naive", base="")
                     + '[[grid]]\noptimizer = ["adam"]\n[grid.space]\nlr = [0.0003, 0.003]\n')
    out = tmp_path / "out"
    assert cli(["study", str(study), "--out", str(out)]) == 0
    trials = out / "tuning" / "naive" / "trials"
    first = {p: p.stat().st_mtime_ns for p in trials.rglob("metrics.json")}
    assert len(first) == 2 and {p.parent.name for p in first} == {"seed7"}
    capsys.readouterr()
    assert cli(["study", str(study), "--out", str(out), "--dry-run", "--tune-seeds", "7", "8"]) == 0
    assert "runs: 4 tuning + 2 reporting" in capsys.readouterr().out
    assert cli(["study", str(study), "--out", str(out), "--tune-seeds", "7", "8"]) == 2
    assert "--new-journal" in capsys.readouterr().err
    assert cli(["study", str(study), "--out", str(out), "--tune-seeds", "7", "8", "--new-journal"]) == 0
    now = {p: p.stat().st_mtime_ns for p in trials.rglob("metrics.json")}
    assert len(now) == 4 and {p.parent.name for p in now} == {"seed7", "seed8"}
    assert all(now[p] == t for p, t in first.items())  # the seed-7 trials are read, not run again
    tuned = tomllib.loads((out / "tuning" / "naive" / "tuned.toml").read_text())
    assert tuned["tune"]["seeds"] == [7, 8] and len(tuned["arm"][0]["validation_acc_per_seed"]) == 2
    capsys.readouterr()
    assert cli(["study", str(study), "--out", str(tmp_path / "o2"), "--tune-seeds", "-1"]) == 2
    assert "--tune-seeds must be a non-empty list of integers" in capsys.readouterr().err and not (tmp_path / "o2").exists()
