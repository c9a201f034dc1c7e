"""The diffusion actor-critic that UEPO fine-tunes online (stages 3 and 7 of docs/algorithm.md).

Owns: :class:`DiffusionPolicy` (a state-conditioned denoiser acting through a few DDIM/DDPM steps, a separate value
network, fixed observation normalisation, the member's fixed noise seed) and :func:`make_value_net` (the one place
the value architecture is defined, so the offline IQL value loads into the policy unchanged).
Must not touch: the diffusion formulas (``common/diffusion.py``), rollout storage (``buffers.py``), the PPO loss and
its schedules (``uepo/uepo.py``), offline training (``offline/``).

As in DPPO (Ren et al. 2024, irom-princeton/dppo), the policy acts over its denoising chain: every sampling step is a
Gaussian with std floored at ``min_std``, so ``log pi(chain | s)`` is a sum of per-step Gaussian log-densities and
PPO's ratio is exact. The chain, not only its final action, is what the rollout buffer stores.

Conventions: actions live in [-1, 1] (``squash_output=True``, so SB3 unscales them to the env's bounds); the chain is
kept unclipped and only its last element is clipped for the env. Observations are normalised with FIXED statistics
(registered buffers, identity until :meth:`DiffusionPolicy.set_observation_statistics`), saved with the model.

Shape symbols: ``B`` batch, ``O`` observation dimension, ``A`` action dimension, ``S`` sampling steps; a chain is
``(B, S + 1, A)`` with ``chain[:, 0]`` the initial noise and ``chain[:, -1]`` the action.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import get_action_dim
from stable_baselines3.common.torch_layers import create_mlp
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from sb3_uepo.common.diffusion import ChainSampler, Denoiser, NoiseSchedule
from sb3_uepo.common.type_aliases import ChainEvaluation, ChainSample

DEFAULT_DENOISER_ARCH = [256, 256, 256]
DEFAULT_VALUE_ARCH = [256, 256]


def make_value_net(
    obs_dim: int, net_arch: Sequence[int] = DEFAULT_VALUE_ARCH, activation_fn: type[nn.Module] = nn.Tanh
) -> nn.Sequential:
    """The state-value network ``V(normalised s)``: SB3's ``create_mlp`` with one output.

    The offline critic (IQL) builds its V with this same layout and the policy's ``value_net_arch`` and
    ``value_activation_fn``, so its ``state_dict`` loads into :attr:`DiffusionPolicy.value_net` unchanged.

    :param obs_dim: observation dimension ``O``
    :param net_arch: hidden layer widths
    :param activation_fn: activation class
    :return: ``nn.Sequential`` mapping (B, O) -> (B, 1)
    """
    return nn.Sequential(*create_mlp(obs_dim, 1, list(net_arch), activation_fn))


class DiffusionPolicy(BasePolicy):
    """Actor-critic whose actor is a denoising chain (DDIM or DDPM, ``n_sampling_steps`` steps).

    :param observation_space: a flat ``Box`` observation space
    :param action_space: a ``Box`` action space (actions are produced in [-1, 1] and unscaled by SB3)
    :param lr_schedule: learning-rate schedule (``lr_schedule(1)`` is the initial learning rate)
    :param net_arch: hidden widths of the denoiser (default ``[256, 256, 256]``); SB3's
        ``dict(pi=[...], vf=[...])`` form sets the denoiser (``pi``) and the value network (``vf``) at once
    :param value_net_arch: hidden widths of the value network (default ``[256, 256]``)
    :param activation_fn: activation of the denoiser
    :param value_activation_fn: activation of the value network (SB3's default, Tanh, as the offline IQL V)
    :param time_embed_dim: width of the denoiser's diffusion-step embedding
    :param n_train_steps: diffusion steps ``K`` of the noise schedule the denoiser is trained on
    :param n_sampling_steps: denoising steps ``S`` used to act (and fine-tuned by PPO), ``<= n_train_steps``
    :param sampler: ``"ddpm"`` (default) or ``"ddim"``. From an untrained denoiser, DDIM's clipped ``x0`` prediction
        is clipped at nearly every step, which passes no gradient: learning from scratch (no dataset) needs DDPM.
        With a dataset, the offline settings fill this in (the presets pretrain and fine-tune with DDIM).
    :param min_std: floor of every denoising step's std (exploration noise and log-probabilities); with a dataset it
        follows the offline settings (the offline members' chains)
    :param exploration_std: the online floor instead of ``min_std`` (exploration noise and log-probabilities of the
        chains PPO fine-tunes), e.g. smaller than the offline one so that the stochastic policy PPO improves stays close
        to the deterministic one that is evaluated; None: ``min_std``
    :param explore_frozen_steps: with ``ft_denoising_steps``, also add exploration noise in the frozen first steps
        (False: they take their mean, so that all the exploration happens where PPO can learn from it)
    :param noise_clip: clip of the standard-normal exploration noise of every step
    :param member_seed: None (default): deterministic actions start from ``x_0 = 0``, the mode of the prior, so that
        acting does not hinge on one random draw; an int: from the fixed draw
        ``torch.randn(A, generator=torch.Generator().manual_seed(member_seed))``
    :param initial_noise: where stochastic chains start: ``"random"`` (a fresh ``N(0, I)`` draw per chain) or
        ``"seed"`` (the fixed initial noise of deterministic actions, exploring only through the per-step noise, as the
        offline members with ``member_noise="zero"`` or ``"seed"`` were trained; set by ``UEPO.pretrain``)
    :param ft_denoising_steps: fine-tune only the LAST ``K`` of the ``S`` denoising steps (DPPO): the earlier steps act
        with a frozen copy of the denoiser (shared with the KL reference, no gradient), and PPO's ratio covers the last
        ``K`` steps only. None (default): every step is fine-tuned
    :param value_lr_scale: the value network's learning rate is ``value_lr_scale`` times the policy's
        (Uni-O4 online: critic 2e-4 vs actor 2e-5, i.e. 10); UEPO applies it at every learning-rate update
    :param use_sde: not supported (must stay False); accepted because SB3's on-policy algorithms pass it
    :param normalize_images: unused (flat observations only); accepted for SB3 compatibility
    :param optimizer_class: optimizer class
    :param optimizer_kwargs: optimizer keyword arguments besides the learning rate (Adam: ``eps=1e-5`` as SB3, and
        ``fused=True``)
    """

    obs_mean: th.Tensor
    obs_std: th.Tensor
    deterministic_noise: th.Tensor

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        value_net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.Mish,
        value_activation_fn: type[nn.Module] = nn.Tanh,
        time_embed_dim: int = 32,
        n_train_steps: int = 20,
        n_sampling_steps: int = 5,
        sampler: str = "ddpm",
        min_std: float = 0.1,
        exploration_std: float | None = None,
        explore_frozen_steps: bool = True,
        noise_clip: float = 3.0,
        member_seed: int | None = None,
        initial_noise: str = "random",
        ft_denoising_steps: int | None = None,
        value_lr_scale: float = 1.0,
        use_sde: bool = False,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if use_sde:
            raise ValueError("DiffusionPolicy explores through its denoising noise; use_sde=True is not supported")
        if not isinstance(action_space, spaces.Box):
            raise ValueError(f"DiffusionPolicy needs a continuous (Box) action space, got {action_space}")
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
            raise ValueError(
                f"DiffusionPolicy needs a flat (1-D Box) observation space, got {observation_space}; "
                "flatten it (e.g. gymnasium.wrappers.FlattenObservation)"
            )
        if initial_noise not in ("random", "seed"):
            raise ValueError(f"initial_noise must be 'random' or 'seed', got {initial_noise!r}")
        if ft_denoising_steps is not None and not 1 <= ft_denoising_steps <= n_sampling_steps:
            raise ValueError(
                f"ft_denoising_steps must be in [1, n_sampling_steps={n_sampling_steps}] (or None: every step), "
                f"got {ft_denoising_steps}"
            )
        if exploration_std is not None and exploration_std <= 0:
            raise ValueError(f"exploration_std must be > 0 (or None: min_std), got {exploration_std}")
        if optimizer_kwargs is None:
            # SB3's eps; the fused Adam (one kernel per tensor, also on CPU) is PyTorch's same update at less overhead
            optimizer_kwargs = {"eps": 1e-5, "fused": True} if optimizer_class == th.optim.Adam else {}
        super().__init__(
            observation_space,
            action_space,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            squash_output=True,
            normalize_images=normalize_images,
        )
        denoiser_arch, value_arch = _split_net_arch(net_arch, value_net_arch)
        self.net_arch = denoiser_arch
        self.value_net_arch = value_arch
        self.activation_fn = activation_fn
        self.value_activation_fn = value_activation_fn
        self.time_embed_dim = time_embed_dim
        self.n_train_steps = n_train_steps
        self.n_sampling_steps = n_sampling_steps
        self.sampler_name = sampler
        self.min_std = min_std
        self.exploration_std = exploration_std
        self.explore_frozen_steps = explore_frozen_steps
        self.noise_clip = noise_clip
        self.member_seed = member_seed
        self.initial_noise = initial_noise
        self.ft_denoising_steps = ft_denoising_steps
        self.value_lr_scale = value_lr_scale
        self.use_sde = use_sde
        # predict(deterministic=True) through a TorchScript trace of the chain (same action, less Python overhead)
        self.use_traced_predict = True

        self.obs_dim = int(observation_space.shape[0])
        self.action_dim = get_action_dim(action_space)
        self.denoiser = Denoiser(self.action_dim, self.obs_dim, self.net_arch, time_embed_dim, activation_fn)
        step_std_floor = min_std if exploration_std is None else exploration_std
        self.sampler = ChainSampler(NoiseSchedule(n_train_steps), n_sampling_steps, sampler, step_std_floor, noise_clip)
        # the first S - K steps act with a frozen copy (kept in sync by load_denoiser_state; saved with the policy)
        self.first_ft_step = n_sampling_steps - (ft_denoising_steps or n_sampling_steps)
        self.frozen_denoiser: Denoiser | None = None
        if self.first_ft_step > 0:
            self.frozen_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.value_net = make_value_net(self.obs_dim, self.value_net_arch, value_activation_fn)
        self.register_buffer("obs_mean", th.zeros(self.obs_dim))
        self.register_buffer("obs_std", th.ones(self.obs_dim))
        # x_0 of deterministic actions, so that predict(deterministic=True) is a pure function: the prior's mode (zero)
        # unless a member seed asks for a fixed draw
        if member_seed is None:
            noise = th.zeros(self.action_dim)
        else:
            noise = th.randn(self.action_dim, generator=th.Generator().manual_seed(int(member_seed)))
        self.register_buffer("deterministic_noise", noise)

        lr = lr_schedule(1)
        value_group = {"params": list(self.value_net.parameters()), "lr": lr * value_lr_scale, "lr_scale": value_lr_scale}
        self.optimizer = self.optimizer_class(
            [
                {"params": list(self.denoiser.parameters()), "lr": lr, "lr_scale": 1.0, "name": "denoiser"},
                {**value_group, "name": "value"},
            ],
            lr=lr,
            **self.optimizer_kwargs,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                net_arch=self.net_arch,
                value_net_arch=self.value_net_arch,
                activation_fn=self.activation_fn,
                value_activation_fn=self.value_activation_fn,
                time_embed_dim=self.time_embed_dim,
                n_train_steps=self.n_train_steps,
                n_sampling_steps=self.n_sampling_steps,
                sampler=self.sampler_name,
                min_std=self.min_std,
                exploration_std=self.exploration_std,
                explore_frozen_steps=self.explore_frozen_steps,
                noise_clip=self.noise_clip,
                member_seed=self.member_seed,
                initial_noise=self.initial_noise,
                ft_denoising_steps=self.ft_denoising_steps,
                value_lr_scale=self.value_lr_scale,
                lr_schedule=self._dummy_schedule,  # not needed to load the policy alone
                optimizer_class=self.optimizer_class,
                optimizer_kwargs=self.optimizer_kwargs,
            )
        )
        return data

    def actor_critic_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(actor, critic) parameters, clipped separately by UEPO: the denoiser's and the value network's (the frozen
        steps' copy has no trainable parameter)."""
        return list(self.denoiser.parameters()), list(self.value_net.parameters())

    # ------------------------------------------------------------------------------------------ offline seam
    def value_head(self) -> nn.Linear:
        """The value network's output layer (e.g. to change the units of the value)."""
        head = self.value_net[-1]
        assert isinstance(head, nn.Linear)
        return head

    def set_observation_statistics(self, mean: np.ndarray | th.Tensor, std: np.ndarray | th.Tensor) -> None:
        """Fix the observation normalisation ``(s - mean) / std`` (e.g. to the offline dataset's statistics).

        The statistics are buffers: saved with the model and never re-estimated. Set them before
        ``UEPO.set_reference_policy`` so that the frozen reference normalises the same way.

        :param mean: (O,) per-dimension mean
        :param std: (O,) per-dimension std, floored at 1e-6
        """
        mean_t = th.as_tensor(mean, dtype=th.float32).reshape(-1)
        std_t = th.as_tensor(std, dtype=th.float32).reshape(-1)
        if mean_t.shape != (self.obs_dim,) or std_t.shape != (self.obs_dim,):
            raise ValueError(f"observation statistics must have shape ({self.obs_dim},), got {mean_t.shape} and {std_t.shape}")
        if not (th.isfinite(mean_t).all() and th.isfinite(std_t).all()):
            raise ValueError("observation statistics must be finite")
        self.obs_mean.copy_(mean_t)
        self.obs_std.copy_(std_t.clamp(min=1e-6))

    def load_denoiser_state(self, state_dict: Mapping[str, th.Tensor]) -> None:
        """Load denoiser weights (a :class:`~sb3_uepo.common.diffusion.Denoiser` ``state_dict`` with the same
        architecture), e.g. the offline behaviour model or a chosen offline member. In place: the optimizer keeps
        pointing at the same parameters.

        :param state_dict: the denoiser's ``state_dict``
        """
        self.denoiser.load_state_dict(state_dict)
        if self.frozen_denoiser is not None:
            self.frozen_denoiser.load_state_dict(state_dict)

    def load_value_state(self, state_dict: Mapping[str, th.Tensor]) -> None:
        """Load value weights built by :func:`make_value_net` with this policy's ``value_net_arch`` and
        ``value_activation_fn`` (e.g. the offline IQL ``V``). In place.

        :param state_dict: the value network's ``state_dict``
        """
        self.value_net.load_state_dict(state_dict)

    def load_offline_result(self, result: Any, member: str = "chosen") -> None:
        """Load an offline result: the chosen member's (or the behaviour model's) denoiser, the IQL value, the
        dataset's observation statistics and the initial noise.

        The chosen member acts from its offline initial noise (zero by default) and, as it was trained, its stochastic
        chains start there too; the behaviour model (diffusion BC) acts deterministically from ``x_0 = 0`` and
        stochastically from fresh draws (the data's distribution).

        :param result: an :class:`~sb3_uepo.offline.pipeline.OfflineResult` of diffusion members
        :param member: ``"chosen"`` or ``"behavior"``
        """
        if result.policy_type != "diffusion":
            raise ValueError(f"a DiffusionPolicy loads diffusion members, got a result of {result.policy_type!r} members")
        if member == "behavior" and result.behavior_state_dict is None:
            raise ValueError("member='behavior' needs a result with a behaviour diffusion model")
        chosen = member == "chosen"
        self.set_observation_statistics(result.obs_mean, result.obs_std)
        self.load_denoiser_state(result.policy_state_dict if chosen else result.behavior_state_dict)
        self.load_value_state(result.value_state_dict)
        seeded = chosen and result.architecture["sampler"].get("member_noise", "seed") in ("zero", "seed")
        self.set_deterministic_noise(
            result.seed_noise if seeded and result.seed_noise is not None else th.zeros(self.action_dim)
        )
        self.initial_noise = "seed" if seeded else "random"

    def set_deterministic_noise(self, noise: np.ndarray | th.Tensor) -> None:
        """Replace the fixed initial noise ``x_0`` of deterministic actions (by default zero, see ``member_seed``), e.g.
        with an offline member's initial noise. Saved with the model.

        :param noise: (A,) initial noise
        """
        noise_t = th.as_tensor(noise, dtype=th.float32).reshape(-1)
        if noise_t.shape != (self.action_dim,):
            raise ValueError(f"the deterministic noise must have shape ({self.action_dim},), got {tuple(noise_t.shape)}")
        self.deterministic_noise.copy_(noise_t)

    def set_training_mode(self, mode: bool) -> None:
        """SB3's ``set_training_mode``, skipped when nothing would change: ``predict`` calls it every time, and walking
        the denoiser, its frozen copy and the value network costs more than a small batch's whole chain."""
        if self.training == mode and self.denoiser.training == mode and self.value_net.training == mode:
            return
        super().set_training_mode(mode)

    # ------------------------------------------------------------------------------------------ acting
    def normalize_observation(self, obs: PyTorchObs) -> th.Tensor:
        """``(s - mean) / std`` with the fixed statistics, as float32 (B, O)."""
        assert isinstance(obs, th.Tensor)
        return (obs.float() - self.obs_mean) / self.obs_std

    def sample_chain(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        """Sample denoising chains for a batch of observations.

        :param obs: (B, O) raw observations
        :param deterministic: no noise between steps and the member's fixed initial noise (same output every call)
        :return: (B, S + 1, A) unclipped chains
        """
        cond = self.normalize_observation(obs)
        x_init = self.deterministic_noise if deterministic or self.initial_noise == "seed" else None
        return self.sampler.sample_chain(
            self.acting_eps_fn(), cond, x_init=x_init, deterministic=deterministic, first_noisy_step=self.first_noisy_step
        )

    @property
    def first_noisy_step(self) -> int:
        """The first denoising step that explores: 0, or the first fine-tuned one (``explore_frozen_steps=False``)."""
        return 0 if self.explore_frozen_steps else self.first_ft_step

    def acting_eps_fn(self) -> Any:
        """The noise predictor of the whole chain: the fine-tuned denoiser, or (``ft_denoising_steps``) the frozen copy
        for the first ``S - K`` steps and the fine-tuned one for the last ``K``."""
        if self.frozen_denoiser is None:
            return self.denoiser
        return _SplitDenoiser(self.frozen_denoiser, self.denoiser, int(self.sampler.timesteps[self.first_ft_step]))

    def sample_chain_with_values(self, obs: th.Tensor, deterministic: bool = False) -> ChainSample:
        """One rollout step: chain, action, value and (per-step) log-probabilities, for the rollout buffer.

        Without autograd the chain and value run through a TorchScript trace (per batch size and noise pattern) of the
        same computation, fed with the same random draws: the same chain as the eager path up to float rounding.

        :param obs: (B, O) raw observations
        :param deterministic: see :meth:`sample_chain`
        :return: :class:`~sb3_uepo.common.type_aliases.ChainSample`
        """
        x_init = self.deterministic_noise if deterministic or self.initial_noise == "seed" else None
        noisy_steps = tuple(self.sampler.noisy_steps(deterministic, self.first_noisy_step))
        # every random draw first (the order sample_chain makes them), then a pure function of the draws
        x, noise = self.sampler.draw_noise(  # the denoiser only tells the action dimension here
            self.denoiser, obs, x_init, deterministic, first_noisy_step=self.first_noisy_step
        )
        draws = tuple(z for z in noise if z is not None)
        module = _ChainWithValue(self, noisy_steps)
        traced = self._trace("rollout", module, (obs.float(), x, *draws)) if not th.is_grad_enabled() else None
        chain, step_log_prob, values = (traced or module)(obs.float(), x, *draws)
        return ChainSample(
            actions=chain[:, -1].clamp(-1.0, 1.0),
            values=values,
            log_prob=step_log_prob.sum(-1),
            chain=chain,
            step_log_prob=step_log_prob,
        )

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Like ``ActorCriticPolicy.forward``: (actions in [-1, 1], values, log pi(chain | s)).

        The chain itself is returned by :meth:`sample_chain_with_values`, which UEPO's rollout collection calls.
        """
        sample = self.sample_chain_with_values(obs, deterministic=deterministic)
        return sample.actions, sample.values, sample.log_prob

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        assert isinstance(observation, th.Tensor)
        if deterministic and not th.is_grad_enabled():
            traced = self._trace("act", _DeterministicActor(self), (observation,))
            if traced is not None:
                return traced(observation)
        return self._deterministic_or_sampled_action(observation, deterministic)

    def _deterministic_or_sampled_action(self, observation: th.Tensor, deterministic: bool) -> th.Tensor:
        return self.sample_chain(observation, deterministic=deterministic)[:, -1].clamp(-1.0, 1.0)

    def _trace(self, kind: str, module: nn.Module, inputs: tuple[th.Tensor, ...]) -> Any:
        """A TorchScript trace of ``module`` for these inputs' shapes (built on first use, checked against the eager
        module, then reused): acting at small batch is bound by Python overhead, which the trace removes. One trace per
        kind, batch size and module variant (e.g. which denoising steps draw noise). The trace shares this policy's
        tensors, so it follows in-place weight updates (optimizer steps, ``load_state_dict``); it is rebuilt when a tensor
        was replaced (``to()``, ``load_state_dict(assign=True)``), and never saved or copied. None when tracing is off
        (``use_traced_predict = False``) or failed for this policy.

        :param kind: what is traced (``"act"``: deterministic actions, ``"rollout"``: chain, log-densities and value)
        :param module: the eager computation; its ``trace_key`` (if any) tells variants apart
        :param inputs: example inputs (tensors)
        """
        if not self.use_traced_predict:
            return None
        cache = self.__dict__.setdefault("_traces", {})
        slots = cache.get("slots")
        if slots is None or not all(d.get(name) is t and (p is None or t.data_ptr() == p) for d, name, t, p in slots):
            cache.clear()
            cache["slots"] = _tensor_slots(self)
        key = (kind, int(inputs[0].shape[0]), getattr(module, "trace_key", None))
        if key not in cache:
            if len(cache) > 16:  # a few batch sizes are used in practice (1, n_envs, eval envs)
                return None
            cache[key] = self._trace_module(module, inputs)
        return cache[key]

    def _trace_module(self, module: nn.Module, inputs: tuple[th.Tensor, ...]) -> Any:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant Python branches of the chain (fixed steps) are intended
                traced = th.jit.trace(module, inputs, check_trace=False)
            expected, got = module(*inputs), traced(*inputs)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = got if isinstance(got, tuple) else (got,)
            if all(th.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(got, expected, strict=True)):
                return traced
        except Exception:  # any tracing failure: act eagerly
            pass
        self.use_traced_predict = False
        return None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_traces", None)  # traces hold references to this module's tensors: never pickled or deep-copied
        return state

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """:param obs: (B, O) raw observations; :return: (B, 1) state values."""
        return self.value_net(self.normalize_observation(obs))

    # ------------------------------------------------------------------------------------------ scoring
    def chain_means(self, obs: th.Tensor, chains: th.Tensor) -> th.Tensor:
        """Step means ``mu_j(x_j, s)`` of the fine-tuned steps of given chains in ONE batched denoiser call;
        :return: (B, K, A) (``K = S`` unless ``ft_denoising_steps``)."""
        return self.sampler.chain_means(self.denoiser, chains, self.normalize_observation(obs), self.first_ft_step)

    def evaluate_chains(self, obs: th.Tensor, chains: th.Tensor) -> ChainEvaluation:
        """Values, per-step log-probabilities and step means of the fine-tuned steps (the last ``K``; all ``S`` unless
        ``ft_denoising_steps``) of stored chains under the current weights. The frozen steps are left out: their ratio is
        exactly 1 and they carry no gradient.

        :param obs: (B, O) raw observations
        :param chains: (B, S + 1, A) chains from the rollout buffer
        :return: :class:`~sb3_uepo.common.type_aliases.ChainEvaluation`
        """
        cond = self.normalize_observation(obs)
        means = self.sampler.chain_means(self.denoiser, chains, cond, self.first_ft_step)
        return ChainEvaluation(
            values=self.value_net(cond), step_log_prob=self.sampler.log_prob_from_means(chains, means), means=means
        )

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """SB3's interface, over chains: ``actions`` are the (B, S + 1, A) chains.

        :return: values (B, 1), chain log-probability (B,), entropy None (no closed form)
        """
        assert isinstance(obs, th.Tensor)
        evaluation = self.evaluate_chains(obs, actions)
        return evaluation.values, evaluation.step_log_prob.sum(-1), None

    def kl_divergence(self, means: th.Tensor, reference_means: th.Tensor) -> th.Tensor:
        """KL between two chain policies with equal step stds, on the same chains:
        ``sum_j ||mu_j - mu_ref_j||^2 / (2 sigma_j^2)``.

        :param means: (B, S, A) this policy's step means
        :param reference_means: (B, S, A) the reference's step means
        :return: (B,) KL per chain
        """
        var = self.sampler.step_std[-means.shape[1] :].view(1, -1, 1) ** 2
        return ((means - reference_means) ** 2 / (2 * var)).sum(dim=(1, 2))


class _DeterministicActor(nn.Module):
    """``obs -> deterministic action`` of a DiffusionPolicy, as one module for ``torch.jit.trace``."""

    trace_key = None

    def __init__(self, policy: DiffusionPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, observation: th.Tensor) -> th.Tensor:
        return self.policy._deterministic_or_sampled_action(observation, True)


class _ChainWithValue(nn.Module):
    """``(obs, initial noise, the noisy steps' draws) -> (chain, per-step log-densities, value)`` of a DiffusionPolicy:
    one rollout step as a pure function of its random draws, for ``torch.jit.trace``.

    :param policy: the policy
    :param noisy_steps: the sampling steps that draw noise (one input tensor each, in order)
    """

    def __init__(self, policy: DiffusionPolicy, noisy_steps: tuple[int, ...]) -> None:
        super().__init__()
        self.policy = policy
        self.noisy_steps = noisy_steps
        self.trace_key = noisy_steps

    def forward(self, obs: th.Tensor, x: th.Tensor, *draws: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        policy = self.policy
        cond = policy.normalize_observation(obs)
        noise: list[th.Tensor | None] = [None] * policy.n_sampling_steps
        for step, z in zip(self.noisy_steps, draws, strict=True):
            noise[step] = z
        chain, step_log_prob = policy.sampler.chain_from_noise(policy.acting_eps_fn(), cond, x, noise)
        assert step_log_prob is not None
        return chain, step_log_prob, policy.value_net(cond)


class _SplitDenoiser:
    """``eps_fn`` of a chain whose steps above ``split_timestep`` use ``frozen`` and the others ``fine_tuned``; every call
    of the chain sampler holds one step for the whole batch."""

    def __init__(self, frozen: nn.Module, fine_tuned: nn.Module, split_timestep: int) -> None:
        self.frozen, self.fine_tuned, self.split_timestep = frozen, fine_tuned, split_timestep
        self.action_dim = getattr(fine_tuned, "action_dim", None)

    def __call__(self, x: th.Tensor, k: th.Tensor, cond: th.Tensor) -> th.Tensor:
        if int(k.reshape(-1)[0]) > self.split_timestep:
            with th.no_grad():
                return self.frozen(x, k, cond)
        return self.fine_tuned(x, k, cond)

    def prepare(self, cond: th.Tensor, timesteps: th.Tensor) -> list[tuple[Any, th.Tensor]]:
        """:meth:`Denoiser.prepare` of the network acting at each step (the frozen steps' without gradient)."""
        frozen_steps = timesteps > self.split_timestep
        with th.no_grad():
            frozen = self.frozen.prepare(cond, timesteps) if bool(frozen_steps.any()) else []
        tuned = self.fine_tuned.prepare(cond, timesteps) if not bool(frozen_steps.all()) else []
        return [
            (self.frozen, frozen[j]) if bool(frozen_steps[j]) else (self.fine_tuned, tuned[j])
            for j in range(timesteps.shape[0])
        ]

    def step_eps(self, x: th.Tensor, prepared: tuple[Any, th.Tensor]) -> th.Tensor:
        network, tensor = prepared
        if network is self.frozen:
            with th.no_grad():
                return network.step_eps(x, tensor)
        return network.step_eps(x, tensor)


def _tensor_slots(module: nn.Module) -> list[tuple[dict[str, Any], str, Any, int | None]]:
    """Every place a tensor or submodule of ``module`` lives, as ``(dict, name, object, data_ptr or None)``: checking
    that each dict still holds the same object at the same address tells whether a trace made of these tensors is
    still valid, at a fraction of the cost of walking ``parameters()`` and ``buffers()``."""
    slots: list[tuple[dict[str, Any], str, Any, int | None]] = []
    for sub in module.modules():
        for name, child in sub._modules.items():
            slots.append((sub._modules, name, child, None))
        for store in (sub._parameters, sub._buffers):
            for name, tensor in store.items():
                slots.append((store, name, tensor, None if tensor is None else tensor.data_ptr()))
    return slots


def _split_net_arch(
    net_arch: list[int] | dict[str, list[int]] | None, value_net_arch: list[int] | None
) -> tuple[list[int], list[int]]:
    """(denoiser widths, value widths) from the ``net_arch`` / ``value_net_arch`` policy kwargs."""
    if isinstance(net_arch, dict):
        unknown = set(net_arch) - {"pi", "vf"}
        if unknown:
            raise ValueError(f"net_arch as a dict takes the keys 'pi' (denoiser) and 'vf' (value), got {sorted(unknown)}")
        if value_net_arch is not None and "vf" in net_arch:
            raise ValueError("give the value widths once: net_arch['vf'] or value_net_arch, not both")
        denoiser = list(net_arch.get("pi", DEFAULT_DENOISER_ARCH))
        value = list(net_arch.get("vf", value_net_arch if value_net_arch is not None else DEFAULT_VALUE_ARCH))
        return denoiser, value
    denoiser = list(DEFAULT_DENOISER_ARCH if net_arch is None else net_arch)
    value = list(DEFAULT_VALUE_ARCH if value_net_arch is None else value_net_arch)
    return denoiser, value
