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
