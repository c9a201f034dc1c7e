"""Noise-space steering: keep the pretrained diffusion policy frozen and learn, with an SB3 off-policy algorithm, which
initial noise to give its deterministic sampler in each state (DSRL, Wagenmaker et al. 2025).

Owns: :class:`NoiseSteeringWrapper` (a gymnasium wrapper whose action is the noise ``w``; the env receives the frozen
policy's DDIM action from ``x_0 = w``), :func:`decode_noise` (noise -> env action, batched), its inverse
:func:`invert_noise` (actions -> the noises that produce them), :class:`ActionCriticSAC` (SB3's SAC whose critic
lives in the policy's ACTION space, ``Q(s, pi_DDIM(s, w))``, warm-started from the offline IQL critic: DSRL's
noise-aliasing idea) and :class:`SteeredModel` (the frozen policy and the off-policy agent as ONE model: ``learn``,
``predict`` (obs -> noise -> action), ``save`` / ``load``). Must not touch: the diffusion policy's weights (they never
change here), chain-PPO (``uepo.py``).

Why it works on a pretrained diffusion policy: the deterministic action is a function of the initial noise, and the
same weights act very differently from different noises (on Hopper 9.5 to 64.0 normalised from 16 fixed noises; see
docs/algorithm.md). Choosing the noise per state is a small, bounded action space (``A`` dims, ``|w| <= noise_bound``)
for SAC, and every action it produces stays on the policy's learned action manifold.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.policies import ContinuousCritic
from stable_baselines3.sac.policies import SACPolicy

from sb3_uepo.common.io import atomic_path
from sb3_uepo.common.policies import DiffusionPolicy
from sb3_uepo.uepo.defaults import NOISE_BOUND, NOISE_PENALTY

STEERING_FORMAT = 1
CRITICS = ("noise", "action")


def frozen_policy(policy: DiffusionPolicy) -> DiffusionPolicy:
    """A copy of ``policy`` in eval mode with every parameter frozen (the steering never trains it)."""
    frozen = copy.deepcopy(policy).to("cpu")
    frozen.set_training_mode(False)
    frozen.requires_grad_(False)
    return frozen


def _ddim_action(policy: DiffusionPolicy, cond: th.Tensor, noise: th.Tensor) -> th.Tensor:
    """The policy's deterministic DDIM action from ``x_0 = noise``, clipped to [-1, 1] (the policy's action scale)."""
    chain = policy.sampler.sample_chain(policy.acting_eps_fn(), cond, x_init=noise, deterministic=True)
    return chain[:, -1].clamp(-1.0, 1.0)


@th.no_grad()
def decode_noise(policy: DiffusionPolicy, observations: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Env actions of the policy's deterministic DDIM chains started at ``x_0 = noise``.

    :param policy: the (frozen) diffusion policy
    :param observations: (B, O) or (O,) raw observations
    :param noise: (B, A) or (A,) initial noises
    :return: actions in the env's units, shaped like ``noise``
    """
    single = np.ndim(noise) == 1
    obs_t = th.as_tensor(np.atleast_2d(observations), dtype=th.float32)
    noise_t = th.as_tensor(np.atleast_2d(noise), dtype=th.float32)
    actions = policy.unscale_action(_ddim_action(policy, policy.normalize_observation(obs_t), noise_t).numpy())
    return actions[0] if single else actions


def invert_noise(
    policy: DiffusionPolicy,
    observations: np.ndarray,
    actions: np.ndarray,
    iterations: int = 300,
    learning_rate: float = 0.05,
    n_starts: int = 16,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The initial noises whose deterministic DDIM actions are closest to given actions: the inverse of
    :func:`decode_noise`, found by gradient descent (Adam) on ``w`` through the frozen chain. Each search starts at the
    best of ``w = 0`` and ``n_starts - 1`` draws from the prior ``N(0, I)`` (the chain clips its ``x_0`` estimate, so
    from a start where that clip binds the gradient is zero).

    What it is for: mapping logged ``(s, a)`` pairs into the steering agent's noise space (e.g. to seed its replay
    buffer). An action the policy cannot produce from any noise (outside its learned action manifold) keeps a residual,
    which the second return value reports.

    :param policy: the diffusion policy (not changed: a frozen copy is used when its parameters require gradients)
    :param observations: (B, O) raw observations
    :param actions: (B, A) actions in the env's units
    :param iterations: Adam steps
    :param learning_rate: Adam's step size on ``w``
    :param n_starts: candidate starting noises per action (``w = 0`` among them)
    :param seed: seed of the candidate draws
    :return: the noises (B, A) and the residuals (B,): root-mean-square error over action dims of the decoded action,
        in the policy's [-1, 1] action scale
    """
    if any(p.requires_grad for p in policy.parameters()):
        policy = frozen_policy(policy)
    obs_t = th.as_tensor(np.atleast_2d(observations), dtype=th.float32)
    low, high = policy.action_space.low, policy.action_space.high  # type: ignore[attr-defined]
    target = th.as_tensor(policy.scale_action(np.clip(np.atleast_2d(actions), low, high)), dtype=th.float32)
    if obs_t.shape[0] != target.shape[0]:
        raise ValueError(f"{obs_t.shape[0]} observations but {target.shape[0]} actions")
    cond = policy.normalize_observation(obs_t)
    n, dim = target.shape
    generator = th.Generator().manual_seed(seed)
    candidates = th.cat([th.zeros(1, n, dim), th.randn(max(n_starts - 1, 0), n, dim, generator=generator)])
    with th.no_grad():
        decoded = _ddim_action(policy, cond.repeat(len(candidates), 1), candidates.reshape(-1, dim))
        errors = (decoded.reshape(len(candidates), n, dim) - target).square().sum(-1)  # (starts, n)
        start = candidates[errors.argmin(0), th.arange(n)]
    with th.enable_grad():
        noise = start.clone().requires_grad_(True)
        optimizer = th.optim.Adam([noise], lr=learning_rate)
        for _ in range(iterations):
            loss = (_ddim_action(policy, cond, noise) - target).square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with th.no_grad():
        residual = (_ddim_action(policy, cond, noise) - target).square().mean(-1).sqrt()
    return noise.detach().numpy(), residual.numpy()


class NoiseSteeringWrapper(gym.Wrapper):
    """The action is the initial noise ``w`` (a Box of half-width ``noise_bound``); the wrapped env receives the frozen
    diffusion policy's deterministic action from ``x_0 = w`` in the current state.

    The agent's reward is the env's minus ``noise_penalty * ||w||^2``: up to a constant, the log-density of a Gaussian
    prior ``N(0, I / (2 * noise_penalty))`` on the noise, so that steering leaves the pretrained policy's own action
    (``w = 0``) only where the return pays for it. Put a ``Monitor`` inside this wrapper (``make_vec_env`` does) and the
    episode returns it records stay the env's own.

    :param env: the environment the diffusion policy acts in
    :param policy: the diffusion policy (frozen here: a copy is taken)
    :param noise_bound: ``|w_i| <= noise_bound`` (DSRL uses about 1.5-2.5 with base policies that act well from any
        noise; ours act best near ``w = 0``)
    :param noise_penalty: ``lambda`` of the reward term ``-lambda * ||w||^2`` (0: none)
    """

    def __init__(
        self, env: gym.Env, policy: DiffusionPolicy, noise_bound: float = NOISE_BOUND, noise_penalty: float = NOISE_PENALTY
    ) -> None:
        super().__init__(env)
        if noise_bound <= 0:
            raise ValueError(f"noise_bound must be > 0, got {noise_bound}")
        if noise_penalty < 0:
            raise ValueError(f"noise_penalty must be >= 0, got {noise_penalty}")
        self.noise_penalty = float(noise_penalty)
        if env.observation_space.shape != policy.observation_space.shape:
            raise ValueError(
                f"the diffusion policy takes observations of shape {policy.observation_space.shape}, "
                f"the env gives {env.observation_space.shape}"
            )
        self.policy = policy if not any(p.requires_grad for p in policy.parameters()) else frozen_policy(policy)
        self.noise_bound = float(noise_bound)
        self.action_space = spaces.Box(-self.noise_bound, self.noise_bound, (policy.action_dim,), np.float32)
        self._last_obs: np.ndarray | None = None

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._last_obs = np.asarray(obs)
        return obs, info

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self._last_obs is None:
            raise RuntimeError("call reset() before step()")
        noise = np.clip(np.asarray(action, dtype=np.float32), -self.noise_bound, self.noise_bound)
        obs, reward, terminated, truncated, info = self.env.step(decode_noise(self.policy, self._last_obs, noise))
        self._last_obs = np.asarray(obs)
        if self.noise_penalty > 0:
            reward = float(reward) - self.noise_penalty * float(np.sum(noise * noise))
        return obs, reward, terminated, truncated, info


class ActionSpaceCritic(ContinuousCritic):
    """SAC's twin critic evaluated in the frozen diffusion policy's ACTION space: ``Q(s, w) = Q_A(s_n, pi(s, b w))``,
    with ``pi(s, x_0)`` the deterministic DDIM action (in [-1, 1]) of the initial noise ``x_0``, ``s_n`` the observation
    normalised with the policy's fixed statistics and ``b`` the noise bound (SB3 hands critics the agent's action
    rescaled to [-1, 1]).

    Every noise that gives the same action gets the same value, and ``Q_A`` has the offline IQL critic's inputs, so its
    weights can start from that critic (:meth:`ActionCriticSAC.load_action_critic`). The actor's gradient reaches
    ``w`` through the frozen chain. The diffusion policy is held outside the module tree (:meth:`set_decoder`): its
    weights are never trained, saved with the agent or moved by it.
    """

    def set_decoder(self, policy: DiffusionPolicy, noise_bound: float) -> None:
        self._decoder = (policy, float(noise_bound))  # a tuple: not registered as a submodule

    def action_input(self, obs: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """``[s_n, pi(s, b w)]``, the input of the action-space Q networks."""
        decoder = getattr(self, "_decoder", None)
        if decoder is None:
            raise RuntimeError("ActionSpaceCritic has no diffusion policy: call ActionCriticSAC.set_decoder(policy, bound)")
        policy, bound = decoder
        cond = policy.normalize_observation(obs.float())
        return th.cat([cond, _ddim_action(policy, cond, actions * bound)], dim=1)

    def forward(self, obs: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, ...]:
        q_input = self.action_input(obs, actions)
        return tuple(q_net(q_input) for q_net in self.q_networks)

    def q1_forward(self, obs: th.Tensor, actions: th.Tensor) -> th.Tensor:
        return self.q_networks[0](self.action_input(obs, actions))


class ActionCriticPolicy(SACPolicy):
    """SAC's ``MlpPolicy`` with :class:`ActionSpaceCritic` as critic and target critic."""

    def make_critic(self, features_extractor: Any = None) -> ContinuousCritic:
        critic_kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        return ActionSpaceCritic(**critic_kwargs).to(self.device)


class ActionCriticSAC(SAC):
    """SB3's SAC acting in the noise space of a frozen diffusion policy, with its critic in the ACTION space
    (:class:`ActionSpaceCritic`; DSRL's noise aliasing, Wagenmaker et al. 2025). SAC's own update runs unchanged:
    the critic's targets and the actor's gradient pass through the frozen DDIM chain.

    Call :meth:`set_decoder` before learning (``steer(..., critic="action")`` and :meth:`SteeredModel.load` do).
    """

    policy_aliases = {"MlpPolicy": ActionCriticPolicy}  # type: ignore[assignment]

    def set_decoder(self, policy: DiffusionPolicy, noise_bound: float) -> None:
        """Give the critic and its target the frozen diffusion policy that turns noises into actions."""
        for critic in (self.critic, self.critic_target):
            critic.set_decoder(policy, noise_bound)  # type: ignore[operator]

    def load_action_critic(self, q_state_dict: dict[str, th.Tensor]) -> bool:
        """Start both Q networks (and their targets) from the offline IQL critic's ``q1`` / ``q2`` (keys
        ``"q1.<param>"``, ``"q2.<param>"``), which take the same input: the normalised observation and the action in
        [-1, 1]. Returns False, changing nothing, when the layouts differ (e.g. another ``net_arch``).
        """
        nets = self.critic.q_networks
        states = [{k[len(f"q{i + 1}.") :]: v for k, v in q_state_dict.items() if k.startswith(f"q{i + 1}.")} for i in range(2)]
        if len(nets) != 2 or any(
            set(state) != set(net.state_dict()) or any(state[k].shape != v.shape for k, v in net.state_dict().items())
            for state, net in zip(states, nets, strict=True)
        ):
            return False
        with th.no_grad():
            for state, net in zip(states, nets, strict=True):
                net.load_state_dict(state)
        self.critic_target.load_state_dict(self.critic.state_dict())
        return True


class SteeredModel:
    """A frozen diffusion policy steered through its initial noise by an SB3 off-policy agent; one model.

    ``predict`` maps observations -> noise (the agent) -> actions (the frozen policy), so it evaluates like any SB3
    model (``evaluate_policy``, ``uepo eval``-style helpers).

    :param policy: the frozen diffusion policy
    :param agent: the SB3 off-policy algorithm (SAC, TD3, ...) acting in the noise space
    :param noise_bound: the half-width of the noise space
    :param noise_penalty: the prior term of the agent's reward (:class:`NoiseSteeringWrapper`)
    """

    def __init__(self, policy: DiffusionPolicy, agent: Any, noise_bound: float, noise_penalty: float = 0.0) -> None:
        self.policy, self.agent, self.noise_bound = policy, agent, float(noise_bound)
        self.noise_penalty = float(noise_penalty)
        if isinstance(agent, ActionCriticSAC):
            agent.set_decoder(policy, self.noise_bound)

    @property
    def num_timesteps(self) -> int:
        return int(self.agent.num_timesteps)

    def get_env(self) -> Any:
        """The agent's (noise-space) training environment."""
        return self.agent.get_env()

    def learn(self, total_timesteps: int, **kwargs: Any) -> SteeredModel:
        """The agent's ``learn`` in the noise space (the diffusion policy stays frozen)."""
        self.agent.learn(total_timesteps, **kwargs)
        return self

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """SB3's ``predict``: the agent chooses the noise, the frozen policy turns it into the env action."""
        noise, state = self.agent.predict(observation, state, episode_start, deterministic)
        return decode_noise(self.policy, observation, noise), state

    def save(self, path: str | os.PathLike) -> None:
        """One zip file (written atomically) holding the frozen policy, the agent and the steering settings."""
        agent_bytes, policy_bytes = io.BytesIO(), io.BytesIO()
        self.agent.save(agent_bytes)
        th.save(
            {"state_dict": self.policy.state_dict(), "constructor": self.policy._get_constructor_parameters()},
            policy_bytes,
        )
        meta = {
            "format": STEERING_FORMAT,
            "noise_bound": self.noise_bound,
            "noise_penalty": self.noise_penalty,
            "agent_class": type(self.agent).__name__,
        }
        with atomic_path(Path(path), suffix=".zip") as tmp, zipfile.ZipFile(tmp, "w") as archive:
            archive.writestr("steering.json", json.dumps(meta))
            archive.writestr("agent.zip", agent_bytes.getvalue())
            archive.writestr("diffusion_policy.pt", policy_bytes.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike, env: Any = None, agent_class: Any = None) -> SteeredModel:
        """Load a model written by :meth:`save`.

        :param path: the zip file
        :param env: an environment to continue learning in (already wrapped by :class:`NoiseSteeringWrapper`), or None
        :param agent_class: the SB3 algorithm class of the agent (default: looked up by name in stable_baselines3)
        """
        import stable_baselines3

        try:
            with zipfile.ZipFile(path) as archive:
                meta = json.loads(archive.read("steering.json"))
                agent_bytes = archive.read("agent.zip")
                payload = th.load(io.BytesIO(archive.read("diffusion_policy.pt")), map_location="cpu", weights_only=False)
        except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a steered model saved by SteeredModel.save ({exc})") from exc
        policy = DiffusionPolicy(**payload["constructor"])
        policy.load_state_dict(payload["state_dict"])
        if agent_class is None:
            name = meta["agent_class"]
            agent_class = ActionCriticSAC if name == ActionCriticSAC.__name__ else getattr(stable_baselines3, name)
        agent = agent_class.load(io.BytesIO(agent_bytes), env=env)
        return cls(frozen_policy(policy), agent, meta["noise_bound"], meta.get("noise_penalty", 0.0))


def steer(
    policy: DiffusionPolicy,
    env_id: str,
    agent_class: Any = None,
    noise_bound: float = NOISE_BOUND,
    n_envs: int = 1,
    seed: int | None = None,
    start_at_zero_noise: bool = True,
    noise_penalty: float = NOISE_PENALTY,
    critic: str = "noise",
    q_state_dict: dict[str, th.Tensor] | None = None,
    **agent_kwargs: Any,
) -> SteeredModel:
    """Build a :class:`SteeredModel`: ``agent_class`` (default SB3's SAC) in the noise space of a frozen copy of
    ``policy`` on ``env_id``. Call ``.learn(steps)`` on the result.

    :param policy: the pretrained diffusion policy (copied and frozen)
    :param env_id: the environment id
    :param agent_class: an SB3 off-policy algorithm class (default ``SAC``)
    :param noise_bound: half-width of the noise space
    :param n_envs: environments
    :param seed: seed of the agent and envs
    :param start_at_zero_noise: zero the agent's mean head (:func:`zero_actor_output`), so that steering starts at the
        pretrained policy's deterministic action (``x_0 = 0``)
    :param noise_penalty: ``lambda`` of the agent's reward term ``-lambda * ||w||^2`` (:class:`NoiseSteeringWrapper`)
    :param critic: ``"noise"``: the agent's critic takes the noise, ``Q(s, w)`` (DSRL-SAC); ``"action"``:
        :class:`ActionCriticSAC`, whose critic takes the frozen policy's action, ``Q(s, pi(s, w))`` (noise aliasing)
    :param q_state_dict: with ``critic="action"``, the offline IQL critic's ``q1.*`` / ``q2.*`` weights to start the
        critic from (:attr:`OfflineResult.q_state_dict`); None starts it fresh
    :param agent_kwargs: keyword arguments of the agent (``learning_starts``, ``buffer_size``, ...)
    """
    from stable_baselines3.common.env_util import make_vec_env

    if critic not in CRITICS:
        raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}")
    if critic == "action" and agent_class not in (None, SAC, ActionCriticSAC):
        raise ValueError(f"critic='action' steers with SAC (ActionCriticSAC); got agent_class={agent_class.__name__}")
    frozen = frozen_policy(policy)
    env = make_vec_env(
        env_id,
        n_envs=n_envs,
        seed=seed,
        wrapper_class=NoiseSteeringWrapper,
        wrapper_kwargs=dict(policy=frozen, noise_bound=noise_bound, noise_penalty=noise_penalty),
    )
    if critic == "action":
        agent = ActionCriticSAC("MlpPolicy", env, seed=seed, **agent_kwargs)
        agent.set_decoder(frozen, noise_bound)
        if q_state_dict is not None and not agent.load_action_critic(q_state_dict):
            warnings.warn(
                "the offline IQL critic's layout differs from the steering critic's (policy_kwargs net_arch): "
                "the action-space critic starts fresh"
            )
    else:
        agent = (agent_class or SAC)("MlpPolicy", env, seed=seed, **agent_kwargs)
    if start_at_zero_noise:
        zero_actor_output(agent)
    return SteeredModel(frozen, agent, noise_bound, noise_penalty)


def zero_actor_output(agent: Any) -> bool:
    """Zero the last linear layer of an SB3 actor's mean head (SAC's ``actor.mu``, TD3's ``actor.mu[-2]``), so that its
    deterministic noise is ``w = 0`` in every state: steering then starts exactly at the pretrained policy's own
    deterministic action instead of at a random offset from it.

    :return: whether a layer was found (False for agents without ``actor.mu``; they are left as built)
    """
    head = getattr(getattr(getattr(agent, "policy", None), "actor", None), "mu", None)
    modules = [head] if isinstance(head, th.nn.Module) else []
    layers = [m for module in modules for m in module.modules() if isinstance(m, th.nn.Linear)]
    if not layers:
        return False
    with th.no_grad():
        layers[-1].weight.zero_()
        layers[-1].bias.zero_()
    target = getattr(getattr(agent, "policy", None), "actor_target", None)  # TD3: keep the target equal to the actor
    if target is not None:
        target.load_state_dict(agent.policy.actor.state_dict())
    return True
