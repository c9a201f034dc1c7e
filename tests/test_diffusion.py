"""The diffusion core as the online policy uses it: schedule properties, a sampler that reproduces a two-mode
distribution (which a Gaussian policy cannot), chain log-probabilities against an independent step-by-step
computation, reproducible deterministic sampling, DDPM vs DDIM."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from sb3_uepo.common.diffusion import ChainSampler, Denoiser, Mish, NoiseSchedule, cosine_beta_schedule

MODES = (-0.6, 0.6)


# ---------------------------------------------------------------------------------------------- schedule
def test_mish_equals_pytorchs_value_and_gradient_also_under_vmap():
    """The one-exponential Mish of the denoiser's training pass is PyTorch's Mish up to float rounding, over the whole
    range (overflow guard beyond 20, underflow far below 0), and stays correct inside the members' ``vmap``."""
    x = torch.linspace(-120.0, 120.0, 48_001, requires_grad=True)
    (grad,) = torch.autograd.grad(Mish()(x).square().sum(), x)
    (reference_grad,) = torch.autograd.grad(torch.nn.functional.mish(x).square().sum(), x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(Mish()(x), torch.nn.functional.mish(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # acting: PyTorch's own kernel
        assert torch.equal(Mish()(x), torch.nn.functional.mish(x))

    weights = torch.randn(3, 5, requires_grad=True)
    inputs = torch.randn(3, 5)
    torch.func.vmap(lambda w, a: Mish()(w * a))(weights, inputs).sum().backward()
    (expected,) = torch.autograd.grad(torch.nn.functional.mish(weights * inputs).sum(), weights)
    torch.testing.assert_close(weights.grad, expected, rtol=1e-5, atol=1e-6)
    assert isinstance(Denoiser(2, 3, (8,)).net[1], Mish)


def test_cosine_schedule_properties():
    schedule = NoiseSchedule(20)
    betas, abar = schedule.betas, schedule.alphas_cumprod
    assert betas.shape == abar.shape == (20,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    assert (abar[1:] < abar[:-1]).all(), "abar must decrease strictly"
    assert 0.9 < abar[0] < 1 and abar[-1] < 1e-2, "nearly clean at k=0, nearly pure noise at k=K-1"
    assert torch.allclose(abar, torch.cumprod(1 - betas, 0))
    # the closed form of Nichol & Dhariwal at one step
    s, k = 0.008, 7
    f = lambda t: math.cos((t / 20 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert abar[k].item() == pytest.approx(f(k + 1) / f(0), rel=1e-5)
    assert schedule.alpha_bar(torch.tensor([-1])).item() == 1.0  # abar_{-1}: clean data
    assert torch.equal(cosine_beta_schedule(20).float(), betas)


def test_q_sample_matches_forward_marginal():
    schedule = NoiseSchedule(20)
    torch.manual_seed(0)
    x0 = torch.full((20_000, 1), 0.5)
    k = torch.full((20_000,), 10)
    x_k = schedule.q_sample(x0, k, torch.randn_like(x0))
    abar = schedule.alphas_cumprod[10]
    assert x_k.mean().item() == pytest.approx(abar.sqrt().item() * 0.5, abs=0.02)
    assert x_k.var().item() == pytest.approx((1 - abar).item(), rel=0.05)
    assert torch.allclose(schedule.predict_x0(x_k, k, (x_k - abar.sqrt() * x0) / (1 - abar).sqrt()), x0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_steps_and_stds(sampler):
    chain_sampler = ChainSampler(NoiseSchedule(20), n_sampling_steps=5, sampler=sampler, min_std=0.1)
    assert chain_sampler.timesteps.tolist() == [19, 14, 10, 5, 0]
    assert chain_sampler.prev_timesteps.tolist() == [14, 10, 5, 0, -1]
    std = chain_sampler.step_std
    assert (std >= 0.1).all()
    if sampler == "ddim":
        assert torch.allclose(std, torch.full((5,), 0.1))
    else:  # DDPM: posterior std, large early, floored at the last step (posterior variance 0 to the clean data)
        assert std[0] > 0.5 and std[-1].item() == pytest.approx(0.1)
    # the derived per-step buffers equal the schedule's values
    schedule = chain_sampler.schedule
    assert torch.equal(chain_sampler.step_alpha_bar, schedule.alpha_bar(chain_sampler.timesteps))
    assert torch.equal(chain_sampler.step_alpha_bar_prev, schedule.alpha_bar(chain_sampler.prev_timesteps))
    assert "step_alpha_bar" not in chain_sampler.state_dict()


def test_invalid_sampler_arguments():
    with pytest.raises(ValueError, match="ddim"):
        ChainSampler(NoiseSchedule(20), sampler="euler")
    with pytest.raises(ValueError, match="n_sampling_steps"):
        ChainSampler(NoiseSchedule(20), n_sampling_steps=21)
    with pytest.raises(ValueError, match="min_std"):
        ChainSampler(NoiseSchedule(20), min_std=0.0)


# ---------------------------------------------------------------------------------------------- two modes
@pytest.fixture(scope="module")
def two_mode_denoiser():
    """A tiny denoiser trained for ~15 s on 1-D actions from two modes at +-0.6 (constant conditioning)."""
    torch.manual_seed(0)
    schedule = NoiseSchedule(20)
    denoiser = Denoiser(action_dim=1, cond_dim=1, hidden_sizes=(64, 64), time_embed_dim=16)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3000)
    cond = torch.zeros(256, 1)
    for _ in range(3000):
        x0 = torch.tensor(MODES)[torch.randint(0, 2, (256,))].unsqueeze(-1) + 0.02 * torch.randn(256, 1)
        loss = schedule.training_loss(denoiser, x0, cond)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    return denoiser, schedule


def _mode_masses(x: torch.Tensor) -> tuple[float, float, float]:
    """(mass near -0.6, mass near +0.6, mass in the gap |x| < 0.2)."""
    near = [((x - m).abs() < 0.25).float().mean().item() for m in MODES]
    return near[0], near[1], (x.abs() < 0.2).float().mean().item()


@pytest.mark.parametrize("sampler, n_steps", [("ddim", 5), ("ddpm", 20), ("ddpm", 5)])
def test_sampler_reproduces_two_modes(two_mode_denoiser, sampler, n_steps):
    denoiser, schedule = two_mode_denoiser
    chain_sampler = ChainSampler(schedule, n_sampling_steps=n_steps, sampler=sampler, min_std=0.1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        actions = chain_sampler.sample_chain(denoiser, torch.zeros(4000, 1), generator=generator)[:, -1, 0].clamp(-1, 1)
    low, high, gap = _mode_masses(actions)
    assert low > 0.3 and high > 0.3, f"both modes must be present: {low:.2f}, {high:.2f}"
    assert gap < 0.12, f"little mass between the modes, got {gap:.2f}"

    # the same check fails for the best Gaussian (moment-matched to these samples): the test can tell them apart
    gaussian = actions.mean() + actions.std() * torch.randn(4000, generator=generator)
    g_low, g_high, g_gap = _mode_masses(gaussian)
    assert g_gap > 0.2 and not (g_low > 0.3 and g_high > 0.3 and g_gap < 0.12)


# ---------------------------------------------------------------------------------------------- log-probs
def _reference_step_log_probs(denoiser, schedule, chain, cond, sampler, n_steps, min_std):
    """Per-step log N(x_{j+1}; mu_j, sigma_j^2) from the DDIM/DDPM formulas written out again, one step at a time."""
    abar_all = schedule.alphas_cumprod.double()
    ks = torch.linspace(schedule.n_train_steps - 1, 0, n_steps).round().long().tolist()
    prevs = [*ks[1:], -1]
    out = []
    for j, (k, k_prev) in enumerate(zip(ks, prevs, strict=True)):
        x = chain[:, j].double()
        abar = abar_all[k]
        abar_prev = abar_all[k_prev] if k_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        eps = denoiser(chain[:, j], torch.full((len(x),), k), cond).double()
        x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
        if sampler == "ddim":
            eps_hat = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
            mean = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps_hat
            std = torch.tensor(min_std, dtype=torch.float64)
        else:
            alpha = abar / abar_prev
            mean = abar_prev.sqrt() * (1 - alpha) / (1 - abar) * x0 + alpha.sqrt() * (1 - abar_prev) / (1 - abar) * x
            std = ((1 - abar_prev) / (1 - abar) * (1 - alpha)).sqrt().clamp(min=min_std)
        out.append(Normal(mean, std).log_prob(chain[:, j + 1].double()).sum(-1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_chain_log_prob_equals_independent_step_by_step_computation(sampler):
    torch.manual_seed(0)
    schedule = NoiseSchedule(20)
    denoiser = Denoiser(action_dim=3, cond_dim=4, hidden_sizes=(32, 32))
    chain_sampler = ChainSampler(schedule, n_sampling_steps=5, sampler=sampler, min_std=0.1)
    cond = torch.randn(64, 4)
    with torch.no_grad():
        chain, sampled_log_prob = chain_sampler.sample_chain_with_log_prob(denoiser, cond)
        expected = _reference_step_log_probs(denoiser, schedule, chain, cond, sampler, 5, 0.1).float()

        calls = []

        def counting_denoiser(x, k, c):
            calls.append(x.shape[0])
            return denoiser(x, k, c)

        log_prob = chain_sampler.chain_log_prob(counting_denoiser, chain, cond)
    assert calls == [64 * 5], "all chain steps must be scored in ONE batched denoiser call"
    assert log_prob.shape == (64, 5)
    assert torch.allclose(log_prob, expected, atol=1e-4)
    assert torch.allclose(sampled_log_prob, expected, atol=1e-4), "log-probs recorded while sampling must agree"


# ---------------------------------------------------------------------------------------------- determinism
def test_deterministic_sampling_is_reproducible():
    torch.manual_seed(0)
    denoiser = Denoiser(action_dim=2, cond_dim=3, hidden_sizes=(16,))
    chain_sampler = ChainSampler(NoiseSchedule(20), n_sampling_steps=5)
    cond = torch.randn(10, 3)
    x_init = torch.randn(2)
    with torch.no_grad():
        a = chain_sampler.sample_chain(denoiser, cond, x_init=x_init, deterministic=True)
        torch.randn(100)  # the global RNG moves; deterministic chains must not
        b = chain_sampler.sample_chain(denoiser, cond, x_init=x_init, deterministic=True)
        c = chain_sampler.sample_chain(denoiser, cond, generator=torch.Generator().manual_seed(3))
        d = chain_sampler.sample_chain(denoiser, cond, generator=torch.Generator().manual_seed(3))
        e = chain_sampler.sample_chain(denoiser, cond, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(c, e)
    assert torch.equal(a[:, 0], x_init.expand(10, 2))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_lean_chain_path_gives_the_chains_of_the_plain_forward(sampler):
    """The chain loop uses Denoiser.prepare/step_eps (per-chain terms computed once); the same seeds through the plain
    forward give the same chains and log-probabilities up to float rounding, with and without frozen early steps."""
    from gymnasium import spaces

    from sb3_uepo.common.policies import DiffusionPolicy

    torch.manual_seed(0)
    denoiser = Denoiser(action_dim=3, cond_dim=5, hidden_sizes=(32, 32))
    chain_sampler = ChainSampler(NoiseSchedule(20), 5, sampler, min_std=0.1)
    cond = torch.randn(7, 5)
    plain = lambda x, k, c: denoiser(x, k, c)  # noqa: E731  (no prepare(): the step-by-step forward)
    plain.action_dim = 3  # type: ignore[attr-defined]
    for deterministic in (True, False):
        lean = chain_sampler.sample_chain_with_log_prob(
            denoiser, cond, deterministic=deterministic, generator=torch.Generator().manual_seed(1)
        )
        reference = chain_sampler.sample_chain_with_log_prob(
            plain, cond, deterministic=deterministic, generator=torch.Generator().manual_seed(1)
        )
        assert torch.allclose(lean[0], reference[0], atol=1e-5) and torch.allclose(lean[1], reference[1], atol=1e-4)
    # the frozen/fine-tuned split of ft_denoising_steps: the same chain, and gradient reaches only the last K steps
    obs_space, act_space = spaces.Box(-10, 10, (5,)), spaces.Box(-1, 1, (3,))
    policy = DiffusionPolicy(obs_space, act_space, lambda _: 1e-3, net_arch=[32, 32], sampler=sampler, ft_denoising_steps=2)
    split = policy.acting_eps_fn()
    torch.manual_seed(2)
    lean_chain = policy.sampler.sample_chain(split, cond, generator=torch.Generator().manual_seed(3))
    plain_split = lambda x, k, c: split(x, k, c)  # noqa: E731
    plain_split.action_dim = 3  # type: ignore[attr-defined]
    plain_chain = policy.sampler.sample_chain(plain_split, cond, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(lean_chain, plain_chain, atol=1e-5)
    lean_chain[:, -1].sum().backward()
    assert all(p.grad is None for p in policy.frozen_denoiser.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.denoiser.parameters())


def test_traced_deterministic_predict_gives_the_eager_action_and_follows_the_weights():
    """predict(deterministic=True) runs a TorchScript trace of the chain: the same action as the eager chain at every
    batch size, after in-place weight changes and reloads, and the trace is never copied with the policy."""
    import copy
    import pickle

    from gymnasium import spaces

    from sb3_uepo.common.policies import DiffusionPolicy

    torch.manual_seed(0)
    obs_space, act_space = spaces.Box(-10, 10, (4,)), spaces.Box(-2, 2, (2,))
    policy = DiffusionPolicy(obs_space, act_space, lambda _: 1e-3, net_arch=[16, 16], sampler="ddim", ft_denoising_steps=2)
    policy.set_training_mode(False)
    with torch.no_grad():  # eps close to the bias: unsaturated actions, so that a weight change shows in the action
        policy.denoiser.net[-1].weight.mul_(0.01)
        policy.load_denoiser_state(policy.denoiser.state_dict())

    def eager(obs):
        with torch.no_grad():
            return policy._deterministic_or_sampled_action(torch.as_tensor(obs), True).numpy()

    for batch in (1, 3):
        obs = torch.randn(batch, 4).numpy()
        action, _ = policy.predict(obs, deterministic=True)
        assert action.shape == (batch, 2)
        assert torch.allclose(torch.as_tensor(action), torch.as_tensor(policy.unscale_action(eager(obs))), atol=1e-5)
    assert {("act", 1, None), ("act", 3, None)} <= set(policy.__dict__["_traces"])  # one trace per batch size
    obs = torch.randn(1, 4).numpy()
    before, _ = policy.predict(obs, deterministic=True)
    with torch.no_grad():  # an optimizer step changes the weights in place: the trace follows
        policy.denoiser.net[-1].bias.add_(0.2)
        policy.denoiser.time_embed[1].bias.add_(1.0)  # a weight of the per-chain terms cached between chains
    after, _ = policy.predict(obs, deterministic=True)
    assert not torch.allclose(torch.as_tensor(before), torch.as_tensor(after))
    assert torch.allclose(torch.as_tensor(after), torch.as_tensor(policy.unscale_action(eager(obs))), atol=1e-5)
    copied = copy.deepcopy(policy)
    assert "_traces" not in copied.__dict__ and "_traces" not in pickle.loads(pickle.dumps(policy)).__dict__
    assert torch.allclose(torch.as_tensor(copied.predict(obs, deterministic=True)[0]), torch.as_tensor(after), atol=1e-5)
    policy.use_traced_predict = False  # the switch: eager chain
    assert torch.allclose(torch.as_tensor(policy.predict(obs, deterministic=True)[0]), torch.as_tensor(after), atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_traced_rollout_step_gives_the_eager_chain_of_the_same_seed(deterministic):
    """A rollout step (no autograd) runs a TorchScript trace fed with the same random draws as the eager sampler: the
    same chain, log-densities and value for a fixed seed, also after an in-place weight change and with the frozen
    first steps of ft_denoising_steps; with tracing off the eager path gives the same."""
    from gymnasium import spaces

    from sb3_uepo.common.policies import DiffusionPolicy

    torch.manual_seed(0)
    obs_space, act_space = spaces.Box(-10, 10, (4,)), spaces.Box(-2, 2, (2,))
    policy = DiffusionPolicy(
        obs_space,
        act_space,
        lambda _: 1e-3,
        net_arch=[16, 16],
        sampler="ddim",
        ft_denoising_steps=2,
        exploration_std=0.05,
        explore_frozen_steps=False,
    )
    policy.set_training_mode(False)
    obs = torch.randn(3, 4)

    def sample(traced: bool, seed: int):
        policy.use_traced_predict = traced
        torch.manual_seed(seed)
        with torch.no_grad():
            return policy.sample_chain_with_values(obs, deterministic=deterministic)

    def reference(seed: int):  # the sampler's own eager chain and log-densities from the same seed
        torch.manual_seed(seed)
        with torch.no_grad():
            x_init = policy.deterministic_noise if deterministic else None
            chain, log_prob = policy.sampler.sample_chain_with_log_prob(
                policy.acting_eps_fn(),
                policy.normalize_observation(obs),
                x_init=x_init,
                deterministic=deterministic,
                first_noisy_step=policy.first_noisy_step,
            )
            return chain, log_prob, policy.predict_values(obs)

    for _ in range(2):  # the second round runs the cached trace, after a weight change it must follow
        traced, eager, (chain, log_prob, values) = sample(True, 1), sample(False, 1), reference(1)
        assert any(key[0] == "rollout" for key in policy.__dict__["_traces"] if isinstance(key, tuple))
        for got in (traced, eager):
            assert torch.allclose(got.chain, chain, atol=1e-5)
            assert torch.allclose(got.step_log_prob, log_prob, atol=1e-5)
            assert torch.allclose(got.values, values, atol=1e-5)
            assert torch.allclose(got.actions, chain[:, -1].clamp(-1, 1))
        with torch.no_grad():
            policy.denoiser.net[-1].bias.add_(0.3)
            policy.value_net[-1].bias.add_(1.0)


@pytest.mark.parametrize("first_step", [0, 3])
def test_chain_means_of_a_denoiser_equal_the_row_by_row_path(first_step):
    """Scoring stored chains with Denoiser.steps_eps (observation term once per chain, step terms once per step) gives
    the means, and the gradients, of the plain row-by-row denoiser call."""
    torch.manual_seed(0)
    denoiser = Denoiser(action_dim=2, cond_dim=3, hidden_sizes=(16, 16))
    sampler = ChainSampler(NoiseSchedule(20), n_sampling_steps=5, sampler="ddim")
    cond = torch.randn(6, 3)
    with torch.no_grad():
        chain = sampler.sample_chain(denoiser, cond)

    def means_and_grads(eps_fn):
        denoiser.zero_grad()
        means = sampler.chain_means(eps_fn, chain, cond, first_step)
        means.square().sum().backward()
        return means.detach(), [p.grad.clone() for p in denoiser.parameters()]

    fast, fast_grads = means_and_grads(denoiser)
    plain, plain_grads = means_and_grads(lambda x, k, c: denoiser(x, k, c))  # no steps_eps: the flattened path
    assert fast.shape == (6, 5 - first_step, 2)
    assert torch.allclose(fast, plain, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast_grads, plain_grads, strict=True))
    with torch.no_grad():  # the cached step terms (no autograd) give the same
        assert torch.allclose(sampler.chain_means(denoiser, chain, cond, first_step), plain, atol=1e-5)


def test_acting_follows_the_policy_optimizers_steps():
    """The policy's own optimizer (Adam, fused: it changes the weights in place without bumping Tensor._version) is
    followed by every acting path: after a step, predict and rollout chains equal those of a fresh policy loaded with
    the new weights."""
    from gymnasium import spaces

    from sb3_uepo.common.policies import DiffusionPolicy

    torch.manual_seed(0)
    obs_space, act_space = spaces.Box(-10, 10, (4,)), spaces.Box(-2, 2, (2,))
    kwargs = dict(net_arch=[16, 16], sampler="ddim", ft_denoising_steps=2)
    policy = DiffusionPolicy(obs_space, act_space, lambda _: 1e-2, **kwargs)
    assert policy.optimizer.defaults.get("fused")
    with torch.no_grad():  # eps near zero: unsaturated actions, so that a weight change shows
        policy.denoiser.net[-1].weight.mul_(0.01)
        policy.denoiser.net[-1].bias.zero_()
        policy.load_denoiser_state(policy.denoiser.state_dict())
    policy.set_training_mode(False)
    obs = torch.randn(3, 4)
    before, _ = policy.predict(obs.numpy(), deterministic=True)
    with torch.no_grad():
        policy.sample_chain_with_values(obs)  # builds the rollout trace
    for _ in range(3):
        policy.optimizer.zero_grad()
        policy.chain_means(obs, torch.randn(3, 6, 2)).sum().backward()
        policy.optimizer.step()
    fresh = DiffusionPolicy(obs_space, act_space, lambda _: 1e-2, **kwargs)
    fresh.load_state_dict(policy.state_dict())
    fresh.set_training_mode(False)
    after, _ = policy.predict(obs.numpy(), deterministic=True)
    assert not np.allclose(before, after)
    assert np.allclose(after, fresh.predict(obs.numpy(), deterministic=True)[0], atol=1e-5)
    with torch.no_grad():
        torch.manual_seed(3)
        chain = policy.sample_chain_with_values(obs).chain
        torch.manual_seed(3)
        assert torch.allclose(chain, fresh.sample_chain_with_values(obs).chain, atol=1e-5)


def test_exploration_std_and_noise_free_frozen_steps():
    """``explore_frozen_steps=False``: the frozen first steps of a stochastic chain take their means (the chain's
    prefix is the deterministic one), only the fine-tuned steps explore, with ``exploration_std`` as their std; the
    log-densities from sampling still equal the ones computed from the stored chain."""
    from gymnasium import spaces

    from sb3_uepo.common.policies import DiffusionPolicy

    torch.manual_seed(0)
    obs_space, act_space = spaces.Box(-10, 10, (4,)), spaces.Box(-1, 1, (2,))
    kwargs = dict(net_arch=[16, 16], sampler="ddim", ft_denoising_steps=2, initial_noise="seed")
    policy = DiffusionPolicy(obs_space, act_space, lambda _: 1e-3, exploration_std=0.05, explore_frozen_steps=False, **kwargs)
    assert torch.allclose(policy.sampler.step_std, torch.full((5,), 0.05))
    assert policy.first_noisy_step == policy.first_ft_step == 3
    obs = torch.randn(64, 4)
    with torch.no_grad():
        deterministic = policy.sample_chain(obs, deterministic=True)
        sample = policy.sample_chain_with_values(obs)
        scored = policy.sampler.chain_log_prob(policy.acting_eps_fn(), sample.chain, policy.normalize_observation(obs))
    assert torch.allclose(sample.chain[:, :4], deterministic[:, :4], atol=1e-6)  # x_0 .. x_3: no noise
    step_noise = (sample.chain[:, 4:] - deterministic[:, 4:]).std()
    assert 0.02 < step_noise < 0.2  # the last two steps explore, at about the exploration std
    assert torch.allclose(sample.step_log_prob, scored, atol=1e-3)

    default = DiffusionPolicy(obs_space, act_space, lambda _: 1e-3, **kwargs)  # noise in every step, at min_std
    assert default.first_noisy_step == 0 and torch.allclose(default.sampler.step_std, torch.full((5,), 0.1))
    with torch.no_grad():
        assert not torch.allclose(default.sample_chain(obs)[:, 1], default.sample_chain(obs, deterministic=True)[:, 1])
    params = policy._get_constructor_parameters()
    assert params["exploration_std"] == 0.05 and params["explore_frozen_steps"] is False
    with pytest.raises(ValueError, match="exploration_std must be > 0"):
        DiffusionPolicy(obs_space, act_space, lambda _: 1e-3, exploration_std=0.0)
