"""Configuration of the offline pretraining phase: :class:`OfflineConfig`, its presets and :func:`resolve_offline_config`.

Owns: every budget, switch and coefficient of the policy-side offline stages (behaviour diffusion, IQL critics,
members, offline PPO with its regularisers, OPE gating), the nested dynamics / augmentation configs as the
pipeline passes them on, the presets ``quick``, ``default``, ``paper`` and ``uni_o4``, and three small runtime
helpers every policy-side stage shares (:func:`activation_class`, :func:`log_values`, :func:`make_progress_bar`).
Must not touch: the training code of any stage (each stage reads its fields from here), the dynamics and
augmentation defaults themselves (``dynamics.py`` / ``augmentation.py`` own them; presets only change budgets).

Presets can be combined with ``+``: a budget preset first, then a variant, e.g. ``"quick+uni_o4"`` is the Uni-O4
baseline with the ``quick`` budgets, so that UEPO and the baseline run through the same code and budget.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sb3_uepo.offline.augmentation import AugmentationConfig
from sb3_uepo.offline.dynamics import DynamicsConfig

POLICY_TYPES = ("diffusion", "gaussian")
OPE_SCORES = ("model_return", "mean_q")
OPE_START_STATES = ("episode_starts", "any")
CHOICE_SCORES = ("mean_q", "ope")
MEMBER_NOISE = ("zero", "seed", "random")
PERTURB_TARGETS = ("weights", "seed")
ACTIVATIONS = ("tanh", "relu", "mish", "silu", "elu")


@dataclass
class OfflineConfig:
    """Everything the offline phase needs besides the data. Step counts are gradient steps."""

    # ------------------------------------------------------------------ general
    seed: int = 0  # seeds every stage (each stage derives its own stream, so a resumed run repeats the same draws)
    n_members: int = 4  # n sub-policies improved in parallel (stage 3)
    policy_type: str = "diffusion"  # "diffusion": members copied from the ONE behaviour denoiser; "gaussian": Uni-O4
    gamma: float = 0.99  # discount of the IQL critics and of the OPE model return

    # ------------------------------------------------------------------ stage 1: behaviour diffusion model
    n_diffusion_steps: int = 20  # K: training diffusion steps (cosine schedule, epsilon prediction)
    n_sampling_steps: int = 5  # S: DDIM/DDPM steps used to act (and the length of the PPO chain)
    sampler: str = "ddim"  # "ddim" or "ddpm" (ChainSampler)
    min_std: float = 0.1  # floor of every denoising step's std (DPPO): chain log-probs and exploration noise
    denoiser_hidden_sizes: tuple[int, ...] = (256, 256, 256)  # Denoiser MLP widths (must match the online policy)
    time_embed_dim: int = 32  # Denoiser step-embedding width (must match the online policy)
    behavior_steps: int = 100_000  # gradient steps of the behaviour denoiser (quick: 30k; fewer leave it unconverged)
    behavior_batch_size: int = 256
    behavior_lr: float = 3e-4  # Adam, cosine-decayed to 10% over behavior_steps
    behavior_ema: float = 0.995  # EMA of the denoiser weights; the EMA copy is the behaviour model (0 disables)
    # share of the dataset's episodes, highest returns first, the behaviour model learns from (%BC; 1: every episode).
    # The critics and every other stage keep the whole dataset. 0.5: the same mean over the 8-dataset suite as every
    # episode, without its failure on HalfCheetah medium-replay (3.3 -> 17.0; docs/benchmarks.md)
    behavior_top_fraction: float = 0.5

    # ------------------------------------------------------------------ stage 2: IQL critics
    iql_steps: int = 50_000  # gradient steps of Q and V
    iql_batch_size: int = 256
    iql_lr: float = 3e-4  # Adam for Q1, Q2 and V
    expectile: float = 0.7  # IQL expectile of the V regression
    target_update_rate: float = 0.005  # Polyak rate of the target Q networks
    q_hidden_sizes: tuple[int, ...] = (256, 256)  # each of the two Q MLPs (ReLU)
    value_net_arch: tuple[int, ...] = (256, 256)  # V = Sequential(*create_mlp(obs_dim, 1, arch, act)), as the online value net
    value_activation: str = "tanh"  # activation of V; must match the online policy's value net (SB3 default: tanh)

    # ------------------------------------------------------------------ stage 3a: critic-guided refinement (refine.py)
    # Before the members are copied from it, the behaviour model is fine-tuned on the IQL critic's choice among
    # refine_candidates of its own deterministic chains per dataset state (x_0 = 0 one of them): IDQL's action choice,
    # learned, so that acting from x_0 = 0 follows it. 0 steps: off (the behaviour model itself is copied). On by
    # default: with the gate below it lifted the 8-dataset suite's mean from 34.6 to 40.8 (Walker2d medium-replay 31.2 ->
    # 73.7) and was skipped on every dataset where it would have hurt (docs/benchmarks.md, "Critic-guided refinement").
    refine_steps: int = 10_000
    refine_candidates: int = 16
    refine_lr: float = 1e-4  # Adam on the copy of the behaviour denoiser (constant)
    # The gate: refine only when the critic's mean gain of its choice over the x_0 = 0 action is at least this share of
    # that action's mean |Q| (below it, the choice is within the critic's noise: on data of one behaviour policy the
    # refinement lowered the real score by 60-70 points; docs/algorithm.md, stage 3a). 0: always refine.
    refine_min_gain: float = 0.01
    # States the gate's statistic is estimated on (a random subset of the dataset; 0: every state). The choice over
    # every state, the refinement's targets, is made only when the gate passes (a skip saves 1-2 minutes per run).
    refine_gate_states: int = 8192

    # ------------------------------------------------------------------ stage 5: dynamics and augmentation (other owner)
    augment: bool = True  # train the dynamics on real + filtered diffusion-synthesised transitions (False: real only)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)  # passed to fit_dynamics (seed/device overridden)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)  # passed to synthesize_transitions

    # ------------------------------------------------------------------ stage 3: members
    # Where a member's chains start. "zero": x_0 = 0, the mode of the prior, for every member (the deterministic action is
    # the DDIM path from the prior's mode; stochastic chains explore through the step noise only); "seed": a fixed draw
    # z_i ~ N(0, I) per member (its quality is a lottery: 9.5 to 64.0 on Hopper for the same weights, see
    # docs/algorithm.md); "random": a fresh N(0, I) draw per chain.
    member_noise: str = "zero"
    gaussian_hidden_sizes: tuple[int, ...] = (256, 256, 256)  # Gaussian members (Uni-O4: 3 x 256)
    gaussian_activation: str = "relu"  # Gaussian members' activation (Uni-O4: ReLU)
    gaussian_log_std_init: float = 0.0  # state-independent log-std of the Gaussian members at init
    gaussian_bc_steps: int = 20_000  # separate BC of the Gaussian members (batched)
    gaussian_bc_lr: float = 1e-4  # Adam (Uni-O4: 1e-4)
    gaussian_bc_batch_size: int = 512  # one batch shared by all members per step (as Uni-O4's joint_train)
    uni_o4_diversity: bool = False  # Uni-O4's heuristic term -alpha (log pi_i(a|s) - max_{j != i} log pi_j(a|s)) in BC
    uni_o4_alpha: float = 0.1  # its weight (Uni-O4: alpha_bc = 0.1)

    # ------------------------------------------------------------------ stage 4: offline multi-step PPO
    # Off by default for the diffusion members: at the budgets this machine allows, offline PPO lowered the real score
    # of the behaviour model it received in every measured run, and no offline score (model-return OPE, mean IQL Q)
    # told the harmed members apart (docs/algorithm.md, "Offline improvement"). Off, the behaviour model itself (acting
    # from x_0 = 0) is handed on and the dynamics model is not trained. The uni_o4 variant turns it on (its method).
    offline_improvement: bool = False
    ppo_steps: int = 2_000  # gradient steps of offline PPO (all members at once), when offline_improvement
    ppo_batch_size: int = 256  # dataset states per step (shared by the members)
    ppo_lr: float = 1e-5  # Adam on the member weights
    clip_range: float = 0.25  # PPO clip of the exact chain ratio (Uni-O4 offline)
    linear_decay: bool = True  # decay the lr linearly to 0 over ppo_steps (Uni-O4's is_linear_decay; the clip stays constant)
    advantage_omega: float = 0.7  # BPPO's asymmetric weight: omega on A > 0, 1 - omega on A < 0 (0.5: off)
    max_grad_norm: float = 0.5  # per-member gradient-norm clip (BPPO: 0.5)
    max_log_ratio: float = 20.0  # clamp of the chain log-ratio before exp (numerical guard only)

    # ------------------------------------------------------------------ stage 4: regularisers
    use_divergence: bool = True  # sequence divergence between members, rewarded up to tau
    divergence_coef: float = 0.1  # weight of the divergence loss mean_{i<j} relu(tau - div_ij)
    tau: float = 1.0  # target divergence: no push beyond it; perturbation fires below it
    segment_length: int = 8  # T: segments s_t .. s_{t+T} (T + 1 states, T velocities, T - 1 accelerations)
    segment_batch_size: int = 64  # segments per update for the divergence and KL terms
    regularizer_interval: int = 1  # compute the divergence / KL terms every this many PPO steps
    use_perturbation: bool = True  # adaptive perturbation of the newer member when div < tau
    eta: float = 0.002  # perturbation scale: sigma = eta * (tau - div) / tau
    perturb_interval: int = 100  # PPO steps between perturbation checks
    perturb_target: str = "weights"  # "weights" (every weight of the newer member) or "seed" (its seed noise)
    use_kl: bool = True  # sequence-level KL of each member to the behaviour model
    kl_coef: float = 0.001  # weight of the KL term (sum over steps and sequence, mean over segments)

    # ------------------------------------------------------------------ stage 6: OPE gating and choice
    ope_score: str = "model_return"  # "model_return" (rollouts in the learned dynamics) or "mean_q" (Uni-O4 cheap)
    ope_interval: int = 100  # PPO steps between OPE evaluations (Uni-O4: 100); each may replace a member's "previous"
    ope_horizon: int = 100  # H_ope: model rollout length
    ope_n_starts: int = 128  # start states of the rollouts (one fixed sample, common to every evaluation)
    ope_start_states: str = "episode_starts"  # "episode_starts" (the task's objective) or "any" (uniform over the data)
    ope_discount: float = 1.0  # discount of the model return (1: the undiscounted episode return that is reported)
    ope_bootstrap: bool = False  # add ope_discount^H V(s_H) for rollouts alive at H (V: the IQL value)
    ope_uncertainty_penalty: float = 1.0  # lambda: every model reward minus lambda * elite disagreement (MOPO)
    ope_deterministic_policy: bool = True  # members act deterministically (DDIM from their seed noise / Gaussian mean)
    # The member handed on (with offline_improvement): "mean_q" chooses by the IQL critic's mean min-Q of each member's
    # best-by-OPE policy over uniformly drawn dataset states; "ope" by the gate's OPE score itself. Neither found the
    # members that offline PPO harmed (docs/algorithm.md, stage 4).
    choice_score: str = "mean_q"
    choice_n_states: int = 2048  # dataset states of the mean-Q choice (one fixed draw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (tuples become lists, nested configs dicts)."""
        return dataclasses.asdict(self)

    def validate(self) -> OfflineConfig:
        """Raise ``ValueError`` with a clear message on a value of the wrong type or an inconsistent one; return self.

        Types follow the defaults: a bool field takes True/False only, an int field an integer (not 2.5, not "100"),
        a float field any real number (stored as float), a tuple field a list or tuple of integers.
        """
        _check_types(self, "")
        checks: list[tuple[bool, str]] = [
            (self.n_members >= 1, f"n_members must be >= 1, got {self.n_members}"),
            (self.policy_type in POLICY_TYPES, f"policy_type must be one of {POLICY_TYPES}, got {self.policy_type!r}"),
            (0.0 < self.gamma <= 1.0, f"gamma must be in (0, 1], got {self.gamma}"),
            (self.sampler in ("ddim", "ddpm"), f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}"),
            (
                1 <= self.n_sampling_steps <= self.n_diffusion_steps,
                f"n_sampling_steps must be in [1, n_diffusion_steps={self.n_diffusion_steps}], got {self.n_sampling_steps}",
            ),
            (self.min_std > 0, f"min_std must be > 0, got {self.min_std}"),
            (0.0 < self.expectile < 1.0, f"expectile must be in (0, 1), got {self.expectile}"),
            (0.0 <= self.behavior_ema < 1.0, f"behavior_ema must be in [0, 1), got {self.behavior_ema}"),
            (
                0.0 < self.behavior_top_fraction <= 1.0,
                f"behavior_top_fraction must be in (0, 1], got {self.behavior_top_fraction}",
            ),
            (self.value_activation in ACTIVATIONS, f"value_activation must be one of {ACTIVATIONS}"),
            (self.gaussian_activation in ACTIVATIONS, f"gaussian_activation must be one of {ACTIVATIONS}"),
            (self.member_noise in MEMBER_NOISE, f"member_noise must be one of {MEMBER_NOISE}, got {self.member_noise!r}"),
            (self.perturb_target in PERTURB_TARGETS, f"perturb_target must be one of {PERTURB_TARGETS}"),
            (self.ope_score in OPE_SCORES, f"ope_score must be one of {OPE_SCORES}, got {self.ope_score!r}"),
            (self.choice_score in CHOICE_SCORES, f"choice_score must be one of {CHOICE_SCORES}, got {self.choice_score!r}"),
            (self.choice_n_states >= 1, f"choice_n_states must be >= 1, got {self.choice_n_states}"),
            (self.refine_candidates >= 1, f"refine_candidates must be >= 1, got {self.refine_candidates}"),
            (self.refine_lr > 0, f"refine_lr must be > 0, got {self.refine_lr}"),
            (self.refine_min_gain >= 0, f"refine_min_gain must be >= 0, got {self.refine_min_gain}"),
            (self.refine_gate_states >= 0, f"refine_gate_states must be >= 0, got {self.refine_gate_states}"),
            (
                self.ope_start_states in OPE_START_STATES,
                f"ope_start_states must be one of {OPE_START_STATES}, got {self.ope_start_states!r}",
            ),
            (0.0 < self.ope_discount <= 1.0, f"ope_discount must be in (0, 1], got {self.ope_discount}"),
            (self.ope_uncertainty_penalty >= 0.0, f"ope_uncertainty_penalty must be >= 0, got {self.ope_uncertainty_penalty}"),
            (
                self.segment_length >= 2,
                f"segment_length (T) must be >= 2 (accelerations need 3 actions), got {self.segment_length}",
            ),
            (0.0 < self.clip_range < 1.0, f"clip_range must be in (0, 1), got {self.clip_range}"),
            (0.0 <= self.advantage_omega <= 1.0, f"advantage_omega must be in [0, 1], got {self.advantage_omega}"),
            (self.tau > 0, f"tau must be > 0, got {self.tau}"),
            (self.eta >= 0, f"eta must be >= 0, got {self.eta}"),
            (
                self.ope_interval >= 1 and self.perturb_interval >= 1 and self.regularizer_interval >= 1,
                "intervals must be >= 1",
            ),
            (self.ope_horizon >= 0 and self.ope_n_starts >= 1, "ope_horizon must be >= 0 and ope_n_starts >= 1"),
        ]
        for name in (
            "behavior_steps",
            "iql_steps",
            "refine_steps",
            "gaussian_bc_steps",
            "ppo_steps",
            "behavior_batch_size",
            "iql_batch_size",
            "gaussian_bc_batch_size",
            "ppo_batch_size",
            "segment_batch_size",
        ):
            checks.append((getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"OfflineConfig: {message}")
        if self.policy_type == "gaussian" and (self.use_divergence or self.use_kl or self.use_perturbation):
            raise ValueError(
                "OfflineConfig: the sequence divergence, the adaptive perturbation and the KL to the behaviour diffusion "
                "model need diffusion members; with policy_type='gaussian' set use_divergence, use_perturbation and "
                "use_kl to False (the 'uni_o4' preset does)."
            )
        return self

    @property
    def needs_dynamics(self) -> bool:
        """The dynamics ensemble is trained when offline PPO runs and its OPE rolls out in it or augmentation is on
        (the augmented data only serves that model)."""
        return self.offline_improvement and (self.ope_score == "model_return" or self.augment)

    @property
    def needs_segments(self) -> bool:
        """Dataset segments of length T are needed (divergence, perturbation or sequence KL)."""
        return self.policy_type == "diffusion" and (self.use_divergence or self.use_perturbation or self.use_kl)


def _check_types(config: Any, where: str) -> None:
    """Check (and normalise: int -> float, list -> tuple) every field of a config dataclass against its default's type."""
    defaults = type(config)()
    for f in dataclasses.fields(config):
        value, default, name = getattr(config, f.name), getattr(defaults, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(default):
            if not isinstance(value, type(default)):
                raise ValueError(f"OfflineConfig: '{name}' takes a dict of its fields, got {value!r}")
            _check_types(value, f"{name}.")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"OfflineConfig: '{name}' must be True or False, got {value!r} ({type(value).__name__})")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"OfflineConfig: '{name}' must be an integer, got {value!r} ({type(value).__name__})")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"OfflineConfig: '{name}' must be a number, got {value!r} ({type(value).__name__})")
            setattr(config, f.name, float(value))
        elif isinstance(default, tuple):
            if not isinstance(value, list | tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"OfflineConfig: '{name}' must be a list of integers, e.g. (256, 256), got {value!r}")
            setattr(config, f.name, tuple(value))
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"OfflineConfig: '{name}' must be a string, got {value!r} ({type(value).__name__})")


# ---------------------------------------------------------------------------------------------- presets
# A preset is a dict of overrides on the OfflineConfig defaults ("default" is the empty dict). Nested configs take
# a dict of their own fields. Budget presets set step counts; variant presets (uni_o4) set switches.
PRESETS: dict[str, dict[str, Any]] = {
    # Real but small: the whole offline phase on ~80k Hopper transitions in about 3 minutes on 2 CPU cores (the
    # behaviour model and the critics side by side; about 5 minutes one by one).
    # Measured on the embedded Hopper data (80k transitions): see docs/benchmarks.md, "Main job".
    "quick": dict(
        # 3k steps left the behaviour model unconverged: with 30k it reaches its data's level on HalfCheetah-v5 medium
        # (benchmarks/offline_suite.py, docs/benchmarks.md); the behaviour model is UEPO's default offline result
        behavior_steps=30_000,
        # 3k steps left the critics too rough to rank actions: the refinement chose noise (10k: still on Walker2d
        # medium-replay) and the Uni-O4 preset's offline PPO lowered every member it improved (Hopper medium-replay
        # 18 -> 6.6); with 30k both gain (docs/benchmarks.md, "The critics' budget")
        iql_steps=30_000,
        # the Gaussian members (Uni-O4 preset) at a budget this small learn with a plain-BC learning rate
        gaussian_bc_steps=10_000,
        gaussian_bc_lr=1e-3,
        ppo_steps=400,
        ppo_batch_size=128,
        ppo_lr=3e-5,
        segment_batch_size=32,
        regularizer_interval=2,
        ope_interval=100,
        perturb_interval=100,
        ope_horizon=100,
        ope_n_starts=64,
        dynamics=dict(max_steps=1_000, eval_interval=250, patience=4, max_holdout=2_000),
        augmentation=dict(ratio=0.25, train_steps=1_000, reference_size=2_000),
    ),
    # CPU-friendly full run (tens of minutes to an hour on 2 cores).
    "default": {},
    # Full budgets, for a GPU (Uni-O4 / DPPO scale).
    "paper": dict(
        behavior_steps=200_000,
        behavior_batch_size=512,
        iql_steps=1_000_000,
        iql_batch_size=512,
        gaussian_bc_steps=400_000,
        ppo_steps=10_000,
        ppo_batch_size=512,
        ope_horizon=200,
        ope_n_starts=512,
        dynamics=dict(max_steps=200_000, patience=8),
        augmentation=dict(ratio=2.0, train_steps=100_000),
    ),
    # Uni-O4 baseline: Gaussian members by separate BC with its heuristic diversity term, no sequence divergence,
    # no perturbation, no KL to a diffusion model, no augmentation, OPE with mean Q (no dynamics model needed).
    "uni_o4": dict(
        policy_type="gaussian",
        uni_o4_diversity=True,
        use_divergence=False,
        use_perturbation=False,
        use_kl=False,
        augment=False,
        ope_score="mean_q",
        ppo_lr=1e-4,
        offline_improvement=True,
    ),
    # Plain behaviour cloning, the floor every offline result must clear: ONE Gaussian MLP (SB3 MlpPolicy's actor)
    # fitted by maximum likelihood, with a peer library's plain-BC settings (d3rlpy's BC: 10k steps, lr 1e-3,
    # batch 100), whatever the budget preset; no offline PPO, no dynamics model.
    "bc": dict(
        policy_type="gaussian",
        n_members=1,
        uni_o4_diversity=False,
        use_divergence=False,
        use_perturbation=False,
        use_kl=False,
        augment=False,
        ope_score="mean_q",
        gaussian_bc_steps=10_000,
        gaussian_bc_lr=1e-3,
        gaussian_bc_batch_size=100,
        ppo_steps=0,
    ),
}
BUDGET_PRESETS = ("quick", "default", "paper")
VARIANT_PRESETS = ("uni_o4", "bc")


def _coerce(value: Any, default: Any) -> Any:
    """YAML / JSON give lists where the config holds tuples."""
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _apply(target: Any, overrides: dict[str, Any], where: str) -> None:
    """Set ``overrides`` on a dataclass instance (recursing into nested configs); unknown keys raise."""
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            close = difflib.get_close_matches(head, sorted(names), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"Unknown offline config key '{where}{head}'.{hint} Valid keys: {', '.join(sorted(names))}.")
        current = getattr(target, head)
        if dataclasses.is_dataclass(current):
            if rest:
                _apply(current, {rest: value}, f"{where}{head}.")
            elif isinstance(value, dict):
                _apply(current, value, f"{where}{head}.")
            elif isinstance(value, type(current)):
                setattr(target, head, value)
            else:
                raise ValueError(f"Offline config key '{where}{head}' takes a dict of its fields, got {type(value).__name__}")
        elif rest:
            raise ValueError(f"Offline config key '{where}{head}' has no sub-keys (got {key!r})")
        else:
            setattr(target, head, _coerce(value, current))


def resolve_offline_config(
    preset: str | OfflineConfig | None = "default", overrides: dict[str, Any] | None = None
) -> OfflineConfig:
    """Build an :class:`OfflineConfig` from a preset name and overrides.

    :param preset: ``"quick"``, ``"default"``, ``"paper"``, ``"uni_o4"``, a combination ``"quick+uni_o4"``
        (applied left to right), an existing config (copied), or None (``"default"``)
    :param overrides: field values on top of the preset; nested configs by dict (``{"dynamics": {"max_steps": 10}}``)
        or dotted key (``{"dynamics.max_steps": 10}``)
    :return: the validated config
    """
    if isinstance(preset, OfflineConfig):
        config = dataclasses.replace(
            preset, dynamics=dataclasses.replace(preset.dynamics), augmentation=dataclasses.replace(preset.augmentation)
        )
    else:
        config = OfflineConfig()
        for name in (preset or "default").split("+"):
            name = name.strip()
            if name not in PRESETS:
                raise ValueError(
                    f"Unknown offline preset {name!r}. Known presets: {', '.join(PRESETS)} "
                    "(combine a budget and a variant with '+', e.g. 'quick+uni_o4')."
                )
            _apply(config, PRESETS[name], "")
    _apply(config, dict(overrides or {}), "")
    return config.validate()


# ---------------------------------------------------------------------------------------------- stage helpers
_ACTIVATION_CLASSES: dict[str, type[nn.Module]] = dict(tanh=nn.Tanh, relu=nn.ReLU, mish=nn.Mish, silu=nn.SiLU, elu=nn.ELU)


def activation_class(name: str) -> type[nn.Module]:
    """The ``torch.nn`` class of an activation name of :data:`ACTIVATIONS` (``"tanh"`` -> ``nn.Tanh``)."""
    try:
        return _ACTIVATION_CLASSES[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; use one of {ACTIVATIONS}") from None


def activation_name(activation_fn: type[nn.Module]) -> str:
    """The name in :data:`ACTIVATIONS` of an activation class (``nn.Tanh`` -> ``"tanh"``)."""
    for name, cls in _ACTIVATION_CLASSES.items():
        if activation_fn is cls:
            return name
    raise ValueError(
        f"pretraining supports the activations {', '.join(c.__name__ for c in _ACTIVATION_CLASSES.values())}, "
        f"got {activation_fn.__name__}"
    )


def log_values(logger: Any, prefix: str, values: dict[str, float], step: int) -> None:
    """Record ``values`` under ``prefix/`` on an SB3 logger (``record`` / ``dump``) and dump them at ``step``."""
    if logger is None:
        return
    for key, value in values.items():
        logger.record(f"{prefix}/{key}", value)
    logger.dump(step=step)


# Set in the worker processes of stages run side by side (``parallel.py``): their bars are drawn by the parent.
progress_bar_factory: Callable[[int, bool, str], Any] | None = None


def tqdm_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar of ``total`` steps (disabled when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False, dynamic_ncols=True)


def make_progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A stage's progress bar of ``total`` steps (disabled when ``enabled`` is False): a tqdm bar, or in a worker
    process of stages run side by side, one that the parent process draws."""
    if progress_bar_factory is not None:
        return progress_bar_factory(total, enabled, desc)
    return tqdm_bar(total, enabled, desc)
