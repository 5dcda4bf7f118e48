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


def load_torchvision(name: str, root: str | Path, download: bool = True, test: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(train images, train labels, test images, test labels) as uint8 / int64
    tensors; images are N×H×W (MNIST) or N×3×H×W (CIFAR). ``test=False``
    never reads the test files (None, None in their place)."""
    remote, local, folder, files = _SOURCES[name]
    root = Path(root).expanduser()
    present = all((root / folder / f).exists() for f in files)
    try:
        if not present and not download:
            raise FileNotFoundError("missing files, and downloading is off (--no-download)")
        source = local if present else remote
        train = source(str(root), train=True, download=not present)
        test_set = source(str(root), train=False, download=not present) if test else None
    except Exception as e:  # torchvision raises URLError, RuntimeError, OSError, ...
        where = root / folder
        raise DataNotFoundError(
            f"{name} is not in {where} and could not be downloaded ({type(e).__name__}: {e}).\n"
            f"Run where torchvision can download it, or put these files in {where}: {', '.join(files)}\n"
            f"(torchvision's layout; --data-root chooses the folder, now {root}).") from None
    return (*_tensors(train), *(_tensors(test_set) if test_set is not None else (None, None)))


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    data = ds.data
    if not isinstance(data, torch.Tensor):  # CIFAR: numpy N×H×W×C
        data = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    return data, torch.as_tensor(ds.targets, dtype=torch.long)


def balanced_subset(targets: torch.Tensor, per_class: int, seed: int = 0,
                    setting: str = "per_class") -> torch.Tensor:
    """Indices of ``per_class`` samples of every class (all if 0), chosen with
    a fixed seed so that every run of a protocol sees the same subset.
    ``setting`` names the setting that gave ``per_class``, for the error
    (a :class:`~experiments.config.ConfigError`) when a class has fewer."""
    from .config import ConfigError

    if per_class < 0:
        raise ConfigError(f"{setting} must be an integer >= 0 (0: all), got {per_class}")
    if per_class == 0:
        return torch.arange(len(targets))
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in targets.unique(sorted=True).tolist():
        idx = (targets == c).nonzero().flatten()
        if len(idx) < per_class:
            smallest = int(targets.unique(return_counts=True)[1].min())
            raise ConfigError(f"{setting} {per_class}: class {c} has only {len(idx)} samples; use at most "
                              f"{smallest} (0: all)")
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def holdout_split(targets: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): positions into ``targets`` with round(fraction · n_c)
    samples of every class c held out (at least one), chosen with a fixed seed
    independent of the run's seed, so that every run and every arm of a
    comparison is validated on the same samples. Both sorted."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in targets.unique(sorted=True).tolist():
        idx = (targets == c).nonzero().flatten()
        k = max(1, round(fraction * len(idx)))
        if k >= len(idx):
            from .config import ConfigError

            raise ConfigError(f"validation_fraction {fraction:g}: class {c} has {len(idx)} training samples, too "
                              "few to hold out that fraction and train on the rest; use a smaller fraction or more "
                              "training samples per class")
        held.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    held_out = torch.cat(held).sort().values
    mask = torch.ones(len(targets), dtype=torch.bool)
    mask[held_out] = False
    return mask.nonzero().flatten(), held_out


def rotation_map(degrees: float, size: int = 28) -> torch.Tensor:
    """Rotation of a size×size image by ``degrees`` (counter-clockwise, about
    the centre, nearest neighbour: torchvision's ``rotate``) as a gather of
    pixel indices into the flattened image followed by one background pixel
    (index size²), for the pixels that come from outside the image."""
    from torchvision.transforms.functional import rotate

    index = torch.arange(size * size, dtype=torch.float32).view(1, size, size)  # as the images: same rounding
    return rotate(index, float(degrees), fill=float(size * size)).flatten().round().long()


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
    task_il_by_masking: bool   # single head over all classes; task-IL accuracy reported by masking logits
    multi_head: bool           # task labels select a head
    n_experiences: int = 0     # experiences of the stream (cfg.validation_tasks with validation = first_tasks)
    eval_split: str = "test"   # what the evaluation stream holds: test data, or held-out training data


#: seed offset of the separate tuning stream of validation = "first_tasks"
FIRST_TASKS_SEED_OFFSET = 1_000_003
#: rotation of experience i of Rotated-MNIST, and of the tuning stream of validation = "first_tasks"
ROTATION_STEP = 10.0

_SCENARIO_KIND = {
    "domain": "domain-incremental",
    "task": "task-incremental, multi-head",
    "class": "class-incremental",
}


def _stream(cfg) -> tuple[int, int]:
    """(experiences, seed) of the stream: the reported one, or the separate
    tuning stream of validation = "first_tasks" (Chaudhry et al. 2019, A-GEM)."""
    if cfg.validation == "first_tasks":
        return cfg.validation_tasks, cfg.seed + FIRST_TASKS_SEED_OFFSET
    return cfg.n_experiences, cfg.seed


def _train_and_eval(cfg, name: str):
    """(train images, train labels, evaluation images, evaluation labels,
    eval split): the protocol's class-balanced subset of the training data and
    the test data; with validation, the training subset minus a held-out
    fraction, and that fraction in place of the test data (never read)."""
    validating = cfg.validation != "none"
    xtr, ytr, xte, yte = load_torchvision(name, cfg.data_root, cfg.download, test=not validating)
    itr = balanced_subset(ytr, cfg.train_per_class, setting="train_per_class")
    if not validating:
        ite = balanced_subset(yte, cfg.test_per_class, setting="test_per_class")
        return xtr[itr], ytr[itr], xte[ite], yte[ite], "test"
    kept, held = holdout_split(ytr[itr], cfg.validation_fraction)
    return xtr[itr[kept]], ytr[itr[kept]], xtr[itr[held]], ytr[itr[held]], "validation"


def build_benchmark(cfg) -> Benchmark:
    """The scenario of ``cfg.benchmark`` under the resolved protocol of ``cfg``."""
    if cfg.benchmark in ("permuted_mnist", "rotated_mnist"):
        return _pixel_mapped_mnist(cfg)
    return _split(cfg)


def _pixel_mapped_mnist(cfg) -> Benchmark:
    """Permuted-MNIST (every experience: all ten digits under its own fixed
    random pixel permutation, drawn from the seed) and Rotated-MNIST (every
    experience: all ten digits rotated by its own fixed angle, 10° more per
    experience, as in Mirzadeh et al. 2020, "Understanding the Role of Training
    Regimes in Continual Learning"); one shared 10-way head."""
    from avalanche.benchmarks import nc_benchmark

    n, seed = _stream(cfg)
    xtr, ytr, xev, yev, split = _train_and_eval(cfg, "MNIST")
    norm = ImageTensorDataset.normalise
    xtr, xev = norm(xtr, (MNIST_MEAN,), (MNIST_STD,)), norm(xev, (MNIST_MEAN,), (MNIST_STD,))
    if cfg.benchmark == "permuted_mnist":
        gen = torch.Generator().manual_seed(seed)
        maps = [torch.randperm(28 * 28, generator=gen) for _ in range(n)]
    else:  # a gather with one background pixel appended to every flattened image
        offset = ROTATION_STEP / 2 if cfg.validation == "first_tasks" else 0.0
        maps = [rotation_map(offset + ROTATION_STEP * i) for i in range(n)]
        background = (0.0 - MNIST_MEAN) / MNIST_STD
        xtr, xev = (torch.cat([x.flatten(1), torch.full((len(x), 1), background)], 1) for x in (xtr, xev))
    train = [ImageTensorDataset(xtr, ytr, m) for m in maps]
    evaluation = [ImageTensorDataset(xev, yev, m) for m in maps]
    scenario = nc_benchmark(train, evaluation, n_experiences=n, task_labels=False, shuffle=False,
                            one_dataset_per_exp=True, class_ids_from_zero_in_each_exp=True)
    return Benchmark(scenario, "domain-incremental", 10, 10, False, False, n, split)


def _split(cfg) -> Benchmark:
    """Split-MNIST, Split-CIFAR-10 and Split-CIFAR-100: the classes in a fixed
    order (0, 1, 2, ...; a seeded random order on the tuning stream of
    validation = "first_tasks"), an equal number per experience.

    * class scenario: one head over all classes; task-incremental accuracy is
      read from the same model by masking its logits to the experience's
      classes (as in DER / mammoth);
    * task scenario: task labels, one head per experience, classes numbered
      from 0 in each;
    * domain scenario: no task labels, one shared head over the classes of an
      experience, numbered from 0 in each (Split-MNIST: even or odd digit)."""
    from avalanche.benchmarks import nc_benchmark

    name, n_classes, mean, std = {"split_mnist": ("MNIST", 10, (MNIST_MEAN,), (MNIST_STD,)),
                                  "split_cifar10": ("CIFAR-10", 10, CIFAR10_MEAN, CIFAR10_STD),
                                  "split_cifar100": ("CIFAR-100", 100, CIFAR100_MEAN, CIFAR100_STD)}[cfg.benchmark]
    if n_classes % cfg.n_experiences:
        raise ValueError(f"{cfg.benchmark}: {n_classes} classes do not split into {cfg.n_experiences} experiences")
    per_exp = n_classes // cfg.n_experiences
    n, seed = _stream(cfg)
    order = list(range(n_classes))
    if cfg.validation == "first_tasks":
        order = torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    order = order[: n * per_exp]
    xtr, ytr, xev, yev, split = _train_and_eval(cfg, name)
    keep_tr, keep_ev = torch.isin(ytr, torch.tensor(order)), torch.isin(yev, torch.tensor(order))
    norm = ImageTensorDataset.normalise
    train = ImageTensorDataset(norm(xtr[keep_tr], mean, std), ytr[keep_tr], augment=cfg.augment)
    evaluation = ImageTensorDataset(norm(xev[keep_ev], mean, std), yev[keep_ev])
    task, shared = cfg.scenario == "task", cfg.scenario == "class"
    scenario = nc_benchmark(train, evaluation, n_experiences=n, task_labels=task, shuffle=False,
                            fixed_class_order=order, class_ids_from_zero_in_each_exp=not shared)
    kind = _SCENARIO_KIND[cfg.scenario]
    if shared:
        kind += " (task-incremental accuracy by masking the same model's logits)"
    return Benchmark(scenario, kind, n_classes if shared else per_exp, per_exp, shared, task, n, split)


def build_model(cfg, bench: Benchmark) -> torch.nn.Module:
    """mlp: 2 hidden layers of ``width`` ReLU units; slim_resnet18: the reduced
    ResNet-18 of Lopez-Paz & Ranzato (2017) with ``width`` base channels (64
    gives the standard CIFAR ResNet-18); mt_slim_resnet18: the same with one
    head per experience."""
    from avalanche.models import MTSlimResNet18, SimpleMLP, SlimResNet18

    from .multihead import MultiHeadMLP

    if cfg.model == "mlp" and bench.multi_head:
        return MultiHeadMLP(hidden_size=cfg.width, initial_out_features=bench.classes_per_exp)
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


def __getattr__(name: str):
    """``MultiHeadMLP`` (an Avalanche multi-task module, :mod:`experiments.multihead`)
    is imported on first use, so that this module's loaders need no Avalanche;
    checkpoints written before it moved still find it here."""
    if name == "MultiHeadMLP":
        from .multihead import MultiHeadMLP

        return MultiHeadMLP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
