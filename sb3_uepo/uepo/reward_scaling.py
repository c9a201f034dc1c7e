"""Reward scaling inside the algorithm: VecNormalize's ``norm_reward`` without the wrapper.

Owns: :class:`RewardScaler` and :func:`scale_value_head`. Must not touch: rollout collection (``rollouts.py`` calls the
scaler), the offline stages.

Why not ``VecNormalize``: its observation normalisation would fight the policy's fixed (dataset) statistics, and its
return statistics start from nothing at the switch, while the value network starts from the offline IQL value in the
task's reward units. Here the statistics start from the DATASET's discounted returns, so the scale is known at the
hand-over and the IQL value is converted to it once (:func:`scale_value_head`); online transitions then update the
statistics as ``VecNormalize`` does (the dataset's count weighs them, so the scale moves slowly).

Rewards are divided by the std of the running discounted return ``G_t = gamma G_{t-1} + r_t`` (reset at episode
ends) and clipped to ``+-clip``, exactly ``VecNormalize(norm_obs=False, norm_reward=True)``'s formula.
"""

from __future__ import annotations

import numpy as np
import torch as th
from stable_baselines3.common.running_mean_std import RunningMeanStd
from torch import nn


class RewardScaler:
    """``r / sqrt(Var[G] + epsilon)``, clipped, with ``G`` the per-env discounted return so far.

    :param gamma: discount of the return whose std scales the rewards (the algorithm's)
    :param clip: clip of the scaled reward (VecNormalize's ``clip_reward``)
    :param epsilon: added to the variance
    """

    def __init__(self, gamma: float, clip: float = 10.0, epsilon: float = 1e-8) -> None:
        self.gamma = gamma
        self.clip = clip
        self.epsilon = epsilon
        self.return_rms = RunningMeanStd(shape=())
        self._returns: np.ndarray | None = None  # (n_envs,) discounted returns of the running episodes

    @property
    def scale(self) -> float:
        """The divisor of the rewards, ``sqrt(Var[G] + epsilon)``."""
        return float(np.sqrt(self.return_rms.var + self.epsilon))

    def fit_dataset(self, rewards: np.ndarray, episode_starts: np.ndarray) -> None:
        """Start the statistics from a dataset's discounted returns so far (``G`` at every transition of its episodes,
        in order), as if its transitions had been collected online.

        :param rewards: (N,) rewards in episode order
        :param episode_starts: (N,) True at the first transition of every episode
        """
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        starts = np.asarray(episode_starts, dtype=bool).reshape(-1)
        if len(rewards) == 0 or len(starts) != len(rewards):
            raise ValueError(
                f"fit_dataset needs rewards and episode starts of one length > 0, got {len(rewards)}, {len(starts)}"
            )
        if not np.isfinite(rewards).all():
            raise ValueError("the dataset's rewards contain NaN or inf: clean the dataset before fine-tuning on it")
        returns = np.empty_like(rewards)
        running = 0.0
        for i, (reward, start) in enumerate(zip(rewards, starts, strict=True)):
            running = reward + (0.0 if start else self.gamma * running)
            returns[i] = running
        self.return_rms = RunningMeanStd(shape=())
        self.return_rms.update(returns)

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """Update the statistics with one env step of every env and return the scaled rewards.

        :param rewards: (n_envs,) raw rewards of this step
        :param dones: (n_envs,) episode ends after this step
        :return: (n_envs,) scaled rewards (float32)
        """
        rewards = np.asarray(rewards, dtype=np.float64)
        if self._returns is None or self._returns.shape != rewards.shape:
            self._returns = np.zeros_like(rewards)
        self._returns = self._returns * self.gamma + rewards
        self.return_rms.update(self._returns)
        scaled = np.clip(rewards / self.scale, -self.clip, self.clip)
        self._returns[np.asarray(dones, dtype=bool)] = 0.0
        return scaled.astype(np.float32)

    def reset(self) -> None:
        """Forget the running episodes' returns (e.g. a new environment); the statistics stay."""
        self._returns = None


def scale_value_head(head: nn.Linear, factor: float) -> None:
    """Multiply the output of a value network's last linear layer by ``factor`` (e.g. ``1 / scale`` to express a value
    learned on raw rewards in scaled-reward units).

    :param head: the output layer (one output)
    :param factor: positive factor
    """
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise ValueError(f"the value head must be a Linear layer with one output, got {head}")
    if not (np.isfinite(factor) and factor > 0):
        raise ValueError(f"the value scale factor must be finite and > 0, got {factor}")
    with th.no_grad():
        head.weight.mul_(factor)
        head.bias.mul_(factor)
