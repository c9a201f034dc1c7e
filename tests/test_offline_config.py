"""Offline config: presets, overrides, clear errors."""

import json

import pytest

from sb3_uepo.offline.config import PRESETS, OfflineConfig, resolve_offline_config


@pytest.mark.parametrize("preset", ["quick", "default", "paper", "uni_o4", "quick+uni_o4", "paper+uni_o4"])
def test_every_preset_resolves_and_is_json(preset):
    config = resolve_offline_config(preset)
    assert isinstance(config, OfflineConfig)
    json.dumps(config.to_dict())


def test_budgets_grow_from_quick_to_paper():
    quick, default, paper = (resolve_offline_config(p) for p in ("quick", "default", "paper"))
    for name in ("behavior_steps", "iql_steps", "ppo_steps"):
        assert getattr(quick, name) < getattr(default, name) < getattr(paper, name), name
    assert quick.dynamics.max_steps < default.dynamics.max_steps < paper.dynamics.max_steps


def test_uni_o4_switches():
    config = resolve_offline_config("quick+uni_o4")
    assert config.policy_type == "gaussian" and config.uni_o4_diversity
    assert not (config.use_divergence or config.use_perturbation or config.use_kl or config.augment)
    assert config.ope_score == "mean_q" and not config.needs_dynamics
    assert config.iql_steps == resolve_offline_config("quick").iql_steps  # same budget as UEPO's quick


def test_overrides_flat_dotted_and_nested():
    config = resolve_offline_config(
        "quick", {"tau": 0.5, "dynamics.max_steps": 7, "augmentation": {"ratio": 2.0}, "denoiser_hidden_sizes": [64, 64]}
    )
    assert config.tau == 0.5 and config.dynamics.max_steps == 7 and config.augmentation.ratio == 2.0
    assert config.denoiser_hidden_sizes == (64, 64)
    assert resolve_offline_config("quick").dynamics.max_steps != 7  # presets are not mutated
    copy = resolve_offline_config(config, {"n_members": 2})
    assert copy.n_members == 2 and config.n_members == 4


def test_unknown_key_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown offline config key 'ppo_step'.*Did you mean 'ppo_steps'"):
        resolve_offline_config("quick", {"ppo_step": 10})
    with pytest.raises(ValueError, match=r"Unknown offline config key 'dynamics.max_step'"):
        resolve_offline_config("quick", {"dynamics.max_step": 10})


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown offline preset 'fast'.*quick"):
        resolve_offline_config("fast")
    assert set(PRESETS) == {"quick", "default", "paper", "uni_o4", "bc"}


def test_inconsistent_values_are_refused():
    with pytest.raises(ValueError, match="expectile"):
        resolve_offline_config("quick", {"expectile": 1.5})
    with pytest.raises(ValueError, match="segment_length"):
        resolve_offline_config("quick", {"segment_length": 1})
    with pytest.raises(ValueError, match="need diffusion members"):
        resolve_offline_config("quick", {"policy_type": "gaussian"})
    with pytest.raises(ValueError, match="ope_score"):
        resolve_offline_config("quick", {"ope_score": "real_env"})
    with pytest.raises(ValueError, match="ope_start_states"):
        resolve_offline_config("quick", {"ope_start_states": "resets"})
    with pytest.raises(ValueError, match="ope_discount"):
        resolve_offline_config("quick", {"ope_discount": 0.0})
    with pytest.raises(ValueError, match="ope_uncertainty_penalty"):
        resolve_offline_config("quick", {"ope_uncertainty_penalty": -1.0})
