"""`uepo train` (offline pretraining + online fine-tuning, model and JSON report written) and `uepo eval`."""

import json

import numpy as np
import pytest
import torch

from sb3_uepo.cli import build_parser, main
from sb3_uepo.commands.train import (
    DEFAULT_ONLINE_STEPS,
    budget_preset,
    default_out,
    default_policy,
    detect_algorithm,
    fine_tuning_defaults,
    parse_assignments,
)
from sb3_uepo.common.datasets import DEFAULT_DATASET

TINY_ONLINE = ["--n-envs", "2", "--param", "n_steps=32", "batch_size=32", "n_epochs=1", "--eval-episodes", "2"]
QUIET = ["--no-progress", "--verbose", "0"]


def test_main_job_defaults():
    args = build_parser().parse_args(["train"])
    assert args.dataset is None and args.preset == "quick" and args.online_steps is None and args.seed == 0
    assert DEFAULT_DATASET == "hopper-medium-v0"
    assert DEFAULT_ONLINE_STEPS[budget_preset(args.preset)] <= 50_000  # the main job's online phase stays short
    assert default_out("Hopper-v5").as_posix() == "runs/uepo_hopper"
    assert default_policy("quick") == "DiffusionPolicy" and default_policy("quick+uni_o4") == "MlpPolicy"
    assert budget_preset("quick+uni_o4") == "quick" and budget_preset("uni_o4") == "default"
    defaults = fine_tuning_defaults("DiffusionPolicy", n_envs=8)
    assert defaults["n_steps"] * 8 == 2048 and defaults["clip_range"] < 0.2 and defaults["policy_kwargs"]
    assert fine_tuning_defaults("MlpPolicy")["policy_kwargs"] == {"value_lr_scale": 10.0}  # the Uni-O4 baseline's too


def test_parse_assignments():
    parsed = parse_assignments(["n_members=2", "lr=1e-4", "augment=false", "name=abc", "sizes=[64, 64]", "x=None"])
    assert parsed == {"n_members": 2, "lr": 1e-4, "augment": False, "name": "abc", "sizes": [64, 64], "x": None}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["n_members"])


def test_train_online_only_then_eval(tmp_path, capsys):
    out = tmp_path / "runs" / "pendulum"
    args = ["train", "--env", "Pendulum-v1", "--dataset", "none", "--online-steps", "64", "--out", str(out)]
    assert main(args + TINY_ONLINE + QUIET) == 0
    printed = capsys.readouterr().out
    assert "after online" in printed and "after offline" not in printed
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["env_id"] == "Pendulum-v1" and report["dataset"] is None and report["online_env_steps"] == 64
    after_online = report["evaluation"]["after_online"]
    assert after_online["n_episodes"] == 2 and after_online["normalized_mean"] is None  # no D4RL reference for Pendulum
    assert set(report["wall_s"]) >= {"online", "total"}
    assert out.with_suffix(".zip").is_file()

    # `uepo eval` finds the env in the report beside the model and, with the same seed, reproduces its numbers.
    assert main(["eval", str(out.with_suffix(".zip")), "--episodes", "2", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["env_id"] == "Pendulum-v1"
    assert evaluated["deterministic"]["returns"] == pytest.approx(after_online["returns"])
    assert evaluated["stochastic"]["deterministic"] is False
    assert main(["eval", str(out.with_suffix(".zip")), "--episodes", "1", "--stochastic"]) == 0
    printed = capsys.readouterr().out
    assert "stochastic" in printed and "deterministic return" not in printed


def test_eval_any_sb3_model_and_bad_input(tmp_path, capsys):
    from stable_baselines3 import PPO

    PPO("MlpPolicy", "Pendulum-v1", n_steps=64).save(tmp_path / "ppo_pendulum.zip")
    assert detect_algorithm(tmp_path / "ppo_pendulum.zip") == "ppo"
    # No report beside it: the env must be given.
    assert main(["eval", str(tmp_path / "ppo_pendulum.zip"), "--episodes", "1"]) == 2
    assert "--env" in capsys.readouterr().err
    assert (
        main(["eval", str(tmp_path / "ppo_pendulum.zip"), "--env", "Pendulum-v1", "--episodes", "1", "--deterministic"]) == 0
    )
    assert "(PPO) on Pendulum-v1" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "missing.zip")]) == 2
    (tmp_path / "not_a_model.zip").write_bytes(b"junk")
    assert main(["eval", str(tmp_path / "not_a_model.zip"), "--env", "Pendulum-v1"]) == 2
    assert "not a model saved by Stable-Baselines3" in capsys.readouterr().err
    # Bad train arguments fail fast with a message, before anything is trained.
    assert main(["train", "--offline", "n_members"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["train", "--dataset", str(tmp_path / "no_such_dataset.hdf5"), *QUIET]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "runs").exists()


def test_evaluation_helper_scores_hopper(tmp_path):
    from stable_baselines3 import PPO

    from sb3_uepo.common.evaluation import evaluate

    model = PPO("MlpPolicy", "Hopper-v5", n_steps=64, seed=0)
    result = evaluate(model, "Hopper-v5", n_episodes=3, seed=5)
    assert result.n_episodes == 3 and len(result.normalized) == 3
    # D4RL normalisation of Hopper: 100 * (R + 20.272305) / (3234.3 + 20.272305)
    expected = 100 * (np.asarray(result.returns) + 20.272305) / (3234.3 + 20.272305)
    assert result.normalized == pytest.approx(expected.tolist())
    assert evaluate(model, "Hopper-v5", n_episodes=3, seed=5).returns == result.returns  # seeded
    stochastic = evaluate(model, "Hopper-v5", n_episodes=2, deterministic=False, seed=5)
    torch.manual_seed(123)  # whatever the global random state, a stochastic evaluation repeats itself
    assert evaluate(model, "Hopper-v5", n_episodes=2, deterministic=False, seed=5).returns == stochastic.returns
    assert "normalised" in result.summary() and result.to_dict()["mode"] == "deterministic"


def test_train_with_dataset_writes_report_and_pretrained_model(tmp_path, capsys, tiny_offline_kwargs, pendulum_npz):
    """Offline then online on a tiny Pendulum dataset (npz): scores, model and JSON report (policy_kwargs hold
    classes, which the report must still serialise) are written; the saved model is pretrained."""
    from sb3_uepo import UEPO

    path = pendulum_npz
    offline = [f"{key}={value!r}" for key, value in tiny_offline_kwargs.items()]
    sizes = ["denoiser_hidden_sizes=(16, 16)", "value_net_arch=(16, 16)", "n_diffusion_steps=6", "n_sampling_steps=3"]
    out = tmp_path / "runs" / "pendulum"
    args = ["train", "--env", "Pendulum-v1", "--dataset", str(path), "--online-steps", "64", "--out", str(out)]
    # --verbose 1 without progress bars: one line per offline stage, for logs
    assert main([*args, "--offline", *offline, *sizes, *TINY_ONLINE, "--no-progress", "--stage-scores"]) == 0
    printed = capsys.readouterr().out
    assert "handed on, chosen offline" in printed and "after offline" in printed and "after online" in printed
    for stage in ("behavior", "iql", "dynamics", "members", "offline_ppo"):
        assert f"[offline] {stage}" in printed, stage
    assert "per-stage real scores" in printed and "<- chosen" in printed
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["offline_report"]["chosen_member"] in (0, 1)
    assert [row["stage"] for row in report["stage_scores"]["stages"]].count("offline_ppo") == 2
    assert (
        set(report["evaluation"]) == {"after_offline", "after_offline_stochastic", "after_online", "after_online_stochastic"}
        and report["online_env_steps"] == 64
    )
    model = UEPO.load(out.with_suffix(".zip"))
    assert model.pretrained and model.policy.net_arch == [16, 16]


def test_warning_when_the_offline_policy_scores_below_its_data(tiny_dataset):
    """`uepo train` warns (and records it in the report) when the offline policy acts worse than its data; only with
    reference scores for the task (raw returns of data and evaluation episodes need not be comparable)."""
    from sb3_uepo.commands.train import _below_data_warning
    from sb3_uepo.common.evaluation import normalized_scores

    data = tiny_dataset()  # 25-step episodes, return about 18: normalised as Hopper-v5 about 1.2
    data_score = normalized_scores("Hopper-v5", [data.statistics().return_mean], data)[0]
    below = {"evaluation": {"after_offline": {"normalized_mean": data_score - 1.0}}}
    above = {"evaluation": {"after_offline": {"normalized_mean": data_score + 1.0}}}
    warning = _below_data_warning(below, "Hopper-v5", data, "quick")
    assert warning is not None and f"below its own data's {data_score:.1f}" in warning and "--preset quick+bc" in warning
    assert "--preset" not in _below_data_warning(below, "Hopper-v5", data, "quick+bc")
    assert _below_data_warning(above, "Hopper-v5", data, "quick") is None
    assert _below_data_warning(below, "Pendulum-v1", data, "quick") is None  # no reference scores: no comparison
    assert _below_data_warning({"evaluation": {}}, "Hopper-v5", data, "quick") is None
