"""The command line: --help answers without importing torch or Avalanche,
shows one plain default per flag, and the supervised and toy commands run
without Avalanche."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import cli
from experiments import config as C

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, tmp_path) -> dict:
    """Run ``code`` in a fresh interpreter from the repository root; it prints one JSON line, returned."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


LOADED = ("json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'avalanche', 'torchvision'}))")


def test_help_imports_neither_torch_nor_avalanche(tmp_path):
    code = ("import contextlib, io, json, sys\n"
            "from experiments import cli\n"
            "texts = []\n"
            "for argv in (['--help'], ['run', '--help'], ['supervised', '--help'], ['toy', '--help']):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try:\n"
            "            cli.main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    texts.append(out.getvalue())\n"
            f"print(json.dumps({{'loaded': {LOADED}, 'lengths': [len(t) for t in texts]}}))\n")
    result = _python(code, tmp_path)
    assert json.loads(result["loaded"]) == []
    assert all(n > 200 for n in result["lengths"])  # each printed its help


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("command", ["run", "supervised", "toy", "sweep", "tune", "study", "report"])
def test_help_shows_one_plain_default_per_flag(command):
    parser = _subparsers()[command]
    text = parser.format_help()
    assert "``" not in text and ":class:" not in text and ":func:" not in text
    assert "(default: None)" not in text
    for action in parser._actions:
        assert (action.help or "").count("(default:") <= 1, action.option_strings


def test_toy_flags_are_the_settings_of_toy_config():
    args = _subparsers()["toy"].parse_args([])
    default = C.ToyConfig()
    assert args.starts == default.starts == 100
    assert (args.steps, args.lr, args.rho) == (default.steps, default.lr, default.rho)
    assert args.optimizers == list(default.optimizers) and args.seeds == [default.seed]
    assert args.sharpness == [default.sharpness] and args.landscapes == list(C.LANDSCAPES)
    cfgs = C.toy_configs(_subparsers()["toy"].parse_args(["--landscapes", "ackley", "sharp_wide", "--sharpness",
                                                          "0.2", "0.4", "--seeds", "1", "2", "--starts", "7"]))
    assert [(c.landscape, c.sharpness, c.seed) for c in cfgs] == [
        ("ackley", 0.2, 1), ("ackley", 0.2, 2), ("sharp_wide", 0.2, 1), ("sharp_wide", 0.2, 2),
        ("sharp_wide", 0.4, 1), ("sharp_wide", 0.4, 2)]
    assert {c.starts for c in cfgs} == {7}


def test_supervised_and_toy_runs_import_no_avalanche(tmp_path):
    code = ("import json, sys\n"
            "from tests.fakedata import write_cifar10\n"
            "from experiments import cli\n"
            f"root = {str(tmp_path)!r}\n"
            "write_cifar10(root + '/data', n_train=250, n_test=120)\n"
            "toy = cli.main(['toy', '--landscapes', 'sharp_wide', '--optimizers', 'adam_cm', '--starts', '2',\n"
            "                '--steps', '3', '--out', root + '/toy'])\n"
            "sup = cli.main(['supervised', '--task', 'cifar10', '--preset', 'smoke', '--optimizer', 'adam_cm',\n"
            "                '--data-root', root + '/data', '--no-download', '--no-progress', '--threads', '1',\n"
            "                '--sharpness-samples', '0', '--width', '4', '--out', root + '/sup'])\n"
            f"print(json.dumps({{'codes': [toy, sup], 'loaded': {LOADED}}}))\n")
    result = _python(code, tmp_path)
    assert result["codes"] == [0, 0]
    assert "avalanche" not in json.loads(result["loaded"]) and "torch" in json.loads(result["loaded"])
    assert len(list((tmp_path / "sup").rglob("metrics.json"))) == 1
    assert len(list((tmp_path / "toy").rglob("metrics.json"))) == 1


def test_the_supervised_resnets_are_avalanches_weight_for_weight():
    """Same names, shapes and initial weights for a seed, same outputs."""
    import torch
    from avalanche.models.slim_resnet18 import BasicBlock, ResNet

    from experiments.models import RESNETS, CifarResNet

    for name, blocks in RESNETS.items():
        torch.manual_seed(3)
        ours = CifarResNet(blocks, 10, 4).eval()
        torch.manual_seed(3)
        theirs = ResNet(BasicBlock, list(blocks), 10, 4).eval()
        a, b = ours.state_dict(), theirs.state_dict()
        assert list(a) == list(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
        x = torch.randn(5, 3, 32, 32)
        assert torch.equal(ours(x), theirs(x)), name
