"""Online throughput of UEPO with a DiffusionPolicy against SB3's PPO with its MlpPolicy.

Both learn Hopper-v5 from scratch with the same vectorised env, ``n_envs``, ``n_steps``, ``batch_size`` and
``n_epochs``; their rounds (one rollout + one update each) are measured ALTERNATELY in one process, so load changes on
a shared machine hit both alike. Reports env steps per second (median over rounds, first round excluded as warm-up),
the time split between rollout collection and the update, the UEPO / PPO ratio, and ``predict()`` latency at batch 1
and 64 (deterministic).

    nice -n 10 python benchmarks/throughput.py            # numbers in docs/benchmarks.md, "Online throughput"
    nice -n 10 python benchmarks/throughput.py --settings fine-tuning     # UEPO's fine-tuning batch, epochs, K and KL
    python benchmarks/throughput.py --rounds 3 --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import sb3_uepo  # noqa: F401  (installs the MuJoCo log hook)
from sb3_uepo.common.io import write_json
from sb3_uepo.uepo import UEPO
from sb3_uepo.uepo.defaults import FINE_TUNING_DEFAULTS, FINE_TUNING_DIFFUSION_POLICY_KWARGS


def _timed(model: Any, name: str, totals: dict[str, float]) -> None:
    """Wrap ``model.<name>`` so that its wall time accumulates in ``totals[name]``."""
    method = getattr(model, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(model, name, wrapper)


def build(algo: str, args: argparse.Namespace) -> Any:
    env = make_vec_env(args.env, n_envs=args.n_envs, seed=args.seed)
    common = dict(n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.n_epochs, seed=args.seed, device="cpu")
    if algo == "uepo":
        policy_kwargs = dict(n_sampling_steps=args.denoising_steps, sampler="ddim")  # as fine-tuning runs
        if args.ft_denoising_steps is not None:
            policy_kwargs["ft_denoising_steps"] = args.ft_denoising_steps
        extra: dict[str, Any] = {}
        if args.settings == "fine-tuning":  # the KL reference, reward scaling and exploration of fine-tuning
            extra = {key: FINE_TUNING_DEFAULTS[key] for key in ("kl_ref_coef", "normalize_reward")}
            for key in ("exploration_std", "explore_frozen_steps"):
                policy_kwargs[key] = FINE_TUNING_DIFFUSION_POLICY_KWARGS[key]
        model = UEPO("DiffusionPolicy", env, policy_kwargs=policy_kwargs, **extra, **common)
        if args.settings == "fine-tuning":
            model.set_reference_policy()  # as after pretraining: the KL reference is evaluated in every update
        return model
    return PPO("MlpPolicy", env, **common)


def measure_rounds(models: dict[str, Any], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Alternate one learn() round per model; returns per-model lists of steps/s and rollout / train seconds."""
    results: dict[str, dict[str, list[float]]] = {name: {"steps_per_s": [], "rollout_s": [], "train_s": []} for name in models}
    for round_index in range(rounds + 1):  # round 0 warms up (allocation, first calls) and is dropped
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            model = models[name]
            totals = {"collect_rollouts": 0.0, "train": 0.0}
            _timed(model, "collect_rollouts", totals)
            _timed(model, "train", totals)
            steps = model.n_steps * model.n_envs
            start = time.perf_counter()
            model.learn(steps, reset_num_timesteps=round_index == 0)
            elapsed = time.perf_counter() - start
            del model.collect_rollouts, model.train  # drop the instance wrappers
            if round_index > 0:
                results[name]["steps_per_s"].append(steps / elapsed)
                results[name]["rollout_s"].append(totals["collect_rollouts"])
                results[name]["train_s"].append(totals["train"])
        print(
            f"round {round_index}: "
            + ", ".join(f"{name} {results[name]['steps_per_s'][-1]:.0f} steps/s" for name in models if round_index > 0),
            flush=True,
        )
    return results


def predict_latency(model: Any, batch: int, repeats: int) -> float:
    """Median wall time (ms) of ``model.predict(obs, deterministic=True)`` for ``batch`` observations."""
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((batch, *model.observation_space.shape)).astype(np.float32)
    call: Callable[[], Any] = lambda: model.predict(obs, deterministic=True)  # noqa: E731
    for _ in range(10):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--n-steps", type=int, default=256, help="steps per env per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-epochs", type=int, default=10)
    parser.add_argument("--denoising-steps", type=int, default=5)
    parser.add_argument(
        "--ft-denoising-steps",
        type=int,
        default=None,
        help="fine-tune only the last K denoising steps (default: all with --settings ppo, the fine-tuning default with "
        "--settings fine-tuning)",
    )
    parser.add_argument(
        "--settings",
        choices=("ppo", "fine-tuning"),
        default="ppo",
        help="ppo: SB3 PPO's batch 64 x 10 epochs; fine-tuning: UEPO's fine-tuning batch and epochs (512 x 5) for both, "
        "and UEPO keeps its KL reference (default: ppo)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds per algorithm (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (same for both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small rollouts and few latency repeats (smoke run)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.settings == "fine-tuning":
        args.batch_size, args.n_epochs = FINE_TUNING_DEFAULTS["batch_size"], FINE_TUNING_DEFAULTS["n_epochs"]
        if args.ft_denoising_steps is None:  # as fine-tuning from a dataset does
            args.ft_denoising_steps = FINE_TUNING_DIFFUSION_POLICY_KWARGS["ft_denoising_steps"]
    if args.quick:
        args.n_steps, args.n_epochs = 64, 2
    th.set_num_threads(args.threads)

    models = {"uepo": build("uepo", args), "ppo": build("ppo", args)}
    results = measure_rounds(models, args.rounds)
    summary: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": f"{platform.processor() or platform.machine()}, torch {th.__version__}, {th.get_num_threads()} thread(s)",
    }
    for name, values in results.items():
        summary[name] = {key: statistics.median(series) for key, series in values.items()}
    ratios = [u / p for u, p in zip(results["uepo"]["steps_per_s"], results["ppo"]["steps_per_s"], strict=True)]
    summary["ratio_uepo_over_ppo"] = statistics.median(ratios)

    repeats = 20 if args.quick else 200
    summary["predict_ms"] = {
        name: {str(batch): predict_latency(model, batch, repeats) for batch in (1, 64)} for name, model in models.items()
    }

    print()
    print(
        f"{args.env}, n_envs={args.n_envs}, n_steps={args.n_steps}, batch_size={args.batch_size}, n_epochs={args.n_epochs}, "
        f"denoising steps={args.denoising_steps}, {args.rounds} alternating rounds, torch threads={args.threads}"
    )
    print(f"{'':6} {'steps/s':>8} {'rollout s':>10} {'train s':>8} {'predict ms (1)':>15} {'predict ms (64)':>16}")
    for name in models:
        row, latency = summary[name], summary["predict_ms"][name]
        print(
            f"{name:6} {row['steps_per_s']:8.0f} {row['rollout_s']:10.2f} {row['train_s']:8.2f} "
            f"{latency['1']:15.2f} {latency['64']:16.2f}"
        )
    print(f"ratio UEPO / PPO (median of per-round ratios): {summary['ratio_uepo_over_ppo']:.2f}")
    if args.json:
        write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
