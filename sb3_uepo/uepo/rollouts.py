"""Rollout collection of :class:`~sb3_uepo.uepo.UEPO`: SB3's ``OnPolicyAlgorithm.collect_rollouts``, storing the
denoising chain (and its per-step log-densities) of every step taken by a DiffusionPolicy.

Owns: :class:`ChainRolloutMixin`. Must not touch: the PPO update (``uepo.py``), rollout storage (``common/buffers.py``).
"""

from __future__ import annotations

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from sb3_uepo.common.policies import DiffusionPolicy


class ChainRolloutMixin:
    """``collect_rollouts`` of UEPO (mixed into the algorithm class, which provides SB3's on-policy attributes)."""

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """SB3's ``OnPolicyAlgorithm.collect_rollouts``, storing the denoising chains of a DiffusionPolicy.

        :param env: the training environment
        :param callback: callback called at every step
        :param rollout_buffer: buffer to fill
        :param n_rollout_steps: steps to collect per environment
        :return: False if the callback stopped the rollout early
        """
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        is_diffusion = isinstance(self.policy, DiffusionPolicy)
        n_steps = 0
        rollout_buffer.reset()
        if self.use_sde:
            self.policy.reset_noise(env.num_envs)  # type: ignore[union-attr]

        callback.on_rollout_start()

        while n_steps < n_rollout_steps:
            if self.use_sde and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                self.policy.reset_noise(env.num_envs)  # type: ignore[union-attr]

            with th.no_grad():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
                chain_kwargs: dict[str, th.Tensor] = {}
                if is_diffusion:
                    sample = self.policy.sample_chain_with_values(obs_tensor)  # type: ignore[union-attr, arg-type]
                    actions_t, values, log_probs = sample.actions, sample.values, sample.log_prob
                    chain_kwargs = {"chains": sample.chain, "step_log_probs": sample.step_log_prob}
                else:
                    actions_t, values, log_probs = self.policy(obs_tensor)
            actions = actions_t.cpu().numpy()

            if self.policy.squash_output:  # DiffusionPolicy: actions in [-1, 1] -> env bounds
                clipped_actions = self.policy.unscale_action(actions)
            else:  # Gaussian: clip to the bounds
                clipped_actions = np.clip(actions, self.action_space.low, self.action_space.high)  # type: ignore[attr-defined]

            new_obs, rewards, dones, infos = env.step(clipped_actions)
            self.num_timesteps += env.num_envs

            callback.update_locals(locals())
            if not callback.on_step():
                return False

            self._update_info_buffer(infos, dones)
            n_steps += 1
            if self.reward_scaler is not None:  # in the value's units; the episode infos keep the raw returns
                rewards = self.reward_scaler(rewards, dones)

            # Handle timeout by bootstrapping with the value function (SB3 issue #633)
            for idx, done in enumerate(dones):
                if (
                    done
                    and infos[idx].get("terminal_observation") is not None
                    and infos[idx].get("TimeLimit.truncated", False)
                ):
                    terminal_obs = self.policy.obs_to_tensor(infos[idx]["terminal_observation"])[0]
                    with th.no_grad():
                        terminal_value = self.policy.predict_values(terminal_obs)[0]  # type: ignore[arg-type]
                    rewards[idx] += self.gamma * terminal_value

            rollout_buffer.add(
                self._last_obs,  # type: ignore[arg-type]
                actions,
                rewards,
                self._last_episode_starts,  # type: ignore[arg-type]
                values,
                log_probs,
                **chain_kwargs,
            )
            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_episode_starts = dones

        with th.no_grad():
            values = self.policy.predict_values(obs_as_tensor(new_obs, self.device))  # type: ignore[arg-type]

        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True
