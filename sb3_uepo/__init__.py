"""sb3-uepo: UEPO (Unified Expressive Policy Optimization) for Stable-Baselines3."""

import os

from sb3_uepo.common.mujoco_log import install_mujoco_log_hook

install_mujoco_log_hook()  # MuJoCo warnings become Python warnings; no MUJOCO_LOG.TXT in the working directory

with open(os.path.join(os.path.dirname(__file__), "version.txt")) as _version_file:
    __version__ = _version_file.read().strip()

__all__ = ["UEPO", "DiffusionPolicy", "MlpPolicy", "__version__"]


def __getattr__(name: str) -> object:
    """``from sb3_uepo import UEPO`` without importing torch for ``sb3_uepo.datasets`` users (PEP 562)."""
    if name in ("UEPO", "DiffusionPolicy", "MlpPolicy"):
        from sb3_uepo import uepo

        return getattr(uepo, name)
    raise AttributeError(f"module 'sb3_uepo' has no attribute {name!r}")
