"""The offline-to-online hand-over: one place translates between a policy's architecture and the offline settings.

Owns: :data:`DIFFUSION_ARCHITECTURE` and :data:`GAUSSIAN_ARCHITECTURE` (the one table per policy type: which policy
keyword argument is which :class:`~sb3_uepo.offline.config.OfflineConfig` field, and how a value converts in each
direction), :func:`policy_kwargs_from_offline` (offline settings -> the policy kwargs the user left out),
:func:`offline_config_for` (a built policy + preset -> the offline config that pretrains networks it can load) and
:func:`check_gaussian_action_bounds`. Loading a result into a policy is the policy's own method
(``DiffusionPolicy.load_offline_result``, ``MlpPolicy.load_offline_result``).
Must not touch: the offline stages (``sb3_uepo/offline``), the PPO update (``uepo.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from torch import nn

from sb3_uepo.common.policies import DiffusionPolicy
from sb3_uepo.offline.config import activation_class, activation_name


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


def offline_config_for(
    policy: BasePolicy, preset: str | None, offline_kwargs: dict[str, Any] | None, seed: int | None, gamma: float
) -> Any:
    """The offline config whose networks load into ``policy``: the preset and ``offline_kwargs``, with the policy's
    architecture, ``seed`` and ``gamma`` (where ``offline_kwargs`` does not set them).

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
    if "gamma" not in user:
        arch["gamma"] = float(gamma)
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
