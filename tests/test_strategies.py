"""The Avalanche plugin, the SAM plugin, the buffer metrics and the factories,
on Avalanche's own benchmark classes over tiny data written to disk."""
from __future__ import annotations

import math

import pytest
import torch
from avalanche.benchmarks.classic import PermutedMNIST, SplitCIFAR10, SplitMNIST
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import TensorboardLogger, TextLogger
from avalanche.models import IncrementalClassifier, MTSimpleMLP, SimpleMLP
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_cm import SAM, AdamCG, AdamCM, buffered
from strategies import (CriticalMomentaPlugin, SAMPlugin, buffer_metrics, buffered_optimizer, kappa_at,
                        make_optimizer, make_strategy)

from .fakedata import write_cifar10, write_mnist


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), n_train=240, n_test=60)


@pytest.fixture(scope="module")
def pmnist(mnist_root):
    return PermutedMNIST(n_experiences=3, seed=0, dataset_root=mnist_root)


def quiet():
    return EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])


def mlp(seed=0):
    torch.manual_seed(seed)
    return SimpleMLP(num_classes=10, input_size=784, hidden_size=32, hidden_layers=1, drop_rate=0.0)


class Snapshot(SupervisedPlugin):
    """Records the buffer at the start and end of every experience, and κ at
    every iteration, after the plugins before it have run."""

    def __init__(self):
        super().__init__()
        self.start, self.end, self.kappas = [], [], []

    @staticmethod
    def take(strategy):
        opt = buffered(strategy.optimizer)
        if opt is None:
            return None
        first = next(iter(strategy.model.parameters()))
        st = opt.state.get(first, {})
        return {"stats": opt.buffer_stats(reset=False),
                "priority": list(st.get("priority", [])),
                "rows": st["buffer"].clone() if "buffer" in st else None,
                "exp_avg": st["exp_avg"].clone() if "exp_avg" in st else None,
                "capacity": [g["buffer_size"] for g in opt.param_groups]}

    def before_training_exp(self, strategy, **kw):
        self.start.append(self.take(strategy))
        self.kappas.append([])

    def before_training_iteration(self, strategy, **kw):
        self.kappas[-1].append(strategy.optimizer.param_groups[0].get("kappa"))

    def after_training_exp(self, strategy, **kw):
        self.end.append(self.take(strategy))


def run(benchmark, plugin, optimizer="adam_cm", strategy="naive", epochs=1, model=None, opt_kwargs=None,
        train_kwargs=None, **strategy_kwargs):
    model = model or mlp()
    opt = make_optimizer(optimizer, model.parameters(), **(opt_kwargs or {}))
    check = Snapshot()
    plugins = ([plugin] if plugin else []) + [check]
    strat = make_strategy(strategy, model, opt, train_mb_size=16, train_epochs=epochs, plugins=plugins,
                          evaluator=strategy_kwargs.pop("evaluator", quiet()), **strategy_kwargs)
    for exp in benchmark.train_stream:
        strat.train(exp, **(train_kwargs or {}))
    results = strat.eval(benchmark.test_stream)
    return strat, check, results


# ------------------------------------------------------------ boundary policies
def test_keep_carries_the_buffer_over(pmnist):
    _, check, _ = run(pmnist, CriticalMomentaPlugin("keep"))
    for k in (1, 2):
        before, after = check.end[k - 1], check.start[k]
        assert before["stats"]["size"] == 5
        assert after["priority"] == before["priority"]
        assert torch.equal(after["rows"], before["rows"])


def test_reset_empties_the_buffer_at_every_boundary(pmnist):
    _, check, _ = run(pmnist, CriticalMomentaPlugin("reset"))
    for k in (1, 2):
        assert check.end[k - 1]["stats"]["size"] == 5
        assert check.start[k]["stats"]["size"] == 0 and check.start[k]["priority"] == []
    assert check.start[0]["stats"]["size"] == 0


def test_decay_scales_momenta_and_priorities(pmnist):
    _, check, _ = run(pmnist, CriticalMomentaPlugin("decay", factor=0.25))
    for k in (1, 2):
        before, after = check.end[k - 1], check.start[k]
        assert after["priority"] == pytest.approx([0.25 * q for q in before["priority"]])
        torch.testing.assert_close(after["rows"], 0.25 * before["rows"])
        assert after["stats"]["mean_priority"] == pytest.approx(0.25 * before["stats"]["mean_priority"])


def test_shrink_anneals_capacity_and_keeps_the_highest_priorities(pmnist):
    _, check, _ = run(pmnist, CriticalMomentaPlugin("shrink", factor=0.5, min_size=1))
    assert [s["capacity"][0] for s in check.start] == [5, 2, 1]
    for k in (1, 2):
        before, after = check.end[k - 1], check.start[k]
        top = sorted(before["priority"], reverse=True)[: after["capacity"][0]]
        assert sorted(after["priority"], reverse=True) == top
        assert after["rows"].shape[0] == after["capacity"][0]
        assert after["stats"]["capacity"] == after["capacity"][0]


def test_shrink_to_zero_is_adam_without_memory(pmnist):
    strat, check, _ = run(pmnist, CriticalMomentaPlugin("shrink", factor=0.5),
                          opt_kwargs=dict(buffer_size=1))
    assert [s["capacity"][0] for s in check.start] == [1, 0, 0]
    assert check.start[1]["rows"] is None and check.end[2]["stats"]["size"] == 0
    assert buffered_optimizer(strat.optimizer).buffer_nbytes() == 0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_kappa_schedule_restarts_every_experience(pmnist, schedule):
    _, check, _ = run(pmnist, CriticalMomentaPlugin(kappa_schedule=schedule, kappa_start=2.0, kappa_end=0.5))
    for kappas in check.kappas:
        n = len(kappas)
        assert n == 15  # 240 samples per experience / batch 16
        assert kappas[0] == pytest.approx(2.0) and kappas[-1] == pytest.approx(0.5)
        assert all(a >= b for a, b in zip(kappas, kappas[1:]))
        expected = [kappa_at(schedule, 2.0, 0.5, i / (n - 1)) for i in range(n)]
        assert kappas == pytest.approx(expected)
    mid = check.kappas[0][7]
    assert mid == pytest.approx(1.25)


def test_kappa_at():
    assert kappa_at("constant", 1.0, 0.0, 0.7) == 1.0
    assert kappa_at("linear", 1.0, 0.0, 0.25) == pytest.approx(0.75)
    assert kappa_at("cosine", 1.0, 0.0, 0.5) == pytest.approx(0.5)
    assert kappa_at("cosine", 1.0, 0.0, 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_constant_kappa_start_sets_every_group(pmnist):
    _, check, _ = run(pmnist, CriticalMomentaPlugin(kappa_start=0.3))
    assert all(k == 0.3 for ks in check.kappas for k in ks)


# -------------------------------------------- moments and Avalanche's own reset
def test_reset_moments_keeps_the_buffer(pmnist):
    _, check, _ = run(pmnist, CriticalMomentaPlugin("keep", reset_moments=True))
    for k in (1, 2):
        assert check.start[k]["exp_avg"].abs().sum() == 0
        assert check.end[k - 1]["exp_avg"].abs().sum() > 0
        assert torch.equal(check.start[k]["rows"], check.end[k - 1]["rows"])


def test_avalanche_reset_optimizer_state_wipes_the_buffer_before_the_plugin(pmnist):
    with pytest.warns(RuntimeWarning, match="reset_optimizer_state"):
        _, check, _ = run(pmnist, CriticalMomentaPlugin("keep"), train_kwargs=dict(reset_optimizer_state=True))
    for k in (1, 2):
        assert check.end[k - 1]["stats"]["size"] == 5
        assert check.start[k]["stats"]["size"] == 0 and check.start[k]["exp_avg"] is None


# ------------------------------------------------------------- strategies
@pytest.mark.parametrize("strategy", ["naive", "ewc", "si", "lwf", "replay", "gem", "agem"])
def test_every_strategy_runs_end_to_end_with_the_plugin(pmnist, strategy):
    extra = dict(patterns_per_exp=16) if strategy in ("gem", "agem") else {}
    if strategy == "agem":
        extra["sample_size"] = 16
    if strategy == "replay":
        extra["mem_size"] = 40
    strat, check, results = run(pmnist, CriticalMomentaPlugin("decay", factor=0.5), strategy=strategy, **extra)
    assert len(check.end) == 3 and check.end[-1]["stats"]["size"] == 5
    accs = [v for k, v in results.items() if k.startswith("Top1_Acc_Exp")]
    assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs)
    assert all(torch.isfinite(p).all() for p in strat.model.parameters())


def test_strategy_that_replaces_its_optimizer(pmnist):
    """The plugin reads strategy.optimizer afresh: a new optimizer between
    experiences is the one whose buffer it manages."""

    class Replace(SupervisedPlugin):
        def before_training_exp(self, strategy, **kw):
            if strategy.clock.train_exp_counter == 1:
                strategy.optimizer = AdamCM(strategy.model.parameters(), lr=1e-3, buffer_size=3)

    plugin = CriticalMomentaPlugin("reset")
    model = mlp()
    strat = make_strategy("naive", model, AdamCM(model.parameters()), train_mb_size=16,
                          plugins=[Replace(), plugin], evaluator=quiet())
    for exp in pmnist.train_stream:
        strat.train(exp)
    assert buffered_optimizer(strat.optimizer).param_groups[0]["buffer_size"] == 3
    assert buffered_optimizer(strat.optimizer).buffer_stats()["size"] == 3


def test_growing_incremental_classifier_gets_buffers(mnist_root):
    bench = SplitMNIST(n_experiences=3, seed=0, dataset_root=mnist_root, fixed_class_order=list(range(9)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), IncrementalClassifier(32, 2))
    strat, check, _ = run(bench, CriticalMomentaPlugin("keep"), model=model)
    opt = buffered_optimizer(strat.optimizer)
    head = model[3].classifier
    assert head.weight.shape[0] == 9
    for p in model.parameters():
        st = opt.state[p]
        assert st["buffer"].shape == (5, *p.shape)
        assert st["priority"] == opt.state[model[1].weight]["priority"]
    assert any(q is head.weight for g in opt.param_groups for q in g["params"])


def test_multihead_classifier_new_heads_get_buffers(mnist_root):
    bench = SplitMNIST(n_experiences=3, seed=0, dataset_root=mnist_root, return_task_id=True,
                       fixed_class_order=list(range(9)))

    torch.manual_seed(0)
    model = MTSimpleMLP(input_size=784, hidden_size=32)
    strat, check, _ = run(bench, CriticalMomentaPlugin("keep"), model=model)
    opt = buffered_optimizer(strat.optimizer)
    heads = list(model.classifier.classifiers.values())
    assert len(heads) == 3
    body_priority = opt.state[model.features[0].weight]["priority"]
    for head in heads:
        st = opt.state[head.classifier.weight]
        assert st["buffer"].shape[0] == 5 and st["priority"] == body_priority


# ------------------------------------------------------------------- SAM
@pytest.mark.parametrize("optimizer,strategy", [("adam_cm_sam", "naive"), ("adam_sam", "ewc"),
                                                ("adam_cm_sam", "agem")])
def test_sam_variants_train_inside_a_strategy(pmnist, optimizer, strategy):
    extra = dict(patterns_per_exp=16, sample_size=16) if strategy == "agem" else {}
    plugin = CriticalMomentaPlugin("decay", factor=0.5) if optimizer == "adam_cm_sam" else None
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    strat, check, results = run(pmnist, plugin, optimizer=optimizer, strategy=strategy, model=model, **extra)
    assert isinstance(strat.optimizer, SAM)
    assert any(isinstance(p, SAMPlugin) for p in strat.plugins)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert strat.optimizer.skipped_steps == 0
    if optimizer == "adam_cm_sam":
        assert strat.optimizer.base_optimizer.buffer_stats()["size"] == 5
    assert all(0.0 <= v <= 1.0 for k, v in results.items() if k.startswith("Top1_Acc_Exp"))


def test_sam_plugin_uses_the_gradient_at_the_perturbed_point(pmnist):
    """With SGD as base and rho > 0, one strategy iteration equals a manual SAM step."""
    model, twin = mlp(), mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    strat = make_strategy("naive", model, opt, train_mb_size=240, evaluator=quiet())
    strat.train(pmnist.train_stream[0])
    x, y = next(iter(torch.utils.data.DataLoader(pmnist.train_stream[0].dataset, batch_size=240)))[:2]
    manual = SAM(twin.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)

    def closure():
        manual.zero_grad()
        loss = nn.functional.cross_entropy(twin(x), y)
        loss.backward()
        return loss

    manual.step(closure)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_sam_without_the_plugin_says_what_to_add(pmnist):
    model = mlp()
    opt = SAM(model.parameters(), AdamCM)
    from avalanche.training.supervised import Naive
    strat = Naive(model=model, optimizer=opt, train_mb_size=16, evaluator=quiet())
    with pytest.raises(ValueError, match="SAMPlugin"):
        strat.train(pmnist.train_stream[0])


# ---------------------------------------------------------------- metrics
def test_buffer_metrics_reach_avalanche_loggers(pmnist, tmp_path):
    text = tmp_path / "log.txt"
    with open(text, "w") as f:
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), *buffer_metrics(every="epoch"),
                                     loggers=[TextLogger(f), TensorboardLogger(tmp_path / "tb")])
        strat, _, _ = run(pmnist, CriticalMomentaPlugin("keep"), evaluator=evaluator)
    log = text.read_text()
    for key in ("size", "capacity", "replacement_rate", "exploration", "cosine_similarity", "mean_priority"):
        assert f"Buffer_{key}/train_phase/train_stream/Exp002" in log
    metrics = evaluator.get_all_metrics()
    sizes = metrics["Buffer_size/train_phase/train_stream/Exp000"][1]
    assert sizes == [5.0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((tmp_path / "tb").glob("events.*")).parent))
    events.Reload()
    assert "Buffer_exploration/train_phase/train_stream/Exp001" in events.Tags()["scalars"]


def test_cosine_metric_is_high_for_cm_and_low_for_cg(pmnist):
    values = {}
    for name in ("adam_cm", "adam_cg"):
        evaluator = EvaluationPlugin(*buffer_metrics(every="iteration"), loggers=[])
        run(pmnist, CriticalMomentaPlugin("keep"), optimizer=name, evaluator=evaluator,
            opt_kwargs=dict(lr=1e-3))
        series = [v for k, (_, vs) in evaluator.get_all_metrics().items()
                  if k.startswith("Buffer_cosine_similarity") for v in vs]
        values[name] = sum(v for v in series if not math.isnan(v)) / len(series)
    assert values["adam_cm"] > values["adam_cg"] + 0.2


# ------------------------------------------------------------ bad settings
@pytest.mark.parametrize("kwargs,match", [
    (dict(boundary="forget"), "boundary"),
    (dict(boundary="decay"), "factor"),
    (dict(boundary="decay", factor=0.0), "factor"),
    (dict(boundary="decay", factor=1.5), "factor"),
    (dict(boundary="shrink", factor=-0.5), "factor"),
    (dict(boundary="keep", factor=0.5), "factor"),
    (dict(boundary="shrink", factor=0.5, min_size=-1), "min_size"),
    (dict(kappa_schedule="exponential"), "kappa_schedule"),
    (dict(kappa_schedule="linear"), "kappa_end"),
    (dict(kappa_schedule="cosine", kappa_end=-1.0), "kappa_end"),
])
def test_wrong_plugin_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CriticalMomentaPlugin(**kwargs)


def test_an_optimizer_without_a_buffer_fails_at_the_first_boundary(pmnist):
    model = mlp()
    strat = make_strategy("naive", model, torch.optim.Adam(model.parameters()), train_mb_size=16,
                          plugins=[CriticalMomentaPlugin("reset")], evaluator=quiet())
    with pytest.raises(TypeError, match="AdamCM"):
        strat.train(pmnist.train_stream[0])


def test_factory_errors_name_what_to_change():
    params = mlp().parameters()
    with pytest.raises(ValueError, match="adam_cm"):
        make_optimizer("adam_cmm", params)
    with pytest.raises(ValueError, match="buffer_size"):
        make_optimizer("adam", params, buffer_size=3)
    with pytest.raises(ValueError, match="ewc_lambda"):
        make_strategy("naive", mlp(), AdamCM(mlp().parameters()), ewc_lambda=1.0)
    with pytest.raises(ValueError, match="naive"):
        make_strategy("finetune", mlp(), AdamCM(mlp().parameters()))
    assert isinstance(make_optimizer("adam_cg", mlp().parameters()), AdamCG)
    sam = make_optimizer("adam_cm_sam", mlp().parameters(), rho=0.1, buffer_size=3)
    assert isinstance(sam.base_optimizer, AdamCM) and sam.param_groups[0]["buffer_size"] == 3


def test_split_cifar10_with_the_plugin(tmp_path, monkeypatch):
    """Avalanche's SplitCIFAR10 on pickles whose md5s differ from torchvision's list."""
    import torchvision
    root = write_cifar10(tmp_path, n_train=200, n_test=50)
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, None] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, None] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})
    bench = SplitCIFAR10(n_experiences=3, seed=0, dataset_root=root, fixed_class_order=list(range(9)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))
    _, check, results = run(bench, CriticalMomentaPlugin("shrink", factor=0.6, min_size=2), model=model)
    assert [s["capacity"][0] for s in check.start] == [5, 3, 2]
    assert len([k for k in results if k.startswith("Top1_Acc_Exp")]) == 3


def test_recommended_setup_has_the_settings_the_study_recommends():
    from cl_cm import AdamCM
    from strategies import RECIPES, CriticalMomentaPlugin, recommended

    model = torch.nn.Linear(4, 2)
    optimizer, plugin = recommended(model.parameters(), lr=1e-4)
    assert isinstance(optimizer, AdamCM) and isinstance(plugin, CriticalMomentaPlugin)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-4 and group["second_moment"] == RECIPES["recommended"]["second_moment"] == "gradient"
    assert plugin.boundary == "shrink" and plugin.factor == 0.5
    assert recommended(model.parameters(), lr=1e-3, buffer_size=3)[0].param_groups[0]["buffer_size"] == 3
    assert CriticalMomentaPlugin.recipe("recommended", min_size=2).min_size == 2
    with pytest.raises(ValueError, match="Unknown recipe"):
        CriticalMomentaPlugin.recipe("nope")


def test_the_recipe_flag_sets_the_recommended_arm_and_refuses_contradictions():
    from experiments import config as C

    cfg = C.resolve(C.RunConfig(benchmark="permuted_mnist", preset="online", recipe="recommended"))
    assert (cfg.optimizer, cfg.second_moment, cfg.boundary, cfg.factor) == ("adam_cm", "gradient", "shrink", 0.5)
    assert C.run_label(cfg) == "adam_cm/shrink0.5 second_moment=gradient"  # the study's arm, so --tuned finds it
    assert C.provenance(cfg)["second_moment"] == "recipe recommended"
    same = C.resolve(C.RunConfig(recipe="recommended", optimizer="adam_cm", factor=0.5))
    assert same.boundary == "shrink"
    with pytest.raises(C.ConfigError, match="recipe recommended sets boundary = 'shrink'.*drop one"):
        C.resolve(C.RunConfig(recipe="recommended", boundary="decay", factor=0.5))
    with pytest.raises(C.ConfigError, match="recipe recommended sets optimizer"):
        C.resolve(C.RunConfig(recipe="recommended", optimizer="sgd"))


@pytest.mark.parametrize("given", [["--boundary", "keep"], ["--second-moment", "aggregated"]])
def test_a_recipe_refuses_a_default_value_given_explicitly(given, tmp_path, capsys, monkeypatch):
    """--boundary keep is the default, but given with --recipe it is a contradiction, not "unset":
    refused on the command line and in a config file, before anything is written."""
    from experiments import config as C
    from experiments.cli import _parser
    from experiments.cli import main as cli

    args = _parser().parse_args(["run", "--recipe", "recommended", *given])
    with pytest.raises(C.ConfigError, match=f"but {given[0][2:].replace('-', '_')} = '{given[1]}' was given"):
        C.from_args(args)
    key = given[0][2:].replace("-", "_")
    with pytest.raises(C.ConfigError, match="recipe recommended sets"):
        C.from_mapping({"recipe": "recommended", key: given[1]}, "x.toml")
    monkeypatch.chdir(tmp_path)
    assert cli(["run", "--recipe", "recommended", *given, "--benchmark", "permuted_mnist", "--preset", "smoke",
                "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "drop one of them" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_the_plugin_settings_are_declared_once():
    """strategies.names.PLUGIN_SETTINGS are CriticalMomentaPlugin's arguments (recipes split on them)."""
    import inspect

    from strategies import CriticalMomentaPlugin
    from strategies.names import PLUGIN_SETTINGS

    assert tuple(inspect.signature(CriticalMomentaPlugin.__init__).parameters)[1:] == PLUGIN_SETTINGS
