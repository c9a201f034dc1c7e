"""Learning check of the offline phase (slow): on the embedded Hopper dataset, the member UEPO chooses by OPE alone
scores above plain diffusion BC (the behaviour model of the same run) in the real environment."""

import pytest
import torch as th

from sb3_uepo import UEPO
from sb3_uepo.common.datasets import load_dataset
from sb3_uepo.common.evaluation import evaluate
from sb3_uepo.offline.pipeline import pretrain


@pytest.mark.slow
def test_offline_chosen_uepo_beats_diffusion_bc_on_hopper():
    th.set_num_threads(2)
    dataset = load_dataset("hopper-medium-v0")
    model = UEPO("DiffusionPolicy", "Hopper-v5", dataset=dataset, preset="quick", seed=0)
    result = pretrain(dataset, model.observation_space, model.action_space, model.offline_config(), progress_bar=False)
    model.load_offline_result(result)
    bc = UEPO("DiffusionPolicy", "Hopper-v5", dataset=dataset, preset="quick", seed=0)
    bc.load_offline_result(result, member="behavior")
    uepo_score = evaluate(model, "Hopper-v5", n_episodes=10, deterministic=True, seed=123, dataset=dataset)
    bc_score = evaluate(bc, "Hopper-v5", n_episodes=10, deterministic=True, seed=123, dataset=dataset)
    print(f"UEPO (member {result.chosen_member}): {uepo_score.summary()}\ndiffusion BC: {bc_score.summary()}")
    assert uepo_score.normalized_mean > bc_score.normalized_mean, (uepo_score, bc_score)
