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


def guided_toy_np(z_in, t, step, active, n=None):
    """Prompt half and null half give different velocities, so the CFG scale shows in the result.
    z_in holds the prompt half only (unguided steps) when its batch is the number of samples."""
    n = len(active) if n is None else n
    assert len(z_in) in (n, 2 * n) and len(t) == len(z_in)
    v = 0.5 * z_in + (t / 1000)[:, None, None, None, None]
    v[n:] *= np.float32(0.25)
    return v


def guided_toy_torch(z_in, t):
    return torch.from_numpy(guided_toy_np(z_in.numpy(), t.numpy(), 0, None, n=2))


@pytest.mark.parametrize("max_t", [800.0, 950.0])
def test_guidance_interval(max_t):
    """CFG only at t <= max_t; above it the prompt's velocity alone, in both samplers."""
    rng = np.random.default_rng(4)
    z0 = rng.standard_normal((2, 2, 3, 2, 2)).astype(np.float32)
    cfg = SamplerConfig(transform_base_resolution=64 * 64, guidance_max_t=max_t)
    ts = timestep_schedule(cfg, 30, 64, 64, z0.shape[2])
    # an independent Euler loop with the scale chosen per step
    z = z0.copy()
    for i, t in enumerate(ts):
        out = guided_toy_np(np.concatenate([z, z]), np.full(4, t, np.float32), i, np.arange(2))
        s = 1.0 if t > max_t else 7.0
        v = out[2:] + np.float32(s) * (out[:2] - out[2:])
        z = z + v * ((ts[i] - ts[i + 1]) if i < 29 else ts[i]) / np.float32(1000)
    sizes = []

    def sized(z_in, t, step, active):
        sizes.append(len(z_in))
        return guided_toy_np(z_in, t, step, active)

    got, report = np_sample(sized, z0, ts, 7.0, guidance_max_t=max_t)
    assert np.abs(got - z).max() <= 1e-5
    unguided = int((ts > max_t).sum())
    assert 0 < unguided < 30
    assert sizes == [2] * unguided + [4] * (30 - unguided)  # the null half is skipped where unused
    assert report.cfg_scales == [1.0] * unguided + [7.0] * (30 - unguided)
    full, full_report = np_sample(guided_toy_np, z0, ts, 7.0)
    assert full_report.cfg_scales == [7.0] * 30
    assert np.abs(full - got).max() > 1e-2  # the interval changes the result
    at_1000, _ = np_sample(guided_toy_np, z0, ts, 7.0, guidance_max_t=1000.0)
    assert np.array_equal(at_1000, full)  # 1000 = every step, as without an interval

    sizes.clear()

    def sized_torch(z_in, t):
        sizes.append(len(z_in))
        return guided_toy_torch(z_in, t)

    ref = torch_sample(sized_torch, torch.from_numpy(z0), height=64, width=64, cfg=cfg)
    assert sizes == [2] * unguided + [4] * (30 - unguided)
    assert np.abs(ref.numpy() - got).max() <= 1e-4


def test_dynamic_lpl_restarts_its_watch_at_the_guidance_switch():
    """The cosine across the edge of the guidance interval compares two kinds of velocity: the
    dynamic leap must not count it, and starts counting again from the first guided step."""
    from sorakit.runtime.sampler import LPL

    z0 = np.random.default_rng(5).standard_normal((1, 2, 3, 2, 2)).astype(np.float32)
    ts = timestep_schedule(SamplerConfig(), 30, 64, 64, 3)
    lpl = LPL("dynamic", start=2, tolerance=1.0, patience=3)  # tolerance 1: nothing after the first check improves
    _, plain = np_sample(guided_toy_np, z0, ts, 7.0, lpl)
    assert plain.leap_step == [2 + 3]
    switch = 4
    _, report = np_sample(guided_toy_np, z0, ts, 7.0, lpl, guidance_max_t=float(ts[switch - 1] + ts[switch]) / 2)
    assert report.cfg_scales[switch - 1 : switch + 1] == [1.0, 7.0]
    assert report.leap_step == [switch + 1 + 3]


@pytest.mark.parametrize("transform", [True, False])
@pytest.mark.parametrize("max_t", [None, 800.0])
def test_runtime_sampler_mirrors_the_torch_reference(transform, max_t):
    """runtime/sampler.py is a numpy mirror of export/sampler.py: the same schedules and the same
    trajectory (CFG, guidance interval) on the same inputs, over a spread of geometries."""
    cfg = SamplerConfig(use_timestep_transform=transform, guidance_max_t=max_t)
    for steps, (h, w), lat in ((7, (64, 64), 1), (30, (144, 256), 5), (30, (720, 1280), 20), (13, (256, 256), 17)):
        ts_np = timestep_schedule(cfg, steps, h, w, lat)
        ts_torch = torch.cat(schedule(cfg, steps, h, w, lat)).numpy()
        assert ts_np.dtype == np.float32
        assert np.array_equal(ts_np, ts_torch), (steps, h, w, np.abs(ts_np - ts_torch).max())
    rng = np.random.default_rng(11)
    z0 = rng.standard_normal((2, 2, 5, 3, 3)).astype(np.float32)
    weights = rng.standard_normal((4, 2)).astype(np.float32)

    def model_np(z_in, t, step, active):  # nonlinear in z and t; prompt and null halves differ
        v = np.tanh(np.einsum("oc,bcthw->bothw", weights, z_in)) * (t / 1000)[:, None, None, None, None]
        if len(z_in) == 2 * len(active):
            v[len(active):] *= np.float32(0.3)
        return v.astype(np.float32)

    def model_torch(z_in, t):
        return torch.from_numpy(model_np(z_in.numpy(), t.numpy(), 0, np.arange(len(z0))))

    ts = timestep_schedule(cfg, 30, 144, 256, z0.shape[2])
    got, _ = np_sample(model_np, z0, ts, 6.0, guidance_max_t=max_t)
    want = torch_sample(model_torch, torch.from_numpy(z0), height=144, width=256, cfg=cfg, cfg_scale=6.0).numpy()
    assert np.abs(got - want).max() <= 1e-5
