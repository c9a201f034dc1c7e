"""Members: initialised from the ONE behaviour denoiser with their own seed noise, and run batched."""

import pytest
import torch

from sb3_uepo.common.diffusion import ChainSampler, Denoiser, NoiseSchedule
from sb3_uepo.offline.config import resolve_offline_config
from sb3_uepo.offline.members import (
    DiffusionMembers,
    GaussianActor,
    fit_gaussian_members,
    make_diffusion_members,
)

OBS, ACT = 4, 2


@pytest.fixture
def setup():
    torch.manual_seed(0)
    behavior = Denoiser(ACT, OBS, (32, 32), 8)
    sampler = ChainSampler(NoiseSchedule(10), 4)
    return behavior, sampler, make_diffusion_members(behavior, sampler, n_members=3, seed=7)


def test_members_start_from_the_one_model_and_the_prior_mode(setup):
    behavior, _, members = setup
    for name, value in behavior.state_dict().items():
        stacked = members.params[name]
        assert stacked.shape == (3, *value.shape)
        for i in range(3):
            assert torch.equal(stacked[i], value)
    # default member_noise="zero": every member's chains start at x_0 = 0, the mode of the prior
    assert torch.equal(members.seed_noise, torch.zeros(3, ACT))
    # a member's state dict loads into a plain Denoiser
    Denoiser(ACT, OBS, (32, 32), 8).load_state_dict(members.member_state_dict(2))


def test_seed_member_noise_draws_one_fixed_noise_per_member(setup):
    behavior, sampler, _ = setup
    members = make_diffusion_members(behavior, sampler, n_members=3, seed=7, member_noise="seed")
    assert torch.equal(members.seed_noise[1], torch.randn(ACT, generator=torch.Generator().manual_seed(8)))
    assert torch.cdist(members.seed_noise, members.seed_noise)[~torch.eye(3, dtype=torch.bool)].min() > 0


def test_batched_forward_equals_each_member_alone(setup):
    _behavior, sampler, members = setup
    with torch.no_grad():
        for p in members.params.values():
            p.add_(torch.randn_like(p) * 0.05)  # make the members' weights differ
    obs = torch.randn(5, OBS)
    chains = members.sample_chains(obs, deterministic=True)
    for i in range(3):
        single = Denoiser(ACT, OBS, (32, 32), 8)
        single.load_state_dict(members.member_state_dict(i))
        ref = sampler.sample_chain(single, obs, x_init=members.seed_noise[i], deterministic=True)
        assert torch.allclose(chains[i], ref, atol=1e-5)
        logp = members.chain_log_prob(chains, obs)[i]
        assert torch.allclose(logp, sampler.chain_log_prob(single, chains[i], obs), atol=1e-4)


def test_one_vectorised_call_per_denoising_step_for_all_members(setup, monkeypatch):
    _, sampler, members = setup
    calls = []
    original = DiffusionMembers.functional

    def counting(self, params, *args):
        calls.append(args[0].shape)
        return original(self, params, *args)

    monkeypatch.setattr(DiffusionMembers, "functional", counting)
    members.sample_chains(torch.randn(6, OBS))
    assert len(calls) == sampler.n_sampling_steps  # not n_members * steps
    assert all(shape[0] == 3 for shape in calls)  # every call carries the member axis
    calls.clear()
    members.chain_log_prob(torch.randn(3, 6, sampler.n_sampling_steps + 1, ACT), torch.randn(6, OBS))
    assert len(calls) == 1


def test_seed_noise_makes_members_act_differently(setup):
    behavior, sampler, zero_members = setup
    obs = torch.randn(8, OBS)
    zero_actions = zero_members.act(obs)
    assert torch.equal(zero_actions[0], zero_actions[1])  # same weights, same x_0 = 0: the same policy
    members = make_diffusion_members(behavior, sampler, n_members=3, seed=7, member_noise="seed")
    actions = members.act(obs)
    assert actions.shape == (3, 8, ACT)
    assert not torch.allclose(actions[0], actions[1])
    assert actions.abs().max() <= 1.0


def test_one_pass_log_prob_equals_rescoring(setup):
    _, _, members = setup
    obs = torch.randn(7, OBS)
    chains, logp = members.sample_chains_with_log_prob(obs, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logp, members.chain_log_prob(chains, obs), atol=1e-4)


def test_gradients_reach_only_the_member_that_produced_the_loss(setup):
    _, _, members = setup
    x, k, cond = torch.randn(3, 5, ACT), torch.randint(0, 10, (3, 5)), torch.randn(3, 5, OBS)
    eps = members.functional(None, x, k, cond)  # (M, N, A) in one vmapped call
    eps[1].sum().backward()
    grads = members.params["net.0.weight"].grad
    assert grads[1].abs().sum() > 0
    assert grads[0].abs().sum() == 0 and grads[2].abs().sum() == 0


def test_gaussian_members_clone_the_data_batched():
    torch.manual_seed(0)
    obs = torch.randn(512, OBS)
    actions = torch.tanh(obs[:, :ACT] * 0.8)
    config = resolve_offline_config(
        "uni_o4",
        dict(
            n_members=3, gaussian_hidden_sizes=(32, 32), gaussian_bc_steps=300, gaussian_bc_lr=3e-3, gaussian_bc_batch_size=128
        ),
    )
    members, report = fit_gaussian_members(obs, actions, config, progress_bar=False)
    assert members.n_members == 3 and len(report["final_nll"]) == 3
    pred = members.act(obs)
    assert ((pred - actions) ** 2).mean() < 0.02
    # different initialisations -> different members
    assert not torch.equal(members.params["action_net.weight"][0], members.params["action_net.weight"][1])
    actor = GaussianActor(OBS, ACT, (32, 32))
    actor.load_state_dict(members.member_state_dict(0))
    mean, _ = actor(obs[:4])
    assert torch.allclose(mean.clamp(-1, 1), pred[0, :4], atol=1e-5)
