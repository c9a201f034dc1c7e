"""The offline-to-online hand-over: one place translates between a policy's architecture and the offline settings.

Owns: :data:`DIFFUSION_ARCHITECTURE` and :data:`GAUSSIAN_ARCHITECTURE` (the one table per policy type: which policy
keyword argument is which :class:`~sb3_uepo.offline.config.OfflineConfig` field, and how a value converts in each
direction), :func:`policy_kwargs_from_offline` (offline settings -> the policy kwargs the user left out),
:func:`offline_config_for` (a built policy + preset -> the offline config that pretrains networks it can load) and
:func:`check_gaussian_action_bounds`, and :class:`OfflineHandoverMixin`, UEPO's offline seam (``pretrain``,
``load_offline_result``, ``set_reference_policy``, ``steer``). Loading a result into a policy is the policy's own method
(``DiffusionPolicy.load_offline_result``, ``MlpPolicy.load_offline_result``).
Must not touch: the offline stages (``sb3_uepo/offline``), the PPO update (``uepo.py``).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.logger import Logger, make_output_format
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.utils import get_latest_run_id
from torch import nn

from sb3_uepo.common.policies import DiffusionPolicy
from sb3_uepo.offline.config import activation_class, activation_name
from sb3_uepo.uepo.defaults import NOISE_BOUND, NOISE_PENALTY
from sb3_uepo.uepo.reward_scaling import scale_value_head


@dataclass(frozen=True)
class Field:
    """One architecture setting: the policy attribute / keyword, the offline config field, and the conversions.

    :param policy_key: keyword argument of the policy (and the attribute that holds it)
    :param offline_key: field of ``OfflineConfig``
    :param to_policy: offline value -> policy value
    :param to_offline: policy value -> offline value
    """

    policy_key: str
    offline_key: str
    to_policy: Callable[[Any], Any] = lambda value: value
    to_offline: Callable[[Any], Any] = lambda value: value


DIFFUSION_ARCHITECTURE: tuple[Field, ...] = (
    Field("net_arch", "denoiser_hidden_sizes", list, tuple),
    Field("time_embed_dim", "time_embed_dim"),
    Field("n_train_steps", "n_diffusion_steps"),
    Field("n_sampling_steps", "n_sampling_steps"),
    Field("sampler", "sampler"),  # policy attribute: sampler_name
    Field("min_std", "min_std"),
    Field("value_net_arch", "value_net_arch", list, tuple),
    Field("value_activation_fn", "value_activation", activation_class, activation_name),
)
# The Gaussian MlpPolicy (SB3's ActorCriticPolicy): one activation for actor and critic, net_arch=dict(pi, vf).
GAUSSIAN_ARCHITECTURE: tuple[Field, ...] = (
    Field("net_arch.pi", "gaussian_hidden_sizes", list, tuple),
    Field("net_arch.vf", "value_net_arch", list, tuple),
    Field("activation_fn", "gaussian_activation", activation_class, activation_name),
    Field("activation_fn", "value_activation", activation_class, activation_name),
)


def architecture_of(policy_class: type[BasePolicy]) -> tuple[Field, ...]:
    """The table of a policy class (DiffusionPolicy or an ActorCriticPolicy)."""
    if issubclass(policy_class, DiffusionPolicy):
        return DIFFUSION_ARCHITECTURE
    if issubclass(policy_class, ActorCriticPolicy):
        return GAUSSIAN_ARCHITECTURE
    raise ValueError(f"no offline hand-over for the policy class {policy_class.__name__}")


def policy_kwargs_from_offline(policy_class: type[BasePolicy], config: Any, policy_kwargs: dict[str, Any]) -> None:
    """Fill, in place, the architecture keywords ``policy_kwargs`` leaves out from the offline config, so that the
    offline networks load into the policy. What the user set stays (a conflict is reported by
    :func:`offline_config_for`)."""
    if issubclass(policy_class, DiffusionPolicy) and isinstance(policy_kwargs.get("net_arch"), dict):
        fields = [f for f in DIFFUSION_ARCHITECTURE if f.policy_key not in ("net_arch", "value_net_arch")]
    else:
        fields = list(architecture_of(policy_class))
    for f in fields:
        value = f.to_policy(getattr(config, f.offline_key))
        head, _, sub = f.policy_key.partition(".")
        if sub:
            arch = policy_kwargs.setdefault(head, {})
            if isinstance(arch, dict):
                arch.setdefault(sub, value)
        else:
            policy_kwargs.setdefault(head, value)


def _policy_value(policy: BasePolicy, key: str) -> Any:
    head, _, sub = key.partition(".")
    if isinstance(policy, DiffusionPolicy) and head == "sampler":
        return policy.sampler_name
    value = getattr(policy, head)
    if sub:  # an ActorCriticPolicy's net_arch: dict(pi, vf), or one list shared by both
        return value.get(sub, []) if isinstance(value, dict) else value
    return value


def offline_config_for(policy: BasePolicy, preset: str | None, offline_kwargs: dict[str, Any] | None, seed: int | None) -> Any:
    """The offline config whose networks load into ``policy``: the preset and ``offline_kwargs``, with the policy's
    architecture and ``seed`` (where ``offline_kwargs`` does not set it). The offline discount is the preset's (0.99,
    or ``offline_kwargs["gamma"]``), not UEPO's online ``gamma``: changing the online discount keeps the offline result.

    :raises ValueError: the policy and the preset do not fit together (a DiffusionPolicy with Gaussian members, an
        MlpPolicy with diffusion members, an activation the offline stages do not build, conflicting sizes)
    """
    from sb3_uepo.offline.config import resolve_offline_config

    user = dict(offline_kwargs or {})
    config = resolve_offline_config(preset or "default", user)
    name = type(policy).__name__
    if isinstance(policy, DiffusionPolicy):
        if config.policy_type != "diffusion":
            raise ValueError(
                f"preset {preset!r} pretrains Gaussian members (the Uni-O4 or BC baseline): use UEPO('MlpPolicy', ...), "
                "or drop the variant from the preset to pretrain the DiffusionPolicy"
            )
        if policy.activation_fn is not nn.Mish:
            raise ValueError(
                "the offline denoiser uses Mish activations: pretraining needs the DiffusionPolicy's default "
                f"activation_fn=nn.Mish, got {policy.activation_fn.__name__}"
            )
    elif config.policy_type != "gaussian":
        raise ValueError(
            f"UEPO('{name}') pretrains Gaussian members, which the preset {preset!r} does not: use "
            f"preset='{(preset or 'default').split('+')[0]}+uni_o4' (the Uni-O4 baseline) or '+bc', "
            "or policy='DiffusionPolicy'"
        )
    arch = {f.offline_key: f.to_offline(_policy_value(policy, f.policy_key)) for f in architecture_of(type(policy))}
    conflicts = [
        f"{key}={user[key]!r} (policy: {value!r})"
        for key, value in arch.items()
        if key in user and (tuple(user[key]) if isinstance(user[key], list) else user[key]) != value
    ]
    if conflicts:
        raise ValueError(
            f"offline_kwargs set an architecture different from the {name}'s: {', '.join(conflicts)}. "
            "The offline networks are loaded into the policy, so they must match: set the architecture in "
            "policy_kwargs only (or the same value in both)."
        )
    if "seed" not in user and seed is not None:
        arch["seed"] = int(seed)
    return resolve_offline_config(config, arch)


def check_gaussian_action_bounds(action_space: Any) -> None:
    """The Gaussian members act in [-1, 1]; the MlpPolicy acts in env units: they agree only on a [-1, 1] space."""
    low, high = action_space.low, action_space.high
    if not (np.allclose(low, -1.0) and np.allclose(high, 1.0)):
        raise ValueError(
            "the Gaussian MlpPolicy acts in env units while the offline members act in [-1, 1]: pretraining it needs "
            f"an action space of [-1, 1] (got low={low}, high={high}); wrap the env in "
            "gymnasium.wrappers.RescaleAction(env, -1.0, 1.0), or use the DiffusionPolicy (it rescales itself)"
        )


class OfflineHandoverMixin:
    """The offline seam of :class:`~sb3_uepo.uepo.UEPO`: :meth:`pretrain`, :meth:`offline_config`,
    :meth:`load_offline_result`, :meth:`set_reference_policy` (the KL reference), :meth:`steer` (noise-space steering)
    and the check that observations are not normalised twice. Mixed into the algorithm class, which provides SB3's
    attributes (``policy``, ``env``, ``seed``, ``gamma``, ``verbose``, ``device``, ``tensorboard_log``) and UEPO's own
    (``dataset``, ``preset``, ``offline_kwargs``, ``pretrain_dir``, ``kl_ref_coef``, ``reward_scaler``)."""

    def _reference_needed(self) -> bool:
        return self.kl_ref_coef > 0.0 or self._reference_policy_set

    @staticmethod
    def _frozen_copy(policy: BasePolicy) -> Any:
        # SB3's action distributions cache their last torch distribution and gSDE noise: tensors inside the autograd
        # graph, which deepcopy refuses. The reference recomputes them when used, so its copy leaves them out (None).
        memo: dict[int, Any] = {}
        for value in getattr(getattr(policy, "action_dist", None), "__dict__", {}).values():
            if isinstance(value, (th.Tensor, th.distributions.Distribution)):
                memo[id(value)] = None
        reference = copy.deepcopy(policy, memo)
        del reference.optimizer  # never stepped; keep neither its state nor a second set of moments
        reference.requires_grad_(False)
        reference.set_training_mode(False)
        return reference

    def pretrain(self, progress_bar: bool = False) -> dict[str, Any]:
        """Run the offline stages (1-6 in docs/algorithm.md) on ``self.dataset``; hand the chosen policy to online learning.

        Never touches the environment: the member handed on is chosen by offline policy evaluation alone. The chosen
        member's weights (and its seed noise) go into the policy, the IQL value into the value network, the dataset's
        observation statistics become the policy's fixed normalisation, and (``kl_ref_coef > 0``) the resulting policy
        is frozen as the KL reference. :meth:`learn` calls this once when a dataset was given; a loaded pretrained
        model skips it. With ``pretrain_dir``, an interrupted run resumes from its last completed stage.

        :param progress_bar: one progress bar per stage
        :return: the report: per-stage losses and times, OPE scores per member, the chosen member and why
        """
        if self.dataset is None:
            raise ValueError("pretrain() needs a dataset: UEPO(..., dataset=...)")
        if self.pretrained:
            warnings.warn("pretrain(): this model is already pretrained; returning the stored report")
            return dict(self.offline_report or {})
        from sb3_uepo.offline.pipeline import OfflinePretrainer

        dataset = self._resolve_dataset()
        config = self.offline_config()
        if not isinstance(self.policy, DiffusionPolicy):
            check_gaussian_action_bounds(self.action_space)
        pretrainer = OfflinePretrainer(
            dataset,
            self.observation_space,
            self.action_space,
            config,
            logger=self._offline_logger(),
            checkpoint_dir=self.pretrain_dir,
            progress_bar=progress_bar,
            device=self.device,
            env_id=getattr(dataset, "env_id", None) or self._env_id(),
            verbose=self.verbose,
            n_jobs=getattr(self, "pretrain_jobs", 1),  # models saved before the option existed have none
        )
        result = pretrainer.run()
        self.offline_result = result
        self.load_offline_result(result, dataset=dataset)
        self.offline_report = result.to_report()
        self.pretrained = True
        return dict(self.offline_report)

    def _offline_logger(self) -> Logger:
        """The logger of the offline stages: the user's (``set_logger``), else TensorBoard under ``tensorboard_log``
        (run ``UEPO_offline_<i>``) and stdout tables only with ``verbose >= 2`` (progress bars report progress)."""
        if getattr(self, "_custom_logger", False):
            return self._logger
        output_formats = [make_output_format("stdout", "")] if self.verbose >= 2 else []
        folder = None
        if self.tensorboard_log is not None:
            folder = os.path.join(
                self.tensorboard_log, f"UEPO_offline_{get_latest_run_id(self.tensorboard_log, 'UEPO_offline') + 1}"
            )
            output_formats.append(make_output_format("tensorboard", folder))
        return Logger(folder, output_formats)

    def _maybe_pretrain(self, progress_bar: bool = False) -> None:
        """Called at the start of :meth:`learn`: run :meth:`pretrain` once when a dataset was given."""
        if self.dataset is not None and not self.pretrained:
            self.pretrain(progress_bar=progress_bar)

    def _resolve_dataset(self) -> Any:
        from sb3_uepo.common.datasets import load_dataset

        if self.dataset is None:
            return None
        if isinstance(self.dataset, (str, os.PathLike)):
            return load_dataset(self.dataset)
        return self.dataset

    def _env_id(self) -> str | None:
        if self.env is None:
            return None
        spec = self.env.get_attr("spec", [0])[0]
        return getattr(spec, "id", None)

    def offline_config(self) -> Any:
        """The :class:`~sb3_uepo.offline.config.OfflineConfig` that :meth:`pretrain` runs: preset +
        ``offline_kwargs``, with the architecture and seed of this model (``handover.offline_config_for``).
        Raises ``ValueError`` when the policy and the preset do not fit together."""
        return offline_config_for(self.policy, self.preset, self.offline_kwargs, self.seed)

    def load_offline_result(self, result: Any, member: str = "chosen", dataset: Any = None) -> None:
        """Put an offline result into the policy as :meth:`pretrain` does (the policy's own ``load_offline_result``:
        weights, IQL value, observation statistics, initial noise), then freeze the KL reference when
        ``kl_ref_coef > 0``; e.g. a result of :func:`~sb3_uepo.offline.pipeline.pretrain` run with
        :meth:`offline_config` elsewhere, or one of its members (``result.member(i)``). With ``normalize_reward``, the
        reward statistics start from the dataset's discounted returns and the IQL value is divided by their scale.

        :param result: an :class:`~sb3_uepo.offline.pipeline.OfflineResult`
        :param member: ``"chosen"`` (the member chosen offline) or ``"behavior"`` (the behaviour diffusion model of
            stage 1, i.e. diffusion BC; DiffusionPolicy only)
        :param dataset: the dataset the result was learned from (an
            :class:`~sb3_uepo.common.datasets.container.OfflineDataset`); None: this model's ``dataset``
        """
        if member not in ("chosen", "behavior"):
            raise ValueError(f"member must be 'chosen' or 'behavior', got {member!r}")
        self.policy.load_offline_result(result, member=member)  # type: ignore[union-attr]
        if self.reward_scaler is not None:
            self._start_reward_scale(dataset if dataset is not None else self._resolve_dataset())
        if self.kl_ref_coef > 0.0:
            self.set_reference_policy()

    def _start_reward_scale(self, dataset: Any) -> None:
        """Reward statistics from the dataset's returns; the (IQL) value network converted to the scaled units."""
        if dataset is None:
            warnings.warn(
                "normalize_reward=True without a dataset: the reward statistics start empty and the loaded value "
                "network stays in raw reward units until the value warm-up refits it"
            )
            return
        self.reward_scaler.fit_dataset(dataset.rewards, dataset.episode_starts)
        scale_value_head(self.policy.value_head(), 1.0 / self.reward_scaler.scale)  # type: ignore[union-attr]

    def steer(
        self,
        agent_class: Any = None,
        noise_bound: float = NOISE_BOUND,
        n_envs: int = 1,
        noise_penalty: float = NOISE_PENALTY,
        critic: str = "noise",
        **agent_kwargs: Any,
    ) -> Any:
        """Noise-space steering (DSRL): an SB3 off-policy agent (default SAC) learns which initial noise to give a
        FROZEN copy of this model's diffusion policy in each state. Pretrains first when a dataset was given.

        :param agent_class: SB3 off-policy algorithm class (default ``stable_baselines3.SAC``)
        :param noise_bound: half-width of the noise action space
        :param n_envs: environments of the agent
        :param noise_penalty: ``lambda`` of the agent's reward term ``-lambda * ||w||^2``, a Gaussian prior on the noise
            (0: none)
        :param critic: ``"noise"`` (the agent's critic takes the noise) or ``"action"`` (SAC whose critic takes the
            frozen policy's action, started from the offline IQL critic when this session pretrained)
        :param agent_kwargs: keyword arguments of the agent
        :return: a :class:`~sb3_uepo.uepo.steering.SteeredModel`; call ``.learn(steps)``, ``.predict``, ``.save``
        """
        from sb3_uepo.uepo.steering import steer

        if not isinstance(self.policy, DiffusionPolicy):
            raise ValueError("steering needs a DiffusionPolicy (it steers the initial noise of the denoising chain)")
        env_id = self._env_id()
        if env_id is None:
            raise ValueError("steering needs the model's environment id: build UEPO with a registered env")
        self._maybe_pretrain()
        q_state_dict = getattr(self.offline_result, "q_state_dict", None) if critic == "action" else None
        if critic == "action" and q_state_dict is None:
            warnings.warn("no offline IQL critic in this session (a loaded model): the action-space critic starts fresh")
        return steer(
            self.policy,
            env_id,
            agent_class,
            noise_bound,
            n_envs,
            self.seed,
            noise_penalty=noise_penalty,
            critic=critic,
            q_state_dict=q_state_dict,
            **agent_kwargs,
        )

    def set_reference_policy(self, policy_state: dict[str, th.Tensor] | None = None) -> None:
        """Freeze a copy of the current policy (or of ``policy_state``, a full policy ``state_dict``) as the
        reference of the KL term. The reference is saved with the model.

        :param policy_state: weights of the reference; None copies the current policy
        """
        self._reference_policy_set = True
        self.reference_policy = self._frozen_copy(self.policy)
        if policy_state is not None:
            self.reference_policy.load_state_dict(policy_state)

    def _warn_if_observations_normalised_twice(self) -> None:
        vec_normalize = self.get_vec_normalize_env()
        if vec_normalize is not None and vec_normalize.norm_reward and self.reward_scaler is not None:
            warnings.warn(
                "VecNormalize(norm_reward=True) scales rewards that UEPO scales again (normalize_reward=True): use "
                "VecNormalize(norm_reward=False), or UEPO(..., normalize_reward=False)"
            )
        if vec_normalize is None or not vec_normalize.norm_obs or not isinstance(self.policy, DiffusionPolicy):
            return
        identity = bool((self.policy.obs_mean == 0).all() and (self.policy.obs_std == 1).all())
        if not identity:
            warnings.warn(
                "VecNormalize(norm_obs=True) re-estimates observation statistics on top of the policy's fixed ones "
                "(set_observation_statistics); use VecNormalize(norm_obs=False) to keep the offline normalisation"
            )
