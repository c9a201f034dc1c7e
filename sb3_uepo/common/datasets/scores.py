"""D4RL normalised scores: ``100 * (return - random) / (expert - random)``.

Owns: the reference table (random and expert returns per task), the mapping from an environment id,
a D4RL/Minari dataset id or a bare task name to a task, and :func:`normalized_score`.
Must not touch: files, environments.

Reference returns come from D4RL, ``d4rl/infos.py`` (``REF_MIN_SCORE`` / ``REF_MAX_SCORE``),
https://github.com/Farama-Foundation/D4RL/blob/master/d4rl/infos.py. D4RL gives the same pair for
every dataset of a task (``hopper-random``, ``hopper-medium``, ...), so one pair per task is enough.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, overload

import numpy as np

from sb3_uepo.common.datasets.validation import DatasetError

if TYPE_CHECKING:
    from sb3_uepo.common.datasets.container import OfflineDataset

# task -> (REF_MIN_SCORE: mean return of a random policy, REF_MAX_SCORE: mean return of the D4RL expert)
D4RL_REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "pen": (96.262799, 3076.8331),
    "door": (-56.512833, 2880.5693),
    "hammer": (-274.856578, 12794.1348),
    "relocate": (-6.425911, 4233.8778),
}

REFERENCE_SOURCE = "D4RL d4rl/infos.py REF_MIN_SCORE/REF_MAX_SCORE"

# Gymnasium / Gymnasium-Robotics spellings that are not the D4RL task name once lower-cased.
_TASK_ALIASES = {"half_cheetah": "halfcheetah", "walker": "walker2d"}


def task_from_id(env_id_or_task: str) -> str | None:
    """The D4RL task a name refers to, or None when it is not in the reference table.

    Accepts gymnasium ids (``"Hopper-v5"``, ``"AdroitHandPen-v1"``), D4RL ids (``"hopper-medium-v2"``),
    Minari ids (``"mujoco/hopper/medium-v0"``, ``"D4RL/pen/human-v2"``) and bare task names (``"hopper"``).

    :param env_id_or_task: environment id, dataset id or task name
    :return: the task key of :data:`D4RL_REFERENCE_SCORES`, or None
    """
    for token in re.split(r"[/\-\s]+", env_id_or_task.lower()):
        token = _TASK_ALIASES.get(token, token)
        token = token.removeprefix("adroithand")
        if token in D4RL_REFERENCE_SCORES:
            return token
    return None


def reference_scores(env_id_or_task: str | None, dataset: OfflineDataset | None = None) -> tuple[float, float, str]:
    """Random and expert reference returns for a task, and where they come from.

    A dataset's own ``ref_min_score`` / ``ref_max_score`` (Minari metadata) win over the D4RL table.

    :param env_id_or_task: environment id, dataset id or task name; may be None when ``dataset`` is given
    :param dataset: a loaded dataset whose reference scores (or env id / name) are used when present
    :return: ``(ref_min_score, ref_max_score, source)``
    """
    if dataset is not None and dataset.ref_min_score is not None and dataset.ref_max_score is not None:
        return float(dataset.ref_min_score), float(dataset.ref_max_score), f"metadata of dataset '{dataset.name}'"
    candidates = [env_id_or_task]
    if dataset is not None:
        candidates += [dataset.env_id, dataset.name]
    for candidate in candidates:
        task = task_from_id(candidate) if candidate else None
        if task is not None:
            ref_min, ref_max = D4RL_REFERENCE_SCORES[task]
            return ref_min, ref_max, f"{REFERENCE_SOURCE} ['{task}']"
    names = ", ".join(repr(c) for c in candidates if c)
    raise DatasetError(
        f"No reference scores for {names or 'an unnamed task'}: the D4RL table knows {', '.join(D4RL_REFERENCE_SCORES)}. "
        "Fix: store 'ref_min_score' and 'ref_max_score' in the dataset's Minari metadata "
        "(e.g. `uepo data make --target-return`, or `dataset.storage.update_metadata({...})`), "
        "or pass an env id of a known task."
    )


@overload
def normalized_score(env_id_or_task: str | None, ret: float, dataset: OfflineDataset | None = None) -> float: ...


@overload
def normalized_score(env_id_or_task: str | None, ret: np.ndarray, dataset: OfflineDataset | None = None) -> np.ndarray: ...


def normalized_score(
    env_id_or_task: str | None, ret: float | np.ndarray, dataset: OfflineDataset | None = None
) -> float | np.ndarray:
    """D4RL normalised score: 0 is a random policy, 100 the D4RL expert.

    ``score = 100 * (ret - ref_min_score) / (ref_max_score - ref_min_score)``. The reference returns come from
    the dataset's metadata when it carries them, else from the D4RL table (:data:`D4RL_REFERENCE_SCORES`).

    :param env_id_or_task: environment id (``"Hopper-v5"``), dataset id (``"hopper-medium-v2"``,
        ``"mujoco/hopper/medium-v0"``) or task name (``"hopper"``); may be None when ``dataset`` is given
    :param ret: undiscounted episode return(s)
    :param dataset: optional dataset whose ``ref_min_score`` / ``ref_max_score`` override the table
    :return: the normalised score(s), same shape as ``ret``
    """
    ref_min, ref_max, _ = reference_scores(env_id_or_task, dataset)
    score = 100.0 * (np.asarray(ret, dtype=np.float64) - ref_min) / (ref_max - ref_min)
    return float(score) if np.ndim(score) == 0 else score
