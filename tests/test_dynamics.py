"""Dynamics ensemble: stacked layer, fit on a known linear system, holdout elites, model steps, save/load."""

import pytest
import torch

from sb3_uepo.offline.dynamics import DynamicsConfig, DynamicsEnsemble, EnsembleLinear, fit_dynamics

OBS_DIM, ACT_DIM = 3, 2
A_MAT = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.95]])
B_MAT = torch.tensor([[0.5, 0.0], [0.0, 0.3], [0.2, -0.4]])


def linear_system(n: int, seed: int = 0, noise: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, OBS_DIM, generator=g)
    act = torch.rand(n, ACT_DIM, generator=g) * 2 - 1
    next_obs = obs @ A_MAT.T + act @ B_MAT.T + noise * torch.randn(n, OBS_DIM, generator=g)
    rew = obs[:, 0] - 0.5 * act[:, 1]
    return obs, act, rew, next_obs


SMALL = DynamicsConfig(hidden_sizes=(64, 64), max_steps=1200, batch_size=128, eval_interval=200)


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    return fit_dynamics(*linear_system(2000), SMALL, progress_bar=False)


def test_ensemble_linear_equals_per_member_matmul():
    layer = EnsembleLinear(4, 5, 3)
    layer.reset_parameters(torch.Generator().manual_seed(0))
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(4, 7, 5)
    expected = torch.stack([x[e] @ layer.weight[e] + layer.bias[e] for e in range(4)])
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x[[1, 3]], torch.tensor([1, 3])), expected[[1, 3]])


def test_fits_linear_dynamics(fitted):
    obs, act, rew, _ = linear_system(500, seed=1)
    pred_next, pred_rew = fitted.predict_mean(obs, act)
    true_next = obs @ A_MAT.T + act @ B_MAT.T
    assert (pred_next - true_next).abs().mean() < 0.03
    assert (pred_rew - rew).abs().mean() < 0.03
    report = fitted.training_report
    assert report["n_holdout"] == 200 and report["n_real_train"] == 1800 and report["n_synthetic"] == 0
    assert report["elite_holdout_mse"] < 0.01


def test_elites_are_the_best_holdout_members(fitted):
    model = DynamicsEnsemble(**fitted.constructor_kwargs())
    model.load_state_dict(fitted.state_dict())
    assert torch.equal(model.elite_indices, torch.argsort(model.holdout_mse)[:5].sort().values)
    with torch.no_grad():  # sabotage two members: they must leave the elites
        for layer in model.layers:
            layer.weight[[0, 2]] += torch.randn_like(layer.weight[[0, 2]])
    mse = model.select_elites(*linear_system(300, seed=2))
    assert mse[0] > mse[1] and mse[2] > mse[1]
    assert set(model.elite_indices.tolist()) == {1, 3, 4, 5, 6}


def test_step_shapes_random_elites_and_determinism(fitted):
    obs, act, _, _ = linear_system(400, seed=3)
    obs, act = obs.reshape(4, 100, OBS_DIM), act.reshape(4, 100, ACT_DIM)
    next_obs, rew, info = fitted.step(obs, act, generator=torch.Generator().manual_seed(0))
    assert next_obs.shape == (4, 100, OBS_DIM) and rew.shape == (4, 100)
    assert set(info["elite"].unique().tolist()) == set(fitted.elite_indices.tolist())  # every elite gets used
    again, _, _ = fitted.step(obs, act, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(next_obs, again)
    # the grouped path (only the chosen elite runs) equals running every elite and picking
    full, full_rew, full_info = fitted.step(obs, act, generator=torch.Generator().manual_seed(0), with_disagreement=True)
    torch.testing.assert_close(next_obs, full)
    torch.testing.assert_close(rew, full_rew)
    assert full_info["disagreement"].shape == (4, 100)
    torch.testing.assert_close(full_info["disagreement"], fitted.disagreement(obs, act))
    mean_next, _, _ = fitted.step(obs, act, deterministic=True)
    assert (next_obs - mean_next).abs().mean() < 0.05  # the learned noise is small (data noise 0.01)


def test_disagreement_grows_off_the_data(fitted):
    obs, act, _, _ = linear_system(300, seed=4)
    inside = fitted.disagreement(obs, act).median()
    outside = fitted.disagreement(obs * 8, act).median()
    assert outside > 5 * inside


def test_synthetic_data_is_trained_on_and_holdout_is_real_only():
    real = linear_system(600, seed=5)
    synthetic = linear_system(400, seed=6)
    cfg = DynamicsConfig(hidden_sizes=(32,), max_steps=50, batch_size=64, ensemble_size=3, n_elites=2)
    model = fit_dynamics(*real, cfg, synthetic=synthetic, progress_bar=False)
    assert model.training_report["n_synthetic"] == 400
    assert model.training_report["n_holdout"] == 60 and model.training_report["n_real_train"] == 540
    tuned = fit_dynamics(*real, cfg, synthetic=synthetic, progress_bar=False, init=model)
    torch.testing.assert_close(tuned.target_std, model.target_std)  # fine-tuning keeps the normalisation


def test_bad_input_is_rejected():
    obs, act, rew, next_obs = linear_system(100)
    rew[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_dynamics(obs, act, rew, next_obs, SMALL, progress_bar=False)
    with pytest.raises(ValueError, match="n_elites"):
        DynamicsEnsemble(3, 2, ensemble_size=3, n_elites=5)
