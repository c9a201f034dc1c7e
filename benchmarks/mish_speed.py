"""What the denoiser's one-exponential Mish saves: the same work timed with it and with PyTorch's ``F.mish``, alternating.

Two workloads, one torch thread, medians over alternating repeats in one process (so load changes hit both alike):

* ``update``: one chain-PPO update (``UEPO.train``) on a collected Hopper-v5 rollout (8 envs x 256 steps, 5 DDIM steps,
  the last 2 fine-tuned), at PPO's batch/epochs (64, 10) and at the fine-tuning ones (512, 5);
* ``behaviour``: gradient steps of the behaviour model's loss (a 3 x 256 denoiser, batch 256, fused Adam), the stage
  that takes most of the offline phase.

    nice python benchmarks/mish_speed.py          # numbers in docs/benchmarks.md, "Online throughput"
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch as th
import torch.nn.functional as F
from stable_baselines3.common.env_util import make_vec_env

import sb3_uepo  # noqa: F401  (installs the MuJoCo log hook)
from sb3_uepo.common import diffusion
from sb3_uepo.common.io import write_json
from sb3_uepo.uepo import UEPO

FAST = diffusion.Mish.forward


def _native(self: Any, input: th.Tensor) -> th.Tensor:
    return F.mish(input)


def alternate(work: Callable[[], None], repeats: int) -> dict[str, float]:
    """Median seconds of ``work`` with the denoiser's Mish and with ``F.mish``, in alternating order."""
    times: dict[str, list[float]] = {"one_exp": [], "native": []}
    try:
        for index in range(repeats):
            order = [("one_exp", FAST), ("native", _native)]
            for name, forward in order if index % 2 == 0 else reversed(order):
                diffusion.Mish.forward = forward  # type: ignore[method-assign]
                start = time.perf_counter()
                work()
                times[name].append(time.perf_counter() - start)
    finally:
        diffusion.Mish.forward = FAST  # type: ignore[method-assign]
    return {name: statistics.median(values) for name, values in times.items()}


def update_work(batch_size: int, n_epochs: int, seed: int) -> Callable[[], None]:
    env = make_vec_env("Hopper-v5", n_envs=8, seed=seed)
    policy_kwargs = dict(n_sampling_steps=5, sampler="ddim", ft_denoising_steps=2)
    model = UEPO(
        "DiffusionPolicy",
        env,
        n_steps=256,
        batch_size=batch_size,
        n_epochs=n_epochs,
        seed=seed,
        device="cpu",
        policy_kwargs=policy_kwargs,
    )
    model.learn(model.n_steps * model.n_envs)  # one rollout (and one update) to train on
    return model.train


def behaviour_work(steps: int, seed: int) -> Callable[[], None]:
    th.manual_seed(seed)
    denoiser = diffusion.Denoiser(3, 11)
    schedule = diffusion.NoiseSchedule(20)
    optimizer = th.optim.Adam(denoiser.parameters(), lr=3e-4, fused=True)
    actions, observations = th.rand(256, 3) * 2 - 1, th.randn(256, 11)

    def work() -> None:
        for _ in range(steps):
            loss = schedule.training_loss(denoiser, actions, observations)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return work


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8, help="timed repeats per variant (alternating)")
    parser.add_argument("--behaviour-steps", type=int, default=200, help="gradient steps per behaviour repeat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    th.set_num_threads(1)
    results: dict[str, Any] = {}
    for name, work, per in (
        ("update, batch 64 x 10 epochs", update_work(64, 10, args.seed), 1),
        ("update, batch 512 x 5 epochs", update_work(512, 5, args.seed), 1),
        ("behaviour step, batch 256", behaviour_work(args.behaviour_steps, args.seed), args.behaviour_steps),
    ):
        times = alternate(work, args.repeats)
        row = {variant: 1000 * seconds / per for variant, seconds in times.items()}
        row["saved"] = 1 - row["one_exp"] / row["native"]
        results[name] = row
        print(f"{name:32s} one-exp {row['one_exp']:8.2f} ms   F.mish {row['native']:8.2f} ms   saved {row['saved']:.0%}")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
