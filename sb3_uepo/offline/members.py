"""Multi-seed sub-policies (UEPO stage 3), held and run as ONE batched ensemble.

Owns: :class:`StackedMembers` (M copies of one module as stacked parameters, run with ``torch.func.vmap`` over
``functional_call``: one vectorised forward for all members, never a Python loop over them), the diffusion members
:class:`DiffusionMembers` built from the one behaviour denoiser by :func:`make_diffusion_members`, and the Gaussian
MLP members of the ``uni_o4`` preset (:class:`GaussianActor`, :class:`GaussianMembers`, :func:`fit_gaussian_members`).
Must not touch: how members are improved (``offline_ppo.py``) or regularised (``divergence.py``).

Diffusion members (UEPO). Member ``i`` is a copy of the pretrained behaviour denoiser's weights plus its initial chain
noise ``z_i``. With ``member_noise="zero"`` (the default) ``z_i = 0``, the mode of the prior, for every member: members
differ only by their weights (trained apart by the divergence term and the perturbation), and the deterministic action
is the DDIM chain from the prior's mode, not from one random draw. With ``member_noise="seed"``, ``z_i ~ N(0, I_A)`` is
drawn once from ``seed + i`` (one model, several modes; a member's quality then depends on its draw). In both modes
every chain of member ``i`` starts at ``x_0 = z_i``; its stochastic chain adds the floored Gaussian step noise of
:class:`~sb3_uepo.common.diffusion.ChainSampler`. As in DPPO every denoising step is a Gaussian policy step, so
``log pi_i(chain | s) = sum_j log N(x_{j+1}; mu_i(x_j, k_j, s), sigma_j^2)`` (``x_0`` is fixed and not scored).

Gaussian members (Uni-O4 baseline). ``n`` MLPs ``mu_i(s)`` (3 x 256 ReLU) with state-independent ``log_std_i``, each with
its own initialisation, trained together by behaviour cloning on a shared batch, optionally with Uni-O4's heuristic
diversity term (``divergence.uni_o4_diversity_loss``). The layout mirrors SB3's ``ActorCriticPolicy``
(``policy_net`` = ``mlp_extractor.policy_net``, ``action_net``, ``log_std``) so a member loads into SB3's MlpPolicy
(with ``net_arch=dict(pi=[256, 256, 256])``, ReLU); its mean is in the scaled action units [-1, 1].

Shape symbols: ``M`` members, ``B`` states per member, ``O`` observation dim, ``A`` action dim, ``S`` sampling steps.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from stable_baselines3.common.torch_layers import create_mlp
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from sb3_uepo.common.diffusion import ChainSampler, Denoiser
from sb3_uepo.offline.config import OfflineConfig, activation_class, log_values, make_progress_bar

Params = dict[str, torch.Tensor]


class StackedMembers:
    """``M`` modules of one architecture as stacked parameters ``{name: (M, ...)}`` and one vmapped forward.

    :param template: a module of the members' architecture (its own weights are never used)
    :param params: stacked parameters; leaf tensors that require grad are trained in place
    """

    def __init__(self, template: nn.Module, params: Params) -> None:
        self.template = copy.deepcopy(template).requires_grad_(False)
        self.params = params
        sizes = {int(v.shape[0]) for v in params.values()}
        if len(sizes) != 1:
            raise ValueError(f"stacked parameters disagree on the number of members: {sorted(sizes)}")
        self.n_members = sizes.pop()

    @staticmethod
    def stack(modules: list[nn.Module], requires_grad: bool = True) -> Params:
        """Stack the parameters of identically shaped modules into leaf tensors ``(M, ...)``."""
        params, buffers = stack_module_state(modules)  # type: ignore[arg-type]
        if buffers:
            raise ValueError("member modules must not hold buffers (they would not be stacked)")
        return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in params.items()}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def detached_params(self) -> Params:
        """A frozen copy of the current weights (e.g. the "previous" policies of offline PPO)."""
        return {k: v.detach().clone() for k, v in self.params.items()}

    def functional(self, params: Params | None, *args: torch.Tensor) -> Any:
        """Run member ``m`` with ``params[.][m]`` on ``args[.][m]`` for all ``m`` at once: inputs (M, N, ...)."""
        params = self.params if params is None else params

        def call(p: Params, *a: torch.Tensor) -> Any:
            return functional_call(self.template, p, a)

        return vmap(call)(params, *args)

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        deterministic: bool = True,
        params: Params | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Actions in [-1, 1] of every member: (B, O) shared or (M, B, O) states -> (M, B, A)."""
        return self._raw_actions(obs, deterministic, params, generator).clamp(-1.0, 1.0)

    def _raw_actions(
        self, obs: torch.Tensor, deterministic: bool, params: Params | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def member_state_dict(self, index: int, params: Params | None = None) -> dict[str, torch.Tensor]:
        """State dict of member ``index``, loadable into the template's class."""
        params = self.params if params is None else params
        return {k: v[index].detach().clone() for k, v in params.items()}

    def copy_members_(self, source: Params, mask: torch.Tensor, target: Params | None = None) -> None:
        """``target[m] <- source[m]`` for the members where ``mask`` (M,) is True (in place, no grad)."""
        target = self.params if target is None else target
        with torch.no_grad():
            for k in target:
                target[k][mask] = source[k][mask].to(target[k].dtype)


# ---------------------------------------------------------------------------------------------- diffusion members
class _StackedEps:
    """``eps_fn`` for :class:`ChainSampler` over a flattened member batch: rows ``[m N, (m + 1) N)`` are member m."""

    def __init__(self, members: DiffusionMembers, params: Params | None) -> None:
        self.members, self.params = members, params
        self.action_dim = members.action_dim

    def __call__(self, x: torch.Tensor, k: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        m = self.members.n_members
        out = self.members.functional(
            self.params, x.reshape(m, -1, x.shape[-1]), k.reshape(m, -1), cond.reshape(m, -1, cond.shape[-1])
        )
        return out.reshape(-1, out.shape[-1])


class DiffusionMembers(StackedMembers):
    """Denoiser members: stacked weights, one seed noise each, chains sampled and scored for all members at once.

    :param template: a :class:`Denoiser` of the members' architecture
    :param params: stacked denoiser parameters (M, ...)
    :param seed_noise: (M, A) the members' fixed initial noises
    :param sampler: the chain sampler (schedule, steps, min std)
    :param member_noise: ``"zero"`` or ``"seed"`` (chains start at ``seed_noise``) or ``"random"`` (fresh N(0, I) every
        chain)
    """

    def __init__(
        self, template: Denoiser, params: Params, seed_noise: torch.Tensor, sampler: ChainSampler, member_noise: str = "zero"
    ) -> None:
        super().__init__(template, params)
        self.seed_noise = seed_noise
        self.sampler = sampler
        self.member_noise = member_noise
        self.action_dim = template.action_dim
        self.obs_dim = template.cond_dim

    def eps_fn(self, params: Params | None = None) -> _StackedEps:
        """The members' noise predictor over a flattened (M * N) batch."""
        return _StackedEps(self, params)

    def x_init(self, n: int, seed_noise: torch.Tensor | None = None) -> torch.Tensor | None:
        """(M * n, A) initial noise: every member's seed noise repeated ``n`` times (None when ``member_noise="random"``)."""
        if self.member_noise == "random":
            return None
        noise = self.seed_noise if seed_noise is None else seed_noise
        return noise.unsqueeze(1).expand(-1, n, -1).reshape(-1, noise.shape[-1])

    @staticmethod
    def _per_member(obs: torch.Tensor, n_members: int) -> torch.Tensor:
        """(B, O) shared states -> (M, B, O); (M, B, O) unchanged."""
        return obs.unsqueeze(0).expand(n_members, -1, -1) if obs.dim() == 2 else obs

    def sample_chains(
        self,
        obs: torch.Tensor,
        params: Params | None = None,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
        seed_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising chains of every member (gradients flow when ``params`` require grad).

        :param obs: (B, O) states shared by the members or (M, B, O)
        :param params: weights to sample with (current weights when None)
        :param deterministic: DDIM (eta = 0) without step noise
        :param generator: torch generator of the noise
        :param seed_noise: (M, A) seed noises to start from instead of the members' own
        :return: (M, B, S + 1, A) chains, unclipped
        """
        obs = self._per_member(obs, self.n_members)
        m, b, _ = obs.shape
        chain = self.sampler.sample_chain(
            self.eps_fn(params),
            obs.reshape(m * b, -1),
            x_init=self.x_init(b, seed_noise),
            deterministic=deterministic,
            generator=generator,
        )
        return chain.reshape(m, b, *chain.shape[1:])

    @torch.no_grad()
    def sample_chains_with_log_prob(
        self,
        obs: torch.Tensor,
        params: Params | None = None,
        generator: torch.Generator | None = None,
        seed_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stochastic chains and their per-step log-densities under the sampling weights, in ONE pass (no grad):
        :meth:`ChainSampler.sample_chain_with_log_prob` over the stacked members (it equals :meth:`chain_log_prob`
        under the same weights).

        :return: chains (M, B, S + 1, A) and log-densities (M, B, S)
        """
        obs = self._per_member(obs, self.n_members)
        m, b, _ = obs.shape
        chains, log_probs = self.sampler.sample_chain_with_log_prob(
            self.eps_fn(params), obs.reshape(m * b, -1), x_init=self.x_init(b, seed_noise), generator=generator
        )
        return chains.reshape(m, b, *chains.shape[1:]), log_probs.reshape(m, b, -1)

    def chain_log_prob(self, chains: torch.Tensor, obs: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Per-step log-densities of given chains under every member: (M, B, S + 1, A), (M, B, O) -> (M, B, S)."""
        obs = self._per_member(obs, self.n_members)
        m, b = chains.shape[:2]
        logp = self.sampler.chain_log_prob(
            self.eps_fn(params), chains.reshape(m * b, *chains.shape[2:]), obs.reshape(m * b, -1)
        )
        return logp.reshape(m, b, -1)

    def chain_means(self, chains: torch.Tensor, obs: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Step means of given chains under every member: (M, B, S + 1, A), (M, B, O) -> (M, B, S, A)."""
        obs = self._per_member(obs, self.n_members)
        m, b = chains.shape[:2]
        means = self.sampler.chain_means(self.eps_fn(params), chains.reshape(m * b, *chains.shape[2:]), obs.reshape(m * b, -1))
        return means.reshape(m, b, *means.shape[1:])

    def _raw_actions(
        self, obs: torch.Tensor, deterministic: bool, params: Params | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        return self.sample_chains(obs, params, deterministic=deterministic, generator=generator)[:, :, -1]

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the members (weights, seed noise), for checkpoints."""
        return dict(params=self.detached_params(), seed_noise=self.seed_noise.detach().clone())


def make_diffusion_members(
    behavior: Denoiser, sampler: ChainSampler, n_members: int, seed: int, member_noise: str = "zero"
) -> DiffusionMembers:
    """``n_members`` members initialised from the ONE behaviour denoiser, each with its initial chain noise.

    :param behavior: the pretrained behaviour denoiser
    :param sampler: the chain sampler of the offline phase
    :param n_members: ``M``
    :param seed: with ``member_noise="seed"``, member ``i`` draws ``z_i ~ N(0, I_A)`` from
        ``torch.Generator().manual_seed(seed + i)``; otherwise unused (``z_i = 0``)
    :param member_noise: ``"zero"``, ``"seed"`` or ``"random"`` (see :class:`DiffusionMembers`)
    """
    copies = [copy.deepcopy(behavior) for _ in range(n_members)]
    params = StackedMembers.stack(copies)
    device = next(behavior.parameters()).device
    if member_noise == "seed":
        draws = [torch.randn(behavior.action_dim, generator=torch.Generator().manual_seed(seed + i)) for i in range(n_members)]
        noise = torch.stack(draws).to(device)
    else:
        noise = torch.zeros(n_members, behavior.action_dim, device=device)
    return DiffusionMembers(behavior, params, noise, sampler, member_noise)


def diffusion_members_from_state(
    template: Denoiser, sampler: ChainSampler, state: dict[str, Any], member_noise: str = "zero"
) -> DiffusionMembers:
    """Rebuild :class:`DiffusionMembers` from :meth:`DiffusionMembers.state`."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in state["params"].items()}
    return DiffusionMembers(template, params, state["seed_noise"].clone(), sampler, member_noise)


# ---------------------------------------------------------------------------------------------- Gaussian members
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class GaussianActor(nn.Module):
    """Diagonal Gaussian policy with SB3's ``ActorCriticPolicy`` actor layout: ``N(action_net(policy_net(s)), exp(log_std))``.

    :param obs_dim: observation dimension
    :param action_dim: action dimension
    :param hidden_sizes: widths of ``policy_net``
    :param activation: activation name
    :param log_std_init: initial (state-independent) log-std
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_sizes: tuple[int, ...] = (256, 256, 256),
        activation: str = "relu",
        log_std_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.policy_net = nn.Sequential(*create_mlp(obs_dim, -1, list(hidden_sizes), activation_class(activation)))
        self.action_net = nn.Linear(hidden_sizes[-1] if hidden_sizes else obs_dim, action_dim)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:return: mean (B, A) and log-std (A,) clamped to [-5, 2]."""
        return self.action_net(self.policy_net(obs)), self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density summed over the action dims."""
    z = (actions - mean) / log_std.exp()
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class GaussianMembers(StackedMembers):
    """``M`` Gaussian actors as one batched ensemble.

    :param template: a :class:`GaussianActor`
    :param params: stacked actor parameters (M, ...)
    """

    def __init__(self, template: GaussianActor, params: Params) -> None:
        super().__init__(template, params)
        self.action_dim = template.action_dim
        self.obs_dim = template.obs_dim

    def distribution(self, obs: torch.Tensor, params: Params | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Means (M, B, A) and log-stds (M, 1, A) of every member on (B, O) shared or (M, B, O) states."""
        obs = DiffusionMembers._per_member(obs, self.n_members)
        mean, log_std = self.functional(params, obs)
        return mean, log_std.unsqueeze(1)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """(M, B) log-densities of (M, B, A) or shared (B, A) actions."""
        mean, log_std = self.distribution(obs, params)
        return gaussian_log_prob(mean, log_std, actions)

    def sample(
        self, obs: torch.Tensor, params: Params | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Unclipped samples (M, B, A)."""
        mean, log_std = self.distribution(obs, params)
        return mean + log_std.exp() * torch.randn(mean.shape, generator=generator, device=mean.device)

    def _raw_actions(
        self, obs: torch.Tensor, deterministic: bool, params: Params | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The mean (deterministic) or a sample."""
        return self.distribution(obs, params)[0] if deterministic else self.sample(obs, params, generator)

    def state(self) -> dict[str, Any]:
        return dict(params=self.detached_params())


def make_gaussian_members(
    obs_dim: int, action_dim: int, config: OfflineConfig, device: torch.device | str = "cpu"
) -> GaussianMembers:
    """``n_members`` freshly initialised Gaussian actors (member ``i`` initialised from seed ``seed + 100 + i``)."""
    actors = []
    for i in range(config.n_members):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 100 + i)
            actors.append(
                GaussianActor(
                    obs_dim, action_dim, config.gaussian_hidden_sizes, config.gaussian_activation, config.gaussian_log_std_init
                ).to(device)
            )
    return GaussianMembers(actors[0], StackedMembers.stack(actors))


def gaussian_members_from_state(
    obs_dim: int, action_dim: int, config: OfflineConfig, state: dict[str, Any]
) -> GaussianMembers:
    template = GaussianActor(obs_dim, action_dim, config.gaussian_hidden_sizes, config.gaussian_activation)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in state["params"].items()}
    return GaussianMembers(template, params)


def fit_gaussian_members(
    obs: torch.Tensor,
    actions: torch.Tensor,
    config: OfflineConfig,
    logger: Any = None,
    progress_bar: bool = True,
    log_prefix: str = "offline/members",
) -> tuple[GaussianMembers, dict[str, Any]]:
    """Behaviour cloning of the ``uni_o4`` Gaussian members, all members in one batched step.

    Loss of member ``i`` on a batch shared by all members (Uni-O4's ``joint_train``)::

        L_i = - log pi_i(a | s)  [ - alpha (log pi_i(a | s) - max_{j != i} log pi_j(a | s)) if uni_o4_diversity ]

    :param obs: (N, O) normalised observations
    :param actions: (N, A) actions in [-1, 1]
    :param config: reads ``gaussian_*``, ``uni_o4_*``, ``n_members``, ``seed``
    :param logger: SB3 logger or None
    :param progress_bar: show a progress bar
    :param log_prefix: key prefix of the logged values
    :return: the members and a report (``steps``, ``final_nll`` per member, ``loss_curve``, ``seconds``)
    """
    from sb3_uepo.offline.divergence import uni_o4_diversity_loss

    start = time.time()
    n = obs.shape[0]
    members = make_gaussian_members(obs.shape[1], actions.shape[1], config, obs.device)
    optimizer = torch.optim.Adam(members.parameters(), lr=config.gaussian_bc_lr)
    generator = torch.Generator(device="cpu").manual_seed(config.seed + 2)
    batch = min(config.gaussian_bc_batch_size, n)
    n_steps = config.gaussian_bc_steps
    log_every = max(n_steps // 20, 1)
    nll = torch.full((members.n_members,), float("nan"))
    curve = []
    bar = make_progress_bar(n_steps, progress_bar, "offline: Gaussian members (BC)")
    for step in range(n_steps):
        idx = torch.randint(0, n, (batch,), generator=generator).to(obs.device)
        logp = members.log_prob(obs[idx], actions[idx])  # (M, B)
        loss_per = -logp
        if config.uni_o4_diversity:
            loss_per = loss_per + uni_o4_diversity_loss(logp, config.uni_o4_alpha)
        loss = loss_per.mean(1).sum()  # members are independent: sum of their mean losses
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == n_steps:
            nll = (-logp).detach().mean(1)
            curve.append([step + 1, float(nll.mean())])
            bar.set_postfix(nll=f"{float(nll.mean()):.3f}")
            log_values(logger, log_prefix, dict(bc_nll=float(nll.mean())), step + 1)
    bar.close()
    report = dict(steps=n_steps, final_nll=[float(x) for x in nll], loss_curve=curve, seconds=time.time() - start)
    return members, report
