"""`uepo bench`: grid of (task, algorithm, seed) runs in separate processes, resumable, aggregated into a results JSON,
a markdown table and learning-curve plots; and the statistics behind the table (IQM, bootstrap intervals)."""

import json

import numpy as np
import pytest

from sb3_uepo.benchmark.stats import bootstrap_ci, iqm, mean_std, trimmed_mean
from sb3_uepo.cli import main

# --- statistics ---------------------------------------------------------------------------------------------------


def test_iqm_is_the_mean_of_the_middle_half():
    # 8 scores: floor(0.25 * 8) = 2 dropped from each end -> mean of the middle four.
    assert iqm([100, 1, 2, 3, 4, 5, 6, -100]) == pytest.approx(np.mean([2, 3, 4, 5]))
    # 4 scores: one dropped from each end.
    assert iqm([0.0, 10.0, 20.0, 1000.0]) == pytest.approx(15.0)
    # 3 seeds: floor(0.75) = 0, nothing dropped (as scipy.stats.trim_mean / rliable): IQM equals the mean.
    assert iqm([1.0, 2.0, 9.0]) == pytest.approx(4.0)
    assert iqm([7.0]) == 7.0
    # Order does not matter, outliers do not move it.
    rng = np.random.default_rng(0)
    scores = rng.normal(size=12)
    assert iqm(scores) == pytest.approx(iqm(rng.permutation(scores)))
    assert iqm([*scores[:11], 1e9]) == pytest.approx(iqm([*scores[:11], 3.0]))


def test_trimmed_mean_and_mean_std_edge_cases():
    assert trimmed_mean([1, 2, 3, 4, 5], 0.0) == pytest.approx(3.0)
    assert trimmed_mean([1, 2, 3, 4, 100], 0.2) == pytest.approx(3.0)
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 1.0))  # population std, as evaluate_policy reports
    with pytest.raises(ValueError):
        iqm([])
    with pytest.raises(ValueError):
        trimmed_mean([1.0], 0.5)


def test_bootstrap_ci_brackets_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    scores = rng.normal(50.0, 10.0, size=10)
    estimate, low, high = bootstrap_ci(scores, iqm, n_resamples=500, seed=3)
    assert estimate == pytest.approx(iqm(scores))
    assert low <= estimate <= high and high - low > 0
    assert bootstrap_ci(scores, iqm, n_resamples=500, seed=3) == (estimate, low, high)
    # Identical scores: no uncertainty. One run: the interval collapses onto it.
    assert bootstrap_ci([5.0, 5.0, 5.0], n_resamples=100) == (5.0, 5.0, 5.0)
    assert bootstrap_ci([2.5], n_resamples=100) == (2.5, 2.5, 2.5)
    # Wider spread, wider interval; higher confidence, wider interval.
    _, low_wide, high_wide = bootstrap_ci(scores * 3.0, iqm, n_resamples=500, seed=3)
    assert high_wide - low_wide == pytest.approx(3.0 * (high - low))
    _, low_99, high_99 = bootstrap_ci(scores, iqm, n_resamples=500, confidence=0.99, seed=3)
    assert high_99 - low_99 >= high - low


def test_bootstrap_ci_mean_matches_the_analytic_standard_error():
    rng = np.random.default_rng(2)
    scores = rng.normal(0.0, 1.0, size=40)
    _, low, high = bootstrap_ci(scores, np.mean, n_resamples=4000, seed=0)
    analytic = 2 * 1.96 * scores.std() / np.sqrt(scores.size)
    assert high - low == pytest.approx(analytic, rel=0.15)


def test_stratified_bootstrap_resamples_within_tasks():
    # Task A always scores 0, task B always 100: resampling within tasks keeps half of the pool at each value, so
    # the pooled mean is exactly 50 in every resample (an unstratified bootstrap would vary).
    strata = [[0.0, 0.0, 0.0], [100.0, 100.0, 100.0]]
    assert bootstrap_ci(strata, np.mean, n_resamples=300) == (50.0, 50.0, 50.0)
    estimate, low, high = bootstrap_ci([[0.0, 10.0], [100.0, 90.0, 95.0]], iqm, n_resamples=300)
    assert estimate == pytest.approx(iqm([0.0, 10.0, 100.0, 90.0, 95.0]))
    assert low <= estimate <= high


# --- the command ------------------------------------------------------------------------------------------------

# Two algorithms x two seeds on Hopper-v5 with the embedded dataset; budgets are tiny, numbers meaningless.
TINY_BENCH = [
    "bench",
    "--tasks",
    "Hopper-v5:hopper-medium-v0",
    "--algos",
    "ppo",
    "ppo_bc",
    "--seeds",
    "0",
    "1",
    "--online-steps",
    "128",
    "--eval-freq",
    "64",
    "--eval-episodes",
    "1",
    "--final-episodes",
    "2",
    "--bc-steps",
    "50",
    "--algo-kwargs",
    "ppo.n_steps=64",
    "ppo.batch_size=32",
    "ppo.n_epochs=1",
    "ppo_bc.n_steps=64",
    "ppo_bc.batch_size=32",
    "ppo_bc.n_epochs=1",
    "--out",
    "bench_out",
    "--workers",
    "2",
]


def test_bench_writes_results_table_and_plot_and_resumes(tmp_path, capsys):
    assert main(TINY_BENCH) == 0
    out = tmp_path / "bench_out"
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == [
        "Hopper-v5_hopper-medium-v0__ppo__seed0.json",
        "Hopper-v5_hopper-medium-v0__ppo__seed1.json",
        "Hopper-v5_hopper-medium-v0__ppo_bc__seed0.json",
        "Hopper-v5_hopper-medium-v0__ppo_bc__seed1.json",
    ]
    run = json.loads((out / "runs" / "Hopper-v5_hopper-medium-v0__ppo_bc__seed1.json").read_text())
    assert run["status"] == "done" and run["algo"] == "ppo_bc" and run["seed"] == 1
    assert run["online_env_steps"] == 128  # the same online budget for every algorithm
    assert run["offline"]["normalized_mean"] is not None  # BC policy scored after the offline phase
    assert run["offline_report"]["bc_steps"] == 50
    assert run["curve"]["timesteps"] == [0, 64, 128]
    assert len(run["curve"]["normalized_mean"]) == 3
    assert run["online"]["n_episodes"] == 2 and run["online_stochastic"]["deterministic"] is False
    ppo_run = json.loads((out / "runs" / "Hopper-v5_hopper-medium-v0__ppo__seed0.json").read_text())
    assert ppo_run["offline"] is None  # no offline phase

    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4
    per_task = {entry["algo"]: entry for entry in results["summary"]["per_task"]}
    assert set(per_task) == {"ppo", "ppo_bc"}
    assert per_task["ppo"]["seeds"] == [0, 1] and per_task["ppo"]["offline"] is None
    online = per_task["ppo_bc"]["online"]
    assert online["ci_low"] <= online["iqm"] <= online["ci_high"]
    assert online["mean"] == pytest.approx(np.mean(online["scores"]))

    table = (out / "results.md").read_text()
    assert "| Hopper-v5:hopper-medium-v0 | PPO (scratch) | 2 | — |" in table
    assert "PPO + BC init" in table and "IQM" in table
    plot = out / "curves" / "Hopper-v5_hopper-medium-v0.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun skips every finished run and leaves their files untouched.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    capsys.readouterr()
    assert main(TINY_BENCH) == 0
    assert "4 runs: 4 already finished (skipped), 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps

    # A lost result is redone, the rest skipped; changed settings of one algorithm redo only that algorithm's runs.
    (out / "runs" / "Hopper-v5_hopper-medium-v0__ppo__seed1.json").unlink()
    main([*TINY_BENCH, "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert sum("to run" in line for line in lines) == 1
    assert any("__ppo__seed1" in line and "to run" in line for line in lines)
    main(
        [
            *TINY_BENCH[: TINY_BENCH.index("--bc-steps") + 1],
            "60",
            *TINY_BENCH[TINY_BENCH.index("--bc-steps") + 2 :],
            "--dry-run",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if "to run" in line] == [
        "Hopper-v5_hopper-medium-v0__ppo__seed1",
        "Hopper-v5_hopper-medium-v0__ppo_bc__seed0",
        "Hopper-v5_hopper-medium-v0__ppo_bc__seed1",
    ]


def test_bench_report_only_and_bad_arguments(tmp_path, capsys):
    # --report-only on an empty directory writes an empty table without running anything.
    assert main(["bench", "--out", "empty", "--report-only", "--algos", "ppo"]) == 0
    assert (tmp_path / "empty" / "results.md").is_file()
    assert not (tmp_path / "empty" / "runs").exists()
    capsys.readouterr()
    # Offline algorithms need a dataset; malformed overrides are rejected before anything runs.
    assert main(["bench", "--tasks", "Hopper-v5", "--algos", "ppo_bc", "--out", "x"]) == 2
    assert "learns from a dataset" in capsys.readouterr().err
    assert main(["bench", "--algos", "ppo", "--algo-kwargs", "n_steps=64", "--out", "x"]) == 2
    assert "ALGO.KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_report_falls_back_to_raw_returns_without_reference_scores(tmp_path):
    from sb3_uepo.benchmark.report import markdown_table, summarize

    def fake(task, algo, seed, ret, normalized):
        evaluation = {"mean_return": ret, "normalized_mean": normalized}
        return {
            "task": task,
            "algo": algo,
            "seed": seed,
            "online_env_steps": 100,
            "wall_s": {"total": 1.0},
            "offline": None,
            "online": evaluation,
        }

    results = [fake("Pendulum-v1", "ppo", s, -1000.0 + s, None) for s in range(3)]
    results += [fake("Hopper-v5:d", "ppo", s, 100.0, 10.0 * s) for s in range(3)]
    summary = summarize(results, n_resamples=50)
    by_task = {entry["task"]: entry for entry in summary["per_task"]}
    assert by_task["Pendulum-v1"]["metric"] == "return"
    assert by_task["Pendulum-v1"]["online"]["mean"] == pytest.approx(-999.0)
    assert by_task["Hopper-v5:d"]["online"]["mean"] == pytest.approx(10.0)
    # The cross-task aggregate only pools normalised scores.
    assert summary["aggregate"][0]["tasks"] == ["Hopper-v5:d"]
    assert "Pendulum-v1 (raw return)" in markdown_table(summary)


def test_bench_keeps_the_offline_stages_of_an_interrupted_run(tmp_path, tiny_offline_kwargs):
    """UEPO-based algorithms (here the bc variant) checkpoint their offline stages under OUT/offline/ by default."""
    offline = [f"{k}={v!r}" for k, v in tiny_offline_kwargs.items() if k not in ("n_members", "ppo_steps")]
    args = ["bench", "--tasks", "Hopper-v5:hopper-medium-v0", "--algos", "bc", "--seeds", "0", "--online-steps", "64"]
    args += ["--eval-freq", "64", "--eval-episodes", "1", "--final-episodes", "1", "--out", "bench_bc", "--workers", "1"]
    args += ["--algo-kwargs", "bc.n_steps=32", "bc.batch_size=32", "bc.n_epochs=1", "--offline", *offline]
    args += ["gaussian_bc_steps=20", "gaussian_hidden_sizes=(16, 16)", "value_net_arch=(16, 16)"]
    assert main(args) == 0
    progress = list((tmp_path / "bench_bc" / "offline").glob("*/progress.json"))
    assert len(progress) == 1 and "offline_ppo" in json.loads(progress[0].read_text())["completed"]


def test_bench_uepo_steer_shares_uepo_offline_phase_and_steers_online(tmp_path, pendulum_npz, tiny_offline_kwargs):
    """uepo_steer: the same offline phase as uepo (one checkpoint directory), then SAC in the noise space."""
    offline = [f"{k}={v!r}" for k, v in tiny_offline_kwargs.items()]
    offline += ["denoiser_hidden_sizes=(16, 16)", "value_net_arch=(16, 16)", "n_diffusion_steps=6", "n_sampling_steps=3"]
    args = ["bench", "--tasks", f"Pendulum-v1:{pendulum_npz}", "--algos", "uepo", "uepo_steer", "--seeds", "0"]
    args += ["--online-steps", "64", "--eval-freq", "32", "--eval-episodes", "1", "--final-episodes", "1"]
    args += ["--out", "bench_steer", "--workers", "1", "--no-plots", "--offline", *offline, "--algo-kwargs"]
    args += ["uepo.n_steps=32", "uepo.batch_size=32", "uepo.n_epochs=1", "uepo_steer.noise_bound=1.5"]
    args += ["uepo_steer.learning_starts=16", "uepo_steer.batch_size=16", "uepo_steer.buffer_size=1000"]
    assert main(args) == 0
    out = tmp_path / "bench_steer"
    assert len(list((out / "offline").iterdir())) == 1  # one offline phase for both algorithms
    runs = {p.name.split("__")[1]: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(runs) == {"uepo", "uepo_steer"}
    steer_run, uepo_run = runs["uepo_steer"], runs["uepo"]
    assert steer_run["offline"]["mean_return"] == pytest.approx(uepo_run["offline"]["mean_return"])  # same policy
    assert steer_run["online_env_steps"] == 64 and steer_run["curve"]["timesteps"] == [0, 32, 64]
    assert "UEPO + noise steering (SAC)" in (out / "results.md").read_text()


def test_bench_on_a_local_ray_instance_writes_the_same_results(tmp_path, capsys):
    """--backend ray: every run is a Ray task on a local instance with 2 CPUs; results land where the local pool's do."""
    pytest.importorskip("ray")
    args = ["bench", "--tasks", "Pendulum-v1", "--algos", "ppo", "--seeds", "0", "1", "--online-steps", "64"]
    args += ["--eval-freq", "64", "--eval-episodes", "1", "--final-episodes", "1", "--no-plots", "--out", "bench_ray"]
    args += ["--algo-kwargs", "ppo.n_steps=32", "ppo.batch_size=32", "ppo.n_epochs=1"]
    assert main([*args, "--backend", "ray", "--workers", "2"]) == 0
    out = tmp_path / "bench_ray"
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == ["Pendulum-v1__ppo__seed0.json", "Pendulum-v1__ppo__seed1.json"]
    assert all(json.loads((out / "runs" / name).read_text())["online_env_steps"] == 64 for name in runs)
    assert "2 runs: 0 already finished" in capsys.readouterr().out
    assert main([*args, "--backend", "ray", "--workers", "2"]) == 0  # resumable as the local pool: nothing to rerun
    assert "2 runs: 2 already finished (skipped), 0 to run" in capsys.readouterr().out
    assert main([*args, "--address", "auto"]) == 2  # --address without --backend ray
    assert "--backend ray" in capsys.readouterr().err


def test_algo_kwargs_schedule_strings_become_linear_schedules():
    from sb3_uepo.benchmark.baselines import with_schedules
    from sb3_uepo.commands.bench import parse_algo_kwargs

    kwargs = parse_algo_kwargs(["uepo.learning_rate=lin_1e-4", "uepo.clip_range=lin_0.1", "uepo.n_epochs=3"])["uepo"]
    resolved = with_schedules(kwargs)
    assert resolved["learning_rate"](1.0) == pytest.approx(1e-4) and resolved["learning_rate"](0.5) == pytest.approx(5e-5)
    assert resolved["clip_range"](0.0) == pytest.approx(0.0) and resolved["n_epochs"] == 3
    assert kwargs["learning_rate"] == "lin_1e-4"  # the spec keeps the string (run names and resumption)
    with pytest.raises(ValueError, match="lin_<float>"):
        with_schedules({"learning_rate": "lin_fast"})


def test_online_only_policy_kwargs_keep_the_offline_checkpoints():
    """An online ablation (exploration, fine-tuned steps) reuses the offline phase; an architecture change does not."""
    from sb3_uepo.benchmark.runner import RunSpec, offline_dir

    def spec(**policy_kwargs) -> RunSpec:
        algo_kwargs = {"policy_kwargs": policy_kwargs} if policy_kwargs else {}
        return RunSpec("Hopper-v5", "hopper-medium-v0", "uepo", 0, 1000, algo_kwargs=algo_kwargs)

    plain = offline_dir("out", spec())
    assert offline_dir("out", spec(exploration_std=0.15, ft_denoising_steps=1, value_lr_scale=3.0)) == plain
    assert offline_dir("out", spec(net_arch=[64, 64])) != plain
    assert offline_dir("out", spec(net_arch=[64, 64], exploration_std=0.15)) == offline_dir("out", spec(net_arch=[64, 64]))
