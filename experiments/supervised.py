"""The paper's supervised benchmarks: CIFAR-10/100 image classification and
Penn Treebank language modelling, for every optimizer.

One run trains one model with one optimizer and seed, and writes the same
kind of results folder as a continual-learning run (``config.json``,
``metrics.json``, a checkpoint after every epoch for resumption):

* CIFAR: test accuracy after every epoch, and the top Hessian eigenvalue of
  the training loss at the end (on the first ``sharpness_samples`` training
  images, without augmentation, model in eval mode);
* PTB: validation perplexity after every epoch, validation and test
  perplexity at the end.

Buffered optimizers also record ``buffer_stats()`` every ``stats_every``
iterations: the mean pairwise cosine similarity of the stored entries (the
paper's gradient-cancellation diagnostic) and ‖mean(B)‖/‖m‖.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cl_cm import buffered, make_optimizer, skipped_steps
from strategies.errors import NonFiniteLossError

from . import config as C
from .config import IMAGE_PROTOCOL, LM_PROTOCOL, TASKS, SupervisedConfig  # noqa: F401 (re-exported)
from .launch import rank_and_world
from .results import RunKind, execute

#: the settings of a supervised run and their valid values are declared with every other setting
VALID = C.SUPERVISED_VALID


def resolve(cfg: SupervisedConfig) -> SupervisedConfig:
    """Fill the protocol from the preset; check every setting (see :func:`experiments.config.resolve`)."""
    cfg = C.check_values(cfg, VALID)
    C.check_choice("task", cfg.task, TASKS)
    if cfg.tuned is not None:
        raise C.ConfigError("tuned applies to continual-learning runs (cl-cm run, sweep), not to cl-cm supervised; "
                            "give the chosen values as settings")
    C.check_choice("optimizer", cfg.optimizer, C.OPTIMIZER_NAMES)
    cfg = C.fill_protocol(cfg, cfg.task, LM_PROTOCOL if cfg.task == "ptb" else IMAGE_PROTOCOL)
    cfg = C.check_values(cfg, VALID)
    if (cfg.model == "lstm") != (cfg.task == "ptb"):
        raise C.ConfigError(f"model {cfg.model!r} does not take {cfg.task}; use "
                            + ("lstm" if cfg.task == "ptb" else "slim_resnet18 or resnet34"))
    C.check_optimizer_settings(cfg)
    C.check_device(cfg.device)
    C.check_data_root(cfg.data_root)
    C.check_components(cfg)
    return cfg


def label(cfg: SupervisedConfig) -> str:
    """The optimizer plus every optimizer setting given explicitly."""
    extra = C.optimizer_kwargs(cfg)
    return " ".join([cfg.optimizer] + [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in sorted(extra.items())])


class SupervisedRun(RunKind):
    """``cl-cm supervised``: one model, one optimizer, one seed (:class:`experiments.config.SupervisedConfig`)."""

    runtime_keys = C.RUNTIME_FIELDS + ("stats_every",)

    def resolve(self, cfg):
        return resolve(cfg)

    def label(self, cfg) -> str:
        return label(cfg)

    def protocol(self, cfg) -> str:
        return C.protocol(cfg.task, cfg.preset, LM_PROTOCOL if cfg.task == "ptb" else IMAGE_PROTOCOL)["_description"]

    def train(self, cfg, out: Path, quiet: bool) -> dict[str, Any]:
        return (_train_language_model if cfg.task == "ptb" else _train_images)(cfg, out, quiet)

    def summary(self, metrics: dict[str, Any], cfg) -> str:
        return summary(metrics)


def run(cfg: SupervisedConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Run, resume or read the run of ``cfg`` in ``cfg.out``."""
    return execute(SupervisedRun(), cfg, quiet=quiet)


def summary(m: dict[str, Any]) -> str:
    head = f"== {m['task']} ({m['preset']}) | {m['label']} | seed {m['seed']}: "
    skipped = (f"; {m['skipped_steps']} optimizer step(s) skipped for NaN/Inf gradients"
               if m.get("skipped_steps") else "")
    if m["task"] == "ptb":
        return head + f"validation perplexity {m['valid_ppl']:.1f}, test {m['test_ppl']:.1f}, " \
                      f"{m['train_seconds']:.0f} s" + skipped
    sharp = m.get("top_hessian_eigenvalue")
    return head + f"test accuracy {100 * m['test_accuracy']:.2f}%, top Hessian eigenvalue " \
                  f"{'n/a' if sharp is None else f'{sharp:.3g}'}, {m['train_seconds']:.0f} s" + skipped


# ---------------------------------------------------------------- the loops
class _Training:
    """What the two loops share: device, optimizer, schedule, checkpoint, stats."""

    def __init__(self, cfg: SupervisedConfig, out: Path, model: nn.Module, iters_per_epoch: int, quiet: bool):
        from .launch import default_device

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.rank, self.world = rank_and_world()
        self.quiet = quiet or self.rank != 0
        self.device = torch.device(cfg.device) if cfg.device else default_device()
        self.model = model.to(self.device)
        # under torchrun the training forward goes through DDP; evaluation uses the plain module
        self.net = (nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model)
        self.opt = make_optimizer(cfg.optimizer, self.net.parameters(), **C.optimizer_kwargs(cfg))
        total = cfg.epochs * iters_per_epoch
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total)
                      if cfg.lr_schedule == "cosine" else None)
        self.buffered = buffered(self.opt)  # the optimizer holding the buffer, or None
        from .checkpoint import Checkpoints

        # plain tensors, loaded with weights_only=True (which never runs code): no authentication tag needed
        self.checkpoints = Checkpoints(out, "checkpoint.pt", authenticate=False)
        self.state = {"epoch": 0, "iteration": 0, "history": [], "buffer_series": [], "seconds": 0.0,
                      "skipped_steps": 0}
        ckpt = self.checkpoints.load(lambda f: torch.load(f, weights_only=True, map_location=self.device))
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            if self.sched is not None:
                self.sched.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["rng"])
            self.state = {"skipped_steps": 0, **ckpt["state"]}
        self._skipped_before = self.state["skipped_steps"]  # the optimizer counts from 0 in this process

    def epochs(self):
        from tqdm.auto import tqdm

        for epoch in range(self.state["epoch"], self.cfg.epochs):
            self._started = time.perf_counter()
            yield epoch, (lambda it, total: tqdm(it, total=total, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                                                 leave=False, disable=None if self.cfg.progress and not self.quiet
                                                 else True, dynamic_ncols=True))

    def step(self, closure) -> float:
        loss = self.opt.step(closure).detach()
        if self.world > 1:  # the global batch's loss, for the record
            torch.distributed.all_reduce(loss)
            loss = loss / self.world
        if self.sched is not None:
            self.sched.step()
        self.state["iteration"] += 1
        it = self.state["iteration"]
        if self.buffered is not None and it % self.cfg.stats_every == 0:
            stats = self.buffered.buffer_stats()
            self.state["buffer_series"].append({"iteration": it, **{k: float(v) for k, v in stats.items()}})
        return float(loss)

    def shard(self, *tensors, dim: int = 0):
        """This rank's slice of a global batch (the whole batch in one process)."""
        if self.world == 1:
            return tensors
        return tuple(t.tensor_split(self.world, dim=dim)[self.rank] for t in tensors)

    def loss_scale(self, global_count: int) -> float:
        """Multiplier of a summed local loss so that DDP's gradient average is
        the gradient of the mean loss over the whole global batch."""
        return self.world / global_count

    def end_epoch(self, epoch: int, record: dict) -> None:
        if not math.isfinite(record["train_loss"]):
            lr = ", ".join(f"{g['lr']:g}" for g in self.opt.param_groups)
            raise NonFiniteLossError(f"the training loss became NaN or Inf in epoch {epoch + 1} with learning rate "
                                     f"{lr}; the run stopped, since its numbers would be meaningless. Lower the "
                                     "learning rate (or check the data and settings)")
        self.state["seconds"] += time.perf_counter() - self._started
        self.state["history"].append({"epoch": epoch + 1, **record})
        self.state["epoch"] = epoch + 1
        self.state["skipped_steps"] = self._skipped_before + skipped_steps(self.opt)
        if self.rank == 0:
            ckpt = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict() if self.sched is not None else None,
                    "rng": torch.get_rng_state(), "state": self.state}
            self.checkpoints.save(lambda f: torch.save(ckpt, f))
        if self.world > 1:
            torch.distributed.barrier()

    def metrics(self, **extra) -> dict[str, Any]:
        cfg = self.cfg
        out = {"kind": "supervised", "task": cfg.task, "preset": cfg.preset, "optimizer": cfg.optimizer,
               "label": label(cfg), "seed": cfg.seed, "history": self.state["history"],
               "train_seconds": self.state["seconds"], "skipped_steps": self.state["skipped_steps"], **extra}
        if self.state["buffer_series"]:
            out["buffer_series"] = self.state["buffer_series"]
        return out


def _train_images(cfg: SupervisedConfig, out: Path, quiet: bool) -> dict[str, Any]:
    from .data import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, ImageTensorDataset,
                       balanced_subset, load_torchvision)

    name, classes, mean, std = (("CIFAR-10", 10, CIFAR10_MEAN, CIFAR10_STD) if cfg.task == "cifar10"
                                else ("CIFAR-100", 100, CIFAR100_MEAN, CIFAR100_STD))
    xtr, ytr, xte, yte = load_torchvision(name, cfg.data_root, cfg.download)
    itr = balanced_subset(ytr, cfg.train_per_class, setting="train_per_class")
    ite = balanced_subset(yte, cfg.test_per_class, setting="test_per_class")
    xtr = ImageTensorDataset.normalise(xtr[itr], mean, std)
    train = ImageTensorDataset(xtr, ytr[itr], augment=cfg.augment)
    test = ImageTensorDataset(ImageTensorDataset.normalise(xte[ite], mean, std), yte[ite])
    torch.manual_seed(cfg.seed)
    t = _Training(cfg, out, image_model(cfg.model, cfg.width, classes), math.ceil(len(train) / cfg.batch_size),
                  quiet)
    criterion = nn.CrossEntropyLoss()
    summed = nn.CrossEntropyLoss(reduction="sum")
    for epoch, bar in t.epochs():
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen)
        t.model.train()
        losses = []
        for x, y in bar(loader, len(loader)):
            scale = t.loss_scale(len(y))
            x, y = (v.to(t.device) for v in t.shard(x, y))

            def closure():
                t.opt.zero_grad()
                loss = summed(t.net(x), y) * scale
                loss.backward()
                return loss

            losses.append(t.step(closure))
        t.end_epoch(epoch, {"train_loss": sum(losses) / len(losses),
                            "test_accuracy": accuracy(t.model, test, cfg.eval_batch_size, t.device)})
    sharp, converged = None, None
    if cfg.sharpness_samples and t.rank == 0:
        from cl_cm.sharpness import top_hessian_eigenvalue

        plain = ImageTensorDataset(xtr, ytr[itr])
        n = min(cfg.sharpness_samples, len(plain))
        batches = list(torch.utils.data.DataLoader(torch.utils.data.Subset(plain, range(n)), batch_size=128))
        t.model.eval()
        info = top_hessian_eigenvalue(t.model, criterion, batches, iters=100, tol=1e-3, seed=cfg.seed,
                                      return_info=True)
        sharp, converged = info.value, info.converged
    return t.metrics(test_accuracy=t.state["history"][-1]["test_accuracy"], top_hessian_eigenvalue=sharp,
                     sharpness_converged=converged)


def image_model(model: str, width: int, classes: int) -> nn.Module:
    """slim_resnet18: ResNet-18 for 32×32 images with ``width`` base channels
    (64: the standard CIFAR ResNet-18; 20: the reduced one of GEM); resnet34:
    the same with [3, 4, 6, 3] blocks."""
    from .models import RESNETS, CifarResNet

    if model in RESNETS:
        return CifarResNet(RESNETS[model], classes, width)
    raise C.ConfigError(f"unknown image model {model!r}; use slim_resnet18 or resnet34")


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(data, batch_size=batch_size):
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        total += len(y)
    return correct / total


def _train_language_model(cfg: SupervisedConfig, out: Path, quiet: bool) -> dict[str, Any]:
    from .ptb import Corpus, LSTMLanguageModel, batchify, perplexity

    if cfg.model != "lstm":
        raise C.ConfigError(f"ptb trains model 'lstm', not {cfg.model!r}")
    corpus = Corpus(cfg.data_root, cfg.download)
    tokens = corpus.train[: cfg.max_train_tokens or None]
    train = batchify(tokens, cfg.batch_size)
    valid, test = batchify(corpus.valid, 10), batchify(corpus.test, 10)
    torch.manual_seed(cfg.seed)
    model = LSTMLanguageModel(len(corpus), cfg.width, cfg.layers, cfg.dropout)
    t = _Training(cfg, out, model, math.ceil((len(train) - 1) / cfg.bptt), quiet)
    train, valid, test = train.to(t.device), valid.to(t.device), test.to(t.device)
    summed = nn.CrossEntropyLoss(reduction="sum")
    for epoch, bar in t.epochs():
        t.model.train()
        state, losses = None, []
        for i in bar(range(0, len(train) - 1, cfg.bptt), math.ceil((len(train) - 1) / cfg.bptt)):
            x, y = train[i:i + cfg.bptt], train[i + 1:i + 1 + cfg.bptt]
            x = x[: len(y)]
            scale = t.loss_scale(y.numel())
            x, y = t.shard(x, y, dim=1)  # under torchrun each rank reads its columns of the token streams
            state = None if state is None else tuple(s.detach() for s in state)
            carried = []

            def closure():
                t.opt.zero_grad()
                logits, new_state = t.net(x, state)
                loss = summed(logits.flatten(0, 1), y.flatten()) * scale
                loss.backward()
                if cfg.clip:  # after backward, so on DDP's averaged gradient
                    nn.utils.clip_grad_norm_(t.model.parameters(), cfg.clip)
                if not carried:  # SAM calls twice: the state at θ carries on
                    carried.append(new_state)
                return loss

            losses.append(t.step(closure))
            state = carried[0]
        t.end_epoch(epoch, {"train_loss": sum(losses) / len(losses),
                            "valid_ppl": perplexity(t.model, valid, cfg.bptt)})
    return t.metrics(valid_ppl=t.state["history"][-1]["valid_ppl"], test_ppl=perplexity(t.model, test, cfg.bptt),
                     vocabulary=len(corpus), train_tokens=len(tokens))


def grid(base: SupervisedConfig, optimizers, seeds, out: str | Path) -> list[SupervisedConfig]:
    """One config per (optimizer, seed), each in ``out/<task>-<preset>/<label>/seed<S>`` (file-name safe)."""
    from .tuning import slug

    cells = []
    for optimizer in optimizers:
        for seed in seeds:
            cfg = resolve(dataclasses.replace(base, optimizer=optimizer, seed=seed))
            folder = Path(out) / slug(f"{cfg.task}-{cfg.preset}") / slug(label(cfg).replace(" ", "-")) / f"seed{seed}"
            cells.append(dataclasses.replace(cfg, out=str(folder)))
    return cells
