"""sb3-uepo: UEPO (Unified Expressive Policy Optimization) for Stable-Baselines3."""

import os

from sb3_uepo.common.mujoco_log import install_mujoco_log_hook

install_mujoco_log_hook()  # MuJoCo warnings become Python warnings; no MUJOCO_LOG.TXT in the working directory

with open(os.path.join(os.path.dirname(__file__), "version.txt")) as _version_file:
    __version__ = _version_file.read().strip()

from sb3_uepo.uepo import UEPO, DiffusionPolicy, MlpPolicy  # noqa: E402  (after the MuJoCo log hook)

__all__ = ["UEPO", "DiffusionPolicy", "MlpPolicy", "__version__"]
