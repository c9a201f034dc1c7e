"""Offline policy evaluation ranks hand-made policies correctly on a 1-D point mass with known dynamics.

Toy task: ``x' = x + 0.2 a``, ``r = 1 - x'^2`` (an alive bonus, as in locomotion), terminated when ``|x'| > 1``.
Members (batched): 0 drives x to 0 (good), 1 does nothing, 2 pushes x away (bad).
"""

import pytest
import torch

from sb3_uepo.offline.dynamics import DynamicsConfig, fit_dynamics
from sb3_uepo.offline.ope import offline_policy_evaluation

GAINS = torch.tensor([-5.0, 0.0, 5.0])  # member m acts a = clip(gain_m * x)


class PointMass:
    """True dynamics with the ``step`` interface of the ensemble."""

    def step(self, obs, actions, generator=None):
        next_obs = obs + 0.2 * actions
        return next_obs, 1.0 - next_obs[..., 0] ** 2, {}


def members(obs):  # (M, B, 1) -> (M, B, 1)
    return (GAINS.view(-1, 1, 1) * obs).clamp(-1, 1)


def terminated(obs):
    return obs[..., 0].abs() > 1.0


def start_states(n=64, seed=0):
    return torch.rand(n, 1, generator=torch.Generator().manual_seed(seed)) * 1.2 - 0.6


def test_ranks_good_above_bad_with_true_dynamics():
    scores = offline_policy_evaluation(PointMass(), members, start_states(), horizon=20, gamma=0.99, n_members=3)
    assert scores.shape == (3,)
    assert scores[0] > scores[1] > scores[2]


def test_exact_returns_with_termination_and_terminal_value():
    start = torch.full((1, 1), 0.5)

    def value_fn(obs):
        return 10.0 - obs[:, 0] ** 2

    scores, info = offline_policy_evaluation(
        PointMass(),
        members,
        start,
        horizon=5,
        gamma=0.9,
        value_fn=value_fn,
        termination_fn=terminated,
        n_members=3,
        return_info=True,
    )
    discounts = [0.9**t for t in range(5)]
    # good: x = 0.3, 0.1, 0.0, 0.0, 0.0 -> survives, + 0.9^5 V(0)
    good = sum(d * (1 - x**2) for d, x in zip(discounts, [0.3, 0.1, 0.0, 0.0, 0.0], strict=True)) + 0.9**5 * 10.0
    # idle: x stays 0.5 -> survives
    idle = sum(d * 0.75 for d in discounts) + 0.9**5 * 9.75
    # bad: x = 0.7, 0.9, 1.1 -> terminated after the third reward, no terminal value
    bad = (1 - 0.49) + 0.9 * (1 - 0.81) + 0.81 * (1 - 1.21)
    torch.testing.assert_close(scores, torch.tensor([good, idle, bad]))
    torch.testing.assert_close(info["terminated_fraction"], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(info["mean_length"], torch.tensor([5.0, 5.0, 3.0]))


def test_mean_q_score_and_am_q_terminal():
    def q_fn(obs, act):
        return 1 - (obs[:, 0] + 0.2 * act[:, 0]) ** 2

    start = start_states()
    mean_q = offline_policy_evaluation(None, members, start, horizon=0, gamma=0.99, score="mean_q", q_fn=q_fn, n_members=3)
    assert mean_q[0] > mean_q[1] > mean_q[2]
    am_q = offline_policy_evaluation(PointMass(), members, start, horizon=3, gamma=0.99, q_fn=q_fn, n_members=3)
    assert am_q[0] > am_q[1] > am_q[2]


@pytest.fixture(scope="module")
def point_mass_model():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(3000, 1, generator=g) * 3 - 1.5
    act = torch.rand(3000, 1, generator=g) * 2 - 1
    next_obs, rew, _ = PointMass().step(obs, act)
    cfg = DynamicsConfig(hidden_sizes=(64, 64), max_steps=1500, batch_size=128, eval_interval=250)
    return fit_dynamics(obs, act, rew, next_obs, cfg, progress_bar=False)


def test_ranks_correctly_through_a_fitted_ensemble(point_mass_model):
    start = start_states(128, seed=1)
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(horizon=15, gamma=0.99, termination_fn=terminated, n_members=3)
    model_scores = offline_policy_evaluation(point_mass_model, members, start, generator=gen, **kwargs)
    true_scores = offline_policy_evaluation(PointMass(), members, start, **kwargs)
    assert model_scores[0] > model_scores[1] > model_scores[2]
    torch.testing.assert_close(model_scores, true_scores, atol=0.3, rtol=0.1)


def test_identical_members_share_random_numbers(point_mass_model):
    def same(obs):
        return (-5 * obs).clamp(-1, 1)

    start = start_states(16).unsqueeze(0).expand(2, -1, -1)  # (M, B, O) form
    scores = offline_policy_evaluation(
        point_mass_model, same, start, horizon=10, gamma=0.99, generator=torch.Generator().manual_seed(3)
    )
    assert scores[0] == scores[1]


def test_uncertainty_penalty_subtracts_the_elites_disagreement(point_mass_model):
    """lambda * disagreement comes off every reward of the same trajectories: linear in lambda, exact per step."""
    start = start_states(32, seed=2)
    kwargs = dict(horizon=6, gamma=1.0, n_members=3)

    def score(penalty):
        return offline_policy_evaluation(
            point_mass_model, members, start, generator=torch.Generator().manual_seed(5), uncertainty_penalty=penalty, **kwargs
        )

    plain, once, twice = score(0.0), score(1.0), score(2.0)
    assert (plain > once).all()
    torch.testing.assert_close(plain - twice, 2 * (plain - once), rtol=1e-4, atol=1e-5)
    # the penalty of one step, by hand: from the start states, the first model step's disagreement
    one_step = offline_policy_evaluation(
        point_mass_model,
        members,
        start,
        1,
        1.0,
        n_members=3,
        generator=torch.Generator().manual_seed(5),
        uncertainty_penalty=1.0,
    )
    plain_step = offline_policy_evaluation(
        point_mass_model, members, start, 1, 1.0, n_members=3, generator=torch.Generator().manual_seed(5)
    )
    actions = members(start.unsqueeze(0).expand(3, -1, -1))
    expected = point_mass_model.disagreement(start.unsqueeze(0).expand(3, -1, -1), actions).mean(1)
    torch.testing.assert_close(plain_step - one_step, expected, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="DynamicsEnsemble"):
        offline_policy_evaluation(
            PointMass(), members, start_states(), horizon=5, gamma=0.99, n_members=3, uncertainty_penalty=1.0
        )
    with pytest.raises(ValueError, match="n_members"):
        offline_policy_evaluation(PointMass(), members, start_states(), horizon=5, gamma=0.99)
    with pytest.raises(ValueError, match="score"):
        offline_policy_evaluation(
            PointMass(), members, start_states(), horizon=5, gamma=0.99, n_members=3, score="real_return"
        )
    with pytest.raises(ValueError, match="q_fn"):
        offline_policy_evaluation(None, members, start_states(), horizon=5, gamma=0.99, n_members=3, score="mean_q")
    with pytest.raises(ValueError, match=r"\(M, B, A\)"):
        offline_policy_evaluation(PointMass(), lambda o: o[0], start_states(), horizon=5, gamma=0.99, n_members=3)
