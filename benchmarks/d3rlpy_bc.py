"""A peer's behaviour cloning on the offline suite's datasets: d3rlpy's ``BC`` with its defaults.

This is the reference the project's own ``bc`` variant is checked against (same data, same number of gradient
steps, deterministic evaluation, normalised with the dataset's reference returns). d3rlpy pins its own gymnasium, so
it runs in a SEPARATE virtual environment and this script imports nothing from sb3_uepo: it reads the Minari HDF5
files that ``uepo data make`` writes directly.

    python -m venv venv_d3rlpy
    venv_d3rlpy/bin/pip install torch==2.13.0 && venv_d3rlpy/bin/pip install d3rlpy "gymnasium[mujoco]" h5py
    venv_d3rlpy/bin/python benchmarks/d3rlpy_bc.py --datasets datasets/hopper-medium-s1 datasets/walker2d-medium-s1 \\
        --seeds 0 1 2 --out benchmarks/results/d3rlpy_bc.json

d3rlpy's ``BCConfig()`` defaults: deterministic MLP policy (256, 256), Adam lr 1e-3, batch 100, no observation
scaler. ``--steps`` gradient steps (default 10,000, the project's ``bc`` variant's budget). Evaluation: ``--episodes``
deterministic episodes in the dataset's environment, seeded ``10_000 + seed + episode`` (the project's evaluation
seeds). Finished (dataset, seed) pairs are kept in ``--out`` (JSON, written atomically), so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

EVAL_SEED_OFFSET = 10_000  # as sb3_uepo.common.evaluation.EVAL_SEED_OFFSET


def load_minari_hdf5(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Transitions and metadata of a Minari dataset directory (``data/main_data.hdf5`` + ``data/metadata.json``)."""
    import h5py

    data_dir = path / "data" if (path / "data").is_dir() else path
    metadata = json.loads((data_dir / "metadata.json").read_text())
    fields: dict[str, list[np.ndarray]] = {"observations": [], "actions": [], "rewards": [], "terminals": [], "timeouts": []}
    with h5py.File(data_dir / "main_data.hdf5", "r") as handle:
        for name in sorted(handle, key=lambda key: int(key.split("_")[-1])):
            episode = handle[name]
            fields["observations"].append(np.asarray(episode["observations"])[:-1])
            fields["actions"].append(np.asarray(episode["actions"]))
            fields["rewards"].append(np.asarray(episode["rewards"]))
            terminations = np.asarray(episode["terminations"], dtype=bool)
            truncations = np.asarray(episode["truncations"], dtype=bool)
            fields["terminals"].append(terminations)
            # d3rlpy needs every episode to end: the last step of an episode cut by the dataset's size is a timeout
            timeouts = truncations.copy()
            if not (terminations[-1] or truncations[-1]):
                timeouts[-1] = True
            fields["timeouts"].append(timeouts)
    return {key: np.concatenate(values) for key, values in fields.items()}, metadata


def run_one(dataset_path: Path, seed: int, steps: int, episodes: int) -> dict[str, Any]:
    import d3rlpy
    import gymnasium as gym

    data, metadata = load_minari_hdf5(dataset_path)
    env_id = json.loads(metadata["env_spec"])["id"]
    dataset = d3rlpy.dataset.MDPDataset(
        observations=data["observations"].astype(np.float32),
        actions=data["actions"].astype(np.float32),
        rewards=data["rewards"].astype(np.float32),
        terminals=data["terminals"].astype(np.float32),
        timeouts=data["timeouts"].astype(np.float32),
    )
    d3rlpy.seed(seed)
    bc = d3rlpy.algos.BCConfig().create(device="cpu:0")
    start = time.perf_counter()
    bc.fit(
        dataset,
        n_steps=steps,
        n_steps_per_epoch=steps,
        show_progress=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    fit_s = time.perf_counter() - start
    env = gym.make(env_id)
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=EVAL_SEED_OFFSET + seed + episode)
        done, total = False, 0.0
        while not done:
            action = bc.predict(np.asarray(obs, dtype=np.float32)[None])[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    low, high = float(metadata["ref_min_score"]), float(metadata["ref_max_score"])
    normalized = [100.0 * (r - low) / (high - low) for r in returns]
    return {
        "env_id": env_id,
        "dataset": str(dataset_path),
        "seed": seed,
        "steps": steps,
        "return_mean": float(np.mean(returns)),
        "normalized_mean": float(np.mean(normalized)),
        "normalized_std": float(np.std(normalized)),
        "episodes": episodes,
        "fit_s": fit_s,
        "wall_s": time.perf_counter() - start,
        "d3rlpy": d3rlpy.__version__,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", required=True, help="Minari dataset directories (uepo data make)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=10_000, help="gradient steps (default 10,000)")
    parser.add_argument("--episodes", type=int, default=10, help="deterministic evaluation episodes (default 10)")
    parser.add_argument("--out", default="bench_results/d3rlpy_bc.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    for dataset in args.datasets:
        path = Path(dataset)
        if not (path / "data" / "main_data.hdf5").is_file() and not (path / "main_data.hdf5").is_file():
            raise SystemExit(f"{dataset}: no Minari HDF5 file (data/main_data.hdf5); make it with `uepo data make`")
        for seed in args.seeds:
            key = f"{path.name}|{seed}|{args.steps}|{args.episodes}"
            if key in results["runs"]:
                continue
            result = run_one(path, seed, args.steps, args.episodes)
            results["runs"][key] = result
            write_json(out, results)
            score, wall = result["normalized_mean"], result["wall_s"]
            print(f"{path.name} seed {seed}: normalised {score:.1f} ({wall:.0f} s)", flush=True)
    print()
    print("| dataset | d3rlpy BC (mean over seeds) | per seed |")
    print("|---|---|---|")
    for dataset in args.datasets:
        name = Path(dataset).name
        scores = [r["normalized_mean"] for k, r in results["runs"].items() if k.split("|")[0] == name]
        if scores:
            print(f"| {name} | {np.mean(scores):.1f} | {', '.join(f'{s:.1f}' for s in scores)} |")


if __name__ == "__main__":
    main()
