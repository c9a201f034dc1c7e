"""Reward scaling inside UEPO (``normalize_reward``): VecNormalize's formula, statistics from the dataset, the IQL
value converted at the hand-over, scaled rewards in the rollout buffer, saved with the model."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_uepo import UEPO
from sb3_uepo.uepo.reward_scaling import RewardScaler, scale_value_head


def test_scaler_matches_vec_normalize_reward_scaling():
    gamma, n_envs = 0.9, 2
    vec_normalize = VecNormalize(
        DummyVecEnv([lambda: gym.make("Pendulum-v1")] * n_envs), norm_obs=False, norm_reward=True, gamma=gamma
    )
    scaler = RewardScaler(gamma)
    rng = np.random.default_rng(0)
    for _ in range(50):
        rewards = rng.normal(3.0, 2.0, size=n_envs).astype(np.float32)
        dones = rng.random(n_envs) < 0.1
        vec_normalize._update_reward(rewards)  # VecNormalize.step_wait's order: update, normalise, reset at dones
        expected = vec_normalize.normalize_reward(rewards)
        vec_normalize.returns[dones] = 0
        np.testing.assert_allclose(scaler(rewards, dones), expected, rtol=1e-5)


def test_scaler_starts_from_the_dataset_returns(tiny_dataset):
    dataset = tiny_dataset()
    scaler = RewardScaler(gamma=0.99)
    scaler.fit_dataset(dataset.rewards, dataset.episode_starts)
    partial_returns = []
    for episode in dataset.episode_slices():  # G_t = r_t + gamma G_{t-1} within each episode
        running = 0.0
        for reward in dataset.rewards[episode]:
            running = reward + 0.99 * running
            partial_returns.append(running)
    assert scaler.scale == pytest.approx(np.std(partial_returns), rel=1e-4)
    assert scaler.return_rms.count == pytest.approx(len(dataset), rel=1e-3)


def test_scaler_rejects_bad_dataset_rewards():
    with pytest.raises(ValueError, match="NaN"):
        RewardScaler(0.99).fit_dataset(np.array([1.0, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="length"):
        RewardScaler(0.99).fit_dataset(np.array([1.0, 2.0]), np.array([True]))


def test_scale_value_head_scales_the_output():
    net = th.nn.Sequential(th.nn.Linear(3, 4), th.nn.Tanh(), th.nn.Linear(4, 1))
    x = th.randn(5, 3)
    before = net(x).detach()
    scale_value_head(net[-1], 0.25)
    assert th.allclose(net(x), before * 0.25, atol=1e-6)
    with pytest.raises(ValueError, match="one output"):
        scale_value_head(net[0], 0.5)


def test_fine_tuning_stores_scaled_rewards_and_saves_the_statistics(diffusion_model, pendulum_dataset, tmp_path):
    dataset = pendulum_dataset()
    buffers = {}
    for normalize in (False, True):
        model = diffusion_model(dataset, normalize_reward=normalize, kl_ref_coef=0.0)
        model.pretrain()
        start_scale = model.reward_scaler.scale if normalize else None
        model.learn(32)  # one rollout, no timeout inside it
        buffers[normalize] = model.rollout_buffer.rewards.copy()
    assert model.normalize_reward and model.reward_scaler is not None
    scale = model.reward_scaler.scale
    assert start_scale > 1.0  # Pendulum's returns vary by tens to hundreds
    # the same actions (same seeds, same weights apart from the value head): raw rewards divided by the scale of the
    # moment, which moves from the dataset's towards the online returns' during the rollout
    ratios = (buffers[False] / buffers[True]).ravel()
    assert ratios[-1] == pytest.approx(scale, rel=1e-4)  # the last step's reward used the final statistics
    np.testing.assert_allclose(ratios, start_scale, rtol=0.1)

    model.save(tmp_path / "model.zip")
    loaded = UEPO.load(tmp_path / "model.zip")
    assert loaded.reward_scaler.scale == pytest.approx(scale)
    assert loaded.reward_scaler.return_rms.count == pytest.approx(model.reward_scaler.return_rms.count)


def test_from_scratch_keeps_raw_rewards_like_ppo():
    model = UEPO("DiffusionPolicy", "Pendulum-v1", n_steps=16, batch_size=16, seed=0)
    assert not model.normalize_reward and model.reward_scaler is None


def test_rewards_scaled_twice_are_reported(diffusion_model, pendulum_dataset):
    env = VecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]), norm_obs=False, norm_reward=True)
    model = diffusion_model(pendulum_dataset(), env=env)
    with pytest.warns(UserWarning, match="scales rewards that UEPO scales again"):
        model.learn(32)
