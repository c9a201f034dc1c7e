"""Critic-guided refinement of the behaviour model: the critic's choice among the model's own chains, distilled."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from sb3_uepo.common.diffusion import ChainSampler, Denoiser, NoiseSchedule
from sb3_uepo.offline.iql import IQLCritics
from sb3_uepo.offline.pipeline import pretrain, stage_summary
from sb3_uepo.offline.refine import refine_behavior, select_actions

pytestmark = pytest.mark.filterwarnings("ignore:No termination rule is known")

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
ACT_SPACE = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))


@pytest.fixture
def parts():
    torch.manual_seed(0)
    denoiser = Denoiser(2, 3, (16, 16), 8).eval().requires_grad_(False)
    sampler = ChainSampler(NoiseSchedule(6), 3)
    critics = IQLCritics(3, 2, (16, 16), (16, 16), "tanh").eval()
    return denoiser, sampler, critics, torch.randn(50, 3)


def test_the_choice_is_the_best_candidate_and_one_candidate_is_the_zero_noise_action(parts):
    denoiser, sampler, critics, obs = parts
    zero = sampler.sample_chain(denoiser, obs, x_init=torch.zeros(50, 2), deterministic=True)[:, -1].clamp(-1, 1)
    only_zero, report = select_actions(denoiser, sampler, critics, obs, 1, torch.Generator().manual_seed(0))
    assert torch.allclose(only_zero, zero, atol=1e-6) and report["share_not_zero_noise"] == 0.0
    chosen, report = select_actions(denoiser, sampler, critics, obs, 8, torch.Generator().manual_seed(0), chunk=16)
    with torch.no_grad():
        q_zero, q_chosen = critics.q_min(obs, zero), critics.q_min(obs, chosen)
    assert (q_chosen >= q_zero - 1e-5).all()  # the x_0 = 0 action is a candidate: never worse in the critic's eyes
    assert report["share_not_zero_noise"] > 0 and report["q_chosen"] >= report["q_zero_noise"]
    assert chosen.abs().max() <= 1.0
    with pytest.raises(ValueError, match="n_candidates must be >= 1"):
        select_actions(denoiser, sampler, critics, obs, 0, torch.Generator())


def test_refinement_moves_a_copy_towards_the_chosen_actions(parts, tiny_config):
    denoiser, sampler, critics, obs = parts
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    config = tiny_config(refine_steps=200, refine_candidates=8, refine_lr=3e-3, behavior_ema=0.0, refine_min_gain=0.0)
    refined, report = refine_behavior(denoiser, sampler, critics, obs, config, progress_bar=False)
    assert report["applied"] is True and report["relative_gain"] >= 0
    for key, value in denoiser.state_dict().items():
        assert torch.equal(value, before[key]), key  # the behaviour model itself is untouched
    assert report["steps"] == 200 and 0 < report["share_not_zero_noise"] <= 1
    chosen, _ = select_actions(denoiser, sampler, critics, obs, 8, torch.Generator().manual_seed(config.seed + 21))
    schedule = NoiseSchedule(config.n_diffusion_steps)
    torch.manual_seed(1)
    loss_before = float(schedule.training_loss(denoiser, chosen, obs))
    torch.manual_seed(1)
    loss_after = float(schedule.training_loss(refined, chosen, obs))
    assert loss_after < loss_before  # it learned the choice
    assert not any(p.requires_grad for p in refined.parameters())


def test_the_gate_keeps_the_behaviour_model_when_the_critic_sees_little_gain(parts, tiny_config):
    denoiser, sampler, critics, obs = parts
    config = tiny_config(refine_steps=50, refine_candidates=8, refine_min_gain=1e6)
    kept, report = refine_behavior(denoiser, sampler, critics, obs, config, progress_bar=False)
    assert kept is denoiser and report["applied"] is False and report["steps"] == 0
    assert "below refine_min_gain" in report["reason"]
    with pytest.raises(ValueError, match="refine_min_gain must be >= 0"):
        tiny_config(refine_min_gain=-1.0)


def test_pipeline_hands_on_the_refined_model_and_keeps_the_behaviour_model(tiny_dataset, tiny_config):
    config = tiny_config(refine_steps=20, refine_candidates=4, refine_min_gain=0.0)
    result = pretrain(tiny_dataset(), OBS_SPACE, ACT_SPACE, config, progress_bar=False)
    refine = result.stage_reports["members"]["refine"]
    assert refine["steps"] == 20 and "share_not_zero_noise" in refine
    assert "refined in 20 steps" in stage_summary("members", result.stage_reports["members"])
    assert result.chosen_member == 0
    assert any(not torch.equal(result.policy_state_dict[k], v) for k, v in result.behavior_state_dict.items())
    plain = pretrain(tiny_dataset(), OBS_SPACE, ACT_SPACE, tiny_config(refine_steps=0), progress_bar=False)  # off
    assert "refine" not in plain.stage_reports["members"]
    for key, value in plain.behavior_state_dict.items():
        assert torch.equal(plain.policy_state_dict[key], value), key


def test_refinement_is_on_by_default_with_its_gate_and_quick_trains_the_critics_it_needs():
    from sb3_uepo.offline.config import OfflineConfig, resolve_offline_config

    assert OfflineConfig().refine_steps > 0 and OfflineConfig().refine_min_gain > 0.0
    quick = resolve_offline_config("quick")
    assert quick.refine_steps > 0 and quick.iql_steps >= 30_000  # 10k-step critics could not rank the candidates


def test_the_gate_is_estimated_on_a_subset_and_the_full_choice_made_only_when_it_passes(parts, tiny_config, monkeypatch):
    from sb3_uepo.offline import refine

    denoiser, sampler, critics, obs = parts
    calls = []
    original = refine.select_actions

    def counting(denoiser, sampler, critics, states, *args, **kwargs):
        calls.append(states.shape[0])
        return original(denoiser, sampler, critics, states, *args, **kwargs)

    monkeypatch.setattr(refine, "select_actions", counting)
    skip = tiny_config(refine_steps=20, refine_candidates=8, refine_min_gain=1e6, refine_gate_states=16)
    kept, report = refine.refine_behavior(denoiser, sampler, critics, obs, skip, progress_bar=False)
    assert kept is denoiser and calls == [16] and report["gate_states"] == 16  # no choice on every state
    calls.clear()
    subset = tiny_config(refine_steps=20, refine_candidates=8, refine_min_gain=0.0, refine_gate_states=16)
    torch.manual_seed(3)  # the fine-tuning's own draws (the pipeline seeds every stage)
    refined, report = refine.refine_behavior(denoiser, sampler, critics, obs, subset, progress_bar=False)
    assert calls == [16, 50] and report["applied"] and "relative_gain_all_states" in report
    # the refinement's targets (every state's choice) do not depend on the gate's subset: the same weights as without it
    every = tiny_config(refine_steps=20, refine_candidates=8, refine_min_gain=0.0, refine_gate_states=0)
    torch.manual_seed(3)
    same, _ = refine.refine_behavior(denoiser, sampler, critics, obs, every, progress_bar=False)
    for key, value in refined.state_dict().items():
        assert torch.equal(value, same.state_dict()[key]), key
    with pytest.raises(ValueError, match="refine_gate_states must be >= 0"):
        tiny_config(refine_gate_states=-1)
