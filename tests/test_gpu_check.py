"""experiments/gpu_check.sh on a machine without a GPU: it stops at once, with
exit status 2 and one line that says why, and writes its summary."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_stops_cleanly_without_a_gpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_check.sh"), "", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("gpu_check: stopped: no CUDA GPU visible to torch")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "no CUDA GPU" in summary and "bench-step" not in summary  # nothing ran after the stop


def test_gpu_scripts_parse():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "experiments" / script)]).returncode == 0, script
