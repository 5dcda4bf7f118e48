"""Data as people have it: MNIST's idx files gzipped or not (and spelt with
``.idx``), CIFAR's archive not yet extracted, and one-line messages naming
the files found and the files needed when some are missing or unusable."""
from __future__ import annotations

import gzip
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from experiments.cli import main as cli
from experiments.data import DataNotFoundError, load_torchvision
from experiments.ptb import Corpus

from .fakedata import write_cifar10, write_cifar100, write_mnist, write_ptb

MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="module")
def mnist_plain(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("plain"), n_train=60, n_test=20)


def gzipped_copy(plain: Path, root: Path, names=MNIST_NAMES, rename=lambda n: n) -> Path:
    """``root/MNIST/raw`` with ``names`` of ``plain``'s MNIST gzipped (as distributed), nothing else."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in names:
        (raw / (rename(name) + ".gz")).write_bytes(gzip.compress((plain / "MNIST" / "raw" / name).read_bytes()))
    return root


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------ MNIST
def test_gzipped_mnist_is_read_as_the_plain_files(mnist_plain, tmp_path):
    plain = load_torchvision("MNIST", mnist_plain, download=False)
    assert plain[0].shape == (60, 28, 28) and plain[0].dtype == torch.uint8 and plain[3].dtype == torch.long
    assert same(load_torchvision("MNIST", gzipped_copy(mnist_plain, tmp_path / "gz"), download=False), plain)
    dotted = gzipped_copy(mnist_plain, tmp_path / "dotted", rename=lambda n: n.replace("-idx", ".idx"))
    assert same(load_torchvision("MNIST", dotted, download=False), plain)
    assert not any((tmp_path / "gz" / "MNIST" / "raw").glob("*ubyte")), "nothing decompressed onto the disk"


def test_the_loader_reads_what_torchvision_reads(mnist_plain):
    import torchvision

    for train, (x, y) in ((True, (0, 1)), (False, (2, 3))):
        theirs = torchvision.datasets.MNIST(str(mnist_plain), train=train)
        ours = load_torchvision("MNIST", mnist_plain, download=False)
        assert torch.equal(theirs.data, ours[x]) and torch.equal(theirs.targets, ours[y])


def test_some_mnist_files_missing_names_the_found_and_the_needed(mnist_plain, tmp_path):
    root = gzipped_copy(mnist_plain, tmp_path, names=MNIST_NAMES[:3])
    with pytest.raises(DataNotFoundError) as e:
        load_torchvision("MNIST", root, download=False)
    message = str(e.value)
    assert "\n" not in message
    assert "found t10k-images-idx3-ubyte.gz, train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz" in message
    assert "missing t10k-labels-idx1-ubyte" in message and "each plain or .gz" in message
    assert "downloading is off" in message


@pytest.mark.parametrize("damage,says", [
    (lambda b: b[: len(b) // 2], "is truncated or damaged"),                  # a cut download, uncompressed
    (lambda b: b"\x00\x00\x08\x99" + b[4:], "is not an idx file of bytes"),    # another file under the name
])
def test_a_damaged_mnist_file_is_named(mnist_plain, tmp_path, damage, says):
    root = gzipped_copy(mnist_plain, tmp_path)
    path = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(damage(gzip.decompress(path.read_bytes()))))
    with pytest.raises(DataNotFoundError) as e:
        load_torchvision("MNIST", root, download=False)
    message = str(e.value)
    assert f"MNIST in {root / 'MNIST' / 'raw'} cannot be used: t10k-images-idx3-ubyte.gz {says}" in message
    assert "found t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in message and "\n" not in message


def test_a_truncated_gzip_is_named(mnist_plain, tmp_path):
    root = gzipped_copy(mnist_plain, tmp_path)
    path = root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataNotFoundError, match=r"train-labels-idx1-ubyte.gz cannot be read \(EOFError"):
        load_torchvision("MNIST", root, download=False)


def test_a_run_on_gzipped_mnist_says_it_is_loading(mnist_plain, tmp_path, capsys):
    root = gzipped_copy(mnist_plain, tmp_path / "data")
    out = tmp_path / "run"
    code = cli(["run", "--benchmark", "permuted_mnist", "--preset", "smoke", "--train-per-class", "5",
                "--test-per-class", "2", "--data-root", str(root), "--no-download", "--out", str(out)])
    assert code == 0 and (out / "metrics.json").exists()
    assert f"loading MNIST from {root} ..." in capsys.readouterr().err


# ------------------------------------------------------------------ CIFAR
def test_cifar10_archive_alone_is_extracted(tmp_path):
    source = write_cifar10(tmp_path / "source", n_train=50, n_test=20)
    expected = load_torchvision("CIFAR-10", source, download=False)
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert same(load_torchvision("CIFAR-10", root, download=False), expected)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar10_archive_that_is_not_one_is_refused_and_leaves_nothing(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz cannot be extracted"):
        load_torchvision("CIFAR-10", tmp_path, download=False)
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-python.tar.gz"]


def test_cifar10_missing_batches_and_the_archive_beside_them(tmp_path):
    write_cifar10(tmp_path, n_train=50, n_test=20)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_4").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(DataNotFoundError) as e:
        load_torchvision("CIFAR-10", tmp_path, download=False)
    message = str(e.value)
    assert "found batches.meta, data_batch_1, data_batch_2, data_batch_3, data_batch_5; missing data_batch_4, " \
           "test_batch" in message and "\n" not in message
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz is there too: delete the incomplete folder"):
        load_torchvision("CIFAR-10", tmp_path, download=False)


def test_a_damaged_cifar_batch_is_named_and_never_runs_code(tmp_path):
    write_cifar10(tmp_path, n_train=50, n_test=20)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataNotFoundError, match=r"cannot be used: data_batch_2 is not a readable CIFAR batch"):
        load_torchvision("CIFAR-10", tmp_path, download=False)

    class Planted:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    batch.write_bytes(pickle.dumps({"data": Planted(), "labels": [0]}))
    with pytest.raises(DataNotFoundError, match=r"data_batch_2 is not a readable CIFAR batch \(UnpicklingError"):
        load_torchvision("CIFAR-10", tmp_path, download=False)
    assert not (tmp_path / "ran").exists()


def test_cifar100_reads_fine_labels(tmp_path):
    write_cifar100(tmp_path, n_train=200, n_test=100)
    xtr, ytr, xte, yte = load_torchvision("CIFAR-100", tmp_path, download=False)
    with open(tmp_path / "cifar-100-python" / "test", "rb") as f:
        labels = pickle.load(f)["fine_labels"]
    assert xtr.shape == (200, 3, 32, 32) and yte.tolist() == labels and int(ytr.max()) == 99


# -------------------------------------------------------------------- PTB
def test_ptb_missing_files_are_named_with_what_was_found(tmp_path):
    write_ptb(tmp_path)
    (tmp_path / "ptb" / "ptb.valid.txt").unlink()
    with pytest.raises(DataNotFoundError) as e:
        Corpus(tmp_path, download=False)
    message = str(e.value)
    assert "found ptb.test.txt, ptb.train.txt; missing ptb.valid.txt" in message and "\n" not in message


def test_ptb_empty_or_binary_file_is_named(tmp_path):
    write_ptb(tmp_path)
    (tmp_path / "ptb" / "ptb.test.txt").write_text("")
    with pytest.raises(DataNotFoundError, match="ptb.test.txt is empty"):
        Corpus(tmp_path, download=False)
    (tmp_path / "ptb" / "ptb.test.txt").write_bytes(gzip.compress(b" the cat \n"))
    with pytest.raises(DataNotFoundError, match="ptb.test.txt cannot be read as text"):
        Corpus(tmp_path, download=False)
