"""The paper's supervised benchmarks and toy landscapes, on tiny generated data."""
from __future__ import annotations

import math

import pytest
import torch

from experiments import supervised as S
from experiments.cli import main as cli
from experiments.io import read_json
from experiments.ptb import Corpus, LSTMLanguageModel, batchify, perplexity
from experiments.toy import ToyConfig, basin_minimum, run_toy, sharp_wide

from .fakedata import write_cifar10, write_cifar100, write_ptb


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, n_train=250, n_test=120)
    write_cifar100(root, n_train=500, n_test=300)
    write_ptb(root)
    return root


# ---------------------------------------------------------------- PTB
def test_corpus_reads_mikolov_format(tmp_path):
    folder = tmp_path / "ptb"
    folder.mkdir()
    (folder / "ptb.train.txt").write_text(" the cat <unk> sat \n the N dogs \n")
    (folder / "ptb.valid.txt").write_text(" the zebra sat \n")
    (folder / "ptb.test.txt").write_text(" cat \n")
    corpus = Corpus(tmp_path, download=False)
    assert corpus.words == ["the", "cat", "<unk>", "sat", "<eos>", "N", "dogs"]
    assert corpus.train.tolist() == [0, 1, 2, 3, 4, 0, 5, 6, 4]
    assert corpus.valid.tolist() == [0, 2, 3, 4], "an unseen word becomes <unk>"
    assert corpus.test.tolist() == [1, 4]


def test_missing_ptb_says_where_to_put_it(tmp_path):
    from experiments.data import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="ptb.train.txt"):
        Corpus(tmp_path / "nothing", download=False)


def test_perplexity_by_hand():
    """A model whose logits ignore the input (decoder weight 0, bias log p)
    predicts p for every token: its perplexity is exp(−mean log p(token))."""
    vocab = 5
    model = LSTMLanguageModel(vocab, hidden=4, layers=1, dropout=0.0)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.copy_(p.log())
    tokens = torch.tensor([0, 1, 2, 3, 4, 0, 0, 1, 3, 2, 1, 0, 4, 4, 2, 1, 0])
    data = batchify(tokens, 2)  # (8, 2): the last token is dropped
    targets = torch.cat([data[1:, 0], data[1:, 1]])
    expected = math.exp(-float(p.log()[targets].mean()))
    assert perplexity(model, data, bptt=3) == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        model.decoder.bias.zero_()
    assert perplexity(model, data, bptt=5) == pytest.approx(vocab, rel=1e-6), "uniform: perplexity = vocabulary"


# ------------------------------------------------------------ runs
def smoke(data_root, out, **kw):
    return S.SupervisedConfig(**{**dict(preset="smoke", data_root=str(data_root), out=str(out), download=False,
                                        progress=False, threads=1), **kw})


@pytest.mark.parametrize("task,optimizer", [("cifar10", "adam_cm"), ("cifar100", "adam_cg"), ("ptb", "adam_cm_sam")])
def test_smoke_runs_through_the_real_loaders(data_root, tmp_path, task, optimizer):
    m = S.run(smoke(data_root, tmp_path / "r", task=task, optimizer=optimizer, stats_every=2), quiet=True)
    assert m["kind"] == "supervised" and len(m["history"]) == 1
    saved = read_json(tmp_path / "r" / "config.json")
    assert saved["config"]["epochs"] == 1 and saved["config"]["optimizer"] == optimizer
    assert m["buffer_series"] and {"cosine_similarity", "exploration"} <= set(m["buffer_series"][0])
    if task == "ptb":
        assert 1 < m["valid_ppl"] < 200 and 1 < m["test_ppl"] < 200  # 50-word vocabulary
        assert m["vocabulary"] == 51
    else:
        assert 0 <= m["test_accuracy"] <= 1
        assert m["top_hessian_eigenvalue"] > 0


def test_interrupted_run_resumes_to_the_same_numbers(data_root, tmp_path, monkeypatch):
    cfg = dict(task="cifar10", optimizer="adam_cm", epochs=2, sharpness_samples=0)
    full = S.run(smoke(data_root, tmp_path / "full", **cfg), quiet=True)
    original = S._Training.end_epoch

    def crash_after_first(self, epoch, record):
        original(self, epoch, record)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(S._Training, "end_epoch", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        S.run(smoke(data_root, tmp_path / "cut", **cfg), quiet=True)
    assert (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut" / "metrics.json").exists()
    monkeypatch.setattr(S._Training, "end_epoch", original)
    resumed = S.run(smoke(data_root, tmp_path / "cut", **cfg), quiet=True)
    assert [h["test_accuracy"] for h in resumed["history"]] == [h["test_accuracy"] for h in full["history"]]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


def test_cli_grid_and_report(data_root, tmp_path, capsys):
    out = tmp_path / "grid"
    assert cli(["supervised", "--task", "cifar10", "--preset", "smoke", "--optimizers", "adam", "adam_cm",
                "--seeds", "0", "1", "--data-root", str(data_root), "--no-download", "--out", str(out),
                "--no-progress", "--report"]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "## cifar10, preset `smoke` (supervised)" in report
    assert "| `adam_cm` | 2 |" in report and "Paired difference to Adam" in report
    assert list((out / "report" / "figures").glob("*-sharpness.png")), "the report draws the sharpness figure"


def test_bad_supervised_settings():
    from experiments.config import ConfigError

    with pytest.raises(ConfigError, match="unknown task"):
        S.resolve(S.SupervisedConfig(task="imagenet"))
    with pytest.raises(ConfigError, match="buffer_size does not apply to optimizer 'adam'"):
        S.resolve(S.SupervisedConfig(optimizer="adam", buffer_size=3))


# ---------------------------------------------------------------- toys
def test_toy_run_gives_the_same_numbers_for_the_same_seed():
    cfg = ToyConfig(landscape="ackley", starts=3, steps=30, seed=5)
    a, b = run_toy(cfg), run_toy(cfg)
    assert a == b
    c = run_toy(ToyConfig(landscape="ackley", starts=3, steps=30, seed=6))
    assert c["starts"] != a["starts"]


def test_basins_of_the_sharp_wide_landscape():
    f = lambda p: sharp_wide(p, 0.3)  # noqa: E731
    points = torch.tensor([[0.1, -0.05], [2.5, 3.5], [1.6, 1.5]], dtype=torch.float64)
    ends = basin_minimum(f, points)
    assert torch.allclose(ends[0], torch.zeros(2, dtype=torch.float64), atol=1e-2)  # pulled a little towards b
    assert float(ends[0].norm()) < float(points[0].norm())
    assert torch.allclose(ends[1], torch.tensor([3.0, 3.0], dtype=torch.float64), atol=5e-2)
    assert torch.allclose(ends[2], torch.tensor([3.0, 3.0], dtype=torch.float64), atol=5e-2)


def test_escape_ratio_counts_runs_that_leave_for_the_wide_basin():
    cfg = ToyConfig(landscape="sharp_wide", sharpness=0.2, starts=4, steps=150, optimizers=("adam", "adam_cm"))
    r = run_toy(cfg)["results"]
    assert r["adam"]["escape_ratio"] == 0.0 and all(loss < 0.05 for loss in r["adam"]["final_loss"])
    assert r["adam_cm"]["escape_ratio"] > 0.0
    assert r["adam_cm"]["mean_travelled"] > 3 * r["adam"]["mean_travelled"]
