"""Policy aliases of :class:`~sb3_uepo.uepo.UEPO` (as ``stable_baselines3/ppo/policies.py``).

``DiffusionPolicy``: the denoising-chain actor-critic (UEPO). ``MlpPolicy``: SB3's Gaussian ``ActorCriticPolicy`` with
a fixed observation normalisation (identity until set), for the Uni-O4 baseline (``preset="uni_o4"``): the offline
Gaussian members are trained on normalised observations, and the normalisation must travel with the policy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import get_flattened_obs_dim
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import PyTorchObs

from sb3_uepo.common.policies import DiffusionPolicy


class MlpPolicy(ActorCriticPolicy):
    """SB3's ``ActorCriticPolicy`` (same arguments) that first normalises observations as ``(s - mean) / std`` with
    FIXED statistics: registered buffers, saved with the model, identity until :meth:`set_observation_statistics`.

    :param value_lr_scale: the critic's (value MLP and head) learning rate is ``value_lr_scale`` times the actor's, as
        the DiffusionPolicy's (Uni-O4 online: 10); UEPO applies it at every learning-rate update. 1.0: SB3's one rate
    """

    obs_mean: th.Tensor
    obs_std: th.Tensor

    def __init__(self, *args: Any, value_lr_scale: float = 1.0, **kwargs: Any) -> None:
        if value_lr_scale <= 0:
            raise ValueError(f"value_lr_scale must be > 0, got {value_lr_scale}")
        self.value_lr_scale = value_lr_scale
        super().__init__(*args, **kwargs)
        obs_dim = get_flattened_obs_dim(self.observation_space)
        self.register_buffer("obs_mean", th.zeros(obs_dim))
        self.register_buffer("obs_std", th.ones(obs_dim))

    def _build(self, lr_schedule: Any) -> None:
        """SB3's networks; the optimizer gets an actor and a critic parameter group (``lr_scale`` per group)."""
        super()._build(lr_schedule)
        actor, critic = self.actor_critic_parameters()
        lr = lr_schedule(1)
        self.optimizer = self.optimizer_class(
            [
                {"params": actor, "lr": lr, "lr_scale": 1.0, "name": "actor"},
                {"params": critic, "lr": lr * self.value_lr_scale, "lr_scale": self.value_lr_scale, "name": "value"},
            ],
            lr=lr,
            **self.optimizer_kwargs,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data["value_lr_scale"] = self.value_lr_scale
        return data

    def set_observation_statistics(self, mean: np.ndarray | th.Tensor, std: np.ndarray | th.Tensor) -> None:
        """Fix the observation normalisation (e.g. to the offline dataset's statistics).

        :param mean: (O,) per-dimension mean
        :param std: (O,) per-dimension std, floored at 1e-6
        """
        mean_t = th.as_tensor(mean, dtype=th.float32).reshape(-1)
        std_t = th.as_tensor(std, dtype=th.float32).reshape(-1)
        if mean_t.shape != self.obs_mean.shape or std_t.shape != self.obs_std.shape:
            raise ValueError(
                f"observation statistics must have shape {tuple(self.obs_mean.shape)}, got {mean_t.shape} and {std_t.shape}"
            )
        if not (th.isfinite(mean_t).all() and th.isfinite(std_t).all()):
            raise ValueError("observation statistics must be finite")
        self.obs_mean.copy_(mean_t)
        self.obs_std.copy_(std_t.clamp(min=1e-6))

    def load_offline_result(self, result: Any, member: str = "chosen") -> None:
        """Load an offline result of Gaussian members: the chosen actor into ``mlp_extractor.policy_net``,
        ``action_net`` and ``log_std``, the IQL value split into ``mlp_extractor.value_net`` and ``value_net``, and
        the dataset's observation statistics.

        :param result: an :class:`~sb3_uepo.offline.pipeline.OfflineResult` of Gaussian members
        :param member: ``"chosen"`` (Gaussian results have no behaviour diffusion model)
        """
        if result.policy_type != "gaussian" or member != "chosen":
            raise ValueError(
                f"an MlpPolicy loads the chosen Gaussian member, got member={member!r} of {result.policy_type!r} members"
            )
        self.set_observation_statistics(result.obs_mean, result.obs_std)
        actor = result.policy_state_dict
        for prefix, module in (("policy_net.", self.mlp_extractor.policy_net), ("action_net.", self.action_net)):
            module.load_state_dict({k.removeprefix(prefix): v for k, v in actor.items() if k.startswith(prefix)})
        with th.no_grad():
            self.log_std.copy_(actor["log_std"])
        value = result.value_state_dict  # Sequential(*create_mlp(O, 1, arch)): hidden layers, then the output layer
        last = max(int(k.split(".")[0]) for k in value)
        self.mlp_extractor.value_net.load_state_dict({k: v for k, v in value.items() if int(k.split(".")[0]) != last})
        self.value_net.load_state_dict({k.split(".", 1)[1]: v for k, v in value.items() if int(k.split(".")[0]) == last})

    def value_head(self) -> th.nn.Linear:
        """The value network's output layer (e.g. to change the units of the value)."""
        assert isinstance(self.value_net, th.nn.Linear)
        return self.value_net

    def actor_critic_parameters(self) -> tuple[list[th.nn.Parameter], list[th.nn.Parameter]]:
        """(actor, critic) parameters, clipped separately by UEPO: the value head and the value MLP (and a separate
        value features extractor) are the critic, everything else the actor."""
        critic = list(self.value_net.parameters()) + list(self.mlp_extractor.value_net.parameters())
        if not self.share_features_extractor:
            critic += list(self.vf_features_extractor.parameters())
        critic_ids = {id(p) for p in critic}
        return [p for p in self.parameters() if id(p) not in critic_ids], critic

    def normalize_obs(self, obs: PyTorchObs) -> th.Tensor:
        """``(obs - mean) / std`` with the fixed statistics."""
        assert isinstance(obs, th.Tensor), "MlpPolicy takes flat Box observations"
        return (obs.float() - self.obs_mean) / self.obs_std

    # forward() and evaluate_actions() go through extract_features(); get_distribution() and predict_values() call
    # BaseModel.extract_features directly (SB3 2.x), so each path normalises exactly once.
    def extract_features(  # type: ignore[override]
        self, obs: PyTorchObs, features_extractor: BaseFeaturesExtractor | None = None
    ) -> th.Tensor | tuple[th.Tensor, th.Tensor]:
        return super().extract_features(self.normalize_obs(obs), features_extractor)

    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        return super().get_distribution(self.normalize_obs(obs))

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        return super().predict_values(self.normalize_obs(obs))


__all__ = ["DiffusionPolicy", "MlpPolicy"]
