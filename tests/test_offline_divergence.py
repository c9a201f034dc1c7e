"""Regulariser formulas of offline policy improvement: sequence divergence, adaptive perturbation, sequence KL,
Uni-O4's heuristic diversity term, and dataset segments."""

import math

import pytest
import torch

from sb3_uepo.offline.divergence import (
    SegmentSampler,
    divergence_loss,
    pairwise_divergence,
    perturb_,
    perturbation_sigmas,
    sequence_divergence,
    sequence_kl,
    uni_o4_diversity_loss,
    velocity_acceleration,
)


def test_identical_sequences_have_zero_divergence():
    a = torch.randn(5, 9, 3)
    assert torch.allclose(sequence_divergence(a, a), torch.zeros(5))
    constant = torch.ones(1, 4, 2)  # zero velocity and acceleration: still exactly 0
    assert float(sequence_divergence(constant, constant)) == 0.0


def test_divergence_matches_hand_computation():
    # T = 3: four 2-D actions each.
    a_i = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [6.0, 0.0]])
    a_j = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 4.0]])
    # v_i = (1,0),(2,0),(3,0); v_j = (0,1),(0,2),(0,1)
    # ||v_i - v_j|| = sqrt(2), sqrt(8), sqrt(10)
    # c_i = (1,0),(1,0); c_j = (0,1),(0,-1): cos = 0, 0 -> 1 - cos = 1, 1
    expected = (math.sqrt(2) + math.sqrt(8) + math.sqrt(10) + 2.0) / 3
    assert float(sequence_divergence(a_i, a_j)) == pytest.approx(expected, rel=1e-5)
    v, c = velocity_acceleration(a_i)
    assert v.shape == (3, 2) and c.shape == (2, 2)


def test_opposite_accelerations_cost_two():
    a_i = torch.tensor([[0.0], [0.0], [1.0]])  # v = 0, 1 ; c = +1
    a_j = torch.tensor([[0.0], [0.0], [-1.0]])  # v = 0, -1 ; c = -1
    # T = 2: (|0 - 0| + |1 - (-1)| + (1 - cos(1, -1))) / 2 = (2 + 2) / 2
    assert float(sequence_divergence(a_i, a_j)) == pytest.approx(2.0, rel=1e-5)


def test_pairwise_divergence_is_symmetric_with_zero_diagonal():
    actions = torch.randn(4, 6, 5, 2)
    div = pairwise_divergence(actions)
    assert div.shape == (4, 4)
    assert torch.allclose(div, div.T, atol=1e-6)
    assert torch.allclose(div.diagonal(), torch.zeros(4))
    assert float(div[0, 1]) == pytest.approx(float(sequence_divergence(actions[0], actions[1]).mean()), rel=1e-5)


def test_divergence_is_differentiable_at_identical_sequences():
    a = torch.randn(6, 2, requires_grad=True)
    sequence_divergence(a, a.detach()).backward()
    assert torch.isfinite(a.grad).all()


def test_divergence_loss_rewards_divergence_only_up_to_tau():
    div = torch.tensor([[0.0, 0.2, 1.5], [0.2, 0.0, 0.7], [1.5, 0.7, 0.0]])
    # pairs (0,1) 0.2, (0,2) 1.5, (1,2) 0.7 with tau = 1: relu -> 0.8, 0, 0.3
    assert float(divergence_loss(div, tau=1.0)) == pytest.approx((0.8 + 0.0 + 0.3) / 3)
    assert float(divergence_loss(torch.full((2, 2), 5.0), tau=1.0)) == 0.0
    assert float(divergence_loss(torch.zeros(1, 1), tau=1.0)) == 0.0


def test_perturbation_fires_only_below_tau_with_the_stated_sigma():
    tau, eta = 1.0, 0.5
    div = torch.tensor([[0.0, 0.4, 2.0], [0.4, 0.0, 1.0], [2.0, 1.0, 0.0]])
    sigma = perturbation_sigmas(div, tau, eta)
    # member 0: never (oldest); member 1: div(0,1) = 0.4 < tau -> eta (tau - 0.4) / tau = 0.3
    # member 2: div(0,2) = 2.0 and div(1,2) = 1.0, neither below tau -> 0
    assert sigma.tolist() == pytest.approx([0.0, 0.3, 0.0])
    # the closest older member sets sigma when several are too close
    div2 = torch.tensor([[0.0, 2.0, 0.9], [2.0, 0.0, 0.2], [0.9, 0.2, 0.0]])
    assert perturbation_sigmas(div2, tau, eta).tolist() == pytest.approx([0.0, 0.0, 0.4])


def test_perturb_touches_only_the_newer_member_with_the_right_std():
    params = {"w": torch.zeros(3, 200, 100), "b": torch.zeros(3, 50)}
    sigmas = torch.tensor([0.0, 0.3, 0.0])
    perturb_(params, sigmas, torch.Generator().manual_seed(0))
    assert params["w"][0].abs().max() == 0 and params["w"][2].abs().max() == 0 and params["b"][2].abs().max() == 0
    assert float(params["w"][1].std()) == pytest.approx(0.3, rel=0.02)
    untouched = {"w": torch.zeros(2, 5)}
    perturb_(untouched, torch.zeros(2))
    assert untouched["w"].abs().max() == 0


def test_sequence_kl_zero_for_identical_means_and_exact_otherwise():
    means = torch.randn(4, 7, 9, 5, 3)  # (M, G, T + 1, S, A)
    std = torch.full((5,), 0.1)
    assert torch.allclose(sequence_kl(means, means, std), torch.zeros(4, 7))
    shifted = means.clone()
    shifted[..., 0] += 0.2  # every step, every sequence element, one action dim
    kl = sequence_kl(shifted, means, std)
    assert torch.allclose(kl, torch.full((4, 7), 9 * 5 * 0.04 / (2 * 0.01)), rtol=1e-4)


def test_uni_o4_heuristic_term():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, 0.5], [-2.0, -4.0]], requires_grad=True)
    term = uni_o4_diversity_loss(logp, alpha=0.1)
    # member 0, sample 0: -0.1 (-1 - max(-3, -2)) = -0.1
    assert float(term[0, 0].detach()) == pytest.approx(-0.1)
    assert float(term[1, 1].detach()) == pytest.approx(-0.1 * (0.5 - (-2.0)))
    term.sum().backward()  # max is detached: the gradient is -alpha per entry
    assert torch.allclose(logp.grad, torch.full_like(logp, -0.1))
    assert torch.equal(uni_o4_diversity_loss(torch.randn(1, 4), 0.1), torch.zeros(1, 4))


def test_segments_stay_inside_episodes():
    starts = torch.zeros(30, dtype=torch.bool)
    starts[[0, 5, 20]] = True  # episodes of 5, 15, 10 transitions
    sampler = SegmentSampler(starts, segment_length=5)  # needs 6 transitions: only episodes 2 and 3 qualify
    idx = sampler.sample(500, torch.Generator().manual_seed(0))
    assert idx.shape == (500, 6)
    episode = torch.cumsum(starts.long(), 0)
    assert (episode[idx] == episode[idx[:, :1]]).all()
    assert set(idx[:, 0].tolist()) == set(range(5, 15)) | set(range(20, 25))


def test_too_small_dataset_for_segment_length_is_a_clear_error():
    starts = torch.zeros(12, dtype=torch.bool)
    starts[[0, 4, 8]] = True
    with pytest.raises(ValueError, match=r"too small for the segment length T=8.*longest has 4"):
        SegmentSampler(starts, segment_length=8)
