"""Evaluate a policy in the real environment: mean ± std return and D4RL normalised score.

Owns: building the evaluation environment (with the training run's frozen observation statistics when the model
was trained under ``VecNormalize``), calling SB3's :func:`~stable_baselines3.common.evaluation.evaluate_policy`,
and turning its episode returns into an :class:`EvaluationResult`. ``uepo train``, ``uepo eval`` and ``uepo bench``
all evaluate through here, so their numbers are comparable.
Must not touch: training. Evaluation is for reporting only; the offline phase never calls it (the member handed to
online learning is chosen by offline policy evaluation in the learned model, never by real returns).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.vec_env import VecEnv, VecNormalize

    from sb3_uepo.common.datasets.container import OfflineDataset

# Evaluation runs a few environments side by side: batched predict() is much cheaper per step than one at a time.
MAX_EVAL_ENVS = 5

MODES = ("deterministic", "stochastic")

# Evaluation environments are seeded EVAL_SEED_OFFSET + training seed: never the training episodes, and the same
# initial states for every algorithm and for `uepo train` / `uepo eval` of one run.
EVAL_SEED_OFFSET = 10_000


@dataclass
class EvaluationResult:
    """Returns of ``n_episodes`` evaluation episodes and their D4RL normalised scores.

    :param env_id: environment the policy was evaluated in
    :param deterministic: whether actions were deterministic (``predict(deterministic=True)``)
    :param returns: undiscounted return of each episode
    :param lengths: length of each episode
    :param normalized: normalised score of each episode (0 = random, 100 = D4RL expert); None when the task has
        no reference returns (e.g. Pendulum-v1)
    :param seed: seed of the evaluation environments
    :param wall_s: wall time of the evaluation in seconds
    """

    env_id: str
    deterministic: bool
    returns: list[float]
    lengths: list[int]
    normalized: list[float] | None = None
    seed: int = 0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_episodes(self) -> int:
        return len(self.returns)

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std_return(self) -> float:
        return float(np.std(self.returns))

    @property
    def normalized_mean(self) -> float | None:
        return None if self.normalized is None else float(np.mean(self.normalized))

    @property
    def normalized_std(self) -> float | None:
        return None if self.normalized is None else float(np.std(self.normalized))

    @property
    def mode(self) -> str:
        return "deterministic" if self.deterministic else "stochastic"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: the per-episode lists plus their summaries."""
        data = asdict(self)
        data.update(
            mode=self.mode,
            n_episodes=self.n_episodes,
            mean_return=self.mean_return,
            std_return=self.std_return,
            normalized_mean=self.normalized_mean,
            normalized_std=self.normalized_std,
        )
        return data

    def summary(self) -> str:
        """One line: ``return 1234.5 ± 56.7  normalised 38.6 ± 1.7  (10 episodes, deterministic)``."""
        text = f"return {self.mean_return:8.1f} ± {self.std_return:6.1f}"
        if self.normalized is not None:
            text += f"  normalised {self.normalized_mean:6.1f} ± {self.normalized_std:5.1f}"
        return text + f"  ({self.n_episodes} episodes, {self.mode}, mean length {np.mean(self.lengths):.0f})"


def make_eval_env(
    env_id: str,
    n_envs: int = 1,
    seed: int = 0,
    vec_normalize: VecNormalize | str | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> VecEnv:
    """Vectorised evaluation environment (``DummyVecEnv`` of ``Monitor``-wrapped envs).

    When the policy was trained under ``VecNormalize``, its observation statistics are applied frozen
    (``training=False``) and rewards are left raw, so returns are the environment's own.

    :param env_id: gymnasium id
    :param n_envs: number of environments stepped together
    :param seed: seed of the first environment (the others get ``seed + i``)
    :param vec_normalize: the training ``VecNormalize`` (its statistics are copied) or the path of a saved one
    :param env_kwargs: keyword arguments of ``gym.make``
    """
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    env = make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)
    if vec_normalize is None:
        return env
    if isinstance(vec_normalize, VecNormalize):
        if not vec_normalize.norm_obs:  # reward normalisation only (e.g. norm_obs=False): nothing to apply to obs
            return env
        wrapped = VecNormalize(env, training=False, norm_obs=True, norm_reward=False)
        wrapped.obs_rms = copy.deepcopy(vec_normalize.obs_rms)
        wrapped.clip_obs = vec_normalize.clip_obs
        wrapped.epsilon = vec_normalize.epsilon
    else:
        wrapped = VecNormalize.load(str(vec_normalize), env)
        wrapped.training = False
        wrapped.norm_reward = False
    return wrapped


def evaluate(
    model: BaseAlgorithm,
    env_id: str,
    n_episodes: int = 10,
    deterministic: bool = True,
    seed: int = 0,
    dataset: OfflineDataset | None = None,
    vec_normalize: VecNormalize | str | None = None,
    n_envs: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Roll out ``model`` for ``n_episodes`` full episodes with SB3's ``evaluate_policy``.

    :param model: any SB3 model (UEPO, PPO, SAC, ...) or object with a ``predict`` method
    :param env_id: gymnasium id of the environment to evaluate in
    :param n_episodes: number of complete episodes
    :param deterministic: deterministic actions (UEPO: DDIM with the member's fixed noise; PPO/SAC: the mean)
    :param seed: seed of the evaluation environments and of the policy's random draws (same seed, same episodes)
    :param dataset: the dataset the model learned from; its reference returns, when it carries any, define the
        normalised score (else the D4RL table for the task of ``env_id``)
    :param vec_normalize: observation statistics to apply (see :func:`make_eval_env`); by default the model's own
        training ``VecNormalize``, when it has one
    :param n_envs: environments stepped together (default: ``min(n_episodes, 5)``)
    :param env_kwargs: keyword arguments of ``gym.make``
    """
    from stable_baselines3.common.evaluation import evaluate_policy

    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if vec_normalize is None and hasattr(model, "get_vec_normalize_env"):
        vec_normalize = model.get_vec_normalize_env()
    n_envs = n_envs or min(n_episodes, MAX_EVAL_ENVS)
    start = time.perf_counter()
    env = make_eval_env(env_id, n_envs=n_envs, seed=seed, vec_normalize=vec_normalize, env_kwargs=env_kwargs)
    import torch

    try:
        # the policy's own random draws (stochastic actions) are seeded too: the same model and seed, the same episodes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            returns, lengths = evaluate_policy(
                model, env, n_eval_episodes=n_episodes, deterministic=deterministic, return_episode_rewards=True, warn=False
            )
    finally:
        env.close()
    assert isinstance(returns, list) and isinstance(lengths, list)  # return_episode_rewards=True
    return EvaluationResult(
        env_id=env_id,
        deterministic=deterministic,
        returns=[float(r) for r in returns],
        lengths=[int(n) for n in lengths],
        normalized=normalized_scores(env_id, returns, dataset),
        seed=seed,
        wall_s=time.perf_counter() - start,
    )


def evaluate_modes(
    model: BaseAlgorithm, env_id: str, modes: tuple[str, ...] | list[str] = MODES, **kwargs: Any
) -> dict[str, EvaluationResult]:
    """:func:`evaluate` once per mode (``"deterministic"`` and/or ``"stochastic"``), same seed for each.

    :param model: the model to evaluate
    :param env_id: gymnasium id
    :param modes: which action modes to evaluate
    :param kwargs: passed on to :func:`evaluate`
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"Unknown evaluation mode(s) {sorted(unknown)}; choose from {MODES}")
    return {mode: evaluate(model, env_id, deterministic=mode == "deterministic", **kwargs) for mode in modes}


def normalized_scores(
    env_id: str, returns: list[float] | np.ndarray, dataset: OfflineDataset | None = None
) -> list[float] | None:
    """D4RL normalised score of each return, or None when the task has no reference returns.

    :param env_id: gymnasium id (its task names the D4RL reference returns)
    :param returns: episode returns
    :param dataset: dataset whose own reference returns take precedence
    """
    from sb3_uepo.common.datasets.scores import normalized_score
    from sb3_uepo.common.datasets.validation import DatasetError

    try:
        scores = normalized_score(env_id, np.asarray(returns, dtype=np.float64), dataset)
    except DatasetError:
        return None
    return [float(s) for s in np.atleast_1d(scores)]


def score_offline_stages(
    model: Any,
    result: Any,
    env_id: str,
    n_episodes: int = 5,
    seed: int = 0,
    dataset: OfflineDataset | None = None,
    modes: tuple[str, ...] | list[str] = MODES,
) -> dict[str, Any]:
    """Real-environment scores of what every offline stage produced, for reporting only (the member handed on was
    already chosen by OPE): the behaviour diffusion model (diffusion BC), every member as initialised (before offline
    PPO) and after offline PPO (its best-by-OPE policy), next to the member's OPE score, and the chosen member.

    The model is used as the vehicle: each policy is loaded into it in turn with ``model.load_offline_result``, and
    the chosen member is loaded back at the end, so the model is left as :meth:`UEPO.pretrain` left it.

    :param model: a UEPO model whose policy matches the result's architecture
    :param result: an :class:`~sb3_uepo.offline.pipeline.OfflineResult` with its members kept
    :param env_id: environment to evaluate in
    :param n_episodes: episodes per policy and mode
    :param seed: seed of the evaluation environments (the same episodes for every policy)
    :param dataset: dataset whose reference returns normalise the scores
    :param modes: action modes to evaluate
    :return: ``{"stages": [{"stage", "member", "ope_score", "ope_normalized", <mode>: {...}}], "chosen_member",
        "regret", "random_choice_regret"}``; regrets are in normalised points of the first mode, over the members
        after offline PPO
    """
    from sb3_uepo.common.datasets.scores import normalized_score
    from sb3_uepo.common.datasets.validation import DatasetError

    def score(policy_result: Any, member: str = "chosen", only: Sequence[str] = modes) -> dict[str, Any]:
        model.load_offline_result(policy_result, member=member)
        evaluations = evaluate_modes(model, env_id, only, n_episodes=n_episodes, seed=seed, dataset=dataset)
        return {mode: evaluation.to_dict() for mode, evaluation in evaluations.items()}

    def ope_normalized(value: float | None) -> float | None:
        if value is None or not np.isfinite(value) or result.config.get("ope_score") != "model_return":
            return None
        try:
            return float(normalized_score(env_id, np.asarray([value]), dataset)[0])
        except DatasetError:
            return None

    rows: list[dict[str, Any]] = []
    evaluated: list[tuple[Any, dict[str, Any]]] = []  # (member result, its scores): identical policies are scored once

    def score_member(member: Any) -> dict[str, Any]:
        for other, scores in evaluated:
            if _same_member(member, other):
                return scores
        scores = {}
        if rows and _same_policy(member, result):  # deterministically the behaviour model (zero noise, same weights)
            scores["deterministic"] = rows[0]["deterministic"]
        scores.update(score(member, only=[m for m in modes if m not in scores]))
        evaluated.append((member, scores))
        return scores

    try:
        if result.behavior_state_dict is not None:
            rows.append(dict(stage="behavior", member=None, **score(result, member="behavior")))
        for stage, initial, ope_scores in (
            ("members", True, result.initial_ope_scores),
            ("offline_ppo", False, result.best_ope_scores),
        ):
            for i in range(len(result.member_state_dicts)):
                ope = None if ope_scores is None else ope_scores[i]
                scores = score_member(result.member(i, initial))
                rows.append(dict(stage=stage, member=i, ope_score=ope, ope_normalized=ope_normalized(ope), **scores))
    finally:
        model.load_offline_result(result)
    first = modes[0]
    final = [row[first]["normalized_mean"] for row in rows if row["stage"] == "offline_ppo"]
    report: dict[str, Any] = dict(stages=rows, chosen_member=result.chosen_member, mode_of_regret=first)
    if final and all(v is not None for v in final):
        chosen = final[result.chosen_member]
        report["regret"] = float(max(final) - chosen)
        report["random_choice_regret"] = float(max(final) - np.mean(final))
    return report


def _same_policy(member: Any, result: Any) -> bool:
    """The initial member acts exactly as the behaviour model does deterministically (same weights, zero noise)."""
    import torch

    behavior = result.behavior_state_dict
    if behavior is None or member.seed_noise is None or bool(member.seed_noise.abs().sum() > 0):
        return False
    return all(torch.equal(value, behavior[key]) for key, value in member.policy_state_dict.items())


def _same_member(a: Any, b: Any) -> bool:
    """Two member results act identically: the same weights and the same initial noise."""
    import torch

    if (a.seed_noise is None) != (b.seed_noise is None):
        return False
    if a.seed_noise is not None and not torch.equal(a.seed_noise, b.seed_noise):
        return False
    return all(torch.equal(value, b.policy_state_dict[key]) for key, value in a.policy_state_dict.items())
