"""Offline quality suite: UEPO, the Uni-O4 preset, plain BC and diffusion BC on several tasks, seeds and datasets.

Every (dataset, seed, method) is one job; jobs run in parallel worker processes (one torch thread each) and every
finished job is written to ``--out`` at once (JSON, atomically), so an interrupted suite resumes where it stopped
(the offline stages of an interrupted job resume too: their checkpoints live under ``<out>.runs/``).

Datasets are named ``<task>-<level>`` (e.g. ``walker2d-medium``, ``hopper-medium-replay``) and made with
``uepo data make --env <Task>-v5 --level <level> --steps <N> --seed <data seed>`` under ``--data-dir`` when missing
(the behaviour agents of seed 1 differ from the embedded dataset's, seed 0); ``hopper-medium-v0`` is the embedded
dataset.

Methods (same ``--preset`` budget, same seeds, same evaluation episodes):

* ``uepo``: the UEPO pipeline with the DiffusionPolicy; reports the chosen member and, per stage, the real scores of
  the behaviour diffusion model (``diffusion_bc``), of every member before and after offline PPO next to its OPE
  score, and the chosen member's regret;
* ``uni_o4``: the ``<preset>+uni_o4`` variant (Gaussian members by separate BC, offline PPO, mean-Q OPE);
* ``bc``: the ``bc`` variant, one Gaussian MLP by maximum likelihood (the floor); its critics are not trained here
  (``iql_steps=0``: plain BC reads none, and the suite scores it offline only).

Every policy is evaluated deterministically and stochastically. The table gives, per dataset and method, the
normalised score (mean over seeds) and, over all datasets, the mean and the IQM with a stratified 95% bootstrap CI.

    python benchmarks/offline_suite.py --datasets hopper-medium walker2d-medium halfcheetah-medium \\
        --seeds 0 1 2 --preset quick --workers 2 --out bench_results/offline_suite.json

An ablation of offline PPO's settings reuses the earlier stages of a finished suite:

    python benchmarks/offline_suite.py ... --methods uepo --offline '{"use_divergence": false}' \\
        --stages-from bench_results/offline_suite.json --out bench_results/ablation_no_divergence.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("uepo", "uni_o4", "bc")
ROWS = ("uepo", "diffusion_bc", "uni_o4", "bc")
MODES = ("deterministic", "stochastic")
EMBEDDED = "hopper-medium-v0"
TASKS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5", "ant": "Ant-v5"}


def dataset_location(name: str, data_dir: Path, data_seed: int) -> tuple[str, str]:
    """(env id, dataset source) of a suite dataset name."""
    if name == EMBEDDED:
        return "Hopper-v5", EMBEDDED
    task, _, level = name.partition("-")
    if task not in TASKS or not level:
        raise SystemExit(f"unknown suite dataset {name!r}: use <task>-<level> with a task in {sorted(TASKS)}, or {EMBEDDED}")
    return TASKS[task], str((data_dir / f"{name}-s{data_seed}").resolve())


def make_missing_dataset(name: str, data_dir: Path, data_seed: int, steps: int) -> None:
    env_id, source = dataset_location(name, data_dir, data_seed)
    if name == EMBEDDED or Path(source, "data").is_dir():
        return
    level = name.partition("-")[2]
    command = ["uepo", "data", "make", "--env", env_id, "--level", level, "--steps", str(steps), "--out", source]
    command += ["--seed", str(data_seed), "--no-progress"]
    print("+ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"  made {name} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def run_job(env_id: str, source: str, method: str, preset: str, seed: int, episodes: int, offline: dict, ckpt: str) -> dict:
    """Pretrain one method on one dataset and seed; evaluate it (and, for UEPO, every stage) in the real env."""
    import torch as th

    th.set_num_threads(1)
    from sb3_uepo import UEPO
    from sb3_uepo.common.datasets import load_dataset
    from sb3_uepo.common.evaluation import EVAL_SEED_OFFSET, evaluate_modes, score_offline_stages
    from sb3_uepo.offline.pipeline import OfflinePretrainer

    dataset = load_dataset(source)
    if method == "bc":  # plain BC reads no critic (one member: no choice to make); the suite scores it offline only
        offline = {"iql_steps": 0, **offline}
    variant = {"uepo": preset, "uni_o4": f"{preset}+uni_o4", "bc": f"{preset}+bc"}[method]
    policy = "DiffusionPolicy" if method == "uepo" else "MlpPolicy"
    model = UEPO(policy, env_id, dataset=dataset, preset=variant, offline_kwargs=dict(offline), seed=seed)
    start = time.perf_counter()
    result = OfflinePretrainer(
        dataset, model.observation_space, model.action_space, model.offline_config(), checkpoint_dir=ckpt, progress_bar=False
    ).run()
    model.load_offline_result(result)
    pretrain_s = time.perf_counter() - start
    eval_seed = EVAL_SEED_OFFSET + seed
    out: dict[str, Any] = dict(pretrain_s=pretrain_s, stage_seconds=result.seconds, chosen_member=result.chosen_member)
    # the behaviour model's final training loss (EMA), to set next to its real score: the two do not move together
    out["behavior_final_loss"] = result.stage_reports.get("behavior", {}).get("final_loss")
    out["refine"] = result.stage_reports.get("members", {}).get("refine")  # the critic-guided refinement, when asked
    out["scores"] = {}
    if method in ("uepo", "uni_o4"):
        # every stage's real score (reporting only); the Uni-O4 preset's Gaussian members deterministically only (its
        # four members before and after offline PPO: where the preset gains or loses against plain BC)
        stage_modes = MODES if method == "uepo" else ("deterministic",)
        stages = score_offline_stages(
            model, result, env_id, n_episodes=episodes, seed=eval_seed, dataset=dataset, modes=stage_modes
        )
        out["stages"] = [
            {k: (row[k] if k not in MODES else row[k]["normalized_mean"]) for k in row} for row in stages["stages"]
        ]
        out["regret"] = stages.get("regret")
        out["random_choice_regret"] = stages.get("random_choice_regret")
        chosen = [r for r in out["stages"] if r["stage"] == "offline_ppo" and r["member"] == result.chosen_member]
        out["chosen_ope_normalized"] = chosen[0].get("ope_normalized") if chosen else None
        # the member handed on was scored with the stages (same policy, seed and episodes): not evaluated again
        out["scores"] = {mode: chosen[0][mode] for mode in MODES if chosen and mode in chosen[0]}
    missing = [mode for mode in MODES if mode not in out["scores"]]
    evaluations = evaluate_modes(model, env_id, missing, n_episodes=episodes, seed=eval_seed, dataset=dataset)
    out["scores"].update({mode: ev.normalized_mean for mode, ev in evaluations.items()})
    out["scores"] = {mode: out["scores"][mode] for mode in MODES}
    if method == "uepo":
        behavior = next(row for row in out["stages"] if row["stage"] == "behavior")
        out["diffusion_bc"] = {mode: behavior[mode] for mode in MODES}
    out["wall_s"] = time.perf_counter() - start
    return out


def dataset_return(source: str, env_id: str) -> float | None:
    from sb3_uepo.commands.data import dataset_summary

    return dataset_summary(source, env_id, download=False).get("normalized_score_mean")


# ---------------------------------------------------------------------------------------------- table
def per_method_scores(data: dict, name: str, row: str, mode: str) -> list[float]:
    method = "uepo" if row == "diffusion_bc" else row
    scores = []
    for key, job in data["jobs"].items():
        ds, _seed, m = key.split("|")
        if ds == name and m == method:
            value = job["diffusion_bc"][mode] if row == "diffusion_bc" else job["scores"][mode]
            scores.append(value)
    return scores


def table(data: dict, datasets: list[str]) -> str:
    from sb3_uepo.benchmark.stats import bootstrap_ci

    header = (
        "| dataset | data | " + " | ".join(f"{r} det / stoch" for r in ROWS) + " | OPE (chosen) vs real | regret (random) |"
    )
    lines = [header, "|" + "---|" * (len(ROWS) + 4)]
    for name in datasets:
        cells = []
        for row in ROWS:
            det, sto = (per_method_scores(data, name, row, mode) for mode in MODES)
            cells.append(f"{np.mean(det):.1f} / {np.mean(sto):.1f} (n={len(det)})" if det else "-")
        uepo = [j for k, j in data["jobs"].items() if k.startswith(name + "|") and k.endswith("|uepo")]
        ope = [j.get("chosen_ope_normalized") for j in uepo]
        ope_cell = ", ".join(
            f"{o:.0f} vs {j['scores']['deterministic']:.0f}" if o is not None else "-" for o, j in zip(ope, uepo, strict=True)
        )
        regrets = [(j.get("regret"), j.get("random_choice_regret")) for j in uepo if j.get("regret") is not None]
        regret_cell = f"{np.mean([r for r, _ in regrets]):.1f} ({np.mean([q for _, q in regrets]):.1f})" if regrets else "-"
        own = data.get("data_returns", {}).get(name)
        lines.append(f"| {name} | {own:.1f} | " if own is not None else f"| {name} | - | ")
        lines[-1] += " | ".join(cells) + f" | {ope_cell or '-'} | {regret_cell} |"
    for mode in MODES:
        summary = []
        for row in ROWS:
            strata = [per_method_scores(data, name, row, mode) for name in datasets]
            strata = [s for s in strata if s]
            if not strata:
                summary.append("-")
                continue
            mean = float(np.mean([np.mean(s) for s in strata]))
            estimate, low, high = bootstrap_ci(strata)
            summary.append(f"mean {mean:.1f}, IQM {estimate:.1f} [{low:.1f}, {high:.1f}]")
        lines.append(f"| all ({mode}) | | " + " | ".join(summary) + " | | |")
    return "\n".join(lines)


def stage_table(data: dict, datasets: list[str], method: str = "uepo") -> str:
    """Per run of ``method`` (``uepo`` or ``uni_o4``): the behaviour model (UEPO), every member before and after
    offline PPO, the member chosen offline, its OPE score (model return over the OPE horizon, normalised; a partial
    episode) and the choice's regret against a random one."""
    lines = [
        f"| dataset | seed | {method}: behaviour model det / stoch | members before offline PPO (det) | "
        "members after offline PPO (det) | chosen det / stoch | OPE of chosen | regret (random) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in datasets:
        for key in sorted(k for k in data["jobs"] if k.startswith(name + "|") and k.endswith(f"|{method}")):
            job, seed = data["jobs"][key], key.split("|")[1]
            stages = job.get("stages", [])
            if not stages:
                continue
            behavior = next((r for r in stages if r["stage"] == "behavior"), None)
            before = ", ".join(f"{r['deterministic']:.1f}" for r in stages if r["stage"] == "members")
            after = ", ".join(f"{r['deterministic']:.1f}" for r in stages if r["stage"] == "offline_ppo")
            beh = f"{behavior['deterministic']:.1f} / {behavior['stochastic']:.1f}" if behavior else "-"
            ope = job.get("chosen_ope_normalized")
            regret = f"{job['regret']:.1f} ({job['random_choice_regret']:.1f})" if job.get("regret") is not None else "-"
            chosen = f"{job['scores']['deterministic']:.1f} / {job['scores']['stochastic']:.1f}"
            lines.append(
                f"| {name} | {seed} | {beh} | {before} | {after} | {chosen} | {'-' if ope is None else f'{ope:.1f}'} "
                f"| {regret} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["hopper-medium", "walker2d-medium", "halfcheetah-medium"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="quick", help="budget preset of every method")
    parser.add_argument("--offline", default="{}", help="JSON of offline_kwargs overrides (every method)")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per policy and mode")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir", default="datasets", help="where missing datasets are made")
    parser.add_argument("--data-seed", type=int, default=1, help="seed of the behaviour agents of made datasets")
    parser.add_argument("--data-steps", type=int, default=100_000, help="transitions of made datasets")
    parser.add_argument("--out", default="bench_results/offline_suite.json")
    parser.add_argument(
        "--stages-from",
        default=None,
        metavar="OTHER.json",
        help="start every job from the stage checkpoints of another suite run (e.g. an ablation of offline PPO's "
        "settings: the stages before offline PPO are reused when only its settings differ)",
    )
    parser.add_argument("--table-only", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args(argv)

    from sb3_uepo.common.io import write_json

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    settings = dict(preset=args.preset, offline=json.loads(args.offline), episodes=args.episodes, data_seed=args.data_seed)
    if not args.table_only and data.get("settings") not in (None, settings):
        raise SystemExit(f"{out} holds results of other settings ({data['settings']}); choose another --out")
    if not args.table_only:
        data.update(settings=settings, command=" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]))
    data.setdefault("jobs", {})
    failed: list[str] = []  # keys of jobs that raised in this invocation
    data.setdefault("data_returns", {})
    if not args.table_only:
        data_dir = Path(args.data_dir)
        for name in args.datasets:
            make_missing_dataset(name, data_dir, args.data_seed, args.data_steps)
            env_id, source = dataset_location(name, data_dir, args.data_seed)
            data["data_returns"][name] = dataset_return(source, env_id)
        runs = Path(str(out) + ".runs")
        jobs = {}
        for name in args.datasets:
            env_id, source = dataset_location(name, data_dir, args.data_seed)
            for seed in args.seeds:
                for method in args.methods:
                    key = f"{name}|{seed}|{method}"
                    if key not in data["jobs"]:
                        ckpt = str(runs / f"{name}_s{seed}_{method}")
                        source_ckpt = Path(str(args.stages_from) + ".runs") / Path(ckpt).name if args.stages_from else None
                        if source_ckpt is not None and source_ckpt.is_dir() and not Path(ckpt).exists():
                            shutil.copytree(source_ckpt, ckpt, ignore=shutil.ignore_patterns("stage_offline_ppo*"))
                        jobs[key] = (env_id, source, method, args.preset, seed, args.episodes, settings["offline"], ckpt)
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
            futures = {pool.submit(run_job, *job): key for key, job in jobs.items()}
            for future in as_completed(futures):
                key = futures[future]
                try:
                    data["jobs"][key] = future.result()
                except Exception as error:  # one failed job must not lose the others' results
                    failed.append(key)
                    print(f"{key}: FAILED ({type(error).__name__}: {error})", flush=True)
                    traceback.print_exception(error)
                    continue
                write_json(out, data)
                job = data["jobs"][key]
                extra = f", diffusion BC {job['diffusion_bc']['deterministic']:.1f}" if "diffusion_bc" in job else ""
                print(
                    f"{key}: det {job['scores']['deterministic']:.1f} stoch {job['scores']['stochastic']:.1f}{extra} "
                    f"({job['wall_s'] / 60:.1f} min)",
                    flush=True,
                )
        data["wall_s_last_invocation"] = time.perf_counter() - start
        write_json(out, data)
        if failed:
            print(f"{len(failed)} job(s) failed: {', '.join(failed)}; the others are saved in {out}", flush=True)
    names = [n for n in args.datasets if any(k.startswith(n + "|") for k in data["jobs"])]
    print(table(data, names))
    for method in ("uepo", "uni_o4"):
        if method in args.methods:
            print()
            print(stage_table(data, names, method))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
