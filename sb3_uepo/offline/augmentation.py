"""SynthER-style data augmentation with a physical-consistency filter (UEPO stage 5).

Owns: :class:`AugmentationConfig`, the unconditional transition diffusion model (trained and sampled here,
then discarded), :func:`physical_consistency_mask` and its :class:`ConsistencyReference`, and
:func:`synthesize_transitions`. Must not touch: the dynamics ensemble's training (``dynamics.py``; it is passed
in already fitted on real data), the termination rules (``termination.py``), policies, the pipeline.

Generation (after SynthER, Lu et al. 2023). Every real transition is flattened into one vector::

    x = [ s, a, r, s' - s, a_{t-1}, a_{t-2} ]        (dim 2 O + 3 A + 1)

where ``a_{t-1}, a_{t-2}`` are the two previous actions of the same episode (repeats of the first action at an
episode start, i.e. "at rest"). An unconditional denoiser ``eps(x_k, k)`` (the shared
:class:`~sb3_uepo.common.diffusion.Denoiser` with ``cond_dim=0``) is trained on these vectors with the shared
cosine :class:`~sb3_uepo.common.diffusion.NoiseSchedule` and sampled by ancestral DDPM through the shared
:class:`~sb3_uepo.common.diffusion.ChainSampler`. That sampler clips its ``x_0`` predictions to [-1, 1], so
every coordinate ``j`` is mapped linearly from ``[max(min_j, mu_j - 4 sd_j), min(max_j, mu_j + 4 sd_j)]`` (real
data) onto [-1, 1]: a bounded coordinate (actions, a joint at its limit, a velocity clipped by the environment)
keeps exactly its data range, which the clip then enforces on the samples, and a heavy-tailed one is clipped at 4
std so that one outlier cannot squash its bulk (as a plain min-max scaling would).
Differences from SynthER: we diffuse ``s' - s`` rather than
``s'`` (the change of state is what the dynamics model learns, and its scale is far smaller than the spread of
``s'``); we carry the two previous actions so that the action's velocity and acceleration can be checked; a small
MLP denoiser with 20 steps instead of a 6 x 1024 residual MLP with 128 EDM steps (CPU budget).

Filter (a synthetic transition is kept only if it passes every check; each check can be switched off):

* ``non_finite``: every coordinate is finite;
* ``state_range``: ``s`` and ``s'`` inside the real data's per-dimension [min, max] (normalised units);
* ``delta_range``: ``s' - s`` inside the real per-dimension range of ``s' - s``;
* ``action_range``: ``a`` (and the generated previous actions) inside the real per-dimension action range;
* ``action_velocity``: ``v = a_t - a_{t-1}`` inside the real range of ``v`` (computed within episodes);
* ``action_acceleration``: ``c = a_t - 2 a_{t-1} + a_{t-2}`` inside the real range of ``c``;
* ``reward_range``: ``r`` inside the real reward range;
* ``terminal_state``: ``s`` is not already terminal under the task's rule (real transitions never start there);
* ``disagreement``: the elites' disagreement on ``(s, a)`` is at most the ``disagreement_quantile`` of its value on
  real transitions;
* ``model_error``: the standardised distance between the elites' mean prediction and the transition's own
  ``(s' - s, r)`` is at most the ``error_quantile`` of that distance on real transitions.

All ranges can be widened by ``range_margin`` times the range's width.

Shape symbols: ``N`` transitions, ``O`` observation dim, ``A`` action dim. Observations normalised with the
dataset statistics, actions in [-1, 1].
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sb3_uepo.common.diffusion import ChainSampler, Denoiser, NoiseSchedule
from sb3_uepo.offline.dynamics import DynamicsEnsemble, TransitionTensors

FILTER_REASONS = (
    "non_finite",
    "state_range",
    "delta_range",
    "action_range",
    "action_velocity",
    "action_acceleration",
    "reward_range",
    "terminal_state",
    "disagreement",
    "model_error",
)


@dataclass
class AugmentationConfig:
    """Budget of the transition diffusion model and thresholds of the consistency filter."""

    ratio: float = 1.0  # synthetic candidates generated per real transition (1-3 x |D|), before filtering
    n_diffusion_steps: int = 20  # K of the transition diffusion (cosine schedule, epsilon prediction)
    n_sampling_steps: int | None = None  # DDPM steps used to sample (None: all K)
    hidden_sizes: tuple[int, ...] = (256, 256, 256)  # denoiser MLP widths
    time_embed_dim: int = 32  # width of the diffusion-step embedding
    learning_rate: float = 3e-4  # Adam
    batch_size: int = 256
    train_steps: int = 10_000  # gradient steps of the transition diffusion (the budget knob of the presets)
    ema_decay: float = 0.995  # EMA of the denoiser weights used for sampling (0 disables)
    clip_std: float = 4.0  # each coordinate maps [max(min, mu - c sd), min(max, mu + c sd)] onto [-1, 1] (c = clip_std)
    sample_batch_size: int = 8192  # transitions sampled per chunk
    action_history: bool = True  # diffuse (a_{t-1}, a_{t-2}) too and check the action velocity / acceleration
    range_margin: float = 0.0  # ranges widened by this fraction of their width (0: strictly the data's ranges)
    check_reward_range: bool = True  # also require r inside the real reward range
    disagreement_quantile: float | None = 0.9  # keep if disagreement <= this quantile of the real one (None: off)
    error_quantile: float | None = 0.9  # keep if model error <= this quantile of the real one (None: off)
    reference_size: int = 10_000  # real transitions used to compute those quantiles
    seed: int = 0  # diffusion training, sampling and the reference subsample
    device: str = "cpu"


# ---------------------------------------------------------------------------------------------- episode helpers
def infer_episode_starts(obs: torch.Tensor, next_obs: torch.Tensor, atol: float = 1e-5) -> torch.Tensor:
    """(N,) bool: True where ``obs[i]`` does not continue ``next_obs[i - 1]`` (flat arrays of whole episodes)."""
    starts = torch.ones(obs.shape[0], dtype=torch.bool, device=obs.device)
    if obs.shape[0] > 1:
        starts[1:] = (obs[1:] - next_obs[:-1]).abs().amax(-1) > atol
    return starts


def previous_actions(actions: torch.Tensor, episode_starts: torch.Tensor) -> torch.Tensor:
    """(N, 2, A): ``[:, 0] = a_{t-1}``, ``[:, 1] = a_{t-2}`` within the episode, padded with the earliest action."""
    prev1 = torch.cat([actions[:1], actions[:-1]])
    prev1 = torch.where(episode_starts.unsqueeze(-1), actions, prev1)
    prev2 = torch.cat([prev1[:1], prev1[:-1]])
    prev2 = torch.where(episode_starts.unsqueeze(-1), actions, prev2)
    return torch.stack([prev1, prev2], dim=1)


def action_velocity_acceleration(actions: torch.Tensor, prev_actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v = a_t - a_{t-1}`` and ``c = v_t - v_{t-1} = a_t - 2 a_{t-1} + a_{t-2}``, both (N, A)."""
    prev1, prev2 = prev_actions[:, 0], prev_actions[:, 1]
    return actions - prev1, actions - 2 * prev1 + prev2


# ---------------------------------------------------------------------------------------------- filter
@dataclass
class ConsistencyReference:
    """Per-dimension ranges and model thresholds measured on the REAL data (all tensors 1-D, normalised units)."""

    obs_low: torch.Tensor
    obs_high: torch.Tensor
    delta_low: torch.Tensor
    delta_high: torch.Tensor
    action_low: torch.Tensor
    action_high: torch.Tensor
    reward_low: torch.Tensor
    reward_high: torch.Tensor
    velocity_low: torch.Tensor | None = None  # None: no action history known
    velocity_high: torch.Tensor | None = None
    acceleration_low: torch.Tensor | None = None
    acceleration_high: torch.Tensor | None = None
    disagreement_threshold: float | None = None  # None: check off
    error_threshold: float | None = None  # None: check off


def _range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.amin(0), x.amax(0)


@torch.no_grad()
def _model_scores(dynamics: Any, tensors: TransitionTensors, chunk: int = 16_384) -> tuple[torch.Tensor, torch.Tensor]:
    """``dynamics.score_transitions`` in chunks (bounded memory): disagreement (N,), model error (N,)."""
    obs, actions, rewards, next_obs = tensors
    parts = [
        dynamics.score_transitions(obs[i : i + chunk], actions[i : i + chunk], rewards[i : i + chunk], next_obs[i : i + chunk])
        for i in range(0, obs.shape[0], chunk)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def consistency_reference(
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    episode_starts: torch.Tensor | None = None,
    dynamics: DynamicsEnsemble | Any | None = None,
    disagreement_quantile: float | None = 0.9,
    error_quantile: float | None = 0.9,
    reference_size: int = 10_000,
    generator: torch.Generator | None = None,
) -> ConsistencyReference:
    """Measure the real data's ranges (all transitions) and the model's thresholds (a random subsample).

    :param obs: (N, O) real normalised observations
    :param actions: (N, A) real actions in [-1, 1]
    :param rewards: (N,) real rewards
    :param next_obs: (N, O) real normalised next observations
    :param episode_starts: (N,) bool, first transition of each episode; inferred from ``next_obs[i-1] == obs[i]``
        when None
    :param dynamics: fitted ensemble (anything with ``score_transitions``); None switches the model checks off
    :param disagreement_quantile: quantile of the real disagreement used as threshold (None: off)
    :param error_quantile: quantile of the real model error used as threshold (None: off)
    :param reference_size: real transitions scored by the model for the quantiles
    :param generator: for the subsample
    """
    rewards = rewards.reshape(-1)
    starts = infer_episode_starts(obs, next_obs) if episode_starts is None else episode_starts.to(torch.bool)
    velocity, acceleration = action_velocity_acceleration(actions, previous_actions(actions, starts))
    ref = ConsistencyReference(
        *_range(torch.cat([obs, next_obs])),
        *_range(next_obs - obs),
        *_range(actions),
        *_range(rewards.reshape(-1, 1)),
        *_range(velocity),
        *_range(acceleration),
    )
    if dynamics is not None and (disagreement_quantile is not None or error_quantile is not None):
        n = obs.shape[0]
        idx = torch.randperm(n, generator=generator)[: min(reference_size, n)].to(obs.device)
        disagreement, error = _model_scores(dynamics, (obs[idx], actions[idx], rewards[idx], next_obs[idx]))
        if disagreement_quantile is not None:
            ref.disagreement_threshold = float(torch.quantile(disagreement.double(), disagreement_quantile))
        if error_quantile is not None:
            ref.error_threshold = float(torch.quantile(error.double(), error_quantile))
    return ref


def _outside(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, margin: float) -> torch.Tensor:
    """(N,) True where some dimension of ``x`` (N, X) lies outside ``[low, high]`` widened by ``margin`` x width."""
    pad = margin * (high - low)
    return ~((x >= low - pad) & (x <= high + pad)).all(-1)


@torch.no_grad()
def physical_consistency_mask(
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    reference: ConsistencyReference,
    dynamics: DynamicsEnsemble | Any | None = None,
    prev_actions: torch.Tensor | None = None,
    termination_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    margin: float = 0.0,
    check_reward_range: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Which (synthetic) transitions are physically consistent with the real data and the dynamics model.

    :param obs: (N, O) normalised observations
    :param actions: (N, A) actions in [-1, 1]
    :param rewards: (N,) rewards
    :param next_obs: (N, O) normalised next observations
    :param reference: ranges and thresholds of the real data (:func:`consistency_reference`)
    :param dynamics: fitted ensemble (``score_transitions``); the model checks are skipped when None or when the
        reference carries no threshold
    :param prev_actions: (N, 2, A) ``(a_{t-1}, a_{t-2})`` of every transition; velocity / acceleration checks are
        skipped when None
    :param termination_fn: task rule on normalised observations; a transition starting in a terminal state fails
    :param margin: widen every range by this fraction of its width
    :param check_reward_range: also require the reward inside the real range
    :return: ``keep`` (N,) bool and ``failed``: for every name of :data:`FILTER_REASONS` a (N,) bool mask of the
        transitions failing that check (a transition may fail several)
    """
    rewards = rewards.reshape(-1)
    n = obs.shape[0]
    none = torch.zeros(n, dtype=torch.bool, device=obs.device)
    finite_parts = [obs, actions, rewards.unsqueeze(-1), next_obs] + (
        [prev_actions.flatten(1)] if prev_actions is not None else []
    )
    non_finite = ~torch.isfinite(torch.cat(finite_parts, dim=-1)).all(-1)
    obs, actions, rewards, next_obs = (
        torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in (obs, actions, rewards, next_obs)
    )
    failed = {reason: none for reason in FILTER_REASONS}
    failed["non_finite"] = non_finite
    failed["state_range"] = _outside(obs, reference.obs_low, reference.obs_high, margin) | _outside(
        next_obs, reference.obs_low, reference.obs_high, margin
    )
    failed["delta_range"] = _outside(next_obs - obs, reference.delta_low, reference.delta_high, margin)
    all_actions = actions if prev_actions is None else torch.cat([actions, prev_actions.flatten(1)], dim=-1)
    n_repeats = all_actions.shape[-1] // actions.shape[-1]
    failed["action_range"] = _outside(
        all_actions, reference.action_low.repeat(n_repeats), reference.action_high.repeat(n_repeats), margin
    )
    if prev_actions is not None and reference.velocity_low is not None:
        velocity, acceleration = action_velocity_acceleration(actions, torch.nan_to_num(prev_actions))
        failed["action_velocity"] = _outside(velocity, reference.velocity_low, reference.velocity_high, margin)  # type: ignore[arg-type]
        failed["action_acceleration"] = _outside(
            acceleration, reference.acceleration_low, reference.acceleration_high, margin  # type: ignore[arg-type]
        )
    if check_reward_range:
        failed["reward_range"] = _outside(rewards.unsqueeze(-1), reference.reward_low, reference.reward_high, margin)
    if termination_fn is not None:
        failed["terminal_state"] = termination_fn(obs).reshape(n).to(obs.device)
    if dynamics is not None and (reference.disagreement_threshold is not None or reference.error_threshold is not None):
        disagreement, error = _model_scores(dynamics, (obs, actions, rewards, next_obs))
        if reference.disagreement_threshold is not None:
            failed["disagreement"] = disagreement > reference.disagreement_threshold
        if reference.error_threshold is not None:
            failed["model_error"] = error > reference.error_threshold
    keep = ~torch.stack(list(failed.values())).any(0)
    return keep, failed


# ---------------------------------------------------------------------------------------------- diffusion
class _Scaler:
    """Per-dimension affine map of flattened transitions onto [-1, 1].

    Dimension ``j`` maps ``[lo_j, hi_j]`` linearly onto [-1, 1] with ``lo_j = max(min_j, mu_j - c sd_j)`` and
    ``hi_j = min(max_j, mu_j + c sd_j)``: a bounded dimension (actions in [-1, 1], a joint at its limit, a clipped
    velocity) keeps exactly its data range, which the sampler's clip of ``x_0`` to [-1, 1] then enforces, and a
    heavy-tailed dimension is clipped at ``c`` standard deviations so that one outlier cannot squash its bulk.
    """

    def __init__(self, x: torch.Tensor, clip_std: float) -> None:
        mean, std = x.mean(0), x.std(0)
        self.low = torch.maximum(x.amin(0), mean - clip_std * std)
        self.high = torch.minimum(x.amax(0), mean + clip_std * std)
        self.center, self.half = (self.low + self.high) / 2, ((self.high - self.low) / 2).clamp(min=1e-6)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.center) / self.half).clamp(-1.0, 1.0)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(z * self.half + self.center, self.low), self.high)


def _fit_transition_diffusion(
    x: torch.Tensor, config: AugmentationConfig, logger: Any, progress_bar: bool
) -> tuple[Denoiser, NoiseSchedule, float]:
    """Train ``eps(x_k, k)`` on scaled transitions (N, X); returns the (EMA) denoiser, the schedule, the last loss."""
    from sb3_uepo.offline.config import make_progress_bar  # config imports this module: import when called

    device = x.device
    schedule = NoiseSchedule(config.n_diffusion_steps).to(device)
    denoiser = Denoiser(x.shape[1], 0, config.hidden_sizes, config.time_embed_dim).to(device)
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.learning_rate)
    batch = min(config.batch_size, x.shape[0])
    empty_cond = x.new_zeros(batch, 0)
    loss_ema = float("nan")
    bar = make_progress_bar(config.train_steps, progress_bar, "transition diffusion")
    for step in range(config.train_steps):
        bar.update(1)
        idx = torch.randint(0, x.shape[0], (batch,), device=device)
        loss = schedule.training_loss(denoiser, x[idx], empty_cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), denoiser.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - config.ema_decay)
        value = float(loss.detach())
        loss_ema = value if step == 0 else 0.99 * loss_ema + 0.01 * value
        if logger is not None and (step + 1) % 500 == 0:
            logger.record("augmentation/diffusion_loss", loss_ema)
            logger.dump(step=step + 1)
    bar.close()
    return (ema if config.ema_decay > 0 else denoiser), schedule, loss_ema


@torch.no_grad()
def _sample_transition_diffusion(
    denoiser: Denoiser, schedule: NoiseSchedule, n: int, config: AugmentationConfig, generator: torch.Generator
) -> torch.Tensor:
    """Ancestral DDPM samples (n, X) in the scaled space, drawn in chunks."""
    sampler = ChainSampler(schedule, config.n_sampling_steps or schedule.n_train_steps, sampler="ddpm", min_std=1e-4)
    sampler = sampler.to(next(denoiser.parameters()).device)
    out = []
    for start in range(0, n, config.sample_batch_size):
        size = min(config.sample_batch_size, n - start)
        cond = torch.zeros(size, 0, device=sampler.timesteps.device)
        chain = sampler.sample_chain(denoiser, cond, generator=generator)
        out.append(chain[:, -1].clamp(-1.0, 1.0))
    return torch.cat(out) if out else torch.zeros(0, denoiser.action_dim)


# ---------------------------------------------------------------------------------------------- public entry
def synthesize_transitions(
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    dynamics: DynamicsEnsemble | Any | None,
    config: AugmentationConfig | None = None,
    logger: Any = None,
    progress_bar: bool = True,
    episode_starts: torch.Tensor | None = None,
    termination_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[TransitionTensors, dict[str, Any]]:
    """Generate ``ratio * N`` synthetic transitions with a transition diffusion model and keep the consistent ones.

    :param obs: (N, O) real normalised observations
    :param actions: (N, A) real actions in [-1, 1]
    :param rewards: (N,) real rewards
    :param next_obs: (N, O) real normalised next observations
    :param dynamics: the ensemble fitted on the real data (model checks), or None (range checks only)
    :param config: budgets and filter thresholds (defaults when None)
    :param logger: SB3 logger or None
    :param progress_bar: show a progress bar while training the diffusion model
    :param episode_starts: (N,) bool; inferred from ``next_obs[i-1] == obs[i]`` when None
    :param termination_fn: task rule on normalised observations (``termination_fn_for``); drops synthetic
        transitions that start in a terminal state
    :return: the kept synthetic ``(obs, actions, rewards, next_obs)`` and a report: ``n_real``, ``n_generated``,
        ``n_kept``, ``kept_fraction``, ``failed`` (per check, non-exclusive counts), ``dropped_by`` (each dropped
        transition counted once, under the first failed check in :data:`FILTER_REASONS` order), ``thresholds``,
        diffusion loss and timings
    """
    config = config or AugmentationConfig()
    device = torch.device(config.device)
    obs, actions, next_obs = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (obs, actions, next_obs))
    rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device).reshape(-1)
    real = torch.cat([obs, actions, rewards.unsqueeze(-1), next_obs], dim=-1)
    if not torch.isfinite(real).all():
        raise ValueError("synthesize_transitions: the real transitions contain NaN or inf values; clean the dataset first.")
    n_real, obs_dim, action_dim = obs.shape[0], obs.shape[1], actions.shape[1]
    starts = infer_episode_starts(obs, next_obs) if episode_starts is None else torch.as_tensor(episode_starts, device=device)
    history = previous_actions(actions, starts.bool())
    parts = [obs, actions, rewards.unsqueeze(-1), next_obs - obs] + ([history.flatten(1)] if config.action_history else [])
    flat = torch.cat(parts, dim=-1)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    t0 = time.time()
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's global RNG
        torch.manual_seed(config.seed)
        scaler = _Scaler(flat, config.clip_std)
        denoiser, schedule, final_loss = _fit_transition_diffusion(scaler.scale(flat), config, logger, progress_bar)
        t1 = time.time()
        n_generated = round(config.ratio * n_real)
        samples = scaler.unscale(_sample_transition_diffusion(denoiser, schedule, n_generated, config, generator))
    t2 = time.time()

    # split the flat vectors back into a transition (and its action history)
    o, a = obs_dim, action_dim
    syn_obs, syn_act = samples[:, :o], samples[:, o : o + a]
    syn_rew, syn_next = samples[:, o + a], samples[:, :o] + samples[:, o + a + 1 : 2 * o + a + 1]
    syn_prev = samples[:, 2 * o + a + 1 :].reshape(-1, 2, a) if config.action_history else None

    reference = consistency_reference(
        obs,
        actions,
        rewards,
        next_obs,
        episode_starts=starts,
        dynamics=dynamics,
        disagreement_quantile=config.disagreement_quantile,
        error_quantile=config.error_quantile,
        reference_size=config.reference_size,
        generator=generator,
    )
    keep, failed = physical_consistency_mask(
        syn_obs,
        syn_act,
        syn_rew,
        syn_next,
        reference,
        dynamics=dynamics,
        prev_actions=syn_prev,
        termination_fn=termination_fn,
        margin=config.range_margin,
        check_reward_range=config.check_reward_range,
    )
    t3 = time.time()
    stacked = torch.stack([failed[r] for r in FILTER_REASONS])  # (R, N)
    first = torch.where(stacked.any(0), stacked.float().argmax(0), torch.full_like(keep, -1, dtype=torch.long))
    report: dict[str, Any] = dict(
        n_real=n_real,
        n_generated=n_generated,
        n_kept=int(keep.sum()),
        kept_fraction=float(keep.float().mean()) if n_generated else 0.0,
        failed={r: int(failed[r].sum()) for r in FILTER_REASONS},
        dropped_by={r: int((first == i).sum()) for i, r in enumerate(FILTER_REASONS)},
        thresholds=dict(disagreement=reference.disagreement_threshold, model_error=reference.error_threshold),
        diffusion_final_loss=final_loss,
        seconds=dict(train=t1 - t0, sample=t2 - t1, filter=t3 - t2),
    )
    if logger is not None:
        for key in ("n_generated", "n_kept", "kept_fraction"):
            logger.record(f"augmentation/{key}", report[key])
        for reason, count in report["dropped_by"].items():
            logger.record(f"augmentation/dropped_{reason}", count)
        logger.dump(step=config.train_steps)
    synthetic = (syn_obs[keep], syn_act[keep], syn_rew[keep], syn_next[keep])
    return synthetic, report
