"""Test set-up: importing Avalanche writes ~/.avalanche, so HOME points at a
temporary folder before anything imports it; torch runs single-threaded (one
intra-op thread: small tensors gain nothing from threads, and the numbers do
not depend on the machine's core count) and deterministic."""
import os
import tempfile

os.environ["HOME"] = tempfile.mkdtemp(prefix="cl_cm_home_")
for name in ("XDG_CONFIG_HOME", "CL_CM_CHECKPOINT_KEY"):  # the checkpoint key: made in the temporary HOME
    os.environ.pop(name, None)
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Tiny MNIST and CIFAR-10 in torchvision's layout, one copy per test module
    (modules that need other sizes define their own ``data_root``)."""
    from .fakedata import write_cifar10, write_mnist

    root = tmp_path_factory.mktemp("data")
    write_mnist(root, n_train=400, n_test=120)
    write_cifar10(root, n_train=250, n_test=120)
    return root
