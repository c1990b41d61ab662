"""The package's shape: floors whose imports only point down (import-linter's contract
in pyproject.toml), no module over 450 lines, no function over 60 (that the command
line imports neither numpy nor torch: tests/test_settings.py)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "neural_kernels"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def lint_imports(source_root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contract, on the package under ``source_root``."""
    env = {**os.environ, "PYTHONPATH": str(source_root)}
    run = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    command = [sys.executable, "-c", run, "--config", str(REPO / "pyproject.toml")]
    return subprocess.run(
        command, cwd=source_root, env=env, capture_output=True, text=True, check=False
    )


def test_the_layers_only_point_down():
    result = lint_imports(REPO / "src")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_an_import_pointing_up_breaks_the_contract(tmp_path):
    """The contract can fail: settings importing the command line (a floor above) is
    reported, naming both modules."""
    shutil.copytree(PACKAGE, tmp_path / "neural_kernels", ignore=shutil.ignore_patterns("*.pyc"))
    settings = tmp_path / "neural_kernels" / "settings.py"
    settings.write_text(settings.read_text() + "\nfrom neural_kernels import cli  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "neural_kernels.settings -> neural_kernels.cli" in result.stdout


def test_no_module_or_function_is_too_long():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long_modules, long_modules
    assert not long_functions, long_functions
