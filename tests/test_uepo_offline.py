"""UEPO(..., dataset=...): pretrain() runs the offline stages without the env and hands the chosen member over."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium.wrappers import RescaleAction
from stable_baselines3.common.env_util import make_vec_env

from sb3_uepo import UEPO
from sb3_uepo.offline.pipeline import pretrain as pipeline_pretrain

pytestmark = pytest.mark.filterwarnings("ignore:No termination rule is known")

MLP_KWARGS = dict(net_arch=dict(pi=[16, 16], vf=[16, 16]))


class StepCounter(gym.Wrapper):
    steps = 0

    def step(self, action):
        StepCounter.steps += 1
        return super().step(action)


def test_pretrain_never_steps_env_and_hands_over_the_offline_result(diffusion_model, pendulum_dataset):
    StepCounter.steps = 0
    env = make_vec_env("Pendulum-v1", n_envs=1, wrapper_class=StepCounter)
    dataset = pendulum_dataset()
    model = diffusion_model(dataset, env=env)
    report = model.pretrain()
    assert StepCounter.steps == 0, "pretrain() must choose the member by OPE, never by stepping the env"
    assert model.pretrained and report["chosen_member"] in (0, 1) and "OPE" in report["chosen_reason"]
    json.dumps(report)  # the report is plain JSON

    # the same config through the pipeline alone gives the same networks (seeded, deterministic)
    result = pipeline_pretrain(
        dataset, model.observation_space, model.action_space, model.offline_config(), progress_bar=False
    )
    policy = model.policy
    for key, value in result.policy_state_dict.items():
        assert th.allclose(policy.denoiser.state_dict()[key], value), key
    # the IQL value, in the units of the scaled rewards (normalize_reward: the fine-tuning default)
    scale = model.reward_scaler.scale
    last = max(int(key.split(".")[0]) for key in result.value_state_dict)
    for key, value in result.value_state_dict.items():
        expected = value / scale if int(key.split(".")[0]) == last else value
        assert th.allclose(policy.value_net.state_dict()[key], expected), key
    np.testing.assert_allclose(policy.obs_mean.numpy(), result.obs_mean, rtol=1e-6)
    np.testing.assert_allclose(policy.obs_std.numpy(), result.obs_std, rtol=1e-6)
    assert th.allclose(policy.deterministic_noise, result.seed_noise)
    assert policy.initial_noise == "seed"

    # the behaviour diffusion model (diffusion BC) loads the same way, acting from fresh noise
    bc = diffusion_model(dataset, env=env)
    bc.load_offline_result(result, member="behavior")
    for key, value in result.behavior_state_dict.items():
        assert th.allclose(bc.policy.denoiser.state_dict()[key], value), key
    assert bc.policy.initial_noise == "random" and not bc.pretrained

    # online fine-tuning starts from it: no second pretraining, the env is stepped now
    model.learn(64)
    assert StepCounter.steps == 64 and model.num_timesteps == 64


def test_learn_pretrains_once_and_save_load_keeps_it(tmp_path, diffusion_model):
    model = diffusion_model(kl_ref_coef=0.1)
    model.learn(32)
    assert model.pretrained and model.reference_policy is not None
    observations = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    actions, _ = model.predict(observations, deterministic=True)
    model.save(tmp_path / "model.zip")

    loaded = UEPO.load(tmp_path / "model.zip", env=make_vec_env("Pendulum-v1", n_envs=1))
    assert loaded.pretrained and loaded.offline_report == model.offline_report
    np.testing.assert_allclose(loaded.predict(observations, deterministic=True)[0], actions, rtol=1e-5, atol=1e-6)
    assert th.allclose(loaded.policy.obs_mean, model.policy.obs_mean)

    def forbidden(*args, **kwargs):
        raise AssertionError("a loaded pretrained model must not pretrain again")

    loaded.pretrain = forbidden  # type: ignore[method-assign]
    loaded.learn(32, reset_num_timesteps=False)
    assert loaded.num_timesteps == 64


def test_pretrain_dir_writes_resumable_checkpoints(tmp_path, diffusion_model):
    model = diffusion_model(pretrain_dir=str(tmp_path / "offline"))
    model.pretrain()
    progress = json.loads((tmp_path / "offline" / "progress.json").read_text())
    assert {"behavior", "iql", "members", "offline_ppo"} <= set(progress["completed"])
    # a second model with the same settings resumes every stage from disk and ends with the same policy
    again = diffusion_model(pretrain_dir=str(tmp_path / "offline"))
    again.pretrain()
    for key, value in model.policy.state_dict().items():
        assert th.allclose(again.policy.state_dict()[key], value), key


def test_uni_o4_preset_with_gaussian_mlp_policy(pendulum_dataset, tiny_offline_kwargs):
    env = make_vec_env(
        "Pendulum-v1",
        n_envs=1,
        wrapper_class=RescaleAction,
        wrapper_kwargs=dict(min_action=np.float32(-1.0), max_action=np.float32(1.0)),
    )
    dataset = pendulum_dataset(action_scale=2.0)  # the dataset of the rescaled env
    model = UEPO(
        "MlpPolicy",
        env,
        dataset=dataset,
        preset="quick+uni_o4",
        offline_kwargs=dict(tiny_offline_kwargs),
        policy_kwargs=dict(MLP_KWARGS),
        n_steps=32,
        batch_size=32,
        n_epochs=1,
        seed=0,
    )
    report = model.pretrain()
    assert report["policy_type"] == "gaussian"
    result = pipeline_pretrain(
        dataset, model.observation_space, model.action_space, model.offline_config(), progress_bar=False
    )
    actor = result.build_policy()
    observations = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    with th.no_grad():
        expected_mean, _ = actor(th.as_tensor(result.normalize_obs(observations)))
        distribution = model.policy.get_distribution(model.policy.obs_to_tensor(observations)[0])
    np.testing.assert_allclose(distribution.distribution.mean.numpy(), expected_mean.numpy(), rtol=1e-5, atol=1e-6)
    with th.no_grad():
        values = model.policy.predict_values(model.policy.obs_to_tensor(observations)[0]).flatten()
        expected_values = result.build_value_net()(th.as_tensor(result.normalize_obs(observations))).flatten()
    # the IQL value in the units of the scaled rewards (normalize_reward: the fine-tuning default)
    expected_values = expected_values / model.reward_scaler.scale
    np.testing.assert_allclose(values.numpy(), expected_values.numpy(), rtol=1e-5, atol=1e-6)
    model.learn(32)


# ---------------------------------------------------------------------------------------------- bad input
def test_diffusion_policy_with_uni_o4_preset_is_refused(diffusion_model):
    model = diffusion_model(preset="quick+uni_o4")
    with pytest.raises(ValueError, match="MlpPolicy"):
        model.pretrain()


def test_mlp_policy_without_uni_o4_is_refused(pendulum_dataset, tiny_offline_kwargs):
    model = UEPO(
        "MlpPolicy", "Pendulum-v1", dataset=pendulum_dataset(), preset="quick", offline_kwargs=dict(tiny_offline_kwargs)
    )
    with pytest.raises(ValueError, match="uni_o4"):
        model.pretrain()


def test_mlp_policy_needs_unit_action_bounds(pendulum_dataset, tiny_offline_kwargs):
    model = UEPO(
        "MlpPolicy", "Pendulum-v1", dataset=pendulum_dataset(), preset="quick+uni_o4", offline_kwargs=dict(tiny_offline_kwargs)
    )
    with pytest.raises(ValueError, match="RescaleAction"):
        model.pretrain()


def test_offline_kwargs_conflicting_with_policy_kwargs(diffusion_model, tiny_offline_kwargs):
    model = diffusion_model(offline_kwargs={**tiny_offline_kwargs, "denoiser_hidden_sizes": (32, 32)})
    with pytest.raises(ValueError, match="denoiser_hidden_sizes"):
        model.pretrain()


def test_offline_kwargs_fill_the_policy_architecture(pendulum_dataset, tiny_offline_kwargs):
    model = UEPO(
        "DiffusionPolicy",
        "Pendulum-v1",
        dataset=pendulum_dataset(),
        preset="quick",
        offline_kwargs={**tiny_offline_kwargs, "denoiser_hidden_sizes": (24, 24), "n_sampling_steps": 4},
    )
    assert model.policy.net_arch == [24, 24] and model.policy.n_sampling_steps == 4


def test_unknown_offline_key_fails_at_construction(diffusion_model):
    with pytest.raises((ValueError, TypeError), match="not_a_setting"):
        diffusion_model(offline_kwargs={"not_a_setting": 1})


def test_dataset_spaces_must_match_env(diffusion_model):
    model = diffusion_model(env="MountainCarContinuous-v0")  # obs (2,) vs the dataset's (3,)
    with pytest.raises(ValueError, match="observation"):
        model.pretrain()


def test_nan_rewards_are_refused(diffusion_model, pendulum_dataset):
    dataset = pendulum_dataset()
    dataset.rewards[5] = np.nan
    model = diffusion_model(dataset)
    with pytest.raises(ValueError, match=r"(?i)nan|finite"):
        model.pretrain()


def test_mlp_policy_normalises_observations_once_on_every_path():
    model = UEPO("MlpPolicy", "Pendulum-v1", seed=0)
    model.policy.set_observation_statistics(np.array([1.0, -2.0, 3.0]), np.array([2.0, 0.5, 4.0]))
    obs = model.policy.obs_to_tensor(np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32))[0]
    with th.no_grad():
        mean_forward = model.policy.get_distribution(obs).distribution.mean
        _, values_forward, _ = model.policy(obs, deterministic=True)
        actions = model.policy._predict(obs, deterministic=True)
        values_eval, _, _ = model.policy.evaluate_actions(obs, actions)
        values = model.policy.predict_values(obs)
    assert th.allclose(actions, mean_forward, atol=1e-6)
    assert th.allclose(values_forward, values, atol=1e-6) and th.allclose(values_eval, values, atol=1e-6)
    with th.no_grad():  # and it is really normalised: the identity statistics give a different output
        model.policy.set_observation_statistics(np.zeros(3), np.ones(3))
        assert not th.allclose(model.policy.get_distribution(obs).distribution.mean, mean_forward)


def test_dataset_given_defaults_are_the_fine_tuning_settings_and_explicit_arguments_win(pendulum_dataset, tiny_offline_kwargs):
    from sb3_uepo.uepo.defaults import FINE_TUNING_DEFAULTS, PPO_DEFAULTS

    env = make_vec_env("Pendulum-v1", n_envs=4)
    tuned = UEPO("DiffusionPolicy", env, dataset=pendulum_dataset(), preset="quick", offline_kwargs=dict(tiny_offline_kwargs))
    assert tuned.learning_rate == FINE_TUNING_DEFAULTS["learning_rate"]
    assert tuned.clip_range(1.0) == FINE_TUNING_DEFAULTS["clip_range"]
    assert tuned.n_steps * env.num_envs == FINE_TUNING_DEFAULTS["n_steps"]  # ~2048 env steps per update
    assert (tuned.batch_size, tuned.n_epochs) == (FINE_TUNING_DEFAULTS["batch_size"], FINE_TUNING_DEFAULTS["n_epochs"])
    assert tuned.kl_ref_coef == FINE_TUNING_DEFAULTS["kl_ref_coef"] > 0
    assert tuned.value_warmup_iters == FINE_TUNING_DEFAULTS["value_warmup_iters"] > 0
    assert tuned.policy.value_lr_scale == 10.0
    assert tuned.policy.ft_denoising_steps == 2  # DPPO's scheme: only the last denoising steps are fine-tuned
    one_step = UEPO(
        "DiffusionPolicy",
        env,
        dataset=pendulum_dataset(),
        preset="quick",
        offline_kwargs={**tiny_offline_kwargs, "n_sampling_steps": 1},
    )
    assert one_step.policy.ft_denoising_steps is None  # the default is capped at the chain length
    with pytest.raises(ValueError, match="ft_denoising_steps must be in"):  # an explicit value is checked, not capped
        UEPO(
            "DiffusionPolicy",
            env,
            dataset=pendulum_dataset(),
            preset="quick",
            offline_kwargs={**tiny_offline_kwargs, "n_sampling_steps": 1},
            policy_kwargs={"ft_denoising_steps": 2},
        )

    scratch = UEPO("DiffusionPolicy", env)
    assert (scratch.learning_rate, scratch.clip_range(1.0), scratch.n_steps) == (3e-4, 0.2, PPO_DEFAULTS["n_steps"])
    assert (scratch.kl_ref_coef, scratch.value_warmup_iters, scratch.policy.value_lr_scale) == (0.0, 0, 1.0)
    assert scratch.policy.ft_denoising_steps is None  # from scratch every step learns

    explicit = UEPO(
        "DiffusionPolicy",
        env,
        dataset=pendulum_dataset(),
        preset="quick",
        offline_kwargs=dict(tiny_offline_kwargs),
        learning_rate=1e-3,
        clip_range=0.3,
        kl_ref_coef=0.0,
        policy_kwargs=dict(value_lr_scale=2.0),
    )
    assert (explicit.learning_rate, explicit.clip_range(1.0), explicit.kl_ref_coef) == (1e-3, 0.3, 0.0)
    assert explicit.policy.value_lr_scale == 2.0
    assert explicit.n_epochs == FINE_TUNING_DEFAULTS["n_epochs"]  # the others stay "auto"


def test_stage_scores_cover_every_stage_and_leave_the_chosen_member_loaded(diffusion_model, pendulum_dataset):
    from sb3_uepo.common.evaluation import score_offline_stages

    dataset = pendulum_dataset()
    model = diffusion_model(dataset)
    result = pipeline_pretrain(
        dataset, model.observation_space, model.action_space, model.offline_config(), progress_bar=False
    )
    model.load_offline_result(result)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    report = score_offline_stages(model, result, "Pendulum-v1", n_episodes=1, seed=0)
    stages = [(row["stage"], row["member"]) for row in report["stages"]]
    assert stages == [("behavior", None), ("members", 0), ("members", 1), ("offline_ppo", 0), ("offline_ppo", 1)]
    for row in report["stages"]:
        assert row["deterministic"]["n_episodes"] == 1 and row["stochastic"]["n_episodes"] == 1
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, before[key]), key
    # the chosen member's weights are the result's member of that index
    for key, value in result.member_state_dicts[result.chosen_member].items():
        assert th.equal(result.policy_state_dict[key], value)
    # a member with zero initial noise acts deterministically like the DDIM path from x_0 = 0
    assert th.equal(model.policy.deterministic_noise, th.zeros(1))


@pytest.mark.parametrize("offline_improvement", [False, True])
def test_the_same_seed_gives_the_same_offline_policy_and_score(diffusion_model, tiny_offline_kwargs, offline_improvement):
    """Rerunning the offline phase with the same seed (fresh processes' state aside) gives the same weights, the same
    chosen member and the same evaluation: a score is not a draw of the run."""
    from sb3_uepo.common.evaluation import evaluate

    kwargs = dict(tiny_offline_kwargs, offline_improvement=offline_improvement)
    runs = []
    for _ in range(2):
        th.manual_seed(1234 + len(runs))  # whatever the global RNG held before, the run's seed decides
        np.random.seed(99 + len(runs))
        model = diffusion_model(offline_kwargs=kwargs)
        model.pretrain()
        result = evaluate(model, "Pendulum-v1", n_episodes=2, deterministic=True, seed=7)
        runs.append((model.policy.state_dict(), model.offline_report["chosen_member"], result.returns))
    (first, chosen_a, returns_a), (second, chosen_b, returns_b) = runs
    assert chosen_a == chosen_b
    for key, value in first.items():
        assert th.equal(value, second[key]), key
    np.testing.assert_array_equal(returns_a, returns_b)


def test_pretrain_jobs_reach_the_offline_pipeline_and_give_the_same_policy(diffusion_model, monkeypatch):
    from sb3_uepo.offline import pipeline

    seen = []
    original = pipeline.OfflinePretrainer.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("n_jobs"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.OfflinePretrainer, "__init__", spy)
    threads = th.get_num_threads()
    th.set_num_threads(1)
    try:
        one, two = diffusion_model(), diffusion_model(pretrain_jobs=2)
        one.pretrain()
        two.pretrain()
    finally:
        th.set_num_threads(threads)
    assert seen == [1, 2]
    for key, value in one.policy.state_dict().items():
        assert th.equal(value, two.policy.state_dict()[key]), key
    with pytest.raises(ValueError, match="pretrain_jobs must be >= 1"):
        diffusion_model(pretrain_jobs=0)
