"""Diffusion core shared by the online policy and every offline stage.

Three things are kept apart, as in real-stanford/diffusion_policy:

* the noise schedule (:func:`cosine_beta_schedule`, :class:`NoiseSchedule`): pure formulas, tensors are buffers;
* the denoiser network (:class:`Denoiser`): ``forward(x, k, cond) -> eps``;
* the chain sampler (:class:`ChainSampler`): samples a denoising chain and scores it. It takes the denoiser
  as an ``eps_fn`` argument, so the same sampler serves one policy, a stacked ensemble of members
  (``torch.func.vmap``) or a frozen copy.

As in DPPO (Ren et al. 2024), a denoising chain is treated as a policy: every sampling step is a Gaussian
``x_{j+1} ~ N(mu_theta(x_j, k_j, s), sigma_j^2)`` with ``sigma_j`` floored at ``min_std``, so
``log pi(chain | s) = sum_j log N(x_{j+1}; mu_j, sigma_j^2)`` is tractable. The initial noise ``x_0 ~ N(0, I)``
does not depend on the parameters and is left out of the log-probability.

Shape symbols: ``B`` batch, ``A`` action dimension, ``C`` conditioning (observation) dimension,
``K`` training diffusion steps, ``S`` sampling steps; a chain is ``(B, S + 1, A)`` with ``chain[:, 0]`` the
initial noise and ``chain[:, -1]`` the action (in [-1, 1] after clipping by the caller).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- schedule
def cosine_beta_schedule(n_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021), float64.

    ``alpha_bar(t) = cos^2(((t / K) + s) / (1 + s) * pi / 2)`` and ``beta_k = 1 - alpha_bar(k + 1) / alpha_bar(k)``,
    clipped to ``max_beta`` so that the last step stays invertible.

    :param n_steps: number of diffusion steps ``K``
    :param s: small offset that keeps ``beta_0`` away from zero
    :param max_beta: upper clip of every ``beta_k``
    :return: (K,) betas
    """
    t = torch.linspace(0, n_steps, n_steps + 1, dtype=torch.float64)
    alpha_bar = torch.cos(((t / n_steps) + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


class NoiseSchedule(nn.Module):
    """Forward process ``q(x_k | x_0) = N(sqrt(abar_k) x_0, (1 - abar_k) I)`` on a cosine schedule.

    :param n_train_steps: number of diffusion steps ``K`` the denoiser is trained on
    """

    alphas_cumprod: torch.Tensor
    betas: torch.Tensor

    def __init__(self, n_train_steps: int = 20) -> None:
        super().__init__()
        if n_train_steps < 1:
            raise ValueError(f"n_train_steps must be >= 1, got {n_train_steps}")
        self.n_train_steps = n_train_steps
        betas = cosine_beta_schedule(n_train_steps)
        # abar_k = prod_{i <= k} (1 - beta_i)
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0).float())

    def alpha_bar(self, k: torch.Tensor) -> torch.Tensor:
        """``abar_k`` with the convention ``abar_{-1} = 1`` (clean data)."""
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return padded[k + 1]

    def q_sample(self, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noised sample ``x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps`` for (B,) step indices ``k``."""
        abar = self.alpha_bar(k).unsqueeze(-1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_k: torch.Tensor, k: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert the forward process: ``x_0 = (x_k - sqrt(1 - abar_k) eps) / sqrt(abar_k)``."""
        abar = self.alpha_bar(k).unsqueeze(-1)
        return (x_k - (1 - abar).sqrt() * eps) / abar.sqrt()

    def training_loss(self, eps_fn: EpsFn, x0: torch.Tensor, cond: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """Epsilon-prediction loss ``|| eps - eps_theta(x_k, k, s) ||^2`` with ``k`` uniform in ``[0, K)``.

        :param eps_fn: the denoiser
        :param x0: (B, A) clean actions in [-1, 1]
        :param cond: (B, C) conditioning
        :param reduce: mean over everything (True) or per sample (B,)
        """
        k = torch.randint(0, self.n_train_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        pred = eps_fn(self.q_sample(x0, k, noise), k, cond)
        loss = F.mse_loss(pred, noise, reduction="none").mean(-1)
        return loss.mean() if reduce else loss


# ---------------------------------------------------------------------------------------------- network
class _MishFunction(torch.autograd.Function):
    """Mish with one exponential: ``tanh(softplus(x)) = n / (n + 2)`` with ``n = e^x (e^x + 2)``, and the derivative
    ``t + x (1 - t^2) sigmoid(x)`` from the saved ``t``. Equal to ``F.mish`` and its backward up to float rounding
    (``tests/test_diffusion.py``). On training batches its forward and backward take about 60 % of the time of
    PyTorch's CPU kernel (which evaluates softplus, tanh and sigmoid again in the backward): 2-13 % of a whole update
    or behaviour step (``benchmarks/mish_speed.py``). Returns ``t`` as a second,
    non-differentiable output because ``torch.func`` (the members' ``vmap``) only lets a function save its inputs
    and outputs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        e = x.clamp(max=20.0).exp_()  # tanh(softplus(x)) is 1 in float32 beyond 20
        n = (e + 2.0).mul_(e)
        t = n / (n + 2.0)
        return x * t, t

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def, override]
        (x,) = inputs
        _, t = output
        ctx.save_for_backward(x, t)
        ctx.mark_non_differentiable(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_t: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def, override]
        x, t = ctx.saved_tensors
        derivative = (1.0 - t * t).mul_(torch.sigmoid(x)).mul_(x).add_(t)
        return grad * derivative


class Mish(nn.Mish):
    """``nn.Mish`` whose training pass (autograd on) runs :class:`_MishFunction`; without autograd, and inside
    TorchScript traces, it is PyTorch's own kernel (faster at the small batches of acting). Same module otherwise (no
    parameters, same ``state_dict``); the denoiser uses it whenever it is asked for ``nn.Mish``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # not ``input.requires_grad``: inside the members' vmap a batched tensor reports False
        if torch.is_grad_enabled() and not torch.jit.is_tracing():
            return _MishFunction.apply(input)[0]
        return F.mish(input)


def _activation(activation_fn: type[nn.Module]) -> nn.Module:
    """An instance of ``activation_fn``, with :class:`Mish` standing in for ``nn.Mish``."""
    return Mish() if activation_fn is nn.Mish else activation_fn()


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of integer diffusion steps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=k.device, dtype=torch.float32) / max(half - 1, 1))
        angles = k.float().unsqueeze(-1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Denoiser(nn.Module):
    """State-conditioned noise predictor ``eps_theta(x_k, k, s)``: an MLP over ``[x_k, emb(k), s]``.

    :param action_dim: dimension of the denoised variable (action, or action chunk flattened)
    :param cond_dim: dimension of the conditioning (normalised observation)
    :param hidden_sizes: widths of the hidden layers
    :param time_embed_dim: width of the diffusion-step embedding
    :param activation_fn: activation class
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        hidden_sizes: tuple[int, ...] | list[int] = (256, 256, 256),
        time_embed_dim: int = 32,
        activation_fn: type[nn.Module] = nn.Mish,
    ) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.cond_dim = cond_dim
        self.time_embed = nn.Sequential(
            SinusoidalEmbedding(time_embed_dim),
            nn.Linear(time_embed_dim, 2 * time_embed_dim),
            _activation(activation_fn),
            nn.Linear(2 * time_embed_dim, time_embed_dim),
        )
        layers: list[nn.Module] = []
        in_dim = action_dim + time_embed_dim + cond_dim
        for width in hidden_sizes:
            layers += [nn.Linear(in_dim, width), _activation(activation_fn)]
            in_dim = width
        layers.append(nn.Linear(in_dim, action_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, k: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """:param x: (B, A) noised actions; :param k: (B,) step indices; :param cond: (B, C); :return: (B, A) eps."""
        if k.dim() == 0:
            k = k.expand(x.shape[0])
        return self.net(torch.cat([x, self.time_embed(k), cond], dim=-1))

    # ------------------------------------------------------------------------------------------ lean chain path
    def prepare(self, cond: torch.Tensor, timesteps: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What a denoising chain can compute once: the first layer's contribution of the observation and of each
        step's embedding, ``W_t emb(k_j) + W_c s + b``, so that each step only adds ``W_x x_j``.

        :param cond: (B, C) conditioning
        :param timesteps: (S,) the chain's step indices
        :return: per step, ``(W_x, (B, H) bias)`` for :meth:`step_eps`
        """
        w_x, base, step_terms = self._first_layer_terms(cond, timesteps)
        w_x_t = w_x.t()
        return [(w_x_t, base + step_terms[j]) for j in range(timesteps.shape[0])]

    def steps_eps(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``eps_theta`` of several steps of the same chains at once, e.g. to score stored chains: equal to
        :meth:`forward` on the flattened rows up to float rounding, but the first layer's observation term is computed
        once per chain and the step embedding once per step (not once per row).

        :param x: (B, n, A) the chains' points
        :param timesteps: (n,) the step index of each column
        :param cond: (B, C) conditioning
        :return: (B, n, A) eps
        """
        w_x, base, step_terms = self._first_layer_terms(cond, timesteps)
        return self._after_first_layer(F.linear(x, w_x) + base.unsqueeze(1) + step_terms)

    def step_eps(self, x: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``eps_theta(x, k_j, s)`` from :meth:`prepare`'s entry of step ``j``, calling the layers' ``forward`` directly
        (no module dispatch per layer); equal to :meth:`forward` up to float rounding."""
        w_x_t, bias = prepared
        return self._after_first_layer(torch.addmm(bias, x, w_x_t))

    def _first_layer_terms(
        self, cond: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first layer split by its inputs ``[x, emb(k), s]``: ``W_x`` (H, A), the observation term ``W_c s + b``
        (B, H) and the step terms ``W_t emb(k_j)`` (S, H). Not cached between calls: an optimizer may change the weights
        in place without any trace a cache could check (PyTorch's fused Adam leaves ``Tensor._version`` unchanged), and
        the traced acting paths recompute them inside the trace anyway."""
        first = self.net[0]
        assert isinstance(first, nn.Linear)
        a, e = self.action_dim, self.time_embed[0].dim  # type: ignore[union-attr]
        w_x, w_t, w_c = first.weight[:, :a], first.weight[:, a : a + e], first.weight[:, a + e :]
        return w_x, F.linear(cond, w_c, first.bias), F.linear(self.time_embed(timesteps), w_t)

    def _after_first_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layers after the first, through their ``forward`` directly (no module dispatch per layer)."""
        for layer in list(self.net)[1:]:
            hidden = layer.forward(hidden)
        return hidden


# ---------------------------------------------------------------------------------------------- sampler
class ChainSampler(nn.Module):
    """Samples denoising chains with ``S`` steps and scores them as Gaussian policies.

    DDIM (eta = 0) gives the mean ``mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat``; DDPM gives the
    posterior mean of ``q(x_prev | x_k, x0_hat)`` on the (possibly respaced) steps. ``x0_hat`` is clipped to
    [-1, 1] before either (DPPO's ``denoised_clip_value``). The step std is ``max(sigma_posterior, min_std)``
    for DDPM and ``min_std`` for DDIM; exploration noise ``z`` is clipped to ``+-noise_clip``.

    :param schedule: the forward process the denoiser was trained on
    :param n_sampling_steps: number of denoising steps ``S`` used for acting (``<= K``)
    :param sampler: ``"ddim"`` or ``"ddpm"``
    :param min_std: floor of every step's std (log-probs and stochastic sampling)
    :param noise_clip: clip of the standard normal exploration noise
    """

    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    step_std: torch.Tensor

    def __init__(
        self,
        schedule: NoiseSchedule,
        n_sampling_steps: int = 5,
        sampler: str = "ddim",
        min_std: float = 0.1,
        noise_clip: float = 3.0,
    ) -> None:
        super().__init__()
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        n_train = schedule.n_train_steps
        if not 1 <= n_sampling_steps <= n_train:
            raise ValueError(f"n_sampling_steps must be in [1, {n_train}] (the training steps), got {n_sampling_steps}")
        if min_std <= 0:
            raise ValueError(f"min_std must be > 0 so that chain log-probabilities are finite, got {min_std}")
        self.schedule = schedule
        self.n_sampling_steps = n_sampling_steps
        self.sampler = sampler
        self.min_std = min_std
        self.noise_clip = noise_clip
        # Evenly spaced steps from the noisiest (k = K - 1, where x ~ N(0, I)) down to k = 0:
        # e.g. K = 20, S = 5 -> [19, 14, 10, 5, 0]; S = K gives every step (plain DDPM / DDIM).
        ks = torch.linspace(n_train - 1, 0, n_sampling_steps).round().long()
        prev = torch.cat([ks[1:], ks.new_full((1,), -1)])
        self.register_buffer("timesteps", ks.long())
        self.register_buffer("prev_timesteps", prev.long())
        abar = schedule.alpha_bar(ks)
        abar_prev = schedule.alpha_bar(prev)
        # Posterior variance of q(x_prev | x_k, x_0) on respaced steps:
        # (1 - abar_prev) / (1 - abar_k) * (1 - abar_k / abar_prev)
        posterior_var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        std = posterior_var.clamp(min=0).sqrt() if sampler == "ddpm" else torch.zeros_like(abar)
        self.register_buffer("step_std", std.clamp(min=min_std))
        # abar_k and abar_prev of each sampling step, looked up once here instead of at every step (derived from the
        # schedule, hence not saved in state dicts)
        self.register_buffer("step_alpha_bar", abar.clone(), persistent=False)
        self.register_buffer("step_alpha_bar_prev", abar_prev.clone(), persistent=False)
        # The constants of every step's mean (_step_coefficients), once: as Python floats for the sampling loop (one
        # step for the whole batch) and as a (S, 4) buffer for scoring stored chains (a step per row); derived, not saved
        self._step_coefficients = [
            _step_coefficients(float(a), float(b), sampler) for a, b in zip(abar, abar_prev, strict=True)
        ]
        self.register_buffer(
            "step_mean_coefficients", torch.tensor(self._step_coefficients, dtype=torch.float32), persistent=False
        )
        self._step_std_values = [float(v) for v in self.step_std]

    # -------------------------------------------------------------------------------------- means
    def step_mean(self, x: torch.Tensor, step: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Mean of the Gaussian of sampling step ``step`` (index into the S steps, shape (B,)):
        ``x0 = clip((x - sqrt(1 - abar) eps) / sqrt(abar), -1, 1)``, then ``mean = a x0 + b x``
        (:func:`_step_coefficients`)."""
        c = self.step_mean_coefficients[step]  # (B, 4)
        x0 = ((x - c[:, 0:1] * eps) * c[:, 1:2]).clamp(-1.0, 1.0)
        return c[:, 2:3] * x0 + c[:, 3:4] * x

    def _sampling_step_mean(self, x: torch.Tensor, j: int, eps: torch.Tensor) -> torch.Tensor:
        """:meth:`step_mean` of ONE step ``j`` for the whole batch, with the same constants as Python floats (fewer
        tensor operations in the sampling loop; equal up to float rounding)."""
        eps_coef, inv_sqrt_abar, a, b = self._step_coefficients[j]
        x0 = (torch.add(x, eps, alpha=-eps_coef) * inv_sqrt_abar).clamp(-1.0, 1.0)
        return torch.add(x0 * a, x, alpha=b)

    # -------------------------------------------------------------------------------------- sampling
    def sample_chain(
        self,
        eps_fn: EpsFn,
        cond: torch.Tensor,
        x_init: torch.Tensor | None = None,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
        first_noisy_step: int = 0,
    ) -> torch.Tensor:
        """Run the S denoising steps.

        :param eps_fn: the denoiser
        :param cond: (B, C) conditioning
        :param x_init: (B, A) or (A,) initial noise; drawn from N(0, I) when None
        :param deterministic: no exploration noise between steps (DDIM eta = 0 when ``sampler="ddim"``)
        :param generator: torch generator for the noise (reproducible sampling)
        :param first_noisy_step: the steps before it take their mean (no exploration noise) even when not
            ``deterministic``, e.g. the frozen steps of a policy that fine-tunes only the last ones
        :return: (B, S + 1, A) chain, unclipped; the action is ``chain[:, -1]``
        """
        return self._run_chain(eps_fn, cond, x_init, deterministic, generator, False, first_noisy_step)[0]

    def sample_chain_with_log_prob(
        self,
        eps_fn: EpsFn,
        cond: torch.Tensor,
        x_init: torch.Tensor | None = None,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
        first_noisy_step: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample_chain` that also returns the chain's per-step log-densities, computed from the noise drawn
        while sampling (``x_{j+1} = mu_j + sigma_j z_j`` gives ``log N = -z_j^2 / 2 - log sigma_j - log(2 pi) / 2`` per
        dim), so no second denoiser pass is needed. Equal to :meth:`chain_log_prob` of the returned chain up to float
        rounding. A step without noise (``deterministic``, or before ``first_noisy_step``) gets the density of its
        mean, ``-A (log sigma_j + log(2 pi) / 2)``.

        :return: (B, S + 1, A) chain and (B, S) per-step log-densities summed over action dims
        """
        chain, log_prob = self._run_chain(eps_fn, cond, x_init, deterministic, generator, True, first_noisy_step)
        assert log_prob is not None
        return chain, log_prob

    def _run_chain(
        self,
        eps_fn: EpsFn,
        cond: torch.Tensor,
        x_init: torch.Tensor | None,
        deterministic: bool,
        generator: torch.Generator | None,
        with_log_prob: bool,
        first_noisy_step: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, noise = self.draw_noise(eps_fn, cond, x_init, deterministic, generator, first_noisy_step)
        return self.chain_from_noise(eps_fn, cond, x, noise, with_log_prob)

    def noisy_steps(self, deterministic: bool, first_noisy_step: int = 0) -> list[int]:
        """The sampling steps that add exploration noise: none when ``deterministic``, else ``first_noisy_step .. S - 1``."""
        return [] if deterministic else list(range(first_noisy_step, self.n_sampling_steps))

    def draw_noise(
        self,
        eps_fn: EpsFn,
        cond: torch.Tensor,
        x_init: torch.Tensor | None,
        deterministic: bool,
        generator: torch.Generator | None = None,
        first_noisy_step: int = 0,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Every random draw of one batch of chains, in the order :meth:`sample_chain` has always made them (the
        initial noise, then one clipped ``N(0, I)`` per noisy step), so that :meth:`chain_from_noise` (or a trace of it)
        gives the chains of the same seed.

        :return: (B, A) initial noise and, per sampling step, its (B, A) clipped noise or None (the step takes its mean)
        """
        batch = cond.shape[0]
        action_dim = self._action_dim(eps_fn, x_init)
        if x_init is None:
            x = torch.randn(batch, action_dim, device=cond.device, generator=generator)
        else:
            x = x_init.expand(batch, action_dim).to(cond.device)
        noisy = set(self.noisy_steps(deterministic, first_noisy_step))
        noise: list[torch.Tensor | None] = [
            (
                torch.randn(batch, action_dim, device=cond.device, generator=generator).clamp(
                    -self.noise_clip, self.noise_clip
                )
                if j in noisy
                else None
            )
            for j in range(self.n_sampling_steps)
        ]
        return x, noise

    def chain_from_noise(
        self,
        eps_fn: EpsFn,
        cond: torch.Tensor,
        x: torch.Tensor,
        noise: list[torch.Tensor | None],
        with_log_prob: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chains (and per-step log-densities) of given draws (:meth:`draw_noise`): a pure function of its inputs.

        :param x: (B, A) initial noise
        :param noise: per sampling step, (B, A) clipped standard-normal noise, or None for a step that takes its mean
        :return: (B, S + 1, A) chain and (B, S) per-step log-densities summed over action dims (None unless
            ``with_log_prob``)
        """
        batch = cond.shape[0]
        chain = [x]
        log_probs = []
        # a denoiser that can precompute its per-chain terms (Denoiser.prepare) runs only W_x x per step
        prepared = eps_fn.prepare(cond, self.timesteps) if hasattr(eps_fn, "prepare") else None
        for j in range(self.n_sampling_steps):
            if prepared is not None:
                eps = eps_fn.step_eps(x, prepared[j])  # type: ignore[attr-defined]
            else:
                eps = eps_fn(x, self.timesteps[j].expand(batch), cond)
            mean = self._sampling_step_mean(x, j, eps)
            z = noise[j]
            x = mean if z is None else mean + self._step_std_values[j] * z
            chain.append(x)
            if with_log_prob:  # log N(x; mean, sigma_j^2) with (x - mean) / sigma_j = z, summed over dims
                log_norm = mean.shape[-1] * (math.log(self._step_std_values[j]) + 0.5 * math.log(2 * math.pi))
                if z is None:
                    log_probs.append(mean.new_full((batch,), -log_norm))
                else:
                    log_probs.append(-0.5 * (z**2).sum(-1) - log_norm)
        return torch.stack(chain, dim=1), torch.stack(log_probs, dim=1) if with_log_prob else None

    @staticmethod
    def _action_dim(eps_fn: EpsFn, x_init: torch.Tensor | None) -> int:
        if x_init is not None:
            return int(x_init.shape[-1])
        dim = getattr(eps_fn, "action_dim", None)
        if dim is None:
            raise ValueError("eps_fn has no 'action_dim' attribute: pass x_init to fix the action dimension")
        return int(dim)

    # -------------------------------------------------------------------------------------- scoring
    def chain_means(self, eps_fn: EpsFn, chain: torch.Tensor, cond: torch.Tensor, first_step: int = 0) -> torch.Tensor:
        """Means of the steps ``first_step .. S - 1`` of a given chain in ONE batched denoiser call.

        :param chain: (B, S + 1, A)
        :param cond: (B, C)
        :param first_step: the first step scored (e.g. ``S - K`` when only the last ``K`` steps are fine-tuned)
        :return: (B, S - first_step, A) means ``mu_j`` of ``x_{j+1}`` given ``x_j``
        """
        batch, n_plus_one, action_dim = chain.shape
        n_steps = n_plus_one - 1 - first_step
        step = torch.arange(first_step, first_step + n_steps, device=chain.device).repeat(batch)
        if hasattr(eps_fn, "steps_eps"):  # Denoiser: per-chain and per-step terms once (Denoiser.steps_eps)
            eps = eps_fn.steps_eps(chain[:, first_step:-1], self.timesteps[first_step:], cond)  # type: ignore[attr-defined]
            eps = eps.reshape(batch * n_steps, action_dim)
            x = chain[:, first_step:-1].reshape(batch * n_steps, action_dim)
        else:
            x = chain[:, first_step:-1].reshape(batch * n_steps, action_dim)
            eps = eps_fn(x, self.timesteps[step], cond.repeat_interleave(n_steps, dim=0))
        return self.step_mean(x, step, eps).reshape(batch, n_steps, action_dim)

    def chain_log_prob(self, eps_fn: EpsFn, chain: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per-step Gaussian log-densities ``log N(x_{j+1}; mu_j, sigma_j^2)`` summed over action dims.

        :return: (B, S); sum over the last axis for ``log pi(chain | s)``
        """
        return self.log_prob_from_means(chain, self.chain_means(eps_fn, chain, cond))

    def log_prob_from_means(self, chain: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """Per-step log-densities of a chain given its step means (from :meth:`chain_means`), so that a caller
        who also needs the means (e.g. for a KL between policies) runs the denoiser only once.

        :param chain: (B, S + 1, A)
        :param means: (B, S', A) the means of the LAST ``S'`` steps (``S' = S`` for the whole chain)
        :return: (B, S') ``log N(x_{j+1}; mu_j, sigma_j^2)`` summed over action dims
        """
        n_steps = means.shape[1]
        std = self.step_std[-n_steps:].view(1, -1, 1)
        log_density = -0.5 * ((chain[:, -n_steps:] - means) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)
        return log_density.sum(-1)


def _step_coefficients(abar: float, abar_prev: float, sampler: str) -> tuple[float, float, float, float]:
    """The constants ``(sqrt(1 - abar), 1 / sqrt(abar), a, b)`` of one sampling step's mean ``a x0 + b x``, where
    ``x0 = clip((x - sqrt(1 - abar) eps) / sqrt(abar), -1, 1)``, from ``abar_k`` and ``abar_prev``.

    DDIM: ``sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps'`` with ``eps' = (x - sqrt(abar) x0) / sqrt(1 - abar)`` (the
    noise consistent with the clipped ``x0``), collected per ``x0`` and ``x``. DDPM: the posterior mean of
    ``q(x_prev | x_k, x0)`` on the respaced steps.
    """
    if sampler == "ddim":
        b = math.sqrt(1 - abar_prev) / math.sqrt(1 - abar)
        a = math.sqrt(abar_prev) - b * math.sqrt(abar)
    else:
        alpha = abar / abar_prev  # respaced single-step alpha
        a = math.sqrt(abar_prev) * (1 - alpha) / (1 - abar)
        b = math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
    return math.sqrt(1 - abar), 1.0 / math.sqrt(abar), a, b
