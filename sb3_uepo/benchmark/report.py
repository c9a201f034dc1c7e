"""Aggregate finished benchmark runs into ``results.json``, a markdown table and learning-curve plots.

Owns: reading ``OUT/runs/*.json``, the summary per (task, algorithm) and per algorithm across tasks, the
markdown table (``OUT/results.md``) and the plots (``OUT/curves/<task>.png``, matplotlib imported lazily).
Must not touch: running anything (``runner.py``).

Scores are D4RL normalised scores (0 = random policy, 100 = D4RL expert) of deterministic evaluation episodes:
each seed contributes the mean over its evaluation episodes; across seeds we report mean ± std, and the IQM with a
95% percentile-bootstrap interval (``stats.py``). Across tasks, the IQM pools every (task, seed) run, resampled
within each task.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sb3_uepo.benchmark.stats import bootstrap_ci, iqm, mean_std
from sb3_uepo.common.io import atomic_path, atomic_write, write_json

PHASES = ("offline", "online")


def load_results(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished run under ``OUT/runs/`` (failed runs are not included)."""
    results = []
    for path in sorted((Path(out_dir) / "runs").glob("*.json")):
        if path.name.endswith(".failed.json"):
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if result.get("status") == "done":
            results.append(result)
    return results


def summarize(results: list[dict[str, Any]], n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per (task, algorithm) and per algorithm across tasks: scores after offline and after online.

    :param results: finished runs (as :func:`load_results` returns them)
    :param n_resamples: bootstrap resamples of the confidence intervals
    :param seed: seed of the bootstrap
    """
    from sb3_uepo.benchmark.baselines import ALGORITHMS

    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        groups[(result["task"], result["algo"])].append(result)
    algo_order = [name for name in ALGORITHMS if any(algo == name for _, algo in groups)]
    algo_order += sorted({algo for _, algo in groups} - set(algo_order))
    tasks = sorted({task for task, _ in groups})

    per_task = []
    for task in tasks:
        for algo in algo_order:
            runs = sorted(groups.get((task, algo), []), key=lambda r: r["seed"])
            if not runs:
                continue
            entry: dict[str, Any] = {
                "task": task,
                "algo": algo,
                "label": ALGORITHMS[algo].label if algo in ALGORITHMS else algo,
                "seeds": [r["seed"] for r in runs],
                "online_env_steps": int(np.mean([r["online_env_steps"] for r in runs])),
                "wall_s_mean": float(np.mean([r["wall_s"]["total"] for r in runs])),
            }
            # Normalised scores when the task has reference returns, else raw returns (e.g. Pendulum-v1).
            entry["metric"] = (
                "normalized" if all(_run_score(r, "online", "normalized") is not None for r in runs) else "return"
            )
            for phase in PHASES:
                entry[phase] = _phase_summary([_run_score(r, phase, entry["metric"]) for r in runs], n_resamples, seed)
            per_task.append(entry)

    aggregate = []
    for algo in algo_order:
        entries = [e for e in per_task if e["algo"] == algo and e["metric"] == "normalized"]
        if not entries:
            continue
        row: dict[str, Any] = {
            "algo": algo,
            "label": entries[0]["label"],
            "tasks": [e["task"] for e in entries],
            "n_runs": sum(len(e["seeds"]) for e in entries),
        }
        for phase in PHASES:
            if any(e[phase] is None for e in entries):
                row[phase] = None
                continue
            estimate, low, high = bootstrap_ci([e[phase]["scores"] for e in entries], iqm, n_resamples, seed=seed)
            row[phase] = {"iqm": estimate, "ci_low": low, "ci_high": high}
        aggregate.append(row)
    return {"per_task": per_task, "aggregate": aggregate, "tasks": tasks, "algos": algo_order}


def markdown_table(summary: dict[str, Any]) -> str:
    """The benchmark table in markdown: normalised scores after offline and after online, per task and overall."""
    lines = [
        "| Task | Algorithm | Seeds | After offline (mean ± std) | After online (mean ± std) | "
        "After online IQM [95% CI] | Online env steps | Wall time / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in summary["per_task"]:
        online = entry["online"]
        unit = "" if entry["metric"] == "normalized" else " (raw return)"
        lines.append(
            f"| {entry['task']}{unit} | {entry['label']} | {len(entry['seeds'])} | {_mean_std_cell(entry['offline'])} | "
            f"{_mean_std_cell(online)} | {_iqm_cell(online)} | {entry['online_env_steps']:,} | "
            f"{_duration(entry['wall_s_mean'])} |"
        )
    if summary["aggregate"]:
        lines += [
            "",
            "| Algorithm | Runs (tasks x seeds) | After offline IQM [95% CI] | After online IQM [95% CI] |",
            "|---|---|---|---|",
        ]
        for row in summary["aggregate"]:
            lines.append(f"| {row['label']} | {row['n_runs']} | {_iqm_cell(row['offline'])} | {_iqm_cell(row['online'])} |")
    lines += [
        "",
        "Scores: D4RL normalised (0 = random, 100 = D4RL expert), deterministic evaluation episodes; one score per "
        "seed (mean over its episodes). IQM: interquartile mean across seeds (pooled across tasks in the second "
        "table; tasks without reference returns show raw returns and are left out of it), 95% percentile-bootstrap "
        "interval. '—': no offline phase.",
    ]
    return "\n".join(lines) + "\n"


def plot_learning_curves(results: list[dict[str, Any]], out_dir: str | os.PathLike, log: Any = print) -> list[Path]:
    """One PNG per task: normalised score (or return) vs online env steps, mean ± std across seeds per algorithm.

    Returns the written paths; writes nothing (and says so) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log('Learning-curve plots skipped: matplotlib is not installed (pip install "sb3-uepo[plots]").')
        return []
    from sb3_uepo.benchmark.baselines import ALGORITHMS

    by_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        by_task[result["task"]][result["algo"]].append(result)
    written = []
    for task, algos in sorted(by_task.items()):
        use_normalized = all(None not in r["curve"]["normalized_mean"] for runs in algos.values() for r in runs)
        key = "normalized_mean" if use_normalized else "return_mean"
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        order = [name for name in ALGORITHMS if name in algos] + sorted(set(algos) - set(ALGORITHMS))
        for algo in order:
            runs = algos[algo]
            grid = np.unique(np.concatenate([r["curve"]["timesteps"] for r in runs]))
            curves = np.array([np.interp(grid, r["curve"]["timesteps"], r["curve"][key]) for r in runs])
            mean, std = curves.mean(axis=0), curves.std(axis=0)
            label = ALGORITHMS[algo].label if algo in ALGORITHMS else algo
            color = f"C{list(ALGORITHMS).index(algo)}" if algo in ALGORITHMS else None
            ax.plot(grid, mean, label=f"{label} ({len(runs)} seed{'' if len(runs) == 1 else 's'})", color=color)
            ax.fill_between(grid, mean - std, mean + std, alpha=0.2, color=color)
        ax.set_xlabel("online environment steps")
        ax.set_ylabel("normalised score" if use_normalized else "return")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = Path(out_dir) / "curves" / f"{_slug(task)}.png"
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        written.append(path)
    return written


def write_report(
    out_dir: str | os.PathLike, plots: bool = True, extra: dict[str, Any] | None = None, log: Any = print
) -> dict[str, Any]:
    """Aggregate ``OUT/runs/`` into ``OUT/results.json`` and ``OUT/results.md`` (and plots); return the paths.

    :param out_dir: benchmark output directory
    :param plots: also write learning-curve PNGs
    :param extra: more fields for ``results.json`` (e.g. the command line)
    :param log: where messages go
    """
    results = load_results(out_dir)
    summary = summarize(results)
    table = markdown_table(summary)
    out = Path(out_dir)
    machines = sorted({json.dumps(r.get("machine", {}), sort_keys=True) for r in results})
    write_json(
        out / "results.json",
        {**(extra or {}), "summary": summary, "machines": [json.loads(m) for m in machines], "runs": results},
    )
    with atomic_write(out / "results.md") as handle:
        handle.write(table)
    paths = {"json": out / "results.json", "table": out / "results.md", "plots": []}
    if plots and results:
        paths["plots"] = plot_learning_curves(results, out, log=log)
    return {"paths": paths, "summary": summary, "table": table, "n_runs": len(results)}


def _run_score(result: dict[str, Any], phase: str, metric: str) -> float | None:
    evaluation = result.get(phase)
    if evaluation is None:
        return None
    return evaluation.get("normalized_mean") if metric == "normalized" else evaluation.get("mean_return")


def _phase_summary(scores: list[float | None], n_resamples: int, seed: int) -> dict[str, Any] | None:
    if not scores or any(score is None for score in scores):
        return None
    values = np.asarray(scores, dtype=np.float64)
    mean, std = mean_std(values)
    estimate, low, high = bootstrap_ci(values, iqm, n_resamples, seed=seed)
    return {"scores": values.tolist(), "mean": mean, "std": std, "iqm": estimate, "ci_low": low, "ci_high": high}


def _mean_std_cell(phase: dict[str, Any] | None) -> str:
    return "—" if phase is None else f"{phase['mean']:.1f} ± {phase['std']:.1f}"


def _iqm_cell(phase: dict[str, Any] | None) -> str:
    return "—" if phase is None else f"{phase['iqm']:.1f} [{phase['ci_low']:.1f}, {phase['ci_high']:.1f}]"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", text).strip("_")
