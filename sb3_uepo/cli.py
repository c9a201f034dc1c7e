"""The ``uepo`` command line: one entry point, one module per sub-command group in ``sb3_uepo.commands``.

Each command module exposes ``add_parser(subparsers) -> None`` and sets ``func`` on its parser;
``func(args) -> int`` does the work. Heavy imports (torch, minari, mujoco) happen inside ``func``
so that ``uepo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order here is the order in `uepo --help`.
COMMAND_MODULES = ("data", "train", "bench")

DESCRIPTION = """\
UEPO for Stable-Baselines3: pretrain an expressive diffusion policy offline from a dataset,
then fine-tune it online with PPO.

Typical session:
  uepo data list                       # datasets available locally (and the embedded one)
  uepo data info hopper-medium-v0      # episodes, returns, normalised score of a dataset
  uepo train --preset quick            # offline pretraining + short online phase on the default data
  uepo eval runs/uepo_hopper.zip       # return and normalised score of a saved model
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uepo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from sb3_uepo import __version__

    parser.add_argument("--version", action="version", version=f"sb3-uepo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"sb3_uepo.commands.{name}")
        except ModuleNotFoundError as exc:  # a command group not present in this build
            if exc.name != f"sb3_uepo.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    if hasattr(sys.stdout, "reconfigure"):  # progress lines reach a log file as they are printed, not at exit
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
