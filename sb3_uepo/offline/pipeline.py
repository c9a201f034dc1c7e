"""The offline phase of UEPO end to end: :func:`pretrain` / :class:`OfflinePretrainer` and :class:`OfflineResult`.

Owns: the order of the stages, input validation, the data conventions of the offline phase (fixed observation
normalisation, actions scaled to [-1, 1]), restoring stages from their checkpoints, the stage logging and the
assembly of the :class:`OfflineResult`. Must not touch: any stage's internals (``behavior.py``, ``iql.py``,
``dynamics.py``, ``augmentation.py``, ``members.py``, ``offline_ppo.py``, ``divergence.py``, ``ope.py``), checkpoint
files (``checkpoints.py``), the environment (the offline phase never gets one: the member is chosen offline alone), the
online algorithm (``sb3_uepo/uepo/``).

Stages, in order (docs/algorithm.md):

========== ===============================================================================================
behavior   one state-conditioned denoiser on the dataset (skipped for Gaussian members, ``uni_o4``)
iql        IQL critics V, Q1, Q2 (expectile 0.7, target networks)
dynamics   dynamics ensemble on real data; with ``augment``: diffusion-synthesised transitions, filtered, and the
           ensemble refitted on real + synthetic (skipped without offline improvement, or with mean-Q OPE and no
           augmentation)
members    n members copied from the ONE behaviour denoiser, acting from x_0 = 0 (or Gaussian BC members)
offline_ppo offline PPO of all members at once with the regularisers; OPE every ``ope_interval`` steps gates each
           member's previous policy; resumable inside the stage (a partial checkpoint at every OPE)
========== ===============================================================================================

With ``n_jobs >= 2`` the stages that read no other stage's output (behaviour model, critics, dynamics ensemble; the
Gaussian members) train side by side in worker processes (``parallel.py``), each checkpointed as soon as it finishes;
the same weights as one by one with the same torch thread count.

Then a member is handed on: with offline improvement off (the default for diffusion members) member 0, the behaviour
model itself; with it on, the best-by-OPE policy of the member with the highest ``choice_score``.

Checkpoints (``checkpoint_dir``): see ``checkpoints.py`` (``StageCheckpoints``): every completed stage, offline PPO's
state at every OPE, and ``progress.json``; a rerun with the same config and data resumes, one that changes only
offline PPO's settings reuses the stages before it, any other difference is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from sb3_uepo.common.io import atomic_path, output_lock
from sb3_uepo.offline.behavior import fit_behavior_model, make_denoiser, make_sampler, top_episodes_mask
from sb3_uepo.offline.checkpoints import Progress, StageCheckpoints, jsonable
from sb3_uepo.offline.config import OfflineConfig, log_values, resolve_offline_config
from sb3_uepo.offline.data import OfflineData
from sb3_uepo.offline.divergence import SegmentSampler, pairwise_divergence
from sb3_uepo.offline.iql import IQLCritics, fit_iql, make_value_net
from sb3_uepo.offline.members import (
    DiffusionMembers,
    GaussianActor,
    GaussianMembers,
    diffusion_members_from_state,
    fit_gaussian_members,
    gaussian_members_from_state,
    make_diffusion_members,
)
from sb3_uepo.offline.offline_ppo import OfflinePolicyImprovement

STAGES = ("behavior", "iql", "dynamics", "members", "offline_ppo")
# Config fields added after checkpoints were already written, with the value every checkpoint written before the field
# existed was computed with: a field enters a run's fingerprint only away from that value, so such a checkpoint still
# resumes, and never resumes a run that asks for another value (even if the field's default changes later).
LATER_FIELDS: dict[str, Any] = {  # all behaviour-model settings: unused by Gaussian runs
    "behavior_top_fraction": 1.0,
    "refine_steps": 0,
    "refine_candidates": 16,
    "refine_lr": 1e-4,
    "refine_min_gain": 0.01,
    "refine_gate_states": 0,
}

# Fields read by the offline_ppo stage alone (policy improvement, its regularisers, the OPE gate and the choice):
# changing only these reuses the checkpoints of the stages before it.
OFFLINE_PPO_ONLY_FIELDS = (
    "ppo_steps",
    "ppo_batch_size",
    "ppo_lr",
    "clip_range",
    "linear_decay",
    "advantage_omega",
    "max_grad_norm",
    "max_log_ratio",
    "use_divergence",
    "divergence_coef",
    "tau",
    "segment_batch_size",
    "regularizer_interval",
    "use_perturbation",
    "eta",
    "perturb_interval",
    "perturb_target",
    "use_kl",
    "kl_coef",
    "ope_interval",
    "ope_horizon",
    "ope_n_starts",
    "ope_start_states",
    "ope_discount",
    "ope_bootstrap",
    "ope_uncertainty_penalty",
    "ope_deterministic_policy",
    "choice_score",
    "choice_n_states",
)  # fmt: skip (offline_improvement is not among them: it decides whether the dynamics stage runs)
# Fields the behaviour stage reads (with the seed, the member type and the data): a run that changes none of them
# reuses a completed behaviour model, the most expensive stage, whatever else changed (the critics' budget, say).
BEHAVIOR_FIELDS = (
    "seed",
    "policy_type",
    "n_diffusion_steps",
    "denoiser_hidden_sizes",
    "time_embed_dim",
    "behavior_steps",
    "behavior_batch_size",
    "behavior_lr",
    "behavior_ema",
    "behavior_top_fraction",
)
# The dynamics ensemble is refitted on real + synthetic data only when the filter keeps at least this share of the real
# data's size (measured on the embedded Hopper data with the quick preset: 397 kept of 20,000 generated, i.e. 0.5% of
# the 80k real transitions, and the refit took 40 of the stage's 89 s).
MIN_SYNTHETIC_FRACTION = 0.01


# ---------------------------------------------------------------------------------------------- result
@dataclass
class OfflineResult:
    """What the offline phase hands to online learning (and to the report).

    Spaces: the policy and value nets take observations normalised as ``(obs - obs_mean) / obs_std`` and the policy
    outputs actions in [-1, 1]; env actions are ``low + (a + 1) (high - low) / 2``.
    """

    chosen_member: int  # index of the member handed on
    chosen_reason: str  # why (OPE scores; never an environment)
    policy_type: str  # "diffusion" (Denoiser) or "gaussian" (GaussianActor)
    policy_state_dict: dict[str, torch.Tensor]  # the chosen member's weights (Denoiser or GaussianActor state dict)
    seed_noise: torch.Tensor | None  # (A,) the chosen member's initial chain noise x_0 (diffusion, member_noise="seed")
    behavior_state_dict: dict[str, torch.Tensor] | None  # behaviour denoiser (diffusion BC; None for gaussian members)
    value_state_dict: dict[str, torch.Tensor]  # IQL V, loads into Sequential(*create_mlp(O, 1, value_net_arch, act))
    obs_mean: np.ndarray  # (O,) fixed observation normalisation (float32)
    obs_std: np.ndarray  # (O,)
    action_low: np.ndarray  # (A,) env action bounds used for the [-1, 1] scaling
    action_high: np.ndarray  # (A,)
    architecture: dict[str, Any]  # constructor kwargs: "policy", "sampler", "value" (see build_* methods)
    initial_ope_scores: list[float] | None  # per member, before offline PPO
    best_ope_scores: list[float] | None  # per member, of its best-by-OPE policy
    ope_history: list[dict[str, Any]]  # every OPE: step, scores, best, improved (per member)
    stage_reports: dict[str, dict[str, Any]]  # per stage: losses, curves, seconds, ...
    config: dict[str, Any]  # the resolved OfflineConfig
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage (this run and resumed ones)
    # every member, for per-stage reporting (the choice above never looks at them): its best-by-OPE weights and initial
    # noise after offline PPO, and its weights as the members stage made them (before offline PPO)
    member_state_dicts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    member_seed_noises: list[torch.Tensor | None] = field(default_factory=list)
    initial_member_state_dicts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # the IQL critic's Q networks (``q1.*``, ``q2.*``: normalised observation and action in [-1, 1] -> Q), e.g. to start
    # the action-space critic of noise steering (``uepo/steering.py``); None when no critics were trained
    q_state_dict: dict[str, torch.Tensor] | None = None

    def member(self, index: int, initial: bool = False) -> OfflineResult:
        """This result with member ``index`` in place of the chosen one (after offline PPO, or as initialised with
        ``initial=True``), e.g. to score every member in a report; loads like the result itself."""
        states = self.initial_member_state_dicts if initial else self.member_state_dicts
        if not 0 <= index < len(states):
            raise IndexError(f"member {index} is not in this result ({len(states)} member(s) kept)")
        noise = self.member_seed_noises[index] if self.member_seed_noises else None
        if initial and self.policy_type == "diffusion" and noise is not None:
            noise = torch.zeros_like(noise) if self.architecture["sampler"].get("member_noise") == "zero" else noise
        return dataclasses.replace(self, chosen_member=index, policy_state_dict=states[index], seed_noise=noise)

    # ------------------------------------------------------------------------------------------ builders
    def build_policy(self) -> nn.Module:
        """The chosen member as a module (a :class:`Denoiser` or a :class:`GaussianActor`), weights loaded."""
        kwargs = dict(self.architecture["policy"])
        module: nn.Module
        if self.policy_type == "diffusion":
            from sb3_uepo.common.diffusion import Denoiser

            module = Denoiser(**kwargs)
        else:
            module = GaussianActor(**kwargs)
        module.load_state_dict(self.policy_state_dict)
        return module

    def build_behavior(self) -> nn.Module | None:
        """The behaviour denoiser (online KL reference), or None for Gaussian members."""
        if self.behavior_state_dict is None:
            return None
        from sb3_uepo.common.diffusion import Denoiser

        module = Denoiser(**self.architecture["policy"])
        module.load_state_dict(self.behavior_state_dict)
        return module

    def build_sampler(self) -> nn.Module:
        """The :class:`ChainSampler` the members were trained and scored with."""
        from sb3_uepo.common.diffusion import ChainSampler, NoiseSchedule

        kw = self.architecture["sampler"]
        return ChainSampler(
            NoiseSchedule(kw["n_train_steps"]), kw["n_sampling_steps"], sampler=kw["sampler"], min_std=kw["min_std"]
        )

    def build_value_net(self) -> nn.Sequential:
        """The IQL value net with the online layout, weights loaded."""
        kw = self.architecture["value"]
        net = make_value_net(len(self.obs_mean), kw["net_arch"], kw["activation"])
        net.load_state_dict(self.value_state_dict)
        return net

    def normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        return ((np.asarray(obs, dtype=np.float32) - self.obs_mean) / self.obs_std).astype(np.float32)

    def unscale_action(self, action: np.ndarray) -> np.ndarray:
        """[-1, 1] -> env units."""
        a = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        return self.action_low + (a + 1.0) * 0.5 * (self.action_high - self.action_low)

    # ------------------------------------------------------------------------------------------ report, persistence
    def to_report(self) -> dict[str, Any]:
        """JSON-able summary (no weights): chosen member and why, OPE scores over time, per-stage losses, config."""
        return jsonable(
            dict(
                chosen_member=self.chosen_member,
                chosen_reason=self.chosen_reason,
                policy_type=self.policy_type,
                initial_ope_scores=self.initial_ope_scores,
                best_ope_scores=self.best_ope_scores,
                ope_history=self.ope_history,
                stages=self.stage_reports,
                seconds=self.seconds,
                obs_mean=self.obs_mean,
                obs_std=self.obs_std,
                action_low=self.action_low,
                action_high=self.action_high,
                architecture=self.architecture,
                config=self.config,
            )
        )

    def save(self, path: str | Path) -> None:
        """Write the result (weights included) atomically with ``torch.save``."""
        with atomic_path(path) as tmp:
            torch.save(dataclasses.asdict(self), tmp)

    @classmethod
    def load(cls, path: str | Path) -> OfflineResult:
        return cls(**torch.load(path, map_location="cpu", weights_only=False))


# ---------------------------------------------------------------------------------------------- helpers
class _PrefixLogger:
    """Adds ``offline/`` in front of the keys of the stages that log without it (dynamics, augmentation)."""

    def __init__(self, logger: Any, prefix: str = "offline/") -> None:
        self.logger, self.prefix = logger, prefix

    def record(self, key: str, value: Any, exclude: Any = None) -> None:
        self.logger.record(self.prefix + key, value, exclude=exclude)

    def dump(self, step: int = 0) -> None:
        self.logger.dump(step=step)


def _box(space: Any, what: str) -> spaces.Box:
    if not isinstance(space, spaces.Box):
        raise ValueError(f"pretrain: the {what} space must be a gymnasium Box, got {type(space).__name__}")
    return space


# ---------------------------------------------------------------------------------------------- pretrainer
class OfflinePretrainer:
    """Runs the offline stages in order with checkpoints; see the module docstring.

    :param dataset: an :class:`~sb3_uepo.common.datasets.container.OfflineDataset`
    :param observation_space: the env's observation space (Box); only its shape is used
    :param action_space: the env's action space (Box); its bounds define the [-1, 1] scaling
    :param config: an :class:`OfflineConfig`, a preset name, or None (``"default"``)
    :param logger: SB3 logger (keys ``offline/<stage>/...``) or None
    :param checkpoint_dir: directory of the stage checkpoints; None keeps nothing on disk
    :param progress_bar: one progress bar per stage
    :param device: torch device of the offline training
    :param env_id: task id for the model-rollout termination rule (default: ``dataset.env_id``)
    :param termination_fn: custom termination rule on normalised observations (overrides ``env_id``)
    :param resume: continue from ``checkpoint_dir``'s completed stages (False: start over and overwrite)
    :param verbose: 1 prints one line per stage (name, steps, seconds, its key metric) and what a rerun resumed from,
        so that a long run can be followed in a log; 0 prints nothing
    :param n_jobs: worker processes for the stages that read no other stage's output (the behaviour model, the
        critics, the dynamics ensemble; the Gaussian members): with 2 or more they train side by side (``parallel.py``),
        each with this process's torch thread count; 1 runs every stage here, in order
    """

    def __init__(
        self,
        dataset: Any,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        config: OfflineConfig | str | None = None,
        logger: Any = None,
        checkpoint_dir: str | Path | None = None,
        progress_bar: bool = True,
        device: str | torch.device = "cpu",
        env_id: str | None = None,
        termination_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        resume: bool = True,
        verbose: int = 0,
        n_jobs: int = 1,
    ) -> None:
        self.config = config if isinstance(config, OfflineConfig) else resolve_offline_config(config)
        if int(n_jobs) < 1:
            raise ValueError(f"n_jobs must be >= 1 (worker processes for the independent stages), got {n_jobs}")
        self.n_jobs = int(n_jobs)
        self.verbose = verbose
        self.config.validate()
        self.dataset = dataset
        self.observation_space = _box(observation_space, "observation")
        self.action_space = _box(action_space, "action")
        self.logger = logger
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress_bar = progress_bar
        self.device = torch.device(device)
        self.env_id = env_id or getattr(dataset, "env_id", None)
        self.custom_termination = termination_fn
        self.resume = resume
        self.data = OfflineData.from_dataset(self.dataset, self.observation_space, self.action_space, self.device)
        self.segment_sampler = (
            SegmentSampler(self.data.episode_starts.cpu(), self.config.segment_length) if self.config.needs_segments else None
        )
        self.fingerprint = self._fingerprint()
        # the stages before offline PPO do not read its settings: a run that changes only those reuses them
        self.early_fingerprint = self._fingerprint(exclude=OFFLINE_PPO_ONLY_FIELDS)
        self.behavior_fingerprint = self._fingerprint(include=BEHAVIOR_FIELDS)
        self.checkpoints = (
            StageCheckpoints(
                self.checkpoint_dir, self.fingerprint, self.early_fingerprint, STAGES, self._say, self.behavior_fingerprint
            )
            if self.checkpoint_dir is not None
            else None
        )
        self.reports: dict[str, dict[str, Any]] = {}
        self.completed: list[str] = []
        self.seconds: dict[str, float] = {}
        self.outputs: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ inputs
    def _fingerprint(self, exclude: tuple[str, ...] = (), include: tuple[str, ...] | None = None) -> str:
        """Hash of the config (only the ``include`` fields when given, without the ``exclude`` fields, and without the
        fields added later while they keep the value older checkpoints were computed with, :data:`LATER_FIELDS`) and
        the data."""
        h = hashlib.sha256()
        unused = self.config.policy_type != "diffusion"  # Gaussian members have no behaviour model: its later fields
        config = {
            k: v
            for k, v in self.config.to_dict().items()
            if k not in exclude
            and (include is None or k in include)
            and not (k in LATER_FIELDS and (unused or v == LATER_FIELDS[k]))
        }
        h.update(json.dumps(jsonable(config), sort_keys=True).encode())
        for arr in (self.dataset.observations, self.dataset.actions, self.dataset.rewards, self.dataset.terminals):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(self.data.action_low.tobytes() + self.data.action_high.tobytes())
        return h.hexdigest()

    def termination_fn(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The task's termination rule on normalised observations (None when it never terminates); built once."""
        if self.custom_termination is not None:
            return self.custom_termination
        if not hasattr(self, "_termination"):
            from sb3_uepo.offline.termination import termination_fn_for

            rule = termination_fn_for(self.env_id, self.data.obs_mean, self.data.obs_std)
            self._termination = None if getattr(rule, "never", False) else rule
        return self._termination

    # ------------------------------------------------------------------------------------------ checkpoints
    def _load_progress(self) -> None:
        if self.checkpoints is None or not self.resume:
            return
        progress = self.checkpoints.load_progress()
        self.completed, self.reports, self.seconds = progress.completed, progress.reports, progress.seconds

    def _save_stage(self, name: str, payload: dict[str, Any]) -> None:
        self.completed = sorted({*self.completed, name}, key=STAGES.index)  # stages side by side finish in any order
        if self.checkpoints is not None:
            progress = Progress(self.completed, self.reports, self.seconds)
            self.checkpoints.save_stage(name, payload, progress, self.config.to_dict())

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> OfflineResult:
        """Run (or resume) every stage and return the :class:`OfflineResult`. With a checkpoint directory, it is
        locked for the run: a second run on it fails at once (:class:`~sb3_uepo.common.io.LockedError`)."""
        if self.checkpoint_dir is None:
            return self._run()
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with output_lock(self.checkpoint_dir, "checkpoint directory"):
            return self._run()

    def _run(self) -> OfflineResult:
        self._load_progress()
        restored = self._restore_completed()
        pending = [name for name in STAGES if name not in self.completed]
        if restored and pending:
            self._say(f"resuming from stage {pending[0]} ({', '.join(restored)} restored from {self.checkpoint_dir})")
        elif restored:
            self._say(f"every stage restored from {self.checkpoint_dir}")
        self._compute_side_by_side(pending)
        for name in pending:
            if name not in self.completed:  # (not computed side by side)
                start = time.time()
                output, payload, report = self.compute_stage(name)
                self._finish_stage(name, output, payload, report, time.time() - start)
        return self._result()

    def _restore_completed(self) -> list[str]:
        """Restore the completed stages of an earlier run; a stage whose checkpoint is unreadable is recomputed, with
        every later one."""
        restored: list[str] = []
        for name in STAGES:
            if name not in self.completed:
                continue
            try:
                self.outputs[name] = self._restore(name)
                restored.append(name)
            except Exception as exc:  # a truncated or foreign file: recompute this stage and every later one
                warnings.warn(
                    f"the checkpoint of stage '{name}' in {self.checkpoint_dir} is unreadable "
                    f"({type(exc).__name__}: {exc}); stage '{name}' and the later ones are recomputed",
                    stacklevel=3,
                )
                self.completed = [s for s in self.completed if STAGES.index(s) < STAGES.index(name)]
                self._say(f"checkpoint of stage {name} unreadable: recomputing from it")
                break
        return restored

    def _finish_stage(self, name: str, output: Any, payload: dict[str, Any], report: dict[str, Any], seconds: float) -> None:
        """Keep a computed stage: its output, report and time, its checkpoint, its log line."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        report = dict(report, seconds=self.seconds[name])
        self.reports[name] = jsonable(report)
        self.outputs[name] = output
        self._save_stage(name, payload)
        log_values(self.logger, f"offline/{name}", {"seconds": self.seconds[name]}, 0)
        self._say(stage_summary(name, self.reports[name]))

    def compute_stage(self, name: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Compute one stage from the outputs of the earlier ones: (output, checkpoint payload, report)."""
        with torch.random.fork_rng(devices=[]):  # every stage seeded on its own: resumed runs draw the same numbers
            torch.manual_seed(self.config.seed + 1000 * (STAGES.index(name) + 1))
            return getattr(self, f"_stage_{name}")()

    def _independent(self, name: str) -> bool:
        """Whether stage ``name`` does real work here without reading another stage's output."""
        cfg = self.config
        if name == "behavior":
            return cfg.policy_type == "diffusion"
        if name == "iql":
            return True
        if name == "dynamics":  # a custom termination rule need not pickle
            return cfg.needs_dynamics and self.custom_termination is None
        return name == "members" and cfg.policy_type == "gaussian"

    def _compute_side_by_side(self, pending: list[str]) -> None:
        """With ``n_jobs > 1`` on the CPU: compute the pending independent stages in worker processes, side by side;
        each is kept (checkpointed) as soon as it finishes."""
        names = [name for name in pending if self._independent(name)]
        if self.n_jobs < 2 or len(names) < 2 or self.device.type != "cpu":
            return
        from sb3_uepo.offline.parallel import WorkerError, replay, run_side_by_side

        def done(name: str, payload: dict[str, Any], report: dict[str, Any], seconds: float, logged: list) -> None:
            replay(logged, self.logger)
            self._finish_stage(name, self._from_payload(name, payload), payload, report, seconds)

        self._say(f"training {', '.join(names)} side by side in {min(self.n_jobs, len(names))} worker processes")
        try:
            # what a worker rebuilds this pretrainer from (a custom termination rule is never needed there)
            rebuild = dict(
                dataset=self.dataset,
                observation_space=self.observation_space,
                action_space=self.action_space,
                config=self.config,
                progress_bar=self.progress_bar,
                device=self.device,
                env_id=self.env_id,
            )
            run_side_by_side(names, rebuild, self.n_jobs, self.progress_bar, done)
        except WorkerError as exc:
            warnings.warn(
                f"{exc}; the stages left run one by one in this process instead. A script that starts worker processes "
                "must run its work under `if __name__ == '__main__':` (they are spawned and import the main module); "
                "pretrain_jobs=1 (uepo train --offline-jobs 1) never starts any",
                stacklevel=3,
            )

    def _say(self, line: str) -> None:
        if self.verbose >= 1:
            print(f"[offline] {line}", flush=True)

    def _restore(self, name: str) -> Any:
        assert self.checkpoints is not None
        return self._from_payload(name, self.checkpoints.load_stage(name, self.device))

    def _from_payload(self, name: str, payload: dict[str, Any]) -> Any:
        """A stage's output rebuilt from its checkpoint payload."""
        cfg, d = self.config, self.data
        obs_dim, action_dim = d.obs.shape[1], d.actions.shape[1]
        if name == "behavior":
            if payload.get("skipped"):
                return None
            model = make_denoiser(action_dim, obs_dim, cfg).to(self.device)
            model.load_state_dict(payload["state_dict"])
            return model.eval().requires_grad_(False)
        if name == "iql":
            critics = IQLCritics.from_config(obs_dim, action_dim, cfg).to(self.device)
            critics.load_state_dict(payload["state_dict"])
            return critics.eval().requires_grad_(False)
        if name == "dynamics":
            if payload.get("skipped"):
                return None
            from sb3_uepo.offline.dynamics import DynamicsEnsemble

            dynamics = DynamicsEnsemble(**payload["constructor_kwargs"]).to(self.device)
            dynamics.load_state_dict(payload["state_dict"])
            return dynamics.eval()
        if name == "members":
            return self._members_from(payload)
        return payload  # offline_ppo: the improvement state

    def _members_from(self, payload: dict[str, Any]) -> DiffusionMembers | GaussianMembers:
        cfg, d = self.config, self.data
        if cfg.policy_type == "diffusion":
            template = make_denoiser(d.actions.shape[1], d.obs.shape[1], cfg).to(self.device)
            return diffusion_members_from_state(template, make_sampler(cfg).to(self.device), payload, cfg.member_noise)
        return gaussian_members_from_state(d.obs.shape[1], d.actions.shape[1], cfg, payload)

    # ------------------------------------------------------------------------------------------ stages
    def _stage_behavior(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        if self.config.policy_type != "diffusion":
            return None, dict(skipped=True), dict(skipped="Gaussian members are cloned directly in the members stage")
        obs, actions, fraction = self.data.obs, self.data.actions, self.config.behavior_top_fraction
        if fraction < 1.0:  # %BC: the best episodes only (the observation normalisation stays the whole dataset's)
            mask = torch.as_tensor(top_episodes_mask(self.dataset, fraction), device=obs.device)
            obs, actions = obs[mask], actions[mask]
        model, report = fit_behavior_model(obs, actions, self.config, self.logger, self.progress_bar)
        report["transitions"] = int(obs.shape[0])
        return model, dict(state_dict=model.state_dict()), report

    def _stage_iql(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        d = self.data
        critics, report = fit_iql(
            d.obs, d.actions, d.rewards, d.next_obs, d.terminals, self.config, self.logger, self.progress_bar
        )
        return critics, dict(state_dict=critics.state_dict()), report

    def _stage_dynamics(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        cfg, d = self.config, self.data
        if not cfg.needs_dynamics:
            return None, dict(skipped=True), dict(skipped="no model rollouts need it (offline improvement off, or mean-Q OPE)")
        from sb3_uepo.offline.dynamics import fit_dynamics

        logger = _PrefixLogger(self.logger) if self.logger is not None else None
        dyn_cfg = dataclasses.replace(cfg.dynamics, seed=cfg.seed + 5, device=str(self.device))
        dynamics = fit_dynamics(
            d.obs, d.actions, d.rewards, d.next_obs, dyn_cfg, logger=logger, progress_bar=self.progress_bar
        )
        report: dict[str, Any] = dict(real_only=dict(dynamics.training_report))
        if cfg.augment:
            from sb3_uepo.offline.augmentation import synthesize_transitions

            aug_cfg = dataclasses.replace(cfg.augmentation, seed=cfg.seed + 6, device=str(self.device))
            synthetic, aug_report = synthesize_transitions(
                d.obs,
                d.actions,
                d.rewards,
                d.next_obs,
                dynamics,
                aug_cfg,
                logger=logger,
                progress_bar=self.progress_bar,
                episode_starts=d.episode_starts,
                termination_fn=self.termination_fn(),
            )
            report["augmentation"] = aug_report
            n_synthetic, n_real = int(synthetic[0].shape[0]), int(d.obs.shape[0])
            if n_synthetic >= MIN_SYNTHETIC_FRACTION * n_real:
                dynamics = fit_dynamics(
                    d.obs,
                    d.actions,
                    d.rewards,
                    d.next_obs,
                    dyn_cfg,
                    synthetic=synthetic,
                    logger=logger,
                    progress_bar=self.progress_bar,
                    init=dynamics,
                    log_prefix="dynamics_augmented",
                )
                report["augmented"] = dict(dynamics.training_report)
            else:
                report["augmented"] = (
                    f"{n_synthetic} synthetic transition(s) passed the filter, under {MIN_SYNTHETIC_FRACTION:.0%} of the "
                    f"{n_real} real ones: the real-data model is kept (a refit would cost a second training for nothing)"
                )
        payload = dict(state_dict=dynamics.state_dict(), constructor_kwargs=dynamics.constructor_kwargs())
        return dynamics, payload, report

    def _stage_members(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        cfg, d = self.config, self.data
        if cfg.policy_type == "gaussian":
            members, report = fit_gaussian_members(d.obs, d.actions, cfg, self.logger, self.progress_bar)
            return members, members.state(), report
        behavior, sampler = self.outputs["behavior"], make_sampler(cfg).to(self.device)
        refine_report = None
        if cfg.refine_steps > 0:  # the members start from the critic-guided refinement of the behaviour model
            from sb3_uepo.offline.refine import refine_behavior

            behavior, refine_report = refine_behavior(
                behavior, sampler, self.outputs["iql"], d.obs, cfg, self.logger, self.progress_bar
            )
        members = make_diffusion_members(behavior, sampler, cfg.n_members, cfg.seed + 10, cfg.member_noise)
        report: dict[str, Any] = dict(n_members=cfg.n_members, seed_noise=members.seed_noise.tolist())
        if refine_report is not None:
            report["refine"] = refine_report
        if self.segment_sampler is not None and cfg.n_members > 1:
            generator = torch.Generator().manual_seed(cfg.seed + 11)
            idx = self.segment_sampler.sample(cfg.segment_batch_size, generator).to(self.device)
            with torch.no_grad():
                chains = members.sample_chains(d.obs[idx].reshape(-1, d.obs.shape[1]), deterministic=True)
                actions = chains[:, :, -1].reshape(cfg.n_members, idx.shape[0], idx.shape[1], -1)
                div = pairwise_divergence(actions)
            report["initial_divergence"] = div.tolist()
            off_diagonal = div[~torch.eye(cfg.n_members, dtype=torch.bool)]
            report["initial_divergence_mean"] = float(off_diagonal.mean())
            log_values(self.logger, "offline/members", dict(initial_divergence=report["initial_divergence_mean"]), 0)
        return members, members.state(), report

    def _ope_fn(self, n_members: int) -> Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]:
        from sb3_uepo.offline.ope import offline_policy_evaluation

        cfg, d = self.config, self.data
        critics: IQLCritics = self.outputs["iql"]
        dynamics = self.outputs["dynamics"]
        generator = torch.Generator().manual_seed(cfg.seed + 7)
        n_starts = min(cfg.ope_n_starts, d.obs.shape[0])
        pool = torch.nonzero(d.episode_starts.cpu()).flatten() if cfg.ope_start_states == "episode_starts" else None
        if pool is None or len(pool) == 0:
            start_idx = torch.randint(0, d.obs.shape[0], (n_starts,), generator=generator)
        else:  # episode starts are few (one per episode): drawn with replacement, each row gets its own model noise
            start_idx = pool[torch.randint(0, len(pool), (n_starts,), generator=generator)]
        start_obs = d.obs[start_idx.to(self.device)]
        termination = self.termination_fn() if cfg.ope_score == "model_return" else None

        def ope(policy_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            if cfg.ope_score == "mean_q":
                return offline_policy_evaluation(
                    None, policy_fn, start_obs, 0, cfg.gamma, score="mean_q", q_fn=critics.q_min, n_members=n_members
                )  # type: ignore[return-value]
            rollout_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 8)  # same draws at every evaluation
            return offline_policy_evaluation(  # type: ignore[return-value]
                dynamics,
                policy_fn,
                start_obs,
                cfg.ope_horizon,
                cfg.ope_discount,
                value_fn=critics.value if cfg.ope_bootstrap else None,
                termination_fn=termination,
                generator=rollout_gen,
                n_members=n_members,
                uncertainty_penalty=cfg.ope_uncertainty_penalty,
            )

        return ope

    def _stage_offline_ppo(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        cfg, d = self.config, self.data
        members = self.outputs["members"]
        self.outputs["initial_members"] = members.detached_params()  # before offline PPO trains them in place
        if not cfg.offline_improvement:
            improvement = OfflinePolicyImprovement(
                members, self.outputs["iql"], d.obs, cfg, segment_sampler=self.segment_sampler, logger=self.logger
            )
            reason = (
                "offline improvement is off (offline_improvement=False, the default for diffusion members): member 0, "
                "an untrained copy of the behaviour model, is handed on"
            )
            state = dict(improvement.state_dict(), chosen_member=0, chosen_reason=reason)
            return state, state, dict(steps=0, chosen_member=0, chosen_reason=reason, skipped=reason)
        improvement = OfflinePolicyImprovement(
            members,
            self.outputs["iql"],
            d.obs,
            cfg,
            behavior=self.outputs.get("behavior"),
            segment_sampler=self.segment_sampler,
            ope_fn=self._ope_fn(members.n_members),
            logger=self.logger,
        )
        checkpoints = self.checkpoints
        saved = checkpoints.load_partial(self.device) if checkpoints is not None and self.resume else None
        if saved is not None:
            improvement.load_state_dict(saved)
            self._say(f"offline_ppo resumes at step {improvement.step_count} of {cfg.ppo_steps}")

        def checkpoint(imp: OfflinePolicyImprovement) -> None:
            if checkpoints is not None:
                checkpoints.save_partial(imp.state_dict())

        improvement.run(self.progress_bar, checkpoint_fn=checkpoint)
        state = improvement.state_dict()
        index, reason = improvement.best_member()
        state.update(chosen_member=index, chosen_reason=reason)
        report = dict(
            steps=improvement.step_count,
            chosen_member=index,
            chosen_reason=reason,
            initial_ope_scores=state["initial_scores"],
            best_ope_scores=state["best_scores"],
            replacements=improvement.replacements,
            loss_curve=improvement.loss_curve,
            perturbations=improvement.perturbations,
            train_seconds=improvement.seconds,
        )
        if checkpoints is not None:
            checkpoints.partial_path.unlink(missing_ok=True)
        return state, state, report

    # ------------------------------------------------------------------------------------------ result
    def _q_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The IQL critic's ``q1.*`` / ``q2.*`` weights (None when no critic steps were trained)."""
        critics = self.outputs.get("iql")
        if critics is None or self.config.iql_steps <= 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in critics.state_dict().items() if k.startswith(("q1.", "q2."))}

    def _result(self) -> OfflineResult:
        cfg, d = self.config, self.data
        state = self.outputs["offline_ppo"]
        members = self.outputs["members"]
        index = int(state["chosen_member"])

        def cpu(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().clone() for k, v in params.items()}

        member_states = [cpu(members.member_state_dict(i, state["old_params"])) for i in range(members.n_members)]
        initial_params = self.outputs.get("initial_members") or members.detached_params()  # resumed: never trained here
        initial_states = [cpu(members.member_state_dict(i, initial_params)) for i in range(members.n_members)]
        noises: list[torch.Tensor | None] = [None] * members.n_members
        if cfg.policy_type == "diffusion" and state["old_seed_noise"] is not None:
            noises = [state["old_seed_noise"][i].detach().cpu().clone() for i in range(members.n_members)]
        policy_state, seed_noise = member_states[index], noises[index]
        behavior = self.outputs.get("behavior")
        obs_dim, action_dim = d.obs.shape[1], d.actions.shape[1]
        if cfg.policy_type == "diffusion":
            policy_kwargs: dict[str, Any] = dict(
                action_dim=action_dim,
                cond_dim=obs_dim,
                hidden_sizes=list(cfg.denoiser_hidden_sizes),
                time_embed_dim=cfg.time_embed_dim,
            )
        else:
            policy_kwargs = dict(
                obs_dim=obs_dim,
                action_dim=action_dim,
                hidden_sizes=list(cfg.gaussian_hidden_sizes),
                activation=cfg.gaussian_activation,
            )
        architecture = dict(
            policy=policy_kwargs,
            sampler=dict(
                n_train_steps=cfg.n_diffusion_steps,
                n_sampling_steps=cfg.n_sampling_steps,
                sampler=cfg.sampler,
                min_std=cfg.min_std,
                member_noise=cfg.member_noise,
            ),
            value=dict(net_arch=list(cfg.value_net_arch), activation=cfg.value_activation, gamma=cfg.gamma),
        )

        def to_list(x: Any) -> list[float] | None:
            return None if x is None else [float(v) for v in x]

        result = OfflineResult(
            chosen_member=index,
            chosen_reason=str(state["chosen_reason"]),
            policy_type=cfg.policy_type,
            policy_state_dict=policy_state,
            seed_noise=seed_noise,
            behavior_state_dict=(
                None if behavior is None else {k: v.detach().cpu().clone() for k, v in behavior.state_dict().items()}
            ),
            value_state_dict={k: v.cpu() for k, v in self.outputs["iql"].value_state_dict().items()},
            obs_mean=d.obs_mean,
            obs_std=d.obs_std,
            action_low=d.action_low,
            action_high=d.action_high,
            architecture=architecture,
            initial_ope_scores=to_list(state["initial_scores"]),
            best_ope_scores=to_list(state["best_scores"]),
            ope_history=list(state["ope_history"]),
            stage_reports=dict(self.reports),
            config=jsonable(cfg.to_dict()),
            seconds=dict(self.seconds),
            member_state_dicts=member_states,
            member_seed_noises=noises,
            initial_member_state_dicts=initial_states,
            q_state_dict=self._q_state_dict(),
        )
        log_values(self.logger, "offline/select", dict(chosen_member=float(index)), 0)
        return result


def stage_summary(name: str, report: dict[str, Any]) -> str:
    """One log line of a finished stage: its name, steps, seconds and its key metric."""
    if report.get("skipped"):
        return f"{name:<11} skipped: {report['skipped']}"
    parts = [f"{name:<11} {report.get('seconds', 0.0):6.1f} s"]
    if "steps" in report:
        parts.append(f"{report['steps']} steps")
    if name == "behavior":
        parts.append(f"denoising loss {report.get('final_loss', float('nan')):.4f}")
    elif name == "iql":
        parts.append(
            f"V loss {report.get('final_value_loss', float('nan')):.4f}, Q loss {report.get('final_q_loss', float('nan')):.4f}"
        )
    elif name == "dynamics":
        model = report.get("augmented") if isinstance(report.get("augmented"), dict) else report.get("real_only", {})
        parts.append(f"elite holdout MSE {model.get('elite_holdout_mse', float('nan')):.4f}")
        if isinstance(report.get("augmentation"), dict):
            aug = report["augmentation"]
            parts.append(f"synthetic kept {aug.get('n_kept', 0)} of {aug.get('n_generated', 0)}")
    elif name == "members":
        if "initial_divergence_mean" in report:
            parts.append(f"initial divergence {report['initial_divergence_mean']:.3f}")
        if "final_nll" in report:
            parts.append(f"BC NLL {_short_list(report['final_nll'])}")
        if isinstance(report.get("refine"), dict):
            refine = report["refine"]
            state = f"refined in {refine.get('steps', 0)} steps" if refine.get("applied") else "refinement skipped"
            parts.append(f"critic's relative gain {refine.get('relative_gain', float('nan')):.4f}: {state}")
    elif name == "offline_ppo":
        parts.append(f"chosen member {report.get('chosen_member')}, best OPE {_short_list(report.get('best_ope_scores'))}")
    return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")


def _short_list(values: Any) -> str:
    return "-" if not values else "[" + ", ".join(f"{float(v):.1f}" for v in values) + "]"


def pretrain(
    dataset: Any, observation_space: spaces.Space, action_space: spaces.Space, config: Any = None, **kwargs: Any
) -> OfflineResult:
    """Run UEPO's offline phase on a dataset; never touches an environment. ``OfflinePretrainer(...).run()``.

    :param dataset: an :class:`~sb3_uepo.common.datasets.container.OfflineDataset`
    :param observation_space: the env's observation space (Box)
    :param action_space: the env's action space (Box); its bounds define the [-1, 1] action scaling
    :param config: :class:`OfflineConfig`, a preset name (``"quick"``, ``"quick+uni_o4"``, ...) or None (``"default"``)
    :param kwargs: the other arguments of :class:`OfflinePretrainer` (``logger``, ``checkpoint_dir``,
        ``progress_bar``, ``device``, ``env_id``, ``termination_fn``, ``resume``, ``verbose``)
    :return: the chosen member and everything the online phase needs
    """
    return OfflinePretrainer(dataset, observation_space, action_space, config, **kwargs).run()
