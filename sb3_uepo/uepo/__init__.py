from sb3_uepo.uepo.policies import DiffusionPolicy, MlpPolicy
from sb3_uepo.uepo.uepo import UEPO

__all__ = ["UEPO", "DiffusionPolicy", "MlpPolicy"]
