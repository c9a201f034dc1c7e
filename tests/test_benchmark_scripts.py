"""The tables of ``benchmarks/offline_suite.py`` (the scripts are not a package: loaded by path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("offline_suite", ROOT / "benchmarks" / "offline_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(det: float, sto: float, stages: list[dict] | None = None, **extra) -> dict:
    job = dict(scores=dict(deterministic=det, stochastic=sto), wall_s=1.0, **extra)
    if stages is not None:
        job["stages"] = stages
    return job


def _member_rows(before: list[float], after: list[float]) -> list[dict]:
    rows = [dict(stage="members", member=i, deterministic=v) for i, v in enumerate(before)]
    return rows + [dict(stage="offline_ppo", member=i, deterministic=v, ope_normalized=None) for i, v in enumerate(after)]


def test_tables_report_every_method_and_the_uni_o4_stages(suite):
    behavior = [dict(stage="behavior", member=None, deterministic=80.0, stochastic=40.0)]
    data = {
        "data_returns": {"hopper-medium": 40.0},
        "jobs": {
            "hopper-medium|0|uepo": _job(
                80.0, 70.0, behavior + _member_rows([80.0], [80.0]), diffusion_bc=dict(deterministic=80.0, stochastic=40.0)
            ),
            "hopper-medium|0|uni_o4": _job(
                20.0, 18.0, _member_rows([41.0, 39.0], [20.0, 30.0]), regret=10.0, random_choice_regret=5.0
            ),
            "hopper-medium|0|bc": _job(40.0, 20.0),
        },
    }
    main = suite.table(data, ["hopper-medium"])
    assert "| hopper-medium | 40.0 | 80.0 / 70.0 (n=1) | 80.0 / 40.0 (n=1) | 20.0 / 18.0 (n=1) | 40.0 / 20.0 (n=1)" in main
    uni = suite.stage_table(data, ["hopper-medium"], "uni_o4")
    row = [line for line in uni.splitlines() if line.startswith("| hopper-medium")]
    assert row == ["| hopper-medium | 0 | - | 41.0, 39.0 | 20.0, 30.0 | 20.0 / 18.0 | - | 10.0 (5.0) |"]
    uepo = suite.stage_table(data, ["hopper-medium"])
    assert "| hopper-medium | 0 | 80.0 / 40.0 | 80.0 | 80.0 | 80.0 / 70.0 | - | - |" in uepo


def test_mish_speed_times_both_variants_and_restores_the_fast_path():
    spec = importlib.util.spec_from_file_location("mish_speed", ROOT / "benchmarks" / "mish_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from sb3_uepo.common import diffusion

    seen = []
    denoiser = diffusion.Denoiser(3, 11, (8,))
    x = torch.zeros(4, 3, requires_grad=True)

    def work():
        denoiser(x, torch.zeros(4, dtype=torch.long), torch.zeros(4, 11)).sum().backward()
        seen.append(denoiser.net[1].forward.__func__)

    times = module.alternate(work, repeats=2)
    assert set(times) == {"one_exp", "native"} and all(t > 0 for t in times.values())
    assert set(seen) == {module.FAST, module._native}
    assert diffusion.Mish.forward is module.FAST
    module.behaviour_work(steps=1, seed=0)()  # the behaviour workload runs


def test_noise_inversion_reports_reproduced_share_and_box_share(tiny_diffusion_policy_kwargs):
    from types import SimpleNamespace

    import numpy as np

    from sb3_uepo import UEPO

    spec = importlib.util.spec_from_file_location("noise_inversion", ROOT / "benchmarks" / "noise_inversion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    policy = UEPO("DiffusionPolicy", "Pendulum-v1", policy_kwargs=dict(tiny_diffusion_policy_kwargs, sampler="ddim")).policy
    rng = np.random.default_rng(0)
    data = SimpleNamespace(observations=rng.normal(size=(50, 3)), actions=rng.uniform(-2, 2, (50, 1)))
    row = module.measure(policy, data, n=8, bound=0.5, tolerance=0.1, seed=0)
    assert row["transitions"] == 8 and 0.0 <= row["reproduced_inside_box"] <= row["reproduced"] <= 1.0
    assert row["median_residual"] >= 0.0 and row["median_max_abs_noise"] >= 0.0


def test_offline_speed_times_both_ways_and_checks_the_same_policy(tmp_path, pendulum_npz, tiny_offline_kwargs):
    import json

    spec = importlib.util.spec_from_file_location("offline_speed", ROOT / "benchmarks" / "offline_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sizes = dict(denoiser_hidden_sizes=[16, 16], value_net_arch=[16, 16], n_diffusion_steps=6, n_sampling_steps=3)
    offline = json.dumps({**tiny_offline_kwargs, **sizes})
    threads = torch.get_num_threads()
    try:
        record = module.main(
            ["--dataset", str(pendulum_npz), "--env", "Pendulum-v1", "--offline", offline, "--json", str(tmp_path / "s.json")]
        )
    finally:
        torch.set_num_threads(threads)
    assert record["same_policy"] is True and record["speedup"] > 0
    assert set(record["runs"]) == {1, 2} and json.loads((tmp_path / "s.json").read_text())["jobs"] == 2
