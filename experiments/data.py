"""Data sets through torchvision, and the continual-learning benchmarks built on them.

With a network, torchvision downloads what is missing into ``--data-root``.
Files already there are used as they are, including local copies rebuilt
from other sources whose checksums differ from torchvision's list (CIFAR is
read without its md5 check when the files are present). Missing data without
a network raises :class:`DataNotFoundError`, which says where to put which files.

Images are normalised into one float tensor once; a sample is then a row of
it (permuted, or augmented, with tensor operations), which keeps the
per-sample cost of Avalanche's data loading small.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CIFAR100_FILES = ("train", "test", "meta")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class DataNotFoundError(FileNotFoundError):
    """The data set is neither on disk nor downloadable."""


class LocalCIFAR10(torchvision.datasets.CIFAR10):
    """CIFAR-10 read from ``root/cifar-10-batches-py`` without md5 checks,
    for local copies whose files differ from the original bytes."""

    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}


class LocalCIFAR100(torchvision.datasets.CIFAR100):
    """CIFAR-100 read from ``root/cifar-100-python`` without md5 checks."""

    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR100.test_list]
    meta = {**torchvision.datasets.CIFAR100.meta, "md5": None}


_SOURCES = {
    "MNIST": (torchvision.datasets.MNIST, torchvision.datasets.MNIST, "MNIST/raw", MNIST_FILES),
    "CIFAR-10": (torchvision.datasets.CIFAR10, LocalCIFAR10, "cifar-10-batches-py", CIFAR10_FILES),
    "CIFAR-100": (torchvision.datasets.CIFAR100, LocalCIFAR100, "cifar-100-python", CIFAR100_FILES),
}


def load_torchvision(name: str, root: str | Path, download: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels) as uint8 / int64
    tensors; images are N×H×W (MNIST) or N×3×H×W (CIFAR)."""
    remote, local, folder, files = _SOURCES[name]
    root = Path(root).expanduser()
    present = all((root / folder / f).exists() for f in files)
    try:
        if not present and not download:
            raise FileNotFoundError("missing files, and downloading is off (--no-download)")
        if present:
            train, test = local(str(root), train=True, download=False), local(str(root), train=False, download=False)
        else:
            train, test = remote(str(root), train=True, download=True), remote(str(root), train=False, download=True)
    except Exception as e:  # torchvision raises URLError, RuntimeError, OSError, ...
        where = root / folder
        raise DataNotFoundError(
            f"{name} is not in {where} and could not be downloaded ({type(e).__name__}: {e}).\n"
            f"Run where torchvision can download it, or put these files in {where}: {', '.join(files)}\n"
            f"(torchvision's layout; --data-root chooses the folder, now {root}).") from None
    return (*_tensors(train), *_tensors(test))


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    data = ds.data
    if not isinstance(data, torch.Tensor):  # CIFAR: numpy N×H×W×C
        data = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    return data, torch.as_tensor(ds.targets, dtype=torch.long)


def balanced_subset(targets: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` samples of every class (all if 0), chosen with
    a fixed seed so that every run of a protocol sees the same subset."""
    if per_class == 0:
        return torch.arange(len(targets))
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in targets.unique(sorted=True).tolist():
        idx = (targets == c).nonzero().flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} samples, fewer than the {per_class} per class asked for")
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


class ImageTensorDataset(Dataset):
    """Normalised float images (computed once, shared between the experiences
    built on them), with an optional fixed pixel permutation (Permuted-MNIST)
    or random crop and flip (CIFAR training)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, permutation: torch.Tensor | None = None,
                 augment: bool = False) -> None:
        self.images = images
        self.targets = targets.tolist()
        self.permutation = permutation
        self.augment = augment

    @staticmethod
    def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
        """uint8 N×H×W or N×C×H×W → torch's default float type (float32
        unless changed), per-channel standardised."""
        shape = (1, -1, 1, 1) if images.dim() == 4 else (1, 1, 1)
        dtype = torch.get_default_dtype()
        mean = torch.tensor(mean, dtype=dtype).view(shape)
        std = torch.tensor(std, dtype=dtype).view(shape)
        return (images.to(dtype) / 255.0 - mean) / std

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.permutation is not None:
            x = x.flatten()[self.permutation]
        if self.augment:
            x = random_crop_and_flip(x)
        return x, self.targets[i]

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples ``indices`` as one batch (inputs, targets): what
        collating ``self[i]`` one by one gives, random numbers included (drawn
        image by image, in the order of ``indices``). Avalanche's loaders use
        it through :class:`strategies.BatchedLoadingPlugin`."""
        if self.permutation is not None:
            x = self.images.flatten(1).index_select(0, indices).index_select(1, self.permutation)
        else:
            x = self.images.index_select(0, indices)
        if self.augment:
            x = torch.stack([random_crop_and_flip(img) for img in x])
        return x, torch.tensor([self.targets[i] for i in indices.tolist()], dtype=torch.long)


def random_crop_and_flip(x: torch.Tensor) -> torch.Tensor:
    """4-pixel zero-padded random crop and horizontal flip of one C×H×W image
    (draws: x and y offsets, then the flip)."""
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2,)).tolist()
    x = padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x


@dataclass
class Benchmark:
    """An Avalanche scenario with what the runner needs to know about it."""

    scenario: object
    scenario_kind: str
    n_classes: int
    classes_per_exp: int
    task_il_by_masking: bool   # single head; task-IL accuracy reported by masking logits
    multi_head: bool           # task labels select a head


def build_benchmark(cfg) -> Benchmark:
    """The scenario of ``cfg.benchmark`` under the resolved protocol of ``cfg``."""
    from avalanche.benchmarks import nc_benchmark

    if cfg.benchmark == "permuted_mnist":
        xtr, ytr, xte, yte = load_torchvision("MNIST", cfg.data_root, cfg.download)
        itr, ite = balanced_subset(ytr, cfg.train_per_class), balanced_subset(yte, cfg.test_per_class)
        gen = torch.Generator().manual_seed(cfg.seed)
        perms = [torch.randperm(28 * 28, generator=gen) for _ in range(cfg.n_experiences)]
        norm = ImageTensorDataset.normalise
        xtr, xte = norm(xtr[itr], (MNIST_MEAN,), (MNIST_STD,)), norm(xte[ite], (MNIST_MEAN,), (MNIST_STD,))
        train = [ImageTensorDataset(xtr, ytr[itr], p) for p in perms]
        test = [ImageTensorDataset(xte, yte[ite], p) for p in perms]
        scenario = nc_benchmark(train, test, n_experiences=cfg.n_experiences, task_labels=False, shuffle=False,
                                one_dataset_per_exp=True, class_ids_from_zero_in_each_exp=True)
        return Benchmark(scenario, "domain-incremental", 10, 10, False, False)

    name, n_classes, mean, std = (("CIFAR-10", 10, CIFAR10_MEAN, CIFAR10_STD) if cfg.benchmark == "split_cifar10"
                                  else ("CIFAR-100", 100, CIFAR100_MEAN, CIFAR100_STD))
    if n_classes % cfg.n_experiences:
        raise ValueError(f"{cfg.benchmark}: {n_classes} classes do not split into {cfg.n_experiences} experiences")
    xtr, ytr, xte, yte = load_torchvision(name, cfg.data_root, cfg.download)
    itr, ite = balanced_subset(ytr, cfg.train_per_class), balanced_subset(yte, cfg.test_per_class)
    norm = ImageTensorDataset.normalise
    train = ImageTensorDataset(norm(xtr[itr], mean, std), ytr[itr], augment=cfg.augment)
    test = ImageTensorDataset(norm(xte[ite], mean, std), yte[ite])
    multi_head = cfg.benchmark == "split_cifar100"
    scenario = nc_benchmark(train, test, n_experiences=cfg.n_experiences, task_labels=multi_head,
                            shuffle=False, fixed_class_order=list(range(n_classes)),
                            class_ids_from_zero_in_each_exp=multi_head)
    kind = ("task-incremental, multi-head" if multi_head
            else "class-incremental (task-incremental by masking the same model's logits)")
    return Benchmark(scenario, kind, n_classes, n_classes // cfg.n_experiences, not multi_head, multi_head)


def build_model(cfg, bench: Benchmark) -> torch.nn.Module:
    """mlp: 2 hidden layers of ``width`` ReLU units; slim_resnet18: the reduced
    ResNet-18 of Lopez-Paz & Ranzato (2017) with ``width`` base channels (64
    gives the standard CIFAR ResNet-18); mt_slim_resnet18: the same with one
    head per experience."""
    from avalanche.models import MTSlimResNet18, SimpleMLP, SlimResNet18

    if cfg.model == "mlp":
        return SimpleMLP(num_classes=bench.n_classes, input_size=28 * 28, hidden_size=cfg.width,
                         hidden_layers=2, drop_rate=0.0)
    if cfg.model == "slim_resnet18":
        return SlimResNet18(bench.n_classes, nf=cfg.width)
    if cfg.model == "mt_slim_resnet18":
        if not bench.multi_head:
            raise ValueError(f"mt_slim_resnet18 needs a benchmark with task labels, not {cfg.benchmark}")
        return MTSlimResNet18(bench.classes_per_exp, nf=cfg.width)
    raise ValueError(f"unknown model {cfg.model!r}; use mlp, slim_resnet18 or mt_slim_resnet18")
