"""The offline phase end to end on tiny generated data: results, resume after an interruption, bad input."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.torch_layers import create_mlp
from torch import nn

from sb3_uepo.offline import pipeline as pipeline_module
from sb3_uepo.offline.config import resolve_offline_config
from sb3_uepo.offline.offline_ppo import OfflinePolicyImprovement
from sb3_uepo.offline.pipeline import STAGES, OfflinePretrainer, OfflineResult, pretrain

pytestmark = pytest.mark.filterwarnings("ignore:No termination rule is known")

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
ACT_SPACE = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))


@pytest.fixture
def run_pipeline(tiny_dataset, tiny_config):
    """``run_pipeline(dataset=None, config=None, **kwargs)``: the offline phase on the tiny data and settings."""

    def run(dataset=None, config=None, **kwargs):
        return pretrain(dataset or tiny_dataset(), OBS_SPACE, ACT_SPACE, config or tiny_config(), progress_bar=False, **kwargs)

    return run


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """The offline phase must never build (let alone step) an environment."""

    def forbidden(*args, **kwargs):
        raise AssertionError("an environment was created during offline pretraining")

    monkeypatch.setattr(gym, "make", forbidden)
    monkeypatch.setattr(gym.Env, "step", forbidden)


def test_pretrain_end_to_end(tmp_path, run_pipeline):
    result = run_pipeline(checkpoint_dir=tmp_path / "ckpt")
    assert 0 <= result.chosen_member < 2 and "OPE" in result.chosen_reason
    assert result.policy_type == "diffusion" and result.seed_noise.shape == (2,)
    assert len(result.initial_ope_scores) == 2 and len(result.best_ope_scores) == 2
    assert [h["step"] for h in result.ope_history] == [0, 3, 6]
    assert set(result.stage_reports) == {"behavior", "iql", "dynamics", "members", "offline_ppo"}
    assert "augmentation" in result.stage_reports["dynamics"]
    # handoff: the policy, the behaviour model and V load into plain modules of the online layout
    policy = result.build_policy()
    assert policy.action_dim == 2 and result.build_behavior() is not None
    value = nn.Sequential(*create_mlp(3, 1, [16, 16], nn.Tanh))
    value.load_state_dict(result.value_state_dict)
    sampler = result.build_sampler()
    obs = torch.as_tensor(result.normalize_obs(np.zeros((4, 3))))
    with torch.no_grad():
        chain = sampler.sample_chain(policy, obs, x_init=result.seed_noise, deterministic=True)
    env_action = result.unscale_action(chain[:, -1].numpy())
    assert (env_action >= ACT_SPACE.low - 1e-6).all() and (env_action <= ACT_SPACE.high + 1e-6).all()
    # the report is JSON and the result round-trips
    json.dumps(result.to_report())
    result.save(tmp_path / "result.pt")
    loaded = OfflineResult.load(tmp_path / "result.pt")
    assert loaded.chosen_member == result.chosen_member
    assert torch.equal(loaded.policy_state_dict["net.0.weight"], result.policy_state_dict["net.0.weight"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "progress.json",
        "stage_behavior.pt",
        "stage_dynamics.pt",
        "stage_iql.pt",
        "stage_members.pt",
        "stage_offline_ppo.pt",
    ]


def test_uni_o4_variant_runs_through_the_same_code(run_pipeline, tiny_config):
    result = run_pipeline(config=tiny_config("quick+uni_o4"))
    assert result.policy_type == "gaussian" and result.seed_noise is None and result.behavior_state_dict is None
    assert "skipped" in result.stage_reports["behavior"] and "skipped" in result.stage_reports["dynamics"]
    assert "mean IQL Q" in result.chosen_reason and "OPE best scores" in result.chosen_reason
    actor = result.build_policy()
    mean, log_std = actor(torch.zeros(1, 3))
    assert mean.shape == (1, 2) and log_std.shape == (2,)


def test_bc_variant_is_one_gaussian_mlp_by_maximum_likelihood(run_pipeline, tiny_offline):
    tiny = {k: v for k, v in tiny_offline.items() if k not in ("n_members", "ppo_steps", "offline_improvement")}
    result = run_pipeline(config=resolve_offline_config("quick+bc", {**tiny, "gaussian_bc_steps": 200}))
    assert result.policy_type == "gaussian" and len(result.member_state_dicts) == 1
    assert result.stage_reports["offline_ppo"]["steps"] == 0  # no policy improvement: the floor
    for key, value in result.initial_member_state_dicts[0].items():
        assert torch.equal(value, result.policy_state_dict[key]), key  # handed on as cloned
    nll = result.stage_reports["members"]["loss_curve"]
    assert nll[-1][1] < nll[0][1]  # the likelihood improved
    config = resolve_offline_config("quick+bc")
    assert (config.gaussian_bc_steps, config.gaussian_bc_lr, config.gaussian_bc_batch_size) == (10_000, 1e-3, 100)


def test_resume_after_an_interruption_redoes_no_completed_stage(tmp_path, monkeypatch, run_pipeline):
    reference = run_pipeline()
    ckpt = tmp_path / "ckpt"

    def crash(self):
        raise RuntimeError("simulated crash in the members stage")

    with monkeypatch.context() as patch:
        patch.setattr(OfflinePretrainer, "_stage_members", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_pipeline(checkpoint_dir=ckpt)
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["completed"] == ["behavior", "iql", "dynamics"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a completed stage was trained again")

    monkeypatch.setattr(pipeline_module, "fit_behavior_model", must_not_run)
    monkeypatch.setattr(pipeline_module, "fit_iql", must_not_run)
    import sb3_uepo.offline.dynamics as dynamics_module

    monkeypatch.setattr(dynamics_module, "fit_dynamics", must_not_run)
    resumed = run_pipeline(checkpoint_dir=ckpt)
    # nothing lost: the resumed run equals an uninterrupted one
    assert resumed.chosen_member == reference.chosen_member
    for key, value in reference.policy_state_dict.items():
        assert torch.allclose(resumed.policy_state_dict[key], value, atol=1e-5), key
    assert resumed.best_ope_scores == pytest.approx(reference.best_ope_scores, rel=1e-4)


def test_resume_inside_offline_ppo(tmp_path, monkeypatch, run_pipeline):
    reference = run_pipeline()
    ckpt = tmp_path / "ckpt"
    original = OfflinePolicyImprovement.train_step

    def crash_at_step_4(self):
        if self.step_count == 4:
            raise RuntimeError("simulated crash during offline PPO")
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(OfflinePolicyImprovement, "train_step", crash_at_step_4)
        with pytest.raises(RuntimeError, match="during offline PPO"):
            run_pipeline(checkpoint_dir=ckpt)
    partial = torch.load(ckpt / "stage_offline_ppo.partial.pt", weights_only=False)
    assert partial["step_count"] == 3  # the checkpoint of the OPE at step 3

    steps_run = []

    def counting(self):
        steps_run.append(self.step_count)
        return original(self)

    monkeypatch.setattr(OfflinePolicyImprovement, "train_step", counting)
    resumed = run_pipeline(checkpoint_dir=ckpt)
    assert steps_run == [3, 4, 5]
    assert not (ckpt / "stage_offline_ppo.partial.pt").exists()
    for key, value in reference.policy_state_dict.items():
        assert torch.allclose(resumed.policy_state_dict[key], value, atol=1e-5), key


def test_by_default_the_behaviour_model_is_handed_on_without_offline_ppo(run_pipeline, tiny_config):
    """No offline PPO by default: the behaviour model (here unrefined: refine_steps=0) is the policy handed on."""
    result = run_pipeline(config=tiny_config(offline_improvement=False, refine_steps=0))
    assert result.stage_reports["offline_ppo"]["steps"] == 0 and "offline improvement is off" in result.chosen_reason
    assert "skipped" in result.stage_reports["dynamics"]  # no OPE rollouts: no model
    assert result.chosen_member == 0 and torch.equal(result.seed_noise, torch.zeros(2))
    for key, value in result.behavior_state_dict.items():
        assert torch.equal(result.policy_state_dict[key], value), key
    assert resolve_offline_config("quick").offline_improvement is False
    assert resolve_offline_config("quick+uni_o4").offline_improvement is True


def test_changed_config_in_the_same_checkpoint_dir_is_refused(tmp_path, run_pipeline, tiny_config):
    run_pipeline(config=tiny_config(ppo_steps=0), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different config or dataset"):
        run_pipeline(config=tiny_config(ppo_steps=0, behavior_lr=1e-3), checkpoint_dir=tmp_path)
    result = run_pipeline(config=tiny_config(ppo_steps=3, behavior_lr=1e-3), checkpoint_dir=tmp_path, resume=False)
    assert result.ope_history[-1]["step"] == 3


def test_changing_only_later_settings_reuses_the_behaviour_model(tmp_path, run_pipeline, tiny_config, monkeypatch):
    """A new critic budget or refinement needs no new behaviour model (the costliest stage); the critics are refitted."""
    first = run_pipeline(config=tiny_config(ppo_steps=0), checkpoint_dir=tmp_path)
    calls = []

    def must_not_run(*args, **kwargs):
        raise AssertionError("the behaviour model was trained again")

    fit_iql = pipeline_module.fit_iql
    monkeypatch.setattr(pipeline_module, "fit_behavior_model", must_not_run)
    monkeypatch.setattr(pipeline_module, "fit_iql", lambda *a, **k: calls.append(1) or fit_iql(*a, **k))
    later = tiny_config(ppo_steps=0, iql_steps=30, refine_steps=5, refine_min_gain=0.0)
    second = run_pipeline(config=later, checkpoint_dir=tmp_path)
    assert calls == [1] and second.stage_reports["iql"]["steps"] == 30 and "refine" in second.stage_reports["members"]
    for key, value in first.behavior_state_dict.items():
        assert torch.equal(second.behavior_state_dict[key], value), key
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["config"]["iql_steps"] == 30 and progress["completed"][-1] == "offline_ppo"


def test_changing_only_offline_ppo_settings_reuses_the_earlier_stages(tmp_path, run_pipeline, tiny_config, monkeypatch):
    """An ablation of offline PPO's regularisers needs no new behaviour model, critics or dynamics."""
    first = run_pipeline(config=tiny_config(), checkpoint_dir=tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a stage before offline PPO was trained again")

    monkeypatch.setattr(pipeline_module, "fit_behavior_model", must_not_run)
    monkeypatch.setattr(pipeline_module, "fit_iql", must_not_run)
    ablation = run_pipeline(config=tiny_config(use_divergence=False, kl_coef=0.5, ppo_steps=3), checkpoint_dir=tmp_path)
    assert ablation.ope_history[-1]["step"] == 3 and first.ope_history[-1]["step"] == 6
    for key, value in first.behavior_state_dict.items():
        assert torch.equal(ablation.behavior_state_dict[key], value), key
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["config"]["use_divergence"] is False and progress["completed"][-1] == "offline_ppo"


def test_dataset_too_small_for_the_segment_length(run_pipeline, tiny_config, tiny_dataset):
    with pytest.raises(ValueError, match=r"too small for the segment length T=8"):
        run_pipeline(dataset=tiny_dataset(n_episodes=4, length=5), config=tiny_config(segment_length=8))


def test_nan_rewards_are_a_clear_error(run_pipeline, tiny_dataset):
    dataset = tiny_dataset()
    dataset.rewards[7] = np.nan
    with pytest.raises(ValueError, match=r"field 'rewards' holds NaN.*first at index 7"):
        run_pipeline(dataset=dataset)


def test_mismatched_spaces_are_a_clear_error(tiny_config, tiny_dataset):
    with pytest.raises(ValueError, match="'observations' has 3 values per step"):
        pretrain(tiny_dataset(), gym.spaces.Box(-1, 1, (5,)), ACT_SPACE, tiny_config(), progress_bar=False)
    with pytest.raises(ValueError, match="must be a gymnasium Box"):
        pretrain(tiny_dataset(), OBS_SPACE, gym.spaces.Discrete(2), tiny_config(), progress_bar=False)


def test_stages_log_to_the_sb3_logger(tmp_path, run_pipeline):
    from stable_baselines3.common.logger import configure

    logger = configure(str(tmp_path / "log"), ["csv"])
    run_pipeline(logger=logger)
    header = (tmp_path / "log" / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("offline/behavior/loss", "offline/iql/value_loss", "offline/offline_ppo/policy_loss", "offline/ope/score_0"):
        assert key in header, key
    assert any(k.startswith("offline/dynamics/") for k in header)


@pytest.mark.parametrize("where", ["episode_starts", "any"])
def test_ope_starts_where_the_config_says(monkeypatch, where, tiny_config, tiny_dataset):
    """``ope_start_states``: the OPE rollouts start from dataset episode starts (the task's objective) or any state,
    undiscounted without V by default, with the configured uncertainty penalty."""
    from sb3_uepo.offline import ope as ope_module

    calls = []
    real_ope = ope_module.offline_policy_evaluation

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real_ope(*args, **kwargs)

    monkeypatch.setattr(ope_module, "offline_policy_evaluation", spy)
    dataset = tiny_dataset()
    pretrainer = OfflinePretrainer(dataset, OBS_SPACE, ACT_SPACE, tiny_config(ope_start_states=where), progress_bar=False)
    pretrainer.run()
    assert calls
    (_, _, start_obs, horizon, discount), kwargs = calls[0][0][:5], calls[0][1]
    assert (horizon, discount, kwargs["value_fn"], kwargs["uncertainty_penalty"]) == (4, 1.0, None, 1.0)
    first_states = pretrainer.data.obs[pretrainer.data.episode_starts]
    is_start = (start_obs.unsqueeze(1) == first_states.unsqueeze(0)).all(-1).any(1)
    if where == "episode_starts":
        assert is_start.all()
    else:
        assert not is_start.all()  # 8 uniform draws from 200 states, 8 of them episode starts


def test_top_episodes_mask_keeps_the_best_episodes(tiny_dataset):
    from sb3_uepo.offline.behavior import top_episodes_mask

    data = tiny_dataset(n_episodes=6, length=5)
    returns, slices = data.episode_returns(), data.episode_slices()
    mask = top_episodes_mask(data, 0.5)
    kept = [i for i, episode in enumerate(slices) if mask[episode].all()]
    assert sorted(kept) == sorted(np.argsort(-returns)[:3].tolist()) and mask.sum() == 15
    assert top_episodes_mask(data, 1.0).all() and top_episodes_mask(data, 0.01).sum() == 5  # at least one episode
    with pytest.raises(ValueError, match="fraction"):
        top_episodes_mask(data, 0.0)


def test_behaviour_model_on_the_best_episodes_only(run_pipeline, tiny_config, monkeypatch):
    """%BC: the behaviour model sees the top share of episodes; the critics still see every transition."""
    seen = {}
    original_behavior, original_iql = pipeline_module.fit_behavior_model, pipeline_module.fit_iql

    def behavior(obs, actions, *args, **kwargs):
        seen["behavior"] = obs.shape[0]
        return original_behavior(obs, actions, *args, **kwargs)

    def iql(obs, *args, **kwargs):
        seen["iql"] = obs.shape[0]
        return original_iql(obs, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "fit_behavior_model", behavior)
    monkeypatch.setattr(pipeline_module, "fit_iql", iql)
    result = run_pipeline(config=tiny_config(behavior_top_fraction=0.25))
    assert seen == {"behavior": 2 * 25, "iql": 8 * 25}  # tiny data: 8 episodes of 25 steps
    assert result.stage_reports["behavior"]["transitions"] == 50
    with pytest.raises(ValueError, match="behavior_top_fraction"):
        tiny_config(behavior_top_fraction=1.5)


def test_a_setting_added_later_keeps_older_checkpoints_valid_at_their_value(tiny_config, tiny_dataset, monkeypatch):
    """A config field added after checkpoints existed enters the fingerprint only away from the value those
    checkpoints were computed with (pipeline.LATER_FIELDS), whatever the field's default is."""
    from sb3_uepo.offline.config import OfflineConfig

    data = tiny_dataset()

    def fingerprint(config):
        return OfflinePretrainer(data, OBS_SPACE, ACT_SPACE, config, progress_bar=False).fingerprint

    later = pipeline_module.LATER_FIELDS
    legacy = fingerprint(tiny_config(**later))
    other = dict(behavior_top_fraction=0.5, refine_steps=5, refine_candidates=4, refine_lr=1e-3, refine_min_gain=0.0)
    other["refine_gate_states"] = 9
    assert set(other) == set(later)
    changed = {fingerprint(tiny_config(**{**later, name: value})) for name, value in other.items()}
    to_dict = OfflineConfig.to_dict

    def without_later_fields(self):  # the config as it was before these fields existed
        return {k: v for k, v in to_dict(self).items() if k not in pipeline_module.LATER_FIELDS}

    with monkeypatch.context() as patch:
        patch.setattr(OfflineConfig, "to_dict", without_later_fields)
        before = fingerprint(tiny_config())
    assert later["behavior_top_fraction"] == 1.0 and later["refine_steps"] == 0
    assert legacy == before and before not in changed and len(changed) == len(other)
    # Gaussian members have no behaviour model: its later-added settings never change their fingerprint
    gaussian = [fingerprint(tiny_config("quick+uni_o4", behavior_top_fraction=f)) for f in (1.0, 0.5)]
    assert gaussian[0] == gaussian[1]


def _same_result(a, b):
    assert a.chosen_member == b.chosen_member and a.best_ope_scores == b.best_ope_scores
    for left, right in (
        (a.policy_state_dict, b.policy_state_dict),
        (a.value_state_dict, b.value_state_dict),
        (a.behavior_state_dict or {}, b.behavior_state_dict or {}),
    ):
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("preset", ["quick", "quick+uni_o4"])
def test_independent_stages_side_by_side_give_the_same_result(tmp_path, run_pipeline, tiny_config, preset, capsys):
    """Behaviour model, critics and dynamics (diffusion) or critics and Gaussian members (uni_o4) in worker processes:
    the same weights, OPE scores and choice as one by one in this process, with the same torch thread count."""
    from stable_baselines3.common.logger import configure

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        in_order = run_pipeline(config=tiny_config(preset))
        logger = configure(str(tmp_path / "log"), ["csv"])
        side_by_side = run_pipeline(
            config=tiny_config(preset), n_jobs=3, checkpoint_dir=tmp_path / "ckpt", logger=logger, verbose=1
        )
    finally:
        torch.set_num_threads(threads)
    names = "behavior, iql, dynamics" if preset == "quick" else "iql, members"
    assert f"training {names} side by side in {len(names.split(', '))} worker processes" in capsys.readouterr().out
    _same_result(in_order, side_by_side)
    assert set(side_by_side.seconds) == set(STAGES)
    header = (tmp_path / "log" / "progress.csv").read_text().splitlines()[0].split(",")
    assert "offline/iql/value_loss" in header  # what the workers logged reaches the parent's logger
    # the checkpoints of a side-by-side run resume like any other
    again = run_pipeline(config=tiny_config(preset), checkpoint_dir=tmp_path / "ckpt")
    _same_result(side_by_side, again)


def test_side_by_side_stages_draw_their_progress_bars_in_the_parent(tiny_config, tiny_dataset, capsys):
    result = pretrain(tiny_dataset(), OBS_SPACE, ACT_SPACE, tiny_config(), progress_bar=True, n_jobs=2, verbose=1)
    captured = capsys.readouterr()
    assert "training behavior, iql, dynamics side by side in 2 worker processes" in captured.out
    assert "offline: IQL critics" in captured.err and "offline: behaviour diffusion" in captured.err
    assert result.chosen_member in (0, 1)


def test_n_jobs_must_be_positive(tiny_config, tiny_dataset):
    with pytest.raises(ValueError, match="n_jobs must be >= 1"):
        OfflinePretrainer(tiny_dataset(), OBS_SPACE, ACT_SPACE, tiny_config(), n_jobs=0)


def test_broken_worker_processes_fall_back_to_one_by_one(run_pipeline, tiny_config, monkeypatch):
    from sb3_uepo.offline import parallel

    def broken(*args, **kwargs):
        raise parallel.WorkerError("the worker of stage 'behavior' stopped (exit code 1)")

    monkeypatch.setattr(parallel, "run_side_by_side", broken)
    with pytest.warns(UserWarning, match="if __name__ == '__main__'"):
        result = run_pipeline(config=tiny_config(), n_jobs=2)
    assert set(result.seconds) == set(STAGES)
