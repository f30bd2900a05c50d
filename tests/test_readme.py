"""The README's commands are the ones CI runs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.startswith("```bash"):
            inside, current = True, []
        elif line.startswith("```") and inside:
            inside = False
            blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    return blocks


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start")[1].split("\n## ")[0]
    install_and_demo, test_command = _bash_blocks(quick_start)[:2]
    assert "igpt_jax.main --config=configs/demo.py" in install_and_demo
    assert "pytest" in test_command
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command.strip() in ci.splitlines()
