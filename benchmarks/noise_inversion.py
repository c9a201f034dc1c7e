"""Can logged transitions be put into the noise space of steering? Inverts the frozen DDIM chain on dataset actions.

Noise steering (``uepo_steer``) acts in the initial noise ``w`` of the pretrained diffusion policy, in a box
``|w_i| <= noise_bound``. Seeding its replay buffer with the dataset needs, for each logged ``(s, a)``, a noise inside
the box whose deterministic action is ``a``. This script finds the closest noise for a sample of dataset transitions
(:func:`sb3_uepo.uepo.steering.invert_noise`) and reports how many are reproduced (residual below ``--tolerance``
in the [-1, 1] action scale) and how many of those lie inside the box.

The policy is a UEPO offline result: a model saved by ``uepo train`` (``--model``), or the offline checkpoints a
``uepo bench`` run left in its ``--out`` (``--bench-out`` with the task's env, dataset and seed).

    nice python benchmarks/noise_inversion.py --bench-out bench_results/online200k_top_half \\
        --env Hopper-v5 --dataset datasets/hopper-medium-s1 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch as th

import sb3_uepo  # noqa: F401  (installs the MuJoCo log hook)
from sb3_uepo.common.io import write_json
from sb3_uepo.datasets import load_dataset
from sb3_uepo.uepo.defaults import NOISE_BOUND
from sb3_uepo.uepo.steering import invert_noise


def bench_policy(out: str, env_id: str, dataset_path: str, dataset: Any, seed: int) -> Any:
    """The pretrained DiffusionPolicy of a ``uepo bench`` run's offline checkpoints (loaded, not retrained); ``dataset``
    is the loaded ``dataset_path``."""
    from sb3_uepo.benchmark.baselines import build_uepo
    from sb3_uepo.benchmark.runner import RunSpec, offline_dir

    spec = RunSpec(env_id=env_id, dataset=dataset_path, algo="uepo", seed=seed, online_steps=0)  # offline dirs ignore it
    directory = offline_dir(out, spec)
    if not directory.is_dir():
        raise SystemExit(f"no offline checkpoints for {spec.run_id} in {out}: run `uepo bench` there first")
    model = build_uepo(spec, dataset)
    model.pretrain_dir = str(directory)
    model.pretrain()
    return model.policy


def measure(policy: Any, dataset: Any, n: int, bound: float, tolerance: float, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(dataset.observations), n)
    start = time.perf_counter()
    noise, residual = invert_noise(policy, dataset.observations[index], dataset.actions[index])
    reproduced = residual < tolerance
    inside = np.abs(noise).max(-1) <= bound
    return {
        "transitions": n,
        "reproduced": float(reproduced.mean()),
        "reproduced_inside_box": float((reproduced & inside).mean()),
        "median_residual": float(np.median(residual)),
        "median_max_abs_noise": float(np.median(np.abs(noise).max(-1))),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="the dataset (path or id) the policy was pretrained on")
    parser.add_argument("--env", required=True, help="its env id, e.g. Hopper-v5")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a UEPO model saved by `uepo train`")
    source.add_argument("--bench-out", help="a `uepo bench --out` directory holding the run's offline checkpoints")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="bench seeds (with --bench-out)")
    parser.add_argument("--transitions", type=int, default=2048, help="dataset transitions sampled per policy")
    parser.add_argument("--noise-bound", type=float, default=NOISE_BOUND, help="the steering box (default: steering's)")
    parser.add_argument("--tolerance", type=float, default=0.1, help="largest residual that counts as reproduced")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    th.set_num_threads(1)
    dataset = load_dataset(args.dataset, env=args.env)
    policies: dict[str, Any] = {}
    if args.model:
        from sb3_uepo import UEPO

        policies[args.model] = UEPO.load(args.model, device="cpu").policy
    else:
        for seed in args.seeds:
            policies[f"seed {seed}"] = bench_policy(args.bench_out, args.env, args.dataset, dataset, seed)
    results = {}
    for name, policy in policies.items():
        row = measure(policy, dataset, args.transitions, args.noise_bound, args.tolerance, seed=0)
        results[name] = row
        print(
            f"{args.env} {name}: reproduced {row['reproduced']:.0%}, of which inside |w| <= {args.noise_bound}: "
            f"{row['reproduced_inside_box']:.0%} of all; median residual {row['median_residual']:.3f}, "
            f"median max |w| {row['median_max_abs_noise']:.2f} ({row['seconds']:.0f} s)",
            flush=True,
        )
    if args.json:
        write_json(args.json, {"env": args.env, "dataset": args.dataset, "noise_bound": args.noise_bound, "results": results})
    return results


if __name__ == "__main__":
    main()
