"""SynthER-style augmentation: the physical-consistency filter drops planted inconsistent transitions and keeps
valid ones; the generator returns only transitions that pass it.

Toy data: a stable linear system ``s' = A s + B a + noise`` driven by smooth sinusoidal actions in [-0.4, 0.4]
(so the action's velocity and acceleration have narrow ranges), reward ``r = s_0 - 0.5 a_1``.
"""

import math

import pytest
import torch

from sb3_uepo.offline.augmentation import (
    FILTER_REASONS,
    AugmentationConfig,
    consistency_reference,
    infer_episode_starts,
    physical_consistency_mask,
    previous_actions,
    synthesize_transitions,
)
from sb3_uepo.offline.dynamics import DynamicsConfig, fit_dynamics

A_MAT = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.85, 0.1], [0.05, 0.0, 0.9]])
B_MAT = torch.tensor([[0.5, 0.0], [0.0, 0.3], [0.2, -0.4]])


def make_episodes(n_episodes=20, length=100, seed=0, action_noise=0.001, state_noise=0.01):
    g = torch.Generator().manual_seed(seed)
    obs, act, rew, nxt = [], [], [], []
    for _ in range(n_episodes):
        s = torch.randn(3, generator=g)
        phase = torch.rand(2, generator=g) * 2 * math.pi
        for t in range(length):
            a = 0.4 * torch.sin(0.2 * t + phase) + action_noise * torch.randn(2, generator=g)
            s_next = A_MAT @ s + B_MAT @ a + state_noise * torch.randn(3, generator=g)
            obs.append(s), act.append(a), rew.append(s[0] - 0.5 * a[1]), nxt.append(s_next)
            s = s_next
    return torch.stack(obs), torch.stack(act), torch.stack(rew), torch.stack(nxt)


@pytest.fixture(scope="module")
def real():
    return make_episodes()


@pytest.fixture(scope="module")
def dynamics(real):
    torch.set_num_threads(1)
    cfg = DynamicsConfig(hidden_sizes=(64, 64), max_steps=800, batch_size=128, eval_interval=200)
    return fit_dynamics(*real, cfg, progress_bar=False)


def test_episode_helpers():
    obs = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    next_obs = torch.tensor([[1.0], [2.0], [3.0], [11.0], [12.0]])
    starts = infer_episode_starts(obs, next_obs)
    assert starts.tolist() == [True, False, False, True, False]
    actions = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    prev = previous_actions(actions, starts)
    assert prev[:, 0, 0].tolist() == [1.0, 1.0, 2.0, 4.0, 4.0]  # a_{t-1}, the first action repeated at a start
    assert prev[:, 1, 0].tolist() == [1.0, 1.0, 1.0, 4.0, 4.0]  # a_{t-2}


def test_real_data_passes_every_range_check(real):
    obs, act, rew, nxt = real
    starts = infer_episode_starts(obs, nxt)
    assert int(starts.sum()) == 20
    reference = consistency_reference(obs, act, rew, nxt)
    keep, failed = physical_consistency_mask(obs, act, rew, nxt, reference, prev_actions=previous_actions(act, starts))
    assert bool(keep.all()) and set(failed) == set(FILTER_REASONS)


def _planted(real, reference):
    """Transitions that are consistent except for one planted defect each; returns (name -> tensors, prev)."""
    obs, act, rew, nxt = real
    prev = previous_actions(act, infer_episode_starts(obs, nxt))
    i = 500  # a mid-episode transition
    base = dict(obs=obs[i].clone(), act=act[i].clone(), rew=rew[i].clone(), nxt=nxt[i].clone(), prev=prev[i].clone())
    planted = {}

    def plant(name, **changes):
        item = {k: v.clone() for k, v in base.items()}
        for key, fn in changes.items():
            item[key] = fn(item[key])
        planted[name] = item

    lo, hi = reference.obs_low, reference.obs_high
    plant("state_range", obs=lambda s: torch.cat([hi[:1] + 1.0, s[1:]]))
    plant("delta_range", obs=lambda s: torch.cat([lo[:1] * 0.95, s[1:]]), nxt=lambda s: torch.cat([hi[:1] * 0.95, s[1:]]))
    plant("action_range", act=lambda a: torch.tensor([0.9, a[1]]))
    # a_{t-1} far from a_t although both are legal actions: a velocity the behaviour never shows
    plant(
        "action_velocity",
        act=lambda a: torch.tensor([0.3, a[1]]),
        prev=lambda p: torch.stack([torch.tensor([-0.3, p[0, 1]]), p[1]]),
    )
    # v_t = +0.05 and v_{t-1} = -0.05 are each legal velocities; their change (0.1) is an impossible acceleration
    plant(
        "action_acceleration",
        act=lambda a: torch.tensor([0.1, a[1]]),
        prev=lambda p: torch.tensor([[0.05, p[0, 1]], [0.1, p[1, 1]]]),
    )
    plant("reward_range", rew=lambda r: reference.reward_high[0] + 1.0)
    plant("non_finite", rew=lambda r: torch.tensor(float("nan")))
    plant("model_error", rew=lambda r: r + 0.3)  # inside the reward range, but not what the dynamics give
    # every state and action coordinate in range, but jointly far from the data: the ensemble extrapolates
    corner_obs, corner_act = hi * 0.9, reference.action_low * 0.9
    plant(
        "disagreement",
        obs=lambda s: corner_obs,
        act=lambda a: corner_act,
        nxt=lambda s: corner_obs + 0.5 * (reference.delta_low + reference.delta_high),
        prev=lambda p: corner_act.expand(2, -1).clone(),
    )
    return planted


def test_filter_drops_planted_inconsistent_transitions_and_keeps_valid_ones(real, dynamics):
    obs, act, rew, nxt = real
    reference = consistency_reference(obs, act, rew, nxt, dynamics=dynamics, disagreement_quantile=0.99, error_quantile=0.99)
    planted = _planted(real, reference)
    names = list(planted)
    stack = {k: torch.stack([planted[n][k] for n in names]) for k in ("obs", "act", "rew", "nxt", "prev")}
    keep, failed = physical_consistency_mask(
        stack["obs"], stack["act"], stack["rew"], stack["nxt"], reference, dynamics=dynamics, prev_actions=stack["prev"]
    )
    for j, name in enumerate(names):
        assert bool(failed[name][j]), f"planted '{name}' defect was not detected"
        assert not bool(keep[j]), f"planted '{name}' transition was kept"
    # the unmodified transitions of fresh episodes from the same system are kept (up to the 1% quantile tails
    # and the episodes' small excursions beyond the training data's ranges)
    v_obs, v_act, v_rew, v_nxt = make_episodes(n_episodes=3, seed=1)
    v_prev = previous_actions(v_act, infer_episode_starts(v_obs, v_nxt))
    keep_valid, _ = physical_consistency_mask(v_obs, v_act, v_rew, v_nxt, reference, dynamics=dynamics, prev_actions=v_prev)
    assert keep_valid.float().mean() > 0.9


def test_duck_typed_model_and_terminal_state_check(real):
    obs, act, rew, nxt = real

    class Stub:  # disagreement = |s_0|, error = 0: drops exactly the states with |s_0| above the 80% quantile
        def score_transitions(self, o, a, r, n):
            return o[:, 0].abs(), torch.zeros(o.shape[0])

    reference = consistency_reference(obs, act, rew, nxt, dynamics=Stub(), disagreement_quantile=0.8, reference_size=len(obs))
    keep, failed = physical_consistency_mask(
        obs, act, rew, nxt, reference, dynamics=Stub(), termination_fn=lambda o: o[..., 1] > 1.0, check_reward_range=False
    )
    threshold = torch.quantile(obs[:, 0].abs().double(), 0.8).float()
    assert torch.equal(failed["disagreement"], obs[:, 0].abs() > threshold)
    assert torch.equal(failed["terminal_state"], obs[:, 1] > 1.0)
    assert torch.equal(keep, ~(failed["disagreement"] | failed["terminal_state"]))


def test_synthesize_transitions_end_to_end():
    real = make_episodes(action_noise=0.05, state_noise=0.05)  # noisier data: learnable by a tiny diffusion budget
    obs, act, rew, nxt = real
    dynamics = fit_dynamics(*real, DynamicsConfig(hidden_sizes=(64, 64), max_steps=600, batch_size=128), progress_bar=False)
    cfg = AugmentationConfig(ratio=0.5, train_steps=800, hidden_sizes=(256, 256), sample_batch_size=512)
    (s, a, r, s2), report = synthesize_transitions(obs, act, rew, nxt, dynamics, cfg, progress_bar=False)
    assert report["n_real"] == 2000 and report["n_generated"] == 1000
    assert report["n_kept"] == len(s) == len(a) == len(r) == len(s2) > 50
    assert sum(report["dropped_by"].values()) == report["n_generated"] - report["n_kept"]
    assert all(report["failed"][k] >= report["dropped_by"][k] for k in FILTER_REASONS)
    assert s.shape[1] == 3 and a.shape[1] == 2 and r.dim() == 1
    # what is returned passes the range checks again
    keep, _ = physical_consistency_mask(s, a, r, s2, consistency_reference(obs, act, rew, nxt))
    assert bool(keep.all())
    # the kept synthetic transitions follow the true dynamics (data noise: 0.05 per dimension)
    residual = s2 - (s @ A_MAT.T + a @ B_MAT.T)
    assert residual.abs().mean() < 0.08


def test_synthesis_is_seeded_and_leaves_the_global_rng_alone(real):
    cfg = AugmentationConfig(ratio=0.1, train_steps=20, hidden_sizes=(32,), action_history=False)
    state = torch.get_rng_state()
    (s1, a1, _, _), report = synthesize_transitions(*real, None, cfg, progress_bar=False)
    (s2, a2, _, _), _ = synthesize_transitions(*real, None, cfg, progress_bar=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(s1, s2) and torch.equal(a1, a2)
    assert report["failed"]["action_velocity"] == 0 and report["thresholds"]["disagreement"] is None
