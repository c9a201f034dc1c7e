"""Checks that a dataset can be trained on, and fits the environment it will be used with.

Owns: :class:`DatasetError` (the one exception of the dataset layer) and :func:`validate_dataset`.
Every message names the dataset, the field and the fix.
Must not touch: file formats (see ``loaders.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    import gymnasium as gym

    from sb3_uepo.common.datasets.container import OfflineDataset

# Actions may exceed the env bounds by this fraction of the bound range (float32 round-off, exported clipping).
ACTION_BOUNDS_TOLERANCE = 1e-3


class DatasetError(ValueError):
    """A dataset is missing, unreadable, or does not fit: the message says which dataset, which field and the fix."""


def validate_dataset(
    dataset: OfflineDataset,
    env: gym.Env | str | Any | None = None,
    *,
    observation_space: gym.spaces.Space | None = None,
    action_space: gym.spaces.Space | None = None,
) -> None:
    """Raise :class:`DatasetError` when ``dataset`` cannot be trained on, or does not fit an environment.

    Always checked: the dataset holds transitions, and no field holds NaN or inf. With an environment
    (or spaces): observation and action shapes, and actions inside the action bounds.

    :param dataset: the dataset to check
    :param env: a gymnasium env, a VecEnv, or an env id (made and closed here); optional
    :param observation_space: observation space to check against (default: the env's)
    :param action_space: action space to check against (default: the env's)
    """
    check_not_empty(dataset)
    check_finite(dataset)
    env_name = None
    if env is not None:
        observation_space, action_space, env_name = _spaces_of(env, observation_space, action_space)
    if observation_space is not None:
        check_observation_space(dataset, observation_space, env_name)
    if action_space is not None:
        check_action_space(dataset, action_space, env_name)


def check_not_empty(dataset: OfflineDataset) -> None:
    """The dataset holds at least one transition, and every episode at least one step."""
    if len(dataset) == 0:
        raise DatasetError(
            f"Dataset '{dataset.name}': field 'observations' is empty (0 transitions). "
            "Fix: check the source file or id; make a dataset with "
            "`uepo data make --env ENV --level medium --steps N --out ID`."
        )
    lengths = dataset.episode_lengths()
    if (lengths == 0).any():  # only reachable with hand-built containers
        raise empty_episode_error(dataset.name, int(np.flatnonzero(lengths == 0)[0]))


def empty_episode_error(dataset_name: str, episode_index: int | str) -> DatasetError:
    """The error for an episode without a single step (shared by the loaders)."""
    return DatasetError(
        f"Dataset '{dataset_name}': episode {episode_index} has no steps (field 'actions' is empty). "
        "Fix: drop empty episodes when writing the dataset (an episode needs at least one action)."
    )


def check_finite(dataset: OfflineDataset) -> None:
    """No NaN or inf in any float field."""
    for field_name in ("observations", "actions", "rewards", "next_observations"):
        values = getattr(dataset, field_name)
        bad = ~np.isfinite(values)
        if bad.any():
            rows = np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))
            kind = "NaN" if np.isnan(values).any() else "inf"
            raise DatasetError(
                f"Dataset '{dataset.name}': field '{field_name}' holds {kind} values in {len(rows)} transition(s), "
                f"first at index {int(rows[0])}. Fix: remove those transitions (or the episodes holding them) "
                "when exporting; an unstable simulation often produces them."
            )


def check_observation_space(dataset: OfflineDataset, observation_space: gym.spaces.Space, env_name: str | None = None) -> None:
    """Flat observations of the dataset have the size of the environment's (Box) observations."""
    expected = _box_shape(observation_space, dataset.name, "observations", env_name)
    if int(np.prod(expected)) != dataset.obs_dim:
        raise DatasetError(
            f"Dataset '{dataset.name}': field 'observations' has {dataset.obs_dim} values per step but {_env(env_name)} "
            f"expects shape {tuple(expected)}. Fix: use the environment the data was recorded in"
            f"{_recorded_in(dataset)}, or a dataset made for this environment (`uepo data make --env ...`)."
        )


def check_action_space(dataset: OfflineDataset, action_space: gym.spaces.Space, env_name: str | None = None) -> None:
    """Actions have the size of the environment's (Box) actions and stay inside its bounds."""
    expected = _box_shape(action_space, dataset.name, "actions", env_name)
    if int(np.prod(expected)) != dataset.action_dim:
        raise DatasetError(
            f"Dataset '{dataset.name}': field 'actions' has {dataset.action_dim} values per step but {_env(env_name)} "
            f"expects shape {tuple(expected)}. Fix: use the environment the data was recorded in"
            f"{_recorded_in(dataset)}, or a dataset made for this environment (`uepo data make --env ...`)."
        )
    box = cast("gym.spaces.Box", action_space)
    low = np.asarray(box.low, dtype=np.float64).reshape(-1)
    high = np.asarray(box.high, dtype=np.float64).reshape(-1)
    tolerance = ACTION_BOUNDS_TOLERANCE * np.where(np.isfinite(high - low), high - low, 0.0)
    seen_min = dataset.actions.min(axis=0).astype(np.float64)
    seen_max = dataset.actions.max(axis=0).astype(np.float64)
    outside = (seen_min < low - tolerance) | (seen_max > high + tolerance)
    if outside.any():
        dim = int(np.flatnonzero(outside)[0])
        raise DatasetError(
            f"Dataset '{dataset.name}': field 'actions' dimension {dim} spans [{seen_min[dim]:.4g}, {seen_max[dim]:.4g}], "
            f"outside the bounds [{low[dim]:.4g}, {high[dim]:.4g}] of {_env(env_name)} "
            f"({int(outside.sum())} of {len(outside)} dimensions out of bounds). Fix: the data may come from another "
            "environment or be stored rescaled; clip or rescale the actions to the env's bounds when exporting "
            "(np.clip(actions, low, high)), or use the matching environment."
        )


# ---------------------------------------------------------------------------------------------- helpers
def _spaces_of(
    env: Any, observation_space: gym.spaces.Space | None, action_space: gym.spaces.Space | None
) -> tuple[gym.spaces.Space, gym.spaces.Space, str]:
    if isinstance(env, str):
        import gymnasium as gym

        try:
            made = gym.make(env)
        except Exception as exc:
            raise DatasetError(f"Cannot make environment '{env}' to validate a dataset against it: {exc}") from exc
        try:
            return _first(observation_space, made.observation_space), _first(action_space, made.action_space), env
        finally:
            made.close()
    spec = getattr(env, "spec", None)
    name = getattr(spec, "id", None) or type(env).__name__
    return _first(observation_space, env.observation_space), _first(action_space, env.action_space), name


def _first(given: gym.spaces.Space | None, default: gym.spaces.Space) -> gym.spaces.Space:
    return default if given is None else given


def _box_shape(space: gym.spaces.Space, dataset_name: str, field_name: str, env_name: str | None) -> tuple[int, ...]:
    shape = getattr(space, "shape", None)
    if type(space).__name__ != "Box" or shape is None:
        raise DatasetError(
            f"Dataset '{dataset_name}': field '{field_name}' must match a continuous Box space, but {_env(env_name)} "
            f"has {space}. Fix: UEPO needs Box observations and actions; flatten dict observations "
            "(gymnasium.wrappers.FlattenObservation) and use a continuous-action environment."
        )
    return tuple(shape)


def _env(env_name: str | None) -> str:
    return f"environment '{env_name}'" if env_name else "the given space"


def _recorded_in(dataset: OfflineDataset) -> str:
    return f" ('{dataset.env_id}')" if dataset.env_id else ""
