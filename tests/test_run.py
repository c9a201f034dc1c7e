"""UEPO runs (as SB3's tests/test_run.py): short learning runs with both policies on Pendulum and Hopper, vectorised and
normalised envs, callbacks, logging, the KL to the reference and the value warm-up, PPO's options, and bad input."""

import multiprocessing
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

from sb3_uepo import UEPO
from sb3_uepo.common.buffers import DiffusionRolloutBuffer

POLICIES = ["DiffusionPolicy", "MlpPolicy"]
DIFFUSION_KWARGS = dict(net_arch=[32, 32], value_net_arch=[32, 32], time_embed_dim=8, n_train_steps=10, n_sampling_steps=3)
POLICY_KWARGS = {"DiffusionPolicy": DIFFUSION_KWARGS, "MlpPolicy": dict(net_arch=[32, 32])}


def make_model(policy="DiffusionPolicy", env="Pendulum-v1", **kwargs):
    params = dict(n_steps=32, batch_size=32, n_epochs=2, seed=0, policy_kwargs=dict(POLICY_KWARGS[policy]))
    params.update(kwargs)
    return UEPO(policy, env, **params)


class RecordingFormat(KVWriter):
    """Keeps every dumped table (SB3's logger clears its values at each dump)."""

    def __init__(self):
        self.tables = []

    def write(self, key_values, key_excluded, step=0):
        self.tables.append(dict(key_values))

    def close(self):
        pass


def record_logs(model):
    recorder = RecordingFormat()
    model.set_logger(Logger(None, [recorder]))
    return recorder


def actor_parameters(model):
    """The parameters of the actor only (denoiser, or Gaussian policy net + action net + log std)."""
    policy = model.policy
    if hasattr(policy, "denoiser"):
        return {k: v.detach().clone() for k, v in policy.denoiser.state_dict().items()}
    state = policy.state_dict()
    return {k: v.clone() for k, v in state.items() if k.startswith(("mlp_extractor.policy_net", "action_net", "log_std"))}


def value_parameters(model):
    state = model.policy.state_dict()
    return {k: v.clone() for k, v in state.items() if k.startswith(("value_net", "mlp_extractor.value_net"))}


def changed(before, after):
    return {k for k in before if not th.equal(before[k], after[k])}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("env_id", ["Pendulum-v1", "Hopper-v5"])
def test_uepo(policy, env_id):
    # short episodes: rollouts cross time-limit truncations (value bootstrap) and, on Hopper, terminations
    env = make_vec_env(env_id, n_envs=2, seed=0, vec_env_cls=DummyVecEnv, env_kwargs=dict(max_episode_steps=40))
    model = make_model(policy, env, n_steps=64)
    expected_buffer = DiffusionRolloutBuffer if policy == "DiffusionPolicy" else RolloutBuffer
    assert type(model.rollout_buffer) is expected_buffer
    actor_before, value_before = actor_parameters(model), value_parameters(model)
    model.learn(total_timesteps=256)

    assert model.num_timesteps == 256
    assert len(model.ep_info_buffer) >= 4, "episodes of at most 40 steps must have ended"
    assert changed(actor_before, actor_parameters(model)) and changed(value_before, value_parameters(model))
    logged = model.logger.name_to_value
    for key in ("train/policy_gradient_loss", "train/value_loss", "train/approx_kl", "train/clip_fraction"):
        assert np.isfinite(logged[key]), key
    if policy == "DiffusionPolicy":
        n_steps = model.policy.n_sampling_steps
        assert model.rollout_buffer.chains.shape == (64 * 2, n_steps + 1, env.action_space.shape[0])
        assert model.rollout_buffer.chains.any()
    actions, _ = model.predict(np.stack([env.observation_space.sample() for _ in range(5)]), deterministic=True)
    assert actions.shape == (5, *env.action_space.shape)
    assert env.action_space.contains(actions[0])


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="fork start method not available")
def test_subproc_vec_env():
    # fork: the workers do not re-import torch and SB3 (forkserver/spawn take seconds per worker)
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv, vec_env_kwargs=dict(start_method="fork"))
    try:
        model = make_model("DiffusionPolicy", env)
        model.learn(total_timesteps=128)
        assert model.num_timesteps == 128 and model.n_envs == 2
    finally:
        env.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_vec_normalize(policy):
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0), gamma=0.99)
    model = make_model(policy, env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(total_timesteps=128)
    assert not [w for w in caught if "VecNormalize" in str(w.message)], "identity policy statistics: nothing to warn"
    assert model.get_vec_normalize_env() is env
    assert env.obs_rms.count > 128 and env.ret_rms.count > 128
    # the rollout buffer holds the normalised observations
    assert np.abs(model.rollout_buffer.observations).max() <= env.clip_obs


def test_evaluate_with_reward_only_vec_normalize():
    """VecNormalize(norm_obs=False) (reward scaling only, the policy keeps its own observation statistics): evaluation
    runs on the raw env, since there is nothing to apply to observations."""
    from sb3_uepo.common.evaluation import evaluate

    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0), norm_obs=False, norm_reward=True, gamma=0.99)
    model = make_model("DiffusionPolicy", env)
    model.learn(total_timesteps=64)
    result = evaluate(model, "Pendulum-v1", n_episodes=1, seed=0, env_kwargs=dict(max_episode_steps=20))
    assert result.mean_return < 0 and len(result.returns) == 1  # Pendulum's raw (negative) return, not a scaled one


def test_vec_normalize_warns_when_the_policy_normalises_too():
    model = make_model("DiffusionPolicy", VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0)))
    model.policy.set_observation_statistics(np.ones(3), 2 * np.ones(3))
    with pytest.warns(UserWarning, match="norm_obs=False"):
        model.learn(total_timesteps=64)


def test_eval_callback(tmp_path):
    eval_env = make_vec_env("Pendulum-v1", n_envs=2, seed=1, env_kwargs=dict(max_episode_steps=20))
    callback = EvalCallback(
        eval_env,
        n_eval_episodes=2,
        eval_freq=32,
        log_path=str(tmp_path / "eval"),
        best_model_save_path=str(tmp_path / "best"),
        warn=False,
    )
    model = make_model("DiffusionPolicy")
    model.learn(total_timesteps=128, callback=callback)
    evaluations = np.load(tmp_path / "eval" / "evaluations.npz")
    assert evaluations["timesteps"].tolist() == [32, 64, 96, 128]
    results = evaluations["results"]
    assert results.shape == (4, 2)
    assert np.all(results < 0) and np.all(results > -20 * 17), "20 Pendulum steps of reward in [-16.3, 0]"
    assert evaluations["ep_lengths"].tolist() == [[20, 20]] * 4
    best = UEPO.load(tmp_path / "best" / "best_model.zip")
    assert best.predict(eval_env.observation_space.sample(), deterministic=True)[0].shape == (1,)


@pytest.mark.filterwarnings("ignore:rich is experimental")
@pytest.mark.parametrize("policy", POLICIES)
def test_progress_bar(policy):
    pytest.importorskip("tqdm")
    pytest.importorskip("rich")
    model = make_model(policy)
    model.learn(total_timesteps=64, progress_bar=True)
    assert model.num_timesteps == 64


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_model("DiffusionPolicy", tensorboard_log=str(tmp_path / "tb"))
    model.learn(total_timesteps=64)
    model.learn(total_timesteps=64, reset_num_timesteps=False)  # continues in the same run directory
    run_dirs = sorted(p.name for p in (tmp_path / "tb").iterdir())
    assert run_dirs == ["UEPO_1"]
    event_files = list((tmp_path / "tb" / "UEPO_1").glob("events.out.tfevents.*"))
    assert event_files
    accumulator = EventAccumulator(str(tmp_path / "tb" / "UEPO_1"))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/value_loss", "train/policy_gradient_loss", "train/chain_log_prob_mean"} <= scalars
    model.learn(total_timesteps=64)  # a new run
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["UEPO_1", "UEPO_2"]


@pytest.mark.parametrize("policy", POLICIES)
def test_kl_ref_and_value_warmup_logs(policy):
    model = make_model(policy, kl_ref_coef=0.5, kl_ref_decay=0.5, value_warmup_iters=1, learning_rate=1e-3)
    assert model.reference_policy is not None
    reference_before = {k: v.clone() for k, v in model.reference_policy.state_dict().items()}
    recorder = record_logs(model)
    model.learn(total_timesteps=128)  # 4 rollouts of 32 steps; the logs of update i are dumped with rollout i + 1

    train_tables = [table for table in recorder.tables if "train/value_warmup" in table]
    train_tables.append(dict(model.logger.name_to_value))  # the last update is never dumped
    assert len(train_tables) == 4
    assert [table["train/value_warmup"] for table in train_tables] == [1, 0, 0, 0]
    # beta_t = kl_ref_coef * kl_ref_decay ** (policy updates so far); the warm-up does not count
    assert [table["train/kl_ref_coef"] for table in train_tables] == pytest.approx([0.5, 0.5, 0.25, 0.125])
    assert "train/kl_ref" not in train_tables[0] and "train/policy_gradient_loss" not in train_tables[0]
    assert all(table["train/kl_ref"] > 0 for table in train_tables[1:]), "the policy moved away from its reference"
    # the reference stays frozen
    for key, value in model.reference_policy.state_dict().items():
        assert th.equal(value, reference_before[key]), key
    assert not any(p.requires_grad for p in model.reference_policy.parameters())


@pytest.mark.parametrize("policy", POLICIES)
def test_value_warmup_trains_the_value_only(policy):
    model = make_model(policy, value_warmup_iters=2, learning_rate=1e-3)
    actor_before, value_before = actor_parameters(model), value_parameters(model)
    model.learn(total_timesteps=64)  # 2 updates, both in the warm-up
    assert model.logger.name_to_value["train/value_warmup"] == 1
    assert not changed(actor_before, actor_parameters(model)), "the actor must not move during the value warm-up"
    assert changed(value_before, value_parameters(model)) == set(value_before)
    model.learn(total_timesteps=32, reset_num_timesteps=False)  # the warm-up is over
    assert model.logger.name_to_value["train/value_warmup"] == 0
    assert changed(actor_before, actor_parameters(model))


@pytest.mark.parametrize("policy", POLICIES)
def test_kl_ref_pulls_towards_the_reference(policy):
    final_kl = {}
    for kl_ref_coef in (1e-8, 10.0):
        model = make_model(policy, kl_ref_coef=kl_ref_coef, kl_ref_decay=1.0, learning_rate=3e-3, n_epochs=4)
        model.learn(total_timesteps=128)
        final_kl[kl_ref_coef] = model.logger.name_to_value["train/kl_ref"]
    assert final_kl[10.0] < 0.5 * final_kl[1e-8], final_kl


def test_gsde_with_kl_ref():
    """gSDE's noise matrices are graph tensors: copying the policy into the reference must leave them out."""
    model = make_model("MlpPolicy", use_sde=True, sde_sample_freq=4, kl_ref_coef=0.1)
    model.learn(total_timesteps=64)
    assert model.logger.name_to_value["train/kl_ref"] > 0
    model.set_reference_policy()  # after training too
    model.learn(total_timesteps=32, reset_num_timesteps=False)
    assert model.policy.action_dist.exploration_mat is not None  # the live policy keeps its noise


@pytest.mark.parametrize("policy", POLICIES)
def test_target_kl(policy, capsys):
    model = make_model(policy, n_steps=64, batch_size=32, n_epochs=5, learning_rate=1e-3)
    model.learn(total_timesteps=64)
    assert model._n_updates == 5

    # the first minibatch has KL 0 (same policy), every later one exceeds 1.5 * 1e-6: one epoch only
    model = make_model(policy, n_steps=64, batch_size=32, n_epochs=5, learning_rate=1e-3, target_kl=1e-6, verbose=1)
    model.learn(total_timesteps=64)
    assert model._n_updates == 1
    assert "Early stopping at step 0" in capsys.readouterr().out


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("clip_range_vf", [None, 0.2, -0.2])
def test_clip_range_vf(policy, clip_range_vf):
    if clip_range_vf is not None and clip_range_vf < 0:
        with pytest.raises(ValueError, match="clip_range_vf must be positive"):
            make_model(policy, clip_range_vf=clip_range_vf)
        return
    model = make_model(policy, clip_range_vf=clip_range_vf)
    model.learn(total_timesteps=64)
    if clip_range_vf is None:
        assert "train/clip_range_vf" not in model.logger.name_to_value
    else:
        assert model.logger.name_to_value["train/clip_range_vf"] == clip_range_vf


def test_value_clipping_limits_the_value_change():
    model = make_model("DiffusionPolicy", clip_range_vf=0.1)
    data = SimpleNamespace(old_values=th.zeros(4), returns=th.full((4,), 5.0))
    values = th.tensor([1.0, -1.0, 0.05, 3.0])
    clipped = th.tensor([0.1, -0.1, 0.05, 0.1])
    assert model._value_loss(values, data, 0.1).item() == pytest.approx(((5.0 - clipped) ** 2).mean().item())
    assert model._value_loss(values, data, None).item() == pytest.approx(((5.0 - values) ** 2).mean().item())


@pytest.mark.parametrize("policy", POLICIES)
def test_learning_rate_schedule(policy):
    progress = []

    def schedule(progress_remaining):
        progress.append(progress_remaining)
        return 1e-3 * (0.5 + progress_remaining)

    policy_kwargs = dict(POLICY_KWARGS[policy], value_lr_scale=10.0)
    model = make_model(policy, learning_rate=schedule, policy_kwargs=policy_kwargs)
    model.learn(total_timesteps=128)  # 4 updates, at progress 0.75, 0.5, 0.25, 0
    assert progress[-4:] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert model.logger.name_to_value["train/learning_rate"] == pytest.approx(5e-4)
    learning_rates = [group["lr"] for group in model.policy.optimizer.param_groups]
    assert learning_rates == pytest.approx([5e-4, 5e-3])  # actor, then the (scaled) value group
    # the groups split the parameters: actor and critic, as the separate gradient clips see them
    actor, critic = model.policy.actor_critic_parameters()
    groups = model.policy.optimizer.param_groups
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in actor}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in critic}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_device(policy, device):
    if device == "cuda" and not th.cuda.is_available():
        pytest.skip("CUDA not available")
    model = make_model(policy, device=device, kl_ref_coef=0.1)
    model.learn(total_timesteps=64)
    assert model.device.type == device
    assert model.rollout_buffer.device.type == device
    for module in (model.policy, model.reference_policy):
        assert all(p.device.type == device for p in module.parameters())
        assert all(b.device.type == device for b in module.buffers())
    actions, _ = model.predict(np.zeros((3, 3), dtype=np.float32), deterministic=True)
    assert isinstance(actions, np.ndarray) and actions.shape == (3, 1)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("policy", POLICIES)
def test_discrete_action_space_is_refused(policy):
    with pytest.raises(ValueError, match=r"continuous \(Box\) action space.*Discrete"):
        UEPO(policy, "CartPole-v1")


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="'CnnPolicy' unknown to UEPO; valid names: DiffusionPolicy, MlpPolicy"):
        UEPO("CnnPolicy", "Pendulum-v1")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=1), "batch_size must be > 1"),
        (dict(n_steps=1, batch_size=2), r"n_steps \* n_envs must be > 1"),
        (dict(denoising_discount=0.0), "denoising_discount"),
        (dict(denoising_discount=1.5), "denoising_discount"),
        (dict(kl_ref_coef=-0.1), "kl_ref_coef"),
        (dict(kl_ref_decay=0.0), "kl_ref_decay"),
        (dict(value_warmup_iters=-1), "value_warmup_iters"),
        (dict(use_sde=True), "use_sde"),
        (dict(rollout_buffer_class=RolloutBuffer), "needs a DiffusionRolloutBuffer"),
        (dict(policy_kwargs=dict(sampler="euler")), "sampler"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model("DiffusionPolicy", **kwargs)


def test_diffusion_rollout_buffer_needs_diffusion_policy():
    with pytest.raises(ValueError, match="needs a DiffusionPolicy"):
        make_model("MlpPolicy", rollout_buffer_class=DiffusionRolloutBuffer)


def test_batch_size_not_dividing_the_rollout_warns():
    with pytest.warns(UserWarning, match="does not divide"):
        make_model("DiffusionPolicy", n_steps=48, batch_size=32)


@pytest.mark.parametrize("policy", POLICIES)
def test_actor_and_critic_gradients_are_clipped_separately(policy, monkeypatch):
    """One joint clip would let the (large) value gradient shrink every actor step; each gets its own norm."""
    model = make_model(policy, max_grad_norm=0.5, max_grad_norm_vf=7.0)
    actor, critic = model.policy.actor_critic_parameters()
    assert {id(p) for p in actor}.isdisjoint(id(p) for p in critic)
    assert len(actor) + len(critic) == len(list(model.policy.parameters()))
    norms = []
    original = th.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = original(parameters, max_norm, *args, **kwargs)
        after = th.norm(th.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        norms.append((len(parameters), max_norm, float(total), float(after)))
        return total

    monkeypatch.setattr(th.nn.utils, "clip_grad_norm_", recording)
    model.learn(total_timesteps=32)
    assert norms, "no gradient step was clipped"
    actor_norms = [n for n in norms if n[0] == len(actor)]
    critic_norms = [n for n in norms if n[0] == len(critic)]
    assert len(actor_norms) == len(critic_norms) == len(norms) // 2
    assert all(limit == 0.5 and after <= 0.5 + 1e-4 for _, limit, _, after in actor_norms)
    assert all(limit == 7.0 and after <= 7.0 + 1e-3 for _, limit, _, after in critic_norms)
    # on raw Pendulum rewards the critic's gradient is far larger than the actor's clip: one joint clip would have
    # scaled the actor's step by the critic's norm
    assert max(total for _, _, total, _ in critic_norms) > 7.0


def test_only_the_last_denoising_steps_are_fine_tuned(tmp_path):
    """ft_denoising_steps=K (DPPO): the first S - K steps act with a frozen copy that gets no gradient."""
    kwargs = dict(DIFFUSION_KWARGS, ft_denoising_steps=1)  # S = 3: steps 0 and 1 frozen, step 2 fine-tuned
    model = make_model("DiffusionPolicy", policy_kwargs=kwargs, learning_rate=1e-3)
    policy = model.policy
    frozen_before = {k: v.clone() for k, v in policy.frozen_denoiser.state_dict().items()}
    assert all(th.equal(v, policy.denoiser.state_dict()[k]) for k, v in frozen_before.items())
    assert not any(p.requires_grad for p in policy.frozen_denoiser.parameters())
    optimised = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert optimised.isdisjoint(id(p) for p in policy.frozen_denoiser.parameters())

    obs = th.randn(4, 3)
    chain_before = policy.sample_chain(obs, deterministic=True)
    model.learn(total_timesteps=64)
    assert all(p.grad is None for p in policy.frozen_denoiser.parameters())
    assert all(th.equal(v, frozen_before[k]) for k, v in policy.frozen_denoiser.state_dict().items())
    assert changed({k: v for k, v in frozen_before.items()}, policy.denoiser.state_dict())  # the last step learned
    chain_after = policy.sample_chain(obs, deterministic=True)
    assert th.equal(chain_after[:, :3], chain_before[:, :3])  # x_0 and the two frozen steps
    assert not th.equal(chain_after[:, 3], chain_before[:, 3])
    assert policy.evaluate_chains(obs, chain_after).step_log_prob.shape == (4, 1)

    model.save(tmp_path / "model.zip")
    loaded = UEPO.load(tmp_path / "model.zip")
    assert loaded.policy.ft_denoising_steps == 1
    assert th.equal(loaded.policy.sample_chain(obs, deterministic=True), chain_after)
    with pytest.raises(ValueError, match="ft_denoising_steps must be in"):
        make_model("DiffusionPolicy", policy_kwargs=dict(DIFFUSION_KWARGS, ft_denoising_steps=4))
