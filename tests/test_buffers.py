"""DiffusionRolloutBuffer: shapes, alignment of the stored chains with their observations, GAE identical to SB3's
RolloutBuffer, the minibatch NamedTuple, reset and a full buffer (as SB3's tests/test_buffers.py)."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.type_aliases import RolloutBufferSamples
from stable_baselines3.common.utils import obs_as_tensor

from sb3_uepo.common.buffers import DiffusionRolloutBuffer
from sb3_uepo.common.policies import DiffusionPolicy
from sb3_uepo.common.type_aliases import DiffusionRolloutBufferSamples

BUFFER_SIZE, N_ENVS, N_SAMPLING_STEPS, OBS_DIM, ACTION_DIM = 8, 3, 4, 3, 2
OBSERVATION_SPACE = spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
ACTION_SPACE = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)


class DummyEnv(gym.Env):
    """Observations count the steps (SB3's tests/test_buffers.py): which step a sample came from can be read off it."""

    def __init__(self):
        self.observation_space = spaces.Box(0, 1000, (OBS_DIM,), np.float32)
        self.action_space = ACTION_SPACE
        self._t = 0
        self._ep_length = 5

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return np.full(OBS_DIM, self._t, dtype=np.float32), {}

    def step(self, action):
        self._t += 1
        obs = np.full(OBS_DIM, self._t, dtype=np.float32)
        return obs, float(self._t), False, self._t >= self._ep_length, {}


def make_buffer(buffer_class=DiffusionRolloutBuffer, buffer_size=BUFFER_SIZE, n_envs=N_ENVS, device="cpu", **kwargs):
    if buffer_class is DiffusionRolloutBuffer:
        kwargs.setdefault("n_sampling_steps", N_SAMPLING_STEPS)
    return buffer_class(
        buffer_size, OBSERVATION_SPACE, ACTION_SPACE, device=device, gamma=0.9, gae_lambda=0.8, n_envs=n_envs, **kwargs
    )


def planted_step(t, n_envs=N_ENVS):
    """One step of every env whose every entry encodes (step t, env e): ``code = 100 t + e``."""
    code = 100.0 * t + np.arange(n_envs, dtype=np.float32)  # (N,)
    obs = np.repeat(code[:, None], OBS_DIM, axis=1).astype(np.float32)
    # chain[e, j, a] = code + j / 10 + a / 100: every element of the chain is traceable to its step, env and position
    chain = code[:, None, None] + np.arange(N_SAMPLING_STEPS + 1)[None, :, None] / 10 + np.arange(ACTION_DIM) / 100
    step_log_probs = -(code[:, None] + np.arange(N_SAMPLING_STEPS)[None, :] / 10)  # (N, S)
    return dict(
        obs=obs,
        action=np.clip(chain[:, -1], -1, 1).astype(np.float32),
        reward=np.sin(code).astype(np.float32),
        episode_start=(np.arange(n_envs) + t) % 3 == 0,
        value=th.as_tensor(np.cos(code), dtype=th.float32).reshape(n_envs, 1),
        log_prob=th.as_tensor(step_log_probs.sum(-1), dtype=th.float32),
        chains=th.as_tensor(chain, dtype=th.float32),
        step_log_probs=step_log_probs.astype(np.float32),  # numpy and torch inputs are both accepted
    )


def fill(buffer, n_envs=N_ENVS):
    for t in range(buffer.buffer_size):
        step = planted_step(t, n_envs)
        extras = {"chains": step.pop("chains"), "step_log_probs": step.pop("step_log_probs")}
        if isinstance(buffer, DiffusionRolloutBuffer):
            buffer.add(*step.values(), **extras)
        else:
            buffer.add(*step.values())
    buffer.compute_returns_and_advantage(last_values=th.ones(n_envs, 1), dones=np.array([False, True, False][:n_envs]))
    return buffer


def test_add_and_get_shapes():
    buffer = make_buffer()
    assert buffer.chains.shape == (BUFFER_SIZE, N_ENVS, N_SAMPLING_STEPS + 1, ACTION_DIM)
    assert buffer.step_log_probs.shape == (BUFFER_SIZE, N_ENVS, N_SAMPLING_STEPS)
    fill(buffer)
    assert buffer.full and buffer.pos == BUFFER_SIZE

    samples = list(buffer.get(batch_size=5))
    n_total = BUFFER_SIZE * N_ENVS
    assert [len(s.observations) for s in samples] == [5] * (n_total // 5) + [n_total % 5]
    sample = samples[0]
    assert sample.observations.shape == (5, OBS_DIM)
    assert sample.actions.shape == (5, ACTION_DIM)
    for name in ("old_values", "old_log_prob", "advantages", "returns"):
        assert getattr(sample, name).shape == (5,), name
    assert sample.chains.shape == (5, N_SAMPLING_STEPS + 1, ACTION_DIM)
    assert sample.old_step_log_prob.shape == (5, N_SAMPLING_STEPS)
    # batch_size=None: the whole buffer at once
    (whole,) = list(buffer.get(batch_size=None))
    assert whole.chains.shape == (n_total, N_SAMPLING_STEPS + 1, ACTION_DIM)


def test_chains_and_step_log_probs_stay_with_their_observation():
    buffer = fill(make_buffer())
    seen = []
    for sample in buffer.get(batch_size=7):
        code = sample.observations[:, 0]  # 100 t + e
        seen.extend(code.tolist())
        expected_chain = (
            code[:, None, None]
            + th.arange(N_SAMPLING_STEPS + 1)[None, :, None] / 10
            + th.arange(ACTION_DIM)[None, None, :] / 100
        )
        assert th.allclose(sample.chains, expected_chain), "a chain was paired with another step's observation"
        expected_step_log_prob = -(code[:, None] + th.arange(N_SAMPLING_STEPS)[None, :] / 10)
        assert th.allclose(sample.old_step_log_prob, expected_step_log_prob)
        assert th.allclose(sample.old_log_prob, sample.old_step_log_prob.sum(-1))
        assert th.allclose(sample.actions, sample.chains[:, -1].clamp(-1, 1))
        assert th.allclose(sample.old_values, th.cos(code.double()).float())
    # every (step, env) pair exactly once per pass
    expected_codes = sorted(100.0 * t + e for t in range(BUFFER_SIZE) for e in range(N_ENVS))
    assert sorted(seen) == expected_codes


def test_gae_and_samples_equal_sb3_rollout_buffer():
    diffusion_buffer = fill(make_buffer())
    sb3_buffer = fill(make_buffer(RolloutBuffer))
    np.testing.assert_allclose(diffusion_buffer.advantages, sb3_buffer.advantages)
    np.testing.assert_allclose(diffusion_buffer.returns, sb3_buffer.returns)
    assert np.abs(diffusion_buffer.advantages).min() > 0  # not trivially equal (all zeros)

    np.random.seed(3)  # both buffers draw the same permutation
    diffusion_samples = list(diffusion_buffer.get(batch_size=6))
    np.random.seed(3)
    sb3_samples = list(sb3_buffer.get(batch_size=6))
    assert len(diffusion_samples) == len(sb3_samples) == BUFFER_SIZE * N_ENVS // 6
    for ours, theirs in zip(diffusion_samples, sb3_samples, strict=True):
        for name in RolloutBufferSamples._fields:
            assert th.equal(getattr(ours, name), getattr(theirs, name)), name


def test_samples_are_the_named_tuple():
    assert DiffusionRolloutBufferSamples._fields == (
        *RolloutBufferSamples._fields,
        "chains",
        "old_step_log_prob",
        "reference_means",
    )
    buffer = fill(make_buffer())
    sample = next(buffer.get(batch_size=4))
    assert isinstance(sample, DiffusionRolloutBufferSamples) and sample.reference_means is None
    for name, value in sample._asdict().items():
        if name != "reference_means":
            assert isinstance(value, th.Tensor) and value.dtype == th.float32, name
            assert value.device == th.device("cpu"), name


def test_reference_means_are_computed_once_and_follow_their_rows():
    """set_reference_means stores a frozen reference's means per row; minibatches carry the rows' own means."""
    buffer = fill(make_buffer())

    def fake_means(obs, chains):  # any function of the row, so that rows can be matched
        return chains[:, 1:] + obs[:, :1].unsqueeze(-1)

    buffer.set_reference_means(fake_means, chunk=5)
    for sample in buffer.get(batch_size=4):
        assert th.allclose(sample.reference_means, fake_means(sample.observations, sample.chains))
    buffer.reset()
    assert buffer.reference_means is None


def test_reset():
    buffer = fill(make_buffer())
    list(buffer.get(batch_size=8))  # flattens the arrays
    assert buffer.generator_ready and buffer.chains.shape[0] == BUFFER_SIZE * N_ENVS
    buffer.reset()
    assert buffer.pos == 0 and not buffer.full and not buffer.generator_ready
    assert buffer.chains.shape == (BUFFER_SIZE, N_ENVS, N_SAMPLING_STEPS + 1, ACTION_DIM)
    assert buffer.step_log_probs.shape == (BUFFER_SIZE, N_ENVS, N_SAMPLING_STEPS)
    assert not buffer.chains.any() and not buffer.step_log_probs.any()
    # usable again, with the same content as a fresh buffer
    fill(buffer)
    np.random.seed(0)
    again = next(buffer.get(batch_size=BUFFER_SIZE * N_ENVS))
    np.random.seed(0)
    fresh = next(fill(make_buffer()).get(batch_size=BUFFER_SIZE * N_ENVS))
    for name in DiffusionRolloutBufferSamples._fields[:-1]:  # reference_means: None in both
        assert th.equal(getattr(again, name), getattr(fresh, name)), name


@pytest.mark.parametrize("buffer_class", [RolloutBuffer, DiffusionRolloutBuffer])
def test_full_buffer_behaves_as_sb3(buffer_class):
    buffer = make_buffer(buffer_class, buffer_size=2)
    step = planted_step(0)
    extras = {"chains": step.pop("chains"), "step_log_probs": step.pop("step_log_probs")}
    if buffer_class is RolloutBuffer:
        extras = {}
    buffer.add(*step.values(), **extras)
    with pytest.raises(AssertionError):  # not full yet: no minibatches
        next(buffer.get(batch_size=2))
    buffer.add(*step.values(), **extras)
    assert buffer.full
    with pytest.raises(IndexError):  # as SB3: no room for a third step
        buffer.add(*step.values(), **extras)


def test_bad_input():
    with pytest.raises(ValueError, match="n_sampling_steps"):
        make_buffer(n_sampling_steps=0)
    buffer = make_buffer()
    step = planted_step(0)
    step.pop("step_log_probs")
    chains = step.pop("chains")
    with pytest.raises(ValueError, match="chains= and step_log_probs="):
        buffer.add(*step.values())
    with pytest.raises(ValueError, match="step_log_probs="):
        buffer.add(*step.values(), chains=chains)
    with pytest.raises(ValueError):  # chains of the wrong number of denoising steps
        buffer.add(*step.values(), chains=chains[:, :-1], step_log_probs=np.zeros((N_ENVS, N_SAMPLING_STEPS)))


def test_rollout_of_a_policy_scores_back_to_its_stored_log_probs():
    """Filled from a real DiffusionPolicy on a counting env: re-scoring the stored chains under the unchanged policy
    gives the stored per-step log-probabilities (PPO's first ratio is 1), and observations stay with their chains."""
    th.manual_seed(0)
    env = make_vec_env(DummyEnv, n_envs=2)
    policy = DiffusionPolicy(
        env.observation_space, env.action_space, lambda _: 1e-3, net_arch=[16, 16], n_train_steps=8, n_sampling_steps=3
    )
    buffer = DiffusionRolloutBuffer(
        6, env.observation_space, env.action_space, device="cpu", n_envs=2, n_sampling_steps=policy.n_sampling_steps
    )
    obs = env.reset()
    episode_starts = np.ones(2, dtype=bool)
    for _ in range(6):
        with th.no_grad():
            sample = policy.sample_chain_with_values(obs_as_tensor(obs, "cpu"))
        new_obs, rewards, dones, _ = env.step(sample.actions.numpy())
        buffer.add(
            obs,
            sample.actions.numpy(),
            rewards,
            episode_starts,
            sample.values,
            sample.log_prob,
            chains=sample.chain,
            step_log_probs=sample.step_log_prob,
        )
        obs, episode_starts = new_obs, dones
    with th.no_grad():
        buffer.compute_returns_and_advantage(policy.predict_values(obs_as_tensor(obs, "cpu")), dones)

    n_seen = 0
    for batch in buffer.get(batch_size=5):
        with th.no_grad():
            evaluation = policy.evaluate_chains(batch.observations, batch.chains)
        assert th.allclose(evaluation.step_log_prob, batch.old_step_log_prob, atol=1e-4)
        assert th.allclose(evaluation.values.flatten(), batch.old_values, atol=1e-5)
        assert not th.allclose(batch.chains[:, 0], batch.chains[:, -1])  # the chain moved: a real chain, not zeros
        n_seen += len(batch.observations)
    assert n_seen == 12
    # and a chain scored under another observation does not score the same (the check above can fail)
    batch = next(buffer.get(batch_size=12))
    with th.no_grad():
        shuffled = policy.evaluate_chains(batch.observations.flip(0) + 1.0, batch.chains)
    assert not th.allclose(shuffled.step_log_prob, batch.old_step_log_prob, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_device_buffer(device):
    if device == "cuda" and not th.cuda.is_available():
        pytest.skip("CUDA not available")
    buffer = fill(make_buffer(device=device))
    for sample in buffer.get(batch_size=6):
        for name, value in sample._asdict().items():
            assert value is None or value.device.type == device, name
