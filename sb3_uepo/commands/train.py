"""``uepo train`` and ``uepo eval``: pretrain offline and fine-tune online from the command line; evaluate a saved model.

Owns: argument parsing, the order of the main job (offline pretraining, evaluation of the offline-chosen policy,
online fine-tuning, evaluation, saving the model and a JSON report), and loading a saved model of any SB3 algorithm
for ``uepo eval``. The algorithm is ``sb3_uepo.uepo.UEPO``; evaluation is ``sb3_uepo.common.evaluation``.
Heavy imports (torch, SB3, MuJoCo) happen inside the command functions so that ``uepo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sb3_uepo.uepo.defaults import DEFAULT_N_ENVS, NOISE_BOUND, NOISE_PENALTY, fine_tuning_defaults

# Online env steps of `uepo train` when --online-steps is not given, by budget preset. `quick` is the main job: with
# the quick offline pretraining it must finish in < 15 min on a 2-core CPU (measured: docs/benchmarks.md, "Main job").
DEFAULT_ONLINE_STEPS = {"quick": 30_000, "default": 200_000, "paper": 1_000_000}
PRESET_HELP = "quick, default, paper, uni_o4, bc, or a budget+variant such as quick+uni_o4 or quick+bc"
FALLBACK_ENV = "Hopper-v5"
NO_DATASET = ("none", "None", "")
THREADS_HELP = (
    "torch CPU threads (default: 1; small networks are fastest single-threaded, and several threads on a busy CPU "
    "make every predict() call several times slower)"
)


def budget_preset(preset: str | None) -> str:
    """The budget part of a preset name: ``"quick+uni_o4"`` -> ``"quick"``, ``"uni_o4"`` -> ``"default"``."""
    for name in (preset or "default").split("+"):
        if name.strip() in DEFAULT_ONLINE_STEPS:
            return name.strip()
    return "default"


def default_policy(preset: str | None) -> str:
    """``MlpPolicy`` for the Uni-O4 and BC variants (Gaussian members), else ``DiffusionPolicy``."""
    return "MlpPolicy" if {"uni_o4", "bc"} & set((preset or "").split("+")) else "DiffusionPolicy"


TRAIN_DESCRIPTION = """\
Train UEPO: offline pretraining on a dataset (a behaviour diffusion model acting deterministically from the prior's
mode, IQL critics; with --offline offline_improvement=True also the members' offline PPO, model-based OPE and the
offline choice), then online PPO fine-tuning over the denoising chain (or, with --online steer, SAC steering the frozen
policy's initial noise).

With no arguments this is the project's main job: the embedded Hopper-v5 medium dataset, the `quick` preset, offline
pretraining then a short online phase (under 10 minutes on a 2-core CPU). It prints the normalised score (0 = random,
100 = D4RL expert) of the offline policy and of the fine-tuned policy, deterministic and stochastic, and writes OUT.zip
(the model, loadable with UEPO.load) and OUT.json (the offline report, the evaluations and the wall times). The
finished offline stages are kept in OUT_offline/: the same command resumes after an interruption.

The offline phase never queries the environment. The real-environment scores printed after it are for reporting only.
"""

TRAIN_EPILOG = """\
examples:
  uepo train                                                # main job: embedded Hopper data, quick preset
  uepo train --online-steps 100000 --seed 1 --out runs/hopper_s1
  uepo train --dataset hopper-medium-local-v0 --preset default --tensorboard
  uepo train --preset quick+uni_o4                          # the Uni-O4 baseline through the same code and budget
  uepo train --offline n_members=2 --param n_steps=512      # override preset fields / constructor arguments
  uepo train --env Pendulum-v1 --dataset none --online-steps 50000   # online only, no dataset
"""

EVAL_DESCRIPTION = """\
Evaluate a saved model (UEPO, or any SB3 algorithm) in its environment: mean ± std return and D4RL normalised
score over N episodes, with deterministic and with stochastic actions (both by default).

The environment is --env, else the one recorded in the JSON report beside the model (OUT.json written by
`uepo train`), else the model's dataset environment. A VecNormalize file beside the model
(<model>_vecnormalize.pkl, or --vecnormalize) is applied frozen.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``uepo train`` and ``uepo eval``."""
    formatter = argparse.RawDescriptionHelpFormatter
    train = subparsers.add_parser(
        "train",
        help="offline pretraining + online fine-tuning (the main job with no arguments)",
        description=TRAIN_DESCRIPTION,
        epilog=TRAIN_EPILOG,
        formatter_class=formatter,
    )
    train.add_argument("--env", default=None, metavar="ENV_ID", help="gymnasium id (default: the dataset's env, or Hopper-v5)")
    train.add_argument(
        "--dataset",
        default=None,
        metavar="DATASET",
        help="embedded name, Minari id or path (default: the embedded hopper-medium-v0); 'none' for online only",
    )
    train.add_argument("--preset", default="quick", help=f"offline budgets and switches: {PRESET_HELP} (default: quick)")
    train.add_argument(
        "--policy",
        default=None,
        choices=("DiffusionPolicy", "MlpPolicy"),
        help="default: MlpPolicy for the uni_o4 variant, else DiffusionPolicy",
    )
    train.add_argument(
        "--online-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"online env steps (default by budget preset: {_format_steps(DEFAULT_ONLINE_STEPS)}); 0: offline only",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the algorithm and environments (default: 0)")
    train.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="output path without extension: writes PATH.zip and PATH.json (default: runs/uepo_<task>)",
    )
    train.add_argument(
        "--offline",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override fields of the preset's offline settings (UEPO offline_kwargs), e.g. --offline n_members=2",
    )
    train.add_argument(
        "--param",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="UEPO constructor arguments, on top of the fine-tuning defaults (docs/usage.md), e.g. --param clip_range=0.02",
    )
    train.add_argument(
        "--n-envs",
        type=int,
        default=DEFAULT_N_ENVS,
        metavar="N",
        help=f"parallel training environments (default: {DEFAULT_N_ENVS})",
    )
    train.add_argument("--tensorboard", action="store_true", help="log to TensorBoard under PATH_tb/")
    train.add_argument("--eval-episodes", type=int, default=10, metavar="N", help="episodes of each evaluation (default: 10)")
    train.add_argument("--device", default="auto", help="torch device (default: auto, i.e. cuda when available)")
    train.add_argument("--threads", type=int, default=1, metavar="N", help=THREADS_HELP)
    train.add_argument(
        "--offline-jobs",
        type=int,
        default=None,
        metavar="N",
        help="worker processes of the offline phase: the behaviour model and the critics (and the dynamics ensemble "
        "when it runs) train side by side, each with --threads threads; same weights as one by one (default: 2 on a "
        "machine with 2 or more cores, else 1)",
    )
    train.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="SB3 verbosity (default: 1)")
    train.add_argument(
        "--no-progress", action="store_true", help="no progress bars (for logs and CI; one line per offline stage stays)"
    )
    train.add_argument(
        "--online",
        default="ppo",
        choices=("ppo", "steer"),
        help="online mode: ppo (chain-PPO fine-tuning, default) or steer (the diffusion policy frozen, SB3's SAC "
        "learns its initial noise per state)",
    )
    train.add_argument(
        "--noise-bound",
        type=float,
        default=NOISE_BOUND,
        metavar="B",
        help=f"steer: half-width of the noise space (default: {NOISE_BOUND})",
    )
    train.add_argument(
        "--noise-penalty",
        type=float,
        default=NOISE_PENALTY,
        metavar="L",
        help=f"steer: the agent's reward is the env's minus L * ||noise||^2, a Gaussian prior on the noise "
        f"(default: {NOISE_PENALTY})",
    )
    train.add_argument(
        "--steer-critic",
        default="noise",
        choices=("noise", "action"),
        help="steer: the SAC critic takes the noise (default) or the frozen policy's action, started from the offline "
        "IQL critic (noise aliasing)",
    )
    train.add_argument(
        "--restart",
        action="store_true",
        help="discard the offline stage checkpoints of an earlier run on this --out (PATH_offline/) and start over",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=10_000,
        metavar="N",
        help="save the model (PATH.zip, atomically) every N online env steps (default: 10000; 0: only at the end)",
    )
    train.add_argument(
        "--stage-scores",
        action="store_true",
        help="after pretraining, also score every offline stage in the real env (behaviour model, every member before "
        "and after offline PPO next to its OPE score); reporting only, the choice was made offline",
    )
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "eval",
        help="mean ± std return and normalised score of a saved model",
        description=EVAL_DESCRIPTION,
        epilog="examples:\n  uepo eval runs/uepo_hopper.zip\n  uepo eval runs/uepo_hopper.zip --episodes 20 --deterministic",
        formatter_class=formatter,
    )
    evaluate.add_argument("model", metavar="MODEL.zip", help="a model saved by UEPO (or any SB3 algorithm)")
    evaluate.add_argument(
        "--env", default=None, metavar="ENV_ID", help="gymnasium id (default: from the report beside the model)"
    )
    evaluate.add_argument("--episodes", type=int, default=10, metavar="N", help="episodes per mode (default: 10)")
    modes = evaluate.add_mutually_exclusive_group()
    modes.add_argument(
        "--deterministic", dest="modes", action="store_const", const=["deterministic"], help="deterministic only"
    )
    modes.add_argument("--stochastic", dest="modes", action="store_const", const=["stochastic"], help="stochastic only")
    modes.add_argument(
        "--both", dest="modes", action="store_const", const=["deterministic", "stochastic"], help="both (the default)"
    )
    evaluate.set_defaults(modes=["deterministic", "stochastic"])
    evaluate.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the evaluation environments (default: the one `uepo train` evaluated with, 10000 + training seed)",
    )
    evaluate.add_argument(
        "--algo", default="auto", help="algorithm of the model: auto (read from the file), uepo, ppo, sac, td3, a2c, ..."
    )
    evaluate.add_argument("--vecnormalize", default=None, metavar="PKL", help="VecNormalize statistics to apply")
    evaluate.add_argument("--device", default="auto", help="torch device (default: auto)")
    evaluate.add_argument("--threads", type=int, default=1, metavar="N", help=THREADS_HELP)
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.set_defaults(func=run_eval)


# --- uepo train ---------------------------------------------------------------------------------------------------


def validate_train_args(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check every argument of ``uepo train`` before any work starts; raise ``ValueError`` naming the fix.

    :return: the parsed ``--offline`` and ``--param`` assignments
    """
    for name, value, low in (
        ("--online-steps", args.online_steps, 0),
        ("--n-envs", args.n_envs, 1),
        ("--threads", args.threads, 1),
        ("--offline-jobs", getattr(args, "offline_jobs", None), 1),
        ("--seed", args.seed, 0),
        ("--eval-episodes", args.eval_episodes, 0),
        ("--checkpoint-every", args.checkpoint_every, 0),
        ("--noise-bound", args.noise_bound, 1e-6),
        ("--noise-penalty", args.noise_penalty, 0),
    ):
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if args.env is not None:
        check_env_id(args.env)
    if args.online == "steer" and (args.policy or default_policy(args.preset)) != "DiffusionPolicy":
        raise ValueError(
            "--online steer steers the initial noise of the DiffusionPolicy: drop --policy MlpPolicy / the variant"
        )
    offline_kwargs = parse_assignments(args.offline, "--offline")
    params = parse_assignments(args.param, "--param")
    check_constructor_params(params)
    from sb3_uepo.offline.config import resolve_offline_config

    resolve_offline_config(args.preset, offline_kwargs)  # unknown preset or key, wrong type or range
    return offline_kwargs, params


def offline_jobs(args: argparse.Namespace) -> int:
    """``--offline-jobs``, or its default: 2 worker processes where the machine has 2 or more cores."""
    if getattr(args, "offline_jobs", None) is not None:
        return int(args.offline_jobs)
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def check_env_id(env_id: str) -> None:
    """Raise ``ValueError`` when ``env_id`` is not a registered gymnasium environment."""
    import gymnasium as gym

    try:
        gym.spec(env_id)
    except gym.error.Error as exc:
        raise ValueError(f"unknown environment {env_id!r} ({exc}); pass a registered gymnasium id, e.g. Hopper-v5") from None


# UEPO constructor arguments that `uepo train` sets itself (through its own options), not through --param
TRAIN_OWNED_PARAMS = ("policy", "env", "dataset", "preset", "offline_kwargs", "seed", "device", "verbose", "tensorboard_log")


def check_constructor_params(params: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a ``--param`` that is not a UEPO constructor argument (or that an option owns)."""
    import difflib
    import inspect

    from sb3_uepo.uepo.uepo import UEPO

    accepted = [p for p in inspect.signature(UEPO.__init__).parameters if p not in ("self", "_init_setup_model")]
    for key in params:
        if key in TRAIN_OWNED_PARAMS:
            raise ValueError(f"--param {key}=... is set by its own option (e.g. --{key.replace('_', '-')}), not by --param")
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"--param {key}: not a UEPO argument.{hint} See `python -c 'help(sb3_uepo.UEPO)'`")


def run_train(args: argparse.Namespace) -> int:
    try:
        offline_kwargs, params = validate_train_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    from sb3_uepo.common.datasets import DEFAULT_DATASET, DatasetError, load_dataset
    from sb3_uepo.common.io import LockedError, output_lock

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dataset = None
    dataset_name = DEFAULT_DATASET if args.dataset is None else args.dataset
    if dataset_name not in NO_DATASET:
        try:
            dataset = load_dataset(dataset_name, env=args.env)
        except DatasetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if dataset is not None and not args.env and not dataset.env_id:
        print(
            f"error: dataset '{dataset.name}' does not name its environment; pass --env ENV_ID (e.g. --env Walker2d-v5) "
            "so that shapes are checked and scores use the right reference returns",
            file=sys.stderr,
        )
        return 2
    env_id = args.env or (dataset.env_id if dataset is not None else FALLBACK_ENV)
    if dataset is not None and not args.env:
        try:
            check_env_id(env_id)
        except ValueError as exc:
            print(f"error: the dataset's {exc}; pass --env ENV_ID", file=sys.stderr)
            return 2
    policy = args.policy or default_policy(args.preset)
    online_steps = DEFAULT_ONLINE_STEPS[budget_preset(args.preset)] if args.online_steps is None else args.online_steps
    out = default_out(env_id) if args.out is None else Path(args.out.removesuffix(".zip"))
    try:
        with output_lock(out, "--out"), sigterm_as_keyboard_interrupt():
            return _train(args, dataset, env_id, policy, online_steps, out, offline_kwargs, params, start)
    except LockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(
    args: argparse.Namespace,
    dataset: Any,
    env_id: str,
    policy: str,
    online_steps: int,
    out: Path,
    offline_kwargs: dict[str, Any],
    params: dict[str, Any],
    start: float,
) -> int:
    """The body of ``uepo train`` once the arguments are checked and ``--out`` is locked."""
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_uepo.common.evaluation import EVAL_SEED_OFFSET
    from sb3_uepo.common.io import atomic_path, write_json
    from sb3_uepo.uepo import UEPO

    model_path, report_path = out.with_name(out.name + ".zip"), out.with_name(out.name + ".json")
    pretrain_dir = out.with_name(out.name + "_offline")
    if args.restart and pretrain_dir.exists():
        shutil.rmtree(pretrain_dir)

    _section(f"UEPO on {env_id}")
    if dataset is not None:
        stats = dataset.statistics()
        print(
            f"dataset   {dataset.name}: {stats.n_episodes} episodes, {stats.n_transitions:,} transitions, "
            f"return {stats.return_mean:.1f} ± {stats.return_std:.1f}{_dataset_score(env_id, stats.return_mean, dataset)}"
        )
    else:
        print("dataset   none: online learning from scratch")
    print(f"preset    {args.preset}   policy {policy}   online steps {online_steps:,}   seed {args.seed}")
    print(f"output    {model_path}  {report_path}")
    if dataset is not None:
        print(f"offline checkpoints {pretrain_dir}/ (a rerun of this command resumes from them)")

    n_envs = args.n_envs
    env = make_vec_env(env_id, n_envs=n_envs, seed=args.seed)
    constructor = {
        **(fine_tuning_defaults(policy, n_envs) if dataset is not None else {}),
        "dataset": dataset,
        "preset": args.preset,
        "seed": args.seed,
        "verbose": args.verbose,
        "device": args.device,
        "tensorboard_log": str(out.with_name(out.name + "_tb")) if args.tensorboard else None,
        **({"pretrain_dir": str(pretrain_dir), "pretrain_jobs": offline_jobs(args)} if dataset is not None else {}),
        **params,
    }
    if offline_kwargs:
        constructor["offline_kwargs"] = offline_kwargs
    try:
        model = UEPO(policy, env, **constructor)
    except ValueError as exc:  # bad preset, offline key or argument: UEPO's message says which
        print(f"error: {exc}", file=sys.stderr)
        return 2

    report: dict[str, Any] = {
        "command": " ".join(["uepo", *sys.argv[1:]]) if Path(sys.argv[0]).name == "uepo" else " ".join(sys.argv),
        "env_id": env_id,
        "dataset": None if dataset is None else dataset.name,
        "preset": args.preset,
        "policy": policy,
        "seed": args.seed,
        "n_envs": n_envs,
        "online_steps": online_steps,
        "offline_kwargs": offline_kwargs,
        "params": {k: v for k, v in constructor.items() if k not in ("dataset", "tensorboard_log", "pretrain_dir")},
        "model_path": str(model_path),
        "warnings": [],
        "evaluation": {},
        "wall_s": {},
    }
    eval_seed = EVAL_SEED_OFFSET + args.seed  # not the training seeds; `uepo eval` uses the same by default
    if dataset is not None:
        _section("Offline pretraining")
        offline_start = time.perf_counter()
        try:
            offline_report = model.pretrain(progress_bar=not args.no_progress and _has_progress_bar())
        except KeyboardInterrupt:
            print(
                f"\ninterrupted during offline pretraining: the finished stages are kept in {pretrain_dir}/; "
                "rerun the same command to resume",
                file=sys.stderr,
            )
            return 130
        except ValueError as exc:  # checkpoints of another config or dataset under this --out
            print(f"error: {exc}\n  (rerun with --restart to discard them, or choose another --out)", file=sys.stderr)
            return 2
        report["wall_s"]["offline"] = time.perf_counter() - offline_start
        report["offline_report"] = report_to_dict(offline_report)
        print(f"offline pretraining done in {_duration(report['wall_s']['offline'])}")
        chosen = _describe_choice(report["offline_report"])
        if chosen:
            print(chosen)
    if dataset is not None and args.eval_episodes > 0:
        _score_offline_result(args, report, model, env_id, eval_seed, dataset)

    if online_steps > 0:
        model = _online_phase(args, model, online_steps, model_path, report)
        if model is None:
            return 2
    if online_steps > 0 and args.eval_episodes > 0:
        _evaluate_into(report, "after_online", model, env_id, args.eval_episodes, eval_seed, dataset)
    env.close()

    with atomic_path(model_path, suffix=".zip") as tmp:
        model.save(tmp)
    report["wall_s"]["total"] = time.perf_counter() - start
    report["machine"] = _machine()
    write_json(report_path, report)
    _print_summary(report, model_path, report_path)
    return 0


def _score_offline_result(
    args: argparse.Namespace, report: dict[str, Any], model: Any, env_id: str, eval_seed: int, dataset: Any
) -> None:
    """Real-env scores after the offline phase, a warning when they are below the data's, and (``--stage-scores``)
    every stage's. Reporting only: the member was chosen by offline policy evaluation, before and without them."""
    from sb3_uepo.common.evaluation import score_offline_stages

    _evaluate_into(report, "after_offline", model, env_id, args.eval_episodes, eval_seed, dataset)
    warning = _below_data_warning(report, env_id, dataset, args.preset)
    if warning:
        report["warnings"].append(warning)
        print(f"warning: {warning}")
    if args.stage_scores and model.offline_result is not None:
        stage_start = time.perf_counter()
        stages = score_offline_stages(
            model, model.offline_result, env_id, n_episodes=args.eval_episodes, seed=eval_seed, dataset=dataset
        )
        report["stage_scores"] = stages
        report["wall_s"]["stage_scores"] = time.perf_counter() - stage_start
        print(format_stage_scores(stages))


def _online_phase(args: argparse.Namespace, model: Any, online_steps: int, model_path: Path, report: dict[str, Any]) -> Any:
    """Chain-PPO fine-tuning, or (``--online steer``) noise-space steering with SAC; returns the model to evaluate and
    save (the steered model in that mode), or None on an error already printed. Ctrl-C / SIGTERM stops it cleanly."""
    from sb3_uepo.common.callbacks import PeriodicCheckpoint
    from sb3_uepo.common.policies import DiffusionPolicy

    progress = not args.no_progress and _has_progress_bar()
    start = time.perf_counter()
    if args.online == "steer":
        if not isinstance(model.policy, DiffusionPolicy):
            print("error: --online steer needs the DiffusionPolicy", file=sys.stderr)
            return None
        _section("Online steering of the initial noise (SAC; the diffusion policy frozen)")
        model, kwargs = (
            model.steer(noise_bound=args.noise_bound, noise_penalty=args.noise_penalty, critic=args.steer_critic, verbose=0),
            {},
        )
    else:
        _section("Online fine-tuning")
        kwargs = {"callback": PeriodicCheckpoint(model_path, args.checkpoint_every)}
    try:
        model.learn(online_steps, progress_bar=progress, **kwargs)
    except KeyboardInterrupt:  # keep what was learned: evaluate and save the model as it is
        report["interrupted"] = True
        print(f"\ninterrupted after {model.num_timesteps:,} online env steps: evaluating and saving the model as it is")
    report["wall_s"]["online"] = time.perf_counter() - start
    report["online_env_steps"] = int(model.num_timesteps)
    print(f"online phase done in {_duration(report['wall_s']['online'])} ({model.num_timesteps:,} env steps)")
    return model


def _evaluate_into(
    report: dict[str, Any], phase: str, model: Any, env_id: str, episodes: int, seed: int, dataset: Any
) -> None:
    """Evaluate deterministically and stochastically; store and print both under ``phase`` (``<phase>_stochastic``)."""
    from sb3_uepo.common.evaluation import MODES, evaluate_modes

    evaluations = evaluate_modes(model, env_id, MODES, n_episodes=episodes, seed=seed, dataset=dataset)
    report["evaluation"][phase] = evaluations["deterministic"].to_dict()
    report["evaluation"][f"{phase}_stochastic"] = evaluations["stochastic"].to_dict()
    report["wall_s"][f"eval_{phase}"] = sum(e.wall_s for e in evaluations.values())
    label = "after offline (real env, reporting only)" if phase == "after_offline" else "after online"
    for evaluation in evaluations.values():
        print(f"{label}: {evaluation.summary()}")


def _print_summary(report: dict[str, Any], model_path: Path, report_path: Path) -> None:
    _section("Summary")
    for phase, label in (
        ("after_offline", "after offline (deterministic)"),
        ("after_offline_stochastic", "after offline (stochastic)   "),
        ("after_online", "after online (deterministic) "),
        ("after_online_stochastic", "after online (stochastic)    "),
    ):
        if phase in report["evaluation"]:
            score = report["evaluation"][phase]["normalized_mean"]
            value = (
                f"normalised score {score:.1f}"
                if score is not None
                else f"return {report['evaluation'][phase]['mean_return']:.1f}"
            )
            print(f"{label}  {value}")
    print(f"total time     {_duration(report['wall_s']['total'])}")
    print(f"model          {model_path}   (evaluate: uepo eval {model_path})")
    print(f"report         {report_path}")


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``kill PID``, a job scheduler's stop) is handled as Ctrl-C: the run stops the same
    way, keeping its checkpoints and saving what it learned."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_out(env_id: str) -> Path:
    """``runs/uepo_<task>`` (``runs/uepo_hopper`` for Hopper-v5)."""
    task = env_id.split("/")[-1].split("-")[0].lower() or "env"
    return Path("runs") / f"uepo_{task}"


def parse_assignments(items: list[str], option: str = "KEY=VALUE") -> dict[str, Any]:
    """``["n_members=2", "lr=1e-4", "name=abc"]`` -> ``{"n_members": 2, "lr": 1e-4, "name": "abc"}``.

    Values are Python literals when they parse as one (numbers, True/False/None, lists, dicts, quoted strings),
    else plain strings.

    :param items: ``KEY=VALUE`` strings
    :param option: option name for error messages
    """
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        parsed[key.strip()] = literal(value.strip())
    return parsed


def literal(text: str) -> Any:
    """A Python literal when ``text`` is one, else ``text`` itself (``true``/``false``/``none`` accepted too)."""
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def report_to_dict(report: Any) -> dict[str, Any]:
    """A pretraining report as plain data (dataclass, object with ``to_dict``, or mapping)."""
    from sb3_uepo.benchmark.baselines import report_to_dict as convert

    return convert(report)


def _describe_choice(report: dict[str, Any]) -> str:
    """Lines on the member chosen by offline policy evaluation (OPE), from the offline report."""
    if "chosen_member" not in report:
        return ""
    text = f"handed on, chosen offline (no env step): member {report['chosen_member']}"
    if report.get("best_ope_scores"):
        text += f"   OPE scores per member {_short(report['best_ope_scores'])}"
    if report.get("chosen_reason"):
        text += f"\n  {report['chosen_reason']}"
    return text


def format_stage_scores(stages: dict[str, Any]) -> str:
    """The per-stage real scores of :func:`~sb3_uepo.common.evaluation.score_offline_stages` as a small table."""
    lines = [
        "per-stage real scores (normalised; reporting only)",
        "  stage        member  OPE (norm.)  deterministic  stochastic",
    ]
    for row in stages["stages"]:
        ope = row.get("ope_normalized")
        cells = [_score_cell(row.get(mode, {})) for mode in ("deterministic", "stochastic")]
        member = "-" if row["member"] is None else str(row["member"])
        chosen = "  <- chosen" if row["stage"] == "offline_ppo" and row["member"] == stages["chosen_member"] else ""
        ope_cell = "-" if ope is None else f"{ope:.1f}"
        lines.append(f"  {row['stage']:<12} {member:>6}  {ope_cell:>11}  {cells[0]:>13}  {cells[1]:>10}{chosen}")
    if stages.get("regret") is not None:
        lines.append(
            f"  regret of the OPE choice {stages['regret']:.1f} (a random choice: {stages['random_choice_regret']:.1f})"
        )
    return "\n".join(lines)


def _score_cell(evaluation: dict[str, Any]) -> str:
    value = evaluation.get("normalized_mean")
    return "-" if value is None else f"{value:.1f}"


def _below_data_warning(report: dict[str, Any], env_id: str, dataset: Any, preset: str) -> str | None:
    """A warning when the offline policy scores below its own data (normalised, deterministic), or None.

    Only with reference scores for the task: the data's episodes and the evaluation episodes may differ in length
    otherwise, so raw returns are not comparable. Measured on the offline suite (docs/benchmarks.md): on some datasets
    the offline result falls far below its data and below plain BC, and nothing offline tells."""
    from sb3_uepo.common.evaluation import normalized_scores

    score = report["evaluation"].get("after_offline", {}).get("normalized_mean")
    data = normalized_scores(env_id, [dataset.statistics().return_mean], dataset)
    if score is None or data is None or score >= data[0]:
        return None
    floor = f"{budget_preset(preset)}+bc"
    hint = "" if "bc" in preset.split("+") else f" Compare with plain behaviour cloning: --preset {floor}."
    return (
        f"the offline policy scores {score:.1f} (normalised, deterministic), below its own data's {data[0]:.1f}: "
        f"it acts worse than the behaviour that made the data.{hint}"
    )


def _dataset_score(env_id: str, ret: float, dataset: Any) -> str:
    from sb3_uepo.common.evaluation import normalized_scores

    scores = normalized_scores(env_id, [ret], dataset)
    return "" if scores is None else f" (normalised {scores[0]:.1f})"


# --- uepo eval ----------------------------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from sb3_uepo.common.evaluation import EVAL_SEED_OFFSET, evaluate_modes

    torch.set_num_threads(args.threads)
    path = Path(args.model)
    if not path.is_file() and path.with_name(path.name + ".zip").is_file():
        path = path.with_name(path.name + ".zip")
    if not path.is_file():
        print(f"error: no model file {args.model}", file=sys.stderr)
        return 2
    try:
        model = load_model(path, args.algo, device=args.device)
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sidecar = _sidecar_report(path)
    env_id = args.env or sidecar.get("env_id") or _model_env_id(model)
    if not env_id:
        print(f"error: cannot tell which environment {path} was trained in; pass --env ENV_ID", file=sys.stderr)
        return 2
    vec_normalize = args.vecnormalize
    default_stats = path.with_name(path.stem + "_vecnormalize.pkl")
    if vec_normalize is None and default_stats.is_file():
        vec_normalize = str(default_stats)
    seed = args.seed if args.seed is not None else EVAL_SEED_OFFSET + int(sidecar.get("seed") or 0)
    results = evaluate_modes(model, env_id, args.modes, n_episodes=args.episodes, seed=seed, vec_normalize=vec_normalize)
    if args.json:
        print(
            json.dumps(
                {"model": str(path), "env_id": env_id, "seed": seed, **{m: r.to_dict() for m, r in results.items()}}, indent=2
            )
        )
        return 0
    print(f"{path}  ({type(model).__name__}) on {env_id}, evaluation seed {seed}")
    for mode, result in results.items():
        print(f"  {mode:<13} {result.summary()}")
    return 0


def load_model(path: str | os.PathLike, algo: str = "auto", device: str = "auto") -> Any:
    """Load a saved model; ``algo="auto"`` reads which algorithm saved it from the file.

    :param path: ``.zip`` file written by ``model.save``
    :param algo: ``auto`` or an algorithm name (``uepo``, ``ppo``, ``sac``, ``td3``, ``a2c``, ``ddpg``, ``dqn``)
    :param device: torch device
    """
    name = detect_algorithm(path) if algo == "auto" else algo.lower()
    if name == "uepo_steer":
        from sb3_uepo.uepo.steering import SteeredModel

        return SteeredModel.load(path)
    algorithms = _algorithm_classes()
    if name not in algorithms:
        raise ValueError(f"Unknown algorithm {name!r}: choose from {', '.join(sorted(algorithms))}")
    # Schedules are not needed to act; loading without them also works for models pickled by other Python versions.
    custom_objects = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0}
    return algorithms[name].load(str(path), device=device, custom_objects=custom_objects)


def detect_algorithm(path: str | os.PathLike) -> str:
    """Which algorithm saved a model zip, read from its ``data`` (policy module and algorithm attributes)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if "steering.json" in archive.namelist():
                return "uepo_steer"
            data = json.loads(archive.read("data"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a model saved by Stable-Baselines3 ({exc})") from exc
    module = str(data.get("policy_class", {}).get("__module__", ""))
    if module.startswith("sb3_uepo") or {"preset", "offline_kwargs", "kl_ref_coef"} & data.keys():
        return "uepo"
    for name in ("sac", "td3", "ddpg", "dqn"):
        if f"stable_baselines3.{name}." in module + ".":
            return name
    if "clip_range" in data:
        return "ppo"
    if "n_steps" in data:
        return "a2c"
    raise ValueError(f"Cannot tell which algorithm saved {path} (policy module {module!r}); pass --algo")


def _algorithm_classes() -> dict[str, Any]:
    from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3

    classes: dict[str, Any] = {"a2c": A2C, "ddpg": DDPG, "dqn": DQN, "ppo": PPO, "sac": SAC, "td3": TD3}
    try:
        from sb3_uepo.uepo import UEPO

        classes["uepo"] = UEPO
    except ImportError:
        pass
    return classes


def _sidecar_report(path: Path) -> dict[str, Any]:
    report = path.with_suffix(".json")
    if not report.is_file():
        return {}
    try:
        return json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _model_env_id(model: Any) -> str | None:
    for attribute in ("env_id", "dataset_env_id"):
        value = getattr(model, attribute, None)
        if isinstance(value, str) and value:
            return value
    dataset = getattr(model, "dataset", None)
    return getattr(dataset, "env_id", None) if dataset is not None else None


# --- small helpers ------------------------------------------------------------------------------------------------


def _format_steps(steps: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in steps.items())


def _section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in value) + "]"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _has_progress_bar() -> bool:
    try:
        import rich  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return sys.stdout.isatty()


def _machine() -> dict[str, Any]:
    from sb3_uepo.benchmark.runner import machine_info

    return machine_info()
