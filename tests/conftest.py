"""Shared pytest fixtures. Keep additions here small and general; per-concern fixtures live in their test file."""

import os

import pytest
import torch

# Two workers on two cores: one torch thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cwd_and_data(tmp_path, monkeypatch):
    """Run every test in its own temp directory with its own Minari root, so nothing lands in the repo
    (rl-zoo logs, MuJoCo logs, tensorboard files) and no test sees another's datasets."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari_datasets"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    yield
    repo_log = os.path.join(os.path.dirname(__file__), "..", "MUJOCO_LOG.TXT")
    assert not os.path.exists(repo_log), "MuJoCo log leaked into the repo"
