"""What makes continual-learning runs fast must not change them: gathered
batches equal Avalanche's sample-by-sample ones, the selective evaluation
plugin records what Avalanche's records, and the runner agrees with a plain
PyTorch loop doing the same work (experiments.bench_run), on tiny data."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from experiments import bench_run
from experiments import config as C



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared machine: one thread (as the runner's --threads 1) is far faster."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def smoke(data_root, benchmark, **kw) -> C.RunConfig:
    return C.resolve(C.RunConfig(benchmark=benchmark, preset="smoke", data_root=str(data_root), download=False,
                                 progress=False, threads=1, **kw))


# ----------------------------------------------------------- gathered batches
def _batches(loader, seed: int):
    torch.manual_seed(seed)
    batches = [[t.clone() for t in batch] for batch in loader]
    return batches, torch.get_rng_state()


def _assert_same_batches(avalanche_loader, seed=0):
    from strategies.batched_loading import GatheringLoader

    gathered = GatheringLoader(avalanche_loader)
    expected, rng_expected = _batches(avalanche_loader, seed)
    got, rng_got = _batches(gathered, seed)
    assert len(got) == len(expected) == len(gathered) > 0
    for b_exp, b_got in zip(expected, got):
        assert len(b_exp) == len(b_got)
        for t_exp, t_got in zip(b_exp, b_got):
            assert t_exp.dtype == t_got.dtype and torch.equal(t_exp, t_got)
    assert torch.equal(rng_expected, rng_got), "the gathered loader drew other random numbers"


LOADER_ARGS = dict(num_workers=0, pin_memory=False, persistent_workers=False)


@pytest.mark.parametrize("benchmark,augment", [("permuted_mnist", False), ("split_cifar10", True),
                                               ("split_cifar10", False)])
def test_gathered_batches_equal_avalanches_sample_by_sample_batches(data_root, benchmark, augment):
    """Training (shuffled, task-balanced, with random crops and flips) and
    evaluation loaders: the same tensors and the same random stream. The
    fourth Permuted-MNIST experience lists its classes in a non-sorted order."""
    from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader, TaskBalancedDataLoader

    from experiments.data import build_benchmark

    cfg = smoke(data_root, benchmark, augment=augment, n_experiences=4 if benchmark == "permuted_mnist" else 5)
    scenario = build_benchmark(cfg).scenario
    for k in (0, 3):
        train = scenario.train_stream[k].dataset.train()
        _assert_same_batches(TaskBalancedDataLoader(train, oversample_small_groups=True, batch_size=7, shuffle=True,
                                                    drop_last=False, **LOADER_ARGS), seed=k)
        test = scenario.test_stream[k].dataset.eval()
        _assert_same_batches(SingleDatasetDataLoader(test, batch_size=16, shuffle=False, **LOADER_ARGS))


def test_gathered_replay_batches_mix_experiences_like_avalanche(data_root):
    """A replay loader: the current experience plus a memory drawn from two
    other experiences (three leaf data sets, other permutations)."""
    from avalanche.benchmarks.utils import concat_datasets
    from avalanche.benchmarks.utils.data_loader import ReplayDataLoader

    from experiments.data import build_benchmark

    scenario = build_benchmark(smoke(data_root, "permuted_mnist")).scenario
    memory = concat_datasets([scenario.train_stream[0].dataset.train().subset(range(0, 60, 3)),
                              scenario.train_stream[1].dataset.train().subset(range(5, 80, 5))])
    loader = ReplayDataLoader(scenario.train_stream[2].dataset.train(), memory, oversample_small_tasks=True,
                              batch_size=10, batch_size_mem=6, shuffle=True, drop_last=False, **LOADER_ARGS)
    _assert_same_batches(loader, seed=3)


def test_a_loader_that_cannot_be_gathered_is_left_to_avalanche(data_root):
    from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader

    from experiments.data import build_benchmark
    from strategies.batched_loading import GatheringLoader, NotGatherable, gathering_loader

    scenario = build_benchmark(smoke(data_root, "permuted_mnist")).scenario
    flipped = scenario.test_stream[0].dataset.eval().replace_current_transform_group(lambda x: -x)
    loader = SingleDatasetDataLoader(flipped, batch_size=16, shuffle=False, **LOADER_ARGS)
    with pytest.raises(NotGatherable, match="input transform"):
        GatheringLoader(loader)
    assert gathering_loader(loader) is loader
    plain = torch.utils.data.DataLoader(scenario.test_stream[0].dataset, batch_size=16)
    assert gathering_loader(plain) is plain


def test_image_dataset_gather_equals_its_items(data_root):
    from experiments.data import build_benchmark

    scenario = build_benchmark(smoke(data_root, "split_cifar10", augment=True)).scenario
    leaf = scenario.train_stream[0].dataset._flat_data
    while hasattr(leaf, "_datasets"):
        leaf = leaf._datasets[0]
    idx = torch.tensor([5, 0, 17, 5, 42])
    torch.manual_seed(1)
    items = [leaf[i] for i in idx.tolist()]
    torch.manual_seed(1)
    x, y = leaf.gather(idx)
    assert torch.equal(x, torch.stack([i[0] for i in items])) and y.tolist() == [i[1] for i in items]
    assert not torch.equal(x[0], x[3]), "random crops and flips should differ between draws"


# ------------------------------------------------------ selective evaluation
def test_selective_evaluation_records_what_avalanches_evaluation_plugin_records(data_root, tmp_path):
    """The same run (a smoke Permuted-MNIST with Adam+CM) with Avalanche's
    EvaluationPlugin and with SelectiveEvaluationPlugin, each with metrics
    of every phase and granularity: the same values at the same steps."""
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin

    from experiments.data import build_benchmark, build_model
    from strategies import BufferStatsMetric, SelectiveEvaluationPlugin, make_optimizer, make_strategy

    cfg = smoke(data_root, "permuted_mnist", optimizer="adam_cm")

    def run(evaluator_class):
        RNGManager.set_random_seeds(0)
        bench = build_benchmark(cfg)
        model = build_model(cfg, bench)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            evaluator = evaluator_class(accuracy_metrics(minibatch=True, epoch=True, experience=True, stream=True),
                                        loss_metrics(epoch=True, experience=True),
                                        BufferStatsMetric(every="iteration"), loggers=[])
        strategy = make_strategy("naive", model, make_optimizer("adam_cm", model.parameters()),
                                 train_mb_size=16, eval_mb_size=64, evaluator=evaluator)
        for k in range(2):
            strategy.train(bench.scenario.train_stream[k], eval_streams=[])
            strategy.eval(bench.scenario.test_stream)
        return evaluator, {k: v for k, v in evaluator.get_all_metrics().items() if "Time" not in k}

    selective, got = run(SelectiveEvaluationPlugin)
    _, expected = run(EvaluationPlugin)
    assert got == expected and any(k.startswith("Buffer_size") for k in got) and any("Top1_Acc_MB" in k for k in got)
    assert hasattr(selective, "after_training_iteration")  # minibatch accuracy and buffer statistics need it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        eval_only = SelectiveEvaluationPlugin(accuracy_metrics(experience=True), BufferStatsMetric(every="epoch"))
    assert not hasattr(eval_only, "after_training_iteration") and not hasattr(eval_only, "before_forward")
    assert hasattr(eval_only, "after_eval_iteration") and hasattr(eval_only, "after_training_epoch")


# --------------------------------------------------------------- bench_run
def test_runner_and_plain_loop_agree_exactly_in_float64(data_root):
    """bench_run's check on tiny data: four Permuted-MNIST experiences (the
    fourth lists its classes out of order) and Split-CIFAR-10 in two
    experiences with random crops and flips, each with Adam+CM."""
    pm = dataclasses.replace(smoke(data_root, "permuted_mnist", optimizer="adam_cm"), n_experiences=4)
    cifar = smoke(data_root, "split_cifar10", optimizer="adam_cm", augment=True, n_experiences=2)
    for cfg in (pm, cifar):
        case = bench_run.compare(cfg, repeats=1, dtype=torch.float64)
        assert case["accuracy_difference"] == 0.0 and case["dtype"] == "float64"
        assert len(case["accuracy_matrix"]) == cfg.n_experiences
        assert all(case[f"{side}_train_seconds"][0] > 0 for side in ("runner", "plain"))
    assert torch.get_default_dtype() == torch.float32


def test_bench_run_detects_a_plain_loop_that_draws_other_batches(data_root, monkeypatch):
    monkeypatch.setattr(bench_run, "_draw_loader_seed", lambda: 12345)  # a fixed shuffle: other batches
    with pytest.raises(AssertionError, match="accuracy matrices differ"):
        bench_run.compare(smoke(data_root, "permuted_mnist"), repeats=1, dtype=torch.float64)


def test_bench_run_command_line_writes_its_figures(data_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_run.main(["--benchmark", "permuted_mnist", "--optimizer", "adam", "--preset", "smoke", "--data-root",
                    str(data_root), "--repeats", "2", "--no-warmup", "--no-imports", "--json", str(out)])
    saved = json.loads(out.read_text())
    case = saved["cases"][0]
    assert case["benchmark"] == "permuted_mnist" and len(case["runner_train_seconds"]) == 2
    assert case["ratio_train_seconds"] > 0 and case["ratio_wall_seconds"] > 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and "accuracy matrices differ by 0" in printed


def test_import_times_are_measured_in_fresh_interpreters():
    seconds = bench_run.import_seconds({"nothing": "pass", "json": "import json, sys; assert 'torch' not in sys.modules"},
                                       repeats=1)
    assert set(seconds) == {"nothing", "json"} and all(0 < s < 60 for s in seconds.values())


def test_bench_run_without_the_data_stops_with_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main(["--benchmark", "split_cifar10", "--preset", "smoke", "--data-root", str(tmp_path / "none"),
                        "--no-imports"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # argparse: the usage, then one line of error
    assert last.startswith("python -m experiments.bench_run: error: CIFAR-10 is not in") and "data_batch_1" in last
