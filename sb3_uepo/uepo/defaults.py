"""UEPO's constructor defaults that follow the situation, the SB3 way of ``"auto"`` values.

Owns: :data:`FINE_TUNING_DEFAULTS` (the online settings when UEPO starts from an offline policy), :data:`PPO_DEFAULTS`
(SB3 PPO's from-scratch settings, used without a dataset), the steering defaults :data:`NOISE_BOUND` and
:data:`NOISE_PENALTY`, and :func:`resolve_auto_arguments`, which the constructor calls. ``uepo train``, ``uepo bench``
and ``zoo_configs/uepo.yml`` use the same values.
Must not touch: the algorithm (``uepo.py``), the offline settings (``sb3_uepo/offline`` presets).

Why two sets: PPO's from-scratch settings (lr 3e-4, clip 0.2, no KL, no value warm-up) wreck a pretrained policy in a
few updates (measured on the embedded Hopper data: normalised 29.0 after pretraining, 1.9 after 4096 online steps).
Uni-O4 fine-tunes with 2048 env steps per update, clip 0.05, actor lr 2e-5 and critic lr 2e-4; DPPO with clip 0.01.
"""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.utils import LinearSchedule

AUTO = "auto"
# Training environments of `uepo train` and of UEPO in `uepo bench`.
DEFAULT_N_ENVS = 8

# With a dataset (fine-tuning a pretrained policy). n_steps is per env: ~2048 env steps per update in all. The learning
# rate decays linearly to 0 over the online budget, rewards are scaled by the std of the return (statistics from the
# dataset). Measured with `uepo bench` on Hopper, Walker2d and HalfCheetah medium, 3 seeds, 200k steps
# (docs/benchmarks.md, "Online at 200k env steps"). The discount stays 0.99: DPPO's 0.999 kept a Hopper seed from
# trading survival for per-step reward late in fine-tuning but lowered Walker2d by 8 points (same benchmark).
FINE_TUNING_DEFAULTS: dict[str, Any] = {
    "n_steps": 2048,
    "batch_size": 512,
    "n_epochs": 5,
    "learning_rate": LinearSchedule(3e-5, 0.0, 1.0),
    "clip_range": 0.05,
    "value_warmup_iters": 2,
    "kl_ref_coef": 0.1,
    "normalize_reward": True,
    "gamma": 0.99,
}
# DiffusionPolicy only: the value network learns 10x faster than the actor (Uni-O4's critic/actor ratio), and only the
# last 2 denoising steps are fine-tuned (DPPO's scheme; the update costs about a third of all 5 steps', see
# docs/benchmarks.md, "Online throughput"). A chain of fewer steps fine-tunes all. Only the fine-tuned steps explore
# (exploring every step left the stochastic policy PPO improves far below the deterministic one that is evaluated:
# 45.0 vs 85.4 on Hopper-v5 after 200k steps), with std 0.1: against 0.05, the mean over Hopper, Walker2d and
# HalfCheetah medium after 200k steps rose 62.1 -> 65.0 and 60.6 -> 64.1 on two sets of offline policies (3 seeds
# each; Hopper's late falls went away), for 1-6 points of stochastic score (docs/benchmarks.md, "More exploration").
FT_DENOISING_STEPS = 2
FINE_TUNING_DIFFUSION_POLICY_KWARGS: dict[str, Any] = {
    "value_lr_scale": 10.0,
    "ft_denoising_steps": FT_DENOISING_STEPS,
    "exploration_std": 0.1,
    "explore_frozen_steps": False,
}

# Noise-space steering (`UEPO.steer`, `uepo train --online steer`, `uepo_steer`): the noise box |w_i| <= NOISE_BOUND and
# the prior term -NOISE_PENALTY * ||w||^2 of the agent's reward (docs/algorithm.md and docs/benchmarks.md say how they
# were chosen: the 50k-step bench on Hopper and Walker2d medium, 3 seeds).
NOISE_BOUND = 0.5
NOISE_PENALTY = 5.0

# MlpPolicy (the Uni-O4 baseline): the same 10x critic learning rate (Uni-O4's critic 2e-4 vs actor 2e-5).
FINE_TUNING_MLP_POLICY_KWARGS: dict[str, Any] = {"value_lr_scale": 10.0}

# Without a dataset: SB3 PPO's defaults, plus no KL and no warm-up.
PPO_DEFAULTS: dict[str, Any] = {
    "n_steps": 2048,
    "batch_size": 64,
    "n_epochs": 10,
    "learning_rate": 3e-4,
    "clip_range": 0.2,
    "value_warmup_iters": 0,
    "kl_ref_coef": 0.0,
    "normalize_reward": False,
    "gamma": 0.99,
}


def fine_tuning_defaults(policy: str, n_envs: int = 1) -> dict[str, Any]:
    """UEPO constructor arguments for fine-tuning a pretrained policy with ``n_envs`` environments.

    :param policy: ``"DiffusionPolicy"`` or ``"MlpPolicy"``
    :param n_envs: training environments (the rollout keeps ~2048 env steps per update)
    :return: keyword arguments (``n_steps`` per env, ``batch_size`` at most the rollout size, ``policy_kwargs`` for
        the DiffusionPolicy)
    """
    defaults = dict(FINE_TUNING_DEFAULTS)
    n_envs = max(int(n_envs), 1)
    defaults["n_steps"] = max(FINE_TUNING_DEFAULTS["n_steps"] // n_envs, 16)
    defaults["batch_size"] = min(FINE_TUNING_DEFAULTS["batch_size"], defaults["n_steps"] * n_envs)
    if policy == "DiffusionPolicy":
        defaults["policy_kwargs"] = dict(FINE_TUNING_DIFFUSION_POLICY_KWARGS)
    elif policy == "MlpPolicy":
        defaults["policy_kwargs"] = dict(FINE_TUNING_MLP_POLICY_KWARGS)
    return defaults


def resolve_auto_arguments(
    arguments: dict[str, Any], fine_tuning: bool, policy: str, n_envs: int, policy_kwargs: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Replace every ``"auto"`` value of ``arguments`` by the fine-tuning default (``fine_tuning=True``, i.e. a
    dataset was given) or PPO's; values the user passed are kept. With fine-tuning and a DiffusionPolicy, the
    ``value_lr_scale`` policy kwarg is filled in where ``policy_kwargs`` is silent.

    :param arguments: constructor arguments among :data:`PPO_DEFAULTS`' keys, some ``"auto"``
    :param fine_tuning: a dataset was given
    :param policy: the policy name (``"DiffusionPolicy"`` fills in the value learning-rate scale)
    :param n_envs: training environments
    :param policy_kwargs: the user's policy kwargs
    :return: the resolved arguments and policy kwargs
    """
    table = fine_tuning_defaults(policy, n_envs) if fine_tuning else PPO_DEFAULTS
    resolved = {key: (table[key] if value == AUTO else value) for key, value in arguments.items()}
    if fine_tuning and policy == "DiffusionPolicy":
        policy_kwargs = {**FINE_TUNING_DIFFUSION_POLICY_KWARGS, **(policy_kwargs or {})}
    elif fine_tuning and policy == "MlpPolicy":
        policy_kwargs = {**FINE_TUNING_MLP_POLICY_KWARGS, **(policy_kwargs or {})}
    return resolved, policy_kwargs


def fit_ft_denoising_steps(policy_kwargs: dict[str, Any]) -> None:
    """In place: the fine-tuning default ``ft_denoising_steps`` (:data:`FT_DENOISING_STEPS`) is capped at the chain's
    ``n_sampling_steps`` (a 1-step chain fine-tunes its one step). Call it only when the default was filled in (the
    user did not pass ``ft_denoising_steps``): an explicit value is left for the policy to check."""
    steps = policy_kwargs.get("n_sampling_steps")
    if policy_kwargs.get("ft_denoising_steps") == FT_DENOISING_STEPS and steps is not None and steps < FT_DENOISING_STEPS:
        policy_kwargs["ft_denoising_steps"] = None
