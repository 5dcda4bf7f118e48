"""AdamCM and AdamCG under DDP and FSDP2 (2 processes over gloo, launched by
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


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch built without torch.distributed")
    out = tmp_path_factory.mktemp("dist") / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
                           str(ROOT / "tests" / "distributed_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ["AdamCM", "AdamCG"])
def test_ddp_matches_a_single_process(results, name):
    assert results[f"ddp_{name}"] < 1e-9


@pytest.mark.parametrize("name", ["AdamCM", "AdamCG"])
def test_fsdp2_matches_a_single_process_with_the_same_buffer_decisions(results, name):
    assert results[f"fsdp_{name}"] < 1e-9
    assert results[f"fsdp_{name}_priorities_agree"]
    assert results[f"fsdp_{name}_priorities_match_reference"]


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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", "-m", "experiments.cli",
                           *common, "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("validation perplexity") == 1, "only rank 0 reports"
    ddp = json.loads((tmp_path / "ddp" / "ptb-smoke" / "adam_cm" / "seed0" / "metrics.json").read_text())
    single = S.run(S.SupervisedConfig(task="ptb", preset="smoke", optimizer="adam_cm", data_root=str(root),
                                      download=False, progress=False, out=str(tmp_path / "one")), quiet=True)
    for key in ("valid_ppl", "test_ppl"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5)
    assert ddp["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"], rel=1e-5)
