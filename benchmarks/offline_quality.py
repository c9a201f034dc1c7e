"""Offline policy quality: UEPO's offline-chosen member vs the Uni-O4 preset vs diffusion BC.

For each seed, the SAME offline budget (``--preset``, default ``quick``) runs twice through the one pipeline:
UEPO (DiffusionPolicy members from the behaviour diffusion model, sequence divergence, augmented dynamics, OPE) and
the ``<preset>+uni_o4`` baseline (Gaussian members by separate BC with Uni-O4's diversity term, OPE with mean Q).
Diffusion BC is the behaviour diffusion model that UEPO's run trained first (its stage 1), so it costs no extra
training. Each policy is evaluated in the real environment AFTER pretraining (the choice of member never sees it),
deterministically, on the same evaluation seeds.

    python benchmarks/offline_quality.py --env Hopper-v5 --dataset hopper-medium-v0 --seeds 0 1 2 \
        --out bench_results/offline_quality_hopper.json

Prints a markdown table of normalised scores (mean ± std over seeds) and the per-seed numbers, and writes them to
``--out`` (JSON, atomically). A finished (seed, method) in an existing ``--out`` is not redone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sb3_uepo.common.io import write_json

METHODS = ("uepo", "uni_o4", "diffusion_bc")


def run_seed(
    env_id: str,
    dataset_id: str,
    preset: str,
    seed: int,
    episodes: int,
    offline: dict[str, Any],
    pretrain_dir: str | None = None,
) -> dict[str, Any]:
    """Pretrain UEPO and the Uni-O4 baseline on one seed; evaluate both and the behaviour diffusion model.

    With ``pretrain_dir`` the stage checkpoints go to ``<pretrain_dir>/{uepo,uni_o4}_s<seed>`` and completed stages
    are reused (an interrupted benchmark resumes; the reported pretraining time is then that of the resumed part).
    """
    import torch as th

    th.set_num_threads(1)
    from sb3_uepo import UEPO
    from sb3_uepo.common.datasets import load_dataset
    from sb3_uepo.common.evaluation import evaluate
    from sb3_uepo.offline.pipeline import pretrain

    dataset = load_dataset(dataset_id)
    results: dict[str, Any] = {}

    def score(model: Any) -> dict[str, Any]:
        evaluation = evaluate(model, env_id, n_episodes=episodes, deterministic=True, seed=10_000 + seed, dataset=dataset)
        return {
            "return_mean": evaluation.mean_return,
            "return_std": evaluation.std_return,
            "normalized": evaluation.normalized_mean,
            "episode_lengths": evaluation.lengths,
        }

    # UEPO, and diffusion BC from the same run's behaviour model
    start = time.perf_counter()
    model = UEPO("DiffusionPolicy", env_id, dataset=dataset, preset=preset, offline_kwargs=dict(offline), seed=seed)
    checkpoints = {m: None if pretrain_dir is None else f"{pretrain_dir}/{m}_s{seed}" for m in ("uepo", "uni_o4")}
    result = pretrain(
        dataset,
        model.observation_space,
        model.action_space,
        model.offline_config(),
        checkpoint_dir=checkpoints["uepo"],
        progress_bar=False,
    )
    model.load_offline_result(result)
    seconds = time.perf_counter() - start
    results["uepo"] = {
        **score(model),
        "pretrain_s": sum(result.seconds.values()) if pretrain_dir is not None else seconds,
        "chosen_member": result.chosen_member,
        "chosen_reason": result.chosen_reason,
    }
    bc = UEPO("DiffusionPolicy", env_id, dataset=dataset, preset=preset, offline_kwargs=dict(offline), seed=seed)
    bc.load_offline_result(result, member="behavior")
    results["diffusion_bc"] = {**score(bc), "pretrain_s": result.seconds.get("behavior")}

    # the Uni-O4 baseline through the same code and budget (Hopper/Walker2d/HalfCheetah/Ant act in [-1, 1] already)
    start = time.perf_counter()
    baseline = UEPO(
        "MlpPolicy",
        env_id,
        dataset=dataset,
        preset=f"{preset}+uni_o4",
        offline_kwargs=dict(offline),
        seed=seed,
        pretrain_dir=checkpoints["uni_o4"],
    )
    report = baseline.pretrain()
    results["uni_o4"] = {
        **score(baseline),
        "pretrain_s": time.perf_counter() - start,
        "chosen_member": report["chosen_member"],
        "chosen_reason": report["chosen_reason"],
    }
    return results


def table(per_seed: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | normalised score (mean ± std) | per seed | pretraining time per seed |", "|---|---|---|---|"]
    for method in METHODS:
        scores = [per_seed[s][method]["normalized"] for s in sorted(per_seed, key=int) if method in per_seed[s]]
        times = [per_seed[s][method]["pretrain_s"] or 0.0 for s in sorted(per_seed, key=int) if method in per_seed[s]]
        if not scores:
            continue
        cells = ", ".join(f"{x:.1f}" for x in scores)
        lines.append(f"| {method} | {np.mean(scores):.1f} ± {np.std(scores):.1f} | {cells} | {np.mean(times) / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--dataset", default="hopper-medium-v0")
    parser.add_argument("--preset", default="quick", help="budget preset of both methods (quick, default, paper)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per policy")
    parser.add_argument("--workers", type=int, default=2, help="seeds run in parallel, one process each")
    parser.add_argument("--offline", default="{}", help="JSON of offline_kwargs overrides for both methods")
    parser.add_argument("--out", default="bench_results/offline_quality.json")
    parser.add_argument("--pretrain-dir", default=None, help="keep (and reuse) the stage checkpoints of every run here")
    args = parser.parse_args(argv)

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    settings = {"env": args.env, "dataset": args.dataset, "preset": args.preset, "episodes": args.episodes}
    settings["offline"] = json.loads(args.offline)
    if data.get("settings") not in (None, settings):
        raise SystemExit(f"{out} holds results of other settings ({data['settings']}); choose another --out")
    data["settings"] = settings
    data.setdefault("per_seed", {})
    data["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    todo = [s for s in args.seeds if str(s) not in data["per_seed"]]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {
            seed: pool.submit(
                run_seed, args.env, args.dataset, args.preset, seed, args.episodes, settings["offline"], args.pretrain_dir
            )
            for seed in todo
        }
        for seed, future in futures.items():
            data["per_seed"][str(seed)] = future.result()
            write_json(out, data)
            print(f"seed {seed}: " + ", ".join(f"{m} {data['per_seed'][str(seed)][m]['normalized']:.1f}" for m in METHODS))
    data["wall_s_last_invocation"] = time.perf_counter() - start
    write_json(out, data)
    print()
    print(f"{args.env} / {args.dataset}, preset {args.preset}, seeds {sorted(int(s) for s in data['per_seed'])}")
    print(table(data["per_seed"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
