"""README.md stays honest: CI runs its test command, and its set-up commands are real."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fenced_commands(text: str) -> list[str]:
    """Lines of the ```bash blocks of a Markdown text."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    readme = fenced_commands((REPO / "README.md").read_text())
    test_command = 'pip install -e ".[test]" -c requirements.lock && python -m pytest'
    assert test_command in readme
    ci_lines = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_run_command_targets_the_default_config():
    readme = fenced_commands((REPO / "README.md").read_text())
    assert "pip install -e . -c requirements.lock && snakemake --cores 2" in readme
    assert (REPO / "config/config.yaml").exists()


def test_readme_solve_table_is_the_thesis_configs():
    """README's table of every thesis solve is what neural_kernels.sizing prints now."""
    from neural_kernels.sizing import check_solves_fit, load_config, solve_table

    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- solve table: python -m neural_kernels.sizing config/thesis.yaml -->")
    end = readme.index("<!-- end of solve table -->")
    config = load_config(REPO / "config/thesis.yaml")
    assert readme[start:end].split("\n", 1)[1].strip() == solve_table(config)
    check_solves_fit(config)  # the plan fits its nodes
