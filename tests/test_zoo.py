"""rl-zoo3 integration: `python -m sb3_uepo.zoo train|enjoy` registers UEPO, trains it from zoo_configs/uepo.yml and
reloads it with enjoy; the Optuna sampler gives valid UEPO arguments."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rl_zoo3")

from sb3_uepo import zoo
from sb3_uepo.uepo import UEPO

CONFIG = Path(__file__).resolve().parents[1] / "zoo_configs" / "uepo.yml"
# Tiny online settings on top of the YAML entry (rl-zoo3's -params, values are Python expressions).
TINY = ["n_envs:2", "n_steps:32", "batch_size:32", "n_epochs:1"]


def test_config_has_the_mujoco_tasks_and_a_default():
    config = yaml.safe_load(CONFIG.read_text())
    assert {"default", "Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Ant-v5"} <= set(config)
    for env_id in ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Ant-v5"):
        entry = config[env_id]
        assert entry["policy"] == "DiffusionPolicy" and entry["dataset"] and entry["preset"]
        assert isinstance(entry["policy_kwargs"], str) and isinstance(entry["offline_kwargs"], dict)
        assert "normalize" not in entry  # observation statistics stay fixed inside the policy
    assert config["Hopper-v5"]["dataset"] == "hopper-medium-v0"  # the embedded dataset


def test_register_reaches_every_module_copy(monkeypatch):
    copy_holder = types.ModuleType("rl_zoo3.some_script")
    copy_holder.ALGOS = {"ppo": object}  # a module holding its own copy of the dict
    monkeypatch.setitem(sys.modules, "rl_zoo3.some_script", copy_holder)
    assert zoo.register() is UEPO
    import rl_zoo3
    import rl_zoo3.enjoy
    import rl_zoo3.exp_manager
    import rl_zoo3.hyperparams_opt
    import rl_zoo3.train
    import rl_zoo3.utils

    for module in (rl_zoo3, rl_zoo3.utils, rl_zoo3.train, rl_zoo3.exp_manager, rl_zoo3.enjoy, copy_holder):
        assert module.ALGOS["uepo"] is UEPO
    assert rl_zoo3.exp_manager.HYPERPARAMS_SAMPLER["uepo"] is zoo.sample_uepo_params
    assert rl_zoo3.exp_manager.HYPERPARAMS_CONVERTER["uepo"] is zoo.convert_uepo_params


def test_wrapper_defaults():
    args = zoo.with_defaults("train", ["--env", "Hopper-v5"])
    assert args[:2] == ["--algo", "uepo"] and args[args.index("-conf") + 1] == str(CONFIG)
    assert args[args.index("--num-threads") + 1] == "1"
    # The user's choices win; other algorithms get no UEPO config.
    assert "-conf" not in zoo.with_defaults("train", ["--algo", "ppo", "--env", "Hopper-v5"])
    assert zoo.with_defaults("train", ["-conf", "mine.yml", "--num-threads", "2"]).count("-conf") == 1
    enjoy = zoo.with_defaults("enjoy", ["--env", "Hopper-v5"])
    assert enjoy[enjoy.index("-f") + 1] == "logs"
    assert zoo.main(["bogus"]) == 2


def test_sampler_gives_valid_uepo_arguments():
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        params = zoo.sample_uepo_params(trial, n_actions=1, n_envs=1, additional_args={})
        assert params["batch_size"] <= params["n_steps"]
        assert 0.0 < params["gamma"] < 1.0 and 0.0 < params["gae_lambda"] < 1.0
        model = UEPO("DiffusionPolicy", "Pendulum-v1", **params)  # every sampled key is a constructor argument
        assert model.kl_ref_coef == params["kl_ref_coef"]
        # rl-zoo3's --trial-id path converts the stored raw parameters the same way.
        converted = zoo.convert_uepo_params(trial.params)
        assert {k: v for k, v in converted.items() if k != "batch_size"} == {
            k: v for k, v in params.items() if k != "batch_size"
        }


def test_train_then_enjoy_online_only(tmp_path, capsys):
    assert zoo.main(["train", "--env", "Pendulum-v1", "-n", "128", "-params", *TINY, "--eval-freq", "-1", "--seed", "1"]) == 0
    saved = tmp_path / "logs" / "uepo" / "Pendulum-v1_1" / "Pendulum-v1.zip"
    assert saved.is_file()
    config = yaml.load((saved.parent / "Pendulum-v1" / "config.yml").read_text(), Loader=yaml.UnsafeLoader)
    assert config["policy"] == "DiffusionPolicy"
    model = UEPO.load(saved, device="cpu")
    assert model.num_timesteps == 128
    obs = np.zeros((3, 3), dtype=np.float32)
    assert np.array_equal(model.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    capsys.readouterr()
    assert zoo.main(["enjoy", "--env", "Pendulum-v1", "--no-render", "-n", "200", "--deterministic"]) == 0
    out = capsys.readouterr().out
    assert "Loading logs/uepo/Pendulum-v1_1/Pendulum-v1.zip" in out and "Mean reward" in out


def test_optimize_with_shared_storage(tmp_path):
    pytest.importorskip("pandas")  # rl-zoo3 writes its study report with pandas
    import optuna

    storage = f"sqlite:///{tmp_path / 'uepo.db'}"
    args = ["train", "--env", "Pendulum-v1", "-n", "64", "-params", "n_envs:1", "-optimize", "--n-trials", "1"]
    args += ["--n-evaluations", "1", "--eval-episodes", "1", "--storage", storage, "--study-name", "uepo-test"]
    args += ["--sampler", "random", "--pruner", "none", "--no-optim-plots", "--seed", "0"]
    assert zoo.main(args) == 0
    study = optuna.load_study(study_name="uepo-test", storage=storage)
    assert len(study.trials) == 1 and "kl_ref_coef" in study.trials[0].params


def test_mujoco_entries_use_the_fine_tuning_defaults():
    """The YAML's fine-tuning settings are the ones ``uepo train`` and ``uepo bench`` use (``uepo/defaults.py``)."""
    from stable_baselines3.common.utils import LinearSchedule

    from sb3_uepo.uepo.defaults import fine_tuning_defaults

    entry = yaml.safe_load(CONFIG.read_text())["Hopper-v5"]
    defaults = fine_tuning_defaults("DiffusionPolicy", entry["n_envs"])
    for key in (
        "n_steps",
        "batch_size",
        "n_epochs",
        "clip_range",
        "value_warmup_iters",
        "kl_ref_coef",
        "normalize_reward",
        "gamma",
    ):
        assert entry[key] == defaults[key], key
    schedule = defaults["learning_rate"]
    assert isinstance(schedule, LinearSchedule) and float(entry["learning_rate"].removeprefix("lin_")) == schedule.start
    assert schedule.end == 0.0 and schedule.end_fraction == 1.0
    assert eval(entry["policy_kwargs"]) == defaults["policy_kwargs"]  # rl-zoo3 evaluates it the same way
