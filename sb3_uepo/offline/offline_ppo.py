"""Offline multi-step policy improvement of every member (UEPO stage 4, BPPO / Uni-O4 style), gated by OPE.

Owns: :func:`clipped_surrogate`, :func:`per_member_clip_grad_norm_` and :class:`OfflinePolicyImprovement` (the
training loop over all members at once, the OPE gate that replaces a member's "previous" policy, checkpointable
state). Must not touch: the regulariser formulas (``divergence.py``), the critics (``iql.py``), OPE itself
(``ope.py``, passed in as ``ope_fn``), the environment (never used offline).

One step, all ``M`` members batched (BPPO, Zhuang et al. 2023; Uni-O4, Lei et al. 2024):

1. draw ``B`` dataset states ``s`` (shared by the members);
2. sample one chain per member and state from the member's FROZEN previous policy ``pi_old`` (stochastic chain:
   ``x_0`` = the member's seed noise, DDIM/DDPM steps with the floored std); Gaussian members draw ``a ~ pi_old``;
3. exact chain ratio ``r = exp( sum_j [log N(x_{j+1}; mu_new(x_j), sigma_j^2) - log N(x_{j+1}; mu_old(x_j), sigma_j^2)] )``
   (sum over the S steps and the action dims; the Gaussian members' ratio is the plain density ratio);
4. advantage ``A = min Q(s, a) - V(s)`` from IQL at the chain's final action ``a = clip(x_S, -1, 1)``, normalised per
   member over the batch, weighted ``omega`` if positive and ``1 - omega`` if negative (BPPO's ``omega``);
5. loss per member ``-mean_B min(r A, clip(r, 1 - eps, 1 + eps) A)`` plus ``divergence_coef * L_div`` and
   ``kl_coef * KL`` (``divergence.py``), summed over members; Adam; per-member gradient-norm clip; optional linear
   learning-rate decay to 0 (Uni-O4).

Every ``perturb_interval`` steps the adaptive perturbation runs; every ``ope_interval`` steps all members are scored
by ``ope_fn`` and member ``m``'s previous policy is replaced by its current weights only if its score beats its best
score so far (Uni-O4's gate). Without ``ope_fn`` the previous policy is replaced at every interval (ungated BPPO).
The members handed on are the previous (= best-by-OPE) policies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from sb3_uepo.offline.config import OfflineConfig, log_values, make_progress_bar
from sb3_uepo.offline.divergence import (
    SegmentSampler,
    divergence_loss,
    perturb_,
    perturbation_sigmas,
    sequence_regularizers,
)
from sb3_uepo.offline.iql import IQLCritics
from sb3_uepo.offline.members import DiffusionMembers, GaussianMembers

PolicyFn = Callable[[torch.Tensor], torch.Tensor]  # (M, B, O) -> (M, B, A)
OpeFn = Callable[[PolicyFn], torch.Tensor]  # policy_fn -> (M,) scores


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, per member.

    :param log_ratio: (M, B) ``log pi_new - log pi_old`` of the sampled chains / actions
    :param advantages: (M, B)
    :param clip_range: ``eps``
    :return: (M,) losses ``-mean_B min(r A, clip(r) A)`` and diagnostics (clip fraction, approx KL, mean ratio)
    """
    ratio = log_ratio.exp()
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_range, 1 + clip_range) * advantages)
    with torch.no_grad():
        info = dict(
            clip_fraction=float(((ratio - 1).abs() > clip_range).float().mean()),
            approx_kl=float(((ratio - 1) - log_ratio).mean()),  # k3 estimator (Schulman)
            ratio_mean=float(ratio.mean()),
        )
    return -surrogate.mean(-1), info


@torch.no_grad()
def per_member_clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradient of every member (leading axis of each stacked parameter) to ``max_norm``; return (M,) norms."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([g.pow(2).reshape(g.shape[0], -1).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
    return norms


class OfflinePolicyImprovement:
    """Offline PPO of all members at once, with the OPE gate.

    :param members: :class:`DiffusionMembers` or :class:`GaussianMembers` (trained in place)
    :param critics: the IQL critics (frozen)
    :param obs: (N, O) normalised dataset observations (states to improve on; segments index into them too)
    :param config: the offline config
    :param behavior: the frozen behaviour denoiser (sequence KL)
    :param segment_sampler: draws dataset segments for the divergence / KL / perturbation (diffusion members)
    :param ope_fn: scores the members, ``policy_fn -> (M,)``; None replaces the previous policies ungated
    :param logger: SB3 logger or None
    :param log_prefix: key prefix of the logged values
    """

    def __init__(
        self,
        members: DiffusionMembers | GaussianMembers,
        critics: IQLCritics,
        obs: torch.Tensor,
        config: OfflineConfig,
        behavior: torch.nn.Module | None = None,
        segment_sampler: SegmentSampler | None = None,
        ope_fn: OpeFn | None = None,
        logger: Any = None,
        log_prefix: str = "offline/offline_ppo",
    ) -> None:
        self.members, self.critics, self.obs, self.config = members, critics, obs, config
        self.behavior, self.segment_sampler, self.ope_fn = behavior, segment_sampler, ope_fn
        self.logger, self.log_prefix = logger, log_prefix
        self.is_diffusion = isinstance(members, DiffusionMembers)
        if self.is_diffusion and config.needs_segments and segment_sampler is None:
            raise ValueError("the divergence / perturbation / KL terms need a SegmentSampler")
        self.optimizer = torch.optim.Adam(members.parameters(), lr=config.ppo_lr)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed + 3)
        self.ope_generator_seed = config.seed + 4  # the same random numbers at every evaluation (comparable scores)
        # "previous" policies: weights (+ seed noise for diffusion members), replaced when OPE improves
        self.old_params = members.detached_params()
        self.old_seed_noise = members.seed_noise.detach().clone() if self.is_diffusion else None
        self.step_count = 0
        self.best_scores: torch.Tensor | None = None
        self.initial_scores: torch.Tensor | None = None
        self.ope_history: list[dict[str, Any]] = []
        self.perturbations: list[dict[str, Any]] = []
        self.loss_curve: list[dict[str, float]] = []
        self.replacements = [0] * members.n_members
        self.seconds = 0.0

    # ------------------------------------------------------------------------------------------ policies
    def policy_fn(self, previous: bool = False) -> PolicyFn:
        """``(M, B, O) -> (M, B, A)`` acting with the current (or previous) members, for OPE."""
        params = self.old_params if previous else None
        deterministic = self.config.ope_deterministic_policy
        generator = torch.Generator(device="cpu").manual_seed(self.ope_generator_seed + 1)
        members = self.members

        def act(obs: torch.Tensor) -> torch.Tensor:
            if isinstance(members, DiffusionMembers):
                noise = self.old_seed_noise if previous else None
                chains = members.sample_chains(obs, params, deterministic=deterministic, generator=generator, seed_noise=noise)
                return chains[:, :, -1].clamp(-1.0, 1.0)
            return members.act(obs, deterministic=deterministic, params=params, generator=generator)

        return act

    @torch.no_grad()
    def evaluate(self, previous: bool = False) -> torch.Tensor | None:
        """OPE scores (M,) of the current (or previous) members; None without ``ope_fn``."""
        if self.ope_fn is None:
            return None
        return self.ope_fn(self.policy_fn(previous)).detach().float().cpu()

    # ------------------------------------------------------------------------------------------ one step
    def _sample_old(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chains / actions from the previous policies.

        Returns (samples, final actions (M, B, A), logp_old, states (M, B, O))."""
        m = self.members.n_members
        per_member = states.unsqueeze(0).expand(m, -1, -1)
        if isinstance(self.members, DiffusionMembers):
            chains, logp_old = self.members.sample_chains_with_log_prob(
                states, self.old_params, generator=self.generator, seed_noise=self.old_seed_noise
            )
            return chains, chains[:, :, -1].clamp(-1.0, 1.0), logp_old.sum(-1), per_member
        actions = self.members.sample(states, self.old_params, generator=self.generator)
        logp_old = self.members.log_prob(states, actions, self.old_params)
        return actions, actions.clamp(-1.0, 1.0), logp_old, per_member

    def _new_log_prob(self, samples: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        if isinstance(self.members, DiffusionMembers):
            return self.members.chain_log_prob(samples, states).sum(-1)
        return self.members.log_prob(states, samples)

    def train_step(self) -> dict[str, float]:
        """One gradient step of every member; returns diagnostics."""
        cfg, n_steps = self.config, max(self.config.ppo_steps, 1)
        lr = cfg.ppo_lr * (1.0 - self.step_count / n_steps) if cfg.linear_decay else cfg.ppo_lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, self.obs.shape[0], (min(cfg.ppo_batch_size, self.obs.shape[0]),), generator=self.generator)
        states = self.obs[idx.to(self.obs.device)]
        with torch.no_grad():
            samples, final_actions, logp_old, per_member = self._sample_old(states)
            advantages = self.critics.advantage(per_member, final_actions)
            if cfg.advantage_omega != 0.5:
                advantages = advantages * torch.where(advantages > 0, cfg.advantage_omega, 1.0 - cfg.advantage_omega)
        log_ratio = (self._new_log_prob(samples, states) - logp_old).clamp(-cfg.max_log_ratio, cfg.max_log_ratio)
        ppo_losses, info = clipped_surrogate(log_ratio, advantages, cfg.clip_range)
        loss = ppo_losses.sum()
        info.update(policy_loss=float(ppo_losses.detach().mean()), lr=lr)

        regularize = (
            self.is_diffusion and (cfg.use_divergence or cfg.use_kl) and self.step_count % cfg.regularizer_interval == 0
        )
        if regularize:
            assert self.segment_sampler is not None
            segments = self.obs[self.segment_sampler.sample(cfg.segment_batch_size, self.generator).to(self.obs.device)]
            reg = sequence_regularizers(self.members, self.behavior, segments, cfg.use_divergence, cfg.use_kl)
            if cfg.use_divergence:
                div_loss = divergence_loss(reg["divergence"], cfg.tau)
                loss = loss + cfg.divergence_coef * div_loss
                info.update(
                    divergence_loss=float(div_loss.detach()), divergence_mean=_offdiag_mean(reg["divergence"].detach())
                )
            if cfg.use_kl:
                loss = loss + cfg.kl_coef * reg["kl"].sum()
                info.update(kl=float(reg["kl"].detach().mean()))

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms = per_member_clip_grad_norm_(self.members.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            raw_adv = self.critics.advantage(per_member, final_actions, normalize=False)
        info.update(loss=float(loss.detach()), grad_norm=float(grad_norms.mean()), advantage_raw=float(raw_adv.mean()))
        self.step_count += 1
        return info

    # ------------------------------------------------------------------------------------------ perturbation, gate
    @torch.no_grad()
    def perturb(self) -> dict[str, Any]:
        """Adaptive perturbation of the newer member of every pair closer than ``tau`` (diffusion members)."""
        cfg = self.config
        assert isinstance(self.members, DiffusionMembers) and self.segment_sampler is not None
        segments = self.obs[self.segment_sampler.sample(cfg.segment_batch_size, self.generator).to(self.obs.device)]
        div = sequence_regularizers(self.members, None, segments, compute_divergence=True, compute_kl=False)["divergence"]
        sigmas = perturbation_sigmas(div, cfg.tau, cfg.eta)
        target = self.members.params if cfg.perturb_target == "weights" else self.members.seed_noise
        perturb_(target, sigmas, self.generator)
        record = dict(step=self.step_count, divergence=div.tolist(), sigmas=sigmas.tolist(), fired=bool((sigmas > 0).any()))
        self.perturbations.append(record)
        return record

    def gate(self) -> dict[str, Any]:
        """Score the current members; replace the previous policy of every member whose score improved."""
        scores = self.evaluate()
        m = self.members.n_members
        if scores is None:  # ungated
            improved = torch.ones(m, dtype=torch.bool)
        else:
            assert self.best_scores is not None
            improved = scores > self.best_scores
            self.best_scores = torch.where(improved, scores, self.best_scores)
        self.members.copy_members_(self.members.params, improved, self.old_params)
        if self.old_seed_noise is not None:
            self.old_seed_noise[improved] = self.members.seed_noise[improved].detach()
        for i in torch.nonzero(improved).reshape(-1).tolist():
            self.replacements[i] += 1
        entry = dict(
            step=self.step_count,
            scores=None if scores is None else scores.tolist(),
            best=None if self.best_scores is None else self.best_scores.tolist(),
            improved=improved.tolist(),
        )
        self.ope_history.append(entry)
        if scores is not None:
            values = {f"score_{i}": float(s) for i, s in enumerate(scores)}
            values.update({f"best_{i}": float(s) for i, s in enumerate(self.best_scores)})  # type: ignore[arg-type]
            values["n_improved"] = float(improved.sum())
            log_values(self.logger, "offline/ope", values, self.step_count)
        return entry

    # ------------------------------------------------------------------------------------------ loop
    def run(self, progress_bar: bool = True, checkpoint_fn: Callable[[OfflinePolicyImprovement], None] | None = None) -> None:
        """Train until ``ppo_steps`` (continuing from ``step_count`` after a resume), evaluating every ``ope_interval``.

        :param progress_bar: show a progress bar
        :param checkpoint_fn: called with self after every OPE evaluation (saves a resumable state)
        """
        cfg = self.config
        start = time.time()
        if self.best_scores is None and self.ope_fn is not None:
            self.initial_scores = self.evaluate()
            self.best_scores = self.initial_scores.clone()  # type: ignore[union-attr]
            self.ope_history.append(
                dict(
                    step=0,
                    scores=self.initial_scores.tolist(),  # type: ignore[union-attr]
                    best=self.best_scores.tolist(),
                    improved=[False] * len(self.best_scores),
                )
            )
            log_values(self.logger, "offline/ope", {f"score_{i}": float(s) for i, s in enumerate(self.best_scores)}, 0)  # type: ignore[arg-type]
        bar = make_progress_bar(cfg.ppo_steps, progress_bar, "offline: PPO members")
        bar.update(self.step_count)
        window: list[dict[str, float]] = []
        while self.step_count < cfg.ppo_steps:
            window.append(self.train_step())
            bar.update(1)
            if self.is_diffusion and cfg.use_perturbation and self.step_count % cfg.perturb_interval == 0:
                self.perturb()
            last = self.step_count == cfg.ppo_steps
            if self.step_count % cfg.ope_interval == 0 or last:
                keys = dict.fromkeys(k for w in window for k in w)  # every key, also those logged every few steps only
                means = {k: sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in keys}
                means["step"] = self.step_count
                self.loss_curve.append(means)
                log_values(self.logger, self.log_prefix, {k: v for k, v in means.items() if k != "step"}, self.step_count)
                window = []
                entry = self.gate()
                bar.set_postfix(loss=f"{means['loss']:.3f}", best=_fmt(entry["best"]))
                self.seconds += time.time() - start
                start = time.time()
                if checkpoint_fn is not None:
                    checkpoint_fn(self)
        bar.close()
        self.seconds += time.time() - start

    # ------------------------------------------------------------------------------------------ results
    @torch.no_grad()
    def choice_scores(self) -> torch.Tensor | None:
        """Scores (M,) that choose the member handed on: the gate's best OPE scores (``choice_score="ope"``), or the
        IQL ``mean_b min Q(s_b, pi_i(s_b))`` of every member's best-by-OPE policy over ``choice_n_states`` dataset
        states drawn uniformly with a fixed seed (``"mean_q"``: in the data's support, where the critic was trained)."""
        cfg = self.config
        if cfg.choice_score == "ope":
            return self.best_scores
        n = self.obs.shape[0]
        generator = torch.Generator().manual_seed(cfg.seed + 9)
        idx = torch.randint(0, n, (min(cfg.choice_n_states, n),), generator=generator).to(self.obs.device)
        states = self.obs[idx].unsqueeze(0).expand(self.members.n_members, -1, -1)
        actions = self.policy_fn(previous=True)(states)
        return self.critics.q_min(states, actions).mean(1).detach().float().cpu()

    def best_member(self) -> tuple[int, str]:
        """Index of the member handed on and why (offline scores alone; never an environment)."""
        m = self.members.n_members
        scores = self.choice_scores()
        if scores is None:
            return 0, "no OPE was run (ope_fn is None): member 0 by convention"
        index = int(torch.argmax(scores))
        best = None if self.best_scores is None else [round(float(s), 3) for s in self.best_scores]
        initial = [round(float(s), 3) for s in self.initial_scores] if self.initial_scores is not None else None
        by = (
            f"the highest OPE score ({self.config.ope_score}) of its best-by-OPE policy"
            if self.config.choice_score == "ope"
            else f"the highest mean IQL Q over {self.config.choice_n_states} dataset states "
            f"{[round(float(s), 4) for s in scores]} among the best-by-OPE policies"
        )
        return index, (
            f"member {index} of {m} has {by}: OPE best scores {best}, initial {initial}, "
            f"previous-policy replacements {self.replacements}"
        )

    def state_dict(self) -> dict[str, Any]:
        """Resumable state: current and previous members, optimizer, RNG, OPE history."""
        return dict(
            members=self.members.state(),
            old_params=self.old_params,
            old_seed_noise=self.old_seed_noise,
            optimizer=self.optimizer.state_dict(),
            generator=self.generator.get_state(),
            step_count=self.step_count,
            best_scores=self.best_scores,
            initial_scores=self.initial_scores,
            ope_history=self.ope_history,
            perturbations=self.perturbations,
            loss_curve=self.loss_curve,
            replacements=self.replacements,
            seconds=self.seconds,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the members must have the same shapes)."""
        with torch.no_grad():
            for k, v in state["members"]["params"].items():
                self.members.params[k].copy_(v)
            if self.is_diffusion:
                self.members.seed_noise.copy_(state["members"]["seed_noise"])  # type: ignore[union-attr]
        self.old_params = {k: v.clone() for k, v in state["old_params"].items()}
        self.old_seed_noise = None if state["old_seed_noise"] is None else state["old_seed_noise"].clone()
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        for key in ("step_count", "best_scores", "initial_scores", "ope_history", "perturbations", "loss_curve"):
            setattr(self, key, state[key])
        self.replacements = list(state["replacements"])
        self.seconds = float(state["seconds"])


def _offdiag_mean(matrix: torch.Tensor) -> float:
    n = matrix.shape[0]
    if n < 2:
        return 0.0
    return float(matrix[~torch.eye(n, dtype=torch.bool, device=matrix.device)].mean())


def _fmt(values: list[float] | None) -> str:
    return "-" if values is None else "[" + ", ".join(f"{v:.1f}" for v in values) + "]"
