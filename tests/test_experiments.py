"""The continual-learning experiments: metrics, loaders, runs, resumption,
sweeps, errors and the report, on tiny data in torchvision's formats."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import config as C
from experiments import metrics as M
from experiments.cli import main as cli
from experiments.io import read_json, write_json

from .fakedata import write_cifar10, write_cifar100, write_mnist

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------- metrics
R3 = [[0.9, 0.1, 0.2],
      [0.6, 0.8, 0.1],
      [0.5, 0.7, 0.95]]


def test_metrics_against_hand_computed_values():
    assert M.average_accuracy(R3) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert M.backward_transfer(R3) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert M.forgetting(R3) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert M.learning_accuracy(R3) == pytest.approx((0.9 + 0.8 + 0.95) / 3)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_diagonal():
    r = [[0.5, 0.0, 0.0],
         [0.9, 0.6, 0.0],   # task 0 improves after training task 1 (positive transfer)
         [0.4, 0.6, 0.7]]
    assert M.forgetting(r) == pytest.approx(((0.9 - 0.4) + (0.6 - 0.6)) / 2)
    assert M.backward_transfer(r) == pytest.approx(((0.4 - 0.5) + (0.6 - 0.6)) / 2)


def test_metrics_edge_cases():
    one = [[0.7]]
    assert M.average_accuracy(one) == 0.7 and M.learning_accuracy(one) == 0.7
    assert math.isnan(M.backward_transfer(one)) and math.isnan(M.forgetting(one))
    with pytest.raises(ValueError, match="T×T"):
        M.average_accuracy([[0.1, 0.2]])
    perfect = [[1.0, 0.0], [1.0, 1.0]]
    assert M.summary(perfect) == {"acc": 1.0, "bwt": 0.0, "forgetting": 0.0, "learning_accuracy": 1.0}


# ------------------------------------------------------------- data and runs
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(root, n_train=400, n_test=120)
    write_cifar10(root, n_train=250, n_test=120)
    write_cifar100(root, n_train=1100, n_test=600)
    return root


def smoke(data_root, out, **kw) -> C.RunConfig:
    base = dict(benchmark="permuted_mnist", preset="smoke", data_root=str(data_root), out=str(out),
                progress=False, download=False, threads=1)
    return C.RunConfig(**{**base, **kw})


def run(cfg):
    from experiments.runner import run as run_

    return run_(cfg, quiet=True)


@pytest.mark.parametrize("strategy", ["ewc", "si", "lwf", "replay", "gem", "agem"])
def test_a_run_crashed_after_a_checkpoint_resumes_like_an_uninterrupted_one(data_root, tmp_path, monkeypatch,
                                                                              strategy):
    """Every strategy's state survives the checkpoint after an experience
    (A-GEM's memory iterator, a generator, is set aside and recreated): a run
    that crashes in its second experience resumes from the first one's
    checkpoint and ends with the metrics of an uninterrupted run."""
    import experiments.runner as R

    fresh = run(smoke(data_root, tmp_path / "fresh", strategy=strategy, optimizer="adam_cm"))
    calls = []
    real_row = R._row

    def crash_in_the_second_experience(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_row(*args)

    monkeypatch.setattr(R, "_row", crash_in_the_second_experience)
    with pytest.raises(KeyboardInterrupt):
        run(smoke(data_root, tmp_path / "resumed", strategy=strategy, optimizer="adam_cm"))
    assert (tmp_path / "resumed" / "checkpoint.pkl").exists()
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    monkeypatch.setattr(R, "_row", real_row)
    resumed = run(smoke(data_root, tmp_path / "resumed", strategy=strategy, optimizer="adam_cm"))
    assert resumed["accuracy_matrix"] == fresh["accuracy_matrix"]
    assert resumed["buffer_stats"]["per_experience"] == fresh["buffer_stats"]["per_experience"]


@pytest.mark.parametrize("benchmark,optimizer", [("permuted_mnist", "adam_cm"), ("split_cifar10", "adam_cm"),
                                                 ("split_cifar100", "adam_cm_sam")])
def test_smoke_run_of_every_benchmark_through_the_real_loaders(data_root, tmp_path, benchmark, optimizer):
    cfg = smoke(data_root, tmp_path / "run", benchmark=benchmark, optimizer=optimizer, boundary="decay",
                factor=0.5)
    metrics = run(cfg)
    t = C.resolve(cfg).n_experiences
    assert t >= 3
    r = metrics["accuracy_matrix"]
    assert len(r) == t and all(len(row) == t and all(0 <= v <= 1 for v in row) for row in r)
    assert metrics["acc"] == pytest.approx(sum(r[-1]) / t)
    assert len(metrics["train_seconds_per_experience"]) == t
    assert metrics["buffer_stats"]["per_experience"]["size"][-1] == 5
    saved = read_json(tmp_path / "run" / "config.json")
    assert saved["config"]["seed"] == 0 and saved["config"]["n_experiences"] == t
    assert saved["environment"]["packages"]["torch"] and "git_commit" in saved["environment"]
    assert saved["environment"]["torch_threads"] == 1 and saved["environment"]["world_size"] == 1
    assert not (tmp_path / "run" / "checkpoint.pkl").exists()
    if benchmark == "split_cifar10":
        assert len(metrics["task_il"]["accuracy_matrix"]) == t
        # with 2 classes per experience, task-IL accuracy cannot be below class-IL accuracy
        assert metrics["task_il"]["acc"] >= metrics["acc"]
    if benchmark == "split_cifar100":
        assert metrics["scenario"].startswith("task-incremental")


def test_same_seed_gives_identical_metrics(data_root, tmp_path):
    a = run(smoke(data_root, tmp_path / "a", optimizer="adam_cm", seed=3))
    b = run(smoke(data_root, tmp_path / "b", optimizer="adam_cm", seed=3))
    c = run(smoke(data_root, tmp_path / "c", optimizer="adam_cm", seed=4))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["buffer_stats"]["series"] == b["buffer_stats"]["series"]
    assert a["accuracy_matrix"] != c["accuracy_matrix"]


def test_sharpness_matrix_is_recorded(data_root, tmp_path):
    metrics = run(smoke(data_root, tmp_path / "s", optimizer="adam_cm", sharpness=True, sharpness_samples=32))
    s = metrics["sharpness_matrix"]
    assert len(s) == 3
    for k, row in enumerate(s):
        assert all(v is not None and v > 0 for v in row[: k + 1]) and all(v is None for v in row[k + 1:])

    learned = run(smoke(data_root, tmp_path / "d", optimizer="adam_cm", sharpness=True, sharpness_samples=32,
                        sharpness_tasks="learned"))["sharpness_matrix"]
    for k, row in enumerate(learned):  # the diagonal only, equal to the full matrix's
        assert row[k] == pytest.approx(s[k][k]) and all(v is None for i, v in enumerate(row) if i != k)
    # measuring never changes training: the same accuracies as a run without it
    plain = run(smoke(data_root, tmp_path / "p", optimizer="adam_cm"))
    assert plain["accuracy_matrix"] == metrics["accuracy_matrix"]


def test_finished_run_is_not_rerun_and_other_settings_are_refused(data_root, tmp_path):
    cfg = smoke(data_root, tmp_path / "r")
    first = run(cfg)
    stamp = (tmp_path / "r" / "metrics.json").stat().st_mtime_ns
    assert run(cfg) == first
    assert (tmp_path / "r" / "metrics.json").stat().st_mtime_ns == stamp
    with pytest.raises(C.ConfigError, match="other settings.*seed"):
        run(cfg.replace(seed=5))


# ------------------------------------------------------- sweep and resume
SWEEP = """
[base]
benchmark = "permuted_mnist"
preset = "smoke"
strategy = "naive"
data_root = "{root}"
download = false
threads = 1

[grid]
optimizer = ["adam", "adam_cm"]
boundary = ["keep", "decay:0.5"]
seed = [0, 1]
"""


def test_sweep_expands_the_grid_once_per_policy(tmp_path, data_root):
    from experiments.sweep import expand

    spec = C.tomllib.loads(SWEEP.format(root=data_root))
    cells = expand(spec, tmp_path)
    labels = sorted({(c.optimizer, c.boundary, c.factor) for c in cells})
    assert labels == [("adam", "keep", None), ("adam_cm", "decay", 0.5), ("adam_cm", "keep", None)]
    assert len(cells) == 6
    assert cells[0].out.startswith(str(tmp_path / "permuted_mnist-smoke" / "naive"))


def test_killed_sweep_resumes_with_the_same_metrics(tmp_path, data_root):
    """Kill a sweep (SIGKILL) once the first experience of a run is
    checkpointed, rerun it, and compare with an uninterrupted run."""
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(SWEEP.format(root=data_root).replace('["adam", "adam_cm"]', '["adam_cm"]')
                          .replace('["keep", "decay:0.5"]', '["decay:0.5"]').replace("[0, 1]", "[7]"))
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "sweep", str(sweep_file), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    checkpoint = None
    while time.time() < deadline and proc.poll() is None:
        found = list(out.rglob("checkpoint.pkl"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.05)
    assert checkpoint is not None, f"no checkpoint appeared; stderr: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = checkpoint.parent
    assert not (run_dir / "metrics.json").exists(), "the kill came too late to test resumption"
    assert cli(["sweep", str(sweep_file), "--out", str(out)]) == 0
    resumed = read_json(run_dir / "metrics.json")
    fresh = run(smoke(data_root, tmp_path / "fresh", optimizer="adam_cm", boundary="decay", factor=0.5, seed=7))
    assert resumed["accuracy_matrix"] == fresh["accuracy_matrix"]
    assert resumed["buffer_stats"]["per_experience"] == fresh["buffer_stats"]["per_experience"]
    assert len(resumed["train_seconds_per_experience"]) == 3


def test_sweep_in_parallel_processes_and_skips_done_cells(tmp_path, data_root, capsys):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(SWEEP.format(root=data_root).replace('["keep", "decay:0.5"]', '["keep"]')
                          .replace("[0, 1]", "[0]"))
    out = tmp_path / "par"
    assert cli(["sweep", str(sweep_file), "--out", str(out), "--jobs", "2"]) == 0
    assert len(list(out.rglob("metrics.json"))) == 2
    assert cli(["sweep", str(sweep_file), "--out", str(out), "--report"]) == 0
    printed = capsys.readouterr().out
    assert "2 done before" in printed and "report.md" in printed


# ------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("argv,message", [
    (["--benchmark", "split_fashion"], "invalid choice"),
    (["--optimizer", "adamw"], "invalid choice"),
])
def test_unknown_names_on_the_command_line(argv, message, capsys):
    assert cli(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("cl-cm: error:") and err.count("\n") == 1


def test_unknown_names_in_a_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('benchmark = "permuted_mnist"\noptimizer = "adam_cmm"\n')
    assert cli(["run", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "unknown optimizer 'adam_cmm' (did you mean 'adam_cm'?)" in capsys.readouterr().err
    typo = tmp_path / "typo.toml"
    typo.write_text('benchmark = "permuted_mnist"\noptimzer = "adam"\n')
    assert cli(["run", "--config", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optimzer'" in err and "did you mean 'optimizer'" in err


def test_config_file_typo_message(tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text('benchmark = "permuted_mnist"\noptimzer = "adam"\n')
    with pytest.raises(C.ConfigError, match="unknown key 'optimzer'.*did you mean 'optimizer'"):
        C.from_mapping(C.load_file(typo), str(typo))
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[base]\nbenchmark = "permuted_mnist"\n[grid]\nseeds = [0, 1]\n')
    from experiments.sweep import expand
    with pytest.raises(C.ConfigError, match="unknown key 'seeds'.*did you mean 'seed'"):
        expand(C.load_file(sweep), tmp_path)


def test_settings_that_do_not_apply_are_refused():
    with pytest.raises(C.ConfigError, match="rho does not apply to optimizer 'adam_cm'"):
        C.resolve(C.RunConfig(optimizer="adam_cm", rho=0.1))
    with pytest.raises(C.ConfigError, match="boundary.*only apply to optimizers with a buffer"):
        C.resolve(C.RunConfig(optimizer="adam", boundary="decay", factor=0.5))
    with pytest.raises(C.ConfigError, match="ewc_lambda does not apply to strategy 'naive'"):
        C.resolve(C.RunConfig(strategy="naive", ewc_lambda=2.0))
    with pytest.raises(C.ConfigError, match="unknown preset 'gpu'"):
        C.resolve(C.RunConfig(preset="gpu"))


@pytest.mark.parametrize("benchmark,files", [("permuted_mnist", "train-images-idx3-ubyte"),
                                             ("split_cifar10", "data_batch_1"),
                                             ("split_cifar100", "meta")])
def test_data_root_without_the_data_gives_one_clear_error(tmp_path, capsys, benchmark, files):
    code = cli(["run", "--benchmark", benchmark, "--preset", "smoke", "--data-root", str(tmp_path / "empty"),
                "--no-download", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("cl-cm: error:") and "Traceback" not in err
    assert files in err and str(tmp_path / "empty") in err


def test_flags_override_the_config_file(tmp_path, data_root):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(f'benchmark = "permuted_mnist"\npreset = "smoke"\nseed = 1\noptimizer = "adam_cm"\n'
                        f'data_root = "{data_root}"\ndownload = false\nprogress = false\n')
    out = tmp_path / "run"
    assert cli(["run", "--config", str(cfg_file), "--seed", "2", "--out", str(out)]) == 0
    saved = read_json(out / "config.json")["config"]
    assert saved["seed"] == 2 and saved["optimizer"] == "adam_cm" and saved["epochs"] == 1


# ------------------------------------------------------------------ report
def fake_run(folder: Path, policy: str, optimizer: str, seed: int, shift: float, strategy="naive",
             cfg_extra=None):
    cfg = C.resolve(C.RunConfig(benchmark="permuted_mnist", preset="smoke", strategy=strategy,
                                optimizer=optimizer, seed=seed, **(cfg_extra or {}))).to_dict()
    r = [[min(1.0, 0.8 + shift), 0.1, 0.1], [0.5 + shift, 0.8, 0.1], [0.4 + shift, 0.6 + shift, 0.85]]
    m = {"benchmark": "permuted_mnist", "scenario": "domain-incremental", "preset": "smoke", "strategy": strategy,
         "optimizer": optimizer, "policy": policy, "seed": seed, "n_experiences": 3, "accuracy_matrix": r,
         **M.summary(r), "train_seconds_per_experience": [1.0, 1.0, 1.0], "train_seconds": 3.0,
         "sharpness_matrix": [[10.0 + shift, None, None], [12.0, 9.0, None], [15.0, 11.0, 8.0]]}
    if optimizer != "adam":
        m["buffer_stats"] = {"per_experience": {"size": [5, 5, 5], "exploration": [0.5, 0.6, 0.7 + shift],
                                                "cosine_similarity": [0.8, 0.8, 0.9]}}
    run_dir = folder / policy.replace("/", "-") / f"seed{seed}"
    write_json(run_dir / "config.json", {"config": cfg, "protocol": "fake"})
    write_json(run_dir / "metrics.json", m)


def test_report_renders_from_a_folder_of_fake_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(3):
        fake_run(runs, "adam", "adam", seed, 0.0)
        fake_run(runs, "adam_cm/keep", "adam_cm", seed, 0.05 + 0.01 * seed)
    (runs / "unfinished" / "seed0").mkdir(parents=True)
    (runs / "unfinished" / "seed0" / "config.json").write_text("{}")
    assert cli(["report", str(runs)]) == 0
    report = (runs / "report" / "report.md").read_text()
    assert str(runs / "report" / "report.md") in capsys.readouterr().out
    assert "6 finished run(s)" in report
    assert "| `adam` | 3 |" in report and "| `adam_cm/keep` | 3 |" in report
    # paired difference in ACC: shift 0.05..0.07 on two of three entries of the last row
    assert "+4.00 [" in report and "higher than `adam`'s; survives the Holm adjustment" in report
    for name in ("accuracy-matrix", "task-curves", "forgetting", "acc-vs-forgetting", "buffer-stats",
                 "sharpness-vs-forgetting"):
        png = runs / "report" / "figures" / f"permuted_mnist-smoke-naive-{name}.png"
        assert png.exists() and png.stat().st_size > 5000, name
        assert f"figures/permuted_mnist-smoke-naive-{name}.png" in report
    assert "No published anchor has exactly this protocol" in report


def test_report_shows_an_anchor_only_for_its_protocol(tmp_path):
    from experiments.report import matching_anchors

    stable = C.resolve(C.RunConfig(benchmark="permuted_mnist", preset="paper_20", optimizer="sgd", lr=0.01,
                                   momentum=0.8, reset_optimizer_state=True)).to_dict()
    assert [a["name"] for a in matching_anchors(stable)] == ["Stable-SGD paper, Naive SGD"]
    assert matching_anchors({**stable, "momentum": 0.9}) == []
    assert matching_anchors({**stable, "reset_optimizer_state": False}) == []
    der = C.resolve(C.RunConfig(benchmark="split_cifar10", preset="paper", optimizer="sgd", lr=0.1)).to_dict()
    assert [a["name"] for a in matching_anchors(der)] == ["DER paper, SGD (fine-tuning)"]
    reduced = C.resolve(C.RunConfig(benchmark="split_cifar10", preset="paper_reduced", optimizer="sgd",
                                    lr=0.1)).to_dict()
    assert matching_anchors(reduced) == []
    tag = C.resolve(C.RunConfig(benchmark="split_cifar100", preset="paper", optimizer="adam", lr=0.005)).to_dict()
    assert [a["name"] for a in matching_anchors(tag)] == ["TAG paper, Naive Adam"]


def test_atomic_json_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"a": 1, "nan": float("nan")})
    assert read_json(target) == {"a": 1, "nan": None}

    class Boom:
        pass

    with pytest.raises(TypeError):
        write_json(target, {"a": Boom()})
    assert read_json(target) == {"a": 1, "nan": None}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
