"""Noise-space steering: an SB3 off-policy agent learns the initial noise of a frozen diffusion policy."""

import numpy as np
import pytest
import torch as th
from stable_baselines3 import SAC, TD3
from stable_baselines3.common.env_util import make_vec_env

from sb3_uepo import UEPO
from sb3_uepo.common.evaluation import evaluate
from sb3_uepo.uepo.steering import NoiseSteeringWrapper, SteeredModel, decode_noise, invert_noise, steer

TINY_SAC = dict(
    learning_starts=16, batch_size=16, buffer_size=1_000, train_freq=1, gradient_steps=1, policy_kwargs=dict(net_arch=[16, 16])
)


@pytest.fixture
def policy(tiny_diffusion_policy_kwargs):
    model = UEPO("DiffusionPolicy", "Pendulum-v1", policy_kwargs=dict(tiny_diffusion_policy_kwargs, sampler="ddim"), seed=0)
    return model.policy


def test_the_wrapper_acts_in_noise_space(policy):
    import gymnasium as gym

    env = NoiseSteeringWrapper(gym.make("Pendulum-v1"), policy, noise_bound=1.5)
    assert env.action_space.shape == (1,) and env.action_space.high[0] == 1.5
    assert env.observation_space == gym.make("Pendulum-v1").observation_space
    obs, _ = env.reset(seed=0)
    noise = np.array([0.7], dtype=np.float32)
    expected = decode_noise(env.policy, obs, noise)
    assert -2.0 <= expected[0] <= 2.0  # the env's own units
    # the env receives the frozen policy's DDIM action from x_0 = noise: replay the same step on a twin env
    twin = gym.make("Pendulum-v1")
    twin.reset(seed=0)
    obs_w, reward_w, *_ = env.step(noise)
    obs_t, reward_t, *_ = twin.step(expected)
    assert np.allclose(obs_w, obs_t)
    # the agent's reward carries the noise prior: the env's reward minus noise_penalty * ||w||^2
    assert env.noise_penalty == 5.0 and np.isclose(reward_w, reward_t - 5.0 * 0.7**2)
    with pytest.raises(ValueError, match="observations of shape"):
        NoiseSteeringWrapper(gym.make("MountainCarContinuous-v0"), policy)
    with pytest.raises(ValueError, match="noise_penalty"):
        NoiseSteeringWrapper(gym.make("Pendulum-v1"), policy, noise_penalty=-1.0)


def test_the_noise_prior_leaves_the_recorded_episode_returns_alone(policy):
    """steer() puts SB3's Monitor inside the wrapper: the episode returns it records (ep_info_buffer, evaluations) are
    the env's own, only the agent's reward carries the prior; a steered model keeps its penalty through save/load."""
    import tempfile

    model = steer(policy, "Pendulum-v1", SAC, noise_bound=1.0, seed=0, noise_penalty=5.0, **TINY_SAC)
    env = model.get_env()
    env.reset()
    total_agent, total_env = 0.0, 0.0
    for _ in range(200):  # one Pendulum episode
        noise = np.full((1, 1), 0.8, dtype=np.float32)
        _, reward, done, info = env.step(noise)
        total_agent += float(reward[0])
        if done[0]:
            total_env = info[0]["episode"]["r"]
            break
    assert np.isclose(total_agent, total_env - 200 * 5.0 * 0.8**2, rtol=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(f"{tmp}/steered.zip")
        assert SteeredModel.load(f"{tmp}/steered.zip").noise_penalty == 5.0


@pytest.mark.parametrize("agent_class", [SAC, TD3])
def test_steering_starts_at_the_pretrained_policys_own_action(policy, agent_class):
    """The agent's mean head is zeroed: before any learning the steered model acts exactly as the frozen policy from
    x_0 = 0 (the pretrained policy's deterministic action), not from a random offset."""
    kwargs = {k: v for k, v in TINY_SAC.items() if agent_class is SAC or k != "policy_kwargs"}
    model = steer(policy, "Pendulum-v1", agent_class, noise_bound=2.0, seed=0, **kwargs)
    obs = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(obs, deterministic=True)[0], decode_noise(model.policy, obs, np.zeros((5, 1))))
    with th.no_grad():
        own = policy.unscale_action(policy._predict(th.as_tensor(obs), deterministic=True).numpy())
    np.testing.assert_allclose(model.predict(obs, deterministic=True)[0], own, rtol=1e-5, atol=1e-5)
    unzeroed = steer(policy, "Pendulum-v1", agent_class, noise_bound=2.0, seed=0, start_at_zero_noise=False, **kwargs)
    assert not np.allclose(unzeroed.agent.predict(obs, deterministic=True)[0], 0.0)


def test_steering_learns_without_touching_the_diffusion_policy(policy, tmp_path):
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    model = steer(policy, "Pendulum-v1", SAC, noise_bound=2.0, seed=0, **TINY_SAC)
    frozen_before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(64)
    assert model.num_timesteps == 64
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, frozen_before[key]), key  # the steered copy never trains
        assert th.equal(policy.state_dict()[key], before[key]), key  # nor does the original
    assert not any(p.requires_grad for p in model.policy.parameters())

    obs = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    actions, _ = model.predict(obs, deterministic=True)
    assert actions.shape == (4, 1) and np.all(np.abs(actions) <= 2.0)
    model.save(tmp_path / "steered.zip")
    loaded = SteeredModel.load(tmp_path / "steered.zip")
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], actions, rtol=1e-5, atol=1e-6)
    assert loaded.noise_bound == 2.0 and isinstance(loaded.agent, SAC)
    with pytest.raises(ValueError, match="not a steered model"):
        (tmp_path / "junk.zip").write_bytes(b"junk")
        SteeredModel.load(tmp_path / "junk.zip")


def test_uepo_steer_end_to_end_after_pretraining(diffusion_model):
    model = diffusion_model(env=make_vec_env("Pendulum-v1", n_envs=1))
    steered = model.steer(noise_bound=2.0, **TINY_SAC)
    assert model.pretrained  # steer() pretrains first
    for key, value in model.policy.state_dict().items():
        assert th.equal(steered.policy.state_dict()[key], value), key  # it steers the pretrained policy
    steered.learn(48)
    result = evaluate(steered, "Pendulum-v1", n_episodes=1, deterministic=True, seed=0)
    assert result.n_episodes == 1 and len(result.returns) == 1
    with pytest.raises(ValueError, match="DiffusionPolicy"):
        UEPO("MlpPolicy", "Pendulum-v1").steer()


def test_uepo_train_online_steer_saves_one_model_that_eval_loads(tmp_path, capsys, pendulum_npz, tiny_offline_kwargs):
    from sb3_uepo.cli import main
    from sb3_uepo.commands.train import load_model

    path = pendulum_npz
    out = tmp_path / "steered"
    offline = [f"{k}={v!r}" for k, v in tiny_offline_kwargs.items()]
    sizes = ["denoiser_hidden_sizes=(16, 16)", "value_net_arch=(16, 16)", "n_diffusion_steps=6", "n_sampling_steps=3"]
    sizes += ["q_hidden_sizes=(256, 256)"]  # SAC's critic layout: the action-space critic starts from IQL's
    args = ["train", "--env", "Pendulum-v1", "--dataset", str(path), "--online", "steer", "--online-steps", "40"]
    args += ["--steer-critic", "action"]
    assert main([*args, "--out", str(out), "--eval-episodes", "1", "--offline", *offline, *sizes, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Online steering" in printed and "after online" in printed
    model = load_model(out.with_suffix(".zip"))
    assert isinstance(model, SteeredModel) and model.num_timesteps == 40
    assert type(model.agent).__name__ == "ActionCriticSAC"
    assert main(["eval", str(out.with_suffix(".zip")), "--episodes", "1", "--deterministic"]) == 0
    assert main([*args, "--preset", "quick+uni_o4", "--out", str(tmp_path / "x")]) == 2
    assert "--online steer" in capsys.readouterr().err


def test_invert_noise_recovers_noises_that_reproduce_the_actions(policy):
    """invert_noise is decode_noise's inverse on actions the policy can produce; the policy is left untouched. The
    denoiser is first fitted to a smooth action distribution (an untrained one maps noise to the bounds)."""
    th.manual_seed(0)
    optimizer = th.optim.Adam(policy.denoiser.parameters(), lr=3e-3)
    for _ in range(600):
        loss = policy.sampler.schedule.training_loss(policy.denoiser, th.rand(256, 1) * 1.6 - 0.8, th.randn(256, 3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.denoiser.zero_grad(set_to_none=True)
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1.0, 1.0, (64, 3)).astype(np.float32)
    noise = rng.uniform(-0.5, 0.5, (64, 1)).astype(np.float32)
    actions = decode_noise(policy, obs, noise)
    assert np.ptp(actions) > 0.5  # actions inside the range, not at its bounds
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    found, residual = invert_noise(policy, obs, actions)
    assert found.shape == noise.shape and residual.shape == (64,)
    assert residual.max() < 0.01
    np.testing.assert_allclose(decode_noise(policy, obs, found), actions, atol=0.02)  # a noise may have several twins
    assert all(th.equal(p, before[name]) and p.grad is None for name, p in policy.named_parameters())
    with pytest.raises(ValueError, match="observations but"):
        invert_noise(policy, obs, actions[:3])


def test_the_action_space_critic_values_noises_by_the_action_they_give(diffusion_model, policy, tmp_path):
    """critic="action": SAC's critic is Q_A(s, pi(s, b w)), started from the offline IQL critic; noises that give the
    same action get the same value, the actor's gradient reaches w through the frozen chain, and the steered model
    keeps its critic kind through save/load."""
    from sb3_uepo.uepo.steering import ActionCriticSAC

    tiny = dict(TINY_SAC, policy_kwargs=dict(net_arch=[16, 16]))  # the tiny IQL critic's layout (16, 16)
    model = diffusion_model(env=make_vec_env("Pendulum-v1", n_envs=1))
    steered = model.steer(noise_bound=1.0, critic="action", **tiny)
    agent = steered.agent
    assert isinstance(agent, ActionCriticSAC)
    q_state = model.offline_result.q_state_dict
    for i, net in enumerate(agent.critic.q_networks):  # started from IQL's Q1 / Q2
        for key, value in net.state_dict().items():
            assert th.equal(value, q_state[f"q{i + 1}.{key}"]), key
            assert th.equal(agent.critic_target.q_networks[i].state_dict()[key], value), key
    obs = th.as_tensor(np.random.default_rng(0).normal(size=(5, 3)), dtype=th.float32)
    w = th.rand(5, 1) * 2 - 1
    policy = steered.policy
    cond = policy.normalize_observation(obs)
    action = th.as_tensor(policy.scale_action(decode_noise(policy, obs.numpy(), w.numpy())), dtype=th.float32)
    expected = agent.critic.q_networks[0](th.cat([cond, action], dim=1))
    th.testing.assert_close(agent.critic(obs, w)[0], expected, rtol=1e-4, atol=1e-5)
    # the actor's gradient reaches w through the frozen chain where the chain's clips (the x_0 estimate's, the
    # action's) do not bind; tiny policies saturate almost everywhere, so this one predicts eps = 0 (x_0 = x / sqrt(abar))
    linear = [m for m in policy.denoiser.modules() if isinstance(m, th.nn.Linear)][-1]
    with th.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
    raw = steer(policy, "Pendulum-v1", noise_bound=1.0, critic="action", seed=0, **TINY_SAC).agent.critic
    many_obs = th.as_tensor(np.random.default_rng(1).normal(size=(64, 3)), dtype=th.float32)
    many_w = th.linspace(-1, 1, 64).reshape(64, 1).requires_grad_(True)
    inside = raw.action_input(many_obs, many_w)[:, -1].abs() < 1
    raw(many_obs, many_w)[0].sum().backward()
    assert inside.any() and (~inside).any()
    assert (many_w.grad[inside] != 0).all() and (many_w.grad[~inside] == 0).all()
    frozen_before = {k: v.clone() for k, v in steered.policy.state_dict().items()}
    critic_before = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    steered.learn(48)
    assert all(th.equal(v, frozen_before[k]) for k, v in steered.policy.state_dict().items())
    assert any(not th.equal(v, critic_before[k]) for k, v in agent.critic.state_dict().items())  # the critic learned
    assert not any(k.startswith("_decoder") for k in agent.critic.state_dict())
    steered.save(tmp_path / "steered.zip")
    loaded = SteeredModel.load(tmp_path / "steered.zip")
    assert isinstance(loaded.agent, ActionCriticSAC)
    th.testing.assert_close(loaded.agent.critic(obs, w)[0], agent.critic(obs, w)[0])
    np.testing.assert_allclose(
        loaded.predict(obs.numpy(), deterministic=True)[0], steered.predict(obs.numpy(), deterministic=True)[0], rtol=1e-5
    )
    with pytest.raises(ValueError, match="critic must be one of"):
        model.steer(critic="q")
    with pytest.raises(ValueError, match="SAC"):
        model.steer(TD3, critic="action")
    with pytest.warns(UserWarning, match="starts fresh"):  # another layout: the critic cannot start from IQL's
        model.steer(critic="action", **dict(tiny, policy_kwargs=dict(net_arch=[8])))
