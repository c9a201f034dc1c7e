"""Critic-guided refinement of the behaviour model (UEPO stage 3, before the members are copied): IDQL's action choice,
distilled into the denoiser so that the policy still acts by its plain chain.

Owns: :func:`select_actions` (the critic's choice among behaviour samples) and :func:`refine_behavior`. Must not
touch: the behaviour model's own training (``behavior.py``), the critics (``iql.py``), the members (``members.py``).

IDQL (Hansen-Estruch et al. 2023) acts by drawing ``n`` actions from a diffusion behaviour model and taking the one its
IQL critic scores highest. Here the choice is made once per dataset state, offline::

    a*(s) = argmax_{a in {chain(s, x_0 = 0), chain(s, z_1), ..., chain(s, z_{n-1})}} min(Q_1, Q_2)(s, a),  z_j ~ N(0, I)

(``chain`` the deterministic DDIM path of the behaviour model), and, when the critic's mean gain of ``a*`` over the
``x_0 = 0`` action is at least ``refine_min_gain`` of that action's mean ``|Q|`` (the gate, estimated first on
``refine_gate_states`` random states; the choice on every state is made only when it passes), a copy of the behaviour
denoiser is fine-tuned by the same epsilon-prediction loss on the pairs ``(s, a*(s))`` (an EMA copy is kept, as in
stage 1). Its deterministic action from ``x_0 = 0`` then follows the critic's choice without the critic at run time,
so the online chain-PPO, ``predict`` and steering use it unchanged. The candidates come from the behaviour model, so
the chosen actions stay in the data's support (the candidate ``x_0 = 0`` is the behaviour model's own action: a* is
never worse than it in the critic's eyes).

Observations are normalised and actions in [-1, 1] (project convention).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from sb3_uepo.common.diffusion import ChainSampler, Denoiser
from sb3_uepo.offline.behavior import train_denoiser
from sb3_uepo.offline.config import OfflineConfig, log_values
from sb3_uepo.offline.iql import IQLCritics


@torch.no_grad()
def select_actions(
    denoiser: Denoiser,
    sampler: ChainSampler,
    critics: IQLCritics,
    obs: torch.Tensor,
    n_candidates: int,
    generator: torch.Generator,
    chunk: int = 1024,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The critic's choice among ``n_candidates`` deterministic behaviour chains per state (the first from ``x_0 = 0``).

    :param denoiser: the behaviour denoiser
    :param sampler: the chain sampler (DDIM)
    :param critics: IQL critics (``q_min`` scores the candidates)
    :param obs: (N, O) normalised observations
    :param n_candidates: actions per state (1: the ``x_0 = 0`` action itself)
    :param generator: CPU generator of the candidate noises
    :param chunk: states per batch (memory)
    :return: (N, A) chosen actions in [-1, 1], and a report: the share of states whose choice is not the ``x_0 = 0``
        action, and the mean min-Q of the ``x_0 = 0`` and of the chosen actions
    """
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    action_dim = denoiser.action_dim
    chosen, moved, q_zero, q_chosen = [], 0, 0.0, 0.0
    for start in range(0, obs.shape[0], chunk):
        cond = obs[start : start + chunk]
        m = cond.shape[0]
        noise = torch.randn(n_candidates, m, action_dim, generator=generator).to(obs.device)
        noise[0] = 0.0
        flat_cond = cond.repeat(n_candidates, 1)
        chain = sampler.sample_chain(denoiser, flat_cond, x_init=noise.reshape(-1, action_dim), deterministic=True)
        actions = chain[:, -1].clamp(-1.0, 1.0).reshape(n_candidates, m, action_dim)
        q = critics.q_min(flat_cond, actions.reshape(-1, action_dim)).reshape(n_candidates, m)
        best = q.argmax(0)
        chosen.append(actions[best, torch.arange(m, device=obs.device)])
        moved += int((best != 0).sum())
        q_zero += float(q[0].sum())
        q_chosen += float(q.max(0).values.sum())
    n = max(obs.shape[0], 1)
    report = dict(share_not_zero_noise=moved / n, q_zero_noise=q_zero / n, q_chosen=q_chosen / n)
    return torch.cat(chosen), report


def _relative_gain(choice: dict[str, float]) -> float:
    """The gate's statistic: the critic's mean gain of its choice over the ``x_0 = 0`` action, per unit of that
    action's mean ``|Q|``."""
    return (choice["q_chosen"] - choice["q_zero_noise"]) / max(abs(choice["q_zero_noise"]), 1e-8)


def refine_behavior(
    behavior: Denoiser,
    sampler: ChainSampler,
    critics: IQLCritics,
    obs: torch.Tensor,
    config: OfflineConfig,
    logger: Any = None,
    progress_bar: bool = True,
    log_prefix: str = "offline/refine",
) -> tuple[Denoiser, dict[str, Any]]:
    """Fine-tune a copy of the behaviour denoiser on the critic's choice among its own samples (module docstring).

    :param behavior: the behaviour denoiser (not modified)
    :param sampler: the chain sampler
    :param critics: IQL critics
    :param obs: (N, O) normalised observations: the states the choice is made in (the whole dataset)
    :param config: reads ``refine_steps``, ``refine_candidates``, ``refine_lr``, ``refine_min_gain``, ``behavior_batch_size``,
        ``behavior_ema``, ``n_diffusion_steps`` and ``seed``
    :param logger: SB3 logger or None
    :param progress_bar: show a progress bar
    :param log_prefix: key prefix of the logged values
    :return: the refined denoiser (EMA copy; eval mode, no grad), or ``behavior`` itself when the critic's relative
        gain is below ``refine_min_gain``, and a report (``applied``, ``relative_gain``, ``steps``, ``final_loss``, the
        choice's statistics of :func:`select_actions`, ``seconds``)
    """
    start = time.time()
    generator = torch.Generator().manual_seed(config.seed + 21)
    n_states = obs.shape[0]
    on_subset = 0 < config.refine_gate_states < n_states
    report: dict[str, Any] = dict(gate_states=config.refine_gate_states if on_subset else n_states)
    gain = None
    if on_subset:  # the gate first, on a random subset of the states
        gate_generator = torch.Generator().manual_seed(config.seed + 22)
        subset = torch.randperm(n_states, generator=gate_generator)[: config.refine_gate_states].to(obs.device)
        _, gate = select_actions(behavior, sampler, critics, obs[subset], config.refine_candidates, gate_generator)
        report.update(gate)
        gain = _relative_gain(gate)
    if gain is None or gain >= config.refine_min_gain:  # every state's choice: the refinement's targets
        targets, choice = select_actions(behavior, sampler, critics, obs, config.refine_candidates, generator)
        report.update(choice, relative_gain_all_states=_relative_gain(choice))
        gain = report["relative_gain_all_states"] if gain is None else gain
    report["select_seconds"] = time.time() - start
    report["relative_gain"] = gain
    if gain < config.refine_min_gain:  # the choice is within the critic's noise: keep the behaviour model
        report.update(
            applied=False,
            steps=0,
            reason=f"the critic's relative gain {gain:.4f} is below refine_min_gain={config.refine_min_gain}",
            seconds=time.time() - start,
        )
        log_values(logger, log_prefix, dict(relative_gain=gain, applied=0.0), 0)
        return behavior, report
    report["applied"] = True
    model, loss_ema, _ = train_denoiser(
        copy.deepcopy(behavior),
        obs,
        targets,
        config,
        config.refine_steps,
        config.refine_lr,
        None,
        generator,
        logger,
        progress_bar,
        "offline: critic-guided refinement",
        log_prefix,
    )
    report.update(steps=config.refine_steps, final_loss=loss_ema, seconds=time.time() - start)
    return model, report
