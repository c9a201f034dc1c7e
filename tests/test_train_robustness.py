"""`uepo train` never loses work and never silently does the wrong thing: every bad argument fails at once with a
one-line ``error:`` (exit 2), a second run on the same output is refused, a killed or SIGTERM-ed run resumes from its
finished offline stages, and a corrupted checkpoint is recomputed instead of crashing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sb3_uepo.cli import main

QUIET = ["--no-progress", "--verbose", "0"]
TINY_ONLINE = ["--n-envs", "2", "--param", "n_steps=32", "batch_size=32", "n_epochs=1", "--eval-episodes", "1"]
SIZES = ["denoiser_hidden_sizes=(16, 16)", "value_net_arch=(16, 16)", "n_diffusion_steps=6", "n_sampling_steps=3"]


@pytest.fixture
def tiny_train_args(tiny_offline_kwargs):
    """``tiny_train_args(npz, out, offline=None)``: `uepo train` arguments of a seconds-long run on the npz data."""

    def make(npz, out, offline=None):
        offline = {**tiny_offline_kwargs, **(offline or {})}
        return [
            "train", "--env", "Pendulum-v1", "--dataset", str(npz), "--online-steps", "32", "--out", str(out),
            "--offline", *[f"{k}={v!r}" for k, v in offline.items()], *SIZES, *TINY_ONLINE,
        ]  # fmt: skip

    return make


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--offline", "augment=maybe"], "'augment' must be True or False"),
        (["--offline", "n_members=2.5"], "'n_members' must be an integer"),
        (["--offline", "ppo_steps='100'"], "'ppo_steps' must be an integer"),
        (["--offline", "no_such_key=1"], "Unknown offline config key"),
        (["--online-steps", "-5"], "--online-steps must be >= 0"),
        (["--param", "foo=1"], "--param foo: not a UEPO argument"),
        (["--param", "learnin_rate=1e-3"], "Did you mean learning_rate"),
        (["--n-envs", "0"], "--n-envs must be >= 1"),
        (["--env", "Foo-v1"], "unknown environment 'Foo-v1'"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--preset", "fast"], "Unknown offline preset 'fast'"),
        (["--eval-episodes", "-1"], "--eval-episodes must be >= 0"),
    ],
)
def test_bad_arguments_fail_at_once_with_one_error_line(tmp_path, capsys, extra, message):
    start = time.perf_counter()
    assert main(["train", "--out", str(tmp_path / "run"), *extra, *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert time.perf_counter() - start < 30  # before any work: no dataset loaded, nothing trained
    assert not list(tmp_path.glob("run*"))


def test_a_dataset_without_env_id_needs_env(tmp_path, capsys, pendulum_npz):
    assert main(["train", "--dataset", str(pendulum_npz), "--out", str(tmp_path / "run"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert "does not name its environment; pass --env" in err
    assert not (tmp_path / "run.json").exists()


def test_eval_episodes_zero_skips_evaluation_and_keeps_the_pretraining(tmp_path, pendulum_npz, tiny_train_args):
    out = tmp_path / "run"
    args = tiny_train_args(pendulum_npz, out)
    args[args.index("--eval-episodes") + 1] = "0"
    assert main([*args, *QUIET]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["evaluation"] == {} and report["offline_report"]["chosen_member"] in (0, 1)
    assert (tmp_path / "run_offline" / "progress.json").is_file()


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys, pendulum_npz, tiny_train_args):
    out = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(f"{owner.pid}\nuepo train --out {out}\n")
        assert main([*tiny_train_args(pendulum_npz, out), *QUIET]) == 2
        err = capsys.readouterr().err
        assert f"'{out}' is in use by a running process (pid {owner.pid}" in err
        assert not out.with_suffix(".json").exists()
    finally:
        owner.kill()
        owner.wait()
    # the owner is dead now: its lock is stale and taken over; the run releases it at the end
    assert main([*tiny_train_args(pendulum_npz, out), *QUIET]) == 0
    assert out.with_suffix(".json").is_file() and not (tmp_path / "run.lock").exists()


def test_pretrain_dir_is_locked_too(tmp_path, pendulum_npz, pendulum_dataset, tiny_offline_kwargs):
    from sb3_uepo import UEPO
    from sb3_uepo.common.io import LockedError

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "offline").mkdir()
        (tmp_path / "offline.lock").write_text(f"{owner.pid}\nother run\n")
        model = UEPO(
            "DiffusionPolicy",
            "Pendulum-v1",
            dataset=pendulum_dataset(),
            preset="quick",
            offline_kwargs=dict(tiny_offline_kwargs),
            policy_kwargs=dict(net_arch=[16, 16], value_net_arch=[16, 16], time_embed_dim=8, n_train_steps=6),
            pretrain_dir=str(tmp_path / "offline"),
        )
        with pytest.raises(LockedError, match=r"checkpoint directory .* is in use"):
            model.pretrain()
    finally:
        owner.kill()
        owner.wait()


def _start_train(args, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "sb3_uepo.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_for_stage(progress, stage, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before stage {stage} finished")
        try:
            if stage in json.loads(progress.read_text())["completed"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"stage {stage} did not finish within {timeout} s")


@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_an_interrupted_run_resumes_from_its_finished_stages(tmp_path, pendulum_npz, how, tiny_train_args):
    """The IQL stage is long enough here to be stopped in the middle (SIGKILL by pid, or SIGTERM)."""
    out = tmp_path / "run"
    args = [*tiny_train_args(pendulum_npz, out, {"iql_steps": 200_000}), "--no-progress"]
    with open(tmp_path / "first.log", "w") as log:
        process = _start_train(args, log)
        try:
            _wait_for_stage(tmp_path / "run_offline" / "progress.json", "behavior", process)
            process.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
            returncode = process.wait(timeout=60)
        finally:
            process.kill()
    first = (tmp_path / "first.log").read_text()
    if how == "sigterm":  # handled as Ctrl-C: a clear message, the finished stages kept, the lock released
        assert returncode == 130, first
        assert "interrupted during offline pretraining" in first and "rerun the same command to resume" in first
        assert not (tmp_path / "run.lock").exists()
    else:
        assert returncode == -signal.SIGKILL
    progress = json.loads((tmp_path / "run_offline" / "progress.json").read_text())
    assert progress["completed"] == ["behavior"]

    # the same command again resumes from the IQL stage (the behaviour model is not trained again)
    with open(tmp_path / "second.log", "w") as log:
        process = _start_train(args, log)
        try:
            deadline = time.time() + 120
            while "resuming from stage" not in (tmp_path / "second.log").read_text() and time.time() < deadline:
                assert process.poll() is None, (tmp_path / "second.log").read_text()
                time.sleep(0.1)
        finally:
            process.kill()
            process.wait()
    second = (tmp_path / "second.log").read_text()
    assert "resuming from stage iql (behavior restored from" in second, second
    assert "[offline] behavior" not in second


def test_a_corrupted_checkpoint_is_recomputed_with_a_warning(tmp_path, pendulum_npz, capsys, tiny_train_args):
    out = tmp_path / "run"
    assert main([*tiny_train_args(pendulum_npz, out), "--no-progress"]) == 0
    stage = tmp_path / "run_offline" / "stage_iql.pt"
    stage.write_bytes(stage.read_bytes()[:100])  # truncated
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"checkpoint of stage 'iql' .* unreadable"):
        assert main([*tiny_train_args(pendulum_npz, out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resuming from stage iql (behavior restored" in printed
    (tmp_path / "run_offline" / "progress.json").write_text("{not json")
    with pytest.warns(UserWarning, match="progress.json is unreadable"):
        assert main([*tiny_train_args(pendulum_npz, out), *QUIET]) == 0


def test_checkpoints_of_another_config_are_reported_and_restart_discards_them(tmp_path, pendulum_npz, capsys, tiny_train_args):
    out = tmp_path / "run"
    assert main([*tiny_train_args(pendulum_npz, out), *QUIET]) == 0
    other = tiny_train_args(pendulum_npz, out, {"behavior_lr": 1e-3})
    assert main([*other, *QUIET]) == 2
    assert "--restart" in capsys.readouterr().err
    assert main([*other, "--restart", *QUIET]) == 0
    assert json.loads((tmp_path / "run_offline" / "progress.json").read_text())["config"]["behavior_lr"] == 1e-3
