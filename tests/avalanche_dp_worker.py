"""Run by tests/test_distributed.py under torchrun (2 processes, gloo):
Avalanche strategies with DataParallelPlugin against the same strategy
trained, in the same process, on whole global batches (the single-process
reference: with Avalanche in single-process mode and no DataParallelPlugin,
every rank trains alone). Rank 0 writes the comparisons to a JSON file."""
from __future__ import annotations

import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
from torch import nn
from avalanche.benchmarks.classic import SplitMNIST
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import MultiHeadClassifier, MultiTaskModule, SimpleMLP
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin

from cl_cm import has_buffer
from strategies import DataParallelPlugin, avalanche_as_single_process, make_optimizer, make_strategy
from tests.distributed_worker import finish
from tests.fakedata import write_mnist

# (strategy, optimizer, multi-head, batch): batch 25 splits 13/12 and leaves a
# last batch of 10 per epoch; Replay on a multi-head model mixes tasks in a
# batch, so the ranks' chunks use different heads (gradients None on one rank).
CASES = [("naive", "adam_cm", False, 25), ("replay", "adam_cm", True, 25), ("ewc", "adam_cg", False, 25),
         ("lwf", "adam_cm_sam", True, 25), ("agem", "adam_cm", False, 59)]


class ToDouble(nn.Module):
    """The images come as float32."""

    def forward(self, x):
        return x.double()


class MultiHeadMLP(MultiTaskModule):
    """Avalanche's MTSimpleMLP without its dropout (on CPU, dropout draws from
    the random stream that orders the data, and the plugin would rightly stop
    the run)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(ToDouble(), nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
        self.classifier = MultiHeadClassifier(32)

    def forward_single_task(self, x, task_label):
        return self.classifier(self.features(x), task_label)


class ChangesGradients(SupervisedPlugin):
    def after_backward(self, strategy, **kwargs):
        pass


def train(root, case, parallel: bool, seed: int = 0, extra_plugins=()):
    strategy, optimizer, multi_head, batch = case
    RNGManager.set_random_seeds(seed)
    bench = SplitMNIST(n_experiences=5, return_task_id=multi_head, seed=0, dataset_root=root,
                       fixed_class_order=list(range(10)))
    model = (MultiHeadMLP() if multi_head else nn.Sequential(
        ToDouble(), SimpleMLP(num_classes=10, input_size=784, hidden_size=32, hidden_layers=1, drop_rate=0.0)))
    opt = make_optimizer(optimizer, model.parameters(), lr=1e-2, **({"buffer_size": 3} if has_buffer(optimizer)
                                                                    else {}))
    plugins = list(extra_plugins) + ([DataParallelPlugin()] if parallel else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    with avalanche_as_single_process():
        strat = make_strategy(strategy, model, opt, train_mb_size=batch, train_epochs=2, plugins=plugins,
                              evaluator=evaluator)
        for exp in bench.train_stream:
            strat.train(exp)
        accuracy = {k: v for k, v in strat.eval(bench.test_stream).items() if k.startswith("Top1_Acc_Exp")}
    return torch.cat([p.detach().flatten() for p in model.parameters()]), accuracy


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # float64 parameters (heads added later included): the comparison sees round-off only, not its
    # amplification by Adam's division in float32 (1e-4 after a few hundred steps)
    torch.set_default_dtype(torch.float64)
    root = write_mnist(tempfile.mkdtemp(), n_train=300, n_test=60)
    results = {}
    for case in CASES:
        name = "-".join(map(str, case[:2])) + ("-multihead" if case[2] else "")
        ref, ref_acc = train(root, case, parallel=False)
        par, par_acc = train(root, case, parallel=True)
        results[name] = {"max_abs_diff": float((ref - par).abs().max()), "scale": float(ref.abs().max()),
                         "accuracy_single": ref_acc, "accuracy_parallel": par_acc}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, par.tolist())
        results[name]["ranks_agree"] = all(g == gathered[0] for g in gathered)
    try:  # a different seed on each rank: different global batches, which the plugin must catch
        train(root, CASES[0], parallel=True, seed=rank)
        results["different_batches"] = "not detected"
    except RuntimeError as e:
        results["different_batches"] = str(e)
    try:
        train(root, CASES[0], parallel=True, extra_plugins=[ChangesGradients()])
        results["wrong_order"] = "not detected"
    except ValueError as e:
        results["wrong_order"] = str(e)
    finish(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
