"""The algorithms ``uepo bench`` compares, each built the way a user would build it.

Owns: how each benchmarked algorithm is constructed, pretrained offline (when it has an offline phase) and which
environment wrappers it trains in. The runner (``runner.py``) gives every algorithm the same online env-step budget.

=========  ===========================================================================================  ===========
name       what it is                                                                                    dataset
=========  ===========================================================================================  ===========
uepo       UEPO with a ``DiffusionPolicy``: offline pretraining (``preset``), then online PPO fine-tuning   yes
uni_o4     the Uni-O4 baseline through the same code and budget: UEPO, preset ``<budget>+uni_o4``,          yes
           Gaussian ``MlpPolicy``
bc         plain behaviour cloning through the same code: preset ``<budget>+bc``, one Gaussian ``MlpPolicy``    yes
           by maximum likelihood, no offline PPO; online, fine-tuned like ``uni_o4``
ppo        SB3 PPO from scratch, rl-zoo3's MuJoCo settings (SB3 defaults + ``VecNormalize``)                no
sac        SB3 SAC from scratch, rl-zoo3's MuJoCo settings (SB3 defaults, ``learning_starts`` 10k, capped   no
           at 10% of the online budget)
ppo_bc     the common user workaround: PPO whose Gaussian actor is first fit to the dataset by behaviour    yes
           cloning (maximum likelihood), with observations normalised by the dataset's statistics (frozen)
uepo_steer UEPO's offline phase (the same one as ``uepo``), then noise-space steering online: SB3's SAC      yes
           learns the initial noise of the FROZEN diffusion policy (``UEPO.steer``; SAC defaults,
           ``learning_starts`` as ``sac``; ``algo_kwargs`` go to SAC, ``noise_bound`` among them)
=========  ===========================================================================================  ===========

UEPO and Uni-O4 fine-tune online with the same settings as ``uepo train``
(:data:`sb3_uepo.uepo.defaults.FINE_TUNING_DEFAULTS`); ``--algo-kwargs`` overrides them per algorithm.

``ppo_bc`` clones the actor only (the critic starts from scratch, as in a plain ``policy.load_state_dict`` of a BC
net); its observation normalisation is a ``VecNormalize`` whose observation statistics are the dataset's and never
move, while rewards are normalised online as in the ``ppo`` baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from stable_baselines3.common.running_mean_std import RunningMeanStd

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.vec_env import VecEnv

    from sb3_uepo.common.datasets.container import OfflineDataset

# Behaviour-cloning settings of the ppo_bc baseline (plain supervised learning; a few seconds on a CPU).
BC_BATCH_SIZE = 256
BC_LEARNING_RATE = 1e-3
BC_STEPS_BY_PRESET = {"quick": 5_000, "default": 20_000, "paper": 100_000, "uni_o4": 20_000}
BC_STEPS_DEFAULT = 10_000

# rl-zoo3 hyperparams/sac.yml, MuJoCo entries: SB3 defaults with 10k random steps before learning.
SAC_LEARNING_STARTS = 10_000


class FrozenRunningMeanStd(RunningMeanStd):
    """Running statistics that never update: ``VecNormalize`` applies them but cannot re-estimate them."""

    def update(self, arr: np.ndarray) -> None:
        return None


@dataclass(frozen=True)
class Algorithm:
    """One benchmarked algorithm.

    :param name: key used on the command line and in result files
    :param label: name printed in tables and plots
    :param needs_dataset: whether it learns from the task's dataset
    :param offline: whether it has an offline phase whose policy is scored before online learning
    :param build: ``build(run, dataset) -> model``; ``run`` is a :class:`~sb3_uepo.benchmark.runner.RunSpec`
    :param pretrain: ``pretrain(model, run, dataset) -> report`` for algorithms with an offline phase
    :param online: ``online(model, run) -> model`` the model that learns online, when it is not the pretrained one
        (``uepo_steer``: a :class:`~sb3_uepo.uepo.steering.SteeredModel` around the pretrained policy)
    """

    name: str
    label: str
    needs_dataset: bool
    offline: bool
    build: Callable[..., BaseAlgorithm]
    pretrain: Callable[..., dict[str, Any]] | None = None
    online: Callable[..., Any] | None = None


def make_train_env(env_id: str, n_envs: int, seed: int, vec_normalize: dict[str, Any] | None = None) -> VecEnv:
    """``DummyVecEnv`` of ``Monitor``-wrapped envs, optionally under ``VecNormalize(**vec_normalize)``.

    :param env_id: gymnasium id
    :param n_envs: number of environments
    :param seed: seed of the first environment
    :param vec_normalize: keyword arguments of ``VecNormalize``, or None for no normalisation
    """
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    return env if vec_normalize is None else VecNormalize(env, **vec_normalize)


# --- SB3 baselines -----------------------------------------------------------------------------------------------

SCHEDULE_KEYS = ("learning_rate", "clip_range")


def with_schedules(kwargs: dict[str, Any]) -> dict[str, Any]:
    """rl-zoo3's schedule strings in ``--algo-kwargs``: ``learning_rate="lin_1e-4"`` (or ``clip_range``) becomes a
    linear decay from 1e-4 to 0 over the run (SB3's :class:`~stable_baselines3.common.utils.LinearSchedule`).

    :param kwargs: constructor arguments; other values are returned unchanged
    :return: a copy with the schedule strings replaced
    """
    from stable_baselines3.common.utils import LinearSchedule

    resolved = dict(kwargs)
    for key in SCHEDULE_KEYS:
        value = resolved.get(key)
        if isinstance(value, str) and value.startswith("lin_"):
            try:
                start = float(value[len("lin_") :])
            except ValueError:
                raise ValueError(f"{key}={value!r}: expected lin_<float>, e.g. lin_1e-4") from None
            resolved[key] = LinearSchedule(start, 0.0, 1.0)
    return resolved


def build_ppo(run: Any, dataset: OfflineDataset | None) -> BaseAlgorithm:
    from stable_baselines3 import PPO

    env = make_train_env(run.env_id, run.n_envs or 1, run.seed, vec_normalize={"gamma": 0.99})
    kwargs = {"verbose": 0, "device": "cpu", **with_schedules(run.algo_kwargs)}
    return PPO("MlpPolicy", env, seed=run.seed, **kwargs)


def build_sac(run: Any, dataset: OfflineDataset | None) -> BaseAlgorithm:
    from stable_baselines3 import SAC

    env = make_train_env(run.env_id, run.n_envs or 1, run.seed)
    kwargs = {
        "learning_starts": min(SAC_LEARNING_STARTS, max(run.online_steps // 10, 1)),
        "verbose": 0,
        "device": "cpu",
        **with_schedules(run.algo_kwargs),
    }
    return SAC("MlpPolicy", env, seed=run.seed, **kwargs)


def build_ppo_bc(run: Any, dataset: OfflineDataset | None) -> BaseAlgorithm:
    from stable_baselines3 import PPO

    assert dataset is not None
    env = make_train_env(run.env_id, run.n_envs or 1, run.seed, vec_normalize={"gamma": 0.99})
    stats = dataset.statistics()
    frozen = FrozenRunningMeanStd(shape=stats.obs_mean.shape)
    frozen.mean = stats.obs_mean.astype(np.float64)
    frozen.var = np.square(stats.obs_std).astype(np.float64)
    frozen.count = float(stats.n_transitions)
    env.obs_rms = frozen  # type: ignore[attr-defined]
    kwargs = {"verbose": 0, "device": "cpu", **with_schedules(run.algo_kwargs)}
    return PPO("MlpPolicy", env, seed=run.seed, **kwargs)


def pretrain_ppo_bc(model: BaseAlgorithm, run: Any, dataset: OfflineDataset) -> dict[str, Any]:
    """Fit PPO's Gaussian actor to the dataset's actions by maximum likelihood (the critic is left untouched).

    Observations are normalised exactly as the training env's ``VecNormalize`` will normalise them online.

    :param model: a PPO model built by :func:`build_ppo_bc`
    :param run: the run's spec (``bc_steps``, ``seed``)
    :param dataset: the task's dataset
    :return: report with the BC steps, final loss and wall time
    """
    import torch as th
    from stable_baselines3.common.policies import ActorCriticPolicy

    vec_normalize = model.get_vec_normalize_env()
    assert vec_normalize is not None
    observations = np.asarray(vec_normalize.normalize_obs(dataset.observations), dtype=np.float32)
    low, high = model.action_space.low, model.action_space.high  # type: ignore[attr-defined]
    actions = np.clip(dataset.actions, low, high).astype(np.float32)
    policy = model.policy
    assert isinstance(policy, ActorCriticPolicy)
    actor_parameters = [*policy.mlp_extractor.policy_net.parameters(), *policy.action_net.parameters(), policy.log_std]
    optimizer = th.optim.Adam(actor_parameters, lr=BC_LEARNING_RATE)
    rng = np.random.default_rng(run.seed)
    obs_t = th.as_tensor(observations, device=policy.device)
    act_t = th.as_tensor(actions, device=policy.device)
    n_steps = run.bc_steps or BC_STEPS_BY_PRESET.get(run.preset, BC_STEPS_DEFAULT)
    start = time.perf_counter()
    policy.set_training_mode(True)
    losses = []
    for _ in range(n_steps):
        index = th.as_tensor(rng.integers(0, len(observations), BC_BATCH_SIZE), device=policy.device)
        distribution = policy.get_distribution(obs_t[index])
        loss = -distribution.log_prob(act_t[index]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    policy.set_training_mode(False)
    return {
        "stage": "behaviour cloning of the Gaussian actor",
        "bc_steps": n_steps,
        "batch_size": BC_BATCH_SIZE,
        "learning_rate": BC_LEARNING_RATE,
        "final_nll": float(np.mean(losses[-100:])) if losses else None,
        "log_std": policy.log_std.detach().cpu().numpy().tolist(),
        "wall_s": time.perf_counter() - start,
    }


# --- UEPO and the Uni-O4 preset ----------------------------------------------------------------------------------


def _uepo_class() -> Any:
    try:
        from sb3_uepo.uepo import UEPO
    except ImportError as exc:  # pragma: no cover - only while the algorithm is being written
        raise RuntimeError(f"The UEPO algorithm is not available in this build ({exc}).") from exc
    return UEPO


def _build_uepo(run: Any, dataset: OfflineDataset | None, policy: str, preset: str | None) -> BaseAlgorithm:
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_uepo.uepo.defaults import DEFAULT_N_ENVS, fine_tuning_defaults

    uepo = _uepo_class()
    n_envs = run.n_envs or DEFAULT_N_ENVS
    env = make_vec_env(run.env_id, n_envs=n_envs, seed=run.seed)
    kwargs = {**fine_tuning_defaults(policy, n_envs), "verbose": 0, "device": "cpu", **with_schedules(run.algo_kwargs)}
    if run.offline_kwargs:
        kwargs["offline_kwargs"] = dict(run.offline_kwargs)
    return uepo(policy, env, dataset=dataset, preset=preset, seed=run.seed, **kwargs)


def build_uepo(run: Any, dataset: OfflineDataset | None) -> BaseAlgorithm:
    return _build_uepo(run, dataset, "DiffusionPolicy", run.preset)


def build_uepo_steer(run: Any, dataset: OfflineDataset | None) -> BaseAlgorithm:
    """The ``uepo`` model (same offline phase); its ``algo_kwargs`` belong to the steering agent, not to UEPO."""
    import dataclasses

    return _build_uepo(dataclasses.replace(run, algo_kwargs={}), dataset, "DiffusionPolicy", run.preset)


def steer_online(model: BaseAlgorithm, run: Any) -> Any:
    """SB3's SAC in the noise space of the pretrained (frozen) diffusion policy, one env, rl-zoo3's SAC settings."""
    from sb3_uepo.uepo.defaults import NOISE_BOUND, NOISE_PENALTY

    kwargs = with_schedules(run.algo_kwargs)
    noise_bound = float(kwargs.pop("noise_bound", NOISE_BOUND))
    noise_penalty = float(kwargs.pop("noise_penalty", NOISE_PENALTY))
    kwargs = {
        "learning_starts": min(SAC_LEARNING_STARTS, max(run.online_steps // 10, 1)),
        "verbose": 0,
        "device": "cpu",
        **kwargs,
    }
    return model.steer(noise_bound=noise_bound, n_envs=1, noise_penalty=noise_penalty, **kwargs)  # type: ignore[attr-defined]


def build_uni_o4(run: Any, dataset: OfflineDataset | None) -> BaseAlgorithm:
    """The ``uni_o4`` variant on the run's budget preset (``quick`` -> ``quick+uni_o4``): same code, same budgets."""
    return _build_uepo(run, dataset, "MlpPolicy", uni_o4_preset(run.preset))


def build_bc(run: Any, dataset: OfflineDataset | None) -> BaseAlgorithm:
    """The ``bc`` variant (one Gaussian MLP by maximum likelihood, no offline PPO): the floor of every offline row."""
    return _build_uepo(run, dataset, "MlpPolicy", variant_preset(run.preset, "bc"))


def uni_o4_preset(preset: str | None) -> str:
    """``"quick"`` -> ``"quick+uni_o4"``; a preset that already names the variant is kept."""
    return variant_preset(preset, "uni_o4")


def variant_preset(preset: str | None, variant: str) -> str:
    """``("quick", "bc")`` -> ``"quick+bc"``; a preset that already names the variant is kept."""
    if not preset:
        return variant
    return preset if variant in preset.split("+") else f"{preset}+{variant}"


def pretrain_uepo(model: BaseAlgorithm, run: Any, dataset: OfflineDataset) -> dict[str, Any]:
    return report_to_dict(model.pretrain())  # type: ignore[attr-defined]


def report_to_dict(report: Any) -> dict[str, Any]:
    """A pretraining report as plain JSON-able data (``OfflineResult.to_report()``, ``to_dict()``, dataclass or mapping)."""
    import dataclasses

    if report is None:
        return {}
    if hasattr(report, "to_report"):  # sb3_uepo.offline.pipeline.OfflineResult
        return dict(report.to_report())
    if hasattr(report, "to_dict"):
        return dict(report.to_dict())
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    return dict(report)


ALGORITHMS: dict[str, Algorithm] = {
    algo.name: algo
    for algo in (
        Algorithm("uepo", "UEPO", needs_dataset=True, offline=True, build=build_uepo, pretrain=pretrain_uepo),
        Algorithm("uni_o4", "Uni-O4 (preset)", needs_dataset=True, offline=True, build=build_uni_o4, pretrain=pretrain_uepo),
        Algorithm("bc", "BC (Gaussian MLP)", needs_dataset=True, offline=True, build=build_bc, pretrain=pretrain_uepo),
        Algorithm("ppo", "PPO (scratch)", needs_dataset=False, offline=False, build=build_ppo),
        Algorithm("sac", "SAC (scratch)", needs_dataset=False, offline=False, build=build_sac),
        Algorithm("ppo_bc", "PPO + BC init", needs_dataset=True, offline=True, build=build_ppo_bc, pretrain=pretrain_ppo_bc),
        Algorithm(
            "uepo_steer",
            "UEPO + noise steering (SAC)",
            needs_dataset=True,
            offline=True,
            build=build_uepo_steer,
            pretrain=pretrain_uepo,
            online=steer_online,
        ),
    )
}
