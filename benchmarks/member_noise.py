"""How much a diffusion member's real score depends on its seed noise, and whether OPE ranks the members (issue 4).

Runs (or resumes, with ``--pretrain-dir``) UEPO's offline phase, then, in the REAL environment, evaluates the behaviour
diffusion model acting deterministically from zero noise and from each member's seed noise (the members start as the
behaviour model with these noises), and stochastically (fresh noise per action). Then scores the same members by the
OPE of the pipeline at several model-rollout horizons, from any dataset state and from episode starts, and prints the
rank correlation with the real scores.

Numbers in docs/benchmarks.md come from:

    python benchmarks/member_noise.py --pretrain-dir bench_results/pretrain_hopper_s0 --horizons 30 100 200
"""

from __future__ import annotations

import argparse

import numpy as np
import torch as th


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--dataset", default="hopper-medium-v0")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--horizons", type=int, nargs="+", default=[30, 100])
    parser.add_argument("--pretrain-dir", default=None, help="stage checkpoints: reused when present")
    args = parser.parse_args(argv)
    th.set_num_threads(1)

    from sb3_uepo import UEPO
    from sb3_uepo.common.datasets import load_dataset
    from sb3_uepo.common.evaluation import evaluate
    from sb3_uepo.common.offline.behavior import make_sampler
    from sb3_uepo.common.offline.members import make_diffusion_members
    from sb3_uepo.common.offline.ope import offline_policy_evaluation
    from sb3_uepo.common.offline.pipeline import OfflinePretrainer

    dataset = load_dataset(args.dataset)
    model = UEPO("DiffusionPolicy", args.env, dataset=dataset, preset=args.preset, seed=args.seed)
    config = model.offline_config()
    pretrainer = OfflinePretrainer(
        dataset, model.observation_space, model.action_space, config, checkpoint_dir=args.pretrain_dir, env_id=args.env
    )
    result = pretrainer.run()
    members = make_diffusion_members(
        pretrainer.outputs["behavior"], make_sampler(config), config.n_members, config.seed + 10, config.member_noise
    )  # the members as the pipeline creates them (before offline PPO): the behaviour model + each seed noise
    noises = members.seed_noise.detach().cpu().numpy()

    bc = UEPO("DiffusionPolicy", args.env, dataset=dataset, preset=args.preset, seed=args.seed)
    bc.load_offline_result(result, member="behavior")
    kwargs = dict(n_episodes=args.episodes, seed=10_000 + args.seed, dataset=dataset)
    print(f"{args.env} / {args.dataset}, preset {args.preset}, seed {args.seed}: behaviour diffusion model in the real env")
    stochastic = evaluate(bc, args.env, deterministic=False, **kwargs)
    print(f"  stochastic (fresh noise)      {stochastic.summary()}")
    bc.policy.set_deterministic_noise(np.zeros(noises.shape[1], dtype=np.float32))
    print(f"  deterministic, zero noise     {evaluate(bc, args.env, deterministic=True, **kwargs).summary()}")
    real = []
    for i, noise in enumerate(noises):
        bc.policy.set_deterministic_noise(noise)
        evaluation = evaluate(bc, args.env, deterministic=True, **kwargs)
        real.append(evaluation.normalized_mean)
        print(f"  deterministic, member {i} noise {evaluation.summary()}  noise {np.round(noise, 2).tolist()}")

    def act(obs: th.Tensor) -> th.Tensor:
        return members.sample_chains(obs, None, deterministic=True)[:, :, -1].clamp(-1.0, 1.0)

    data, termination = pretrainer.data, pretrainer.termination_fn()
    episode_starts = th.nonzero(data.episode_starts).flatten()
    print(
        f"OPE scores of the same members (real normalised scores: {np.round(real, 1).tolist()}; chosen by the run: "
        f"member {result.chosen_member})"
    )
    for start in ("any state", "episode starts"):
        generator = th.Generator().manual_seed(config.seed + 7)
        pool = th.arange(data.obs.shape[0]) if start == "any state" else episode_starts
        index = pool[th.randint(0, len(pool), (config.ope_n_starts,), generator=generator)]
        for horizon in args.horizons:
            with th.no_grad():
                scores, info = offline_policy_evaluation(
                    pretrainer.outputs["dynamics"],
                    act,
                    data.obs[index],
                    horizon,
                    config.gamma,
                    value_fn=pretrainer.outputs["iql"].value,
                    termination_fn=termination,
                    generator=th.Generator().manual_seed(config.seed + 8),
                    n_members=config.n_members,
                    return_info=True,
                )
            rho = np.corrcoef(np.argsort(np.argsort(scores.numpy())), np.argsort(np.argsort(real)))[0, 1]  # Spearman
            alive = 1.0 - info["terminated_fraction"].numpy()
            rho_alive = np.corrcoef(np.argsort(np.argsort(alive)), np.argsort(np.argsort(real)))[0, 1]
            print(
                f"  from {start:14s} horizon {horizon:4d}: scores {np.round(scores.numpy(), 1).tolist()} (Spearman vs real "
                f"{rho:+.2f}); survived to H {np.round(alive, 2).tolist()} (Spearman vs real {rho_alive:+.2f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
