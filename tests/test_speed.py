"""The runner agrees with a plain PyTorch loop doing the same work
(experiments.bench_run), on tiny data."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from experiments import bench_run
from experiments import config as C

from .fakedata import write_cifar10, write_mnist


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared machine: one thread (as the runner's --threads 1) is far faster."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(root, n_train=400, n_test=120)
    write_cifar10(root, n_train=250, n_test=120)
    return root


def smoke(data_root, benchmark, **kw) -> C.RunConfig:
    return C.resolve(C.RunConfig(benchmark=benchmark, preset="smoke", data_root=str(data_root), download=False,
                                 progress=False, threads=1, **kw))


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
