"""Shared pytest fixtures. Keep additions here small and general; per-concern fixtures live in their test file."""

import copy
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

from sb3_uepo.common.datasets.container import OfflineDataset
from sb3_uepo.offline.config import resolve_offline_config

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


# ---------------------------------------------------------------------------------------------- tiny offline runs
# Tiny budgets of every offline stage (seconds in all), shared by the pipeline, UEPO and CLI tests.
TINY_OFFLINE = dict(
    offline_improvement=True,  # the tests exercise every stage; the default hands the behaviour model on
    n_members=2,
    n_diffusion_steps=6,
    n_sampling_steps=3,
    denoiser_hidden_sizes=(16, 16),
    time_embed_dim=8,
    behavior_steps=20,
    iql_steps=20,
    refine_steps=5,  # on by default: the tests run it (its gate decides on these tiny critics)
    refine_candidates=4,
    q_hidden_sizes=(16, 16),
    value_net_arch=(16, 16),
    gaussian_hidden_sizes=(16, 16),
    gaussian_bc_steps=20,
    ppo_steps=6,
    ppo_batch_size=16,
    ope_interval=3,
    perturb_interval=3,
    ope_horizon=4,
    ope_n_starts=8,
    segment_length=4,
    segment_batch_size=4,
    dynamics=dict(ensemble_size=3, n_elites=2, hidden_sizes=(16, 16), max_steps=20, eval_interval=10),
    augmentation=dict(ratio=0.2, train_steps=10, hidden_sizes=(16, 16), reference_size=100, n_sampling_steps=4),
)
# The architecture keys: with UEPO they come from the policy's kwargs (DIFFUSION_POLICY_KWARGS), not offline_kwargs.
ARCHITECTURE_KEYS = (
    "n_diffusion_steps",
    "n_sampling_steps",
    "denoiser_hidden_sizes",
    "time_embed_dim",
    "value_net_arch",
    "gaussian_hidden_sizes",
)
DIFFUSION_POLICY_KWARGS = dict(
    net_arch=[16, 16], value_net_arch=[16, 16], time_embed_dim=8, n_train_steps=6, n_sampling_steps=3
)


@pytest.fixture
def tiny_offline():
    """The tiny offline settings of every stage, as ``OfflineConfig`` overrides (a fresh copy per test)."""
    return copy.deepcopy(TINY_OFFLINE)


@pytest.fixture
def tiny_offline_kwargs():
    """The tiny offline settings without the architecture (UEPO takes that from the policy kwargs)."""
    return {k: copy.deepcopy(v) for k, v in TINY_OFFLINE.items() if k not in ARCHITECTURE_KEYS}


@pytest.fixture
def tiny_diffusion_policy_kwargs():
    """DiffusionPolicy kwargs with the architecture of :data:`TINY_OFFLINE`."""
    return copy.deepcopy(DIFFUSION_POLICY_KWARGS)


@pytest.fixture
def tiny_config():
    """``tiny_config(preset="quick", **overrides)``: a resolved ``OfflineConfig`` with the tiny settings."""

    def make(preset="quick", **overrides):
        return resolve_offline_config(preset, {**copy.deepcopy(TINY_OFFLINE), **overrides})

    return make


def make_tiny_dataset(n_episodes=8, length=25, seed=0, name="tiny"):
    rng = np.random.default_rng(seed)
    obs, next_obs, actions, rewards, starts, terminals, timeouts = [], [], [], [], [], [], []
    for _ in range(n_episodes):
        s = rng.normal(size=3)
        for t in range(length):
            a = np.clip(np.array([np.tanh(s[0]) * 1.5, 0.5 + 0.3 * np.tanh(s[1])]) + rng.normal(0, 0.2, 2), [-2, 0], [2, 1])
            s2 = 0.9 * s + 0.1 * np.array([a[0], a[1], a[0] - a[1]]) + rng.normal(0, 0.05, 3)
            obs.append(s), actions.append(a), next_obs.append(s2), rewards.append(1.0 - abs(s2[0]))
            starts.append(t == 0), terminals.append(False), timeouts.append(t == length - 1)
            s = s2
    return OfflineDataset(
        name=name,
        observations=np.array(obs),
        actions=np.array(actions),
        rewards=np.array(rewards),
        next_observations=np.array(next_obs),
        terminals=np.array(terminals),
        timeouts=np.array(timeouts),
        episode_starts=np.array(starts),
    )


@pytest.fixture
def tiny_dataset():
    """``tiny_dataset(n_episodes=8, length=25, seed=0)``: a 3-D toy task with 2-D actions in [-2, 2] x [0, 1]."""
    return make_tiny_dataset


def make_pendulum_dataset(n_episodes=6, length=30, seed=0, action_scale=1.0, name="pendulum-tiny"):
    """Pendulum-v1 transitions of a noisy energy-pumping controller; actions divided by ``action_scale``."""
    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng(seed)
    fields = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "terminals", "timeouts", "starts")}
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=seed + episode)
        for t in range(length):
            action = np.clip([2.0 * np.sign(obs[2]) + rng.normal(0, 0.5)], -2.0, 2.0).astype(np.float32)
            next_obs, reward, terminated, _, _ = env.step(action)
            for key, value in zip(
                fields, (obs, action / action_scale, reward, next_obs, terminated, t == length - 1, t == 0), strict=True
            ):
                fields[key].append(value)
            obs = next_obs
    env.close()
    return OfflineDataset(
        name=name,
        observations=np.array(fields["obs"]),
        actions=np.array(fields["actions"]),
        rewards=np.array(fields["rewards"], dtype=np.float64),
        next_observations=np.array(fields["next_obs"]),
        terminals=np.array(fields["terminals"]),
        timeouts=np.array(fields["timeouts"]),
        episode_starts=np.array(fields["starts"]),
    )


@pytest.fixture
def pendulum_dataset():
    """``pendulum_dataset(n_episodes=6, length=30, seed=0, action_scale=1.0)``: Pendulum-v1 data of a noisy controller."""
    return make_pendulum_dataset


@pytest.fixture
def diffusion_model(pendulum_dataset, tiny_offline_kwargs, tiny_diffusion_policy_kwargs):
    """``diffusion_model(dataset=None, **kwargs)``: a UEPO DiffusionPolicy on the tiny Pendulum data and budgets."""

    def make(dataset=None, **kwargs):
        params = dict(
            dataset=pendulum_dataset() if dataset is None else dataset,
            preset="quick",
            offline_kwargs=dict(tiny_offline_kwargs),
            policy_kwargs=dict(tiny_diffusion_policy_kwargs),
            n_steps=32,
            batch_size=32,
            n_epochs=1,
            seed=3,
        )
        params.update(kwargs)
        from sb3_uepo import UEPO

        return UEPO("DiffusionPolicy", params.pop("env", "Pendulum-v1"), **params)

    return make


@pytest.fixture
def pendulum_npz(tmp_path, pendulum_dataset):
    """The tiny Pendulum dataset written as an ``.npz`` file (it names no env: commands need ``--env Pendulum-v1``)."""
    data = pendulum_dataset()
    path = tmp_path / "pendulum.npz"
    fields = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    np.savez(path, **{name: getattr(data, name) for name in fields})
    return path
