"""Test set-up: importing Avalanche writes ~/.avalanche, so HOME points at a
temporary folder before anything imports it; torch runs single-threaded and
deterministic for reproducible numbers."""
import os
import tempfile

os.environ["HOME"] = tempfile.mkdtemp(prefix="cl_cm_home_")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.use_deterministic_algorithms(True, warn_only=True)
