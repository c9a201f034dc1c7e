"""Rollout storage for PPO over the denoising chain.

Owns: :class:`DiffusionRolloutBuffer`, SB3's ``RolloutBuffer`` plus the sampled chain and its per-step
log-probabilities (the MaskablePPO pattern: extra arrays in ``reset()``, keyword extras in ``add()``, a NamedTuple of
samples). Must not touch: how chains are sampled or scored (``policies.py``) and the loss (``uepo/uepo.py``).

Shape symbols: ``T`` buffer size (steps per env), ``N`` envs, ``S`` denoising steps, ``A`` action dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.vec_env import VecNormalize

from sb3_uepo.common.type_aliases import DiffusionRolloutBufferSamples


class DiffusionRolloutBuffer(RolloutBuffer):
    """Rollout buffer that also stores, per step and env, the denoising chain ``(S + 1, A)`` that produced the action
    and the chain's per-step log-probabilities ``(S,)`` under the policy that sampled it.

    ``actions`` holds the action sent to the environment (the chain's last element clipped to [-1, 1]);
    ``log_probs`` holds the chain log-probability (sum over the steps).

    :param buffer_size: number of steps per environment
    :param observation_space: observation space
    :param action_space: action space
    :param device: PyTorch device of the sampled minibatches
    :param gae_lambda: GAE lambda
    :param gamma: discount factor
    :param n_envs: number of parallel environments
    :param n_sampling_steps: number of denoising steps ``S`` of the policy's chains
    """

    chains: np.ndarray  # (T, N, S + 1, A)
    step_log_probs: np.ndarray  # (T, N, S)

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        gae_lambda: float = 1,
        gamma: float = 0.99,
        n_envs: int = 1,
        n_sampling_steps: int = 5,
    ) -> None:
        if n_sampling_steps < 1:
            raise ValueError(f"n_sampling_steps must be >= 1, got {n_sampling_steps}")
        self.n_sampling_steps = n_sampling_steps  # needed by reset(), which the parent constructor calls
        super().__init__(buffer_size, observation_space, action_space, device, gae_lambda, gamma, n_envs)

    def reset(self) -> None:
        shape = (self.buffer_size, self.n_envs)
        self.chains = np.zeros((*shape, self.n_sampling_steps + 1, self.action_dim), dtype=np.float32)
        self.step_log_probs = np.zeros((*shape, self.n_sampling_steps), dtype=np.float32)
        self.reference_means: np.ndarray | None = None
        super().reset()

    def set_reference_means(self, compute: Callable[[th.Tensor, th.Tensor], th.Tensor], chunk: int = 4096) -> None:
        """Store the step means of a FROZEN reference policy for every stored chain, computed once per rollout
        instead of once per minibatch and epoch (they do not change during the update). Minibatches then carry them
        as ``reference_means``.

        :param compute: ``compute(observations (B, O), chains (B, S + 1, A)) -> (B, K, A)`` step means
        :param chunk: rows per call
        """
        assert self.full, "the rollout buffer must be full before the reference means are computed"
        rows = self.buffer_size * self.n_envs
        flat = self.generator_ready  # get() flattens the arrays in place on its first call
        observations = self.observations.reshape(rows, -1)
        chains = self.chains.reshape(rows, self.n_sampling_steps + 1, self.action_dim)
        parts = []
        with th.no_grad():
            for start in range(0, rows, chunk):
                obs_t = self.to_torch(observations[start : start + chunk])
                parts.append(compute(obs_t, self.to_torch(chains[start : start + chunk])).cpu().numpy())
        means = np.concatenate(parts).astype(np.float32, copy=False)
        # the (T, N) layout of the other arrays until get() flattens them (swap_and_flatten: env-major)
        self.reference_means = means if flat else means.reshape(self.buffer_size, self.n_envs, *means.shape[1:])

    def add(  # type: ignore[override]
        self,
        *args,
        chains: th.Tensor | np.ndarray | None = None,
        step_log_probs: th.Tensor | np.ndarray | None = None,
        **kwargs,
    ) -> None:
        """Add one step of every env: SB3's ``RolloutBuffer.add`` arguments, plus

        :param chains: (N, S + 1, A) the sampled chains, unclipped
        :param step_log_probs: (N, S) their per-step log-probabilities
        """
        if chains is None or step_log_probs is None:
            raise ValueError(
                "DiffusionRolloutBuffer.add() needs chains= and step_log_probs= "
                "(from DiffusionPolicy.sample_chain_with_values); a Gaussian policy uses the plain RolloutBuffer"
            )
        self.chains[self.pos] = _to_numpy(chains).reshape(self.n_envs, self.n_sampling_steps + 1, self.action_dim)
        self.step_log_probs[self.pos] = _to_numpy(step_log_probs).reshape(self.n_envs, self.n_sampling_steps)
        super().add(*args, **kwargs)

    def get(self, batch_size: int | None = None) -> Generator[DiffusionRolloutBufferSamples, None, None]:  # type: ignore[override]
        assert self.full, "the rollout buffer must be full before sampling minibatches"
        indices = np.random.permutation(self.buffer_size * self.n_envs)
        if not self.generator_ready:
            names = ("observations", "actions", "values", "log_probs", "advantages", "returns", "chains", "step_log_probs")
            if self.reference_means is not None:
                names = (*names, "reference_means")
            for name in names:
                self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
            self.generator_ready = True

        if batch_size is None:  # the whole buffer as one minibatch
            batch_size = self.buffer_size * self.n_envs
        start_idx = 0
        while start_idx < self.buffer_size * self.n_envs:
            yield self._get_samples(indices[start_idx : start_idx + batch_size])
            start_idx += batch_size

    def _get_samples(  # type: ignore[override]
        self, batch_inds: np.ndarray, env: VecNormalize | None = None
    ) -> DiffusionRolloutBufferSamples:
        data = (
            self.observations[batch_inds],
            self.actions[batch_inds].astype(np.float32, copy=False),
            self.values[batch_inds].flatten(),
            self.log_probs[batch_inds].flatten(),
            self.advantages[batch_inds].flatten(),
            self.returns[batch_inds].flatten(),
            self.chains[batch_inds],
            self.step_log_probs[batch_inds],
        )
        if self.reference_means is not None:
            data = (*data, self.reference_means[batch_inds])
        return DiffusionRolloutBufferSamples(*map(self.to_torch, data))


def _to_numpy(x: th.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, th.Tensor) else np.asarray(x)
