"""Behaviour diffusion model (UEPO stage 1): one state-conditioned denoiser ``eps(a_k, k, s)`` trained on the dataset.

Owns: :func:`fit_behavior_model` and the factories :func:`make_denoiser` / :func:`make_sampler` that build the
diffusion pieces from an :class:`~sb3_uepo.offline.config.OfflineConfig`, so that every stage (and the online
policy) uses the same architecture. Must not touch: the diffusion formulas (``common/diffusion.py``), the members
built from this model (``members.py``).

Training is plain epsilon prediction (DDPM, Ho et al. 2020) on the cosine schedule of ``NoiseSchedule``:
``L = E_{k, eps, (s, a) ~ D} || eps - eps_theta(sqrt(abar_k) a + sqrt(1 - abar_k) eps, k, s) ||^2``, Adam with a cosine
learning-rate decay to 10 %, and an exponential moving average of the weights (as diffusion_policy / DPPO), whose copy
is the behaviour model.

Observations are normalised with the dataset's fixed statistics, actions scaled to [-1, 1] (project convention).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sb3_uepo.common.diffusion import ChainSampler, Denoiser, NoiseSchedule
from sb3_uepo.offline.config import OfflineConfig, log_values, make_progress_bar


def top_episodes_mask(dataset: Any, fraction: float) -> np.ndarray:
    """Boolean mask over the dataset's transitions: those of the ``fraction`` of its episodes with the highest returns
    (at least one episode; ties keep the earlier episode), e.g. for %BC.

    :param dataset: an :class:`~sb3_uepo.common.datasets.container.OfflineDataset`
    :param fraction: share of episodes to keep, in (0, 1]
    :return: (N,) bool
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    slices, returns = dataset.episode_slices(), dataset.episode_returns()
    n_keep = max(1, round(fraction * len(slices)))
    keep = np.argsort(-np.asarray(returns), kind="stable")[:n_keep]
    mask = np.zeros(len(dataset), dtype=bool)
    for index in keep:
        mask[slices[index]] = True
    return mask


def make_denoiser(action_dim: int, obs_dim: int, config: OfflineConfig) -> Denoiser:
    """A fresh :class:`Denoiser` with the architecture of ``config`` (the online policy must build the same)."""
    return Denoiser(action_dim, obs_dim, tuple(config.denoiser_hidden_sizes), config.time_embed_dim)


def make_sampler(config: OfflineConfig) -> ChainSampler:
    """The schedule + chain sampler every offline stage samples and scores chains with."""
    schedule = NoiseSchedule(config.n_diffusion_steps)
    return ChainSampler(schedule, config.n_sampling_steps, sampler=config.sampler, min_std=config.min_std)


def fit_behavior_model(
    obs: torch.Tensor,
    actions: torch.Tensor,
    config: OfflineConfig,
    logger: Any = None,
    progress_bar: bool = True,
    log_prefix: str = "offline/behavior",
) -> tuple[Denoiser, dict[str, Any]]:
    """Train the behaviour denoiser by epsilon prediction on the dataset.

    :param obs: (N, O) normalised observations
    :param actions: (N, A) actions scaled to [-1, 1]
    :param config: reads ``behavior_steps``, ``behavior_batch_size``, ``behavior_lr``, ``behavior_ema``, the
        architecture fields and ``seed``
    :param logger: SB3 logger or None
    :param progress_bar: show a progress bar
    :param log_prefix: key prefix of the logged values
    :return: the trained denoiser (the EMA copy when ``behavior_ema > 0``; eval mode, no grad) and a report with
        ``steps``, ``final_loss`` (EMA of the training loss), ``loss_curve`` (every ~5 %) and ``seconds``
    """
    n, action_dim = actions.shape
    if n == 0:
        raise ValueError("fit_behavior_model: the dataset is empty")
    start = time.time()
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    denoiser = make_denoiser(action_dim, obs.shape[1], config).to(obs.device)
    lr0 = config.behavior_lr
    model, loss_ema, curve = train_denoiser(
        denoiser,
        obs,
        actions,
        config,
        config.behavior_steps,
        lr0,
        # cosine decay of the learning rate to 10 % of its initial value
        lambda step, n_steps: lr0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(n_steps, 1)))),
        generator,
        logger,
        progress_bar,
        "offline: behaviour diffusion",
        log_prefix,
    )
    report = dict(steps=config.behavior_steps, final_loss=loss_ema, loss_curve=curve, seconds=time.time() - start)
    return model, report


def train_denoiser(
    denoiser: Denoiser,
    obs: torch.Tensor,
    actions: torch.Tensor,
    config: OfflineConfig,
    n_steps: int,
    lr: float,
    lr_at: Callable[[int, int], float] | None,
    generator: torch.Generator,
    logger: Any,
    progress_bar: bool,
    description: str,
    log_prefix: str,
) -> tuple[Denoiser, float, list[list[float]]]:
    """Train ``denoiser`` in place by epsilon prediction on ``(obs, actions)`` pairs: Adam, uniform minibatches of
    ``behavior_batch_size`` drawn with ``generator``, and an EMA copy of the weights when ``behavior_ema > 0`` (the
    behaviour model of stage 1 and its critic-guided refinement both train this way).

    :param denoiser: the network to train (its mode and grad flags are set here)
    :param obs: (N, O) normalised observations
    :param actions: (N, A) target actions in [-1, 1]
    :param config: reads ``behavior_batch_size``, ``behavior_ema`` and ``n_diffusion_steps``
    :param n_steps: gradient steps
    :param lr: Adam's learning rate
    :param lr_at: ``lr_at(step, n_steps)``, the learning rate of each step (None: constant ``lr``)
    :param generator: CPU generator of the minibatch indices
    :param logger: SB3 logger or None
    :param progress_bar: show a progress bar
    :param description: the progress bar's text
    :param log_prefix: key prefix of the logged values
    :return: the trained network (the EMA copy when ``behavior_ema > 0``; eval mode, no grad), the EMA of the training
        loss and the loss curve (``[step, loss]`` every ~5 %)
    """
    denoiser.train().requires_grad_(True)
    n = actions.shape[0]
    schedule = NoiseSchedule(config.n_diffusion_steps).to(obs.device)
    ema = copy.deepcopy(denoiser).requires_grad_(False) if config.behavior_ema > 0 else None
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
    batch = min(config.behavior_batch_size, n)
    loss_ema, curve = float("nan"), []
    log_every = max(n_steps // 20, 1)
    bar = make_progress_bar(n_steps, progress_bar, description)
    for step in range(n_steps):
        if lr_at is not None:
            lr = lr_at(step, n_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
        idx = torch.randint(0, n, (batch,), generator=generator).to(obs.device)
        loss = schedule.training_loss(denoiser, actions[idx], obs[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), denoiser.parameters(), strict=True):
                    p_ema.lerp_(p, 1.0 - config.behavior_ema)
        value = float(loss.detach())
        loss_ema = value if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * value
        bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == n_steps:
            curve.append([step + 1, loss_ema])
            bar.set_postfix(loss=f"{loss_ema:.4f}")
            log_values(logger, log_prefix, dict(loss=loss_ema, lr=lr), step + 1)
    bar.close()
    model = ema if ema is not None else denoiser
    model.eval().requires_grad_(False)
    return model, loss_ema, curve


@torch.no_grad()
def behavior_loss(denoiser: Denoiser, obs: torch.Tensor, actions: torch.Tensor, config: OfflineConfig, seed: int = 0) -> float:
    """Mean epsilon-prediction loss of ``denoiser`` on given transitions (a held-out check; fixed noise by ``seed``)."""
    schedule = NoiseSchedule(config.n_diffusion_steps).to(obs.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(schedule.training_loss(denoiser, actions, obs))
