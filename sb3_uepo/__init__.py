"""sb3-uepo: UEPO (Unified Expressive Policy Optimization) for Stable-Baselines3."""

import os

__version__ = open(os.path.join(os.path.dirname(__file__), "version.txt")).read().strip()

__all__ = ["__version__"]
