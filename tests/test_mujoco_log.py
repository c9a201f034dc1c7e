"""MuJoCo's warnings become Python warnings and MUJOCO_LOG.TXT never lands in the working directory."""

import os
import subprocess
import sys

# Provoke a real MuJoCo warning ("Nan, Inf or huge value in QVEL ... unstable") in a fresh interpreter that imports
# sb3_uepo before mujoco, as user code does.
PROVOKE_WARNING = """
import warnings
import sb3_uepo
import gymnasium as gym
from sb3_uepo.common.mujoco_log import MuJoCoWarning
env = gym.make("Hopper-v5")
env.reset(seed=0)
env.unwrapped.data.qvel[:] = float("nan")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    env.step(env.action_space.sample())
print(sum(issubclass(w.category, MuJoCoWarning) for w in caught))
"""


def _run(code, cwd, **env):
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def test_warning_becomes_python_warning_and_no_log_file(tmp_path):
    result = _run(PROVOKE_WARNING, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_warnings_as_errors_do_not_abort_the_simulator(tmp_path):
    # an exception cannot cross MuJoCo's C callback (it would abort the process): it is logged instead
    code = PROVOKE_WARNING.replace('warnings.simplefilter("always")', 'warnings.simplefilter("error")')
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "unstable" in result.stderr
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_log_file_on_request(tmp_path):
    log_file = tmp_path / "logs" / "mujoco.txt"
    log_file.parent.mkdir()
    result = _run(PROVOKE_WARNING, tmp_path, UEPO_MUJOCO_LOG=str(log_file))
    assert result.returncode == 0, result.stderr
    assert "unstable" in log_file.read_text()
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
