"""The one typed container every offline stage reads: :class:`OfflineDataset`.

Owns: flat transition arrays, episode boundaries, and statistics derived from them.
Must not touch: file formats (see ``loaders.py``), environments (see ``validation.py``).

Shape symbols: ``N`` transitions, ``E`` episodes, ``O`` observation dim, ``A`` action dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DatasetStatistics:
    """Summary statistics of an :class:`OfflineDataset` (all float64 numpy arrays or floats)."""

    obs_mean: np.ndarray  # (O,) per-dimension mean of observations
    obs_std: np.ndarray  # (O,) per-dimension std of observations, floored at 1e-6
    action_min: np.ndarray  # (A,) smallest action seen per dimension
    action_max: np.ndarray  # (A,) largest action seen per dimension
    n_episodes: int
    n_transitions: int
    return_mean: float  # undiscounted episode returns
    return_std: float
    return_min: float
    return_max: float
    episode_length_mean: float


@dataclass
class OfflineDataset:
    """Flat transitions of a dataset of episodes, aligned so that ``next_observations[i]`` follows
    ``observations[i]`` after ``actions[i]``.

    :param name: dataset id or path it was loaded from (used in error messages)
    :param observations: (N, O) float32
    :param actions: (N, A) float32, in the environment's action units (not rescaled)
    :param rewards: (N,) float32
    :param next_observations: (N, O) float32
    :param terminals: (N,) bool, true environment termination after this transition
    :param timeouts: (N,) bool, truncation (time limit) after this transition
    :param episode_starts: (N,) bool, True on the first transition of each episode
    :param env_id: gymnasium id of the environment that produced the data, when known
    :param ref_min_score: return of a random policy (normalised score 0), when known
    :param ref_max_score: return of an expert policy (normalised score 100), when known
    :param metadata: anything else the source carried (free-form)
    """

    name: str
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    episode_starts: np.ndarray
    env_id: str | None = None
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.observations = np.asarray(self.observations, dtype=np.float32)
        self.actions = np.asarray(self.actions, dtype=np.float32)
        self.rewards = np.asarray(self.rewards, dtype=np.float32).reshape(-1)
        self.next_observations = np.asarray(self.next_observations, dtype=np.float32)
        self.terminals = np.asarray(self.terminals, dtype=bool).reshape(-1)
        self.timeouts = np.asarray(self.timeouts, dtype=bool).reshape(-1)
        self.episode_starts = np.asarray(self.episode_starts, dtype=bool).reshape(-1)
        if self.observations.ndim == 1:
            self.observations = self.observations[:, None]
            self.next_observations = self.next_observations.reshape(-1, 1)
        if self.actions.ndim == 1:
            self.actions = self.actions[:, None]
        n = len(self.observations)
        for name in ("actions", "rewards", "next_observations", "terminals", "timeouts", "episode_starts"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"Dataset '{self.name}': field '{name}' has {len(getattr(self, name))} entries "
                    f"but 'observations' has {n}. "
                    "Every per-transition field must have one entry per transition; re-export the dataset."
                )
        if n > 0:
            self.episode_starts[0] = True

    # ------------------------------------------------------------------ shape helpers
    def __len__(self) -> int:
        return len(self.observations)

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    # ------------------------------------------------------------------ episodes
    def episode_slices(self) -> list[slice]:
        """One slice per episode into the flat arrays, in order."""
        starts = np.flatnonzero(self.episode_starts).tolist()
        ends = [*starts[1:], len(self)]
        return [slice(s, e) for s, e in zip(starts, ends, strict=True)]

    def episode_returns(self) -> np.ndarray:
        """(E,) undiscounted return of every episode."""
        return np.array([float(self.rewards[sl].sum()) for sl in self.episode_slices()], dtype=np.float64)

    def episode_lengths(self) -> np.ndarray:
        return np.array([sl.stop - sl.start for sl in self.episode_slices()], dtype=np.int64)

    @property
    def dones(self) -> np.ndarray:
        """(N,) bool, episode ended after this transition (terminal or timeout)."""
        return self.terminals | self.timeouts

    def statistics(self) -> DatasetStatistics:
        returns = self.episode_returns()
        if len(self) == 0:
            raise ValueError(f"Dataset '{self.name}' holds no transitions; it cannot be summarised or trained on.")
        return DatasetStatistics(
            obs_mean=self.observations.mean(0).astype(np.float64),
            obs_std=np.maximum(self.observations.std(0).astype(np.float64), 1e-6),
            action_min=self.actions.min(0).astype(np.float64),
            action_max=self.actions.max(0).astype(np.float64),
            n_episodes=len(returns),
            n_transitions=len(self),
            return_mean=float(returns.mean()),
            return_std=float(returns.std()),
            return_min=float(returns.min()),
            return_max=float(returns.max()),
            episode_length_mean=float(self.episode_lengths().mean()),
        )

    def subset_episodes(self, indices: list[int] | np.ndarray) -> OfflineDataset:
        """A new dataset holding only the given episodes (in the given order)."""
        slices = self.episode_slices()
        idx = (
            np.concatenate([np.arange(slices[i].start, slices[i].stop) for i in indices])
            if len(indices)
            else np.array([], int)
        )
        arrays = {
            f.name: getattr(self, f.name)[idx]
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)
        }
        return dataclasses.replace(self, **arrays)
