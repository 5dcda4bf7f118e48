"""Hostile input and faults (docs/safety.md): every invalid setting is refused
in one line before anything is written, nothing read from a results folder
runs code, checkpoints heal after a kill or a truncation, no path is built
from data, runs that went numerically wrong say so, and reports skip what
they cannot read."""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest

from experiments import config as C
from experiments import supervised as S
from experiments.checkpoint import MAGIC, Checkpoints, CheckpointRefused
from experiments.cli import main as cli
from experiments.io import read_json, write_json



def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refused(capsys, argv: list[str], root: Path, *needles: str) -> str:
    """Run ``cl-cm argv``; it must exit with 2 and one line naming the
    problem (every needle), and leave ``root`` as it was."""
    before = listing(root)
    code = cli([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("cl-cm: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert listing(root) == before, "a refused command wrote something"
    return err


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot create files in: permission bits for a
    normal user; root writes through those, so for root the sysfs root, which
    refuses new files to everyone."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
    else:
        yield Path("/sys")


# ------------------------------------------------- every flag of cl-cm run
RUN_FIELDS = dataclasses.fields(C.RunConfig)


def _below_and_above(rule: C.Range, integer: bool) -> list:
    values = []
    if rule.low is not None:
        values.append(rule.low if rule.low_open else rule.low - (1 if integer else 0.5))
    if rule.high is not None:
        values.append(rule.high if rule.high_open else rule.high + (1 if integer else 0.5))
    return values


def invalid_flag_values(f: dataclasses.Field, tmp: Path) -> list[tuple[str, str]]:
    """(command-line value, text the error must contain) for a field of
    RunConfig: out of range, NaN, inf, the wrong type, unknown names, and for
    the text settings that name things on disk or devices, what cannot be
    used. A new flag gets its cases from its type and from config.VALID."""
    kind, rule = C._kind(f), C.VALID.get(f.name)
    if kind is bool:
        return [("maybe", "ignored explicit argument")]
    if kind is int:
        cases = [("abc", "invalid int value"), ("1.5", "invalid int value"), ("nan", "invalid int value")]
        cases += [(str(v), f"must be {rule.describe(True)}") for v in _below_and_above(rule, True)]
        if f.name == "seed":
            cases.append((str(2**64), "must be an integer in [0, 4294967295]"))
        return cases
    if kind is float:
        cases = [("abc", "invalid float value")]
        cases += [(v, f"must be {rule.describe(False)}") for v in ("nan", "inf", "-inf")]
        cases += [(repr(v), f"must be {rule.describe(False)}") for v in _below_and_above(rule, False)]
        return cases
    choices = f.metadata.get("choices") or (rule if isinstance(rule, tuple) else None)
    if choices:
        return [("nope", "invalid choice" if f.metadata.get("choices") else "choose one of")]
    (tmp / "a-file").write_text("not a folder")
    special = {
        "out": [(str(tmp / "a-file"), "is a file"), (str(tmp / "a-file" / "run"), "is a file"), ("", "empty")],
        "data_root": [(str(tmp / "a-file"), "is a file")],
        "device": [("nope", "is not a device name"), ("cuda:99", "cuda:99"), ("meta", "not available here")],
        "tuned": [(str(tmp / "no-such-tuned.toml"), "does not exist")],
        "preset": [("nope", "unknown preset 'nope'")],
        "scenario": [("nope", "has no scenario 'nope'")],
    }
    assert f.name in special, f"a new text setting {f.name!r}: give it choices, a VALID entry or a case here"
    return special[f.name]


def test_every_numeric_setting_declares_its_valid_range():
    for cls, valid in ((C.RunConfig, C.VALID), (S.SupervisedConfig, S.VALID)):
        for f in dataclasses.fields(cls):
            if C._kind(f) in (int, float):
                assert isinstance(valid.get(f.name), C.Range), f"{cls.__name__}.{f.name} has no range in VALID"


@pytest.mark.parametrize("name", [f.name for f in RUN_FIELDS])
def test_every_flag_of_run_refuses_invalid_values_in_one_line_before_writing(name, tmp_path, capsys):
    f = next(f for f in RUN_FIELDS if f.name == name)
    flag = "--" + name.replace("_", "-")
    cases = invalid_flag_values(f, tmp_path)
    assert cases
    for value, needle in cases:
        argv = ["run", "--out", tmp_path / "out", "--data-root", tmp_path / "data", f"{flag}={value}"]
        err = refused(capsys, argv, tmp_path, needle)
        assert name in err or flag in err, err


def _toml(value) -> str:
    from experiments.tuning import _toml as toml

    return toml(value)


def wrong_toml_values(f: dataclasses.Field) -> list:
    kind = C._kind(f)
    if kind is bool:
        return ["yes", 1, [True]]
    if kind in (int, float):
        values = ["0.1", True, [1]]
        return values + ([1.5] if kind is int else [math.nan, math.inf])
    return [3, True, ["a"]]


@pytest.mark.parametrize("name", [f.name for f in RUN_FIELDS])
def test_every_setting_of_a_config_file_refuses_values_of_the_wrong_type(name, tmp_path, capsys):
    f = next(f for f in RUN_FIELDS if f.name == name)
    config = tmp_path / "run.toml"
    flags = [flag for flag in (["--out", tmp_path / "out"], ["--data-root", tmp_path / "data"])
             if flag[0] != "--" + name.replace("_", "-")]  # a flag would override the file's value
    for value in wrong_toml_values(f):
        config.write_text(f"{name} = {_toml(value)}\n")
        refused(capsys, ["run", "--config", config, *sum(flags, [])], tmp_path, name)


@pytest.mark.parametrize("argv,needle", [
    (["--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    (["--optimizer", "adam_cm", "--buffer-size", "-3"], "buffer_size must be an integer >= 0, got -3"),
    (["--optimizer", "adam_cm", "--decay", "1.5"], "decay must be a finite number in [0, 1], got 1.5"),
    (["--optimizer", "adam_cm", "--boundary", "decay", "--factor", "2"], "factor must be a finite number in (0, 1]"),
    (["--optimizer", "adam_cm", "--kappa-schedule", "linear", "--kappa-end", "-1"], "kappa_end must be a finite"),
    (["--seed", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
    (["--seed", str(2**64)], f"got {2**64}"),
    (["--seed", str(10**400)], "(401 characters)"),
    (["--lr", str(10**400)], "lr must be a finite number > 0, got inf"),
    (["--threads", "-1"], "threads must be an integer >= 1"),
    (["--eval-batch-size", "0"], "eval_batch_size must be an integer >= 1"),
    (["--device", "nope"], "device 'nope' is not a device name"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--train-per-class", "-5"], "train_per_class must be an integer >= 0, got -5"),
    # combinations that the benchmark, model, optimizer and strategy refuse
    (["--optimizer", "adam_cm", "--boundary", "decay"], "boundary='decay' needs a factor"),
    (["--optimizer", "adam_cm", "--kappa-end", "0.5"], "kappa_end is only used by kappa_schedule"),
    (["--optimizer", "adam_cm", "--min-size", "2"], "min_size is only used by boundary='shrink'"),
    (["--benchmark", "split_cifar10", "--model", "mlp"], "model 'mlp' does not take split_cifar10 images"),
    (["--benchmark", "permuted_mnist", "--model", "slim_resnet18"], "does not take permuted_mnist images"),
    (["--benchmark", "split_cifar10", "--model", "mt_slim_resnet18"], "needs --scenario task"),
    (["--benchmark", "split_mnist", "--n-experiences", "3"], "use one of 1, 2, 5, 10"),
    (["--validation", "first_tasks", "--validation-tasks", "11"], "must not exceed n_experiences"),
    (["--optimizer", "adam", "--rho", "0.1"], "rho does not apply to optimizer 'adam'"),
    (["--strategy", "agem", "--sample-size", "1"], "sample_size 1: A-GEM draws"),
])
def test_the_inputs_that_used_to_end_in_a_traceback(argv, needle, tmp_path, capsys):
    refused(capsys, ["run", "--out", tmp_path / "out", "--data-root", tmp_path / "data", *argv], tmp_path, needle)


def test_numbers_beyond_the_floats_in_a_json_config_are_refused(tmp_path, capsys):
    config = tmp_path / "run.json"
    for name in ("lr", "seed", "kappa"):
        config.write_text(f'{{"{name}": 1{"0" * 400}}}')
        refused(capsys, ["run", "--config", config, "--out", tmp_path / "o"], tmp_path, f"{name} must be",
                "(401 characters)")


def test_an_out_folder_that_cannot_be_written_is_refused(tmp_path, capsys, read_only_folder):
    refused(capsys, ["run", "--out", read_only_folder / "run"], tmp_path, "cannot write in", str(read_only_folder))


def test_settings_that_only_the_data_can_refuse_leave_nothing_behind(data_root, tmp_path, capsys):
    base = ["run", "--preset", "smoke", "--data-root", data_root, "--no-download", "--no-progress", "--threads", "1"]
    refused(capsys, [*base, "--train-per-class", "100000", "--out", tmp_path / "r"], tmp_path,
            "train_per_class 100000", "use at most")
    refused(capsys, [*base, "--validation", "holdout", "--validation-fraction", "0.999", "--train-per-class", "3",
                     "--out", tmp_path / "r"], tmp_path, "validation_fraction 0.999")
    refused(capsys, [*base[:4], tmp_path / "empty", "--no-download", "--out", tmp_path / "r"], tmp_path,
            "MNIST is not in")
    refused(capsys, [*base, "--train-per-class", "100000", "--out", tmp_path / "a" / "b" / "r"], tmp_path,
            "train_per_class 100000")  # the folders made for the run are gone again, parents too
    refused(capsys, ["supervised", "--preset", "smoke", "--data-root", tmp_path / "empty", "--no-download",
                     "--out", tmp_path / "s"], tmp_path, "CIFAR-10 is not in")


@pytest.mark.parametrize("argv,needle", [
    (["run", "--data-root=a\0b"], "data_root 'a\\x00b' cannot be used as a path (it holds a NUL character)"),
    (["run", "--data-root=" + "d" * 5000], "cannot be used as a path (File name too long)"),
    (["run", "--out=" + "o" * 5000], "--out 'ooo"),
    (["run", "--out=a\0b"], "cannot be used as a path"),
    (["run", "--config=a\0b"], "config file 'a\\x00b' cannot be used as a path"),
    (["run", "--tuned=a\0b"], "tuned 'a\\x00b' cannot be used as a path"),
    (["report", "a\0b"], "the report folder 'a\\x00b' cannot be used as a path"),
    (["study", "a\0b"], "the study target 'a\\x00b' cannot be used as a path"),
    (["supervised", "--tuned", "t.toml"], "tuned applies to continual-learning runs"),
])
def test_paths_that_cannot_be_looked_up_are_refused(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, argv, tmp_path, needle)


# ------------------------------------------------------ the other commands
SWEEP = '[base]\nbenchmark = "permuted_mnist"\npreset = "smoke"\n[grid]\noptimizer = ["adam"]\nseed = [0]\n'
TUNE = ('[tune]\nseeds = [0]\n[base]\nbenchmark = "permuted_mnist"\npreset = "smoke"\n[grid]\noptimizer = ["adam"]\n'
        '[space]\nlr = [0.001]\n')
STUDY = '[study]\nname = "s"\nseeds = [0]\n' + TUNE


def _sub(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


SUBCOMMAND_CASES = [
    # cl-cm sweep FILE
    ("sweep", SWEEP, ["--jobs", "0"], "jobs (--jobs or [sweep] jobs) must be an integer >= 1, got 0"),
    ("sweep", SWEEP, ["--jobs", "-1"], "must be an integer >= 1, got -1"),
    ("sweep", SWEEP, ["--jobs", "two"], "argument --jobs: invalid int value"),
    ("sweep", '[sweep]\njobs = "2"\n' + SWEEP, [], "must be an integer >= 1, got '2'"),
    ("sweep", '[sweep]\nwhere = "x"\n' + SWEEP, [], "unknown key 'where' in [sweep]"),
    ("sweep", _sub(SWEEP, "seed = [0]", "seed = [-1]"), [], "seed must be an integer in [0, 4294967295]"),
    ("sweep", _sub(SWEEP, "seed = [0]", "lr = [nan]"), [], "lr must be a finite number > 0, got nan"),
    ("sweep", _sub(SWEEP, "seed = [0]", "seed = 0"), [], "[grid] seed must be a non-empty list"),
    ("sweep", _sub(SWEEP, 'optimizer = ["adam"]', 'optimizer = ["adam_cm"]\nboundary = ["decay:x"]'), [],
     "cannot read boundary policy 'decay:x'"),
    ("sweep", _sub(SWEEP, 'optimizer = ["adam"]', 'optimizer = ["adam_cm"]\nboundary = ["decay:1.5"]'), [],
     "factor must be a finite number in (0, 1]"),
    ("sweep", SWEEP, ["--device", "nope"], "device 'nope' is not a device name"),
    ("sweep", 'base = [1]\n' + SWEEP[SWEEP.index("[grid]"):], [], "[base] must be a table"),
    ("sweep", "this is = not toml =", [], "cannot parse"),
    # cl-cm tune FILE
    ("tune", _sub(TUNE, "lr = [0.001]", "lr = [-1.0]"), [], "[space] lr: lr must be a finite number > 0"),
    ("tune", _sub(TUNE, "lr = [0.001]", "lr = [nan]"), [], "got nan"),
    ("tune", _sub(TUNE, "lr = [0.001]", "lr = { low = -1.0, high = 1.0 }"), ["--trials", "2"],
     "[space] lr: lr must be a finite number > 0, got -1.0"),
    ("tune", _sub(TUNE, "lr = [0.001]", "lr = { low = 0.001, high = 0.1, step = -1 }"), ["--trials", "2"],
     "step must be a finite number > 0"),
    ("tune", _sub(TUNE, "seeds = [0]", "seeds = [-1]"), [], "[tune] seeds must be a non-empty list of integers"),
    ("tune", _sub(TUNE, "seeds = [0]", f"seeds = [{2**40}]"), [], "seeds must be a non-empty list"),
    ("tune", TUNE, ["--trials", "0"], "trials must be an integer >= 1, got 0"),
    ("tune", TUNE, ["--jobs", "0"], "jobs (--jobs or [tune] jobs) must be an integer >= 1, got 0"),
    ("tune", TUNE, ["--storage", "nope://x/y"], "--storage 'nope://x/y' is not a storage URL"),
    ("tune", _sub(TUNE, "[base]", "[base]\nbuffer_size = 3"), [], "buffer_size does not apply to optimizer"),
    # cl-cm study FILE
    ("study", _sub(STUDY, 'name = "s"', 'name = "../../escape"'), [], "[study] name must be a plain folder name"),
    ("study", _sub(STUDY, 'name = "s"', 'name = "a/b"'), [], "must be a plain folder name"),
    ("study", _sub(STUDY, "seeds = [0]\n[tune]", "seeds = [-1]\n[tune]"), [], "[study] seeds must be"),
    ("study", _sub(STUDY, 'name = "s"', 'name = "s"\nquick = "adam"'), ["--quick"], "quick must be a list"),
    ("study", _sub(STUDY, 'name = "s"', 'name = "s"\nbest_of = { study = "../x" }'), [],
     "best_of study must be a plain folder name"),
    ("study", _sub(STUDY, 'name = "s"', 'name = "s"\nbest_of = { study = "t", top = 0 }'), [], "top must be"),
    ("study", _sub(STUDY, 'name = "s"', 'name = "s"\nbest_of = { study = "t", space = [0.1] }'), [],
     "best_of space must be a table"),
    ("study", STUDY, ["--jobs", "0"], "--jobs must be an integer >= 1, got 0"),
    ("study", _sub(STUDY, "lr = [0.001]", "lr = [0.0]"), [], "[space] lr: lr must be a finite number > 0"),
]


@pytest.mark.parametrize("command,text,extra,needle", SUBCOMMAND_CASES)
def test_sweep_tune_and_study_refuse_bad_files_and_flags_before_writing(command, text, extra, needle, tmp_path,
                                                                         capsys):
    spec = tmp_path / f"{command}.toml"
    spec.write_text(text)
    refused(capsys, [command, spec, "--out", tmp_path / "out", *extra], tmp_path, needle)


def test_every_command_refuses_an_out_that_is_a_file_or_not_writable(tmp_path, capsys, read_only_folder,
                                                                      data_root):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for command, text in (("sweep", SWEEP), ("tune", TUNE), ("study", STUDY)):
        spec = tmp_path / f"{command}.toml"
        spec.write_text(text)
        refused(capsys, [command, spec, "--out", a_file], tmp_path, f"--out {a_file} is a file")
        refused(capsys, [command, spec, "--out", read_only_folder / "x"], tmp_path, "cannot write in")
    refused(capsys, ["toy", "--out", a_file], tmp_path, "is a file")
    refused(capsys, ["supervised", "--preset", "smoke", "--data-root", data_root, "--out", a_file], tmp_path,
            "is a file")
    (tmp_path / "runs").mkdir()
    refused(capsys, ["report", tmp_path / "runs", "--out", a_file], tmp_path, "is a file")
    refused(capsys, ["report", tmp_path / "no-such-folder"], tmp_path, "is not a folder")
    refused(capsys, ["tune", tmp_path / "tune.toml", "--out", tmp_path / "t", "--storage", tmp_path],
            tmp_path, "--storage", "is a folder")
    refused(capsys, ["study", tmp_path / "no-such-study.toml"], tmp_path, "does not exist")
    refused(capsys, ["sweep", tmp_path / "no-such-sweep.toml"], tmp_path, "does not exist")
    refused(capsys, ["sweep", tmp_path], tmp_path, "is not a file")


@pytest.mark.parametrize("argv,needle", [
    (["--lr", "-1"], "lr must be a finite number > 0"),
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--seeds", "0", "-1"], "seed must be an integer in [0, 4294967295]"),
    (["--optimizers", "adam", "adamw"], "unknown optimizer 'adamw'"),
    (["--model", "lstm"], "model 'lstm' does not take cifar10"),
    (["--task", "ptb", "--model", "resnet34"], "model 'resnet34' does not take ptb"),
    (["--dropout", "1.5"], "dropout must be a finite number in [0, 1)"),
    (["--clip", "-1"], "clip must be a finite number >= 0"),
    (["--stats-every", "0"], "stats_every must be an integer >= 1"),
    (["--sharpness-samples", "-1"], "sharpness_samples must be an integer >= 0"),
    (["--lr-schedule", "step"], "unknown lr_schedule 'step'"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--task", "imagenet"], "invalid choice: 'imagenet'"),
    (["--device", "nope"], "device 'nope' is not a device name"),
])
def test_supervised_refuses_invalid_settings(argv, needle, tmp_path, capsys):
    refused(capsys, ["supervised", "--preset", "smoke", "--data-root", tmp_path / "data", "--out", tmp_path / "o",
                     *argv], tmp_path, needle)


@pytest.mark.parametrize("argv,needle", [
    (["--starts", "0"], "--starts must be an integer >= 1, got 0"),
    (["--steps", "-1"], "--steps must be an integer >= 1"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--rho", "-1"], "--rho must be a finite number >= 0"),
    (["--rho", "inf"], "--rho must be a finite number >= 0"),
    (["--sharpness", "0.3", "0"], "--sharpness must be a finite number > 0"),
    (["--seeds", "-1"], "--seeds must be an integer in [0, 4294967295]"),
    (["--optimizers", "adamw"], "unknown optimizer (--optimizers) 'adamw'"),
    (["--landscapes", "rosenbrock"], "invalid choice: 'rosenbrock'"),
])
def test_toy_refuses_invalid_settings(argv, needle, tmp_path, capsys):
    refused(capsys, ["toy", "--out", tmp_path / "o", *argv], tmp_path, needle)


# ------------------------------------------- a failed run blocks nothing
def smoke(data_root, out, **kw) -> list[str]:
    args = ["run", "--preset", "smoke", "--data-root", data_root, "--no-download", "--no-progress", "--threads", "1",
            "--out", out]
    for k, v in kw.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return [str(a) for a in args]


def test_a_failed_run_never_blocks_its_corrected_rerun(data_root, tmp_path, capsys, monkeypatch):
    import experiments.runner as R

    out = tmp_path / "r"
    # the loss becomes non-finite: exit code 1, one line, no checkpoint kept
    assert cli(smoke(data_root, out, lr=1e30)) == 1
    err = capsys.readouterr().err
    assert "cl-cm: error: the training loss became NaN or Inf in experience 0" in err and err.count("\n") == 1
    assert not list(out.glob("checkpoint*")) and not (out / "metrics.json").exists()
    assert cli(smoke(data_root, out, lr=1e-3)) == 0
    assert "they are replaced by these" in capsys.readouterr().err
    assert read_json(out / "config.json")["config"]["lr"] == 1e-3 and (out / "metrics.json").exists()

    # a crash before the first checkpoint leaves config.json only; other settings may take the folder
    def crash(*args):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(R, "_row", crash)
    with pytest.raises(RuntimeError):
        R.run(C.RunConfig(**_cfg(data_root, tmp_path / "c", seed=1)), quiet=True)
    monkeypatch.undo()
    assert (tmp_path / "c" / "config.json").exists() and not list((tmp_path / "c").glob("checkpoint*"))
    assert R.run(C.RunConfig(**_cfg(data_root, tmp_path / "c", seed=2)), quiet=True)["seed"] == 2
    assert "(seed differ); they are replaced by these" in capsys.readouterr().err

    # a folder with a checkpoint still refuses other settings (its progress is protected)
    calls = []
    real = R._row

    def crash_in_the_second_experience(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(R, "_row", crash_in_the_second_experience)
    with pytest.raises(KeyboardInterrupt):
        R.run(C.RunConfig(**_cfg(data_root, tmp_path / "p")), quiet=True)
    monkeypatch.undo()
    assert (tmp_path / "p" / "checkpoint.pkl").exists()
    refused(capsys, smoke(data_root, tmp_path / "p", lr=0.01), tmp_path, "holds a run with other settings (lr differ)")

    # results whose config.json is gone cannot be checked against the settings: refused, never taken as done
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text('{"acc": 0.99}')
    refused(capsys, smoke(data_root, tmp_path / "d"), tmp_path, "without the config.json")


def test_a_run_made_before_a_setting_existed_is_resumed_not_refused(data_root, tmp_path, capsys):
    """A config.json written before a setting was added lacks it; the setting's
    default stands for it, and only another value counts as other settings."""
    import json

    out = tmp_path / "old"
    assert cli(smoke(data_root, out)) == 0
    capsys.readouterr()
    record = json.loads((out / "config.json").read_text())
    assert record["config"].pop("sharpness_tasks") == "seen"
    (out / "config.json").write_text(json.dumps(record))
    metrics = (out / "metrics.json").read_text()
    assert cli(smoke(data_root, out)) == 0  # finished: read, not trained again or refused
    assert (out / "metrics.json").read_text() == metrics
    assert "sharpness_tasks" not in json.loads((out / "config.json").read_text())["config"]  # left as it was
    refused(capsys, smoke(data_root, out, sharpness_tasks="learned"), tmp_path,
            "holds a run with other settings (sharpness_tasks differ)")


def test_a_lone_run_that_succeeds_removes_an_earlier_failures_note(data_root, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "error.txt").write_text("Traceback: an earlier failure")
    assert cli(smoke(data_root, out)) == 0
    assert (out / "metrics.json").exists() and not (out / "error.txt").exists()
    (out / "error.txt").write_text("Traceback: an earlier failure")  # a finished run read again: also removed
    assert cli(smoke(data_root, out)) == 0
    assert not (out / "error.txt").exists()


def _cfg(data_root, out, **kw) -> dict:
    return dict(benchmark="permuted_mnist", preset="smoke", data_root=str(data_root), out=str(out), progress=False,
                download=False, threads=1, **kw)


def test_non_finite_losses_stop_supervised_and_toy_runs(data_root, tmp_path, capsys):
    args = ["supervised", "--task", "cifar10", "--preset", "smoke", "--data-root", data_root, "--no-download",
            "--no-progress", "--threads", "1", "--sharpness-samples", "0", "--out", tmp_path / "s"]
    assert cli([str(a) for a in args] + ["--lr", "1e30"]) == 1
    assert "the training loss became NaN or Inf in epoch 1" in capsys.readouterr().err
    assert cli([str(a) for a in args] + ["--lr", "1e-3"]) == 0
    assert read_json(next((tmp_path / "s").rglob("metrics.json")))["skipped_steps"] == 0
    toy = ["toy", "--landscapes", "sharp_wide", "--optimizers", "adam", "--starts", "2", "--steps", "5",
           "--out", str(tmp_path / "t")]
    assert cli(toy + ["--lr", "1e200"]) == 1
    assert "adam on sharp_wide: the loss became NaN or Inf" in capsys.readouterr().err
    assert cli(toy) == 0


@pytest.mark.parametrize("losses,stops", [([1.0, 3e38, 3e38, 2.0], False), ([1.0, math.inf, 2.0], True),
                                          ([-math.inf], True), ([1.0, math.nan], True)])
def test_the_finite_loss_check_flags_exactly_nan_and_infinite_losses(losses, stops):
    import types

    import torch

    from strategies import FiniteLossPlugin, NonFiniteLossError

    plugin = FiniteLossPlugin()
    strategy = types.SimpleNamespace(optimizer=types.SimpleNamespace(param_groups=[{"lr": 0.1}]),
                                     clock=types.SimpleNamespace(train_exp_counter=4))
    plugin.before_training_exp(strategy)
    plugin.before_training_epoch(strategy)
    for value in losses:  # large finite losses never add up to an overflow
        strategy.loss = torch.tensor(value)
        plugin.after_training_iteration(strategy)
    if stops:
        with pytest.raises(NonFiniteLossError, match="experience 4 \\(epoch 1\\) with learning rate 0.1"):
            plugin.after_training_epoch(strategy)
    else:
        plugin.after_training_epoch(strategy)


# ------------------------------------------------------- skipped steps
def _poison_first_step():
    import experiments.runner as R

    class PoisonFirstStep(R.ProgressBars):
        """Progress bars that also make the first gradient of every experience NaN."""

        def before_training_exp(self, strategy, **kw):
            super().before_training_exp(strategy, **kw)
            self.poisoned = False

        def before_update(self, strategy, **kw):
            if not self.poisoned:
                self.poisoned = True
                next(strategy.model.parameters()).grad.fill_(float("nan"))

    return PoisonFirstStep


PoisonFirstStep = _poison_first_step()  # at module level, so that checkpoints can pickle it by reference
PoisonFirstStep.__qualname__ = "PoisonFirstStep"

def test_skipped_steps_reach_metrics_json_and_the_summary(data_root, tmp_path, capsys, monkeypatch):
    """A NaN gradient at the first step of every experience: AdamCM skips those
    steps, and the run says how many."""
    import experiments.runner as R
    from strategies import NonFiniteLossError

    clean = R.run(C.RunConfig(**_cfg(data_root, tmp_path / "clean", optimizer="adam_cm")), quiet=True)
    assert clean["skipped_steps"] == 0 and clean["skipped_steps_per_experience"] == [0, 0, 0]
    capsys.readouterr()
    monkeypatch.setattr(R, "ProgressBars", PoisonFirstStep)
    m = R.run(C.RunConfig(**_cfg(data_root, tmp_path / "nan", optimizer="adam_cm")))
    assert m["skipped_steps"] == 3 and m["skipped_steps_per_experience"] == [1, 2, 3]
    assert read_json(tmp_path / "nan" / "metrics.json")["skipped_steps"] == 3
    assert "3 optimizer step(s) skipped for NaN/Inf gradients" in capsys.readouterr().out
    # torch's Adam takes the NaN step: its parameters become NaN, the loss follows, and the run stops
    with pytest.raises(NonFiniteLossError, match="became NaN or Inf"):
        R.run(C.RunConfig(**_cfg(data_root, tmp_path / "adam", optimizer="adam")), quiet=True)


def test_a_trial_whose_loss_diverges_is_recorded_as_failed_and_the_tune_goes_on(data_root, tmp_path, capsys):
    import tomllib

    spec = tmp_path / "t.toml"
    spec.write_text(_sub(_sub(TUNE, "lr = [0.001]", "lr = [1e30, 0.001]"), "[base]",
                         f'[base]\ndata_root = "{data_root}"\ndownload = false\nthreads = 1'))
    assert cli(["tune", str(spec), "--out", str(tmp_path / "t")]) == 0
    printed = capsys.readouterr().out
    assert "failed: NonFiniteLossError: the training loss became NaN or Inf" in printed
    arm = tomllib.loads((tmp_path / "t" / "tuned.toml").read_text())["arm"][0]
    assert arm["chosen"] == {"lr": 0.001} and arm["failed_trials"] == 1 and arm["trials"] == 2


# ------------------------------------------- nothing in a folder runs code
class Plant:
    """Unpickling this creates the file ``marker``: what a planted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def planted_pickle(marker: Path) -> bytes:
    data = pickle.dumps({"strategy": Plant(marker), "exp_counter": 1})
    control = marker.with_name("control")
    pickle.loads(pickle.dumps(Plant(control)))  # the plant works: unpickling it creates a file
    assert control.exists()
    control.unlink()
    return data


@pytest.fixture(scope="module")
def interrupted(data_root, tmp_path_factory):
    """A continual-learning run (Adam+CM) killed in its third experience, with
    the checkpoints of the first two (prev and current), and the metrics of
    the same run uninterrupted."""
    import experiments.runner as R

    root = tmp_path_factory.mktemp("interrupted")
    fresh = R.run(C.RunConfig(**_cfg(data_root, root / "fresh", optimizer="adam_cm")), quiet=True)
    real, calls = R._row, []

    def crash_in_the_third_experience(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args)

    R._row = crash_in_the_third_experience
    try:
        with pytest.raises(KeyboardInterrupt):
            R.run(C.RunConfig(**_cfg(data_root, root / "cut", optimizer="adam_cm")), quiet=True)
    finally:
        R._row = real
    current, previous = root / "cut" / "checkpoint.pkl", root / "cut" / "checkpoint.prev.pkl"
    assert current.exists() and previous.exists() and current.read_bytes() != previous.read_bytes()
    return {"folder": root / "cut", "fresh": fresh, "current": current.read_bytes(),
            "previous": previous.read_bytes()}


def copy_run(interrupted, to: Path, **files: bytes | None) -> Path:
    """The interrupted run's folder at ``to``, with files replaced (None: removed)."""
    shutil.copytree(interrupted["folder"], to)
    for name, data in files.items():
        path = to / name.replace("_", ".")
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data)
    return to


@pytest.mark.parametrize("where", ["checkpoint_pkl", "checkpoint_prev_pkl"])
@pytest.mark.parametrize("header", ["plain pickle", "forged header"])
def test_a_planted_checkpoint_never_runs_and_the_user_is_told_what_to_do(interrupted, data_root, tmp_path, capsys,
                                                                        where, header):
    marker = tmp_path / "planted-code-ran"
    payload = planted_pickle(marker)
    if header == "forged header":  # the format line and a tag, without the key
        payload = MAGIC + len(payload).to_bytes(8, "big") + b"\0" * 32 + payload
    files = {where: payload}
    if where == "checkpoint_prev_pkl":
        files["checkpoint_pkl"] = None  # as a kill between the two renames of a write leaves it
    out = copy_run(interrupted, tmp_path / "run", **files)
    argv = smoke(data_root, out, optimizer="adam_cm")
    err = refused(capsys, argv, tmp_path, "was not loaded, so nothing in it ran", "Delete it to restart")
    assert where.replace("_", ".") in err
    assert not marker.exists()
    # as the message says: delete it, and the run completes as an uninterrupted one
    (out / where.replace("_", ".")).unlink()
    assert cli(argv) == 0
    assert not marker.exists()
    assert read_json(out / "metrics.json")["accuracy_matrix"] == interrupted["fresh"]["accuracy_matrix"]


def test_a_checkpoint_of_another_key_is_refused_and_the_same_key_resumes(interrupted, data_root, tmp_path, capsys,
                                                                         monkeypatch):
    out = copy_run(interrupted, tmp_path / "run")
    monkeypatch.setenv("CL_CM_CHECKPOINT_KEY", "a-key-of-another-user-0123456789")
    refused(capsys, smoke(data_root, out, optimizer="adam_cm"), tmp_path, "does not carry your key's",
            "CL_CM_CHECKPOINT_KEY")
    monkeypatch.delenv("CL_CM_CHECKPOINT_KEY")
    assert cli(smoke(data_root, out, optimizer="adam_cm")) == 0
    assert read_json(out / "metrics.json")["accuracy_matrix"] == interrupted["fresh"]["accuracy_matrix"]


def test_the_key_is_private_and_a_readable_key_is_refused(tmp_path, monkeypatch):
    from experiments.checkpoint import key_path, secret_key

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("CL_CM_CHECKPOINT_KEY", raising=False)
    key = secret_key()
    assert key_path() == tmp_path / "config" / "cl-cm" / "checkpoint.key"
    assert len(key) == 64 and key_path().stat().st_mode & 0o777 == 0o600
    assert secret_key() == key, "made once"
    key_path().chmod(0o644)
    with pytest.raises(C.ConfigError, match="can be read or written by other users.*chmod 600"):
        secret_key()
    monkeypatch.setenv("CL_CM_CHECKPOINT_KEY", "short")
    with pytest.raises(C.ConfigError, match="too short"):
        secret_key()


def test_a_planted_supervised_checkpoint_never_runs(data_root, tmp_path, capsys):
    cfg = S.SupervisedConfig(task="cifar10", preset="smoke", data_root=str(data_root), download=False,
                             progress=False, threads=1, sharpness_samples=0, out=str(tmp_path / "fresh"))
    fresh = S.run(cfg, quiet=True)
    out = tmp_path / "planted"
    out.mkdir()
    shutil.copy(tmp_path / "fresh" / "config.json", out / "config.json")
    marker = tmp_path / "planted-code-ran"
    (out / "checkpoint.pt").write_bytes(planted_pickle(marker))
    m = S.run(dataclasses.replace(cfg, out=str(out)), quiet=True)
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "checkpoint.pt cannot be read (UnpicklingError" in err and "starts again from its beginning" in err
    assert m["history"] == fresh["history"]


def test_planted_links_never_redirect_a_write(interrupted, data_root, tmp_path, capsys):
    """A received folder may hold symbolic links: a run never opens its lock
    or writes its files through one, and a report never writes through one."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    for name in (".lock", "error.txt"):
        out = copy_run(interrupted, tmp_path / f"run{name}")
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(target)
        refused(capsys, smoke(data_root, out, optimizer="adam_cm"), tmp_path, f"{name} is a symbolic link")
        assert target.read_text() == "keep me"
    runs = tmp_path / "runs"
    fake_continual(runs / "cl0", 0)
    (runs / "report").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    refused(capsys, ["report", runs], tmp_path, "report is a symbolic link")
    (runs / "report").unlink()
    figure = runs / "report" / "figures" / "permuted_mnist-smoke-naive-forgetting.png"
    figure.parent.mkdir(parents=True)
    figure.symlink_to(target)
    assert cli(["report", str(runs)]) == 0
    assert target.read_text() == "keep me" and not figure.is_symlink() and figure.stat().st_size > 1000


# ------------------------------------------------ faults heal themselves
@pytest.mark.parametrize("state", ["torn temporary file", "killed between the two renames", "truncated newest",
                                   "empty newest, no previous", "both truncated"])
def test_a_kill_or_a_truncation_at_any_moment_resumes_to_the_same_metrics(interrupted, data_root, tmp_path, capsys,
                                                                          state):
    """The files a kill can leave at each moment of a checkpoint write (or a
    truncation afterwards): the run resumes from the last complete checkpoint,
    says so, removes the debris, and ends with the uninterrupted metrics."""
    cur, prev = interrupted["current"], interrupted["previous"]
    tmp_name = ".checkpoint.pkl.999.abcd.tmp"
    files, expected = {
        "torn temporary file": ({"tmp": cur[: len(cur) // 2]}, ["removed 1 temporary file(s)"]),
        "killed between the two renames": ({"checkpoint_pkl": None, "checkpoint_prev_pkl": cur, "tmp": cur},
                                           ["removed 1 temporary file(s)"]),
        "truncated newest": ({"checkpoint_pkl": cur[:5000]}, ["is incomplete (", "resuming from the previous"]),
        "empty newest, no previous": ({"checkpoint_pkl": b"", "checkpoint_prev_pkl": None},
                                      ["is incomplete (0 bytes", "starts again from its beginning"]),
        "both truncated": ({"checkpoint_pkl": cur[:100], "checkpoint_prev_pkl": prev[: len(prev) - 1]},
                           ["starts again from its beginning"]),
    }[state]
    torn = files.pop("tmp", None)
    out = copy_run(interrupted, tmp_path / "run", **files)
    if torn is not None:
        (out / tmp_name).write_bytes(torn)
    assert cli(smoke(data_root, out, optimizer="adam_cm")) == 0
    err = capsys.readouterr().err
    for needle in expected:
        assert needle in err, (needle, err)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "metrics.json"]
    m = read_json(out / "metrics.json")
    assert m["accuracy_matrix"] == interrupted["fresh"]["accuracy_matrix"]
    assert m["buffer_stats"]["per_experience"] == interrupted["fresh"]["buffer_stats"]["per_experience"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    store = Checkpoints(tmp_path, "checkpoint.pkl")
    store.save(lambda f: f.write(b"one"))
    store.save(lambda f: f.write(b"two"))

    def full_disk(f):
        f.write(b"thr")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.save(full_disk)
    assert store.load(lambda f: f.read()) == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pkl", "checkpoint.prev.pkl"]
    (tmp_path / "checkpoint.pkl").write_bytes((tmp_path / "checkpoint.pkl").read_bytes()[:-1])
    assert store.load(lambda f: f.read()) == b"one"
    assert not (tmp_path / "checkpoint.pkl").exists(), "the incomplete one is removed"
    data = bytearray((tmp_path / "checkpoint.prev.pkl").read_bytes())
    data[-1] ^= 1  # a byte changed, not cut: refused, not passed over
    (tmp_path / "checkpoint.prev.pkl").write_bytes(bytes(data))
    with pytest.raises(CheckpointRefused):
        store.load(lambda f: f.read())


def test_a_truncated_supervised_checkpoint_resumes_from_the_previous_epoch(data_root, tmp_path, capsys,
                                                                           monkeypatch):
    cfg = S.SupervisedConfig(task="cifar10", preset="smoke", data_root=str(data_root), download=False,
                             progress=False, threads=1, sharpness_samples=0, epochs=3, out=str(tmp_path / "full"))
    full = S.run(cfg, quiet=True)
    original = S._Training.end_epoch

    def crash_after_the_second(self, epoch, record):
        original(self, epoch, record)
        if epoch == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(S._Training, "end_epoch", crash_after_the_second)
    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        S.run(cut, quiet=True)
    monkeypatch.undo()
    newest = tmp_path / "cut" / "checkpoint.pt"
    assert (tmp_path / "cut" / "checkpoint.prev.pt").exists()
    newest.write_bytes(newest.read_bytes()[:2000])
    resumed = S.run(cut, quiet=True)
    err = capsys.readouterr().err
    assert "checkpoint.pt cannot be read" in err and "resuming from the previous checkpoint" in err
    assert resumed["history"] == full["history"]


# ---------------------------------------------- no path is built from data
def test_sweep_values_with_dot_dot_stay_inside_the_output_folder(data_root, tmp_path, capsys):
    sneaky = f"{data_root}/../{data_root.name}"  # the data folder, by a path with ..
    assert Path(sneaky).resolve() == data_root.resolve()
    spec = tmp_path / "sweep.toml"
    spec.write_text(f'[base]\nbenchmark = "permuted_mnist"\npreset = "smoke"\ndownload = false\nthreads = 1\n'
                    f'[grid]\noptimizer = ["adam"]\nseed = [0]\ndata_root = ["{sneaky}", "{data_root}"]\n')
    out = tmp_path / "sweep"
    before = listing(tmp_path)
    assert cli(["sweep", str(spec), "--out", str(out)]) == 0
    created = set(listing(tmp_path)) - set(before)
    assert created and all(name.startswith("sweep") for name in created), created
    runs = list(out.rglob("metrics.json"))
    assert len(runs) == 2 and all(out.resolve() in r.resolve().parents for r in runs)


def fake_continual(folder: Path, seed: int, **cfg_extra) -> None:
    from experiments import metrics as M

    cfg = C.resolve(C.RunConfig(benchmark="permuted_mnist", preset="smoke", optimizer="adam", seed=seed)).to_dict()
    cfg.update(cfg_extra)
    r = [[0.9, 0.1, 0.1], [0.6, 0.8, 0.1], [0.5 + 0.01 * seed, 0.7, 0.9]]
    m = {"benchmark": "permuted_mnist", "scenario": "domain-incremental", "preset": cfg["preset"],
         "strategy": "naive", "optimizer": "adam", "policy": "adam", "seed": seed, "n_experiences": 3,
         "accuracy_matrix": r, **M.summary(r), "train_seconds_per_experience": [1.0] * 3, "train_seconds": 3.0}
    write_json(folder / "config.json", {"config": cfg, "protocol": "fake"})
    write_json(folder / "metrics.json", m)


def fake_supervised(folder: Path, seed: int, **cfg_extra) -> None:
    cfg = S.resolve(S.SupervisedConfig(task="cifar10", preset="smoke", seed=seed)).to_dict()
    cfg.update(cfg_extra)
    m = {"kind": "supervised", "task": "cifar10", "preset": cfg["preset"], "optimizer": "adam", "label": "adam",
         "seed": seed, "history": [{"epoch": 1, "train_loss": 2.0, "test_accuracy": 0.3}], "train_seconds": 1.0,
         "test_accuracy": 0.3, "top_hessian_eigenvalue": None}
    write_json(folder / "config.json", {"config": cfg, "protocol": "fake"})
    write_json(folder / "metrics.json", m)


def test_report_names_from_results_never_leave_the_report_folder(tmp_path, capsys):
    runs = tmp_path / "a" / "b" / "runs"
    for seed in (0, 1):
        fake_continual(runs / f"cl{seed}", seed, preset="../../../../escape-cl")
        fake_supervised(runs / f"sup{seed}", seed, preset="../../../../escape-sup")
    fake_continual(runs / "bad-benchmark", 0, benchmark="../../../../escape")
    before = listing(tmp_path)
    assert cli(["report", str(runs)]) == 0
    created = set(listing(tmp_path)) - set(before)
    assert created and all(name.startswith("a/b/runs/report") for name in created), created
    figures = [Path(name).name for name in created if name.endswith(".png")]
    assert figures and all(".." not in name and "escape" in name for name in figures), figures
    report = (runs / "report" / "report.md").read_text()
    assert "4 finished run(s)" in report and "`bad-benchmark/config.json`: unknown benchmark" in report
    assert "skipped" in capsys.readouterr().err


# --------------------------------------------- reports degrade gracefully
def test_a_report_skips_malformed_runs_with_a_warning_and_lists_them(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_continual(runs / "good0", 0)
    fake_continual(runs / "good1", 1)
    bad = {
        "truncated-metrics": ("metrics.json", '{"acc": 0.5, "accuracy_matr'),
        "binary-config": ("config.json", b"\xff\xfe\x00garbage"),
        "list-metrics": ("metrics.json", "[1, 2, 3]"),
        "config-without-config": ("config.json", '{"protocol": "x"}'),
        "wrong-type-lr": ("config.json", None),
        "no-acc": ("metrics.json", None),
        "ragged-matrix": ("metrics.json", None),
        "unknown-kind": ("metrics.json", None),
    }
    for name, (file, text) in bad.items():
        fake_continual(runs / name, 0)
        path = runs / name / file
        if isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
    edit = {"wrong-type-lr": ("config.json", lambda d: d["config"].update(lr="abc")),
            "no-acc": ("metrics.json", lambda d: d.pop("acc")),
            "ragged-matrix": ("metrics.json", lambda d: d["accuracy_matrix"][1].pop()),
            "unknown-kind": ("metrics.json", lambda d: d.update(kind="../../x"))}
    for name, (file, change) in edit.items():
        data = read_json(runs / name / file)
        change(data)
        write_json(runs / name / file, data)
    (runs / "orphan").mkdir()
    (runs / "orphan" / "metrics.json").write_text("{}")
    assert cli(["report", str(runs)]) == 0
    err = capsys.readouterr().err
    report = (runs / "report" / "report.md").read_text()
    assert "2 finished run(s)" in report and "| `adam` | 2 |" in report
    assert f"Skipped {len(bad) + 1} run(s) whose files could not be used" in report
    for name, (file, _) in bad.items():
        assert f"cl-cm: warning: skipped {runs / name / file}:" in err, name
        assert f"- `{name}/{file}`:" in report, name
    assert "`orphan/metrics.json`: no config.json beside it" in report
    assert "lr must be a finite number > 0, got 'abc'" in report and "acc must be a number" in report


def test_buffer_dtype_choices_are_names_the_optimizers_accept():
    from cl_cm.buffer import DTYPE_NAMES

    assert set(C.VALID["buffer_dtype"]) <= set(DTYPE_NAMES)


def test_workers_of_a_killed_sweep_end_with_it():
    """SIGKILL of a sweep (no chance to stop its pool): its worker processes
    notice that their parent is gone and end, instead of running on."""
    import signal
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    script = ("import time; from experiments.executors import LocalExecutor\n"
              "for _ in LocalExecutor(2).map(time.sleep, [(60,), (60,)], None): pass\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 180
        workers = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [c for c in psutil.Process(parent.pid).children() if "resource_tracker" not in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert len(workers) >= 2, "the pool never started"
        time.sleep(1.0)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"workers still running after their sweep was killed: {[p.pid for p in alive]}"
    finally:
        if parent.poll() is None:
            parent.kill()
