"""Regularisers of the offline policy improvement (UEPO stage 4): sequence divergence between members, adaptive
perturbation, sequence-level KL to the behaviour model; and Uni-O4's heuristic diversity term for the baseline.

Owns: the formulas below, :class:`SegmentSampler` (dataset segments ``s_t .. s_{t+T}`` inside episodes) and
:func:`sequence_regularizers` (one differentiable pass through the members' deterministic samplers for both the
divergence and the KL). Must not touch: the PPO surrogate and the training loop (``offline_ppo.py``), the members'
construction (``members.py``).

Sequence divergence. For a segment of dataset states ``s_t .. s_{t+T}`` (``T + 1`` states), member ``i`` acts
deterministically (DDIM, eta = 0, from its fixed seed noise) at every state: ``a^i_0 .. a^i_T``. Velocities
``v_t = a_{t+1} - a_t`` (``t < T``), accelerations ``c_t = v_{t+1} - v_t`` (``t < T - 1``), and::

    div(a^i, a^j) = (1 / T) [ sum_{t < T} ||v^i_t - v^j_t||_2  +  sum_{t < T-1} (1 - cos(c^i_t, c^j_t)) ]

averaged over the segments of a batch. Identical sequences give exactly 0. For numerical safety the norm is
``sqrt(||x||^2 + e^2) - e`` and ``1 - cos(x, y) = ||x/|x| - y/|y| ||^2 / 2`` with ``|x| = sqrt(||x||^2 + e^2)``
(``e = 1e-6``): equal to the formula for non-vanishing vectors, 0 for identical ones (also when both are 0),
and differentiable everywhere.

Divergence loss (rewards divergence up to the target ``tau``, no push beyond)::

    L_div = mean_{i < j} relu(tau - div(a^i, a^j))

Adaptive perturbation. For each pair ``i < j`` (``j`` is the newer member: members are numbered in creation order)
with ``div_ij < tau``, the newer member ``j`` gets ``theta_j <- theta_j + N(0, sigma^2 I)`` with
``sigma = eta (tau - div_ij) / tau``; when several older members are too close, the largest sigma is used, once.
Nothing happens when ``div >= tau``; member 0 is never perturbed.

Sequence-level KL to the behaviour model. Along the member's deterministic chain ``x_0 .. x_S`` at every state of the
segment, both the member's and the behaviour model's step distributions are Gaussians with the same std
``sigma_j`` (the sampler's floored step std), so::

    KL = sum_{t <= T} sum_{j < S} || mu_member(x_j, k_j, s_t) - mu_behaviour(x_j, k_j, s_t) ||^2 / (2 sigma_j^2)

(``mu_member(x_j) = x_{j+1}`` on a deterministic chain), averaged over segments.

Uni-O4's heuristic diversity term (Lei et al., ICLR 2024; code Lei-Kun/Uni-O4, ``BC_ensemble.py``, ``kl_type=
'heuristic'``, ``kl_bc='data'``): member ``i``'s BC loss on a dataset pair gets
``- alpha (log pi_i(a|s) - max_{j != i} log pi_j(a|s))`` with the max detached. Note (our reading of the code):
since the max is detached, its gradient is ``-alpha grad log pi_i``, i.e. a rescaled BC gradient; the members'
diversity then comes from separate initialisations. We implement it as written, to reproduce the baseline.

Shape symbols: ``M`` members, ``G`` segments, ``T`` segment length, ``A`` action dim, ``S`` sampling steps.
"""

from __future__ import annotations

from typing import Any

import torch

_EPS = 1e-6


# ---------------------------------------------------------------------------------------------- formulas
def _smooth_norm(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(||x||^2 + e^2) - e`` over the last axis: the L2 norm, exactly 0 at 0, smooth everywhere."""
    return (x.pow(2).sum(-1) + _EPS**2).sqrt() - _EPS


def _one_minus_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x, y)`` as ``||x/|x| - y/|y| ||^2 / 2`` with smoothed norms (0 when x == y, also at 0)."""
    ux = x / (x.pow(2).sum(-1, keepdim=True) + _EPS**2).sqrt()
    uy = y / (y.pow(2).sum(-1, keepdim=True) + _EPS**2).sqrt()
    return 0.5 * (ux - uy).pow(2).sum(-1)


def velocity_acceleration(actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v_t = a_{t+1} - a_t`` (..., T, A) and ``c_t = v_{t+1} - v_t`` (..., T - 1, A) of sequences (..., T + 1, A)."""
    velocity = actions[..., 1:, :] - actions[..., :-1, :]
    return velocity, velocity[..., 1:, :] - velocity[..., :-1, :]


def sequence_divergence(actions_i: torch.Tensor, actions_j: torch.Tensor) -> torch.Tensor:
    """``div(a^i, a^j)`` of action sequences (see the module docstring).

    :param actions_i: (..., T + 1, A)
    :param actions_j: (..., T + 1, A), broadcastable with ``actions_i``
    :return: (...) one divergence per sequence pair
    """
    if actions_i.shape[-2] < 3:
        raise ValueError(f"sequences need at least 3 actions (T >= 2) for an acceleration, got {actions_i.shape[-2]}")
    v_i, c_i = velocity_acceleration(actions_i)
    v_j, c_j = velocity_acceleration(actions_j)
    horizon = v_i.shape[-2]  # T
    return (_smooth_norm(v_i - v_j).sum(-1) + _one_minus_cos(c_i, c_j).sum(-1)) / horizon


def pairwise_divergence(actions: torch.Tensor) -> torch.Tensor:
    """Divergence of every member pair, averaged over segments.

    :param actions: (M, G, T + 1, A) the members' actions along G segments
    :return: (M, M) symmetric, zero diagonal
    """
    return sequence_divergence(actions.unsqueeze(1), actions.unsqueeze(0)).mean(-1)


def _upper_pairs(n: int, device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)


def divergence_loss(divergence: torch.Tensor, tau: float) -> torch.Tensor:
    """``mean_{i<j} relu(tau - div_ij)``: rewards divergence up to ``tau``, no push beyond (0 for one member)."""
    n = divergence.shape[0]
    if n < 2:
        return divergence.sum() * 0.0
    return torch.relu(tau - divergence[_upper_pairs(n, divergence.device)]).mean()


def perturbation_sigmas(divergence: torch.Tensor, tau: float, eta: float) -> torch.Tensor:
    """Per-member perturbation std: ``max_{i<j, div_ij < tau} eta (tau - div_ij) / tau`` for member ``j``, else 0.

    :param divergence: (M, M) pairwise divergences
    :return: (M,) sigmas (member 0 always 0)
    """
    n = divergence.shape[0]
    sigma = eta * (tau - divergence) / tau
    close = _upper_pairs(n, divergence.device) & (divergence < tau)
    return torch.where(close, sigma, torch.zeros_like(sigma)).amax(0).clamp(min=0.0)


@torch.no_grad()
def perturb_(
    tensors: dict[str, torch.Tensor] | torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None
) -> None:
    """Add ``N(0, sigma_m^2)`` noise in place to member ``m``'s slice of every stacked tensor (M, ...); sigma 0: untouched.

    :param tensors: stacked parameters ``{name: (M, ...)}`` or one stacked tensor (e.g. the seed noises (M, A))
    :param sigmas: (M,) stds
    :param generator: torch generator of the noise
    """
    items = tensors.values() if isinstance(tensors, dict) else [tensors]
    if not bool((sigmas > 0).any()):
        return
    for t in items:
        noise = torch.randn(t.shape, generator=generator, device="cpu").to(t.device, t.dtype)
        t.add_(noise * sigmas.to(t.device, t.dtype).view(-1, *([1] * (t.dim() - 1))))


def sequence_kl(member_means: torch.Tensor, behavior_means: torch.Tensor, step_std: torch.Tensor) -> torch.Tensor:
    """Sequence-level KL between equal-variance Gaussian chains: ``sum ||mu_m - mu_b||^2 / (2 sigma_j^2)``.

    :param member_means: (..., L, S, A) the member's step means along a sequence of ``L`` states
    :param behavior_means: (..., L, S, A) the behaviour model's step means at the same chain points
    :param step_std: (S,) the std of every step
    :return: (...) summed over the sequence, the steps and the action dims
    """
    var = step_std.to(member_means.dtype).pow(2).view(*([1] * (member_means.dim() - 2)), -1, 1)
    return ((member_means - behavior_means).pow(2) / (2 * var)).sum(dim=(-1, -2, -3))


def uni_o4_diversity_loss(log_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Uni-O4's heuristic term ``-alpha (log pi_i(a|s) - max_{j != i} log pi_j(a|s))`` (max detached).

    :param log_probs: (M, B) log-densities of the same dataset pairs under every member
    :param alpha: weight
    :return: (M, B) to add to the members' BC losses (zeros for one member)
    """
    n = log_probs.shape[0]
    if n < 2:
        return torch.zeros_like(log_probs)
    others = log_probs.detach().unsqueeze(0).expand(n, -1, -1).clone()  # others[i, j] = log pi_j
    others[torch.eye(n, dtype=torch.bool, device=log_probs.device)] = float("-inf")
    return -alpha * (log_probs - others.amax(1))


# ---------------------------------------------------------------------------------------------- segments
class SegmentSampler:
    """Draws dataset segments ``s_t .. s_{t+T}`` that lie inside one episode.

    :param episode_starts: (N,) bool, True on the first transition of every episode (flat, episodes in order)
    :param segment_length: ``T`` (a segment holds ``T + 1`` consecutive transitions)
    """

    def __init__(self, episode_starts: torch.Tensor, segment_length: int) -> None:
        starts = torch.as_tensor(episode_starts, dtype=torch.bool).reshape(-1).clone()
        n = starts.numel()
        self.segment_length = int(segment_length)
        if n > 0:
            starts[0] = True
        episode = torch.cumsum(starts.long(), 0)
        span = self.segment_length + 1
        if n < span:
            self.valid_starts = torch.zeros(0, dtype=torch.long)
        else:
            self.valid_starts = torch.nonzero(episode[: n - span + 1] == episode[span - 1 :]).reshape(-1)
        if self.valid_starts.numel() == 0:
            lengths = torch.bincount(episode)[1:] if n else torch.zeros(0, dtype=torch.long)
            longest = int(lengths.max()) if lengths.numel() else 0
            raise ValueError(
                f"The dataset is too small for the segment length T={self.segment_length}: the divergence and KL terms "
                f"need episodes of at least T + 1 = {span} transitions, the longest has {longest}. "
                "Use a smaller 'segment_length', more data, or turn off use_divergence, use_perturbation and use_kl."
            )

    def sample(self, n_segments: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(G, T + 1) indices into the flat transition arrays."""
        pick = torch.randint(0, self.valid_starts.numel(), (n_segments,), generator=generator)
        return self.valid_starts[pick].unsqueeze(1) + torch.arange(self.segment_length + 1).unsqueeze(0)


# ---------------------------------------------------------------------------------------------- one pass for both terms
def sequence_regularizers(
    members: Any,
    behavior: torch.nn.Module | None,
    segment_obs: torch.Tensor,
    compute_divergence: bool = True,
    compute_kl: bool = True,
) -> dict[str, torch.Tensor]:
    """Roll every member deterministically along dataset segments and compute the divergence and the KL terms.

    Gradients flow into the members' current weights through the deterministic DDIM sampler (fixed seed noise).

    :param members: :class:`~sb3_uepo.offline.members.DiffusionMembers`
    :param behavior: the frozen behaviour denoiser (needed for the KL)
    :param segment_obs: (G, T + 1, O) normalised dataset states of G segments
    :param compute_divergence: compute ``divergence`` (M, M)
    :param compute_kl: compute ``kl`` (M,) (mean over segments)
    :return: dict with ``actions`` (M, G, T + 1, A) and the requested terms
    """
    n_seg, length, obs_dim = segment_obs.shape
    flat_obs = segment_obs.reshape(n_seg * length, obs_dim)
    chains = members.sample_chains(flat_obs, deterministic=True)  # (M, G (T + 1), S + 1, A), with grad
    m = chains.shape[0]
    out: dict[str, torch.Tensor] = {"actions": chains[:, :, -1].reshape(m, n_seg, length, -1)}
    if compute_divergence:
        out["divergence"] = pairwise_divergence(out["actions"])
    if compute_kl:
        if behavior is None:
            raise ValueError("the sequence KL needs the behaviour denoiser")
        sampler = members.sampler
        flat_chains = chains.reshape(m * n_seg * length, *chains.shape[2:])
        behavior_means = sampler.chain_means(behavior, flat_chains, flat_obs.repeat(m, 1))
        member_means = chains[:, :, 1:].reshape(m, n_seg, length, chains.shape[2] - 1, chains.shape[3])
        behavior_means = behavior_means.reshape(member_means.shape)
        out["kl"] = sequence_kl(member_means, behavior_means, sampler.step_std).mean(-1)
    return out
