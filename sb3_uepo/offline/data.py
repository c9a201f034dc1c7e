"""The dataset as the offline stages see it: :class:`OfflineData`, built once and passed to every stage.

Owns: the data conventions of the offline phase (observations normalised with the dataset's FIXED statistics, actions
scaled to [-1, 1] from the env's bounds, tensors on the training device) and the checks that the data fits the spaces.
Must not touch: reading datasets (``common/datasets``), any stage's training.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces


@dataclass
class OfflineData:
    """The dataset in the offline conventions (every stage reads these tensors)."""

    obs: torch.Tensor  # (N, O) normalised
    actions: torch.Tensor  # (N, A) in [-1, 1]
    rewards: torch.Tensor  # (N,)
    next_obs: torch.Tensor  # (N, O) normalised
    terminals: torch.Tensor  # (N,) float
    episode_starts: torch.Tensor  # (N,) bool
    obs_mean: np.ndarray  # (O,) the fixed normalisation, handed to the online policy
    obs_std: np.ndarray  # (O,)
    action_low: np.ndarray  # (A,) env bounds of the [-1, 1] scaling
    action_high: np.ndarray  # (A,)

    @classmethod
    def from_dataset(
        cls, dataset: Any, observation_space: spaces.Box, action_space: spaces.Box, device: torch.device | str = "cpu"
    ) -> OfflineData:
        """Validate ``dataset`` against the spaces and convert it.

        :param dataset: an :class:`~sb3_uepo.common.datasets.container.OfflineDataset`
        :param observation_space: the env's observation space (its shape is checked)
        :param action_space: the env's action space (its finite bounds define the [-1, 1] scaling)
        :param device: torch device of the tensors
        :raises ValueError: unbounded action space, too few transitions, or data that does not fit the spaces
        """
        from sb3_uepo.common.datasets.validation import validate_dataset

        ds = dataset
        validate_dataset(ds, observation_space=observation_space, action_space=action_space)
        low, high = action_space.low.astype(np.float64).reshape(-1), action_space.high.astype(np.float64).reshape(-1)
        if not (np.isfinite(low).all() and np.isfinite(high).all()) or (high <= low).any():
            raise ValueError(
                "pretrain: the action space needs finite bounds with high > low to scale actions to [-1, 1], "
                f"got low={low}, high={high}"
            )
        min_transitions = 2
        if len(ds) < min_transitions:
            raise ValueError(
                f"Dataset '{ds.name}' holds {len(ds)} transition(s); offline pretraining needs at least {min_transitions}."
            )
        stats = ds.statistics()
        mean, std = stats.obs_mean.astype(np.float32), stats.obs_std.astype(np.float32)
        actions = 2.0 * (ds.actions.astype(np.float64) - low) / (high - low) - 1.0
        outside = np.abs(actions) > 1.0 + 1e-6
        if outside.any():
            warnings.warn(
                f"Dataset '{ds.name}': {int(outside.any(1).sum())} action(s) slightly outside the action bounds were clipped.",
                stacklevel=3,
            )

        def t(x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)

        return cls(
            obs=t((ds.observations - mean) / std),
            actions=t(np.clip(actions, -1.0, 1.0)),
            rewards=t(ds.rewards),
            next_obs=t((ds.next_observations - mean) / std),
            terminals=t(ds.terminals),
            episode_starts=t(ds.episode_starts, torch.bool),
            obs_mean=mean,
            obs_std=std,
            action_low=low.astype(np.float32),
            action_high=high.astype(np.float32),
        )
