"""The README and docs/ keep their promises: every code block parses, every
`cl-cm` command line is one the CLI accepts and names files that exist, and
the README's Python snippets run as written on tiny data."""
from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.S | re.M)


def command_lines(page: Path) -> list[list[str]]:
    """The cl-cm invocations of a page's bash blocks, as argv after `cl-cm`
    (one per `&&`-separated command; comments and continuation lines joined)."""
    found = []
    for block in blocks(page, "bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                for i, word in enumerate(words):
                    if word.endswith("cl-cm") or word == "experiments.cli":
                        found.append(words[i + 1:])
                        break
    return found


def test_there_are_pages_and_a_short_readme():
    assert len(PAGES) >= 8
    assert len((ROOT / "README.md").read_text().splitlines()) <= 160
    assert sum(len(command_lines(page)) for page in PAGES) >= 20  # the checks below see the commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_blocks_parse(page):
    for block in blocks(page, "python"):
        ast.parse(block)  # a SyntaxError names the line
    for block in blocks(page, "bash"):
        done = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert done.returncode == 0, f"{page.name}: {done.stderr}\n{block}"
    bare = [b for b in blocks(page, "bash") if re.search(r"^(python3? -m|cl-cm) ", b, re.M)]
    if page.name != "README.md" and bare:  # commands without .venv/bin/ need the environment active
        assert "source .venv/bin/activate" in page.read_text(), page.name
    for block in blocks(page, "toml"):
        import tomllib

        tomllib.loads(block)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_cl_cm_commands_are_accepted_and_name_existing_files(page, capsys):
    from experiments.cli import UsageError, _parser

    parser = _parser()
    for argv in command_lines(page):
        argv = ["placeholder" if a.startswith(("$", "<")) else a for a in argv]  # values a reader fills in
        if not argv or argv[0] in ("-h", "--help"):
            continue
        try:
            parser.parse_args(argv)
        except (SystemExit, UsageError) as e:
            pytest.fail(f"{page.name}: `cl-cm {' '.join(argv)}` is refused by the CLI ({e})")
        for word in argv:
            if word.startswith("experiments/") and not word.endswith("/"):
                assert (ROOT / word).exists(), f"{page.name}: `cl-cm {' '.join(argv)}` names {word}, which is missing"


def test_readme_python_snippets_run_on_tiny_data(tmp_path, monkeypatch):
    """The two snippets, as written, in a folder whose data/ holds tiny MNIST."""
    import torch

    from .fakedata import write_mnist

    write_mnist(tmp_path / "data", n_train=200, n_test=60)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    snippets = blocks(ROOT / "README.md", "python")
    assert len(snippets) == 2
    optimizers, avalanche = ({} for _ in snippets)
    exec(compile(snippets[0], "README optimizers", "exec"), optimizers)
    assert optimizers["opt"].buffer_stats()["size"] > 0
    assert optimizers["sam"].state_dict()["state"]  # the SAM step ran
    exec(compile(snippets[1], "README Avalanche", "exec"), avalanche)
    assert avalanche["strategy"].train_mb_size >= 16  # never Avalanche's default batch of 1
    assert avalanche["strategy"].optimizer.buffer_stats()["size"] > 0
    accuracy = [v for k, v in avalanche["strategy"].evaluator.get_last_metrics().items() if "Top1_Acc_Exp" in k]
    assert len(accuracy) == 3 and all(0 <= a <= 1 for a in accuracy)


def test_docs_avalanche_snippet_runs_on_tiny_data(tmp_path, monkeypatch):
    from .fakedata import write_mnist

    write_mnist(tmp_path / "data", n_train=200, n_test=60)
    monkeypatch.chdir(tmp_path)
    (snippet,) = blocks(ROOT / "docs" / "avalanche.md", "python")
    namespace: dict = {}
    exec(compile(snippet, "docs/avalanche.md", "exec"), namespace)
    assert len([k for k in namespace["results"] if "Top1_Acc_Exp" in k]) == 5
    assert os.path.isdir(tmp_path / "data")
