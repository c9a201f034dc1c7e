"""The dataset layer: every loader format, Minari N+1 alignment, validation errors, normalised scores, offline failure."""

import json
import subprocess
import sys
import time
import warnings

import h5py
import numpy as np
import pytest

from sb3_uepo.common.datasets import loaders
from sb3_uepo.common.datasets.scores import D4RL_REFERENCE_SCORES, reference_scores, task_from_id
from sb3_uepo.datasets import (
    DEFAULT_DATASET,
    DatasetError,
    OfflineDataset,
    list_datasets,
    load_dataset,
    normalized_score,
    validate_dataset,
)

OBS_DIM, ACTION_DIM = 11, 3  # Hopper-v5, so the hand-built data can be validated against the real env


# ---------------------------------------------------------------------------------------------- builders
def hand_built_episodes(lengths=(3, 4, 2), ends=("terminal", "timeout", "truncated")):
    """Episodes whose observation column 0 is ``100 * episode + t`` (t = 0..T, so T+1 observations),
    reward ``t``, action ``t / 10``: every misalignment shows up as a wrong number."""
    episodes = []
    for index, (length, end) in enumerate(zip(lengths, ends, strict=True)):
        observations = np.zeros((length + 1, OBS_DIM), dtype=np.float32)
        observations[:, 0] = 100 * index + np.arange(length + 1)
        terminations = np.zeros(length, dtype=bool)
        truncations = np.zeros(length, dtype=bool)
        (terminations if end == "terminal" else truncations)[-1] = True
        episodes.append(
            {
                "observations": observations,
                "actions": np.tile((np.arange(length, dtype=np.float32) / 10)[:, None], (1, ACTION_DIM)),
                "rewards": np.arange(length, dtype=np.float32),
                "terminations": terminations,
                "truncations": truncations,
            }
        )
    return episodes


def write_minari(dataset_id, episodes, metadata=None):
    """A Minari dataset written by Minari itself (no env needed), under the test's MINARI_DATASETS_PATH."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [EpisodeBuffer(id=i, **episode) for i, episode in enumerate(episodes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            observation_space=gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32),
            action_space=gym.spaces.Box(-1, 1, (ACTION_DIM,), np.float32),
        )
        if metadata:
            dataset.storage.update_metadata(metadata)
    return loaders.minari_datasets_root() / dataset_id


def flat_arrays(with_next=True):
    """D4RL-style flat arrays of three episodes: terminal (3 steps), timeout (4 steps), cut by the file end (2 steps)."""
    episodes = hand_built_episodes()
    arrays = {
        "observations": np.concatenate([e["observations"][:-1] for e in episodes]),
        "actions": np.concatenate([e["actions"] for e in episodes]),
        "rewards": np.concatenate([e["rewards"] for e in episodes]),
        "terminals": np.concatenate([e["terminations"] for e in episodes]),
        "timeouts": np.concatenate([e["truncations"] for e in episodes]),
    }
    arrays["timeouts"][-1] = False  # the file ends mid-episode
    if with_next:
        arrays["next_observations"] = np.concatenate([e["observations"][1:] for e in episodes])
    return arrays


def write_hdf5(path, arrays, attrs=None):
    with h5py.File(path, "w") as file:
        for key, values in arrays.items():
            file.create_dataset(key, data=values)
        file.attrs.update(attrs or {})
    return path


# ---------------------------------------------------------------------------------------------- formats
def test_minari_episodes_are_aligned_n_plus_one():
    write_minari("test/aligned-v0", hand_built_episodes())
    data = load_dataset("test/aligned-v0", env="Hopper-v5")
    assert isinstance(data, OfflineDataset) and len(data) == 3 + 4 + 2
    # observation t -> next observation t+1 within every episode, never across episodes
    np.testing.assert_array_equal(data.observations[:, 0], [0, 1, 2, 100, 101, 102, 103, 200, 201])
    np.testing.assert_array_equal(data.next_observations[:, 0], [1, 2, 3, 101, 102, 103, 104, 201, 202])
    np.testing.assert_array_equal(data.rewards, [0, 1, 2, 0, 1, 2, 3, 0, 1])
    np.testing.assert_allclose(data.actions[:, 0], [0, 0.1, 0.2, 0, 0.1, 0.2, 0.3, 0, 0.1])
    np.testing.assert_array_equal(data.terminals, [0, 0, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(data.timeouts, [0, 0, 0, 0, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(data.episode_starts, [1, 0, 0, 1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(data.episode_returns(), [3, 6, 1])
    assert data.metadata["format"] == "minari"


def test_minari_directory_path_and_main_file_path():
    directory = write_minari("test/by-path-v0", hand_built_episodes())
    by_dir = load_dataset(str(directory))
    by_file = load_dataset(directory / "data" / "main_data.hdf5")
    by_id = load_dataset("test/by-path-v0")
    for data in (by_dir, by_file):
        np.testing.assert_array_equal(data.observations, by_id.observations)
        np.testing.assert_array_equal(data.next_observations, by_id.next_observations)


def test_d4rl_hdf5_with_next_observations(tmp_path):
    path = write_hdf5(tmp_path / "hopper.hdf5", flat_arrays(with_next=True))
    data = load_dataset(path, env="Hopper-v5")
    assert len(data) == 9 and data.metadata["format"] == "d4rl-hdf5"
    np.testing.assert_array_equal(data.next_observations[:, 0], [1, 2, 3, 101, 102, 103, 104, 201, 202])
    np.testing.assert_array_equal(data.episode_starts, [1, 0, 0, 1, 0, 0, 0, 1, 0])


def test_d4rl_hdf5_without_next_observations_follows_the_documented_rule(tmp_path):
    path = write_hdf5(tmp_path / "hopper.hdf5", flat_arrays(with_next=False))
    data = load_dataset(path)
    # terminal episode: all 3 kept, the last next-observation is a placeholder (= its observation);
    # timeout episode: last transition dropped (no next row); file-end episode: likewise.
    np.testing.assert_array_equal(data.observations[:, 0], [0, 1, 2, 100, 101, 102, 200])
    np.testing.assert_array_equal(data.next_observations[:, 0], [1, 2, 2, 101, 102, 103, 201])
    np.testing.assert_array_equal(data.terminals, [0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(data.timeouts, [0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(data.episode_starts, [1, 0, 0, 1, 0, 0, 1])
    assert data.metadata["derived_next_observations"] and data.metadata["dropped_transitions"] == 2


def test_npz_matches_hdf5_and_carries_reference_scores(tmp_path):
    arrays = flat_arrays(with_next=True)
    np.savez(tmp_path / "hopper.npz", **arrays, env_id="Hopper-v5", ref_min_score=0.0, ref_max_score=10.0)
    data = load_dataset(tmp_path / "hopper.npz", env="Hopper-v5")
    reference = load_dataset(write_hdf5(tmp_path / "hopper.hdf5", arrays))
    np.testing.assert_array_equal(data.observations, reference.observations)
    assert data.env_id == "Hopper-v5" and data.metadata["format"] == "npz"
    assert normalized_score("Hopper-v5", 5.0, dataset=data) == pytest.approx(50.0)  # metadata overrides the table


def test_embedded_dataset_loads_by_name_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        pytest.fail("the embedded dataset must not touch the network")

    monkeypatch.setattr(loaders, "remote_reachable", no_network)
    data = load_dataset(DEFAULT_DATASET, env="Hopper-v5")
    stats = data.statistics()
    assert data.env_id == "Hopper-v5" and data.metadata["embedded"]
    assert stats.n_transitions >= 50_000 and stats.n_episodes > 10
    assert data.ref_min_score == pytest.approx(-20.272305) and data.ref_max_score == pytest.approx(3234.3)
    assert (data.episode_starts[1:] == data.dones[:-1]).all()


def test_list_datasets_shows_embedded_and_local():
    write_minari("test/listed-v0", hand_built_episodes())
    entries = {entry["id"]: entry for entry in list_datasets()}
    assert entries[DEFAULT_DATASET]["location"] == "embedded"
    assert entries["test/listed-v0"]["location"] == "local" and entries["test/listed-v0"]["total_steps"] == 9


def test_importing_the_dataset_api_stays_light():
    heavy = ("minari", "h5py", "torch", "stable_baselines3")
    code = f"import sys, sb3_uepo.datasets; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


# ---------------------------------------------------------------------------------------------- validation errors
def _assert_clear(error, *words):
    message = str(error.value)
    for word in ("Fix", *words):
        assert word in message, f"'{word}' missing from: {message}"


def _dataset(**changes):
    arrays = flat_arrays()
    arrays.update(changes)
    return loaders.from_flat_arrays("handmade", arrays)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"observations": np.zeros((9, 5))}, "observations"),
        ({"actions": np.zeros((9, 2))}, "actions"),
        ({"actions": np.full((9, 3), 2.0)}, "actions"),
    ],
    ids=["obs-shape", "action-shape", "action-bounds"],
)
def test_env_mismatch_errors(changes, field):
    if "observations" in changes:
        changes["next_observations"] = changes["observations"]
    with pytest.raises(DatasetError) as error:
        validate_dataset(_dataset(**changes), env="Hopper-v5")
    _assert_clear(error, "'handmade'", f"'{field}'", "Hopper-v5")


@pytest.mark.parametrize("field, value", [("observations", np.nan), ("rewards", np.inf), ("next_observations", -np.inf)])
def test_non_finite_values_are_reported(field, value):
    arrays = flat_arrays()
    arrays[field] = arrays[field].astype(np.float64)
    arrays[field].flat[5] = value
    with pytest.raises(DatasetError) as error:
        validate_dataset(loaders.from_flat_arrays("handmade", arrays))
    _assert_clear(error, "'handmade'", f"'{field}'", "NaN" if np.isnan(value) else "inf")


def test_empty_dataset_and_empty_episode(tmp_path):
    empty = {key: values[:0] for key, values in flat_arrays().items()}
    np.savez(tmp_path / "empty.npz", **empty)
    with pytest.raises(DatasetError) as error:
        load_dataset(tmp_path / "empty.npz")
    _assert_clear(error, "empty.npz", "'observations'", "empty")

    # Minari refuses to write an empty episode, so append one by hand, as a broken exporter would
    directory = write_minari("test/empty-episode-v0", hand_built_episodes(lengths=(3,), ends=("terminal",)))
    with h5py.File(directory / "data" / "main_data.hdf5", "a") as file:
        group = file.create_group("episode_1")
        group.create_dataset("observations", data=np.zeros((1, OBS_DIM), np.float32))
        for key, shape, dtype in (("actions", (0, 3), np.float32), ("rewards", (0,), np.float32)):
            group.create_dataset(key, data=np.zeros(shape, dtype))
        for key in ("terminations", "truncations"):
            group.create_dataset(key, data=np.zeros(0, bool))
    metadata_file = directory / "data" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "total_episodes": 2}))
    with pytest.raises(DatasetError) as error:
        load_dataset("test/empty-episode-v0")
    _assert_clear(error, "test/empty-episode-v0", "episode 1", "'actions'")


def test_missing_sources(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset(tmp_path / "nope.hdf5")
    _assert_clear(error, "nope.hdf5", "not found")
    with pytest.raises(DatasetError) as error:
        load_dataset("local/absent-v0", download=False)
    _assert_clear(error, "local/absent-v0", "uepo data make")
    with pytest.raises(DatasetError) as error:
        load_dataset(tmp_path)  # a directory that is not a Minari dataset
    _assert_clear(error, "metadata.json")
    np.savez(tmp_path / "no_actions.npz", observations=np.zeros((3, 11)), rewards=np.zeros(3), terminals=np.zeros(3))
    with pytest.raises(DatasetError) as error:
        load_dataset(tmp_path / "no_actions.npz")
    _assert_clear(error, "no_actions.npz", "'actions'")


@pytest.mark.parametrize("suffix", [".hdf5", ".npz", "minari"])
def test_corrupt_files(tmp_path, suffix):
    if suffix == "minari":
        path = write_minari("test/corrupt-v0", hand_built_episodes()) / "data" / "main_data.hdf5"
        source = "test/corrupt-v0"
    else:
        path = tmp_path / f"data{suffix}"
        if suffix == ".npz":
            np.savez(path, **flat_arrays())
        else:
            write_hdf5(path, flat_arrays())
        source = path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(DatasetError) as error:
        load_dataset(source)
    _assert_clear(error, "corrupt")


def test_remote_id_offline_fails_fast_with_instructions(monkeypatch):
    import socket

    with socket.socket() as probe:  # a local port nobody listens on: connection refused at once
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setattr(loaders, "_remote_address", lambda: ("127.0.0.1", closed_port))
    start = time.perf_counter()
    with pytest.raises(DatasetError) as error:
        load_dataset("mujoco/hopper/medium-v0")
    assert time.perf_counter() - start < 5
    _assert_clear(error, "mujoco/hopper/medium-v0", "cannot be reached", "uepo data make --env Hopper-v5 --level medium")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match="HF_HUB_OFFLINE"):
        load_dataset("D4RL/pen/human-v2")


# ---------------------------------------------------------------------------------------------- normalised scores
@pytest.mark.parametrize("task", sorted(D4RL_REFERENCE_SCORES))
def test_normalized_score_matches_d4rl_table(task):
    ref_min, ref_max = D4RL_REFERENCE_SCORES[task]
    assert normalized_score(task, ref_min) == pytest.approx(0.0)
    assert normalized_score(task, ref_max) == pytest.approx(100.0)
    np.testing.assert_allclose(normalized_score(task, np.array([ref_min, (ref_min + ref_max) / 2])), [0.0, 50.0])


def test_table_values():
    assert D4RL_REFERENCE_SCORES["hopper"] == (-20.272305, 3234.3)
    assert D4RL_REFERENCE_SCORES["halfcheetah"] == (-280.178953, 12135.0)
    assert D4RL_REFERENCE_SCORES["walker2d"] == (1.629008, 4592.3)
    assert D4RL_REFERENCE_SCORES["ant"] == (-325.6, 3879.7)
    assert D4RL_REFERENCE_SCORES["relocate"] == (-6.425911, 4233.8778)


@pytest.mark.parametrize(
    "name, task",
    [
        ("Hopper-v5", "hopper"),
        ("hopper-medium-v2", "hopper"),
        ("mujoco/hopper/medium-v0", "hopper"),
        ("HalfCheetah-v5", "halfcheetah"),
        ("halfcheetah-medium-expert-v2", "halfcheetah"),
        ("Walker2d-v4", "walker2d"),
        ("Ant-v5", "ant"),
        ("D4RL/pen/human-v2", "pen"),
        ("AdroitHandDoor-v1", "door"),
        ("hammer-cloned-v1", "hammer"),
        ("antmaze-umaze-v2", None),
        ("CartPole-v1", None),
    ],
)
def test_task_names(name, task):
    assert task_from_id(name) == task


def test_dataset_metadata_overrides_and_unknown_tasks_explain_the_fix():
    data = _dataset()
    data.ref_min_score, data.ref_max_score = 10.0, 20.0
    assert normalized_score("Hopper-v5", 15.0, dataset=data) == pytest.approx(50.0)
    assert reference_scores(None, data)[2].startswith("metadata")
    with pytest.raises(DatasetError, match="ref_min_score"):
        normalized_score("CartPole-v1", 1.0)
