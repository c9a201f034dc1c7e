"""Offline multi-step PPO of the members: surrogate, per-member clipping, improvement on a toy problem, OPE gate."""

import pytest
import torch

from sb3_uepo.offline.behavior import fit_behavior_model, make_sampler
from sb3_uepo.offline.config import resolve_offline_config
from sb3_uepo.offline.divergence import SegmentSampler
from sb3_uepo.offline.members import make_diffusion_members
from sb3_uepo.offline.offline_ppo import OfflinePolicyImprovement, clipped_surrogate, per_member_clip_grad_norm_

OBS, ACT, TARGET = 2, 1, 0.5


class ToyCritic:
    """Known advantage: actions closer to TARGET are better."""

    def advantage(self, obs, actions, normalize=True):
        adv = -((actions - TARGET) ** 2).sum(-1)
        if normalize:
            adv = (adv - adv.mean(-1, keepdim=True)) / (adv.std(-1, keepdim=True) + 1e-8)
        return adv


def _config(**overrides):
    base = dict(
        n_members=2,
        n_diffusion_steps=10,
        n_sampling_steps=4,
        denoiser_hidden_sizes=(64, 64),
        time_embed_dim=8,
        behavior_steps=400,
        behavior_lr=3e-3,
        behavior_ema=0.0,
        ppo_steps=60,
        ppo_batch_size=64,
        ppo_lr=1e-3,
        linear_decay=False,
        use_divergence=False,
        use_perturbation=False,
        use_kl=False,
        ope_interval=20,
        segment_length=3,
        segment_batch_size=8,
    )
    base.update(overrides)
    return resolve_offline_config("default", base)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    obs = torch.randn(1024, OBS)
    actions = torch.rand(1024, ACT) * 2 - 1  # behaviour: uniform, unrelated to the state
    config = _config()
    behavior, _ = fit_behavior_model(obs, actions, config, progress_bar=False)
    return obs, behavior


def _members(behavior, config):
    return make_diffusion_members(behavior, make_sampler(config), config.n_members, seed=0, member_noise=config.member_noise)


def _mean_advantage(improvement, params=None):
    members = improvement.members
    with torch.no_grad():
        chains = members.sample_chains(improvement.obs[:256], params, generator=torch.Generator().manual_seed(5))
        return float(ToyCritic().advantage(None, chains[:, :, -1].clamp(-1, 1), normalize=False).mean())


def test_clipped_surrogate_matches_ppo():
    log_ratio = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, info = clipped_surrogate(log_ratio, adv, clip_range=0.25)
    # min(1.5, 1.25) = 1.25; min(-0.5, -0.75) = -0.75; min(2.2, 2.2) = 2.2
    assert float(loss[0]) == pytest.approx(-(1.25 - 0.75 + 2.2) / 3)
    assert info["clip_fraction"] == pytest.approx(2 / 3)


def test_gradient_clipping_is_per_member():
    p = torch.zeros(2, 3, requires_grad=True)
    p.grad = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]])
    norms = per_member_clip_grad_norm_([p], max_norm=1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    assert p.grad[0].norm() == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(p.grad[1], torch.tensor([0.3, 0.4, 0.0]))


def test_offline_ppo_improves_the_advantage_on_a_toy_problem(toy):
    obs, behavior = toy
    config = _config()
    improvement = OfflinePolicyImprovement(_members(behavior, config), ToyCritic(), obs, config)
    before = _mean_advantage(improvement)
    improvement.run(progress_bar=False)
    after = _mean_advantage(improvement)
    assert improvement.step_count == config.ppo_steps
    assert after > before + 0.05, (before, after)
    assert len(improvement.loss_curve) == config.ppo_steps // config.ope_interval


def test_ope_gate_replaces_only_improved_members(toy):
    obs, behavior = toy
    config = _config(ppo_steps=5, ope_interval=5)
    scores = iter([torch.zeros(2), torch.tensor([1.0, -1.0])])
    improvement = OfflinePolicyImprovement(
        _members(behavior, config), ToyCritic(), obs, config, ope_fn=lambda policy_fn: next(scores)
    )
    start = improvement.members.detached_params()
    improvement.run(progress_bar=False)
    name = "net.0.weight"
    assert torch.equal(improvement.old_params[name][0], improvement.members.params[name][0].detach())
    assert torch.equal(improvement.old_params[name][1], start[name][1])
    assert not torch.equal(improvement.members.params[name][1].detach(), start[name][1])
    assert improvement.best_scores.tolist() == [1.0, 0.0]
    assert improvement.replacements == [1, 0]
    assert [h["improved"] for h in improvement.ope_history] == [[False, False], [True, False]]
    improvement.config.choice_score = "ope"  # the choice by the gate's own scores
    index, reason = improvement.best_member()
    assert index == 0 and "highest OPE score" in reason

    # the default choice: the mean min-Q of every member's best-by-OPE policy over dataset states
    class QCritic(ToyCritic):
        def q_min(self, obs, actions):
            return -((actions - TARGET) ** 2).sum(-1)

    improvement.critics = QCritic()
    improvement.config.choice_score = "mean_q"
    scores = improvement.choice_scores()
    assert scores.shape == (2,)
    index, reason = improvement.best_member()
    assert index == int(scores.argmax()) and "mean IQL Q" in reason
    # member 1 still acts as it started; make member 0's previous policy act far from TARGET: member 1 is chosen
    with torch.no_grad():
        for value in improvement.old_params.values():
            value[0].add_(torch.randn_like(value[0]) * 5.0)
    assert improvement.best_member()[0] == 1


def test_ope_policy_fn_is_batched_over_members(toy):
    obs, behavior = toy
    config = _config()
    seen = []

    def ope(policy_fn):
        actions = policy_fn(obs[:16].unsqueeze(0).expand(2, -1, -1))
        seen.append(actions.shape)
        return actions.mean((1, 2))

    improvement = OfflinePolicyImprovement(_members(behavior, config), ToyCritic(), obs, config, ope_fn=ope)
    improvement.evaluate()
    assert seen == [(2, 16, ACT)]


def test_regularisers_and_perturbation_run_and_are_logged(toy):
    obs, behavior = toy
    config = _config(
        ppo_steps=4,
        ope_interval=2,
        use_divergence=True,
        use_kl=True,
        use_perturbation=True,
        perturb_interval=2,
        tau=100.0,
        eta=0.01,
    )
    starts = torch.zeros(obs.shape[0], dtype=torch.bool)
    starts[::32] = True
    members = _members(behavior, config)
    seed_before = members.seed_noise.clone()
    improvement = OfflinePolicyImprovement(
        members, ToyCritic(), obs, config, behavior=behavior, segment_sampler=SegmentSampler(starts, config.segment_length)
    )
    improvement.run(progress_bar=False)
    assert "kl" in improvement.loss_curve[0] and "divergence_loss" in improvement.loss_curve[0]
    assert len(improvement.perturbations) == 2
    first = improvement.perturbations[0]
    assert first["fired"] and first["sigmas"][0] == 0.0 and first["sigmas"][1] > 0.0  # tau huge: the newer is perturbed
    assert torch.equal(members.seed_noise, seed_before)  # perturb_target="weights" leaves the seeds alone
    with pytest.raises(ValueError, match="SegmentSampler"):
        OfflinePolicyImprovement(members, ToyCritic(), obs, config, behavior=behavior)


def test_state_dict_round_trip(toy):
    obs, behavior = toy
    config = _config(ppo_steps=4, ope_interval=2)
    a = OfflinePolicyImprovement(_members(behavior, config), ToyCritic(), obs, config)
    for _ in range(2):
        a.train_step()
    b = OfflinePolicyImprovement(_members(behavior, config), ToyCritic(), obs, config)
    b.load_state_dict(a.state_dict())
    assert b.step_count == 2
    info_a, info_b = a.train_step(), b.train_step()
    assert info_a["loss"] == pytest.approx(info_b["loss"], rel=1e-5)
