"""Task termination rules on normalised observations, for model rollouts (OPE) and the augmentation filter.

Owns: :func:`termination_fn_for` and the rules it returns. Must not touch: environments (the rules are
re-implemented on observations, read from gymnasium 1.x's ``gymnasium/envs/mujoco/*_v5.py``), the dynamics
model, policies.

The rules, in the RAW observation of the default v5 (and v4) layout, i.e. x (and y for Ant / Humanoid) excluded
from the observation; a layout that includes them is recognised by its dimension and shifted:

============== ============================================================================================
Hopper         healthy iff ``0.7 < z``, ``-0.2 < angle < 0.2`` and ``-100 < obs[1:] < 100`` (z = obs[0], angle =
               obs[1]); all strict, as ``Hopper.is_healthy``
Walker2d       healthy iff ``0.8 < z < 2.0`` and ``-1 < angle < 1`` (z = obs[0], angle = obs[1]); strict
Ant            healthy iff every entry is finite and ``0.2 <= z <= 1.0`` (z = obs[0]); inclusive
Humanoid       healthy iff ``1.0 < z < 2.0`` (z = obs[0]); strict
InvertedPendulum terminated iff some entry is not finite or ``|obs[1]| > 0.2``
HalfCheetah, Swimmer, Reacher, Pusher, HumanoidStandup, Pendulum, Adroit (pen, door, hammer, relocate): never
anything else  never, with a warning (the caller can pass its own rule)
============== ============================================================================================

Known deviation: Hopper's state check in gymnasium uses the UNCLIPPED joint velocities (``state_vector()``),
while the observation clips them to +-10; an observation cannot show a velocity beyond 100, so a Hopper whose
joints spin faster than 100 rad/s terminates in the simulator but not here (never seen in practice).
InvertedDoublePendulum terminates on the tip height, which is not in its observation: it falls back to "never".
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import numpy as np
import torch

TerminationFn = Callable[[torch.Tensor], torch.Tensor]

# Tasks that never terminate (their v5 ``step`` returns ``terminated=False``); keys are normalised names.
_NEVER = {
    "halfcheetah",
    "swimmer",
    "reacher",
    "pusher",
    "humanoidstandup",
    "pendulum",
    "pen",
    "door",
    "hammer",
    "relocate",
    "adroithandpen",
    "adroithanddoor",
    "adroithandhammer",
    "adroithandrelocate",
}
_RULES = {"hopper", "walker2d", "walker", "ant", "humanoid", "invertedpendulum"}


class TerminationRule:
    """A task's termination rule on NORMALISED observations: ``rule(obs_norm (..., O)) -> (...,) bool``.

    :param name: the task family (``"hopper"``, ``"never"``, ...)
    :param obs_mean: (O,) mean used to normalise observations
    :param obs_std: (O,) std used to normalise observations
    """

    def __init__(self, name: str, obs_mean: torch.Tensor | np.ndarray, obs_std: torch.Tensor | np.ndarray) -> None:
        self.name = name
        self.obs_mean = torch.as_tensor(np.asarray(obs_mean), dtype=torch.float64).reshape(-1)
        self.obs_std = torch.as_tensor(np.asarray(obs_std), dtype=torch.float64).reshape(-1)
        self.obs_dim = int(self.obs_mean.numel())
        self._rule = getattr(self, f"_{name}")

    @property
    def never(self) -> bool:
        """True when the rule never terminates (callers may skip it)."""
        return self.name == "never"

    def __call__(self, obs_norm: torch.Tensor) -> torch.Tensor:
        if obs_norm.shape[-1] != self.obs_dim:
            raise ValueError(
                f"termination rule '{self.name}' expects observations of dim {self.obs_dim}, got {obs_norm.shape[-1]}"
            )
        raw = obs_norm.double() * self.obs_std.to(obs_norm.device) + self.obs_mean.to(obs_norm.device)
        return self._rule(raw)

    def __repr__(self) -> str:
        return f"TerminationRule({self.name!r}, obs_dim={self.obs_dim})"

    # ---------------------------------------------------------------------------------------- rules (raw obs)
    def _offset(self, default_dims: tuple[int, ...], n_positions: int) -> int:
        """Index shift of z when x (and y) are included in the observation (recognised by its dimension)."""
        return 0 if self.obs_dim in default_dims else n_positions

    def _never(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.zeros(raw.shape[:-1], dtype=torch.bool, device=raw.device)

    def _hopper(self, raw: torch.Tensor) -> torch.Tensor:
        i = self._offset((11,), 1)
        z, angle, state = raw[..., i], raw[..., i + 1], raw[..., i + 1 :]
        healthy = (z > 0.7) & (angle > -0.2) & (angle < 0.2) & ((state > -100.0) & (state < 100.0)).all(-1)
        return ~healthy

    def _walker2d(self, raw: torch.Tensor) -> torch.Tensor:
        i = self._offset((17,), 1)
        z, angle = raw[..., i], raw[..., i + 1]
        return ~((z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0))

    def _ant(self, raw: torch.Tensor) -> torch.Tensor:
        i = self._offset((27, 105, 111), 2)
        z = raw[..., i]
        return ~(torch.isfinite(raw).all(-1) & (z >= 0.2) & (z <= 1.0))

    def _humanoid(self, raw: torch.Tensor) -> torch.Tensor:
        i = self._offset((45, 348, 376), 2)
        z = raw[..., i]
        return ~((z > 1.0) & (z < 2.0))

    def _invertedpendulum(self, raw: torch.Tensor) -> torch.Tensor:
        return ~torch.isfinite(raw).all(-1) | (raw[..., 1].abs() > 0.2)


def task_name(env_id: str | None) -> str | None:
    """Normalised task family of a gymnasium id, a Minari dataset id or a D4RL name, or None when unknown.

    ``"Hopper-v5"``, ``"mujoco/hopper/medium-v0"`` and ``"hopper-medium-v2"`` all give ``"hopper"``.
    """
    if not env_id:
        return None
    for token in re.split(r"[/\-:]", env_id.lower().replace("_", "")):
        token = re.sub(r"v\d+$", "", token)
        if token in _RULES:
            return "walker2d" if token == "walker" else token
        if token in _NEVER:
            return "never"
    return None


def termination_fn_for(
    env_id: str | None, obs_mean: torch.Tensor | np.ndarray, obs_std: torch.Tensor | np.ndarray, warn: bool = True
) -> TerminationRule:
    """The termination rule of a task, acting on observations normalised with ``obs_mean`` / ``obs_std``.

    :param env_id: gymnasium id (``"Hopper-v5"``), Minari dataset id (``"mujoco/hopper/medium-v0"``) or D4RL
        name; None or an unknown task gives a rule that never terminates (with a warning)
    :param obs_mean: (O,) observation mean of the dataset
    :param obs_std: (O,) observation std of the dataset
    :param warn: warn when the task is unknown
    :return: callable ``(obs_norm (..., O)) -> (...,) bool`` (a :class:`TerminationRule`)
    """
    name = task_name(env_id)
    if name is None:
        if warn:
            warnings.warn(
                f"No termination rule is known for task {env_id!r}: model rollouts will never terminate. "
                "Pass a custom termination function if the task has early termination.",
                stacklevel=2,
            )
        name = "never"
    return TerminationRule(name, obs_mean, obs_std)
