"""Probabilistic dynamics ensemble (UEPO stage 5): ``(s, a) -> (s' - s, r)`` with holdout-selected elites.

Owns: :class:`DynamicsConfig`, the stacked ensemble network :class:`DynamicsEnsemble` (its training loop
:func:`fit_dynamics`, elite selection, model steps and disagreement). Must not touch: the synthetic data
(``augmentation.py`` makes it and passes it in), termination rules (``termination.py``), policies, critics and
the pipeline that orders the stages (``pipeline.py``).

Design follows MBPO / MOPO, as used by Uni-O4 (Lei et al., ICLR 2024, code Lei-Kun/Uni-O4): ``E`` (7) Gaussian
MLPs of 4 x 200 SiLU ("Swish") units, each predicting a diagonal Gaussian over the standardised targets
``y = ((s' - s - mu_d) / sd_d, (r - mu_r) / sd_r)``, with learned soft bounds on the log-variance; trained on
bootstrap resamples with the Gaussian negative log-likelihood; the ``n_elites`` (5) members with the lowest
holdout MSE are the elites used for prediction. The members are one stacked network: every layer holds
``(E, in, out)`` weights and runs as one batched matmul (``torch.baddbmm``), never a Python loop over members.

Spaces: observations are NORMALISED with the dataset's fixed mean/std, actions are SCALED to [-1, 1] (the
project's convention); ``s' - s`` is in normalised-observation units, rewards are raw.

Shape symbols: ``E`` members, ``L`` elites, ``N`` transitions (any leading batch shape is flattened to N),
``O`` observation dim, ``A`` action dim, ``D = O + 1`` target dim (delta observation, reward).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TransitionTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (obs, actions, rewards, next_obs)


@dataclass
class DynamicsConfig:
    """Budget and architecture of the dynamics ensemble (defaults: MBPO / MOPO / Uni-O4, capped for CPU)."""

    ensemble_size: int = 7  # E: members trained in parallel
    n_elites: int = 5  # L: members with the lowest holdout MSE, used for prediction
    hidden_sizes: tuple[int, ...] = (200, 200, 200, 200)  # widths of every member's hidden layers (SiLU)
    learning_rate: float = 1e-3  # Adam
    weight_decay: float = 5e-5  # L2 on the weights of every layer (MBPO uses 2.5e-5 .. 1e-4 by depth)
    batch_size: int = 256  # per member and gradient step
    max_steps: int = 20_000  # cap on gradient steps (the budget knob of the presets)
    max_epochs: int | None = None  # optional cap on passes over the training data
    holdout_ratio: float = 0.1  # fraction of the REAL transitions held out for early stopping and elite choice
    max_holdout: int = 5_000  # cap on the holdout size
    eval_interval: int = 250  # gradient steps between holdout checks (also checked at every epoch end)
    patience: int = 8  # holdout checks without an improvement > improvement_threshold of any member -> stop
    improvement_threshold: float = 0.01  # relative holdout-MSE improvement that counts (MBPO: 1%)
    logvar_bound_coef: float = 0.01  # weight of (max_logvar - min_logvar) in the loss (keeps the bounds tight)
    max_logvar_init: float = 0.5  # initial soft upper bound of the log-variance (standardised targets)
    min_logvar_init: float = -10.0  # initial soft lower bound
    seed: int = 0  # holdout split, bootstrap resamples, initial weights
    device: str = "cpu"


# ---------------------------------------------------------------------------------------------- network
class EnsembleLinear(nn.Module):
    """``E`` independent linear layers applied as one batched matmul: ``(E, N, in) -> (E, N, out)``.

    :param ensemble_size: number of members ``E``
    :param in_features: input width
    :param out_features: output width
    """

    def __init__(self, ensemble_size: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, out_features))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Truncated normal with std ``1 / (2 sqrt(in))`` (MBPO's initialiser), zero bias."""
        std = 1.0 / (2.0 * math.sqrt(self.weight.shape[1]))
        with torch.no_grad():
            w = torch.randn(self.weight.shape, generator=generator).clamp_(-2.0, 2.0) * std
            self.weight.copy_(w)
            self.bias.zero_()

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: (E', N, in); :param members: (E',) member indices (all members when None); :return: (E', N, out)."""
        weight, bias = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        return torch.baddbmm(bias, x, weight)


class DynamicsEnsemble(nn.Module):
    """Stacked ensemble of Gaussian MLPs predicting ``(s' - s, r)`` from ``(s, a)``.

    Inputs and targets are standardised with statistics of the real training data (buffers, saved with the
    module). Each member outputs a mean and a log-variance per target dimension, the log-variance softly
    bounded by learned ``max_logvar`` / ``min_logvar`` (PETS / MBPO)::

        logvar = max_logvar - softplus(max_logvar - raw);  logvar = min_logvar + softplus(logvar - min_logvar)

    :param obs_dim: ``O``
    :param action_dim: ``A``
    :param ensemble_size: ``E``
    :param n_elites: ``L``, members used for prediction (chosen by :meth:`select_elites`)
    :param hidden_sizes: hidden widths of every member
    :param max_logvar_init: initial upper bound of the log-variance
    :param min_logvar_init: initial lower bound of the log-variance
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor
    elite_indices: torch.Tensor
    holdout_mse: torch.Tensor

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        ensemble_size: int = 7,
        n_elites: int = 5,
        hidden_sizes: Sequence[int] = (200, 200, 200, 200),
        max_logvar_init: float = 0.5,
        min_logvar_init: float = -10.0,
    ) -> None:
        super().__init__()
        if not 1 <= n_elites <= ensemble_size:
            raise ValueError(f"n_elites must be in [1, ensemble_size={ensemble_size}], got {n_elites}")
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.ensemble_size, self.n_elites = int(ensemble_size), int(n_elites)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.target_dim = self.obs_dim + 1
        widths = [self.obs_dim + self.action_dim, *self.hidden_sizes, 2 * self.target_dim]
        self.layers = nn.ModuleList(EnsembleLinear(ensemble_size, i, o) for i, o in itertools.pairwise(widths))
        self.max_logvar = nn.Parameter(torch.full((1, 1, self.target_dim), float(max_logvar_init)))
        self.min_logvar = nn.Parameter(torch.full((1, 1, self.target_dim), float(min_logvar_init)))
        self.register_buffer("input_mean", torch.zeros(widths[0]))
        self.register_buffer("input_std", torch.ones(widths[0]))
        self.register_buffer("target_mean", torch.zeros(self.target_dim))
        self.register_buffer("target_std", torch.ones(self.target_dim))
        self.register_buffer("elite_indices", torch.arange(self.n_elites))
        self.register_buffer("holdout_mse", torch.full((ensemble_size,), float("nan")))
        self._init_kwargs = dict(max_logvar_init=float(max_logvar_init), min_logvar_init=float(min_logvar_init))
        self.training_report: dict[str, Any] = {}  # filled by fit_dynamics (not saved)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, obs_dim: int, action_dim: int, config: DynamicsConfig) -> DynamicsEnsemble:
        """Build an (untrained) ensemble with the architecture of ``config``."""
        return cls(
            obs_dim,
            action_dim,
            ensemble_size=config.ensemble_size,
            n_elites=config.n_elites,
            hidden_sizes=config.hidden_sizes,
            max_logvar_init=config.max_logvar_init,
            min_logvar_init=config.min_logvar_init,
        )

    def constructor_kwargs(self) -> dict[str, Any]:
        """Arguments that rebuild this module's shape: ``DynamicsEnsemble(**kw).load_state_dict(sd)`` restores it."""
        return dict(
            obs_dim=self.obs_dim,
            action_dim=self.action_dim,
            ensemble_size=self.ensemble_size,
            n_elites=self.n_elites,
            hidden_sizes=self.hidden_sizes,
            **self._init_kwargs,
        )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for layer in self.layers:
            assert isinstance(layer, EnsembleLinear)
            layer.reset_parameters(generator)

    def set_normalizer(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor) -> None:
        """Fix the input / target standardisation from (real) training data; stds floored at 1e-4."""
        inputs = torch.cat([obs, actions], dim=-1)
        targets = self._targets(obs, rewards, next_obs)
        self.input_mean.copy_(inputs.mean(0))
        self.input_std.copy_(inputs.std(0).clamp(min=1e-4))
        self.target_mean.copy_(targets.mean(0))
        self.target_std.copy_(targets.std(0).clamp(min=1e-4))

    @staticmethod
    def _targets(obs: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return torch.cat([next_obs - obs, rewards.reshape(-1, 1)], dim=-1)

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self, obs: torch.Tensor, actions: torch.Tensor, members: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member Gaussian over the STANDARDISED targets.

        :param obs: (N, O) normalised observations, or (E', N, O) one batch per member
        :param actions: (N, A) or (E', N, A) actions in [-1, 1]
        :param members: (E',) indices of the members to run (all ``E`` when None)
        :return: mean and log-variance, both (E', N, D)
        """
        x = (torch.cat([obs, actions], dim=-1) - self.input_mean) / self.input_std
        n_members = self.ensemble_size if members is None else len(members)
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(n_members, -1, -1)
        for layer in self.layers[:-1]:
            x = F.silu(layer(x, members))
        mean, raw_logvar = self.layers[-1](x, members).chunk(2, dim=-1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw_logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    def _elite_forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(obs, actions, self.elite_indices)

    @staticmethod
    def _spread(means: torch.Tensor) -> torch.Tensor:
        """Disagreement ``max_i || mu_i - mean_j mu_j ||_2`` over the first axis: (L, N, D) -> (N,)."""
        if means.shape[0] < 2:
            return means.new_zeros(means.shape[1])
        return (means - means.mean(0, keepdim=True)).norm(dim=-1).amax(0)

    # ------------------------------------------------------------------------------------------ public API
    @torch.no_grad()
    def step(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
        elite_choice: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        with_disagreement: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One model step: every sample uses a random elite and a draw from its Gaussian (MOPO).

        Only the chosen elite is evaluated for each sample: the samples are grouped by elite into one padded
        ``(L, max_group, O + A)`` batch and run through the stacked layers at once (about the cost of one member,
        not ``L``), unless ``with_disagreement`` asks for every elite.

        :param obs: (..., O) normalised observations
        :param actions: (..., A) actions in [-1, 1]
        :param generator: torch generator for the elite choice and the Gaussian noise
        :param deterministic: use the chosen elite's mean instead of a draw
        :param elite_choice: (...,) indices in ``[0, L)`` into the elites (drawn uniformly when None); pass the
            same choice and ``noise`` for several policies to compare them with common random numbers
        :param noise: (..., D) standard normal noise (drawn when None)
        :param with_disagreement: also return ``info["disagreement"]`` (runs all elites on every sample)
        :return: next observations (..., O), rewards (...,), info with ``"elite"`` (...,) the member index used
            (and ``"disagreement"`` (...,), see :meth:`disagreement`)
        """
        batch_shape = obs.shape[:-1]
        flat_obs, flat_act = obs.reshape(-1, self.obs_dim), actions.reshape(-1, self.action_dim)
        n = flat_obs.shape[0]
        if elite_choice is None:
            elite_choice = torch.randint(0, self.n_elites, (n,), generator=generator).to(flat_obs.device)
        choice = elite_choice.reshape(-1).to(flat_obs.device).long()
        info: dict[str, torch.Tensor] = {"elite": self.elite_indices[choice].reshape(batch_shape)}
        if with_disagreement:
            means, logvars = self._elite_forward(flat_obs, flat_act)
            rows = torch.arange(n, device=flat_obs.device)
            mean, logvar = means[choice, rows], logvars[choice, rows]
            info["disagreement"] = self._spread(means).reshape(batch_shape)
        else:
            mean, logvar = self._chosen_forward(flat_obs, flat_act, choice)
        if deterministic:
            sample = mean
        else:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator).to(mean.device)
            sample = mean + (0.5 * logvar).exp() * noise.reshape(mean.shape)
        target = sample * self.target_std + self.target_mean
        next_obs = flat_obs + target[:, :-1]
        return next_obs.reshape(*batch_shape, self.obs_dim), target[:, -1].reshape(batch_shape), info

    def _chosen_forward(
        self, obs: torch.Tensor, actions: torch.Tensor, choice: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance (N, D) of elite ``choice[i]`` for every sample ``i``, in one padded stacked pass."""
        n = obs.shape[0]
        if n == 0:
            empty = obs.new_zeros(0, self.target_dim)
            return empty, empty
        counts = torch.bincount(choice, minlength=self.n_elites)
        order = torch.argsort(choice, stable=True)  # samples grouped by elite
        sorted_choice = choice[order]
        rank = torch.arange(n, device=obs.device) - (torch.cumsum(counts, 0) - counts)[sorted_choice]
        slots = torch.zeros(self.n_elites, int(counts.max()), dtype=torch.long, device=obs.device)
        slots[sorted_choice, rank] = order  # padded slots point at sample 0 and are ignored
        means, logvars = self(obs[slots], actions[slots], self.elite_indices)  # (L, max_group, D)
        mean, logvar = obs.new_empty(n, self.target_dim), obs.new_empty(n, self.target_dim)
        mean[order], logvar[order] = means[sorted_choice, rank], logvars[sorted_choice, rank]
        return mean, logvar

    @torch.no_grad()
    def disagreement(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Epistemic disagreement of the elites: ``max_i || mu_i(s, a) - mean_j mu_j(s, a) ||_2``.

        Computed on the standardised targets (every delta-observation dimension and the reward count in units
        of their std in the data), so it is scale-free across tasks.

        :param obs: (..., O); :param actions: (..., A); :return: (...,)
        """
        flat_obs, flat_act = obs.reshape(-1, self.obs_dim), actions.reshape(-1, self.action_dim)
        means, _ = self._elite_forward(flat_obs, flat_act)
        return self._spread(means).reshape(obs.shape[:-1])

    @torch.no_grad()
    def predict_mean(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Elite-averaged mean prediction: next observations (..., O) and rewards (...,)."""
        flat_obs, flat_act = obs.reshape(-1, self.obs_dim), actions.reshape(-1, self.action_dim)
        means, _ = self._elite_forward(flat_obs, flat_act)
        target = means.mean(0) * self.target_std + self.target_mean
        next_obs = flat_obs + target[:, :-1]
        return next_obs.reshape(*obs.shape[:-1], self.obs_dim), target[:, -1].reshape(obs.shape[:-1])

    @torch.no_grad()
    def score_transitions(
        self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """How much the model agrees with given transitions (used by the augmentation filter).

        :return: ``disagreement`` (N,) as in :meth:`disagreement`, and ``error`` (N,): the standardised distance
            ``|| (mean_elites(s, a) - y) ||_2`` between the elite-mean prediction and the transition's own
            standardised targets ``y = ((s' - s - mu_d) / sd_d, (r - mu_r) / sd_r)``
        """
        means, _ = self._elite_forward(obs, actions)
        target = (self._targets(obs, rewards, next_obs) - self.target_mean) / self.target_std
        return self._spread(means), (means.mean(0) - target).norm(dim=-1)

    @torch.no_grad()
    def member_mse(
        self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor
    ) -> torch.Tensor:
        """(E,) MSE of every member's mean on the standardised targets of the given transitions."""
        target = (self._targets(obs, rewards, next_obs) - self.target_mean) / self.target_std
        total = torch.zeros(self.ensemble_size, device=obs.device)
        for start in range(0, obs.shape[0], 8192):  # chunks only bound the memory
            sl = slice(start, start + 8192)
            mean, _ = self(obs[sl], actions[sl])
            total += ((mean - target[sl]) ** 2).mean(-1).sum(-1)
        return total / max(obs.shape[0], 1)

    @torch.no_grad()
    def select_elites(
        self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor
    ) -> torch.Tensor:
        """Choose the ``L`` members with the lowest MSE on the given (holdout) transitions; returns (E,) MSEs."""
        mse = self.member_mse(obs, actions, rewards, next_obs)
        self.holdout_mse.copy_(mse)
        self.elite_indices.copy_(torch.argsort(mse)[: self.n_elites].sort().values)
        return mse


# ---------------------------------------------------------------------------------------------- training
def _gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-member Gaussian NLL (constants dropped), mean over samples and dims: (E, N, D) -> (E,)."""
    return (((mean - target) ** 2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2))


def _as_float(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32, device=device)


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise ValueError(f"fit_dynamics: {name} contains NaN or inf values; clean the dataset before training the model.")


def fit_dynamics(
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    config: DynamicsConfig | None = None,
    synthetic: TransitionTensors | None = None,
    logger: Any = None,
    progress_bar: bool = True,
    init: DynamicsEnsemble | None = None,
    log_prefix: str = "dynamics",
) -> DynamicsEnsemble:
    """Train the ensemble on real (and optionally synthetic) transitions; choose the elites on a real holdout.

    The holdout (``holdout_ratio`` of the REAL data, at most ``max_holdout``) is never trained on; the synthetic
    transitions all go to the training set, so early stopping and the elites measure fit on real data only.
    Every member trains on its own bootstrap resample (with replacement) of the training set. Training stops at
    ``max_steps`` / ``max_epochs`` or after ``patience`` holdout checks in which no member improved its best
    holdout MSE by more than ``improvement_threshold`` (relative); each member is restored to its best weights.

    :param obs: (N, O) normalised observations
    :param actions: (N, A) actions in [-1, 1]
    :param rewards: (N,) rewards
    :param next_obs: (N, O) normalised next observations
    :param config: budget and architecture (defaults when None)
    :param synthetic: ``(obs, actions, rewards, next_obs)`` synthetic transitions added to the training set;
        None trains on real data only (the ablation)
    :param logger: SB3 logger (``record`` / ``dump``) or None
    :param progress_bar: show a tqdm bar over gradient steps
    :param init: an ensemble to fine-tune (its normalisation is kept); a fresh one is built when None
    :param log_prefix: key prefix of the logged values (e.g. ``"dynamics_refit"`` for the second fit)
    :return: the trained ensemble (``.training_report`` holds steps, losses, holdout MSEs, elites, seconds)
    """
    config = config or DynamicsConfig()
    device = torch.device(config.device)
    obs, actions, next_obs = (_as_float(x, device) for x in (obs, actions, next_obs))
    rewards = _as_float(rewards, device).reshape(-1)
    _check_finite("the real transitions", obs, actions, rewards, next_obs)
    n_real = obs.shape[0]
    if n_real < 2:
        raise ValueError(f"fit_dynamics needs at least 2 real transitions, got {n_real}")
    gen = torch.Generator(device="cpu").manual_seed(config.seed)

    # ---- holdout split (real only), training set = real rest + synthetic
    n_holdout = min(max(int(config.holdout_ratio * n_real), 1), config.max_holdout, n_real - 1)
    perm = torch.randperm(n_real, generator=gen).to(device)
    hold, train = perm[:n_holdout], perm[n_holdout:]
    holdout = (obs[hold], actions[hold], rewards[hold], next_obs[hold])
    train_parts = [(obs[train], actions[train], rewards[train], next_obs[train])]
    n_synthetic = 0
    if synthetic is not None:
        syn = tuple(_as_float(x, device) for x in synthetic)
        syn = (syn[0], syn[1], syn[2].reshape(-1), syn[3])
        _check_finite("the synthetic transitions", *syn)
        n_synthetic = syn[0].shape[0]
        train_parts.append(syn)  # type: ignore[arg-type]
    t_obs, t_act, t_rew, t_next = (torch.cat(parts) for parts in zip(*train_parts, strict=True))

    # ---- model
    if init is None:
        model = DynamicsEnsemble.from_config(obs.shape[1], actions.shape[1], config).to(device)
        model.reset_parameters(gen)
        model.set_normalizer(obs[train], actions[train], rewards[train], next_obs[train])
    else:
        model = copy.deepcopy(init).to(device)
    model.train()
    target = (model._targets(t_obs, t_rew, t_next) - model.target_mean) / model.target_std
    decayed = [p for name, p in model.named_parameters() if name.endswith(".weight")]
    others = [p for name, p in model.named_parameters() if not name.endswith(".weight")]  # biases, log-var bounds
    param_groups: list[dict[str, Any]] = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": others}]
    optimizer = torch.optim.Adam(param_groups, lr=config.learning_rate)

    # ---- loop: bootstrap resample per member, reshuffled every epoch
    n_train = t_obs.shape[0]
    batch = min(config.batch_size, n_train)
    bootstrap = torch.randint(0, n_train, (model.ensemble_size, n_train), generator=gen).to(device)
    steps_per_epoch = max(n_train // batch, 1)
    best_mse = model.member_mse(*holdout)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step, epoch, checks_without_improvement, last_loss = 0, 0, 0, float("nan")
    start_time = time.time()
    pbar = _progress(config.max_steps, progress_bar, desc="dynamics ensemble")
    stop = False
    while not stop:
        order = torch.argsort(torch.rand(model.ensemble_size, n_train, generator=gen), dim=1).to(device)
        shuffled = torch.gather(bootstrap, 1, order)
        for b in range(steps_per_epoch):
            idx = shuffled[:, b * batch : (b + 1) * batch]  # (E, batch)
            mean, logvar = model(t_obs[idx], t_act[idx])
            nll = _gaussian_nll(mean, logvar, target[idx])
            loss = nll.sum() + config.logvar_bound_coef * (model.max_logvar.sum() - model.min_logvar.sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            last_loss = float(nll.detach().mean())
            pbar.update(1)
            end_of_epoch = b == steps_per_epoch - 1
            if step % config.eval_interval == 0 or end_of_epoch or step >= config.max_steps:
                mse = model.member_mse(*holdout)
                improved = (best_mse - mse) / best_mse.clamp(min=1e-12) > config.improvement_threshold
                _copy_members(best_state, model.state_dict(), improved)
                best_mse = torch.where(improved, mse, best_mse)
                checks_without_improvement = 0 if bool(improved.any()) else checks_without_improvement + 1
                _log(logger, log_prefix, step, dict(train_nll=last_loss, holdout_mse=float(mse.mean()), epoch=epoch))
                pbar.set_postfix(nll=f"{last_loss:.3f}", holdout_mse=f"{float(best_mse.min()):.4f}")
                if checks_without_improvement >= config.patience or step >= config.max_steps:
                    stop = True
                    break
        epoch += 1
        if config.max_epochs is not None and epoch >= config.max_epochs:
            stop = True
    pbar.close()

    model.load_state_dict(best_state)
    model.eval()
    mse = model.select_elites(*holdout)
    model.training_report = dict(
        steps=step,
        epochs=epoch,
        seconds=time.time() - start_time,
        n_real_train=int(train.numel()),
        n_synthetic=n_synthetic,
        n_holdout=n_holdout,
        final_train_nll=last_loss,
        holdout_mse=[float(x) for x in mse],
        elites=[int(i) for i in model.elite_indices],
        elite_holdout_mse=float(mse[model.elite_indices].mean()),
        stopped_early=checks_without_improvement >= config.patience,
    )
    _log(logger, log_prefix, step, dict(elite_holdout_mse=model.training_report["elite_holdout_mse"]))
    return model


def _copy_members(best: dict[str, torch.Tensor], current: dict[str, torch.Tensor], improved: torch.Tensor) -> None:
    """Copy the improved members' slices of every stacked parameter into ``best`` (shared tensors copied whole)."""
    for key, value in current.items():
        if key.startswith("layers.") and value.shape[0] == improved.shape[0]:
            best[key][improved] = value[improved].detach()
        elif key in ("max_logvar", "min_logvar"):
            best[key].copy_(value.detach())


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from sb3_uepo.offline.config import make_progress_bar  # config imports this module: import when called

    return make_progress_bar(total, enabled, desc)


def _log(logger: Any, prefix: str, step: int, values: dict[str, float]) -> None:
    if logger is None:
        return
    for key, value in values.items():
        logger.record(f"{prefix}/{key}", value)
    logger.dump(step=step)
