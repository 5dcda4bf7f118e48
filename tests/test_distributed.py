"""AdamCM and AdamCG under DDP and FSDP2, Avalanche strategies with
DataParallelPlugin, and the cl-cm runners (2 processes over gloo, launched by
the test with torchrun and bounded in time) match a single-process run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGS`` on a free port, bounded in time."""
    if not torch.distributed.is_available():
        pytest.skip("torch built without torch.distributed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.json"
    torchrun(ROOT / "tests" / "distributed_worker.py", out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def avalanche_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    torchrun(ROOT / "tests" / "avalanche_dp_worker.py", tmp / "results.json", env={"HOME": str(tmp)})
    return json.loads((tmp / "results.json").read_text())


@pytest.mark.parametrize("name", ["AdamCM", "AdamCG"])
def test_ddp_matches_a_single_process(results, name):
    assert results[f"ddp_{name}"] < 1e-9


@pytest.mark.parametrize("name", ["AdamCM", "AdamCG"])
def test_fsdp2_matches_a_single_process_with_the_same_buffer_decisions(results, name):
    assert results[f"fsdp_{name}"] < 1e-9
    assert results[f"fsdp_{name}_priorities_agree"]
    assert results[f"fsdp_{name}_priorities_match_reference"]


@pytest.mark.parametrize("name", ["AdamCM", "AdamCG"])
def test_fsdp2_buffer_stats_describe_the_whole_model(results, name):
    """size, mean priority, exploration, cosine similarity and replacement
    rate equal the single-process optimizer's; without the all-reduce of the
    shards' sums they would be those of one shard."""
    assert results[f"fsdp_{name}_stats"] < 1e-9
    assert results[f"fsdp_{name}_stats_local"] > 1e-3


def test_adam_cm_sam_under_fsdp2_matches_a_single_process(results):
    assert results["fsdp_sam_AdamCM"] < 1e-9


def test_local_norm_priorities_diverge(results):
    """Without the all-reduce each rank ranks entries by its own shard's norm:
    the ranks disagree and the run stops being Adam+CM."""
    assert not results["fsdp_local_norm_priorities_agree"]
    assert results["fsdp_local_norm"] > 1e-6


def test_fsdp2_checkpoint_resumes_identically(results):
    assert results["fsdp_checkpoint"] == 0.0


def test_supervised_runner_under_torchrun_matches_one_process(tmp_path):
    """PTB smoke run: 2 ranks over gloo, each reading half of the token
    streams, give the perplexities of one process with the same global batch;
    only rank 0 writes the results folder."""
    from experiments import supervised as S

    from .fakedata import write_ptb

    root = write_ptb(tmp_path / "data")
    common = ["supervised", "--task", "ptb", "--preset", "smoke", "--optimizer", "adam_cm", "--data-root",
              str(root), "--no-download", "--no-progress"]
    proc = torchrun("-m", "experiments.cli", *common, "--out", tmp_path / "ddp", env={"HOME": str(tmp_path)})
    assert proc.stdout.count("validation perplexity") == 1, "only rank 0 reports"
    ddp = json.loads((tmp_path / "ddp" / "ptb-smoke" / "adam_cm" / "seed0" / "metrics.json").read_text())
    single = S.run(S.SupervisedConfig(task="ptb", preset="smoke", optimizer="adam_cm", data_root=str(root),
                                      download=False, progress=False, out=str(tmp_path / "one")), quiet=True)
    for key in ("valid_ppl", "test_ppl"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5)
    assert ddp["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"], rel=1e-5)


CASES = ["naive-adam_cm", "replay-adam_cm-multihead", "ewc-adam_cg", "lwf-adam_cm_sam-multihead", "agem-adam_cm"]


@pytest.mark.parametrize("case", CASES)
def test_data_parallel_plugin_matches_one_process(avalanche_results, case):
    """Split-MNIST, 5 experiences, 2 epochs, float64: batches of 25 split
    13/12 with a last batch of 10 per epoch; Replay and LwF on a multi-head
    model put different tasks, hence different heads, on the two ranks; SAM
    runs its second backward through the plugin; A-GEM projects the summed
    gradient. The parameters equal one process's to round-off (weighting the
    ranks 1/N instead of by their share moves them by 0.2 to 0.9)."""
    r = avalanche_results[case]
    assert r["max_abs_diff"] < 1e-9 * max(1.0, r["scale"])
    assert r["ranks_agree"]
    assert r["accuracy_parallel"] == r["accuracy_single"]


def test_data_parallel_plugin_catches_ranks_with_different_batches(avalanche_results):
    assert "different global batches" in avalanche_results["different_batches"]


def test_data_parallel_plugin_must_come_before_gradient_changing_plugins(avalanche_results):
    assert "put DataParallelPlugin first" in avalanche_results["wrong_order"]


SWEEP = """
[base]
benchmark = "permuted_mnist"
preset = "smoke"
data_root = "{root}"
download = false
threads = 1
seed = 3
epochs = 2

[[grid]]
strategy = ["naive"]
optimizer = ["adam_cm"]
batch_size = [29]

[[grid]]
strategy = ["agem"]
optimizer = ["adam_cm_sam"]
batch_size = [299]
"""


def test_continual_sweep_under_torchrun_matches_one_process(tmp_path):
    """`cl-cm sweep` under torchrun: Naive + Adam+CM with batches of 29 (15/14
    on the two ranks) and A-GEM + Adam+CM+SAM with batches of 299 and a last
    batch of one sample (rank 1 trains on a zero-weight stand-in) give the
    accuracy matrices and buffer statistics of one process (float32: equal up
    to one test image and relative 1e-3); only rank 0 writes and reports."""
    from experiments import config as C
    from experiments.io import read_json
    from experiments.sweep import run_sweep

    from .fakedata import write_mnist

    root = write_mnist(tmp_path / "data", n_train=400, n_test=120)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(SWEEP.format(root=root))
    proc = torchrun("-m", "experiments.cli", "sweep", sweep, "--out", tmp_path / "ddp", env={"HOME": str(tmp_path)})
    assert proc.stdout.count("sweep: 2 runs") == 1, "only rank 0 reports"
    statuses = run_sweep(C.load_file(sweep), tmp_path / "one", progress=False)
    assert set(statuses.values()) == {"done"}
    for one in sorted((tmp_path / "one").rglob("metrics.json")):
        ddp = tmp_path / "ddp" / one.parent.relative_to(tmp_path / "one")
        assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in one.parent.iterdir())
        assert read_json(ddp / "config.json")["environment"]["world_size"] == 2
        a, b = read_json(ddp / "metrics.json"), read_json(one)
        n_test = 10 * 10  # smoke: 10 test images per class, 10 classes
        for row_a, row_b in zip(a["accuracy_matrix"], b["accuracy_matrix"]):
            assert row_a == pytest.approx(row_b, abs=1.01 / n_test)
        for key, series in b["buffer_stats"]["series"].items():
            got = [v for _, _, v in a["buffer_stats"]["series"][key]]
            want = [v for _, _, v in series]
            assert [v is None for v in got] == [v is None for v in want], key
            assert [v for v in got if v is not None] == pytest.approx([v for v in want if v is not None],
                                                                      rel=1e-3, abs=1e-6), key
