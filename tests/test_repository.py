"""The repository keeps its promises to a new user: CI runs the README's test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_command(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"## {section}\n.*?```bash\n(.*?)\n```", text, re.S)
    assert match, f"README has no bash block under '## {section}'"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = _readme_command("Tests")
    assert "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci]


def test_the_readme_three_line_avalanche_example_runs(tmp_path):
    import torch
    from avalanche.benchmarks.classic import PermutedMNIST
    from avalanche.models import SimpleMLP
    from avalanche.training.supervised import EWC

    from .fakedata import write_mnist

    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Adam\+CM in your Avalanche script\n.*?```python\n(.*?)\n```", text, re.S).group(1)
    assert len([line for line in block.splitlines() if "# " in line]) == 3
    namespace = {"EWC": EWC, "model": SimpleMLP(hidden_size=32, drop_rate=0.0),
                 "criterion": torch.nn.CrossEntropyLoss()}
    exec(block, namespace)
    strategy = namespace["strategy"]
    strategy.train_mb_size = 32
    bench = PermutedMNIST(n_experiences=2, seed=0, dataset_root=write_mnist(tmp_path, 96, 32))
    strategy.train(bench.train_stream[0])
    before = namespace["optimizer"].buffer_stats(reset=False)["mean_priority"]
    strategy.train(bench.train_stream[1])
    assert namespace["optimizer"].buffer_stats()["size"] == 5 and before > 0
