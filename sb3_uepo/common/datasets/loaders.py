"""One loader for every dataset source: :func:`load_dataset` returns an :class:`OfflineDataset`.

Owns: resolving a source (embedded name, Minari id, Minari dataset directory, D4RL-format HDF5, ``.npz``)
and converting its arrays to the flat, aligned container; the fast offline check before a Minari download.
Must not touch: what the data is used for; validation rules live in ``validation.py``.

Alignment rules
---------------
* Minari: an episode of ``T`` steps holds ``T + 1`` observations. ``observations = obs[:-1]``,
  ``next_observations = obs[1:]``, ``terminals = terminations``, ``timeouts = truncations``.
* D4RL HDF5 / ``.npz`` (keys ``observations, actions, rewards, terminals`` and optional
  ``timeouts, next_observations``): an episode ends after a transition with ``terminals`` or ``timeouts``.
  When ``next_observations`` is missing it is derived from the next row of the same episode. The last
  transition of an episode has no next row: if it is terminal it is kept (its terminal flag matters for
  value learning) with ``next_observation = observation`` as a placeholder that is never bootstrapped from;
  otherwise (timeout, or the file ends mid-episode) it is dropped and the transition before it is marked
  as a timeout. ``metadata["derived_next_observations"]`` records that this happened.

Optional extras read from D4RL/npz files: ``env_id``, ``ref_min_score``, ``ref_max_score`` (HDF5 root
attributes or npz scalar entries).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from sb3_uepo.common.datasets.container import OfflineDataset
from sb3_uepo.common.datasets.embedded import embedded_dataset_path
from sb3_uepo.common.datasets.validation import DatasetError, empty_episode_error, validate_dataset

FLAT_REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
FLAT_OPTIONAL_KEYS = ("timeouts", "next_observations")
HDF5_SUFFIXES = (".hdf5", ".h5", ".hdf")
# Seconds to wait for a TCP connection to the Minari remote before declaring the machine offline.
NETWORK_PROBE_TIMEOUT_S = 3.0
_REMOTE_HOSTS = {"hf": "huggingface.co", "gcp": "storage.googleapis.com"}
# Gymnasium ids for the D4RL tasks, used in "how to make this dataset" hints.
_MAKE_HINT_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}


def load_dataset(source: str | os.PathLike, env: Any = None, download: bool = True) -> OfflineDataset:
    """Load a dataset of episodes as one flat, aligned :class:`OfflineDataset`, and validate it.

    ``source`` may be:

    * the name of the dataset embedded in the package (``"hopper-medium-v0"``, see ``uepo data list``),
    * a Minari dataset id, local (under ``MINARI_DATASETS_PATH``, default ``~/.minari/datasets``) or remote
      (downloaded when ``download`` and the network allow; offline, a clear error comes within seconds),
    * a path to a Minari dataset directory (the one holding ``data/``),
    * a D4RL-format HDF5 file or an ``.npz`` file with the same keys.

    :param source: dataset name, Minari id or path
    :param env: optional env, VecEnv or env id to check observation/action shapes and action bounds against
    :param download: download a Minari id that is not available locally
    :return: the dataset
    :raises DatasetError: the dataset is missing, unreadable, or does not fit ``env``
    """
    dataset = read_dataset(source, download=download)
    validate_dataset(dataset, env)
    return dataset


def read_dataset(source: str | os.PathLike, download: bool = True) -> OfflineDataset:
    """Like :func:`load_dataset` without validation (for tools that inspect broken data)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return _read_path(path, text)
    embedded = embedded_dataset_path(text)
    if embedded is not None:
        dataset = read_minari_directory(embedded, name=text)
        dataset.metadata["embedded"] = True
        return dataset
    if _looks_like_path(text):
        raise DatasetError(
            f"Dataset '{text}': file not found. Fix: check the path, or pass a Minari dataset id or the embedded "
            "dataset's name (`uepo data list` shows what is available)."
        )
    return read_minari_id(text, download=download)


# ---------------------------------------------------------------------------------------------- Minari
def minari_datasets_root() -> Path:
    """Where Minari keeps local datasets: ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets`` (not created here)."""
    root = os.environ.get("MINARI_DATASETS_PATH")
    return Path(root).expanduser() if root else Path.home() / ".minari" / "datasets"


def read_minari_id(dataset_id: str, download: bool = True) -> OfflineDataset:
    """Read a Minari dataset by id from the local Minari root; download it first if needed and allowed."""
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):
        raise DatasetError(
            f"Dataset '{dataset_id}': not a file, not the embedded dataset, and not a Minari id "
            "(ids look like 'namespace/name-v0'). Fix: `uepo data list` shows the datasets available here."
        ) from None
    local_dir = minari_datasets_root() / dataset_id
    if (local_dir / "data").is_dir():
        return read_minari_directory(local_dir, name=dataset_id)
    hint = _how_to_make_hint(dataset_id)
    if not download:
        raise DatasetError(f"Dataset '{dataset_id}': not found locally at {local_dir} and download=False. Fix: {hint}")
    reachable, reason = remote_reachable()
    if not reachable:
        raise DatasetError(
            f"Dataset '{dataset_id}': not found locally at {local_dir}, and the Minari remote cannot be reached "
            f"({reason}). Fix: {hint}"
        )
    import minari

    try:
        minari.download_dataset(dataset_id)
    except Exception as exc:  # httpx / huggingface_hub / ValueError for unknown ids
        raise DatasetError(f"Dataset '{dataset_id}': download from the Minari remote failed: {exc}. Fix: {hint}") from exc
    return read_minari_directory(local_dir, name=dataset_id)


def read_minari_directory(path: str | os.PathLike, name: str | None = None) -> OfflineDataset:
    """Read a Minari dataset directory (the one holding ``data/``, or ``data/`` itself)."""
    path = Path(path)
    name = name or str(path)
    data_path = path / "data" if (path / "data").is_dir() else path
    if not (data_path / "metadata.json").is_file():
        raise DatasetError(
            f"Dataset '{name}': directory {path} is not a Minari dataset (no data/metadata.json). "
            "Fix: pass the directory that holds 'data/', or a D4RL .hdf5 / .npz file."
        )
    from minari import MinariDataset

    try:
        minari_dataset = MinariDataset(data_path)
        metadata = json.loads((data_path / "metadata.json").read_text())
        episodes = list(minari_dataset.iterate_episodes())
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise _corrupt_error(name, data_path, exc) from exc
    except ValueError as exc:
        raise DatasetError(f"Dataset '{name}': Minari cannot read {data_path}: {exc}") from exc
    return _from_minari_episodes(name, episodes, metadata, data_path)


def _from_minari_episodes(name: str, episodes: list, metadata: dict, data_path: Path) -> OfflineDataset:
    columns: dict[str, list[np.ndarray]] = {key: [] for key in ("obs", "next_obs", "actions", "rewards", "term", "trunc")}
    for episode in episodes:
        if isinstance(episode.observations, (dict, tuple)):
            raise DatasetError(
                f"Dataset '{name}': field 'observations' is a {type(episode.observations).__name__} space. "
                "Fix: UEPO needs flat Box observations; flatten them when making the dataset."
            )
        n_steps = len(episode.rewards)
        if n_steps == 0:
            raise empty_episode_error(name, episode.id)
        observations = np.asarray(episode.observations)
        if len(observations) != n_steps + 1:
            raise DatasetError(
                f"Dataset '{name}': episode {episode.id} holds {len(observations)} observations for {n_steps} steps; "
                "field 'observations' of a Minari episode must hold one more (the final observation). "
                "Fix: re-create the dataset with the final observation of each episode."
            )
        observations = observations.reshape(n_steps + 1, -1)
        columns["obs"].append(observations[:-1])
        columns["next_obs"].append(observations[1:])
        columns["actions"].append(np.asarray(episode.actions).reshape(n_steps, -1))
        columns["rewards"].append(np.asarray(episode.rewards).reshape(-1))
        columns["term"].append(np.asarray(episode.terminations, dtype=bool).reshape(-1))
        columns["trunc"].append(np.asarray(episode.truncations, dtype=bool).reshape(-1))
    lengths = [len(r) for r in columns["rewards"]]
    starts = np.zeros(sum(lengths), dtype=bool)
    starts[np.cumsum([0, *lengths[:-1]])[: len(lengths)]] = True

    def stack(key: str) -> np.ndarray:
        return np.concatenate(columns[key]) if columns[key] else np.zeros((0, 1), dtype=np.float32)

    return OfflineDataset(
        name=name,
        observations=stack("obs"),
        actions=stack("actions"),
        rewards=stack("rewards"),
        next_observations=stack("next_obs"),
        terminals=stack("term"),
        timeouts=stack("trunc"),
        episode_starts=starts,
        env_id=_minari_env_id(metadata),
        ref_min_score=_optional_float(metadata.get("ref_min_score")),
        ref_max_score=_optional_float(metadata.get("ref_max_score")),
        metadata={**metadata, "format": "minari", "path": str(data_path.parent)},
    )


def _minari_env_id(metadata: dict) -> str | None:
    for key in ("env_spec", "eval_env_spec"):
        spec = metadata.get(key)
        if spec:
            try:
                return json.loads(spec)["id"]
            except (ValueError, KeyError, TypeError):
                continue
    return None


def remote_reachable(timeout: float = NETWORK_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the Minari remote answers a TCP connection within ``timeout`` seconds (via the HTTPS proxy if one is set).

    :return: ``(reachable, reason)``; ``reason`` says why not
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    host, port = _remote_address()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"no connection to {host}:{port} within {timeout:g} s: {exc}"


def _remote_address() -> tuple[str, int]:
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        proxy = os.environ.get(variable)
        if proxy:
            parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            return parts.hostname or "localhost", parts.port or 8080
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    return _REMOTE_HOSTS.get(remote.split("://", 1)[0], "huggingface.co"), 443


def _how_to_make_hint(dataset_id: str) -> str:
    from sb3_uepo.common.datasets.embedded import DEFAULT_DATASET
    from sb3_uepo.common.datasets.scores import task_from_id

    task = task_from_id(dataset_id)
    env_id = _MAKE_HINT_ENVS.get(task or "", "ENV_ID")
    levels = ("medium-replay", "medium-expert", "expert", "medium", "random")
    level = next((candidate for candidate in levels if candidate in dataset_id), "medium")
    return (
        f"make it locally with `uepo data make --env {env_id} --level {level} --steps 100000 --out {dataset_id}`, "
        f"or copy a downloaded Minari dataset directory to {minari_datasets_root() / dataset_id}, "
        f"or use the embedded dataset '{DEFAULT_DATASET}'."
    )


# ---------------------------------------------------------------------------------------------- files
def _read_path(path: Path, name: str) -> OfflineDataset:
    if path.is_dir():
        return read_minari_directory(path, name=name)
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        if path.name == "main_data.hdf5" and (path.parent / "metadata.json").is_file():
            return read_minari_directory(path.parent, name=name)
        return read_d4rl_hdf5(path, name=name)
    if suffix == ".npz":
        return read_npz(path, name=name)
    raise DatasetError(
        f"Dataset '{name}': unknown file type '{suffix}'. Fix: pass a Minari dataset directory, "
        "a D4RL-format .hdf5 file or an .npz file."
    )


def read_d4rl_hdf5(path: str | os.PathLike, name: str | None = None) -> OfflineDataset:
    """Read a D4RL-format HDF5 file (see the module docstring for keys and the alignment rule)."""
    import h5py

    path = Path(path)
    name = name or str(path)
    try:
        with h5py.File(path, "r") as file:
            arrays = {key: file[key][()] for key in (*FLAT_REQUIRED_KEYS, *FLAT_OPTIONAL_KEYS) if key in file}
            extras = {key: _attr_value(value) for key, value in file.attrs.items()}
    except (OSError, KeyError, ValueError) as exc:
        raise _corrupt_error(name, path, exc) from exc
    return from_flat_arrays(name, arrays, extras, source_format="d4rl-hdf5", path=path)


def read_npz(path: str | os.PathLike, name: str | None = None) -> OfflineDataset:
    """Read an ``.npz`` file with the D4RL keys."""
    import zipfile

    path = Path(path)
    name = name or str(path)
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = {key: file[key] for key in file.files if key in (*FLAT_REQUIRED_KEYS, *FLAT_OPTIONAL_KEYS)}
            extras = {key: file[key].item() for key in file.files if key not in arrays and file[key].ndim == 0}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise _corrupt_error(name, path, exc) from exc
    return from_flat_arrays(name, arrays, extras, source_format="npz", path=path)


def from_flat_arrays(
    name: str,
    arrays: dict[str, np.ndarray],
    extras: dict[str, Any] | None = None,
    source_format: str = "arrays",
    path: Path | None = None,
) -> OfflineDataset:
    """Build the container from D4RL-style flat arrays (see the module docstring for the alignment rule).

    :param name: dataset name for messages
    :param arrays: ``observations, actions, rewards, terminals`` and optionally ``timeouts, next_observations``
    :param extras: optional ``env_id``, ``ref_min_score``, ``ref_max_score`` and free-form metadata
    :param source_format: recorded in ``metadata["format"]``
    :param path: recorded in ``metadata["path"]``
    """
    extras = dict(extras or {})
    for key in FLAT_REQUIRED_KEYS:
        if key not in arrays:
            raise DatasetError(
                f"Dataset '{name}': field '{key}' is missing (found: {', '.join(sorted(arrays)) or 'nothing'}). "
                f"Fix: D4RL-format files need {', '.join(FLAT_REQUIRED_KEYS)} "
                f"(and optionally {', '.join(FLAT_OPTIONAL_KEYS)})."
            )
    n = len(arrays["observations"])
    observations = _rows(arrays["observations"])
    for key, values in arrays.items():
        if len(values) != n:
            raise DatasetError(
                f"Dataset '{name}': field '{key}' has {len(values)} rows but 'observations' has {n}. "
                "Fix: every field needs one row per transition; re-export the file."
            )
    terminals = np.asarray(arrays["terminals"]).astype(bool).reshape(-1)
    timeouts = np.asarray(arrays.get("timeouts", np.zeros(n))).astype(bool).reshape(-1)
    dones = terminals | timeouts
    starts = np.zeros(n, dtype=bool)
    if n:
        starts[0] = True
        starts[1:] = dones[:-1]
    keep = np.ones(n, dtype=bool)
    if "next_observations" in arrays:
        next_observations = _rows(arrays["next_observations"])
    else:
        next_observations = np.empty_like(observations)
        next_observations[:-1] = observations[1:]
        last_of_episode = np.zeros(n, dtype=bool)
        last_of_episode[:-1] = starts[1:]
        if n:
            last_of_episode[-1] = True
        placeholder = last_of_episode & terminals
        next_observations[placeholder] = observations[placeholder]
        keep = ~(last_of_episode & ~terminals)
        # the transition before a dropped one now ends its episode by a timeout
        timeouts = timeouts.copy()
        timeouts[:-1] |= keep[:-1] & ~keep[1:] & ~starts[1:]
        extras["derived_next_observations"] = True
        extras["dropped_transitions"] = int((~keep).sum())
    return OfflineDataset(
        name=name,
        observations=observations[keep],
        actions=_rows(arrays["actions"])[keep],
        rewards=np.asarray(arrays["rewards"]).reshape(-1)[keep],
        next_observations=next_observations[keep],
        terminals=terminals[keep],
        timeouts=timeouts[keep],
        episode_starts=_starts_after_filter(starts, keep),
        env_id=extras.pop("env_id", None),
        ref_min_score=_optional_float(extras.pop("ref_min_score", None)),
        ref_max_score=_optional_float(extras.pop("ref_max_score", None)),
        metadata={**extras, "format": source_format, **({"path": str(path)} if path is not None else {})},
    )


def _starts_after_filter(starts: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Episode starts after dropping rows: an episode whose first row was dropped starts at its next kept row."""
    episode_id = np.cumsum(starts)
    kept_ids = episode_id[keep]
    new_starts = np.ones(len(kept_ids), dtype=bool)
    new_starts[1:] = kept_ids[1:] != kept_ids[:-1]
    return new_starts


# ---------------------------------------------------------------------------------------------- helpers
def _rows(values: np.ndarray) -> np.ndarray:
    """(N, ...) -> (N, D), also for N = 0."""
    values = np.asarray(values)
    return values.reshape(len(values), int(np.prod(values.shape[1:])) if values.ndim > 1 else 1)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).suffix.lower() in (*HDF5_SUFFIXES, ".npz")


def _corrupt_error(name: str, path: Path, exc: BaseException) -> DatasetError:
    return DatasetError(
        f"Dataset '{name}': {path} is unreadable, probably truncated or corrupt ({type(exc).__name__}: {exc}). "
        "Fix: download or make it again (`uepo data make ...`); an interrupted copy leaves such files."
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------- catalogue
def list_datasets() -> list[dict[str, Any]]:
    """Datasets available without a download: the embedded ones, then the local Minari ones (sorted by id).

    :return: one dict per dataset with ``id``, ``location`` ("embedded" or "local"), ``path``, ``env_id``,
        ``total_episodes``, ``total_steps`` and ``description``
    """
    from sb3_uepo.common.datasets.embedded import embedded_datasets

    entries = [_catalogue_entry(name, directory, "embedded") for name, directory in embedded_datasets().items()]
    root = minari_datasets_root()
    if root.is_dir():
        local = []
        for metadata_file in root.rglob("data/metadata.json"):
            directory = metadata_file.parent.parent
            relative = directory.relative_to(root)
            if any(part.startswith(".") for part in relative.parts):  # staging and temporary directories
                continue
            local.append(_catalogue_entry(relative.as_posix(), directory, "local"))
        entries += sorted(local, key=lambda entry: entry["id"])
    return entries


def _catalogue_entry(dataset_id: str, directory: Path, location: str) -> dict[str, Any]:
    try:
        metadata = json.loads((directory / "data" / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError):
        metadata = {"description": "unreadable metadata.json"}
    return {
        "id": dataset_id,
        "location": location,
        "path": str(directory),
        "env_id": _minari_env_id(metadata),
        "total_episodes": metadata.get("total_episodes"),
        "total_steps": metadata.get("total_steps"),
        "description": metadata.get("description", ""),
    }
