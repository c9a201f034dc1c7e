"""Policy aliases of :class:`~sb3_uepo.uepo.UEPO` (as ``stable_baselines3/ppo/policies.py``).

``DiffusionPolicy``: the denoising-chain actor-critic (UEPO). ``MlpPolicy``: SB3's Gaussian ``ActorCriticPolicy``,
for the Uni-O4 baseline (``preset="uni_o4"``).
"""

from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_uepo.common.policies import DiffusionPolicy

MlpPolicy = ActorCriticPolicy

__all__ = ["DiffusionPolicy", "MlpPolicy"]
