"""Checkpoint files of the offline stages: one directory per run, every file written atomically.

Owns: :class:`StageCheckpoints` (``stage_<name>.pt`` per completed stage, ``stage_offline_ppo.partial.pt`` while offline
PPO runs, ``progress.json`` with the completed stages, their reports and times, and three fingerprints: of the whole
config and data, of everything but offline PPO's own settings, and of what the behaviour model reads). Must not
touch: what a stage computes or how it is restored (``pipeline.py``), the lock on the directory (``common/io.py``,
taken by the pipeline).

Resuming rules: the same fingerprint resumes every completed stage; the same early fingerprint (only offline PPO's
settings differ, e.g. an ablation of its regularisers) keeps the stages before offline PPO; the same behaviour
fingerprint (the critics' budget or a later stage's setting changed) keeps the behaviour model; anything else is
refused with a message, never mixed. An unreadable ``progress.json`` is reported and the run starts over.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sb3_uepo.common.io import atomic_path, write_json

CHECKPOINT_FORMAT = 1
PROGRESS_FILE = "progress.json"
PARTIAL_FILE = "stage_offline_ppo.partial.pt"


@dataclass
class Progress:
    """What ``progress.json`` records: completed stages in order, per-stage reports and wall times."""

    completed: list[str] = field(default_factory=list)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class StageCheckpoints:
    """The checkpoint directory of one offline run.

    :param directory: the directory (created on the first write)
    :param fingerprint: hash of the whole config and the data
    :param early_fingerprint: the same without offline PPO's own settings
    :param stages: the stage names, in order
    :param say: one-line progress messages (e.g. ``print`` with a prefix)
    :param behavior_fingerprint: hash of the fields the behaviour stage reads and the data (None: never reused alone)
    """

    def __init__(
        self,
        directory: str | Path,
        fingerprint: str,
        early_fingerprint: str,
        stages: tuple[str, ...],
        say: Callable[[str], None] = lambda line: None,
        behavior_fingerprint: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.fingerprint, self.early_fingerprint, self.stages, self.say = fingerprint, early_fingerprint, stages, say
        self.behavior_fingerprint = behavior_fingerprint

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def partial_path(self) -> Path:
        """Where offline PPO keeps its resumable state while it runs."""
        return self.path(PARTIAL_FILE)

    def load_progress(self) -> Progress:
        """The completed stages of an earlier run on this directory (none when there is none or it is unreadable).

        :raises ValueError: the directory holds a run of another config or dataset
        """
        file = self.path(PROGRESS_FILE)
        if not file.is_file():
            return Progress()
        try:
            progress = json.loads(file.read_text())
            if not isinstance(progress, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            warnings.warn(f"{file} is unreadable ({exc}); every stage is recomputed", stacklevel=3)
            return Progress()
        if progress.get("fingerprint") != self.fingerprint and progress.get("early_fingerprint") == self.early_fingerprint:
            # only offline PPO's settings changed (an ablation of its regularisers, say): keep the stages before it
            kept = [s for s in progress.get("completed", []) if s in self.stages and s != "offline_ppo"]
            self.partial_path.unlink(missing_ok=True)
            progress = dict(progress, completed=kept, fingerprint=self.fingerprint)
            self.say(f"only offline PPO's settings differ from {self.directory}'s run: reusing {', '.join(kept)}")
        same_behavior = (
            self.behavior_fingerprint is not None and progress.get("behavior_fingerprint") == self.behavior_fingerprint
        )
        if (
            progress.get("fingerprint") != self.fingerprint
            and same_behavior
            and self.stages[0] in progress.get("completed", [])
        ):
            # only settings of the stages after the behaviour model changed: keep that model, recompute the rest
            self.partial_path.unlink(missing_ok=True)
            progress = dict(progress, completed=[self.stages[0]], fingerprint=self.fingerprint)
            self.say(f"only settings after the behaviour model differ from {self.directory}'s run: reusing {self.stages[0]}")
        if progress.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"Checkpoint directory '{self.directory}' holds an offline run with a different config or dataset "
                "(fingerprint mismatch). Resume only with the same config and data; otherwise use a new checkpoint "
                "directory, delete this one, or pass resume=False to start over."
            )
        completed = [s for s in progress.get("completed", []) if s in self.stages]
        return Progress(completed, progress.get("reports", {}), progress.get("seconds", {}))

    def save_stage(self, name: str, payload: dict[str, Any], progress: Progress, config: dict[str, Any]) -> None:
        """Write a completed stage's payload, then ``progress.json`` (both atomically, in that order)."""
        with atomic_path(self.path(f"stage_{name}.pt")) as tmp:
            torch.save(payload, tmp)
        self.write_progress(progress, config)

    def write_progress(self, progress: Progress, config: dict[str, Any]) -> None:
        record = dict(
            format=CHECKPOINT_FORMAT,
            fingerprint=self.fingerprint,
            early_fingerprint=self.early_fingerprint,
            behavior_fingerprint=self.behavior_fingerprint,
            completed=progress.completed,
            reports=progress.reports,
            seconds=progress.seconds,
            config=config,
        )
        write_json(self.path(PROGRESS_FILE), jsonable(record))

    def load_stage(self, name: str, device: torch.device | str = "cpu") -> dict[str, Any]:
        """A completed stage's payload (a truncated or foreign file raises; the pipeline then recomputes it)."""
        return torch.load(self.path(f"stage_{name}.pt"), map_location=device, weights_only=False)

    def save_partial(self, state: dict[str, Any]) -> None:
        with atomic_path(self.partial_path) as tmp:
            torch.save(state, tmp)

    def load_partial(self, device: torch.device | str = "cpu") -> dict[str, Any] | None:
        """Offline PPO's resumable state, or None (none, or unreadable: reported, and the stage starts over)."""
        if not self.partial_path.is_file():
            return None
        try:
            return torch.load(self.partial_path, map_location=device, weights_only=False)
        except Exception as exc:  # truncated or foreign
            reason = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"{self.partial_path} is unreadable ({reason}); offline PPO starts over", stacklevel=3)
            return None


def jsonable(obj: Any) -> Any:
    """Plain JSON data: dict keys as strings, arrays and tensors as lists, non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray | torch.Tensor):
        return np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj).tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
