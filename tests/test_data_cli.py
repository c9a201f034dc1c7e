"""`uepo data make|info|list` end to end on tiny budgets (a few hundred steps, a few seconds each)."""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from sb3_uepo.cli import main
from sb3_uepo.common.datasets.generate import BEHAVIOR_POLICY_FILE, make_dataset
from sb3_uepo.datasets import DEFAULT_DATASET, DatasetError, load_dataset

TINY = ["--train-steps-max", "128", "--n-envs", "2", "--no-progress"]


def make_command(level, steps, out):
    return ["data", "make", "--env", "Hopper-v5", "--level", level, "--steps", str(steps), "--out", out, *TINY]


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "make", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("--level", "medium-replay", "one third of the expert return", "--train-steps-max", "MINARI_DATASETS_PATH"):
        assert words in text
    assert main(["data"]) == 0
    assert "Minari" in capsys.readouterr().out


def test_make_info_list_end_to_end(capsys):
    with pytest.warns(UserWarning, match="below its target"):  # 128 training steps cannot reach 'medium'
        code = main(make_command("medium", 300, "test/tiny-v0"))
    assert code == 0
    capsys.readouterr()

    data = load_dataset("test/tiny-v0", env="Hopper-v5", download=False)
    directory = data.metadata["path"]
    assert len(data) == 300 and data.timeouts[-1]  # the episode running at the end of the budget is truncated
    assert (data.episode_starts[1:] == data.dones[:-1]).all()
    assert data.ref_min_score == pytest.approx(-20.272305) and data.ref_max_score == pytest.approx(3234.3)
    assert data.metadata["uepo"]["level"] == "medium" and not data.metadata["uepo"]["target_reached"]
    assert (np.abs(data.actions) <= 1).all()
    assert (Path(directory) / BEHAVIOR_POLICY_FILE).is_file()

    assert main(["data", "info", "test/tiny-v0"]) == 0
    text = capsys.readouterr().out
    for words in ("episodes", "transitions", "300", "return", "mean", "std", "min", "max", "normalised score"):
        assert words in text

    assert main(["data", "info", "test/tiny-v0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = 100 * (data.statistics().return_mean + 20.272305) / (3234.3 + 20.272305)
    assert summary["normalized_score_mean"] == pytest.approx(expected)

    assert main(["data", "list"]) == 0
    text = capsys.readouterr().out
    assert "test/tiny-v0" in text and DEFAULT_DATASET in text


@pytest.mark.parametrize("level, steps", [("random", 250), ("medium-replay", 100), ("medium-expert", 200)])
def test_other_levels(tmp_path, level, steps):
    out = tmp_path / "made" / f"hopper-{level}-v0"
    with pytest.warns(UserWarning, match="below its target") if level != "random" else contextlib.nullcontext():
        path = make_dataset("Hopper-v5", level, steps, out, train_steps_max=128, n_envs=2, progress=False, verbose=0)
    data = load_dataset(path, env="Hopper-v5")
    assert len(data) == steps and data.metadata["uepo"]["level"] == level
    assert (data.episode_starts[1:] == data.dones[:-1]).all()
    if level == "medium-expert":
        assert (path / "behavior_policy_medium.zip").is_file() and (path / "behavior_policy_expert.zip").is_file()


def test_refusals(capsys):
    assert main(make_command("random", 50, "test/twice-v0")) == 0
    assert main(make_command("random", 50, "test/twice-v0")) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="embedded"):
        make_dataset("Hopper-v5", "random", 10, DEFAULT_DATASET, progress=False, verbose=0)
    with pytest.raises(DatasetError, match="--target-return"):
        make_dataset("Pendulum-v1", "medium", 10, "test/pendulum-v0", progress=False, verbose=0)
    assert main(["data", "info", "test/absent-v0", "--no-download"]) == 2
    assert "uepo data make" in capsys.readouterr().err
