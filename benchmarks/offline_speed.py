"""Wall time of the offline phase with its independent stages one by one and side by side (``n_jobs``), in one run.

The behaviour model and the IQL critics (and, for the Uni-O4 preset, the critics and the Gaussian members) read only
the dataset; with ``n_jobs=2`` they train in two worker processes. This script runs the whole offline phase of a
preset on one dataset twice in this process, first with ``n_jobs=1`` then with ``n_jobs=N`` (one torch thread each),
prints every stage's seconds, the two wall times and their ratio, and checks that both runs hand on the same weights.
Run it on an otherwise idle machine: the side-by-side run needs N free cores.

    python benchmarks/offline_speed.py                                   # quick preset, embedded Hopper data
    python benchmarks/offline_speed.py --preset quick+uni_o4 --json offline_speed_uni_o4.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def run(dataset_source: str, env_id: str, preset: str, n_jobs: int, seed: int, offline: dict) -> tuple[float, object]:
    from sb3_uepo import UEPO
    from sb3_uepo.commands.train import default_policy
    from sb3_uepo.common.datasets import load_dataset
    from sb3_uepo.offline.pipeline import OfflinePretrainer

    dataset = load_dataset(dataset_source)
    model = UEPO(default_policy(preset), env_id, dataset=dataset, preset=preset, seed=seed, offline_kwargs=dict(offline))
    start = time.perf_counter()
    result = OfflinePretrainer(
        dataset, model.observation_space, model.action_space, model.offline_config(), progress_bar=False, n_jobs=n_jobs
    ).run()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="hopper-medium-v0", help="dataset source (default: the embedded one)")
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes of the side-by-side run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offline", default="{}", help="JSON of offline_kwargs overrides")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = {}
    results = {}
    for jobs in (1, args.jobs):
        wall, result = run(args.dataset, args.env, args.preset, jobs, args.seed, json.loads(args.offline))
        rows[jobs] = dict(wall_s=wall, stage_seconds=dict(result.seconds))
        results[jobs] = result
        stages = "  ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
        print(f"n_jobs={jobs}: {wall:.0f} s  ({stages})", flush=True)
    one, many = results[1], results[args.jobs]
    same = one.chosen_member == many.chosen_member and all(
        torch.equal(v, many.policy_state_dict[k]) for k, v in one.policy_state_dict.items()
    )
    ratio = rows[1]["wall_s"] / rows[args.jobs]["wall_s"]
    print(f"one by one / side by side: {ratio:.2f}x faster; same policy handed on: {same}")
    record = dict(
        command="python benchmarks/offline_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        dataset=args.dataset,
        preset=args.preset,
        jobs=args.jobs,
        runs=rows,
        speedup=ratio,
        same_policy=same,
        cpu_count=os.cpu_count(),
    )
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
