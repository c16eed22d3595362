"""Open-Sora 1.2 rectified-flow sampler in torch: the reference the numpy runtime must match.

Convention: x_t = (1 - t/1000) x0 + (t/1000) eps, the model predicts v = x0 - eps, Euler
steps z <- z + v (t_i - t_{i+1})/1000 with the last step landing on t = 0. CFG runs the model
on a batch of two (prompt first, null caption second) and combines v_u + s (v_c - v_u); with a
guidance interval (``SamplerConfig.guidance_max_t``, off for the Open-Sora presets) steps above
it use s = 1, the prompt's velocity alone.

One deliberate difference from the official code: the timestep transform uses the *actual*
number of latent frames. Open-Sora computes ``num_frames // 17 * 5``, which is the same for
every multiple of 17 and for single images, and 0 (a collapsed schedule) for 2..16 frames.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sorakit.presets import SamplerConfig


# Mirror of sorakit.runtime.sampler.timestep_schedule: keep in sync
# (tests/test_sampler_schedules.py::test_runtime_sampler_mirrors_the_torch_reference).
def timestep_transform(
    t: torch.Tensor, height: float, width: float, latent_frames: int, cfg: SamplerConfig
) -> torch.Tensor:
    """tau' = r tau / (1 + (r - 1) tau), r = sqrt(HW / base_res) * sqrt(T_lat / base_frames)."""
    tau = t / cfg.num_timesteps
    resolution = torch.tensor([float(height)]) * torch.tensor([float(width)])
    ratio_space = (resolution / cfg.transform_base_resolution).sqrt()
    ratio_time = (torch.tensor([float(latent_frames)]) / cfg.transform_base_num_frames).sqrt()
    ratio = ratio_space * ratio_time * cfg.transform_scale
    return ratio * tau / (1 + (ratio - 1) * tau) * cfg.num_timesteps


def schedule(cfg: SamplerConfig, num_steps: int, height: float, width: float, latent_frames: int) -> list[torch.Tensor]:
    """The transformed timesteps, one [1] fp32 tensor per step."""
    raw = [(1.0 - i / num_steps) * cfg.num_timesteps for i in range(num_steps)]
    ts = [torch.tensor([t], dtype=torch.float32) for t in raw]
    if cfg.use_timestep_transform:
        ts = [timestep_transform(t, height, width, latent_frames, cfg) for t in ts]
    return ts


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# Mirror of sorakit.runtime.sampler.rflow_sample (without LPL): keep in sync
# (tests/test_sampler_schedules.py::test_runtime_sampler_mirrors_the_torch_reference).
@torch.no_grad()
def rflow_sample(
    model_fn: ModelFn,
    z: torch.Tensor,
    *,
    height: float,
    width: float,
    cfg: SamplerConfig,
    num_steps: int | None = None,
    cfg_scale: float | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample from noise z [n,C,T,h,w]. ``model_fn(z_in, t)`` returns [len(z_in), Cout, ...]; z_in is
    [2n, ...] (prompt half, then null-caption half) at guided steps and [n, ...] (prompt only) at
    steps with CFG scale 1."""
    num_steps = num_steps or cfg.num_steps
    scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
    n = z.shape[0]
    timesteps = schedule(cfg, num_steps, height, width, z.shape[2])
    for i, t in enumerate(timesteps):
        s = cfg.guidance_at(float(t), scale)
        if s == 1:  # the prompt's velocity alone: the model runs on the prompt half only
            v = model_fn(z, t.expand(n).contiguous())[:, : z.shape[1]]
        else:
            pred = model_fn(torch.cat([z, z]), t.expand(2 * n).contiguous())[:, : z.shape[1]]
            v_cond, v_uncond = pred.chunk(2)
            v = v_uncond + s * (v_cond - v_uncond)
        dt = (timesteps[i] - timesteps[i + 1]) if i < num_steps - 1 else timesteps[i]
        z = z + v * (dt / cfg.num_timesteps)
        if callback is not None:
            callback(i, z)
    return z
