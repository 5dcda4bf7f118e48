"""Mini-batches fetched with one indexing operation instead of sample by sample.

Avalanche's data loaders fetch a mini-batch sample by sample: every sample
goes down the experience's dataset tree (subsets, concatenations, transform
groups, data attributes) and the batch is collated from the pieces. With
tensor data sets and small models this costs more than the training step.

:class:`BatchedLoadingPlugin` leaves the sampling to Avalanche: its loaders
(a ``MultiDatasetDataLoader``: task-balanced, group-balanced, replay and
evaluation loaders) still choose the batches, with their own samplers,
iterated by a torch ``DataLoader`` exactly as Avalanche iterates them, so the
same random numbers are drawn in the same order. Only the fetching changes: the
positions of a dataset are resolved through its tree once per loader (a
vectorised walk of the indices), and the leaf data set returns each batch
from ``gather(indices)``. The batches are equal to Avalanche's, element for
element, provided that the leaf's ``gather`` returns what collating its
``__getitem__`` would (drawing any random numbers in the same order, sample
by sample) and the target transforms are deterministic functions of the label
(Avalanche's class mappings are).

A loader is left as it is, and Avalanche fetches sample by sample, whenever
anything in the tree is not understood: a leaf without ``gather``, a transform
of the inputs, a custom collate function, worker processes kept alive between
epochs, a data set prepared for FFCV, or a loader class not listed in
:data:`BATCHABLE_LOADERS`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from avalanche.benchmarks.utils.data import AvalancheDataset, _FlatDataWithTransform
from avalanche.benchmarks.utils.data_loader import (GroupBalancedDataLoader, GroupBalancedInfiniteDataLoader,
                                                    MultiDatasetDataLoader, MultiDatasetSampler,
                                                    ReplayDataLoader, SingleDatasetDataLoader,
                                                    TaskBalancedDataLoader)
from avalanche.benchmarks.utils.flat_data import ConstantSequence, FlatData
from avalanche.benchmarks.utils.transforms import MultiParamCompose, TupleTransform
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader, default_collate

#: Avalanche loaders that build their batches with MultiDatasetDataLoader's own sampling
BATCHABLE_LOADERS = (MultiDatasetDataLoader, SingleDatasetDataLoader, GroupBalancedDataLoader,
                     TaskBalancedDataLoader, ReplayDataLoader, GroupBalancedInfiniteDataLoader)


class NotGatherable(Exception):
    """The dataset tree holds something whose per-sample result a gather could not reproduce."""


def _index_tensor(indices) -> torch.Tensor:
    if isinstance(indices, list):
        return torch.tensor(indices, dtype=torch.int64)
    return torch.from_numpy(np.fromiter(iter(indices), dtype=np.int64, count=len(indices)))


def _subset_and_split(node: FlatData, idx: torch.Tensor):
    """(child, indices in the child, which of ``idx``) for the children of a
    FlatData node that the positions ``idx`` fall into, as ``FlatData._get_idx`` maps them."""
    if node._indices is not None:
        idx = _index_tensor(node._indices)[idx]
    if len(node._datasets) == 1:
        return [(node._datasets[0], idx, None)]
    ends = torch.tensor(node._cumulative_sizes, dtype=torch.int64)
    child = torch.searchsorted(ends, idx, right=True)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    parts = []
    for c in child.unique().tolist():
        which = (child == c).nonzero().flatten()
        parts.append((node._datasets[c], idx[which] - starts[c], which))
    return parts


def _target_transforms(transform) -> list[Callable]:
    """The label transforms of one transform group, in the order Avalanche
    applies them; NotGatherable when it also transforms the inputs."""
    if transform is None:
        return []
    if isinstance(transform, MultiParamCompose):
        return [t for part in transform.transforms for t in _target_transforms(part)]
    if not isinstance(transform, TupleTransform):
        raise NotGatherable(f"input transform {transform!r}")
    if transform.transforms and transform.transforms[0] is not None:
        raise NotGatherable(f"input transform {transform.transforms[0]!r}")
    if any(t is not None for t in transform.transforms[2:]):
        raise NotGatherable("transform of a third sample element")
    return [t for t in transform.transforms[1:2] if t is not None]


def _node_transforms(node: _FlatDataWithTransform, group: str) -> list[Callable]:
    out = []
    for groups in (node._frozen_transform_groups, node._transform_groups):  # Avalanche's order
        if groups is not None:
            try:
                out += _target_transforms(groups[group])
            except KeyError:
                raise NotGatherable(f"no transform group {group!r}") from None
    return out


def _walk(node, idx: torch.Tensor, pos: torch.Tensor, group: str, above: tuple, out: list) -> None:
    """Append (leaf, leaf indices, positions, label transforms) for the
    positions ``pos`` of the dataset, which are ``idx`` in ``node``."""
    if isinstance(node, _FlatDataWithTransform):
        chain = tuple(_node_transforms(node, group)) + above
        for child, child_idx, which in _subset_and_split(node, idx):
            _walk(child, child_idx, pos if which is None else pos[which], group, chain, out)
    elif isinstance(node, (FlatData, AvalancheDataset)) or not callable(getattr(node, "gather", None)):
        raise NotGatherable(f"{type(node).__name__} has no gather(indices)")
    else:
        out.append((node, idx, pos, above))


def _attribute_values(seq, idx: torch.Tensor) -> torch.Tensor:
    """Values of a data attribute (a FlatData tree of sequences) at ``idx``, as default_collate would stack them."""
    if len(idx) == 0:
        return torch.empty(0, dtype=torch.int64)
    if isinstance(seq, ConstantSequence):
        values = torch.as_tensor([seq[0]]).expand(len(idx))
    elif isinstance(seq, FlatData):
        values = torch.empty(len(idx), dtype=torch.int64)
        for child, child_idx, which in _subset_and_split(seq, idx):
            values[slice(None) if which is None else which] = _attribute_values(child, child_idx)
        return values
    elif isinstance(seq, torch.Tensor):
        values = seq[idx]
    else:
        values = torch.as_tensor(np.asarray(seq)[idx.numpy()])
    if values.dtype != torch.int64:
        raise NotGatherable(f"attribute values of type {values.dtype}")
    return values.clone()


class _Plan:
    """How to fetch the samples of one Avalanche dataset as a batch."""

    def __init__(self, dataset: AvalancheDataset):
        if not isinstance(dataset, AvalancheDataset):
            raise NotGatherable(f"{type(dataset).__name__} is not an AvalancheDataset")
        if dataset.collate_fn is not default_collate:
            raise NotGatherable(f"custom collate function {dataset.collate_fn!r}")
        n = len(dataset)
        flat = dataset._flat_data
        segments: list = []
        _walk(flat, torch.arange(n), torch.arange(n), flat._transform_groups.current_group, (), segments)
        self.leaves = []
        self.chains: list[tuple] = []
        self.leaf_of = torch.empty(n, dtype=torch.int64)
        self.index_in_leaf = torch.empty(n, dtype=torch.int64)
        self.chain_of = torch.empty(n, dtype=torch.int64)
        for leaf, idx, pos, chain in segments:
            if not any(leaf is known for known in self.leaves):
                self.leaves.append(leaf)
            if chain not in self.chains:
                self.chains.append(chain)
            self.leaf_of[pos] = next(i for i, known in enumerate(self.leaves) if known is leaf)
            self.index_in_leaf[pos] = idx
            self.chain_of[pos] = self.chains.index(chain)
        self.mapped: list[dict] = [{} for _ in self.chains]  # label -> transformed label, per chain
        # data attributes that Avalanche appends to every sample
        self.attributes = [_attribute_values(a.data, torch.arange(n)) for a in dataset._data_attributes.values()
                           if a.use_in_getitem]

    def fetch(self, pos: torch.Tensor) -> list[torch.Tensor]:
        idx = self.index_in_leaf[pos]
        if len(self.leaves) == 1:
            x, y = self.leaves[0].gather(idx)
        else:  # runs of one leaf, in batch order (a leaf's random draws happen in sample order)
            leaf_of = self.leaf_of[pos]
            change = (leaf_of[1:] != leaf_of[:-1]).nonzero().flatten() + 1
            bounds = [0] + change.tolist() + [len(pos)]
            parts = [self.leaves[int(leaf_of[a])].gather(idx[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if any(self.chains):
            y = torch.tensor([self._map(c, v) for c, v in zip(self.chain_of[pos].tolist(), y.tolist())],
                             dtype=torch.int64)
        return [x, y] + [a[pos] for a in self.attributes]

    def _map(self, chain: int, label: int) -> int:
        known = self.mapped[chain]
        if label not in known:
            value = label
            for transform in self.chains[chain]:
                value = transform(value)
            known[label] = value
        return known[label]


class GatheredDatasets(torch.utils.data.Dataset):
    """The concatenation of Avalanche datasets (as Avalanche's loaders
    concatenate them) whose ``__getitems__`` returns a collated batch."""

    def __init__(self, datasets: Sequence[AvalancheDataset]):
        self.plans = [_Plan(d) for d in datasets]
        self.ends = torch.tensor(np.cumsum([len(d) for d in datasets]), dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitems__(self, positions: list[int]) -> list[torch.Tensor]:
        pos = torch.tensor(positions, dtype=torch.int64)
        if len(self.plans) == 1:
            return self.plans[0].fetch(pos)
        which = torch.searchsorted(self.ends, pos, right=True)
        starts = torch.cat([self.ends.new_zeros(1), self.ends[:-1]])
        change = (which[1:] != which[:-1]).nonzero().flatten() + 1
        bounds = [0] + change.tolist() + [len(pos)]
        parts = [self.plans[int(which[a])].fetch(pos[a:b] - starts[which[a]]) for a, b in zip(bounds[:-1], bounds[1:])]
        return [torch.cat(column) for column in zip(*parts)]


def _as_is(batch):
    return batch


class GatheringLoader:
    """Iterates like the Avalanche loader it wraps (same samplers, a torch
    DataLoader iterated once per epoch) and fetches every batch with
    :meth:`GatheredDatasets.__getitems__`."""

    def __init__(self, loader: MultiDatasetDataLoader):
        kwargs = loader.loader_kwargs
        if kwargs.get("collate_fn", default_collate) is not default_collate:
            raise NotGatherable("custom collate function")
        if kwargs.get("persistent_workers") and kwargs.get("num_workers", 0) > 0:
            raise NotGatherable("persistent workers")
        self.loader = loader
        self.source = GatheredDatasets(loader.datasets)
        if any(hasattr(leaf, "ffcv_info") for plan in self.source.plans for leaf in plan.leaves):
            raise NotGatherable("a data set prepared for FFCV")
        self.distributed_sampling = loader.distributed_sampling

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        loader = self.loader
        samplers = loader._create_samplers(loader.datasets, loader.batch_sizes, loader.distributed_sampling,
                                           loader.loader_kwargs)
        batches = MultiDatasetSampler(loader.datasets, samplers, termination_dataset_idx=loader.termination_dataset,
                                      oversample_small_datasets=loader.oversample_small_datasets,
                                      never_ending=loader.never_ending)
        kwargs = {k: v for k, v in loader.loader_kwargs.items()
                  if k not in ("batch_size", "shuffle", "sampler", "drop_last", "collate_fn")}
        yield from DataLoader(self.source, batch_sampler=batches, collate_fn=_as_is, **kwargs)


def gathering_loader(loader: Any) -> Any:
    """``loader`` wrapped in a :class:`GatheringLoader` when its batches can
    be gathered, else ``loader`` itself."""
    if type(loader) not in BATCHABLE_LOADERS:
        return loader
    try:
        return GatheringLoader(loader)
    except NotGatherable:
        return loader


class BatchedLoadingPlugin(SupervisedPlugin, supports_distributed=True):
    """Replaces the strategy's training and evaluation loaders by
    :class:`GatheringLoader` s (same batches, fetched in one gather each),
    where the data allows it; see the module's documentation.

    The training loader is wrapped before each epoch, after every plugin's
    ``before_training_exp`` has run (a replay plugin sets its loader there);
    the evaluation loader in ``before_eval_exp``.
    """

    def before_training_epoch(self, strategy, **kwargs):
        if not isinstance(strategy.dataloader, GatheringLoader):
            strategy.dataloader = gathering_loader(strategy.dataloader)

    def before_eval_exp(self, strategy, **kwargs):
        strategy.dataloader = gathering_loader(strategy.dataloader)
