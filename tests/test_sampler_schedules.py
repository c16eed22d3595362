"""Rectified-flow schedules and a whole trajectory against the official sampler's vectors,
for both the torch reference and the numpy runtime sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REF

from sorakit.export.sampler import rflow_sample as torch_sample
from sorakit.export.sampler import schedule
from sorakit.presets import SamplerConfig, latent_frames
from sorakit.runtime.sampler import rflow_sample as np_sample
from sorakit.runtime.sampler import timestep_schedule

SCHEDULES = json.loads((REF / "rflow_timesteps.json").read_text())["schedules"]


@pytest.mark.parametrize("name", sorted(k for k in SCHEDULES if k.endswith("_fp32args")))
def test_transformed_schedules(name):
    s = SCHEDULES[name]
    want = np.array(s["timesteps_transformed"], dtype=np.float32)
    lat = latent_frames(s["num_frames"])
    ours_torch = torch.cat(schedule(SamplerConfig(), 30, s["height"], s["width"], lat)).numpy()
    ours_np = timestep_schedule(SamplerConfig(), 30, s["height"], s["width"], lat)
    assert np.abs(ours_torch - want).max() <= 1e-4
    assert np.abs(ours_np - want).max() <= 1e-4


def test_schedule_256_68_frames():
    ts = timestep_schedule(SamplerConfig(), 30, 256, 256, latent_frames(68))
    r = 0.5 * np.sqrt(20)
    assert abs(r - 2.236) < 1e-3
    assert ts[0] == pytest.approx(1000.0)
    assert ts[1] == pytest.approx(984.8, abs=0.05)
    tau = 29 / 30
    assert ts[1] == pytest.approx(1000 * r * tau / (1 + (r - 1) * tau), rel=1e-6)


def toy_torch(z_in, t):
    c = torch.tensor([1.0, -1.0])[:, None, None, None, None]
    v = 0.5 * z_in + (t / 1000)[:, None, None, None, None] * c
    return torch.cat([v, torch.zeros_like(v)], 1)


def toy_np(z_in, t, step, active):
    c = np.array([1.0, -1.0], dtype=np.float32)[:, None, None, None, None]
    v = 0.5 * z_in + (t / 1000)[:, None, None, None, None] * c
    return np.concatenate([v, np.zeros_like(v)], 1)


def test_toy_trajectory_torch_and_numpy():
    d = np.load(REF / "rflow_toy_trajectory_128x128_17f.npz")
    steps = []
    z = torch_sample(
        toy_torch,
        torch.from_numpy(d["z0"]),
        height=128,
        width=128,
        cfg=SamplerConfig(),
        callback=lambda i, z: steps.append(z.numpy()),
    )
    for i, (got, want) in enumerate(zip(steps, d["z_per_step"][1:])):
        assert np.abs(got - want).max() <= 1e-4, f"torch sampler diverges at step {i}"
    assert np.abs(z.numpy() - d["z_final"]).max() <= 1e-4

    ts = timestep_schedule(SamplerConfig(), 30, 128, 128, 5)
    assert np.abs(ts - d["timesteps"]).max() <= 1e-4
    z_np, report = np_sample(toy_np, d["z0"], ts, 7.0)
    assert report.model_calls == 30
    assert np.abs(z_np - d["z_final"]).max() <= 1e-4
