"""Tiny data sets written in torchvision's on-disk formats, so the real loaders
(torchvision's and Avalanche's) run without a network.

Images carry a class-dependent pattern plus noise, so a model can learn them.
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def _patterned_images(n: int, shape: tuple[int, ...], classes: int, rng: np.random.Generator):
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    prototypes = rng.integers(0, 256, size=(classes, *shape)).astype(np.float32)
    noise = rng.normal(0, 40, size=(n, *shape))
    images = np.clip(0.6 * prototypes[labels] + noise + 50, 0, 255).astype(np.uint8)
    return images, labels


def write_mnist(root: str | Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """The four raw idx files under ``<root>/MNIST/raw/``."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = _patterned_images(n, (28, 28), 10, rng)
        with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28))
            f.write(images.tobytes())
        with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, n))
            f.write(labels.astype(np.uint8).tobytes())
    return Path(root)


def _cifar_images(n: int, classes: int, rng: np.random.Generator):
    images, labels = _patterned_images(n, (3, 32, 32), classes, rng)
    return images.reshape(n, 3072), labels


def write_cifar10(root: str | Path, n_train: int = 500, n_test: int = 100, seed: int = 0) -> Path:
    """``<root>/cifar-10-batches-py``: five training batches, a test batch and
    the meta file, as pickled dicts (their md5s differ from torchvision's list)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data, labels = _cifar_images(n_train, 10, rng)
    for i, (d, l) in enumerate(zip(np.array_split(data, 5), np.array_split(labels, 5)), start=1):
        _dump(folder / f"data_batch_{i}", {"data": d, "labels": l.tolist(), "batch_label": f"batch {i}"})
    d, l = _cifar_images(n_test, 10, rng)
    _dump(folder / "test_batch", {"data": d, "labels": l.tolist(), "batch_label": "test"})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    return Path(root)


def write_cifar100(root: str | Path, n_train: int = 1000, n_test: int = 200, seed: int = 0) -> Path:
    """``<root>/cifar-100-python``: train, test and meta pickles."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        d, l = _cifar_images(n, 100, rng)
        _dump(folder / name, {"data": d, "fine_labels": l.tolist(), "coarse_labels": (l // 5).tolist()})
    _dump(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)],
                            "coarse_label_names": [f"super{i}" for i in range(20)]})
    return Path(root)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_ptb(root: str | Path, n_train: int = 400, n_valid: int = 60, n_test: int = 60,
              vocab: int = 50, seed: int = 0) -> Path:
    """``<root>/ptb/ptb.{train,valid,test}.txt``: Mikolov's format, one sentence
    per line, lower-case words, ``<unk>`` and ``N`` tokens, leading space."""
    folder = Path(root) / "ptb"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab - 2)] + ["<unk>", "N"]
    probs = 1.0 / np.arange(1, vocab + 1)
    probs /= probs.sum()
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        lines = []
        for _ in range(n):
            length = int(rng.integers(3, 15))
            lines.append(" " + " ".join(rng.choice(words, size=length, p=probs)) + " ")
        (folder / f"ptb.{split}.txt").write_text("\n".join(lines) + "\n")
    return Path(root)
