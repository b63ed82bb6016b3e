"""The repository itself: lint, formatting, and what CI must have to run every test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.prefix) / "bin" / "ruff").exists(),
                    reason="ruff is not installed (pip install -e .[test])")  # fmt: skip
def test_ruff_clean():
    lint = _ruff("check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    formatting = _ruff("format", "--check", ".")
    assert formatting.returncode == 0, formatting.stdout + formatting.stderr


@pytest.mark.skipif(
    os.environ.get("VGGT_REQUIRE_BROWSER") != "1", reason="only where CI requires the browser test"
)
def test_browser_test_prerequisites_are_installed():
    """CI sets VGGT_REQUIRE_BROWSER=1: the browser test must run there, not skip for want of a browser."""
    assert Path("/usr/bin/chromium").exists(), "Debian's chromium is missing (apt-get install chromium)"
    import playwright.sync_api  # noqa: F401


def test_ci_runs_the_readme_test_command():
    """.ci/run (on a clean clone) runs the line after "# Set up and run the tests" in the README's quick
    start: a fresh environment with the test extras, then the whole suite."""
    env = os.environ | {"CI_PRINT_ONLY": "1"}
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("CI installs chromium first (apt-get); this machine has none")
    script = ["bash", str(REPO / ".ci" / "run")]
    done = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    command = done.stdout.strip().removeprefix("ci: ")
    lines = (REPO / "README.md").read_text().splitlines()
    assert command == lines[lines.index("# Set up and run the tests") + 1]
    steps = [step.strip() for step in command.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and '-e ".[test]"' in steps[1]
    assert steps[-1] == ".venv/bin/python -m pytest -q"
