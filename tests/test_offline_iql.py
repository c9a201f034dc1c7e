"""IQL critics: expectile loss, the value net's online layout, advantages, learning on a toy bandit."""

import pytest
import torch
from stable_baselines3.common.torch_layers import create_mlp
from torch import nn

from sb3_uepo.offline.config import resolve_offline_config
from sb3_uepo.offline.iql import IQLCritics, expectile_loss, fit_iql


def test_expectile_loss_is_asymmetric():
    diff = torch.tensor([1.0, -1.0])
    assert float(expectile_loss(diff, 0.7)) == pytest.approx((0.7 + 0.3) / 2)
    assert float(expectile_loss(torch.tensor([2.0]), 0.7)) == pytest.approx(0.7 * 4)
    assert float(expectile_loss(torch.tensor([-2.0]), 0.7)) == pytest.approx(0.3 * 4)


def test_value_net_loads_into_the_online_layout():
    critics = IQLCritics(5, 2, (16, 16), (32, 32), "tanh")
    online = nn.Sequential(*create_mlp(5, 1, [32, 32], nn.Tanh))
    online.load_state_dict(critics.value_state_dict())
    obs = torch.randn(7, 5)
    assert torch.allclose(online(obs).squeeze(-1), critics.value(obs))


def test_advantage_is_normalised_per_member():
    torch.manual_seed(0)
    critics = IQLCritics(3, 2, (16, 16), (16, 16))
    adv = critics.advantage(torch.randn(4, 50, 3), torch.rand(4, 50, 2) * 2 - 1)
    assert adv.shape == (4, 50)
    assert torch.allclose(adv.mean(-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(adv.std(-1), torch.ones(4), atol=1e-3)
    raw = critics.advantage(torch.randn(3), torch.zeros(2), normalize=False)
    assert raw.shape == ()


def test_iql_learns_a_toy_bandit():
    torch.manual_seed(0)
    n = 2048
    obs = torch.rand(n, 1) * 2 - 1
    actions = torch.rand(n, 1) * 2 - 1
    rewards = 1.0 - (actions - obs).squeeze(-1) ** 2  # best action: a = s
    terminals = torch.ones(n)  # one-step episodes: Q = r
    config = resolve_offline_config(
        "default", dict(iql_steps=600, iql_lr=3e-3, iql_batch_size=256, q_hidden_sizes=(64, 64), value_net_arch=(64, 64))
    )
    critics, report = fit_iql(obs, actions, rewards, obs, terminals, config, progress_bar=False)
    assert report["steps"] == 600 and report["final_q_loss"] < 0.05
    test_obs = torch.rand(256, 1) * 2 - 1
    test_act = torch.rand(256, 1) * 2 - 1
    true = 1.0 - (test_act - test_obs).squeeze(-1) ** 2
    q = critics.q_min(test_obs, test_act)
    assert torch.corrcoef(torch.stack([q, true]))[0, 1] > 0.9
    # V is an upper expectile of Q over the behaviour actions: above their mean
    mean_q = 1.0 - ((torch.rand(256, 64) * 2 - 1) - test_obs) ** 2
    assert float((critics.value(test_obs) - mean_q.mean(1)).mean()) > 0.0
    assert not any(p.requires_grad for p in critics.parameters())
