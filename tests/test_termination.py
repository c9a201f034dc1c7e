"""Termination rules on normalised observations agree with gymnasium's own ``terminated``."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from sb3_uepo.offline.termination import task_name, termination_fn_for


def _normalise(obs: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    return torch.as_tensor((obs - mean) / std, dtype=torch.float32)


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Walker2d-v5"])
def test_rule_matches_env_on_random_rollouts(env_id):
    env = gym.make(env_id)
    rng = np.random.default_rng(0)
    next_obs, terminated = [], []
    obs, _ = env.reset(seed=0)
    while len(next_obs) < 600:
        obs, _, term, trunc, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        next_obs.append(obs)
        terminated.append(term)
        if term or trunc:
            obs, _ = env.reset()
    next_obs = np.array(next_obs)
    mean, std = next_obs.mean(0), next_obs.std(0) + 0.1  # arbitrary statistics: the rule must undo them
    rule = termination_fn_for(env_id, mean, std)
    predicted = rule(_normalise(next_obs, mean, std)).numpy()
    assert np.asarray(terminated).sum() >= 5, "the random rollouts should terminate several times"
    np.testing.assert_array_equal(predicted, np.asarray(terminated))


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Walker2d-v5", "Ant-v5"])
def test_rule_matches_is_healthy_on_perturbed_states(env_id):
    """Random states around the boundaries: ``rule(obs) == not env.is_healthy`` (both outcomes are covered)."""
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    z_center = {"Hopper-v5": 0.7, "Walker2d-v5": 1.4, "Ant-v5": 0.6}[env_id]
    z_spread = {"Hopper-v5": 0.3, "Walker2d-v5": 0.8, "Ant-v5": 0.5}[env_id]
    observations, unhealthy = [], []
    for _ in range(300):
        qpos = env.init_qpos + rng.normal(0, 0.15, env.model.nq) * rng.uniform(0, 6)
        qpos[2 if env_id == "Ant-v5" else 1] = z_center + rng.uniform(-z_spread, z_spread)
        qvel = rng.normal(0, 1.0, env.model.nv)
        env.set_state(qpos, qvel)
        observations.append(env._get_obs())
        unhealthy.append(not env.is_healthy)
    observations, unhealthy = np.array(observations), np.array(unhealthy)
    assert 0 < unhealthy.sum() < len(unhealthy)
    mean, std = observations.mean(0), observations.std(0) + 1e-3
    rule = termination_fn_for(env_id, mean, std)
    np.testing.assert_array_equal(rule(_normalise(observations, mean, std)).numpy(), unhealthy)


def test_never_terminating_tasks_and_unknown_fallback():
    mean, std = np.zeros(17), np.ones(17)
    obs = torch.randn(4, 5, 17) * 100
    for env_id in ["HalfCheetah-v5", "mujoco/halfcheetah/medium-v0", "Swimmer-v5", "Pendulum-v1", "D4RL/pen/human-v2"]:
        rule = termination_fn_for(env_id, mean, std)
        assert rule.never and not rule(obs).any() and rule(obs).shape == (4, 5)
    with pytest.warns(UserWarning, match="No termination rule"):
        rule = termination_fn_for("MyCustomEnv-v0", mean, std)
    assert rule.never and not rule(obs).any()


def test_task_name_parsing():
    assert task_name("Hopper-v5") == task_name("mujoco/hopper/medium-v0") == task_name("hopper-medium-v2") == "hopper"
    assert task_name("Walker2d-v4") == task_name("mujoco/walker2d/expert-v0") == "walker2d"
    assert task_name("Ant-v5") == "ant" and task_name("AntMaze_UMaze-v4") is None
    assert task_name("Pendulum-v1") == "never" and task_name("InvertedPendulum-v5") == "invertedpendulum"
    assert task_name(None) is None


def test_rule_rejects_wrong_obs_dim_and_keeps_batch_shape():
    rule = termination_fn_for("Hopper-v5", np.zeros(11), np.ones(11))
    with pytest.raises(ValueError, match="dim 11"):
        rule(torch.zeros(3, 12))
    obs = torch.zeros(2, 3, 11)
    obs[..., 0] = 1.2  # healthy height, zero angle
    obs[1, 2, 1] = 0.5  # torso angle out of range
    expected = torch.zeros(2, 3, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(rule(obs), expected)
