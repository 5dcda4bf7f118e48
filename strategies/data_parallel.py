"""Data-parallel training of any Avalanche strategy under torch.distributed
(torchrun), with the results of one process on the same global batches."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from avalanche.core import SupervisedPlugin


class DataParallelPlugin(SupervisedPlugin, supports_distributed=True):
    """Splits every global minibatch across the ranks of a process group and
    sums the ranks' gradients, so that N processes take the steps that one
    process takes on the same global batches.

    * Every rank loads the same global minibatch (Avalanche's loaders in
      single-process mode, :func:`avalanche_as_single_process`, with the same
      seed on every rank) and keeps its contiguous share, as
      ``torch.tensor_split`` cuts it (``before_training_iteration``).
    * After every backward, SAM's second one included, the gradients are
      summed across ranks with weight n_r/n, the rank's share of the global
      batch (``after_backward``): one all-reduce of one flat buffer per
      gradient dtype. Weighting by share rather than 1/N keeps per-sample-mean
      losses (cross-entropy, LwF's distillation) and data-independent
      penalties (EWC, SI) exact when the last batch does not split evenly; a
      rank left without samples trains on a zero-weight stand-in sample, so
      the collectives stay aligned. A gradient that is None on every rank
      stays None (a multi-head model's unused heads).
    * The model (parameters and buffers) is broadcast from rank 0 before each
      experience, and its buffers (BatchNorm statistics) again after it, so
      that every rank evaluates the same model.
    * Each step adds a fingerprint of the global batch to the all-reduce; at
      the end of every epoch the plugin checks that all ranks held the same
      batches and stops with an error if not (different seeds, a model whose
      dropout draws from the shared random stream, a sharding data loader).

    It must come first in the strategy's plugins, before any plugin that
    reads or changes gradients after backward (A-GEM and GEM project them).
    BatchNorm layers see only the rank's share of each batch, as under
    DistributedDataParallel, so a model with BatchNorm is not step-for-step
    equal to one process. Every rank runs the whole of Avalanche's loop
    (evaluation, EWC importances, replay buffers) on identical state; only
    the training forward and backward are split.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DataParallelPlugin needs an initialised torch.distributed process group: "
                               "launch with torchrun (cl-cm does it for you) or call "
                               "torch.distributed.init_process_group first.")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._share = 1.0
        self._fingerprint: torch.Tensor | None = None
        self._mismatch: torch.Tensor | None = None

    # -- checks ---------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        for plugin in strategy.plugins:
            if plugin is self:
                break
            if type(plugin).after_backward is not SupervisedPlugin.after_backward:
                raise ValueError(f"{type(plugin).__name__} changes gradients after backward and comes before "
                                 "DataParallelPlugin: put DataParallelPlugin first in the strategy's plugins.")

    def before_training_epoch(self, strategy, **kwargs):
        loader = strategy.dataloader
        if getattr(loader, "distributed_sampling", False) or isinstance(
                getattr(loader, "sampler", None), torch.utils.data.DistributedSampler):
            raise RuntimeError("the strategy's data loader shards the data across ranks itself (Avalanche's "
                               "distributed sampling), so DataParallelPlugin would split it twice: build and "
                               "train the strategy inside strategies.avalanche_as_single_process().")
        self._mismatch = None

    def after_training_epoch(self, strategy, **kwargs):
        if self._mismatch is not None and float(self._mismatch) > 0:
            raise RuntimeError("the ranks trained on different global batches in this epoch: give every rank "
                               "the same seed, data and model (no dropout drawing from the global random "
                               "stream), and let DataParallelPlugin do the splitting.")

    # -- state ------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        self._broadcast(list(strategy.model.parameters()) + list(strategy.model.buffers()))

    def after_training_exp(self, strategy, **kwargs):
        self._broadcast(list(strategy.model.buffers()))

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        for group in _by_dtype(tensors).values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
            with torch.no_grad():
                for t, part in zip(group, flat.split([t.numel() for t in group])):
                    t.copy_(part.view_as(t))

    # -- the split ----------------------------------------------------------------
    def before_training_iteration(self, strategy, **kwargs):
        mbatch = strategy.mbatch
        n = len(mbatch[0])
        for i, t in enumerate(mbatch):
            if not (isinstance(t, torch.Tensor) and t.dim() and len(t) == n):
                raise TypeError(f"minibatch element {i} is not a tensor of {n} samples; DataParallelPlugin "
                                "splits minibatches of per-sample tensors only.")
        self._fingerprint = torch.stack([_fingerprint(t) for t in mbatch])
        parts = [t.tensor_split(self.world)[self.rank] for t in mbatch]
        self._share = len(parts[0]) / n
        strategy.mbatch = parts if len(parts[0]) else [t[:1] for t in mbatch]  # else a zero-weight stand-in

    def after_backward(self, strategy, **kwargs):
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        device = params[0].device if params else self._fingerprint.device
        # bookkeeping: which parameters have a gradient here, and the batch fingerprint
        book = torch.cat([torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=device),
                          self._fingerprint.to(device)])
        by_dtype = _by_dtype(params)
        flats, works = {}, []
        for dtype, group in by_dtype.items():
            flats[dtype] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                      for p in group]).mul_(self._share)
            works.append(dist.all_reduce(flats[dtype], group=self.group, async_op=True))
        works.append(dist.all_reduce(book, group=self.group, async_op=True))
        for work in works:
            work.wait()
        flags = None
        for dtype, group in by_dtype.items():
            for p, g in zip(group, flats[dtype].split([p.numel() for p in group])):
                if p.grad is None:
                    if flags is None:  # a host read only when some local gradient is None
                        flags = dict(zip(map(id, params), book[:len(params)].tolist()))
                    if flags[id(p)] == 0:
                        continue  # no rank has a gradient for it
                    p.grad = torch.empty_like(p)
                p.grad.copy_(g.view_as(p))
        reduced = book[len(params):]
        mismatch = (reduced - self.world * self._fingerprint.to(device)).abs().sum() > \
            1e-9 * self.world * (self._fingerprint.abs().sum().to(device) + 1)
        self._mismatch = mismatch if self._mismatch is None else self._mismatch | mismatch


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of a batch tensor: equal batches give equal
    values, reordered or different ones almost surely not."""
    values = t.detach().reshape(len(t), -1).to(torch.float64).sum(dim=1)
    return (values * torch.arange(1, len(t) + 1, dtype=torch.float64, device=t.device)).sum()


def _by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


class _NotDistributed:
    """Avalanche's DistributedHelper, except that it reports one process."""

    def __init__(self, helper):
        self._helper = helper

    is_distributed = False

    def __getattr__(self, name):
        return getattr(self._helper, name)


@contextlib.contextmanager
def avalanche_as_single_process() -> Iterator[None]:
    """Inside this block Avalanche ignores an initialised process group: its
    data loaders (training, replay, A-GEM's memory) do not shard data with
    DistributedSampler, and it does not warn about plugins without
    distributed support. Every rank then sees the global batches of one
    process, which :class:`DataParallelPlugin` splits."""
    import avalanche.benchmarks.utils.data_loader as loaders
    import avalanche.training.templates.base as base

    saved = loaders.DistributedHelper, base.DistributedHelper
    loaders.DistributedHelper = base.DistributedHelper = _NotDistributed(saved[0])
    try:
        yield
    finally:
        loaders.DistributedHelper, base.DistributedHelper = saved
