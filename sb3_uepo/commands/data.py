"""``uepo data make|info|list``: make D4RL-style datasets locally, inspect a dataset, list what is available.

Owns: argument parsing and printing for the data commands. The work is in ``sb3_uepo.common.datasets``;
heavy imports (minari, SB3, torch) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")

DATA_DESCRIPTION = """\
Datasets for offline pretraining: episodes recorded in an environment, stored in the Minari format
(https://minari.farama.org). A dataset is named by
  - the embedded dataset's name (hopper-medium-v0, shipped inside the package, no download),
  - a Minari id such as mujoco/hopper/medium-v0 (looked up under $MINARI_DATASETS_PATH, default
    ~/.minari/datasets; downloaded when the network allows),
  - or a path: a Minari dataset directory, a D4RL-format .hdf5 file, or an .npz file with the same keys.
"""

MAKE_DESCRIPTION = """\
Make a D4RL-style dataset locally (the D4RL/Minari downloads need internet).

Trains a behaviour agent with Stable-Baselines3 PPO until it reaches the level's target return, records
STEPS transitions with its stochastic policy, and writes a Minari dataset with the D4RL reference scores
in its metadata. The behaviour agent (behavior_policy.zip + VecNormalize statistics) is saved beside the data.

Levels (as D4RL defines them; targets are shares of the D4RL expert return):
  random         uniform random actions, no training
  medium         agent trained to one third of the expert return
  medium-replay  every transition seen while training the medium agent
  expert         agent trained to the expert return, or as far as --train-steps-max allows (with a warning)
  medium-expert  half medium data, half expert data

On a 2-core CPU, PPO trains ~1-2k steps/s: a Hopper medium agent takes about 5-10 minutes.
"""

MAKE_EPILOG = """\
examples:
  uepo data make --env Hopper-v5 --level medium --steps 100000 --out hopper-medium-local-v0
  uepo data make --env Hopper-v5 --level random --steps 10000 --out ./my_datasets/hopper-random-v0
  uepo data info hopper-medium-local-v0
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``uepo data`` and its sub-commands."""
    formatter = argparse.RawDescriptionHelpFormatter
    data = subparsers.add_parser(
        "data", help="make, inspect and list offline datasets", description=DATA_DESCRIPTION, formatter_class=formatter
    )
    data.set_defaults(func=lambda args: _print_help(data))
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    make = commands.add_parser(
        "make",
        help="train a behaviour agent and record a D4RL-style Minari dataset",
        description=MAKE_DESCRIPTION,
        epilog=MAKE_EPILOG,
        formatter_class=formatter,
    )
    make.add_argument("--env", required=True, metavar="ENV_ID", help="gymnasium environment id, e.g. Hopper-v5")
    make.add_argument("--level", required=True, choices=LEVELS, help="quality of the behaviour policy (see above)")
    make.add_argument("--steps", required=True, type=int, metavar="N", help="number of transitions to record")
    make.add_argument(
        "--out",
        required=True,
        metavar="ID_OR_PATH",
        help="Minari id (written under $MINARI_DATASETS_PATH or ~/.minari/datasets), e.g. hopper-medium-local-v0; "
        "or a directory path starting with ./ or /",
    )
    make.add_argument("--seed", type=int, default=0, help="seed of training and collection (default: 0)")
    make.add_argument(
        "--train-steps-max",
        type=int,
        default=None,
        metavar="N",
        help="cap on the behaviour agent's training steps (default: 1000000); a warning says when the target is not reached",
    )
    make.add_argument(
        "--target-return",
        type=float,
        default=None,
        metavar="R",
        help="return to train the agent to instead of the level's D4RL target (needed for envs outside the D4RL table)",
    )
    make.add_argument("--n-envs", type=int, default=None, metavar="N", help="parallel training environments (default: 8)")
    make.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    make.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
    make.set_defaults(func=run_make)

    info = commands.add_parser(
        "info",
        help="episodes, transitions, returns and normalised score of a dataset",
        description="Print a dataset's size, return statistics and D4RL normalised score (0 = random, 100 = expert).",
        formatter_class=formatter,
        epilog="examples:\n  uepo data info hopper-medium-v0\n  uepo data info ./hopper_medium_replay-v2.hdf5 --env Hopper-v5",
    )
    info.add_argument("dataset", metavar="DATASET", help="embedded name, Minari id, or path (.hdf5, .npz, Minari directory)")
    info.add_argument("--env", default=None, metavar="ENV_ID", help="also check shapes and action bounds against this env")
    info.add_argument("--no-download", action="store_true", help="never download a Minari id that is not local")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=run_info)

    listing = commands.add_parser(
        "list",
        help="datasets available here (embedded and local Minari datasets)",
        description="List the embedded dataset(s) and the Minari datasets under $MINARI_DATASETS_PATH "
        "(default ~/.minari/datasets). Nothing is downloaded.",
        formatter_class=formatter,
    )
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(func=run_list)


def run_make(args: argparse.Namespace) -> int:
    import torch

    from sb3_uepo.common.datasets.generate import make_dataset
    from sb3_uepo.common.datasets.validation import DatasetError

    torch.set_num_threads(1)  # small MLPs: one thread is as fast and leaves the other cores to the simulator
    try:
        path = make_dataset(
            args.env,
            args.level,
            args.steps,
            args.out,
            seed=args.seed,
            train_steps_max=args.train_steps_max,
            target_return=args.target_return,
            n_envs=args.n_envs,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nDataset written to {path}\n")
    return _print_info(str(path), env=None, download=False, as_json=False)


def run_info(args: argparse.Namespace) -> int:
    return _print_info(args.dataset, env=args.env, download=not args.no_download, as_json=args.json)


def run_list(args: argparse.Namespace) -> int:
    from sb3_uepo.common.datasets.loaders import list_datasets, minari_datasets_root

    entries = list_datasets()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    print(f"Minari datasets root: {minari_datasets_root()}")
    if not entries:
        print("No datasets found. Make one with `uepo data make --help`.")
        return 0
    width = max(len(entry["id"]) for entry in entries)
    print(f"{'DATASET':<{width}}  {'WHERE':<8}  {'ENV':<14}  {'EPISODES':>8}  {'STEPS':>9}")
    for entry in entries:
        print(
            f"{entry['id']:<{width}}  {entry['location']:<8}  {entry['env_id'] or '?':<14}  "
            f"{_or_dash(entry['total_episodes']):>8}  {_or_dash(entry['total_steps']):>9}"
        )
    print("\nInspect one with `uepo data info DATASET`.")
    return 0


def dataset_summary(source: str, env: str | None = None, download: bool = True) -> dict[str, Any]:
    """What ``uepo data info`` prints, as a dict."""
    from sb3_uepo.common.datasets.loaders import load_dataset
    from sb3_uepo.common.datasets.scores import reference_scores
    from sb3_uepo.common.datasets.validation import DatasetError

    dataset = load_dataset(source, env=env, download=download)
    stats = dataset.statistics()
    summary: dict[str, Any] = {
        "dataset": dataset.name,
        "format": dataset.metadata.get("format"),
        "path": dataset.metadata.get("path"),
        "env_id": dataset.env_id,
        "obs_dim": dataset.obs_dim,
        "action_dim": dataset.action_dim,
        "episodes": stats.n_episodes,
        "transitions": stats.n_transitions,
        "terminals": int(dataset.terminals.sum()),
        "timeouts": int(dataset.timeouts.sum()),
        "episode_length_mean": stats.episode_length_mean,
        "return_mean": stats.return_mean,
        "return_std": stats.return_std,
        "return_min": stats.return_min,
        "return_max": stats.return_max,
    }
    try:
        ref_min, ref_max, references_from = reference_scores(env, dataset)
    except DatasetError as exc:
        summary["normalized_score_mean"] = None
        summary["normalized_score_note"] = str(exc)
    else:
        scale = 100.0 / (ref_max - ref_min)  # D4RL: 100 * (return - random) / (expert - random)
        summary.update(
            normalized_score_mean=(stats.return_mean - ref_min) * scale,
            normalized_score_std=stats.return_std * scale,
            normalized_score_min=(stats.return_min - ref_min) * scale,
            normalized_score_max=(stats.return_max - ref_min) * scale,
            ref_min_score=ref_min,
            ref_max_score=ref_max,
            reference_scores_from=references_from,
        )
    behavior = dataset.metadata.get("uepo")
    if isinstance(behavior, dict):
        summary["made_by"] = {key: behavior.get(key) for key in ("level", "policy", "seed", "train_steps", "target_return")}
    return summary


def _print_info(source: str, env: str | None, download: bool, as_json: bool) -> int:
    from sb3_uepo.common.datasets.validation import DatasetError

    try:
        summary = dataset_summary(source, env=env, download=download)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = [
        ("dataset", summary["dataset"]),
        ("format", f"{summary['format']}  ({summary['path']})" if summary["path"] else summary["format"]),
        ("environment", summary["env_id"] or "unknown"),
        ("obs / action dims", f"{summary['obs_dim']} / {summary['action_dim']}"),
        ("episodes", f"{summary['episodes']}"),
        ("transitions", f"{summary['transitions']}  (terminals {summary['terminals']}, timeouts {summary['timeouts']})"),
        ("episode length", f"mean {summary['episode_length_mean']:.1f}"),
        (
            "return",
            f"mean {summary['return_mean']:.1f}  std {summary['return_std']:.1f}  "
            f"min {summary['return_min']:.1f}  max {summary['return_max']:.1f}",
        ),
    ]
    if summary.get("normalized_score_mean") is not None:
        rows.append(
            (
                "normalised score",
                f"mean {summary['normalized_score_mean']:.1f}  std {summary['normalized_score_std']:.1f}  "
                f"min {summary['normalized_score_min']:.1f}  max {summary['normalized_score_max']:.1f}",
            )
        )
        rows.append(
            (
                "reference returns",
                f"random {summary['ref_min_score']:g}, expert {summary['ref_max_score']:g}  "
                f"(from {summary['reference_scores_from']})",
            )
        )
    else:
        rows.append(("normalised score", "unavailable: " + summary.get("normalized_score_note", "")))
    if "made_by" in summary:
        made = summary["made_by"]
        rows.append(("made by", f"uepo data make, level {made['level']}, seed {made['seed']}: {made['policy']}"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)
