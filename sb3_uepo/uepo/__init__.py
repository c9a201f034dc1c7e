"""UEPO: the algorithm (``uepo.py``), its policies (``policies.py``) and its situation-dependent defaults
(``defaults.py``). The algorithm is imported lazily, so that ``sb3_uepo.uepo.defaults`` stays light (no torch)."""

from typing import Any

__all__ = ["UEPO", "DiffusionPolicy", "MlpPolicy"]


def __getattr__(name: str) -> Any:
    if name == "UEPO":
        from sb3_uepo.uepo.uepo import UEPO

        return UEPO
    if name in ("DiffusionPolicy", "MlpPolicy"):
        from sb3_uepo.uepo import policies

        return getattr(policies, name)
    raise AttributeError(f"module 'sb3_uepo.uepo' has no attribute {name!r}")
