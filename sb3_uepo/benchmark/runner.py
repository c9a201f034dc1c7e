"""Run the benchmark grid: one process per (task, algorithm, seed), resumable, results written atomically.

Owns: the :class:`RunSpec` of one run, executing it (:func:`execute_run`: build, offline phase, online phase with a
learning curve, final evaluation), and scheduling the grid over worker processes (:func:`run_grid`).
Must not touch: how each algorithm is built (``baselines.py``), aggregation and plots (``report.py``).

Layout of the output directory::

    OUT/runs/<run_id>.json         one finished run (written atomically when the run ends; its presence = done)
    OUT/runs/<run_id>.failed.json  the traceback of a failed run (retried on the next invocation)
    OUT/logs/<run_id>.log          everything the run printed

A rerun skips every run whose result file exists with the same settings; a run whose settings changed (e.g. a
different ``--online-steps``) is redone. Interrupting a grid loses only the runs in flight.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sb3_uepo.common.io import write_json

RESULT_VERSION = 1


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one benchmark run; two runs with equal specs give the same result file.

    :param env_id: gymnasium id of the task's environment
    :param dataset: the task's dataset (embedded name, Minari id or path), None for a task without one
    :param algo: key of :data:`~sb3_uepo.benchmark.baselines.ALGORITHMS`
    :param seed: seed of the algorithm and its training environments
    :param online_steps: online environment steps (the same budget for every algorithm)
    :param preset: UEPO preset that sets the offline budgets (None for algorithms without a UEPO offline phase)
    :param eval_freq: environment steps between two learning-curve points
    :param eval_episodes: episodes per learning-curve point
    :param final_episodes: episodes of the evaluations after the offline and the online phase
    :param n_envs: training environments (None: the algorithm's default)
    :param bc_steps: behaviour-cloning steps of ``ppo_bc`` (None: by preset)
    :param offline_kwargs: overrides of the preset's offline settings (UEPO and Uni-O4)
    :param algo_kwargs: extra constructor arguments of the algorithm (e.g. ``n_steps``)
    """

    env_id: str
    dataset: str | None
    algo: str
    seed: int
    online_steps: int
    preset: str | None = "quick"
    eval_freq: int = 10_000
    eval_episodes: int = 5
    final_episodes: int = 10
    n_envs: int | None = None
    bc_steps: int | None = None
    offline_kwargs: dict[str, Any] = field(default_factory=dict)
    algo_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """``ENV:DATASET`` (or ``ENV`` without a dataset), as given to ``--tasks``."""
        return self.env_id if self.dataset is None else f"{self.env_id}:{self.dataset}"

    @property
    def run_id(self) -> str:
        """File-name-safe id, e.g. ``Hopper-v5_hopper-medium-v0__uepo__seed0``."""
        return f"{_slug(self.task)}__{self.algo}__seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def parse_task(text: str) -> tuple[str, str | None]:
    """``"Hopper-v5:hopper-medium-v0"`` -> ``("Hopper-v5", "hopper-medium-v0")``; ``"Pendulum-v1"`` -> ``(.., None)``.

    Only the first ``:`` separates, so dataset paths may contain more.

    :param text: a ``--tasks`` entry
    """
    env_id, sep, dataset = text.partition(":")
    if not env_id:
        raise ValueError(f"Bad task {text!r}: expected ENV_ID or ENV_ID:DATASET, e.g. Hopper-v5:hopper-medium-v0")
    return env_id, (dataset or None) if sep else None


def result_path(out_dir: str | os.PathLike, spec: RunSpec) -> Path:
    return Path(out_dir) / "runs" / f"{spec.run_id}.json"


def finished_result(out_dir: str | os.PathLike, spec: RunSpec) -> dict[str, Any] | None:
    """The stored result of ``spec`` when it finished with the same settings, else None."""
    path = result_path(out_dir, spec)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if result.get("status") != "done" or result.get("spec") != _jsonable(spec.to_dict()):
        return None
    return result


def execute_run(spec: RunSpec, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Run one (task, algorithm, seed) in this process and write its result file; returns the result.

    Steps: load the dataset; build the model; offline phase (when the algorithm has one) followed by an evaluation
    of the offline policy in the real environment (reporting only); online learning for ``online_steps`` env
    steps with a learning-curve point every ``eval_freq`` steps; final evaluation (deterministic and stochastic).

    :param spec: the run
    :param out_dir: benchmark output directory
    """
    from sb3_uepo.benchmark.baselines import ALGORITHMS
    from sb3_uepo.common.evaluation import EVAL_SEED_OFFSET, evaluate, evaluate_modes

    algorithm = ALGORITHMS[spec.algo]
    start = time.perf_counter()
    dataset = None
    if algorithm.needs_dataset or spec.dataset is not None:
        if spec.dataset is None:
            raise ValueError(f"{spec.algo} learns from a dataset: give the task as ENV:DATASET (got {spec.task!r})")
        from sb3_uepo.datasets import load_dataset

        dataset = load_dataset(spec.dataset, env=spec.env_id)
    eval_seed = EVAL_SEED_OFFSET + spec.seed  # evaluation episodes differ from training ones, identical across algorithms
    model = algorithm.build(spec, dataset)
    if algorithm.offline and getattr(model, "pretrain_dir", "") is None:
        # finished offline stages survive an interrupted bench: the rerun resumes them (one directory per settings)
        model.pretrain_dir = str(offline_dir(out_dir, spec))

    offline_report: dict[str, Any] | None = None
    offline_eval = None
    offline_s = 0.0
    if algorithm.offline:
        assert algorithm.pretrain is not None and dataset is not None
        offline_start = time.perf_counter()
        offline_report = _pretrain(algorithm, model, spec, dataset, out_dir)
        offline_s = time.perf_counter() - offline_start
        offline_eval = evaluate(model, spec.env_id, spec.final_episodes, True, seed=eval_seed, dataset=dataset)
        print(f"[{spec.run_id}] after offline: {offline_eval.summary()}", flush=True)
    if algorithm.online is not None:
        model = algorithm.online(model, spec)

    curve = LearningCurve(spec.env_id, spec.eval_freq, spec.eval_episodes, eval_seed, dataset)
    curve.record(model, 0)
    online_start = time.perf_counter()
    model.learn(spec.online_steps, callback=curve.callback(model))
    online_s = time.perf_counter() - online_start
    if curve.timesteps and curve.timesteps[-1] == model.num_timesteps:
        curve.pop()  # that point was taken during the last rollout, before the last update
    curve.record(model, model.num_timesteps)
    final = evaluate_modes(model, spec.env_id, n_episodes=spec.final_episodes, seed=eval_seed, dataset=dataset)
    print(f"[{spec.run_id}] after online:  {final['deterministic'].summary()}", flush=True)
    model.get_env().close()  # type: ignore[union-attr]

    result = {
        "result_version": RESULT_VERSION,
        "status": "done",
        "run_id": spec.run_id,
        "task": spec.task,
        "env_id": spec.env_id,
        "dataset": spec.dataset,
        "algo": spec.algo,
        "seed": spec.seed,
        "spec": _jsonable(spec.to_dict()),
        "online_env_steps": int(model.num_timesteps),
        "offline": None if offline_eval is None else offline_eval.to_dict(),
        "online": final["deterministic"].to_dict(),
        "online_stochastic": final["stochastic"].to_dict(),
        "curve": curve.to_dict(),
        "offline_report": _jsonable(offline_report),
        "wall_s": {"offline": offline_s, "online": online_s, "total": time.perf_counter() - start},
        "machine": machine_info(),
    }
    write_json(result_path(out_dir, spec), result)
    failed = result_path(out_dir, spec).with_suffix(".failed.json")
    failed.unlink(missing_ok=True)
    return result


# Algorithms with the same offline phase (same model, same preset and offline settings): they share its checkpoints.
SHARED_OFFLINE_PHASE = {"uepo_steer": "uepo"}


# Algorithms whose offline phase depends on these settings only (not on the online budget or online kwargs).
OFFLINE_SETTINGS_ONLY = ("uepo", "uni_o4")
# Policy kwargs that only the online phase reads (exploration, which denoising steps fine-tune, learning rates): an
# online ablation of them (e.g. ``uepo.policy_kwargs={"exploration_std": 0.15}``) keeps the offline checkpoints.
ONLINE_ONLY_POLICY_KWARGS = frozenset(
    {"exploration_std", "explore_frozen_steps", "noise_clip", "ft_denoising_steps", "value_lr_scale", "optimizer_class",
     "optimizer_kwargs"}
)  # fmt: skip


def offline_dir(out_dir: str | os.PathLike, spec: RunSpec) -> Path:
    """Where a run's offline stages are checkpointed: one directory per task, seed and offline settings. ``uepo`` and
    ``uepo_steer`` share theirs (the online phase differs, the offline one does not); runs of ``uepo`` or ``uni_o4``
    that differ only online (budget, ``--algo-kwargs``, the policy kwargs in :data:`ONLINE_ONLY_POLICY_KWARGS`) share
    theirs too."""
    algo = SHARED_OFFLINE_PHASE.get(spec.algo, spec.algo)
    if algo in OFFLINE_SETTINGS_ONLY:
        keys = ("env_id", "dataset", "seed", "preset", "offline_kwargs")
        settings_data: dict[str, Any] = {"algo": algo, **{key: spec.to_dict()[key] for key in keys}}
        offline_policy_kwargs = {  # the architecture of the offline networks, say
            key: value
            for key, value in (spec.algo_kwargs.get("policy_kwargs") or {}).items()
            if key not in ONLINE_ONLY_POLICY_KWARGS
        }
        if offline_policy_kwargs:
            settings_data["policy_kwargs"] = offline_policy_kwargs
    else:
        settings_data = spec.to_dict()
    settings = hashlib.sha256(json.dumps(settings_data, sort_keys=True, default=str).encode()).hexdigest()[:10]
    run_id = dataclasses.replace(spec, algo=algo).run_id
    return Path(out_dir) / "offline" / f"{run_id}__{settings}"


def _pretrain(algorithm: Any, model: Any, spec: RunSpec, dataset: Any, out_dir: str | os.PathLike) -> dict[str, Any]:
    """The algorithm's offline phase; when another run holds the shared checkpoint directory, in a private one."""
    from sb3_uepo.common.io import LockedError

    try:
        return algorithm.pretrain(model, spec, dataset)
    except LockedError:
        model.pretrain_dir = str(Path(out_dir) / "offline" / f"{spec.run_id}__private")
        print(f"[{spec.run_id}] the shared offline checkpoints are in use: pretraining in {model.pretrain_dir}", flush=True)
        return algorithm.pretrain(model, spec, dataset)


class LearningCurve:
    """Deterministic evaluations every ``eval_freq`` env steps (the policy learning sees is not changed).

    :param env_id: gymnasium id
    :param eval_freq: env steps between points
    :param n_episodes: episodes per point
    :param seed: evaluation seed (the same initial states at every point)
    :param dataset: dataset whose reference returns define the normalised score
    """

    def __init__(self, env_id: str, eval_freq: int, n_episodes: int, seed: int, dataset: Any = None) -> None:
        self.env_id = env_id
        self.eval_freq = max(int(eval_freq), 1)
        self.n_episodes = n_episodes
        self.seed = seed
        self.dataset = dataset
        self.timesteps: list[int] = []
        self.returns: list[float] = []
        self.normalized: list[float | None] = []
        self.wall_s = 0.0

    def record(self, model: Any, timestep: int) -> None:
        from sb3_uepo.common.evaluation import evaluate

        result = evaluate(model, self.env_id, self.n_episodes, True, seed=self.seed, dataset=self.dataset)
        self.timesteps.append(int(timestep))
        self.returns.append(result.mean_return)
        self.normalized.append(result.normalized_mean)
        self.wall_s += result.wall_s

    def pop(self) -> None:
        """Forget the last point."""
        for values in (self.timesteps, self.returns, self.normalized):
            values.pop()

    def callback(self, model: Any = None) -> Any:
        """An SB3 callback recording a point every ``eval_freq`` steps.

        :param model: the model to evaluate (default: the algorithm the callback is attached to; a
            :class:`~sb3_uepo.uepo.steering.SteeredModel` passes itself, since its agent acts in the noise space)
        """
        from stable_baselines3.common.callbacks import BaseCallback

        curve = self

        class _CurveCallback(BaseCallback):
            def __init__(self) -> None:
                super().__init__()
                self.next_eval = curve.eval_freq

            def _on_step(self) -> bool:
                if self.num_timesteps >= self.next_eval:
                    curve.record(model if model is not None else self.model, self.num_timesteps)
                    while self.next_eval <= self.num_timesteps:
                        self.next_eval += curve.eval_freq
                return True

        return _CurveCallback()

    def to_dict(self) -> dict[str, Any]:
        return {
            "timesteps": self.timesteps,
            "return_mean": self.returns,
            "normalized_mean": self.normalized,
            "eval_episodes": self.n_episodes,
            "deterministic": True,
            "eval_wall_s": self.wall_s,
        }


BACKENDS = ("local", "ray")


def run_grid(
    specs: Sequence[RunSpec],
    out_dir: str | os.PathLike,
    workers: int = 1,
    force: bool = False,
    log: Callable[[str], None] = print,
    backend: str = "local",
    address: str | None = None,
) -> dict[str, list[RunSpec]]:
    """Run every spec not finished yet, each in its own fresh process, ``workers`` at a time.

    :param specs: the grid
    :param out_dir: benchmark output directory (with ``backend="ray"`` on several machines: a path every node sees)
    :param workers: processes running at once (``"ray"`` on its own local instance: its CPUs; on a cluster, the
        cluster's CPUs set the limit and ``workers`` is ignored)
    :param force: redo finished runs too
    :param log: where progress lines go
    :param backend: ``"local"`` (a process pool on this machine) or ``"ray"`` (each run a Ray task with one CPU;
        needs the optional ``ray`` package: ``pip install sb3-uepo[ray]``)
    :param address: Ray cluster address (``"auto"``, ``"ray://host:10001"``, ...); None starts a local instance
    :return: ``{"skipped": [...], "done": [...], "failed": [...]}``
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    outcome: dict[str, list[RunSpec]] = {"skipped": [], "done": [], "failed": []}
    todo = []
    for spec in specs:
        if not force and finished_result(out_dir, spec) is not None:
            outcome["skipped"].append(spec)
        else:
            todo.append(spec)
    log(f"{len(specs)} runs: {len(outcome['skipped'])} already finished (skipped), {len(todo)} to run on {workers} worker(s)")
    if not todo:
        return outcome
    (Path(out_dir) / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def record(spec: RunSpec, ok: bool, message: str) -> None:
        outcome["done" if ok else "failed"].append(spec)
        finished = len(outcome["done"]) + len(outcome["failed"])
        status = "ok  " if ok else "FAIL"
        log(f"[{finished}/{len(todo)} {time.perf_counter() - start:7.0f}s] {status} {spec.run_id}: {message}")

    if backend == "ray":
        _run_on_ray(todo, str(Path(out_dir).resolve()), workers, address, record)
        return outcome
    context = multiprocessing.get_context("spawn")  # fresh interpreter per run: no torch/MuJoCo state shared via fork
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(_run_in_child, spec.to_dict(), str(out_dir)): spec for spec in todo}
        for future in concurrent.futures.as_completed(futures):
            try:
                ok, message = future.result()
            except Exception as exc:  # the worker process itself died (e.g. killed for memory)
                ok, message = False, f"worker process failed: {exc!r}"
            record(futures[future], ok, message)
    return outcome


def _run_on_ray(
    todo: Sequence[RunSpec],
    out_dir: str,
    workers: int,
    address: str | None,
    record: Callable[[RunSpec, bool, str], None],
) -> None:
    """Each run a Ray task (one CPU, a fresh worker process per run as in the local pool); results as they finish."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--backend ray needs Ray: pip install 'sb3-uepo[ray]' (or pip install ray)") from exc
    started_here = not ray.is_initialized()
    if started_here:
        if address is None:  # a local instance with `workers` CPUs
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1, max_calls=1, max_retries=0)(_run_in_child)
        pending = {remote.remote(spec.to_dict(), out_dir): spec for spec in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ready[0])
            try:
                ok, message = ray.get(ready[0])
            except Exception as exc:  # the task's worker died (e.g. killed for memory) or the node was lost
                ok, message = False, f"ray task failed: {exc!r}"
            record(spec, ok, message)
    finally:
        if started_here:
            ray.shutdown()


def _run_in_child(spec_dict: dict[str, Any], out_dir: str) -> tuple[bool, str]:
    """Entry point of a worker process: run one spec with its output in ``OUT/logs/<run_id>.log``."""
    import torch

    torch.set_num_threads(1)  # one run per core; small networks gain nothing from more threads
    spec = RunSpec.from_dict(spec_dict)
    log_path = Path(out_dir) / "logs" / f"{spec.run_id}.log"
    with open(log_path, "w") as log_file, contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
        try:
            result = execute_run(spec, out_dir)
        except Exception as exc:
            traceback.print_exc()
            failure = {"status": "failed", "run_id": spec.run_id, "spec": _jsonable(spec.to_dict()), "error": repr(exc)}
            failure["traceback"] = traceback.format_exc()
            write_json(result_path(out_dir, spec).with_suffix(".failed.json"), failure)
            return False, f"{type(exc).__name__}: {exc} (log: {log_path})"
    online = result["online"]
    score = online["normalized_mean"]
    text = f"return {online['mean_return']:.1f}" + ("" if score is None else f", normalised {score:.1f}")
    return True, f"{text} in {result['wall_s']['total']:.0f}s"


def machine_info() -> dict[str, Any]:
    """Where a run ran: host, CPU count, Python/torch/SB3 versions (for the benchmark's fine print)."""
    import stable_baselines3
    import torch

    from sb3_uepo import __version__

    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "sb3_uepo": __version__,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", text.replace(":", "_")).strip("_")


def _jsonable(data: Any) -> Any:
    """Round-trip through JSON so stored and fresh specs compare equal (tuples become lists, etc.)."""
    from sb3_uepo.common.io import _json_default

    return json.loads(json.dumps(data, default=_json_default))
