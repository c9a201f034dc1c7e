"""Saving and loading UEPO models (as SB3's tests/test_save_load.py): identical predictions after a round trip, training
goes on after loading, the KL reference policy travels with the model, clear errors on other spaces."""

import io

import numpy as np
import pytest
import torch as th
from gymnasium.wrappers import RescaleAction
from stable_baselines3.common.env_util import make_vec_env

from sb3_uepo import UEPO, DiffusionPolicy, MlpPolicy

POLICIES = ["DiffusionPolicy", "MlpPolicy"]
POLICY_CLASSES = {"DiffusionPolicy": DiffusionPolicy, "MlpPolicy": MlpPolicy}
DIFFUSION_KWARGS = dict(net_arch=[32, 32], value_net_arch=[32, 32], time_embed_dim=8, n_train_steps=10, n_sampling_steps=3)
POLICY_KWARGS = {"DiffusionPolicy": DIFFUSION_KWARGS, "MlpPolicy": dict(net_arch=[32, 32])}


def make_env(env_id="Pendulum-v1"):
    return make_vec_env(env_id, n_envs=1, seed=0)


def make_model(policy, env=None, **kwargs):
    params = dict(n_steps=32, batch_size=32, n_epochs=2, learning_rate=1e-3, seed=0, policy_kwargs=dict(POLICY_KWARGS[policy]))
    params.update(kwargs)
    return UEPO(policy, make_env() if env is None else env, **params)


@pytest.fixture
def observations():
    """A batch of Pendulum observations (cos, sin, angular velocity)."""
    rng = np.random.default_rng(0)
    angle = rng.uniform(-np.pi, np.pi, 16)
    return np.stack([np.cos(angle), np.sin(angle), rng.uniform(-8, 8, 16)], axis=1).astype(np.float32)


def deterministic_actions(policy, observations):
    actions, _ = policy.predict(observations, deterministic=True)
    again, _ = policy.predict(observations, deterministic=True)
    np.testing.assert_array_equal(actions, again)  # a pure function of the observations
    return actions


def policy_outputs(policy, observations):
    """Deterministic actions plus outputs that depend on every weight: values and the log-probabilities of fixed
    chains (DiffusionPolicy) or fixed actions (MlpPolicy). An untrained DiffusionPolicy's deterministic action can be
    the same saturated value for every observation, so the actions alone would not tell two policies apart."""
    obs = th.as_tensor(observations, device=policy.device)
    generator = th.Generator().manual_seed(0)
    with th.no_grad():
        if isinstance(policy, DiffusionPolicy):
            chains = th.randn(len(obs), policy.n_sampling_steps + 1, policy.action_dim, generator=generator)
            values, log_prob, _ = policy.evaluate_actions(obs, chains.to(policy.device))
        else:
            values, log_prob, _ = policy.evaluate_actions(obs, th.randn(len(obs), 1, generator=generator).to(policy.device))
    return dict(
        actions=deterministic_actions(policy, observations), values=values.cpu().numpy(), log_prob=log_prob.cpu().numpy()
    )


def assert_same_outputs(model, other, observations):
    outputs, other_outputs = policy_outputs(model.policy, observations), policy_outputs(other.policy, observations)
    for name, value in outputs.items():
        np.testing.assert_array_equal(other_outputs[name], value, err_msg=name)


def assert_other_outputs(model, other, observations):
    """``other`` is a different policy: its values and log-probabilities differ (the comparisons above can fail)."""
    outputs, other_outputs = policy_outputs(model.policy, observations), policy_outputs(other.policy, observations)
    assert not np.allclose(outputs["values"], other_outputs["values"])
    assert not np.allclose(outputs["log_prob"], other_outputs["log_prob"])


def assert_same_state(state, other):
    assert state.keys() == other.keys()
    for key, value in state.items():
        assert th.equal(value, other[key]), key


@pytest.mark.parametrize("policy", POLICIES)
def test_save_load(tmp_path, policy, observations):
    model = make_model(policy)
    model.learn(total_timesteps=64)
    params = model.get_parameters()
    model.save(tmp_path / "model.zip")

    loaded = UEPO.load(tmp_path / "model.zip", env=make_env())
    assert isinstance(loaded.policy, POLICY_CLASSES[policy])
    assert loaded.num_timesteps == 64 and loaded.n_steps == 32 and loaded.learning_rate == 1e-3
    assert loaded.policy_kwargs == model.policy_kwargs
    assert_same_state(params["policy"], loaded.get_parameters()["policy"])
    assert_same_outputs(model, loaded, observations)
    assert_other_outputs(model, make_model(policy, seed=1), observations)


@pytest.mark.parametrize("policy", POLICIES)
def test_continue_training_after_load(tmp_path, policy):
    model = make_model(policy)
    model.learn(total_timesteps=64)
    optimizer_state = model.policy.optimizer.state_dict()
    model.save(tmp_path / "model.zip")

    loaded = UEPO.load(tmp_path / "model.zip", env=make_env())
    # the optimizer's moments travel with the model
    loaded_state = loaded.policy.optimizer.state_dict()
    assert loaded_state["state"].keys() == optimizer_state["state"].keys() and optimizer_state["state"]
    for index, moments in optimizer_state["state"].items():
        assert th.equal(loaded_state["state"][index]["exp_avg"], moments["exp_avg"])
    parameters_before = {k: v.clone() for k, v in loaded.policy.state_dict().items()}
    loaded.learn(total_timesteps=64, reset_num_timesteps=False)
    assert loaded.num_timesteps == 128
    assert any(not th.equal(v, loaded.policy.state_dict()[k]) for k, v in parameters_before.items())
    loaded.learn(total_timesteps=32)  # reset_num_timesteps=True starts counting again
    assert loaded.num_timesteps == 32


@pytest.mark.parametrize("policy", POLICIES)
def test_load_without_env_predicts(tmp_path, policy, observations):
    model = make_model(policy)
    model.learn(total_timesteps=32)
    model.save(tmp_path / "model.zip")

    loaded = UEPO.load(tmp_path / "model.zip")
    assert loaded.env is None
    assert_same_outputs(model, loaded, observations)
    single, _ = loaded.predict(observations[0], deterministic=True)
    np.testing.assert_allclose(single, deterministic_actions(model.policy, observations)[0], rtol=1e-5)  # batch of 1
    with pytest.raises(AssertionError):  # learning needs an env (SB3's behaviour)
        loaded.learn(total_timesteps=32)
    loaded.set_env(make_env())
    loaded.learn(total_timesteps=32)
    assert loaded.num_timesteps == 32


@pytest.mark.parametrize("policy", POLICIES)
def test_reference_policy_is_saved(tmp_path, policy, observations):
    model = make_model(policy, kl_ref_coef=0.1)
    reference_state = {k: v.clone() for k, v in model.reference_policy.state_dict().items()}
    model.learn(total_timesteps=64)
    # the policy moved away from the reference, so a reference rebuilt from the policy at load time would differ
    assert any(not th.equal(v, model.policy.state_dict()[k]) for k, v in reference_state.items())
    assert "reference_policy" in model.get_parameters()
    model.save(tmp_path / "model.zip")

    loaded = UEPO.load(tmp_path / "model.zip", env=make_env())
    assert loaded.reference_policy is not None
    assert_same_state(loaded.reference_policy.state_dict(), reference_state)
    assert not any(p.requires_grad for p in loaded.reference_policy.parameters())
    assert not hasattr(loaded.reference_policy, "optimizer")
    loaded.learn(total_timesteps=32, reset_num_timesteps=False)  # the KL term works after loading
    assert loaded.logger.name_to_value["train/kl_ref"] > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_reference_set_by_hand_is_saved_without_kl_coef(tmp_path, policy):
    model = make_model(policy)  # kl_ref_coef=0: no reference until set_reference_policy()
    assert model.reference_policy is None and "reference_policy" not in model.get_parameters()
    model.learn(total_timesteps=32)
    model.set_reference_policy()
    snapshot = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(total_timesteps=32, reset_num_timesteps=False)
    model.save(tmp_path / "model.zip")

    loaded = UEPO.load(tmp_path / "model.zip", env=make_env())
    assert loaded.reference_policy is not None
    assert_same_state(loaded.reference_policy.state_dict(), snapshot)


@pytest.mark.parametrize("policy", POLICIES)
def test_load_onto_env_with_other_spaces(tmp_path, policy):
    model = make_model(policy)
    model.save(tmp_path / "model.zip")
    other_observations = make_env("MountainCarContinuous-v0")  # obs (2,) vs Pendulum's (3,)
    with pytest.raises(ValueError, match="trained on different spaces") as error:
        UEPO.load(tmp_path / "model.zip", env=other_observations)
    message = str(error.value)
    assert "Observation spaces do not match" in message
    assert str(model.observation_space) in message and str(other_observations.observation_space) in message
    assert "env=None" in message

    other_actions = make_vec_env(  # same observations, actions in [-1, 1] instead of [-2, 2]
        "Pendulum-v1",
        n_envs=1,
        wrapper_class=RescaleAction,
        wrapper_kwargs=dict(min_action=np.float32(-1.0), max_action=np.float32(1.0)),
    )
    with pytest.raises(ValueError, match="Action spaces do not match") as error:
        UEPO.load(tmp_path / "model.zip", env=other_actions)
    assert str(other_actions.action_space) in str(error.value)
    loaded = UEPO.load(tmp_path / "model.zip", env=make_env())
    with pytest.raises(ValueError, match=r"cannot use this environment with this model.*Action spaces do not match"):
        loaded.set_env(other_actions)


@pytest.mark.parametrize("policy", POLICIES)
def test_save_load_bytes_io(policy, observations):
    model = make_model(policy, kl_ref_coef=0.1)
    model.learn(total_timesteps=32)
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    loaded = UEPO.load(buffer, env=make_env())
    assert_same_outputs(model, loaded, observations)
    assert_same_state(loaded.reference_policy.state_dict(), model.reference_policy.state_dict())


@pytest.mark.parametrize("policy", POLICIES)
def test_get_set_parameters(tmp_path, policy, observations):
    model = make_model(policy, kl_ref_coef=0.1)
    model.learn(total_timesteps=32)
    params = model.get_parameters()
    assert set(params) == {"policy", "policy.optimizer", "reference_policy"}

    other = make_model(policy, kl_ref_coef=0.1, seed=1)
    assert_other_outputs(model, other, observations)
    other.set_parameters(params, exact_match=True)
    assert_same_outputs(model, other, observations)
    assert_same_state(other.reference_policy.state_dict(), model.reference_policy.state_dict())

    # from a saved file as well
    third = make_model(policy, kl_ref_coef=0.1, seed=2)
    model.save(tmp_path / "model.zip")
    third.set_parameters(str(tmp_path / "model.zip"))
    assert_same_outputs(model, third, observations)

    # exact_match: a missing object is an error
    incomplete = {k: v for k, v in params.items() if k != "reference_policy"}
    with pytest.raises(ValueError, match="Names of parameters do not match"):
        other.set_parameters(incomplete, exact_match=True)
    # and a wrong tensor shape too
    wrong = {**params, "policy": {k: th.zeros(1) for k in params["policy"]}}
    with pytest.raises(RuntimeError):
        other.set_parameters(wrong, exact_match=True)


@pytest.mark.parametrize("policy", POLICIES)
def test_save_load_policy(tmp_path, policy, observations):
    model = make_model(policy)
    model.learn(total_timesteps=32)
    policy_class = POLICY_CLASSES[policy]
    # the fixed observation statistics (and the DiffusionPolicy's seed noise) are part of the policy
    model.policy.set_observation_statistics(np.array([0.1, -0.2, 0.5]), np.array([1.0, 2.0, 4.0]))
    if policy == "DiffusionPolicy":
        model.policy.set_deterministic_noise(np.array([0.3]))
    model.policy.save(tmp_path / "policy.pkl")

    loaded = policy_class.load(tmp_path / "policy.pkl")
    assert_same_state(loaded.state_dict(), model.policy.state_dict())
    outputs, loaded_outputs = policy_outputs(model.policy, observations), policy_outputs(loaded, observations)
    for name, value in outputs.items():
        np.testing.assert_array_equal(loaded_outputs[name], value, err_msg=name)
