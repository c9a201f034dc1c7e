"""Named tuples passed between the diffusion policy, its rollout buffer and the UEPO loss.

Shape symbols: ``B`` batch, ``A`` action dimension, ``S`` denoising (sampling) steps; a chain is ``(B, S + 1, A)``
with ``chain[:, 0]`` the initial noise and ``chain[:, -1]`` the (unclipped) action.
"""

from __future__ import annotations

from typing import NamedTuple

import torch as th


class DiffusionRolloutBufferSamples(NamedTuple):
    """A minibatch of a :class:`~sb3_uepo.common.buffers.DiffusionRolloutBuffer`: SB3's ``RolloutBufferSamples``
    fields first (same names and order), then the denoising chain and its per-step log-probabilities."""

    observations: th.Tensor  # (B, O)
    actions: th.Tensor  # (B, A) the action sent to the env, in [-1, 1]
    old_values: th.Tensor  # (B,)
    old_log_prob: th.Tensor  # (B,) log pi_old(chain | s), the sum of old_step_log_prob
    advantages: th.Tensor  # (B,)
    returns: th.Tensor  # (B,)
    chains: th.Tensor  # (B, S + 1, A) the sampled chain, unclipped
    old_step_log_prob: th.Tensor  # (B, S) log N(x_{j+1}; mu_old_j, sigma_j^2), summed over action dims
    reference_means: th.Tensor | None = None  # (B, K, A) the KL reference's step means of the fine-tuned steps, if set


class ChainSample(NamedTuple):
    """What :meth:`~sb3_uepo.common.policies.DiffusionPolicy.sample_chain_with_values` returns for a rollout step."""

    actions: th.Tensor  # (B, A) chain[:, -1] clipped to [-1, 1]
    values: th.Tensor  # (B, 1)
    log_prob: th.Tensor  # (B,) log pi(chain | s)
    chain: th.Tensor  # (B, S + 1, A) unclipped
    step_log_prob: th.Tensor  # (B, S)


class ChainEvaluation(NamedTuple):
    """What :meth:`~sb3_uepo.common.policies.DiffusionPolicy.evaluate_chains` returns: everything the PPO loss over
    the chain needs, from ONE batched denoiser call."""

    values: th.Tensor  # (B, 1)
    step_log_prob: th.Tensor  # (B, S)
    means: th.Tensor  # (B, S, A) step means mu_j, for the KL to a reference policy
