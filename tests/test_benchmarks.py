"""Split-MNIST in its three scenarios, Rotated-MNIST, the optimizer baselines
of continual-learning studies (betas, moments reset at boundaries, SGD with
momentum), the distance travelled, and Holm's adjustment in the report."""
from __future__ import annotations

import math

import pytest
import torch

from experiments import config as C
from experiments.cli import main as cli
from experiments.data import build_benchmark, build_model, rotation_map
from experiments.report import holm, paired_p

from .fakedata import write_mnist


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(root, n_train=400, n_test=120)
    return root


def cfg(data_root, out, **kw) -> C.RunConfig:
    return C.RunConfig(**{**dict(benchmark="permuted_mnist", preset="smoke", data_root=str(data_root), out=str(out),
                                 progress=False, download=False, threads=1), **kw})


def run(c):
    from experiments.runner import run as run_

    return run_(c, quiet=True)


# ----------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("scenario,heads,classes", [("task", "multi", 2), ("domain", "shared", 2),
                                                     ("class", "shared", 10)])
def test_split_mnist_scenarios(data_root, tmp_path, scenario, heads, classes):
    c = C.resolve(cfg(data_root, tmp_path, benchmark="split_mnist", scenario=scenario))
    bench = build_benchmark(c)
    assert bench.n_experiences == 5 and bench.multi_head == (heads == "multi") and bench.n_classes == classes
    stream = bench.scenario.train_stream
    labels = [sorted({int(y) for _, y, *_ in exp.dataset}) for exp in stream]
    if scenario == "class":
        assert labels == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    else:  # each experience's two digits numbered 0 and 1 (domain: even or odd digit)
        assert labels == [[0, 1]] * 5
    tasks = [exp.task_label for exp in stream]
    assert tasks == ([0, 1, 2, 3, 4] if scenario == "task" else [0] * 5)
    m = run(cfg(data_root, tmp_path / "run", benchmark="split_mnist", scenario=scenario, optimizer="adam_cm"))
    assert len(m["accuracy_matrix"]) == 5 and ("task_il" in m) == (scenario == "class")
    model = build_model(c, bench)
    assert (type(model).__name__ == "MultiHeadMLP") == (scenario == "task")


def test_a_benchmark_refuses_a_scenario_it_does_not_have(data_root, tmp_path, capsys):
    assert cli(["run", "--benchmark", "permuted_mnist", "--scenario", "task", "--out", str(tmp_path / "x")]) == 2
    assert "permuted_mnist has no scenario 'task'; it takes domain" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_rotation_map_is_torchvision_rotate():
    from torchvision.transforms.functional import rotate

    image = torch.rand(1, 28, 28)
    for degrees in (0.0, 10.0, 45.0, 90.0, 190.0):
        padded = torch.cat([image.flatten(), torch.tensor([-1.0])])
        expected = rotate(image, degrees, fill=-1.0).flatten()
        assert torch.equal(padded[rotation_map(degrees)], expected), degrees


def test_rotated_mnist_rotates_each_experience_by_ten_degrees_more(data_root, tmp_path):
    from torchvision.transforms.functional import rotate

    from experiments.data import MNIST_MEAN, MNIST_STD

    c = C.resolve(cfg(data_root, tmp_path, benchmark="rotated_mnist"))
    bench = build_benchmark(c)
    first = bench.scenario.train_stream[0].dataset[0][0].view(1, 28, 28)
    third = bench.scenario.train_stream[2].dataset[0][0].view(1, 28, 28)
    background = (0.0 - MNIST_MEAN) / MNIST_STD
    assert torch.equal(third, rotate(first, 20.0, fill=background))
    assert not torch.equal(third, first)


# --------------------------------------------------------- optimizer baselines
def test_betas_reach_every_adam_family_optimizer_and_not_sgd(data_root, tmp_path):
    from strategies import make_optimizer

    for name in ("adam", "adam_cg", "adam_cm", "adam_sam", "adam_cm_sam"):
        c = C.resolve(cfg(data_root, tmp_path, optimizer=name, beta1=0.99, beta2=0.99))
        opt = make_optimizer(name, torch.nn.Linear(2, 2).parameters(), **C.optimizer_kwargs(c))
        assert opt.param_groups[0]["betas"] == (0.99, 0.99), name
    only_one = C.optimizer_kwargs(C.resolve(cfg(data_root, tmp_path, optimizer="adam", beta2=0.95)))
    assert only_one["betas"] == (0.9, 0.95)
    with pytest.raises(C.ConfigError, match="beta1 does not apply to optimizer 'sgd'"):
        C.resolve(cfg(data_root, tmp_path, optimizer="sgd", beta1=0.9))


def test_reset_moments_zeroes_plain_adam_at_each_boundary(data_root, tmp_path, monkeypatch):
    from strategies import ResetMomentsPlugin

    seen = []
    original = ResetMomentsPlugin.before_training_exp

    def spy(self, strategy, **kw):
        original(self, strategy, **kw)
        states = list(strategy.optimizer.state.values())
        seen.append((strategy.clock.train_exp_counter,
                     all(float(s["step"]) == 0 and float(s["exp_avg"].abs().sum()) == 0 for s in states) if states
                     else None))

    monkeypatch.setattr(ResetMomentsPlugin, "before_training_exp", spy)
    m = run(cfg(data_root, tmp_path / "reset", optimizer="adam", reset_moments=True))
    assert seen == [(0, None), (1, True), (2, True)] and m["policy"] == "adam+resetm"
    with pytest.raises(C.ConfigError, match="reset_moments applies to the Adam family, not 'sgd'"):
        C.resolve(cfg(data_root, tmp_path, optimizer="sgd", reset_moments=True))


def test_reset_moments_keeps_the_buffer_of_adam_cm(data_root, tmp_path):
    from strategies import reset_moments

    from cl_cm import AdamCM

    model = torch.nn.Linear(3, 2)
    opt = AdamCM(model.parameters(), buffer_size=2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    size = opt.buffer_stats(reset=False)["size"]
    assert reset_moments(opt) == 2
    assert opt.buffer_stats(reset=False)["size"] == size > 0
    assert all(float(s["step"]) == 0 and float(s["exp_avg_sq"].abs().sum()) == 0 for s in opt.state.values())


def test_sgd_with_momentum_is_an_arm(data_root, tmp_path):
    m = run(cfg(data_root, tmp_path / "sgdm", optimizer="sgd", momentum=0.9, lr=0.05))
    assert m["optimizer"] == "sgd" and len(m["accuracy_matrix"]) == 3
    assert C.run_label(C.resolve(cfg(data_root, tmp_path, optimizer="sgd", momentum=0.9))) == "sgd momentum=0.9"


# --------------------------------------------------------------- mechanism
def test_distance_travelled_is_recorded_and_adds_up(data_root, tmp_path):
    m = run(cfg(data_root, tmp_path / "dist", optimizer="adam"))
    per_exp, init = m["distance_per_experience"], m["distance_from_init"]
    assert len(per_exp) == len(init) == 3 and all(d > 0 for d in per_exp)
    assert init[0] == pytest.approx(per_exp[0])
    for k in range(1, 3):  # triangle inequality along the path
        assert init[k] <= init[k - 1] + per_exp[k] + 1e-9
    assert init[-1] < sum(per_exp)  # the path is not a straight line


def test_distance_is_measured_on_a_growing_multi_head_model(data_root, tmp_path):
    m = run(cfg(data_root, tmp_path / "mh", benchmark="split_mnist", scenario="task", optimizer="adam"))
    assert len(m["distance_per_experience"]) == 5 and all(d > 0 for d in m["distance_per_experience"])


# ----------------------------------------------------------------- statistics
def test_holm_against_hand_computed_values():
    # p sorted 0.01, 0.02, 0.04 with m = 3: 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = holm([0.01, math.nan])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])


def test_paired_p_matches_scipy():
    from scipy import stats

    diffs = [1.0, 2.0, 0.5, 1.5]
    assert paired_p(diffs) == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    assert math.isnan(paired_p([1.0]))


def test_report_says_which_differences_survive_holm(tmp_path):
    from experiments.io import write_json

    from .test_experiments import fake_run

    runs = tmp_path / "runs"
    for seed in range(4):
        fake_run(runs, "adam", "adam", seed, 0.0)
        # a clear gain, and a small one that a single test would call significant but Holm over 3 arms does not
        fake_run(runs, "adam_cm/keep", "adam_cm", seed, 0.08 + 0.002 * seed)
        fake_run(runs, "adam_cm/reset", "adam_cm", seed, [0.004, 0.009, 0.003, 0.010][seed],
                 cfg_extra={"boundary": "reset"})
        fake_run(runs, "adam_cm/decay0.5", "adam_cm", seed, [0.02, -0.03, 0.01, -0.005][seed],
                 cfg_extra={"boundary": "decay", "factor": 0.5})
    for path in runs.rglob("metrics.json"):  # distances, for the mechanism figure
        from experiments.io import read_json

        m = read_json(path)
        write_json(path, {**m, "distance_per_experience": [1.0, 2.0, 3.0], "distance_from_init": [1.0, 2.5, 4.0]})
    assert cli(["report", str(runs)]) == 0
    report = (runs / "report" / "report.md").read_text()
    lines = {line.split("`")[1]: line for line in report.splitlines() if line.startswith("- `")}
    assert "survives the Holm adjustment" in lines["adam_cm/keep"] and "higher" in lines["adam_cm/keep"]
    assert "not distinguishable" in lines["adam_cm/reset"]
    assert "unadjusted 95% interval excludes zero" in lines["adam_cm/reset"]
    assert "not distinguishable" in lines["adam_cm/decay0.5"]
    assert (runs / "report" / "figures" / "permuted_mnist-smoke-naive-distance-vs-forgetting.png").stat().st_size > 5000


def test_report_compares_task_il_accuracy_when_every_run_has_it(tmp_path):
    """Class-incremental runs also record task-IL ACC: the report gives its mean
    per arm and its paired difference to the reference, like ACC's."""
    from experiments.io import read_json, write_json

    from .test_experiments import fake_run

    runs = tmp_path / "runs"
    for seed in range(3):
        fake_run(runs, "adam", "adam", seed, 0.0)
        fake_run(runs, "adam_cm/keep", "adam_cm", seed, 0.0)
    for path in runs.rglob("metrics.json"):
        m = read_json(path)
        gain = 0.1 if m["optimizer"] == "adam_cm" else 0.0
        write_json(path, {**m, "task_il": {"acc": 0.5 + gain + 0.01 * m["seed"], "accuracy_matrix": m["accuracy_matrix"]}})
    assert cli(["report", str(runs)]) == 0
    report = (runs / "report" / "report.md").read_text()
    assert "| Δ task-IL ACC (%) |" in report
    row = next(line for line in report.splitlines() if line.startswith("| `adam_cm/keep` | `adam` |"))
    assert row.split("|")[-2].strip().startswith("+10.00 ["), row  # the last column: Δ task-IL ACC
    assert "| 51.00 ± 1.00 |" in report  # adam: 50, 51, 52 %


def test_the_reference_row_carries_the_settings_every_arm_shares(tmp_path):
    """Under EWC every label carries ewc_lambda=100; the Adam row with it is the reference."""
    from .test_experiments import fake_run

    runs = tmp_path / "runs"
    for seed in range(3):
        fake_run(runs, "adam ewc_lambda=100", "adam", seed, 0.0, strategy="ewc", cfg_extra={"ewc_lambda": 100.0})
        fake_run(runs, "adam_cm/keep ewc_lambda=100", "adam_cm", seed, 0.05 + 0.01 * seed, strategy="ewc",
                 cfg_extra={"ewc_lambda": 100.0})
    assert cli(["report", str(runs)]) == 0
    report = (runs / "report" / "report.md").read_text()
    assert "| `adam_cm/keep ewc_lambda=100` | `adam ewc_lambda=100` | 3 | +4.00 [" in report
    assert "no reference run" not in report
