"""Data sets through torchvision, and the continual-learning benchmarks built on them.

With a network, torchvision downloads what is missing into ``--data-root``.
Files already there are read as they are (:func:`load_torchvision`: MNIST's
idx files plain or gzipped, CIFAR's batches, or its archive extracted),
including local copies whose checksums differ from torchvision's list.
Missing or unusable data without a network raises :class:`DataNotFoundError`,
one line saying which files were found and which are needed.

Images are normalised into one float tensor once; a sample is then a row of
it (permuted, or augmented, with tensor operations), which keeps the
per-sample cost of Avalanche's data loading small.
"""
from __future__ import annotations

import math
import os
import pickle
import sys
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
    """The data set is neither on disk (complete and readable) nor downloadable."""


#: what each data set needs under ``--data-root``: (folder, files, archive torchvision downloads into the root)
_LAYOUT = {
    "MNIST": ("MNIST/raw", MNIST_FILES, None),
    "CIFAR-10": ("cifar-10-batches-py", CIFAR10_FILES, "cifar-10-python.tar.gz"),
    "CIFAR-100": ("cifar-100-python", CIFAR100_FILES, "cifar-100-python.tar.gz"),
}
_DOWNLOADERS = {"MNIST": torchvision.datasets.MNIST, "CIFAR-10": torchvision.datasets.CIFAR10,
                "CIFAR-100": torchvision.datasets.CIFAR100}


def load_torchvision(name: str, root: str | Path, download: bool = True, test: bool = True, announce: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(train images, train labels, test images, test labels) as uint8 / int64
    tensors; images are N×H×W (MNIST) or N×3×H×W (CIFAR). ``test=False``
    never reads the test files (None, None in their place). ``announce``:
    a line on stderr before downloading and before reading (none when the
    data is missing: then the error is the only line).

    Read from torchvision's layout under ``root``: MNIST's four idx files in
    ``MNIST/raw``, each plain or gzipped (``.gz``, as distributed; the
    ``.idx`` spelling, ``train-images.idx3-ubyte``, too); CIFAR's python
    batches in ``cifar-10-batches-py`` (``cifar-100-python``), extracted first
    from ``cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``) in ``root``
    when only the archive is there. Missing files are downloaded by
    torchvision when ``download``; otherwise, or when files are present but
    unusable, :class:`DataNotFoundError` says, in one line, which files were
    found and which are needed."""
    folder, files, archive = _LAYOUT[name]
    root = Path(root).expanduser()
    where = root / folder
    found = _find(name, where, files)
    if len(found) < len(files) and archive and (root / archive).is_file() and not where.exists():
        _extract(root / archive, root, folder, name)
        found = _find(name, where, files)
    if len(found) < len(files):
        if not download:
            raise DataNotFoundError(_incomplete(name, root, where, files, found, archive,
                                                "downloading is off (--no-download)"))
        if announce:
            print(f"downloading {name} into {root} ...", file=sys.stderr, flush=True)
        try:  # torchvision downloads (MNIST: the .gz files, and their extraction) into the same layout
            _DOWNLOADERS[name](str(root), train=True, download=True)
        except Exception as e:  # noqa: BLE001 - torchvision raises URLError, RuntimeError, OSError, ...
            raise DataNotFoundError(_incomplete(name, root, where, files, found, archive,
                                                f"{type(e).__name__}: {' '.join(str(e).split())}")) from None
        found = _find(name, where, files)
        if len(found) < len(files):
            raise DataNotFoundError(_incomplete(name, root, where, files, found, archive,
                                                "the download did not give them"))
    if announce:
        print(f"loading {name} from {root} ...", file=sys.stderr, flush=True)
    try:
        if name == "MNIST":
            prefixes = ("train", "t10k") if test else ("train",)
            pairs = [_read_mnist_pair(found[f"{p}-images-idx3-ubyte"], found[f"{p}-labels-idx1-ubyte"])
                     for p in prefixes]
        else:
            key = "labels" if name == "CIFAR-10" else "fine_labels"
            train_files = [f for f in files if f.startswith("data_batch")] or ["train"]
            pairs = [_read_cifar([found[f] for f in train_files], key)]
            if test:
                pairs.append(_read_cifar([found["test_batch" if name == "CIFAR-10" else "test"]], key))
    except _Unusable as e:
        raise DataNotFoundError(f"{name} in {where} cannot be used: {e}; found {folder_listing(where)}; needed "
                                f"{_needed(name, files)}. Replace that file (a fresh download or copy), or delete "
                                f"it to have torchvision download it (--data-root chooses the folder, now {root})"
                                ) from None
    (xtr, ytr), (xte, yte) = pairs[0], (pairs[1] if test else (None, None))
    return xtr, ytr, xte, yte


class _Unusable(Exception):
    """A data file that is there but cannot be read as what it should hold."""


def _find(name: str, where: Path, files) -> dict[str, Path]:
    """The needed files present in ``where``: {needed name: path}. MNIST's
    idx files may be gzipped and spelt ``.idx`` (``train-images.idx3-ubyte``)."""
    found = {}
    for needed in files:
        spellings = [needed]
        if name == "MNIST":
            dotted = needed.replace("-idx", ".idx")
            spellings = [needed, dotted, needed + ".gz", dotted + ".gz"]
        path = next((where / s for s in spellings if (where / s).is_file()), None)
        if path is not None:
            found[needed] = path
    return found


def folder_listing(where: Path, most: int = 12) -> str:
    """The files in ``where``, in a few words."""
    if not where.is_dir():
        return f"no folder {where}"
    names = sorted(p.name for p in where.iterdir())
    if not names:
        return "the folder empty"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _needed(name: str, files) -> str:
    if name == "MNIST":
        return f"the four idx files {', '.join(files)} (each plain or .gz)"
    return ", ".join(files)


def _incomplete(name: str, root: Path, where: Path, files, found: dict, archive: str | None, reason: str) -> str:
    """The one-line message for a data set not (wholly) on disk that could not be downloaded."""
    missing = [f for f in files if f not in found]
    if where.is_dir():
        state = f"is not complete in {where}"
        now = f": found {folder_listing(where)}; missing {', '.join(missing)}"
    else:
        state, now = f"is not in {where} (no such folder)", ""
    hint = ""
    if archive and (root / archive).is_file():  # beside a folder of its own that is incomplete
        hint = f" ({root / archive} is there too: delete the incomplete folder {where} to have it extracted)"
    return (f"{name} {state} and could not be downloaded ({reason}){now}{hint}. Put {_needed(name, files)} "
            f"there (torchvision's layout), or run where torchvision can download it (--data-root chooses the "
            f"folder, now {root})")


def _extract(archive: Path, root: Path, folder: str, name: str) -> None:
    """Extract ``folder`` from torchvision's ``archive`` into ``root``: into a
    temporary folder beside it, then renamed into place (a failed or
    interrupted extraction leaves no partial folder)."""
    import shutil
    import tarfile
    import tempfile

    print(f"extracting {archive} ...", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder}.", suffix=".extracting"))
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name == folder or m.name.startswith(folder + "/")]
            if not members:
                raise _Unusable(f"{archive.name} holds no {folder} folder")
            tar.extractall(tmp, members=members, filter="data")  # no links out, no absolute paths
        os.replace(tmp / folder, root / folder)
    except (tarfile.TarError, OSError, EOFError, _Unusable) as e:
        raise DataNotFoundError(f"{name}: {archive} cannot be extracted ({type(e).__name__}: "
                                f"{' '.join(str(e).split())}); replace it with a complete copy, or put the "
                                f"extracted folder {folder} in {root}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_IDX_MAGIC = {2051: 3, 2049: 1}  # idx magic number of uint8 images (3 dimensions) and labels (1)


def _read_idx(path: Path) -> torch.Tensor:
    """An idx file of unsigned bytes (LeCun's MNIST format: a big-endian
    magic number 0x0000080D, D the number of dimensions, D big-endian sizes,
    the data), plain or gzipped, as a uint8 tensor."""
    import gzip
    import zlib

    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise _Unusable(f"{path.name} cannot be read ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if len(raw) < 4:
        raise _Unusable(f"{path.name} is {len(raw)} bytes long, too short for an idx file")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGIC:
        raise _Unusable(f"{path.name} is not an idx file of bytes (it starts with {raw[:4].hex()}, not 00000803 "
                        "or 00000801)")
    dims = _IDX_MAGIC[magic]
    header = 4 + 4 * dims
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)] if len(raw) >= header else []
    expected = header + math.prod(shape) if shape else None
    if expected is None or len(raw) != expected:
        raise _Unusable(f"{path.name} is truncated or damaged ({len(raw)} bytes"
                        + (f", its header announces {expected}" if expected is not None else "") + ")")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*shape)


def _read_mnist_pair(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _read_idx(images), _read_idx(labels)
    if x.dim() != 3 or y.dim() != 1:
        raise _Unusable(f"{images.name} must hold images and {labels.name} labels (they seem swapped)")
    if len(x) != len(y):
        raise _Unusable(f"{images.name} holds {len(x)} images but {labels.name} {len(y)} labels")
    return x, y.long()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a data file can never run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a data batch never holds")
        return super().find_class(module, name)


def _read_cifar(paths: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (N×3×32×32 uint8) and labels of CIFAR python batches: pickled
    dicts of ``data`` (N×3072 bytes, channel-major) and ``label_key``."""
    import numpy as np

    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                batch = _ArrayUnpickler(f, encoding="latin1").load()
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            target = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, IndexError,
                AttributeError) as e:
            kind = type(e).__name__
            raise _Unusable(f"{path.name} is not a readable CIFAR batch ({kind}: {' '.join(str(e).split())})"
                            ) from None
        if len(data) != len(target):
            raise _Unusable(f"{path.name} holds {len(data)} images but {len(target)} labels")
        images.append(torch.from_numpy(data.copy()))
        labels.append(torch.from_numpy(target.copy()))
    return torch.cat(images), torch.cat(labels)


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


def stream_length(cfg) -> int:
    """Experiences of a run's stream (the tuning stream with validation = first_tasks)."""
    return _stream(cfg)[0]


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
    from .launch import rank_and_world

    xtr, ytr, xte, yte = load_torchvision(name, cfg.data_root, cfg.download, test=not validating,
                                          announce=cfg.progress and rank_and_world()[0] == 0)
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
