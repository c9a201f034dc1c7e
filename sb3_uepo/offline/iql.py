"""Offline critics (UEPO stage 2): Implicit Q-Learning's V(s) and double Q(s, a) with target networks.

Owns: :class:`IQLCritics` (networks, the IQL update, ``advantage``) and :func:`fit_iql`. Must not touch: the policy
(IQL's advantage-weighted policy extraction is NOT used: the members are improved by offline PPO, ``offline_ppo.py``),
the data pipeline.

IQL (Kostrikov et al., ICLR 2022), as used by Uni-O4 for its advantages::

    L_V = E_{(s,a)~D} [ L_2^tau( min_i Qtarget_i(s, a) - V(s) ) ],   L_2^tau(u) = |tau - 1(u < 0)| u^2,  tau = 0.7
    L_Q = E_{(s,a,r,s')~D} sum_i ( r + gamma (1 - terminal) V(s') - Q_i(s, a) )^2
    Qtarget_i <- (1 - rho) Qtarget_i + rho Q_i   (Polyak, rho = target_update_rate)

Only true terminations stop the bootstrap (time-limit truncations do not). Rewards are used raw, so ``V`` is in the
task's reward units: OPE adds ``gamma^H V(s_H)`` to model returns in the same units.

The advantage handed to offline PPO is ``A(s, a) = min_i Q_i(s, a) - V(s)``, normalised per batch (zero mean, unit
std over the batch axis; per member when the input has a leading member axis).

The V network is ``nn.Sequential(*create_mlp(obs_dim, 1, value_net_arch, activation))`` exactly as the online policy's
value net, so ``value_state_dict()`` loads into it. Observations are normalised, actions in [-1, 1].
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from stable_baselines3.common.torch_layers import create_mlp
from torch import nn

from sb3_uepo.offline.config import OfflineConfig, activation_class, log_values, make_progress_bar


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """``|tau - 1(u < 0)| u^2`` averaged: the asymmetric L2 loss of IQL's value regression."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff**2).mean()


def make_value_net(obs_dim: int, net_arch: tuple[int, ...] | list[int], activation: str) -> nn.Sequential:
    """The value network with the online policy's exact layout (``create_mlp(obs_dim, 1, arch, act)``)."""
    return nn.Sequential(*create_mlp(obs_dim, 1, list(net_arch), activation_class(activation)))


class IQLCritics(nn.Module):
    """V(s), Q_1(s, a), Q_2(s, a) and the target Q networks.

    :param obs_dim: observation dimension ``O``
    :param action_dim: action dimension ``A``
    :param q_hidden_sizes: widths of each Q MLP (ReLU)
    :param value_net_arch: widths of the V MLP
    :param value_activation: activation name of the V MLP
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        q_hidden_sizes: tuple[int, ...] = (256, 256),
        value_net_arch: tuple[int, ...] = (256, 256),
        value_activation: str = "tanh",
    ) -> None:
        super().__init__()
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.q1 = nn.Sequential(*create_mlp(obs_dim + action_dim, 1, list(q_hidden_sizes), nn.ReLU))
        self.q2 = nn.Sequential(*create_mlp(obs_dim + action_dim, 1, list(q_hidden_sizes), nn.ReLU))
        self.q1_target = copy.deepcopy(self.q1).requires_grad_(False)
        self.q2_target = copy.deepcopy(self.q2).requires_grad_(False)
        self.value_net = make_value_net(obs_dim, value_net_arch, value_activation)
        self.value_net_arch = tuple(value_net_arch)
        self.value_activation = value_activation

    @classmethod
    def from_config(cls, obs_dim: int, action_dim: int, config: OfflineConfig) -> IQLCritics:
        return cls(obs_dim, action_dim, config.q_hidden_sizes, config.value_net_arch, config.value_activation)

    # ------------------------------------------------------------------------------------------ evaluation
    def _flat(self, obs: torch.Tensor, actions: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        flat_obs = obs.reshape(-1, self.obs_dim)
        if actions is None:
            return (flat_obs,)
        return flat_obs, actions.reshape(-1, self.action_dim)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """``V(s)``: (..., O) -> (...,)."""
        (flat,) = self._flat(obs)
        return self.value_net(flat).reshape(obs.shape[:-1])

    def q_min(self, obs: torch.Tensor, actions: torch.Tensor, target: bool = False) -> torch.Tensor:
        """``min(Q_1, Q_2)(s, a)``: (..., O), (..., A) -> (...,); ``target`` uses the target networks."""
        flat_obs, flat_act = self._flat(obs, actions)
        sa = torch.cat([flat_obs, flat_act], dim=-1)
        q1, q2 = (self.q1_target, self.q2_target) if target else (self.q1, self.q2)
        return torch.minimum(q1(sa), q2(sa)).reshape(obs.shape[:-1])

    @torch.no_grad()
    def advantage(self, obs: torch.Tensor, actions: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``A = min Q(s, a) - V(s)``, normalised over the last batch axis.

        :param obs: (..., B, O) normalised observations
        :param actions: (..., B, A) actions in [-1, 1]
        :param normalize: subtract the mean and divide by the std over ``B`` (separately for every leading index)
        :return: (..., B)
        """
        adv = self.q_min(obs, actions) - self.value(obs)
        if normalize and adv.shape[-1] > 1:
            adv = (adv - adv.mean(-1, keepdim=True)) / (adv.std(-1, keepdim=True) + 1e-8)
        return adv

    def value_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of V, loadable into ``nn.Sequential(*create_mlp(obs_dim, 1, value_net_arch, act))``."""
        return {k: v.detach().clone() for k, v in self.value_net.state_dict().items()}

    # ------------------------------------------------------------------------------------------ training
    def losses(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_obs: torch.Tensor,
        terminals: torch.Tensor,
        gamma: float,
        expectile: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """IQL's value loss and Q loss on one batch (see the module docstring)."""
        with torch.no_grad():
            target_q = self.q_min(obs, actions, target=True)
            next_v = self.value(next_obs)
            q_target = rewards + gamma * (1.0 - terminals) * next_v
        value_loss = expectile_loss(target_q - self.value(obs), expectile)
        sa = torch.cat([obs, actions], dim=-1)
        q_loss = F.mse_loss(self.q1(sa).squeeze(-1), q_target) + F.mse_loss(self.q2(sa).squeeze(-1), q_target)
        return value_loss, q_loss

    @torch.no_grad()
    def update_targets(self, rate: float) -> None:
        for net, target in ((self.q1, self.q1_target), (self.q2, self.q2_target)):
            for p, p_target in zip(net.parameters(), target.parameters(), strict=True):
                p_target.lerp_(p, rate)


def fit_iql(
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    terminals: torch.Tensor,
    config: OfflineConfig,
    logger: Any = None,
    progress_bar: bool = True,
    log_prefix: str = "offline/iql",
) -> tuple[IQLCritics, dict[str, Any]]:
    """Train IQL's critics on the dataset.

    :param obs: (N, O) normalised observations
    :param actions: (N, A) actions in [-1, 1]
    :param rewards: (N,) raw rewards
    :param next_obs: (N, O) normalised next observations
    :param terminals: (N,) 1.0 where the episode truly terminated after the transition (not on time limits)
    :param config: reads the ``iql_*`` fields, ``expectile``, ``gamma``, ``target_update_rate``, the architectures, ``seed``
    :param logger: SB3 logger or None
    :param progress_bar: show a progress bar
    :param log_prefix: key prefix of the logged values
    :return: the critics (eval mode, no grad) and a report (``steps``, final losses, ``mean_v``, ``loss_curve``, ``seconds``)
    """
    start = time.time()
    n = obs.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        critics = IQLCritics.from_config(obs.shape[1], actions.shape[1], config).to(obs.device)
    optimizer = torch.optim.Adam(
        [*critics.q1.parameters(), *critics.q2.parameters(), *critics.value_net.parameters()], lr=config.iql_lr
    )
    terminals = terminals.float()
    batch = min(config.iql_batch_size, n)
    n_steps = config.iql_steps
    log_every = max(n_steps // 20, 1)
    value_loss = q_loss = torch.tensor(float("nan"))
    curve = []
    bar = make_progress_bar(n_steps, progress_bar, "offline: IQL critics")
    for step in range(n_steps):
        idx = torch.randint(0, n, (batch,), generator=generator).to(obs.device)
        value_loss, q_loss = critics.losses(
            obs[idx], actions[idx], rewards[idx], next_obs[idx], terminals[idx], config.gamma, config.expectile
        )
        optimizer.zero_grad(set_to_none=True)
        (value_loss + q_loss).backward()
        optimizer.step()
        critics.update_targets(config.target_update_rate)
        bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == n_steps:
            values = dict(value_loss=float(value_loss.detach()), q_loss=float(q_loss.detach()))
            curve.append([step + 1, values["value_loss"], values["q_loss"]])
            bar.set_postfix(v=f"{values['value_loss']:.3f}", q=f"{values['q_loss']:.3f}")
            log_values(logger, log_prefix, values, step + 1)
    bar.close()
    critics.eval().requires_grad_(False)
    with torch.no_grad():
        sample = torch.randint(0, n, (min(n, 4096),), generator=generator).to(obs.device)
        mean_v = float(critics.value(obs[sample]).mean())
        raw_adv = critics.advantage(obs[sample], actions[sample], normalize=False)
    report = dict(
        steps=n_steps,
        final_value_loss=float(value_loss.detach()),
        final_q_loss=float(q_loss.detach()),
        mean_v=mean_v,
        dataset_advantage_mean=float(raw_adv.mean()),
        dataset_advantage_std=float(raw_adv.std()) if raw_adv.numel() > 1 else 0.0,
        loss_curve=curve,
        seconds=time.time() - start,
    )
    log_values(logger, log_prefix, dict(mean_v=mean_v), n_steps)
    return critics, report
