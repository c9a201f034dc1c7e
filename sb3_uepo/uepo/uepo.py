"""UEPO's online stage: PPO over the denoising chain (stage 7 of docs/algorithm.md) as a Stable-Baselines3 on-policy algorithm.

Owns: :class:`UEPO` (the "auto" constructor defaults, the chain-PPO loss with the denoising-step discount, the decaying
KL to a frozen reference policy, the value warm-up, separate actor / critic gradient clips, save/load declarations).
The offline seam (``pretrain``, ``load_offline_result``, ``set_reference_policy``, ``steer``) is mixed in from
``handover.py``, rollout collection with chains from ``rollouts.py``. Must not touch: the offline stages themselves
(``sb3_uepo/offline``), the networks (``common/policies.py``), rollout storage (``common/buffers.py``), the
diffusion formulas (``common/diffusion.py``).

Loss, per minibatch of ``B`` rollout steps whose chains have ``S`` denoising steps (DPPO, Ren et al. 2024,
irom-princeton/dppo; Uni-O4, Lei et al. 2024, for the small clip and the KL to the offline policy)::

    r_bj   = exp((log pi(x_{j+1} | x_j, s) - log pi_old(x_{j+1} | x_j, s)) / A)   per-step ratio (log-density
                                                                                 averaged over action dims, DPPO)
    A_bj   = A_b * denoising_discount ** (S - 1 - j)                             the last denoising step weighs 1
    L_pi   = -mean_bj min(r_bj A_bj, clip(r_bj, 1 - eps, 1 + eps) A_bj)
    L      = L_pi + ent_coef * L_ent + vf_coef * L_V + beta_t * mean_b KL(pi || pi_ref)
    beta_t = kl_ref_coef * kl_ref_decay ** t                                     t = policy updates so far

The KL between two chain policies with equal step stds is ``sum_j ||mu_j - mu_ref_j||^2 / (2 sigma_j^2)`` on the
stored chains. With the Gaussian ``MlpPolicy`` (the Uni-O4 baseline) ``S = 1``, the ratio is PPO's and the KL is the
closed-form Gaussian one: UEPO is then SB3's PPO plus the KL term and the value warm-up.
"""

from __future__ import annotations

import io
import os
import pathlib
import warnings
from collections import defaultdict
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import FloatSchedule, explained_variance
from torch.nn import functional as F

from sb3_uepo.common.buffers import DiffusionRolloutBuffer
from sb3_uepo.uepo.defaults import AUTO, fit_ft_denoising_steps, resolve_auto_arguments
from sb3_uepo.uepo.handover import OfflineHandoverMixin, policy_kwargs_from_offline
from sb3_uepo.uepo.policies import DiffusionPolicy, MlpPolicy
from sb3_uepo.uepo.reward_scaling import RewardScaler
from sb3_uepo.uepo.rollouts import ChainRolloutMixin

SelfUEPO = TypeVar("SelfUEPO", bound="UEPO")


class UEPO(OfflineHandoverMixin, ChainRolloutMixin, OnPolicyAlgorithm):
    """Unified Expressive Policy Optimization, online stage: PPO over a diffusion policy's denoising chain.

    Without a dataset it is a plain (chain-)PPO learning from scratch; with one, :meth:`learn` first runs the offline
    stages once (:meth:`pretrain`) and then fine-tunes the chosen offline policy online.

    :param policy: ``"DiffusionPolicy"`` or ``"MlpPolicy"`` (Gaussian, for the Uni-O4 baseline), or a policy class
    :param env: the environment to learn from (a registered id is made with ``make_vec_env``); needs a Box action space
    Arguments marked "auto" follow the situation (``sb3_uepo/uepo/defaults.py``): with a ``dataset`` they take the
    fine-tuning settings (lr 3e-5 decaying linearly to 0, clip 0.05, 5 epochs of batch 512 over ~2048 env steps, KL
    0.1 to the offline policy, 2 value warm-up updates, rewards scaled by the return's std, and for the DiffusionPolicy
    a 10x value learning rate, the last 2 denoising steps fine-tuned and exploring with std 0.1), without one SB3 PPO's
    (lr 3e-4, clip 0.2, 10 epochs of batch 64 over 2048 steps per env, no KL, no warm-up). A value you pass wins.

    :param learning_rate: learning rate (of the actor; see ``value_lr_scale`` in the DiffusionPolicy's kwargs),
        a float or a schedule of the remaining progress (1 -> 0); "auto"
    :param n_steps: steps per environment per update (the rollout buffer holds ``n_steps * n_envs``); "auto"
    :param batch_size: minibatch size; "auto"
    :param n_epochs: epochs over the rollout buffer per update; "auto"
    :param gamma: discount factor of the online phase; "auto" (0.99, fine-tuning or not). The offline stages use their
        preset's discount (``offline_kwargs={"gamma": ...}``), so that changing the online one keeps the offline result
    :param gae_lambda: GAE lambda
    :param clip_range: PPO clip of the (per-denoising-step) ratio, float or schedule; Uni-O4 fine-tunes with 0.05,
        DPPO with 0.01; "auto"
    :param clip_range_vf: clip of the value update (None: no clipping), float or schedule
    :param normalize_advantage: normalise the advantages per minibatch
    :param ent_coef: entropy coefficient; a chain has no closed-form entropy, so ``-log pi(chain | s)`` stands in
    :param vf_coef: value loss coefficient
    :param max_grad_norm: gradient-norm clip of the actor (the denoiser, or the Gaussian actor)
    :param max_grad_norm_vf: gradient-norm clip of the critic (value network), applied separately; None: ``max_grad_norm``
    :param denoising_discount: DPPO's discount over the denoising steps: step ``j`` of ``S`` has its advantage
        weighted by ``denoising_discount ** (S - 1 - j)``
    :param kl_ref_coef: initial coefficient of ``KL(pi || pi_ref)`` to the frozen reference policy (the offline
        policy; from scratch, the initial policy); 0 disables the term; "auto"
    :param kl_ref_decay: the KL coefficient is multiplied by this after every policy update (rollout)
    :param value_warmup_iters: the first ``value_warmup_iters`` updates train the value network only; "auto"
    :param normalize_reward: divide rewards by the std of the discounted return, as ``VecNormalize(norm_reward=True)``
        does but inside the algorithm (``uepo/reward_scaling.py``): with a dataset the statistics start from the
        dataset's returns and the offline IQL value is converted to the scaled units at the hand-over; "auto" (True
        with a dataset, False from scratch, as SB3's PPO)
    :param dataset: offline dataset (id, path or :class:`~sb3_uepo.common.datasets.container.OfflineDataset`) for
        the offline stages; None learns online from scratch
    :param preset: name of the offline budget/ablation preset (e.g. ``"quick"``, ``"uni_o4"``)
    :param offline_kwargs: overrides of the offline preset's settings (fields of
        :class:`~sb3_uepo.offline.config.OfflineConfig`, e.g. ``{"n_members": 2, "ppo_steps": 500}``); the
        architecture fields follow the policy (``policy_kwargs`` wins; where it is silent, the offline settings fill it)
    :param pretrain_dir: directory of the offline stage checkpoints (``progress.json``, ``stage_<name>.pt``): an
        interrupted pretraining resumes from its last completed stage; None keeps nothing on disk
    :param pretrain_jobs: worker processes of the offline phase: with 2 or more, the stages that read no other stage's
        output (the behaviour model and the critics, the dynamics ensemble when it runs) train side by side, each
        with this process's torch thread count (same weights as in order; on 2 free cores about a third less time)
    :param use_sde: gSDE exploration (``MlpPolicy`` only)
    :param sde_sample_freq: gSDE noise resampling frequency
    :param rollout_buffer_class: rollout buffer class; None picks :class:`DiffusionRolloutBuffer` for a
        DiffusionPolicy and SB3's ``RolloutBuffer`` for ``MlpPolicy``
    :param rollout_buffer_kwargs: keyword arguments of the rollout buffer
    :param target_kl: stop the epochs of an update when the approximate KL between old and new policy exceeds
        ``1.5 * target_kl`` (None: never)
    :param stats_window_size: number of episodes averaged in the rollout logs
    :param tensorboard_log: tensorboard log directory (None: no tensorboard)
    :param policy_kwargs: keyword arguments of the policy (see :class:`~sb3_uepo.common.policies.DiffusionPolicy`)
    :param verbose: 0 none, 1 info, 2 debug
    :param seed: random seed
    :param device: torch device (``"auto"``: cuda when available)
    :param _init_setup_model: build the networks now
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "DiffusionPolicy": DiffusionPolicy,
        "MlpPolicy": MlpPolicy,
    }
    policy: DiffusionPolicy | ActorCriticPolicy  # type: ignore[assignment]
    rollout_buffer: RolloutBuffer
    reference_policy: DiffusionPolicy | ActorCriticPolicy | None

    def __init__(
        self,
        policy: str | type[BasePolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule | str = AUTO,
        n_steps: int | str = AUTO,
        batch_size: int | str = AUTO,
        n_epochs: int | str = AUTO,
        gamma: float | str = AUTO,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule | str = AUTO,
        clip_range_vf: float | Schedule | None = None,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        max_grad_norm_vf: float | None = None,
        denoising_discount: float = 0.99,
        kl_ref_coef: float | str = AUTO,
        kl_ref_decay: float = 0.95,
        value_warmup_iters: int | str = AUTO,
        normalize_reward: bool | str = AUTO,
        dataset: Any = None,
        preset: str | None = None,
        offline_kwargs: dict[str, Any] | None = None,
        pretrain_dir: str | None = None,
        pretrain_jobs: int = 1,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        target_kl: float | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        # "auto" arguments: the fine-tuning settings when a dataset is given, PPO's otherwise (uepo/defaults.py)
        ft_steps_given = "ft_denoising_steps" in (policy_kwargs or {})  # an explicit value is never adjusted
        auto, policy_kwargs = resolve_auto_arguments(
            dict(
                learning_rate=learning_rate,
                n_steps=n_steps,
                batch_size=batch_size,
                n_epochs=n_epochs,
                clip_range=clip_range,
                kl_ref_coef=kl_ref_coef,
                value_warmup_iters=value_warmup_iters,
                normalize_reward=normalize_reward,
                gamma=gamma,
            ),
            fine_tuning=dataset is not None,
            policy=_policy_name(policy),
            n_envs=getattr(env, "num_envs", 1),
            policy_kwargs=policy_kwargs,
        )
        learning_rate, n_steps, batch_size, n_epochs = (
            auto[k] for k in ("learning_rate", "n_steps", "batch_size", "n_epochs")
        )
        clip_range, kl_ref_coef, value_warmup_iters = auto["clip_range"], auto["kl_ref_coef"], auto["value_warmup_iters"]
        normalize_reward, gamma = bool(auto["normalize_reward"]), float(auto["gamma"])
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
        )
        if self.env is not None and not isinstance(self.action_space, spaces.Box):
            raise ValueError(
                f"UEPO needs a continuous (Box) action space: its policies are a diffusion chain or a Gaussian over "
                f"actions in [-1, 1]; got {self.action_space}. For discrete actions use PPO."
            )
        if normalize_advantage and batch_size <= 1:
            raise ValueError("batch_size must be > 1 when normalize_advantage=True (see SB3 issue #440)")
        if self.env is not None:
            buffer_size = self.env.num_envs * n_steps
            if normalize_advantage and buffer_size <= 1:
                raise ValueError(f"n_steps * n_envs must be > 1 to normalise advantages, got {n_steps} * {self.env.num_envs}")
            if buffer_size % batch_size > 0:
                warnings.warn(
                    f"batch_size={batch_size} does not divide n_steps * n_envs = {buffer_size}: the last minibatch of every "
                    f"epoch will hold {buffer_size % batch_size} samples"
                )
        if not 0.0 < denoising_discount <= 1.0:
            raise ValueError(f"denoising_discount must be in (0, 1], got {denoising_discount}")
        if kl_ref_coef < 0.0:
            raise ValueError(f"kl_ref_coef must be >= 0, got {kl_ref_coef}")
        if not 0.0 < kl_ref_decay <= 1.0:
            raise ValueError(f"kl_ref_decay must be in (0, 1], got {kl_ref_decay}")
        if value_warmup_iters < 0:
            raise ValueError(f"value_warmup_iters must be >= 0, got {value_warmup_iters}")
        if max_grad_norm_vf is not None and max_grad_norm_vf <= 0:
            raise ValueError(f"max_grad_norm_vf must be > 0 (or None: max_grad_norm), got {max_grad_norm_vf}")
        self.max_grad_norm_vf = max_grad_norm_vf

        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.clip_range = clip_range
        self.clip_range_vf = clip_range_vf
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.denoising_discount = denoising_discount
        self.kl_ref_coef = kl_ref_coef
        self.kl_ref_decay = kl_ref_decay
        self.value_warmup_iters = value_warmup_iters
        self.normalize_reward = normalize_reward
        # rewards scaled in collect_rollouts; statistics from the dataset at the hand-over (saved with the model)
        self.reward_scaler = RewardScaler(gamma) if normalize_reward else None
        self.dataset = dataset
        self.preset = preset
        self.offline_kwargs = offline_kwargs
        self.pretrain_dir = pretrain_dir
        if int(pretrain_jobs) < 1:
            raise ValueError(f"pretrain_jobs must be >= 1, got {pretrain_jobs}")
        self.pretrain_jobs = int(pretrain_jobs)
        self.pretrained = False  # set by pretrain() once the offline stages have run
        self.offline_report: dict[str, Any] | None = None  # pretrain()'s report, saved with the model
        self.offline_result: Any = None  # pretrain()'s OfflineResult with every member (this session only, not saved)
        if dataset is not None:
            # Fail at construction on a bad preset / offline key, and let the offline settings fill the policy
            # architecture where policy_kwargs is silent (so that the offline networks load into the policy).
            from sb3_uepo.offline.config import resolve_offline_config

            config = resolve_offline_config(preset or "default", offline_kwargs)
            policy_kwargs_from_offline(self.policy_class, config, self.policy_kwargs)
            if not ft_steps_given:
                fit_ft_denoising_steps(self.policy_kwargs)
        self.reference_policy = None
        self._reference_policy_set = False  # set_reference_policy() was called: keep a reference even if kl_ref_coef == 0
        self._n_train_rounds = 0  # calls of train(), i.e. rollouts learned from (value warm-up, KL decay)

        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------------------------------ setup
    def _get_policy_from_name(self, policy_name: str) -> type[BasePolicy]:
        if policy_name not in self.policy_aliases:
            raise ValueError(f"Policy {policy_name!r} unknown to UEPO; valid names: {', '.join(self.policy_aliases)}")
        return self.policy_aliases[policy_name]

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, use_sde=self.use_sde, **self.policy_kwargs
        )
        self.policy = self.policy.to(self.device)
        self._maybe_recommend_cpu()

        is_diffusion = isinstance(self.policy, DiffusionPolicy)
        if self.rollout_buffer_class is None:
            self.rollout_buffer_class = DiffusionRolloutBuffer if is_diffusion else RolloutBuffer
        buffer_kwargs = dict(self.rollout_buffer_kwargs)
        if issubclass(self.rollout_buffer_class, DiffusionRolloutBuffer):
            if not is_diffusion:
                raise ValueError(f"{self.rollout_buffer_class.__name__} stores denoising chains: it needs a DiffusionPolicy")
            buffer_kwargs.setdefault("n_sampling_steps", self.policy.n_sampling_steps)  # type: ignore[union-attr]
        elif is_diffusion:
            raise ValueError(
                f"a DiffusionPolicy needs a DiffusionRolloutBuffer (or a subclass) to store its chains, "
                f"got rollout_buffer_class={self.rollout_buffer_class.__name__}"
            )
        self.rollout_buffer = self.rollout_buffer_class(
            self.n_steps,
            self.observation_space,  # type: ignore[arg-type]
            self.action_space,
            device=self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
            **buffer_kwargs,
        )

        self.clip_range = FloatSchedule(self.clip_range)
        if self.clip_range_vf is not None:
            if isinstance(self.clip_range_vf, (float, int)) and self.clip_range_vf <= 0:
                raise ValueError("clip_range_vf must be positive; pass None to disable value clipping")
            self.clip_range_vf = FloatSchedule(self.clip_range_vf)
        # The reference's weights are a copy of the policy's here; load() then overwrites them with the saved ones.
        self.reference_policy = self._frozen_copy(self.policy) if self._reference_needed() else None

    def _update_learning_rate(self, optimizers: list[th.optim.Optimizer] | th.optim.Optimizer) -> None:
        """SB3's update, honouring a per-group ``lr_scale`` (the DiffusionPolicy's value network)."""
        learning_rate = self.lr_schedule(self._current_progress_remaining)
        self.logger.record("train/learning_rate", learning_rate)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * group.get("lr_scale", 1.0)

    # ------------------------------------------------------------------------------------------ training
    def current_kl_ref_coef(self) -> float:
        """The KL coefficient of the next update: ``kl_ref_coef * kl_ref_decay ** (policy updates so far)``."""
        policy_updates = max(0, self._n_train_rounds - self.value_warmup_iters)
        return self.kl_ref_coef * self.kl_ref_decay**policy_updates

    def train(self) -> None:
        """Update the policy (or only the value network during the warm-up) on the collected rollout."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = None if self.clip_range_vf is None else self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]
        value_only = self._n_train_rounds < self.value_warmup_iters
        kl_coef = self.current_kl_ref_coef()
        logs: dict[str, list[float]] = defaultdict(list)
        if not value_only and self.reference_policy is not None and isinstance(self.rollout_buffer, DiffusionRolloutBuffer):
            # the frozen reference's step means, once per rollout rather than once per minibatch and epoch
            self.rollout_buffer.set_reference_means(self.reference_policy.chain_means)  # type: ignore[union-attr]

        continue_training = True
        for epoch in range(self.n_epochs):
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                if value_only:
                    values = self.policy.predict_values(rollout_data.observations).flatten()
                    value_loss = self._value_loss(values, rollout_data, clip_range_vf)
                    logs["value_loss"].append(value_loss.item())
                    loss = self.vf_coef * value_loss
                else:
                    loss, approx_kl_div = self._policy_loss(rollout_data, clip_range, clip_range_vf, kl_coef, logs)
                    if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                        continue_training = False
                        if self.verbose >= 1:
                            print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                        break

                self.policy.optimizer.zero_grad()
                loss.backward()
                self._clip_gradients()
                self.policy.optimizer.step()
                logs["loss"].append(loss.item())

            self._n_updates += 1
            if not continue_training:
                break

        self._n_train_rounds += 1
        self._record_train_logs(logs, clip_range, clip_range_vf, value_only, kl_coef)

    def _clip_gradients(self) -> None:
        """Clip the actor's and the critic's gradients SEPARATELY (as DPPO and Uni-O4 optimise them): on raw rewards
        the value gradient is orders of magnitude larger than the actor's, and one joint clip would shrink every actor
        step by that factor."""
        actor, critic = self.policy.actor_critic_parameters()  # type: ignore[union-attr]
        th.nn.utils.clip_grad_norm_(actor, self.max_grad_norm)
        th.nn.utils.clip_grad_norm_(critic, self.max_grad_norm if self.max_grad_norm_vf is None else self.max_grad_norm_vf)

    def _value_loss(self, values: th.Tensor, rollout_data: Any, clip_range_vf: float | None) -> th.Tensor:
        if clip_range_vf is not None:  # clip the change of the value (depends on the reward scale)
            values = rollout_data.old_values + th.clamp(values - rollout_data.old_values, -clip_range_vf, clip_range_vf)
        return F.mse_loss(rollout_data.returns, values)

    def _evaluate_minibatch(
        self, rollout_data: Any
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor | None, th.Tensor | None]:
        """values (B,), per-step log-ratio to the rollout policy (B, S), log-probability (B,), entropy (B,) or None,
        KL to the reference (B,) or None."""
        obs = rollout_data.observations
        kl = None
        if isinstance(self.policy, DiffusionPolicy):
            evaluation = self.policy.evaluate_chains(obs, rollout_data.chains)
            # DPPO: the per-step log-density averaged over action dims
            n_ft = evaluation.step_log_prob.shape[1]  # the fine-tuned (last) denoising steps
            step_log_ratio = (evaluation.step_log_prob - rollout_data.old_step_log_prob[:, -n_ft:]) / self.policy.action_dim
            if self.reference_policy is not None:
                reference_means = getattr(rollout_data, "reference_means", None)
                if reference_means is None:
                    with th.no_grad():
                        reference_means = self.reference_policy.chain_means(obs, rollout_data.chains)  # type: ignore[union-attr]
                kl = self.policy.kl_divergence(evaluation.means, reference_means)
            return evaluation.values.flatten(), step_log_ratio, evaluation.step_log_prob.sum(-1), None, kl

        values, log_prob, entropy = self.policy.evaluate_actions(obs, rollout_data.actions)
        if self.reference_policy is not None:
            distribution = self.policy.get_distribution(obs).distribution
            with th.no_grad():
                reference = self.reference_policy.get_distribution(obs).distribution  # type: ignore[union-attr]
            kl = th.distributions.kl_divergence(distribution, reference).sum(-1)  # type: ignore[arg-type]
        return values.flatten(), (log_prob - rollout_data.old_log_prob).unsqueeze(-1), log_prob, entropy, kl

    def _policy_loss(
        self,
        rollout_data: Any,
        clip_range: float,
        clip_range_vf: float | None,
        kl_coef: float,
        logs: dict[str, list[float]],
    ) -> tuple[th.Tensor, float]:
        """The chain-PPO loss of one minibatch (module docstring) and its approximate KL to the rollout policy."""
        values, step_log_ratio, log_prob, entropy, kl = self._evaluate_minibatch(rollout_data)
        advantages = rollout_data.advantages
        if self.normalize_advantage and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        n_denoising_steps = step_log_ratio.shape[1]
        exponents = th.arange(n_denoising_steps - 1, -1, -1, device=advantages.device, dtype=advantages.dtype)
        step_advantages = advantages.unsqueeze(-1) * self.denoising_discount**exponents  # (B, S)

        ratio = th.exp(step_log_ratio)
        policy_loss_1 = step_advantages * ratio
        policy_loss_2 = step_advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
        policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()
        value_loss = self._value_loss(values, rollout_data, clip_range_vf)
        # no closed-form entropy of a chain: -log pi stands in (SB3's convention when entropy is None)
        entropy_loss = log_prob.mean() if entropy is None else -entropy.mean()
        loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
        if kl is not None:
            kl_mean = kl.mean()
            if kl_coef > 0.0:
                loss = loss + kl_coef * kl_mean
            logs["kl_ref"].append(kl_mean.item())

        with th.no_grad():  # Schulman's k3 estimator, per denoising step (SB3 issue #417)
            approx_kl_div = th.mean((ratio - 1) - step_log_ratio).item()
        logs["approx_kl"].append(approx_kl_div)
        logs["policy_gradient_loss"].append(policy_loss.item())
        logs["value_loss"].append(value_loss.item())
        logs["entropy_loss"].append(entropy_loss.item())
        logs["clip_fraction"].append(th.mean((th.abs(ratio - 1) > clip_range).float()).item())
        return loss, approx_kl_div

    def _record_train_logs(
        self,
        logs: dict[str, list[float]],
        clip_range: float,
        clip_range_vf: float | None,
        value_only: bool,
        kl_coef: float,
    ) -> None:
        for key in ("entropy_loss", "policy_gradient_loss", "value_loss", "approx_kl", "clip_fraction", "loss", "kl_ref"):
            if logs[key]:
                self.logger.record(f"train/{key}", float(np.mean(logs[key])))
        values, returns = self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        self.logger.record("train/explained_variance", float(explained_variance(values, returns)))
        self.logger.record("train/value_warmup", int(value_only))
        if self.reward_scaler is not None:
            self.logger.record("train/reward_scale", self.reward_scaler.scale)
        if self.reference_policy is not None:
            self.logger.record("train/kl_ref_coef", kl_coef)
        if isinstance(self.policy, DiffusionPolicy):
            chain_log_prob = self.rollout_buffer.log_probs
            self.logger.record("train/chain_log_prob_mean", float(np.mean(chain_log_prob)))
            self.logger.record("train/chain_log_prob_std", float(np.std(chain_log_prob)))
        elif hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)

    def learn(
        self: SelfUEPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "UEPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfUEPO:
        self._maybe_pretrain(progress_bar=progress_bar)
        self._warn_if_observations_normalised_twice()
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    # ------------------------------------------------------------------------------------------ save / load
    def _excluded_save_params(self) -> list[str]:
        excluded = [*super()._excluded_save_params(), "reference_policy", "offline_result"]
        if self.dataset is not None and not isinstance(self.dataset, (str, os.PathLike)):
            excluded.append("dataset")  # an in-memory dataset is not pickled into the model file
        return excluded

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts = ["policy", "policy.optimizer"]
        if self.reference_policy is not None:
            state_dicts.append("reference_policy")
        return state_dicts, []

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfUEPO],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs,
    ) -> SelfUEPO:
        """SB3's ``load``; a model saved on other observation/action spaces than ``env``'s fails with a clear message.
        ``env=None`` loads for prediction only."""
        try:
            return super().load(path, env, device, custom_objects, print_system_info, force_reset, **kwargs)
        except ValueError as error:
            if not _is_spaces_error(error):
                raise
            raise _spaces_error(error, f"cannot load {path!r} onto this environment") from error

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        if getattr(self, "reward_scaler", None) is not None:
            self.reward_scaler.reset()  # type: ignore[union-attr]  # the new env's episodes start afresh
        try:
            super().set_env(env, force_reset)
        except ValueError as error:
            if not _is_spaces_error(error):
                raise
            raise _spaces_error(error, "cannot use this environment with this model") from error


def _policy_name(policy: str | type[BasePolicy]) -> str:
    if isinstance(policy, type):
        return "DiffusionPolicy" if issubclass(policy, DiffusionPolicy) else policy.__name__
    return policy


def _is_spaces_error(error: ValueError) -> bool:
    return "spaces do not match" in str(error)  # SB3's check_for_correct_spaces


def _spaces_error(error: ValueError, what: str) -> ValueError:
    """A clearer message for SB3's ``check_for_correct_spaces`` error."""
    return ValueError(
        f"{what}: the model was trained on different spaces ({error}). Use the environment the model was trained on "
        "(same observation and action spaces), or load with env=None for prediction only."
    )
