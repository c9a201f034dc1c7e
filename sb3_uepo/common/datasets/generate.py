"""Local D4RL-style datasets: train a behaviour agent with SB3 PPO, collect steps with it, write a Minari dataset.

Owns: :func:`make_dataset` (what ``uepo data make`` runs), the dataset levels, the behaviour agent's
hyperparameters, and writing Minari datasets atomically with :func:`minari.create_dataset_from_buffers`
from hand-built ``EpisodeBuffer`` objects (``DataCollector`` would pull in jax).
Must not touch: reading datasets (see ``loaders.py``).

Levels follow D4RL (Fu et al. 2020, https://arxiv.org/abs/2004.07219), with PPO instead of SAC because PPO
is about 20x faster on a small CPU:

* ``random``: uniform random actions.
* ``medium``: a policy trained until its (stochastic) return reaches one third of the D4RL expert return.
* ``medium-replay``: every transition seen while training that agent up to ``medium`` (D4RL keeps its replay
  buffer), subsampled by whole episodes to ``steps`` when there are more.
* ``expert``: the same agent trained on until the D4RL expert return or ``train_steps_max``, whichever first;
  a warning says so when the target is not reached.
* ``medium-expert``: half the steps from the medium agent, half from the expert one.

Data is collected with the stochastic policy (as D4RL does), in a single environment, until exactly
``steps`` transitions; the episode running when the budget ends is marked truncated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from sb3_uepo.common.datasets.embedded import embedded_dataset_path
from sb3_uepo.common.datasets.loaders import minari_datasets_root
from sb3_uepo.common.datasets.scores import D4RL_REFERENCE_SCORES, REFERENCE_SOURCE, task_from_id
from sb3_uepo.common.datasets.validation import DatasetError
from sb3_uepo.common.io import atomic_path

LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
# Fraction of the D4RL expert return (REF_MAX_SCORE) a level trains its agent to.
LEVEL_TARGET_FRACTION = {"medium": 1.0 / 3.0, "medium-replay": 1.0 / 3.0, "expert": 1.0}
DEFAULT_TRAIN_STEPS_MAX = 1_000_000
# Episodes averaged to decide whether the agent reached its target return.
TARGET_WINDOW_EPISODES = 20
BEHAVIOR_POLICY_FILE = "behavior_policy.zip"
BEHAVIOR_VECNORMALIZE_FILE = "behavior_policy_vecnormalize.pkl"


@dataclass
class BehaviorAgentConfig:
    """SB3 PPO hyperparameters of the behaviour agent: the MuJoCo defaults of the PPO paper (Schulman et al. 2017)
    with 8 parallel envs and observation/reward normalisation, which reach a Hopper return of ~1000 in a few
    hundred thousand steps on a CPU."""

    n_envs: int = 8  # parallel DummyVecEnv copies
    n_steps: int = 256  # steps per env per rollout (8 x 256 = 2048 per update)
    batch_size: int = 64
    n_epochs: int = 10
    learning_rate: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    normalize: bool = True  # VecNormalize on observations and rewards (statistics saved beside the agent)
    policy_kwargs: dict[str, Any] = field(default_factory=lambda: {"net_arch": {"pi": [64, 64], "vf": [64, 64]}})


@dataclass
class _Agent:
    """A trained behaviour agent and what is known about its training."""

    model: Any  # stable_baselines3.PPO
    vec_normalize: Any  # VecNormalize or None
    config: BehaviorAgentConfig
    train_steps: int = 0
    recent_return: float = float("nan")  # mean return of the last TARGET_WINDOW_EPISODES training episodes
    target_return: float | None = None
    target_reached: bool = False


def make_dataset(
    env_id: str,
    level: str,
    steps: int,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    train_steps_max: int | None = None,
    target_return: float | None = None,
    n_envs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    verbose: int = 1,
    agent_config: BehaviorAgentConfig | None = None,
) -> Path:
    """Make a D4RL-style Minari dataset locally (see the module docstring for the levels).

    :param env_id: gymnasium id, e.g. ``"Hopper-v5"``
    :param level: one of :data:`LEVELS`
    :param steps: number of transitions to collect
    :param out: a Minari dataset id (written under ``MINARI_DATASETS_PATH``, default ``~/.minari/datasets``),
        or a directory path (starting with ``.``, ``/`` or ``~``)
    :param seed: seed of training and collection
    :param train_steps_max: cap on the behaviour agent's training steps (default 1M)
    :param target_return: return to train the agent to, instead of the level's share of the D4RL expert return
        (needed for environments outside the D4RL table)
    :param n_envs: parallel training environments (default: ``agent_config.n_envs``)
    :param overwrite: replace an existing dataset at ``out``
    :param progress: show progress bars while training and collecting
    :param verbose: 0 silent, 1 one line per stage
    :param agent_config: PPO hyperparameters of the behaviour agent
    :return: the dataset directory (holds ``data/`` and the behaviour agent)
    """
    if level not in LEVELS:
        raise DatasetError(f"Unknown level '{level}'. Fix: choose one of {', '.join(LEVELS)}.")
    if steps < 1:
        raise DatasetError(f"Dataset '{out}': --steps must be at least 1 (got {steps}).")
    final_dir, dataset_id = resolve_output(out)
    if final_dir.exists() and not overwrite:
        raise DatasetError(
            f"Dataset '{dataset_id}': {final_dir} already exists. "
            "Fix: pass --overwrite (overwrite=True) or choose another --out."
        )
    config = agent_config or BehaviorAgentConfig()
    if n_envs is not None:
        config = dataclasses.replace(config, n_envs=n_envs)
    train_steps_max = DEFAULT_TRAIN_STEPS_MAX if train_steps_max is None else train_steps_max
    ref_min, ref_max = _reference_scores(env_id)
    say = print if verbose else _silent

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final_dir.parent, prefix=".uepo-make-") as work:
        work_dir = Path(work)
        agent_files: dict[str, Path] = {}
        behavior: dict[str, Any] = {"level": level, "seed": seed, "train_steps_max": train_steps_max}
        if level == "random":
            say(f"[uepo data make] collecting {steps} steps of uniform random actions in {env_id}")
            episodes = collect_episodes(env_id, steps, _random_policy(env_id, seed), seed, progress, "random policy")
            behavior["policy"] = "uniform random actions"
        elif level == "medium-replay":
            target = _target(level, target_return, ref_max, env_id)
            replay: list[dict[str, np.ndarray]] = []
            agent = train_behavior_agent(env_id, seed, target, train_steps_max, config, progress, say, replay_sink=replay)
            agent_files.update(_save_agent(agent, work_dir, ""))
            episodes = subsample_episodes(replay, steps, seed)
            if sum(len(e["rewards"]) for e in replay) < steps:
                warnings.warn(
                    f"medium-replay: training saw only {sum(len(e['rewards']) for e in replay)} transitions, fewer than "
                    f"--steps {steps}; the dataset holds all of them."
                )
            behavior.update(_describe(agent), policy="every transition of PPO training until the medium target")
        elif level in ("medium", "expert"):
            target = _target(level, target_return, ref_max, env_id)
            agent = train_behavior_agent(env_id, seed, target, train_steps_max, config, progress, say)
            agent_files.update(_save_agent(agent, work_dir, ""))
            say(f"[uepo data make] collecting {steps} steps with the stochastic {level} agent")
            episodes = collect_episodes(env_id, steps, _agent_policy(agent), seed + 1, progress, f"{level} agent")
            behavior.update(_describe(agent), policy=f"stochastic SB3 PPO agent ({level})")
        else:  # medium-expert
            medium_target = _target("medium", target_return, ref_max, env_id)
            expert_target = _target("expert", None if target_return is None else 3 * target_return, ref_max, env_id)
            agent = train_behavior_agent(env_id, seed, medium_target, train_steps_max, config, progress, say)
            agent_files.update(_save_agent(agent, work_dir, "medium"))
            behavior["medium"] = _describe(agent)
            say(f"[uepo data make] collecting {steps // 2} steps with the stochastic medium agent")
            episodes = collect_episodes(env_id, steps // 2, _agent_policy(agent), seed + 1, progress, "medium agent")
            agent = train_behavior_agent(env_id, seed, expert_target, train_steps_max, config, progress, say, agent=agent)
            agent_files.update(_save_agent(agent, work_dir, "expert"))
            behavior["expert"] = _describe(agent)
            say(f"[uepo data make] collecting {steps - steps // 2} steps with the stochastic expert agent")
            episodes += collect_episodes(env_id, steps - steps // 2, _agent_policy(agent), seed + 2, progress, "expert agent")
            behavior["policy"] = "half stochastic medium PPO agent, half stochastic expert PPO agent"

        returns = np.array([float(np.sum(e["rewards"])) for e in episodes])
        behavior.update(episodes=len(episodes), steps=int(sum(len(e["rewards"]) for e in episodes)))
        behavior.update(return_mean=float(returns.mean()), return_std=float(returns.std()))
        description = (
            f"D4RL-style '{level}' dataset of {env_id} made locally by sb3-uepo (`uepo data make`): "
            f"{behavior['steps']} steps, {len(episodes)} episodes, mean return {returns.mean():.1f}."
        )
        say(f"[uepo data make] writing {final_dir}")
        write_minari_dataset(
            episodes,
            final_dir,
            dataset_id,
            env_id,
            ref_min_score=ref_min,
            ref_max_score=ref_max,
            description=description,
            extra_metadata={"uepo": {"env_id": env_id, **behavior, "reference_scores": REFERENCE_SOURCE}},
            extra_files=agent_files,
        )
    return final_dir


def resolve_output(out: str | os.PathLike) -> tuple[Path, str]:
    """Where ``out`` is written, and the Minari dataset id stored in its metadata.

    A path (starting with ``.``, ``/`` or ``~``) is used as is, with its last part as id (``-v0`` appended when it
    has no version); anything else is a Minari id placed under the Minari datasets root.
    """
    from minari.dataset.minari_dataset import parse_dataset_id

    text = os.fspath(out)
    if text.startswith((".", "/", "~")) or Path(text).is_absolute():
        path = Path(text).expanduser().resolve()
        dataset_id = path.name
        try:
            parse_dataset_id(dataset_id)
        except (ValueError, TypeError):
            dataset_id = f"{dataset_id}-v0"
        return path, dataset_id
    try:
        parse_dataset_id(text)
    except (ValueError, TypeError):
        raise DatasetError(
            f"Dataset '{text}': --out is neither a path (start it with ./ or /) nor a Minari id "
            f"('name-v0' or 'namespace/name-v0'). Fix: add a version, e.g. --out {text}-v0."
        ) from None
    if embedded_dataset_path(text) is not None:
        raise DatasetError(
            f"Dataset '{text}': that name is the embedded dataset's, so a local dataset by that id would never be loaded. "
            f"Fix: choose another --out (e.g. add a namespace: --out local/{text})."
        )
    return minari_datasets_root() / text, text


# ---------------------------------------------------------------------------------------------- training
def train_behavior_agent(
    env_id: str,
    seed: int,
    target_return: float,
    train_steps_max: int,
    config: BehaviorAgentConfig,
    progress: bool,
    say: Callable[..., None] = print,
    replay_sink: list | None = None,
    agent: _Agent | None = None,
) -> _Agent:
    """Train (or continue training) a PPO agent until its recent stochastic return reaches ``target_return``
    or it has trained ``train_steps_max`` steps in total.

    :param env_id: gymnasium id
    :param seed: seed of the envs and the agent
    :param target_return: mean return (last :data:`TARGET_WINDOW_EPISODES` episodes) at which training stops
    :param train_steps_max: cap on the agent's total training steps (counting earlier training of ``agent``)
    :param config: PPO hyperparameters
    :param progress: show SB3's progress bar
    :param say: where stage messages go
    :param replay_sink: when given, every finished training episode is appended to it (for ``medium-replay``)
    :param agent: continue training this agent instead of starting a new one
    :return: the agent, with its training steps, recent return and whether it reached the target
    """
    if agent is None:
        sink = replay_sink
        record = None if sink is None else (lambda env: EpisodeRecorder(env, sink))
        venv = make_vec_env(env_id, n_envs=config.n_envs, seed=seed, wrapper_class=record)
        vec_normalize = VecNormalize(venv, gamma=config.gamma) if config.normalize else None
        # Tiny budgets (tests) need short rollouts, or PPO would collect far more than asked.
        n_steps = max(8, min(config.n_steps, train_steps_max // config.n_envs))
        model = PPO(
            "MlpPolicy",
            venv if vec_normalize is None else vec_normalize,
            n_steps=n_steps,
            batch_size=min(config.batch_size, n_steps * config.n_envs),
            n_epochs=config.n_epochs,
            learning_rate=config.learning_rate,
            gamma=config.gamma,
            gae_lambda=config.gae_lambda,
            clip_range=config.clip_range,
            ent_coef=config.ent_coef,
            policy_kwargs=config.policy_kwargs,
            seed=seed,
            device="cpu",
            verbose=0,
        )
        agent = _Agent(model, vec_normalize, config)
    agent.target_return = target_return
    remaining = train_steps_max - agent.model.num_timesteps
    say(
        f"[uepo data make] training the PPO behaviour agent on {env_id} until a return of {target_return:.1f} "
        f"(at most {max(remaining, 0)} more steps)"
    )
    stopper = StopAtTargetReturn(target_return)
    if remaining > 0:
        agent.model.learn(remaining, callback=stopper, reset_num_timesteps=False, progress_bar=progress)
    if replay_sink is not None:
        for env in agent.model.get_env().unwrapped.envs:
            env.flush()  # the episodes still running when training stopped
    agent.train_steps = int(agent.model.num_timesteps)
    agent.recent_return = _recent_return(agent.model)
    agent.target_reached = bool(agent.recent_return >= target_return)
    if agent.target_reached:
        say(f"[uepo data make] target reached after {agent.train_steps} steps (recent return {agent.recent_return:.1f})")
    else:
        warnings.warn(
            f"The behaviour agent for {env_id} reached a mean return of {agent.recent_return:.1f} (last "
            f"{TARGET_WINDOW_EPISODES} training episodes) after {agent.train_steps} steps, below its target "
            f"{target_return:.1f}: the data will be weaker than the level's name says. Fix: raise --train-steps-max.",
            stacklevel=2,
        )
    return agent


class StopAtTargetReturn(BaseCallback):
    """Stop learning once the mean return of the last ``window`` training episodes reaches ``target_return``.

    :param target_return: undiscounted return to reach
    :param window: episodes averaged (at least 5 must have finished)
    """

    def __init__(self, target_return: float, window: int = TARGET_WINDOW_EPISODES) -> None:
        super().__init__()
        self.target_return = target_return
        self.window = window
        self.reached = False

    def _on_step(self) -> bool:
        return not self.reached

    def _on_rollout_end(self) -> None:
        returns = [info["r"] for info in self.model.ep_info_buffer or []][-self.window :]
        self.reached = len(returns) >= min(self.window, 5) and float(np.mean(returns)) >= self.target_return


def _recent_return(model: Any) -> float:
    returns = [info["r"] for info in (model.ep_info_buffer or [])][-TARGET_WINDOW_EPISODES:]
    return float(np.mean(returns)) if returns else float("nan")


def _save_agent(agent: _Agent, work_dir: Path, tag: str) -> dict[str, Path]:
    suffix = f"_{tag}" if tag else ""
    files = {BEHAVIOR_POLICY_FILE.replace(".zip", f"{suffix}.zip"): work_dir / f"policy{suffix}.zip"}
    agent.model.save(files[BEHAVIOR_POLICY_FILE.replace(".zip", f"{suffix}.zip")])
    if agent.vec_normalize is not None:
        name = BEHAVIOR_VECNORMALIZE_FILE.replace(".pkl", f"{suffix}.pkl")
        files[name] = work_dir / f"vecnormalize{suffix}.pkl"
        agent.vec_normalize.save(files[name])
    return files


def _describe(agent: _Agent) -> dict[str, Any]:
    return {
        "train_steps": agent.train_steps,
        "target_return": agent.target_return,
        "target_reached": agent.target_reached,
        "training_return_recent": None if np.isnan(agent.recent_return) else agent.recent_return,
        "ppo": asdict(agent.config) | {"n_steps": agent.model.n_steps, "batch_size": agent.model.batch_size},
    }


def _reference_scores(env_id: str) -> tuple[float | None, float | None]:
    task = task_from_id(env_id)
    return D4RL_REFERENCE_SCORES[task] if task else (None, None)


def _target(level: str, target_return: float | None, ref_max: float | None, env_id: str) -> float:
    if target_return is not None:
        return float(target_return)
    if ref_max is None:
        raise DatasetError(
            f"No D4RL reference return for '{env_id}', so level '{level}' has no target. "
            "Fix: pass --target-return R (the return the behaviour agent should reach)."
        )
    return LEVEL_TARGET_FRACTION[level] * ref_max


# ---------------------------------------------------------------------------------------------- collection
class EpisodeRecorder(gym.Wrapper):
    """Records every episode the wrapped env plays into ``sink``, as arrays with N+1 observations (Minari layout).

    :param env: environment to record
    :param sink: list that receives one dict per finished episode
    """

    def __init__(self, env: gym.Env, sink: list) -> None:
        super().__init__(env)
        self.sink = sink
        self._episode: dict[str, list] | None = None

    def reset(self, **kwargs: Any) -> Any:
        self.flush()
        obs, info = self.env.reset(**kwargs)
        self._episode = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        return obs, info

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._episode is not None:
            self._episode["observations"].append(obs)
            self._episode["actions"].append(np.asarray(action, dtype=np.float32))
            self._episode["rewards"].append(float(reward))
            self._episode["terminations"].append(bool(terminated))
            self._episode["truncations"].append(bool(truncated))
            if terminated or truncated:
                self.flush()
        return obs, reward, terminated, truncated, info

    def flush(self) -> None:
        """Store the current episode; one cut short (by a reset or the end of training) is marked truncated."""
        episode, self._episode = self._episode, None
        if episode is None or not episode["rewards"]:
            return
        if not (episode["terminations"][-1] or episode["truncations"][-1]):
            episode["truncations"][-1] = True
        self.sink.append(_episode_arrays(episode))


def collect_episodes(
    env_id: str, steps: int, policy: Callable[[np.ndarray], np.ndarray], seed: int, progress: bool, label: str
) -> list[dict[str, np.ndarray]]:
    """Run ``policy`` in one env for exactly ``steps`` steps; the running episode at the end is marked truncated."""
    episodes: list[dict[str, np.ndarray]] = []
    env = EpisodeRecorder(gym.make(env_id), episodes)
    bar = _progress_bar(steps, f"collecting ({label})", progress)
    try:
        obs, _ = env.reset(seed=seed)
        for _ in range(steps):
            obs, _, terminated, truncated, _ = env.step(policy(obs))
            if terminated or truncated:
                obs, _ = env.reset()
            bar.update(1)
        env.flush()
    finally:
        bar.close()
        env.close()
    return episodes


def subsample_episodes(episodes: list[dict[str, np.ndarray]], steps: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Whole episodes in random order until ``steps`` transitions (the last one cut and marked truncated);
    all of them, in order, when they hold fewer."""
    if sum(len(e["rewards"]) for e in episodes) <= steps:
        return list(episodes)
    chosen, total = [], 0
    for index in np.random.default_rng(seed).permutation(len(episodes)):
        episode = episodes[index]
        take = min(len(episode["rewards"]), steps - total)
        chosen.append(_cut_episode(episode, take))
        total += take
        if total >= steps:
            break
    return chosen


def _cut_episode(episode: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    if length >= len(episode["rewards"]):
        return episode
    cut = {key: values[: length + 1] if key == "observations" else values[:length] for key, values in episode.items()}
    cut["truncations"] = cut["truncations"].copy()
    cut["truncations"][-1] = not cut["terminations"][-1]
    return cut


def _episode_arrays(episode: dict[str, list]) -> dict[str, np.ndarray]:
    return {
        "observations": np.asarray(episode["observations"], dtype=np.float32),
        "actions": np.asarray(episode["actions"], dtype=np.float32),
        "rewards": np.asarray(episode["rewards"], dtype=np.float32),
        "terminations": np.asarray(episode["terminations"], dtype=bool),
        "truncations": np.asarray(episode["truncations"], dtype=bool),
    }


def _random_policy(env_id: str, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    env = gym.make(env_id)
    action_space = env.action_space
    env.close()
    action_space.seed(seed)
    return lambda obs: action_space.sample()


def _agent_policy(agent: _Agent) -> Callable[[np.ndarray], np.ndarray]:
    def act(obs: np.ndarray) -> np.ndarray:
        if agent.vec_normalize is not None:
            obs = agent.vec_normalize.normalize_obs(obs)
        action, _ = agent.model.predict(obs, deterministic=False)
        return action

    return act


def _progress_bar(total: int, description: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", disable=not enabled, mininterval=0.5)


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


# ---------------------------------------------------------------------------------------------- writing
def write_minari_dataset(
    episodes: list[dict[str, np.ndarray]],
    final_dir: Path,
    dataset_id: str,
    env_id: str,
    *,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    description: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    compress: bool = True,
) -> Path:
    """Write episodes as a Minari dataset at ``final_dir``, atomically (built in a hidden directory, then renamed).

    :param episodes: dicts of ``observations`` (T+1, O), ``actions`` (T, A), ``rewards``, ``terminations``,
        ``truncations`` (T,)
    :param final_dir: the dataset directory (it will hold ``data/`` and ``extra_files``)
    :param dataset_id: Minari id stored in the metadata
    :param env_id: gymnasium id of the environment the data comes from
    :param ref_min_score: random-policy return (normalised score 0), stored in the metadata
    :param ref_max_score: expert return (normalised score 100), stored in the metadata
    :param description: dataset description
    :param extra_metadata: more metadata keys
    :param extra_files: files copied beside ``data/`` (name -> source path)
    :param compress: gzip the HDF5 arrays (readers need nothing special)
    :return: ``final_dir``
    """
    import minari
    from minari.data_collector import EpisodeBuffer

    if not episodes:
        raise DatasetError(f"Dataset '{dataset_id}': nothing to write (no episodes).")
    env = gym.make(env_id)
    try:
        observation_space = _float32_box(env.observation_space)
        action_space = _float32_box(env.action_space)
    finally:
        env.close()
    buffers = [
        EpisodeBuffer(
            id=index,
            observations=episode["observations"].astype(np.float32),
            actions=episode["actions"].astype(np.float32),
            rewards=episode["rewards"].astype(np.float32),
            terminations=episode["terminations"].astype(bool),
            truncations=episode["truncations"].astype(bool),
        )
        for index, episode in enumerate(episodes)
    ]
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final_dir.parent, prefix=".uepo-staging-") as staging:
        with _minari_root(staging), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`(code_permalink|author_email|eval_env)`", category=UserWarning)
            dataset = minari.create_dataset_from_buffers(
                dataset_id,
                buffers,
                env=env_id,
                algorithm_name="SB3 PPO behaviour agent (sb3-uepo `uepo data make`)",
                author="sb3-uepo",
                action_space=action_space,
                observation_space=observation_space,
                ref_min_score=ref_min_score,
                ref_max_score=ref_max_score,
                description=description,
                requirements=[f"gymnasium>={_version('gymnasium')}", f"mujoco>={_version('mujoco')}"],
            )
            if extra_metadata:
                dataset.storage.update_metadata(extra_metadata)
        staged = Path(staging) / dataset_id
        if compress:
            compress_minari_hdf5(staged / "data")
        for name, source in (extra_files or {}).items():
            shutil.copy2(source, staged / name)
        with atomic_path(final_dir) as tmp:
            os.replace(staged, tmp)
    _ensure_namespaces(dataset_id, final_dir)
    return final_dir


def compress_minari_hdf5(data_path: Path, level: int = 9) -> None:
    """Rewrite ``main_data.hdf5`` smaller: gzip + shuffle filters, one chunk per array, HDF5 1.10 chunk indexes.

    h5py and Minari read the result unchanged (HDF5 >= 1.10). Arrays get a fixed size, so Minari can still add
    episodes to the dataset but not append steps to an existing episode. Minari's default layout spends ~14 KB of
    HDF5 index per episode (Hopper); this one ~2 KB.
    """
    import h5py
    from minari.dataset.minari_storage import MinariStorage

    file_path = Path(data_path) / "main_data.hdf5"

    def copy_group(source: Any, target: Any) -> None:
        target.attrs.update(dict(source.attrs))
        for key, item in source.items():
            if isinstance(item, h5py.Group):
                copy_group(item, target.create_group(key))
            elif item.size == 0 or item.dtype.kind in "OSU":
                target.create_dataset(key, data=item[()], dtype=item.dtype)
            else:
                filters = {"compression": "gzip", "compression_opts": level, "shuffle": True}
                target.create_dataset(key, data=item[()], chunks=item.shape, **filters)

    with atomic_path(file_path, suffix=".hdf5") as tmp:
        with h5py.File(file_path, "r") as source, h5py.File(tmp, "w", libver=("v110", "latest")) as target:
            copy_group(source, target)
    storage = MinariStorage.read(data_path)
    storage.update_metadata({"dataset_size": storage.get_size()})


@contextlib.contextmanager
def _minari_root(path: str | os.PathLike) -> Iterator[None]:
    """Point Minari at another datasets root for the duration of the block (Minari reads the variable at call time)."""
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = os.fspath(path)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def _ensure_namespaces(dataset_id: str, final_dir: Path) -> None:
    """Minari namespaces ('a/b' in 'a/b/name-v0') carry a metadata file; create the missing ones beside the dataset."""
    from minari.namespace import NAMESPACE_METADATA_FILENAME

    directory = final_dir.parent
    for _ in range(dataset_id.count("/")):
        metadata = directory / NAMESPACE_METADATA_FILENAME
        if not metadata.exists():
            metadata.write_text("{}")
        directory = directory.parent


def _float32_box(space: Any) -> Any:
    if not isinstance(space, gym.spaces.Box):
        raise DatasetError(f"`uepo data make` needs Box observation and action spaces, got {space}.")
    return gym.spaces.Box(low=space.low.astype(np.float32), high=space.high.astype(np.float32), dtype=np.float32)


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)
