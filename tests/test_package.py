"""The package installs, imports lightly, and its README and CI agree on the commands."""

import re
import subprocess
import sys
from pathlib import Path

import sb3_uepo
from sb3_uepo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _block_after(marker: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(marker) + r"\s*```bash\n(.*?)```", text, re.S)
    assert match, f"README.md has no bash block after {marker}"
    return [line for line in match.group(1).splitlines() if line.strip()]


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", sb3_uepo.__version__)


def test_readme_has_exactly_two_setup_commands():
    assert len(_block_after("<!-- main-command -->")) == 1
    assert len(_block_after("<!-- test-command -->")) == 1
    for command in _block_after("<!-- main-command -->") + _block_after("<!-- test-command -->"):
        # torch must be pinned first so pip never pulls a CUDA build
        assert command.startswith("pip install torch==2.13.0 && ")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and 'eval "$test_command"' in ci


def test_import_is_light():
    heavy = ("minari", "rl_zoo3", "matplotlib", "optuna")
    code = f"import sys, sb3_uepo; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"'import sb3_uepo' imported optional/heavy modules: {out}"


def test_cli_help(capsys):
    assert main([]) == 0
    assert "uepo" in capsys.readouterr().out
