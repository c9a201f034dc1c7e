"""SB3 callbacks of the project.

Owns: :class:`PeriodicCheckpoint` (the model saved atomically to one path every N env steps, so that a run stopped
by a kill keeps its latest model). Must not touch: training itself.
"""

from __future__ import annotations

from pathlib import Path

from stable_baselines3.common.callbacks import BaseCallback

from sb3_uepo.common.io import atomic_path


class PeriodicCheckpoint(BaseCallback):
    """Save the model to ``path`` every ``every`` env steps, atomically (a kill never leaves a half-written file).

    Unlike SB3's ``CheckpointCallback`` (one file per save, written in place) it keeps ONE file, the latest.

    :param path: the model file (``.zip``)
    :param every: env steps between saves; 0 never saves
    :param verbose: 1 prints a line per save
    """

    def __init__(self, path: str | Path, every: int, verbose: int = 0) -> None:
        super().__init__(verbose)
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.path, self.every = Path(path), every
        self.last_save = 0

    def _on_training_start(self) -> None:
        self.last_save = self.num_timesteps

    def _on_step(self) -> bool:
        if self.every > 0 and self.num_timesteps - self.last_save >= self.every:
            self.last_save = self.num_timesteps
            with atomic_path(self.path, suffix=".zip") as tmp:
                self.model.save(tmp)
            if self.verbose >= 1:
                print(f"checkpoint: {self.path} at {self.num_timesteps:,} env steps")
        return True
