"""Train, evaluate and tune UEPO with rl-zoo3 (https://github.com/DLR-RM/rl-baselines3-zoo).

    python -m sb3_uepo.zoo train --algo uepo --env Hopper-v5 -conf zoo_configs/uepo.yml
    python -m sb3_uepo.zoo enjoy --algo uepo --env Hopper-v5 -f logs/ --no-render
    python -m sb3_uepo.zoo train --algo uepo --env Hopper-v5 -optimize --storage sqlite:///uepo.db --study-name uepo-hopper

rl-zoo3 knows its algorithms from a plain dict (``rl_zoo3.utils.ALGOS``) that its scripts import by name, and
``--gym-packages`` cannot add an algorithm; so this wrapper registers ``"uepo"`` in every rl-zoo3 module that holds
that dict (and an Optuna sampler in ``HYPERPARAMS_SAMPLER`` / ``HYPERPARAMS_CONVERTER``), then runs rl-zoo3's own
``train()`` / ``enjoy()`` with the remaining arguments. All rl-zoo3 options work unchanged. Defaults added only when
absent: ``--algo uepo``; ``-conf zoo_configs/uepo.yml`` (this repository's config) for UEPO; ``--num-threads 1``;
``-f logs`` for enjoy (rl-zoo3's own default folder, ``rl-trained-agents``, means a download from the Hub).

rl-zoo3 passes every YAML key it does not know to the algorithm's constructor, so ``dataset``, ``preset`` and
``offline_kwargs`` in ``zoo_configs/uepo.yml`` reach :class:`~sb3_uepo.uepo.UEPO` as they are: the first
``learn()`` pretrains offline, then fine-tunes online for ``n_timesteps`` env steps.

Owns: the registration and the UEPO hyperparameter sampler. rl-zoo3, optuna and requests are optional
(``pip install "sb3-uepo[zoo]"``) and imported only here, only when used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ALGO_NAME = "uepo"
ZOO_EXTRA_HINT = 'rl-zoo3 integration needs the "zoo" extra: pip install "sb3-uepo[zoo]"'
# rl-zoo3 modules that import ALGOS / HYPERPARAMS_SAMPLER by name (rl-zoo3 2.9). Any other loaded rl_zoo3 module
# holding such a dict is updated too (see register()).
ZOO_MODULES = ("rl_zoo3", "rl_zoo3.utils", "rl_zoo3.hyperparams_opt", "rl_zoo3.exp_manager", "rl_zoo3.train", "rl_zoo3.enjoy")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "zoo_configs" / "uepo.yml"

USAGE = """\
usage: python -m sb3_uepo.zoo {train,enjoy} [rl-zoo3 arguments]

  train   rl_zoo3.train with UEPO registered (defaults: --algo uepo, -conf zoo_configs/uepo.yml, --num-threads 1)
  enjoy   rl_zoo3.enjoy with UEPO registered (defaults: --algo uepo, -f logs, --num-threads 1)

examples:
  python -m sb3_uepo.zoo train --algo uepo --env Hopper-v5 -conf zoo_configs/uepo.yml
  python -m sb3_uepo.zoo enjoy --algo uepo --env Hopper-v5 -f logs/ --no-render -n 5000
  python -m sb3_uepo.zoo train --algo uepo --env Hopper-v5 -optimize --n-trials 20 \\
      --storage sqlite:///uepo.db --study-name uepo-hopper

Arguments after the command are rl-zoo3's; see `python -m rl_zoo3.train --help`.
"""


def register() -> type:
    """Make ``"uepo"`` an rl-zoo3 algorithm in this process (idempotent); returns the UEPO class.

    Updates ``ALGOS`` in every loaded ``rl_zoo3`` module that has one (they are usually the same dict object; a
    module holding a copy is updated too), and adds the UEPO sampler and converter to rl-zoo3's Optuna tables.
    """
    import importlib

    try:
        for name in ZOO_MODULES:
            importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{ZOO_EXTRA_HINT} ({exc})") from exc
    from sb3_uepo.uepo import UEPO

    tables = {"ALGOS": UEPO, "HYPERPARAMS_SAMPLER": sample_uepo_params, "HYPERPARAMS_CONVERTER": convert_uepo_params}
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "rl_zoo3" or module_name.startswith("rl_zoo3.")):
            continue
        for table, value in tables.items():
            mapping = getattr(module, table, None)
            if isinstance(mapping, dict):
                mapping[ALGO_NAME] = value
    return UEPO


# --- Optuna -------------------------------------------------------------------------------------------------------


def sample_uepo_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict[str, Any]) -> dict[str, Any]:
    """rl-zoo3 sampler for UEPO's online fine-tuning hyperparameters (``-optimize``).

    Samples what matters most when fine-tuning a pretrained policy: the actor learning rate, the PPO clip range
    (small: DPPO uses 0.01, Uni-O4 0.05 online), the KL-to-offline-policy coefficient, value warm-up iterations,
    the denoising-step discount, rollout and minibatch sizes, epochs, gamma and GAE lambda. The YAML's ``dataset``,
    ``preset`` and ``offline_kwargs`` are kept as they are (rl-zoo3 only overrides the keys returned here).

    :param trial: Optuna trial
    :param n_actions: action dimension (unused)
    :param n_envs: training environments (caps the minibatch size at ``n_steps * n_envs``)
    :param additional_args: rl-zoo3's extra arguments (unused)
    :return: UEPO constructor arguments
    """
    params = {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 3e-4, log=True),
        "clip_range": trial.suggest_categorical("clip_range", [0.01, 0.02, 0.05, 0.1, 0.2]),
        "kl_ref_coef": trial.suggest_categorical("kl_ref_coef", [0.0, 0.01, 0.1, 1.0]),
        "value_warmup_iters": trial.suggest_categorical("value_warmup_iters", [0, 1, 2, 5]),
        "denoising_discount": trial.suggest_categorical("denoising_discount", [0.9, 0.95, 0.99, 1.0]),
        "n_steps_pow": trial.suggest_int("n_steps_pow", 6, 11),
        "batch_size_pow": trial.suggest_int("batch_size_pow", 6, 11),
        "n_epochs": trial.suggest_categorical("n_epochs", [1, 3, 5, 10]),
        "one_minus_gamma": trial.suggest_float("one_minus_gamma", 1e-3, 3e-2, log=True),
        "one_minus_gae_lambda": trial.suggest_float("one_minus_gae_lambda", 1e-3, 1e-1, log=True),
    }
    hyperparams = convert_uepo_params(params)
    # A minibatch cannot exceed the rollout (SB3 would warn and truncate).
    hyperparams["batch_size"] = min(hyperparams["batch_size"], hyperparams["n_steps"] * max(n_envs, 1))
    for key in ("n_steps", "batch_size", "gamma", "gae_lambda"):
        trial.set_user_attr(key, hyperparams[key])
    return hyperparams


def convert_uepo_params(sampled_params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's raw trial parameters -> UEPO constructor arguments (rl-zoo3 uses it for ``--trial-id``)."""
    hyperparams = dict(sampled_params)
    if "one_minus_gamma" in hyperparams:
        hyperparams["gamma"] = 1.0 - hyperparams.pop("one_minus_gamma")
    if "one_minus_gae_lambda" in hyperparams:
        hyperparams["gae_lambda"] = 1.0 - hyperparams.pop("one_minus_gae_lambda")
    for name in ("n_steps", "batch_size"):
        if f"{name}_pow" in hyperparams:
            hyperparams[name] = 2 ** hyperparams.pop(f"{name}_pow")
    return hyperparams


# --- command line -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m sb3_uepo.zoo train|enjoy [rl-zoo3 arguments]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("train", "enjoy"):
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, args = argv[0], with_defaults(argv[0], argv[1:])
    try:
        register()
        if _has_option(args, "-optimize", "--optimize-hyperparameters"):
            _check_optimize_dependencies()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import rl_zoo3.enjoy
    import rl_zoo3.train

    entry = rl_zoo3.train.train if command == "train" else rl_zoo3.enjoy.enjoy
    saved_argv = sys.argv
    sys.argv = [f"rl_zoo3.{command}", *args]
    try:
        entry()
    finally:
        sys.argv = saved_argv
    return 0


def _check_optimize_dependencies() -> None:
    """Fail before the first trial, not after the last: rl-zoo3 writes its tuning report with pandas."""
    import importlib.util

    if importlib.util.find_spec("pandas") is None:
        raise ImportError(
            "-optimize needs pandas: rl-zoo3 writes the study report with optuna's trials_dataframe() after the last "
            "trial. Install it with `pip install pandas`."
        )


def with_defaults(command: str, args: list[str]) -> list[str]:
    """rl-zoo3 arguments with this wrapper's defaults added where the user gave none.

    :param command: ``train`` or ``enjoy``
    :param args: the user's rl-zoo3 arguments
    """
    args = list(args)
    if not _has_option(args, "--algo"):
        args = ["--algo", ALGO_NAME, *args]
    algo = args[args.index("--algo") + 1] if "--algo" in args else _option_value(args, "--algo")
    if command == "train" and algo == ALGO_NAME and not _has_option(args, "-conf", "--conf-file") and DEFAULT_CONFIG.is_file():
        args += ["-conf", str(DEFAULT_CONFIG)]
    if not _has_option(args, "--num-threads"):
        args += ["--num-threads", "1"]  # small networks: one torch thread is fastest (and 10x faster on a busy CPU)
    if command == "enjoy" and not _has_option(args, "-f", "--folder"):
        args += ["-f", "logs"]  # rl-zoo3's train writes there; its enjoy default (rl-trained-agents) means a download
    return args


def _has_option(args: list[str], *names: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in args for name in names)


def _option_value(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__":
    sys.exit(main())
