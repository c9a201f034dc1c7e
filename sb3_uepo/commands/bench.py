"""``uepo bench``: UEPO, the Uni-O4 preset and SB3 baselines on tasks x seeds, in parallel processes, resumable.

Owns: argument parsing and building the grid of :class:`~sb3_uepo.benchmark.runner.RunSpec`. Running is
``sb3_uepo.benchmark.runner``, aggregation ``sb3_uepo.benchmark.report``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from sb3_uepo.commands.train import literal, parse_assignments

ALGO_CHOICES = ("uepo", "uni_o4", "bc", "ppo", "sac", "ppo_bc", "uepo_steer")
DEFAULT_ONLINE_STEPS = 100_000
# Algorithms whose results depend on the UEPO preset / offline settings / BC budget (the others ignore them, so
# changing those options does not invalidate their finished runs).
USES_PRESET = ("uepo", "uni_o4", "bc", "uepo_steer")
USES_OFFLINE_KWARGS = ("uepo", "uni_o4", "bc", "uepo_steer")
# Training environments per algorithm when --n-envs is not given (rl-zoo3's MuJoCo settings use one for PPO/SAC).
DEFAULT_N_ENVS = {"uepo": 8, "uni_o4": 8, "bc": 8, "ppo": 1, "sac": 1, "ppo_bc": 1, "uepo_steer": 1}

DESCRIPTION = """\
Benchmark UEPO against the Uni-O4 preset and SB3 baselines under the same online env-step budget.

Algorithms (--algos):
  uepo     UEPO, DiffusionPolicy, offline pretraining with --preset, then online fine-tuning
  uni_o4   the Uni-O4 baseline through the same code (UEPO preset uni_o4, Gaussian MlpPolicy)
  bc       plain behaviour cloning through the same code (preset bc: one Gaussian MLP, no offline PPO)
  ppo      SB3 PPO from scratch (rl-zoo3 MuJoCo settings: SB3 defaults + VecNormalize)
  sac      SB3 SAC from scratch (rl-zoo3 MuJoCo settings: learning_starts 10k, capped at 10% of the budget)
  ppo_bc   PPO whose Gaussian actor is behaviour-cloned on the dataset first (dataset observation statistics)
  uepo_steer  uepo's offline phase, then SB3's SAC steers the frozen diffusion policy through its initial noise
              (shares the offline phase with uepo when both run on the same task and seed)

Every (task, algorithm, seed) runs in its own process, --workers at a time. Results go to OUT/runs/<run>.json as each
run ends; a rerun skips finished runs (same settings), so an interrupted benchmark resumes where it stopped.
At the end (and with --report-only) OUT/results.json, OUT/results.md (normalised scores after offline and after
online: mean ± std and IQM with 95% bootstrap intervals across seeds) and OUT/curves/*.png are written.
"""

EPILOG = """\
examples:
  uepo data make --env Hopper-v5 --level medium --steps 100000 --out hopper-medium-local-v0
  uepo bench --tasks Hopper-v5:hopper-medium-local-v0 Walker2d-v5:walker2d-medium-local-v0 \\
             --algos uepo uni_o4 ppo sac ppo_bc --seeds 0 1 2 --online-steps 100000 --workers 2
  uepo bench --out bench_results --report-only            # re-aggregate what has finished
  uepo bench --algos ppo sac --algo-kwargs ppo.n_steps=1024 sac.learning_starts=5000
  uepo bench --backend ray --address auto --out /shared/bench ...   # the grid on a Ray cluster (shared OUT)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``uepo bench``."""
    from sb3_uepo.common.datasets.embedded import DEFAULT_DATASET

    bench = subparsers.add_parser(
        "bench",
        help="UEPO vs the Uni-O4 preset vs SB3 baselines, tasks x seeds, resumable",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--tasks",
        nargs="+",
        default=[f"Hopper-v5:{DEFAULT_DATASET}"],
        metavar="ENV[:DATASET]",
        help=f"tasks as ENV_ID:DATASET (default: Hopper-v5:{DEFAULT_DATASET}); ENV_ID alone for online-only algorithms",
    )
    bench.add_argument(
        "--algos", nargs="+", default=list(ALGO_CHOICES), choices=ALGO_CHOICES, metavar="ALGO", help="default: all"
    )
    bench.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED", help="default: 0 1 2")
    bench.add_argument(
        "--online-steps",
        type=int,
        default=DEFAULT_ONLINE_STEPS,
        metavar="N",
        help=f"online env steps per run (default: {DEFAULT_ONLINE_STEPS:,})",
    )
    bench.add_argument("--preset", default="quick", help="UEPO preset for the offline budgets (default: quick)")
    bench.add_argument("--out", default="bench_results", metavar="DIR", help="output directory (default: bench_results)")
    bench.add_argument("--workers", type=int, default=2, metavar="N", help="runs in parallel, one process each (default: 2)")
    bench.add_argument(
        "--eval-freq",
        type=int,
        default=None,
        metavar="N",
        help="env steps between learning-curve points (default: online steps / 10)",
    )
    bench.add_argument(
        "--eval-episodes", type=int, default=5, metavar="N", help="episodes per learning-curve point (default: 5)"
    )
    bench.add_argument(
        "--final-episodes",
        type=int,
        default=10,
        metavar="N",
        help="episodes of the evaluations after offline / online (default: 10)",
    )
    bench.add_argument(
        "--n-envs",
        type=int,
        default=None,
        metavar="N",
        help=f"training envs (default per algorithm: {_format_dict(DEFAULT_N_ENVS)})",
    )
    bench.add_argument(
        "--bc-steps", type=int, default=None, metavar="N", help="behaviour-cloning steps of ppo_bc (default by preset)"
    )
    bench.add_argument(
        "--offline", nargs="+", default=[], metavar="KEY=VALUE", help="UEPO offline_kwargs overrides (uepo, uni_o4)"
    )
    bench.add_argument(
        "--algo-kwargs",
        nargs="+",
        default=[],
        metavar="ALGO.KEY=VALUE",
        help="constructor arguments of one algorithm, e.g. ppo.n_steps=1024 uepo.kl_ref_coef=0.1",
    )
    bench.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local: a process pool on this machine (default); ray: each run a Ray task (pip install 'sb3-uepo[ray]'); "
        "--workers sets the CPUs of a local Ray instance",
    )
    bench.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join (e.g. auto, ray://head:10001); OUT must then be on storage every node sees",
    )
    bench.add_argument("--force", action="store_true", help="redo finished runs too")
    bench.add_argument("--report-only", action="store_true", help="only aggregate the finished runs in OUT")
    bench.add_argument("--dry-run", action="store_true", help="print the grid and what would be skipped, run nothing")
    bench.add_argument("--no-plots", action="store_true", help="do not draw learning curves")
    bench.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from sb3_uepo.benchmark.report import write_report
    from sb3_uepo.benchmark.runner import finished_result, run_grid

    try:
        specs = build_grid(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["uepo", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("uepo") else " ".join(sys.argv)
    start = time.perf_counter()
    failed = []
    if args.dry_run:
        for spec in specs:
            state = "finished, skip" if finished_result(args.out, spec) is not None else "to run"
            print(f"{spec.run_id:<60} {state}")
        return 0
    if not args.report_only:
        if args.address is not None and args.backend != "ray":
            print("error: --address joins a Ray cluster: add --backend ray", file=sys.stderr)
            return 2
        try:
            outcome = run_grid(
                specs, args.out, workers=args.workers, force=args.force, backend=args.backend, address=args.address
            )
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        failed = outcome["failed"]
    written = write_report(
        args.out,
        plots=not args.no_plots,
        extra={"command": command, "grid_wall_s": time.perf_counter() - start, "n_specs": len(specs)},
    )
    print()
    print(written["table"])
    paths = written["paths"]
    print(f"{written['n_runs']} finished runs aggregated into {paths['json']} and {paths['table']}")
    for plot in paths["plots"]:
        print(f"learning curves: {plot}")
    if failed:
        print(f"{len(failed)} run(s) failed; see {args.out}/logs/. Rerun the same command to retry them.", file=sys.stderr)
        return 1
    return 0


def build_grid(args: argparse.Namespace) -> list[Any]:
    """The :class:`RunSpec` of every (task, algorithm, seed), with fields an algorithm ignores left at None."""
    from sb3_uepo.benchmark.baselines import ALGORITHMS, BC_STEPS_BY_PRESET, BC_STEPS_DEFAULT
    from sb3_uepo.benchmark.runner import RunSpec, parse_task

    if args.online_steps < 1:
        raise ValueError("--online-steps must be >= 1")
    offline_kwargs = parse_assignments(args.offline, "--offline")
    algo_kwargs = parse_algo_kwargs(args.algo_kwargs)
    eval_freq = args.eval_freq or max(args.online_steps // 10, 1)
    specs = []
    for task in args.tasks:
        env_id, dataset = parse_task(task)
        for algo in dict.fromkeys(args.algos):
            if ALGORITHMS[algo].needs_dataset and dataset is None:
                raise ValueError(f"{algo} learns from a dataset: give the task as {env_id}:DATASET")
            bc_steps = None
            if algo == "ppo_bc":
                bc_steps = args.bc_steps or BC_STEPS_BY_PRESET.get(args.preset, BC_STEPS_DEFAULT)
            for seed in dict.fromkeys(args.seeds):
                specs.append(
                    RunSpec(
                        env_id=env_id,
                        dataset=dataset,
                        algo=algo,
                        seed=seed,
                        online_steps=args.online_steps,
                        preset=args.preset if algo in USES_PRESET else None,
                        eval_freq=eval_freq,
                        eval_episodes=args.eval_episodes,
                        final_episodes=args.final_episodes,
                        n_envs=args.n_envs or DEFAULT_N_ENVS[algo],
                        bc_steps=bc_steps,
                        offline_kwargs=offline_kwargs if algo in USES_OFFLINE_KWARGS else {},
                        algo_kwargs=algo_kwargs.get(algo, {}),
                    )
                )
    return specs


def parse_algo_kwargs(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["ppo.n_steps=64", "sac.learning_starts=100"]`` -> ``{"ppo": {"n_steps": 64}, "sac": {...}}``.

    :param items: ``ALGO.KEY=VALUE`` strings
    """
    parsed: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        algo, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"--algo-kwargs expects ALGO.KEY=VALUE, got {item!r}")
        if algo not in ALGO_CHOICES:
            raise ValueError(f"--algo-kwargs: unknown algorithm {algo!r} in {item!r}; choose from {', '.join(ALGO_CHOICES)}")
        parsed.setdefault(algo, {})[key] = literal(value)
    return parsed


def _format_dict(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())
