"""Which offline score ranks diffusion members like the real environment does? (the member choice)

With ``member_noise="seed"`` UEPO's members share one behaviour model and differ by their seed noise, and a member's
real score depends strongly on that noise (docs/algorithm.md). This script makes ``K`` candidate
policies (the behaviour model from ``K`` seed noises), scores each in the REAL environment (deterministic, batched:
all ``K x E`` episodes step together), and compares the offline scores the pipeline can compute without the env:

* model returns (``offline_policy_evaluation``) under several settings: start states (any dataset state or episode
  starts), horizon, discount with the IQL value closing the horizon (``gamma + V``) or the undiscounted sum, and
  MOPO's uncertainty penalty; the first row is the pipeline's setting before this study, the row marked ``*`` the
  current config (``OfflineConfig.ope_*``);
* ``mean_q``: ``mean Q_IQL(s, pi(s))`` over dataset states (Uni-O4's cheap OPE).

For each it prints the Spearman rank correlation with the real scores and the regret of choosing its argmax.
The stage checkpoints of ``--pretrain-dir`` are reused (run the pretraining once, then this script is minutes).

    python benchmarks/ope_ranking.py --pretrain-dir bench_results/ope_pretrain_s0 --seed 0
    python benchmarks/ope_ranking.py --pretrain-dir bench_results/ope_pretrain_s1 --seed 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch as th


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def real_scores(members, env_id: str, data, episodes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic real returns (K, E) and lengths of every candidate, all episodes stepped together."""
    import gymnasium as gym

    k = members.n_members
    envs = [gym.make(env_id) for _ in range(k * episodes)]
    obs = np.stack([env.reset(seed=seed + i % episodes)[0] for i, env in enumerate(envs)])
    returns, lengths = np.zeros(k * episodes), np.zeros(k * episodes, dtype=int)
    alive = np.ones(k * episodes, dtype=bool)
    low, high = data.action_low, data.action_high
    while alive.any():
        norm = th.as_tensor((obs - data.obs_mean) / data.obs_std, dtype=th.float32).reshape(k, episodes, -1)
        actions = members.act(norm, deterministic=True).reshape(k * episodes, -1).numpy()
        actions = low + 0.5 * (actions + 1.0) * (high - low)
        for i in np.flatnonzero(alive):
            o, r, terminated, truncated, _ = envs[i].step(actions[i])
            obs[i], returns[i], lengths[i] = o, returns[i] + r, lengths[i] + 1
            if terminated or truncated:
                alive[i] = False
    for env in envs:
        env.close()
    return returns.reshape(k, episodes), lengths.reshape(k, episodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--dataset", default="hopper-medium-v0")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--pretrain-dir", default=None, help="stage checkpoints: reused when present")
    parser.add_argument("--out", default=None, help="JSON file for the per-candidate numbers")
    args = parser.parse_args(argv)
    th.set_num_threads(1)

    from sb3_uepo import UEPO
    from sb3_uepo.common.datasets import load_dataset
    from sb3_uepo.common.datasets.scores import normalized_score
    from sb3_uepo.offline.behavior import make_sampler
    from sb3_uepo.offline.members import make_diffusion_members
    from sb3_uepo.offline.ope import offline_policy_evaluation
    from sb3_uepo.offline.pipeline import OfflinePretrainer

    dataset = load_dataset(args.dataset)
    model = UEPO("DiffusionPolicy", args.env, dataset=dataset, preset=args.preset, seed=args.seed)
    config = model.offline_config()
    pretrainer = OfflinePretrainer(
        dataset,
        model.observation_space,
        model.action_space,
        config,
        checkpoint_dir=args.pretrain_dir,
        env_id=args.env,
        progress_bar=False,
    )
    pretrainer.run()
    data, iql, dynamics = pretrainer.data, pretrainer.outputs["iql"], pretrainer.outputs["dynamics"]
    members = make_diffusion_members(
        pretrainer.outputs["behavior"], make_sampler(config), args.candidates, 5000 + 100 * args.seed, "seed"
    )

    start = time.perf_counter()
    returns, lengths = real_scores(members, args.env, data, args.episodes, 10_000 + args.seed)
    real = normalized_score(args.env, returns.mean(1), dataset)
    print(
        f"{args.env} / {args.dataset}, preset {args.preset}, seed {args.seed}: {args.candidates} candidates (behaviour model"
    )
    print(f"from K seed noises), {args.episodes} deterministic episodes each, {time.perf_counter() - start:.0f} s")
    print(f"  real normalised: {np.round(real, 1).tolist()}")
    print(f"  mean length:     {np.round(lengths.mean(1)).astype(int).tolist()}")

    def act(obs: th.Tensor) -> th.Tensor:
        return members.act(obs, deterministic=True)

    generator = th.Generator().manual_seed(config.seed + 7)
    pools = {"any": th.arange(data.obs.shape[0]), "episode_starts": th.nonzero(data.episode_starts).flatten()}
    starts = {k: pool[th.randint(0, len(pool), (config.ope_n_starts,), generator=generator)] for k, pool in pools.items()}
    termination = pretrainer.termination_fn()
    current = (
        config.ope_start_states,
        config.ope_horizon,
        config.ope_discount,
        config.ope_bootstrap,
        config.ope_uncertainty_penalty,
    )
    settings = [  # start states, horizon, discount, bootstrap with V, uncertainty penalty
        ("any", 30, config.gamma, True, 0.0),
        ("any", 100, 1.0, False, 0.0),
        ("episode_starts", 100, config.gamma, True, 0.0),
        ("episode_starts", 100, 1.0, False, 0.0),
        ("episode_starts", 100, 1.0, False, 1.0),
        ("episode_starts", 200, 1.0, False, 0.0),
        ("episode_starts", 200, 1.0, False, 1.0),
    ]
    if current not in settings:
        settings.append(current)
    scores: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    for where, horizon, discount, bootstrap, penalty in settings:
        out = offline_policy_evaluation(
            dynamics,
            act,
            data.obs[starts[where]],
            horizon,
            discount,
            value_fn=iql.value if bootstrap else None,
            termination_fn=termination,
            generator=th.Generator().manual_seed(config.seed + 8),
            n_members=args.candidates,
            uncertainty_penalty=penalty,
        )
        closing = f"gamma {discount} + V" if bootstrap else ("undiscounted" if discount == 1.0 else f"gamma {discount}")
        mark = "*" if (where, horizon, discount, bootstrap, penalty) == current else " "
        scores[f"{mark}{where}, H={horizon}, {closing}, lambda {penalty}"] = out.numpy()
    index = th.randint(0, data.obs.shape[0], (2048,), generator=generator)
    with th.no_grad():
        scores[" mean_q (any state)"] = (
            iql.q_min(data.obs[index].expand(args.candidates, -1, -1), act(data.obs[index])).mean(1).numpy()
        )
    print(f"  offline scores computed in {time.perf_counter() - start:.0f} s")

    best = float(real.max())
    print(f"  {'offline score':56s} {'Spearman':>8s} {'regret':>7s}  values")
    for name, s in scores.items():
        regret = best - float(real[int(np.argmax(s))])
        print(f"  {name:56s} {spearman(s, real):+8.2f} {regret:7.1f}  {np.round(s).astype(int).tolist()}")
    print(f"  (regret of a uniform random choice: {best - float(real.mean()):.1f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(real=real.tolist(), lengths=lengths.tolist(), scores={k: v.tolist() for k, v in scores.items()}), f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
