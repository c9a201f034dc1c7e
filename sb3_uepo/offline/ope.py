"""Offline policy evaluation (UEPO stage 6): score member policies without touching the environment.

Owns: :func:`offline_policy_evaluation`. Must not touch: the environment (never stepped here), the training of
the dynamics model or of the critics (both are passed in), the gating logic that uses the scores
(``pipeline.py`` / ``offline_ppo.py``).

Two scores:

* ``"model_return"`` (UEPO default; the AM-Q estimator of Uni-O4 when a critic closes the horizon): every member
  is rolled out in the learned model from the same dataset start states for ``H`` steps, a random elite per step,
  stopping on the task's termination rule::

      J(pi) = mean_b [ sum_{t < T_b} gamma^t (r_t - lambda u_t)  +  1[alive at H] gamma^H V(s_H) ]

  with ``T_b = min(H, first termination)``; ``u_t`` the elites' disagreement at ``(s_t, a_t)``
  (:meth:`DynamicsEnsemble.disagreement`, MOPO's penalty, ``lambda = uncertainty_penalty``); ``V`` is ``value_fn``
  (the IQL value), or ``Q(s_H, pi(s_H))`` when only ``q_fn`` is given, or 0 when neither is. The pipeline calls it
  with ``gamma = 1``, no ``V`` and episode starts (``OfflineConfig.ope_*``): the estimate of the undiscounted
  episode return that evaluation reports (see ``docs/algorithm.md`` for the measurements behind that choice).
* ``"mean_q"``: ``J(pi) = mean_b Q(s_b, pi(s_b))`` over the given dataset states (no model), as BPPO / Uni-O4's
  cheap variant.

The members are evaluated BATCHED: one policy call ``(M, B, O) -> (M, B, A)`` and one model call per step for all
of them. With a :class:`~sb3_uepo.offline.dynamics.DynamicsEnsemble` the members share their random
numbers (elite choice and Gaussian noise per start state and step: common random numbers), so the differences
between their scores come from the policies, not from the draw.

Shape symbols: ``M`` members, ``B`` start states, ``O`` observation dim, ``A`` action dim. Observations are
normalised with the dataset statistics, actions in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sb3_uepo.offline.dynamics import DynamicsEnsemble

PolicyFn = Callable[[torch.Tensor], torch.Tensor]  # (M, B, O) -> (M, B, A)
ValueFn = Callable[[torch.Tensor], torch.Tensor]  # (N, O) -> (N,) or (N, 1)
QFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N, O), (N, A) -> (N,) or (N, 1)


def _flat_call(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """Call ``fn`` on (M, B, X) tensors flattened to (M * B, X); return (M, B)."""
    lead = tensors[0].shape[:-1]
    out = fn(*(t.reshape(-1, t.shape[-1]) for t in tensors))
    return out.reshape(lead)


def _policy(policy_fn: PolicyFn, obs: torch.Tensor) -> torch.Tensor:
    actions = policy_fn(obs)
    if actions.shape[:-1] != obs.shape[:-1]:
        raise ValueError(
            f"policy_fn must map (M, B, O) observations to (M, B, A) actions; got {tuple(obs.shape)} -> {tuple(actions.shape)}"
        )
    return actions.clamp(-1.0, 1.0)


@torch.no_grad()
def offline_policy_evaluation(
    dynamics: Any,
    policy_fn: PolicyFn,
    start_obs: torch.Tensor,
    horizon: int,
    gamma: float,
    value_fn: ValueFn | None = None,
    termination_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    score: str = "model_return",
    q_fn: QFn | None = None,
    generator: torch.Generator | None = None,
    n_members: int | None = None,
    common_random_numbers: bool = True,
    return_info: bool = False,
    uncertainty_penalty: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score ``M`` member policies offline (higher is better).

    :param dynamics: a :class:`DynamicsEnsemble`, or any object with ``step(obs, actions, generator=...) ->
        (next_obs, rewards, info)`` on (N, O), (N, A) tensors (e.g. the true dynamics of a toy task);
        unused (may be None) for ``score="mean_q"``
    :param policy_fn: ``(M, B, O) -> (M, B, A)``: member ``m`` acts on ``obs[m]``; outputs are clipped to [-1, 1]
    :param start_obs: (B, O) normalised dataset start states shared by all members (then ``n_members`` is
        required), or (M, B, O) one batch per member
    :param horizon: rollout length ``H``
    :param gamma: discount of the rollout return
    :param value_fn: ``V(s)`` on normalised observations, closes the horizon for survivors (``gamma^H V(s_H)``)
    :param termination_fn: ``(…, O) -> (…,)`` bool on normalised observations (``termination_fn_for``); a
        terminated rollout keeps the reward of its last step and stops
    :param score: ``"model_return"`` or ``"mean_q"``
    :param q_fn: ``Q(s, a)``; needed for ``"mean_q"``; with ``"model_return"`` and no ``value_fn`` it closes the
        horizon as ``Q(s_H, pi(s_H))`` (AM-Q)
    :param generator: torch generator for the model's randomness (elite choice, Gaussian noise)
    :param n_members: ``M`` when ``start_obs`` is (B, O)
    :param common_random_numbers: share the elite choice and noise across members (DynamicsEnsemble only)
    :param return_info: also return per-member details (``std_error``, ``mean_length``, ``terminated_fraction``)
    :param uncertainty_penalty: ``lambda``: subtract ``lambda`` times the elites' disagreement from every model
        reward (needs a :class:`DynamicsEnsemble`; it then evaluates every elite at each step)
    :return: (M,) scores, or ``(scores, info)`` when ``return_info``
    """
    if score not in ("model_return", "mean_q"):
        raise ValueError(f"score must be 'model_return' or 'mean_q', got {score!r}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if horizon < 0:
        raise ValueError(f"horizon must be >= 0, got {horizon}")
    obs = _start_batch(start_obs, n_members)
    n_m, n_b, _ = obs.shape

    if score == "mean_q":
        if q_fn is None:
            raise ValueError("score='mean_q' needs q_fn")
        q = _flat_call(q_fn, obs, _policy(policy_fn, obs))
        return (q.mean(1), _info(q, torch.zeros_like(q), torch.zeros_like(q, dtype=torch.bool))) if return_info else q.mean(1)
    if dynamics is None:
        raise ValueError("score='model_return' needs a dynamics model")
    if uncertainty_penalty < 0.0:
        raise ValueError(f"uncertainty_penalty must be >= 0, got {uncertainty_penalty}")
    if uncertainty_penalty > 0.0 and not isinstance(dynamics, DynamicsEnsemble):
        raise ValueError("uncertainty_penalty > 0 needs a DynamicsEnsemble (its elites' disagreement is the penalty)")

    use_crn = common_random_numbers and isinstance(dynamics, DynamicsEnsemble)
    returns = obs.new_zeros(n_m, n_b)
    alive = torch.ones(n_m, n_b, dtype=torch.bool, device=obs.device)
    lengths = obs.new_zeros(n_m, n_b)
    discount = 1.0
    for _ in range(horizon):
        actions = _policy(policy_fn, obs)
        next_obs, rewards = _model_step(dynamics, obs, actions, generator, use_crn, uncertainty_penalty)
        broken = ~(torch.isfinite(next_obs).all(-1) & torch.isfinite(rewards))  # a diverged model step ends the rollout
        returns += discount * torch.where(alive & ~broken, rewards, torch.zeros_like(rewards))
        lengths += alive.float()
        done = broken if termination_fn is None else broken | termination_fn(next_obs).reshape(n_m, n_b)
        alive = alive & ~done
        obs = torch.where(alive.unsqueeze(-1), next_obs, obs)  # dead rows keep a finite observation
        discount *= gamma
        if not bool(alive.any()):
            break

    if bool(alive.any()) and (value_fn is not None or q_fn is not None):
        if value_fn is not None:
            terminal_value = _flat_call(value_fn, obs)
        else:
            terminal_value = _flat_call(q_fn, obs, _policy(policy_fn, obs))  # type: ignore[arg-type]
        returns += discount * torch.where(alive, terminal_value, torch.zeros_like(terminal_value))
    scores = returns.mean(1)
    return (scores, _info(returns, lengths, ~alive)) if return_info else scores


def _start_batch(start_obs: torch.Tensor, n_members: int | None) -> torch.Tensor:
    """(B, O) shared start states (then ``n_members`` is required) or (M, B, O) -> a (M, B, O) copy."""
    if start_obs.dim() == 2:
        if n_members is None:
            raise ValueError("start_obs is (B, O): pass n_members=M (or give (M, B, O) start states)")
        return start_obs.unsqueeze(0).expand(n_members, -1, -1).clone()
    if start_obs.dim() == 3:
        return start_obs.clone()
    raise ValueError(f"start_obs must be (B, O) or (M, B, O), got shape {tuple(start_obs.shape)}")


def _model_step(
    dynamics: Any,
    obs: torch.Tensor,
    actions: torch.Tensor,
    generator: torch.Generator | None,
    use_crn: bool,
    uncertainty_penalty: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One model step of every (member, start) row: (M, B, O), (M, B, A) -> next obs (M, B, O), rewards (M, B).

    With ``use_crn`` (a :class:`DynamicsEnsemble`) the members share the elite choice and the Gaussian noise of each
    start state; rewards are lowered by ``uncertainty_penalty`` times the elites' disagreement.
    """
    n_m, n_b, obs_dim = obs.shape
    penalize = uncertainty_penalty > 0.0
    if use_crn:
        choice = torch.randint(0, dynamics.n_elites, (n_b,), generator=generator).to(obs.device)
        noise = torch.randn(n_b, dynamics.target_dim, generator=generator).to(obs.device)
        next_obs, rewards, info = dynamics.step(
            obs,
            actions,
            generator=generator,
            elite_choice=choice.expand(n_m, -1),
            noise=noise.expand(n_m, -1, -1),
            with_disagreement=penalize,
        )
    else:
        kwargs = dict(with_disagreement=True) if penalize else {}
        next_obs, rewards, info = dynamics.step(
            obs.reshape(-1, obs_dim), actions.reshape(n_m * n_b, -1), generator=generator, **kwargs
        )
    rewards = rewards.reshape(n_m, n_b)
    if penalize:
        rewards = rewards - uncertainty_penalty * info["disagreement"].reshape(n_m, n_b)
    return next_obs.reshape(n_m, n_b, obs_dim), rewards


def _info(returns: torch.Tensor, lengths: torch.Tensor, terminated: torch.Tensor) -> dict[str, torch.Tensor]:
    n_b = returns.shape[1]
    std_error = returns.std(1) / n_b**0.5 if n_b > 1 else torch.zeros(returns.shape[0])
    return {"std_error": std_error, "mean_length": lengths.mean(1), "terminated_fraction": terminated.float().mean(1)}
