"""Learning check of the offline phase (slow): on the embedded Hopper dataset, UEPO's offline policy clears the floor,
plain Gaussian behaviour cloning (the ``bc`` variant, same budget and data), by 5 normalised points, and acts
deterministically exactly as its behaviour diffusion model does (offline improvement is off by default)."""

import pytest
import torch as th
from gymnasium.wrappers import RescaleAction
from stable_baselines3.common.env_util import make_vec_env

from sb3_uepo import UEPO
from sb3_uepo.common.datasets import load_dataset
from sb3_uepo.common.evaluation import evaluate
from sb3_uepo.offline.pipeline import pretrain


@pytest.mark.slow
def test_offline_uepo_clears_plain_bc_on_hopper():
    th.set_num_threads(2)
    dataset = load_dataset("hopper-medium-v0")
    model = UEPO("DiffusionPolicy", "Hopper-v5", dataset=dataset, preset="quick", seed=0)
    result = pretrain(dataset, model.observation_space, model.action_space, model.offline_config(), progress_bar=False)
    model.load_offline_result(result)
    behavior = UEPO("DiffusionPolicy", "Hopper-v5", dataset=dataset, preset="quick", seed=0)
    behavior.load_offline_result(result, member="behavior")
    env = make_vec_env(
        "Hopper-v5", n_envs=1, wrapper_class=RescaleAction, wrapper_kwargs=dict(min_action=-1.0, max_action=1.0)
    )
    bc = UEPO("MlpPolicy", env, dataset=dataset, preset="quick+bc", seed=0)
    bc.pretrain()
    scores = {
        name: evaluate(m, "Hopper-v5", n_episodes=10, deterministic=True, seed=123, dataset=dataset)
        for name, m in (("uepo", model), ("behavior", behavior), ("bc", bc))
    }
    print("\n".join(f"{name}: {score.summary()}" for name, score in scores.items()))
    assert scores["uepo"].returns == scores["behavior"].returns
    assert scores["uepo"].normalized_mean >= scores["bc"].normalized_mean + 5.0, scores
