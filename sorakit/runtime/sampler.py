"""Open-Sora 1.2 rectified flow in numpy, with Linear Proportional Leap (LPL).

Matches the torch reference (``sorakit.export.sampler``) step for step: the same fp32
schedule, CFG as one batch of two (prompt first, null caption second), v = x0 - eps and
Euler updates z <- z + v dt/1000.

LPL (On-device Sora, section 1):

* ``fixed``: ``leap_at`` = n ordinary steps, then one more model call at t_n and a leap
  straight to t = 0 with that velocity: z0 = z_n + v_n t_n / 1000 (n + 1 calls in all).
* ``dynamic``: from step ``start`` on, the cosine similarity of consecutive CFG velocities,
  computed over each sample's whole latent, must keep improving by more than ``tolerance``;
  after ``patience`` steps without improvement that sample leaps. Samples leap
  independently, and all state lives in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sorakit.errors import SorakitError
from sorakit.presets import SamplerConfig, guidance_scale


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """sorakit's noise convention (also used by the torch reference): PCG64, standard normal."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def timestep_schedule(
    cfg: SamplerConfig, num_steps: int, height: float, width: float, latent_frames: int
) -> np.ndarray:
    """Transformed timesteps [num_steps] (fp32), computed in the torch reference's order."""
    f32 = np.float32
    raw = np.array([f32((1.0 - i / num_steps) * cfg.num_timesteps) for i in range(num_steps)], dtype=f32)
    if not cfg.use_timestep_transform:
        return raw
    tau = raw / f32(cfg.num_timesteps)
    resolution = f32(height) * f32(width)
    ratio_space = np.sqrt(resolution / f32(cfg.transform_base_resolution))
    ratio_time = np.sqrt(f32(latent_frames) / f32(cfg.transform_base_num_frames))
    ratio = ratio_space * ratio_time * f32(cfg.transform_scale)
    return (ratio * tau / (f32(1) + (ratio - f32(1)) * tau) * f32(cfg.num_timesteps)).astype(f32)


@dataclass(frozen=True)
class LPL:
    """Linear Proportional Leap settings. ``mode``: "off", "fixed" or "dynamic"."""

    mode: str = "off"
    leap_at: int = 15  # fixed: ordinary steps before the leap (the paper's 15 of 30)
    start: int = 14  # dynamic: first step at which the similarity is checked
    tolerance: float = 1e-3  # dynamic: improvement that counts
    patience: int = 3  # dynamic: steps without improvement before leaping

    @staticmethod
    def parse(spec: str | None) -> LPL:
        """ "off", "15" / "fixed:15", "dynamic" or "dynamic:start=14,tol=1e-3,patience=3"."""
        if spec is None or spec in ("", "off", "none", "0"):
            return LPL()
        if spec.isdigit():
            return LPL("fixed", leap_at=int(spec))
        mode, _, rest = spec.partition(":")
        if mode == "fixed":
            if not rest.isdigit():
                raise SorakitError(f"--lpl fixed needs a step count, e.g. fixed:15 (got {spec!r})")
            return LPL("fixed", leap_at=int(rest))
        if mode == "dynamic":
            kw = {}
            names = {
                "start": ("start", int),
                "tol": ("tolerance", float),
                "tolerance": ("tolerance", float),
                "patience": ("patience", int),
            }
            for part in filter(None, rest.split(",")):
                k, _, v = part.partition("=")
                if k not in names:
                    raise SorakitError(f"unknown dynamic LPL setting {k!r} in {spec!r} (start, tol, patience)")
                name, conv = names[k]
                try:
                    kw[name] = conv(v)
                except ValueError:
                    raise SorakitError(f"bad value for {k} in --lpl {spec!r}") from None
            return LPL("dynamic", **kw)
        raise SorakitError(
            f"unknown LPL setting {spec!r}: use off, N, fixed:N or dynamic[:start=..,tol=..,patience=..]"
        )

    def validate(self, num_steps: int) -> None:
        if self.mode == "fixed" and not 0 <= self.leap_at < num_steps:
            raise SorakitError(f"LPL leap_at={self.leap_at} must be in [0, {num_steps - 1}] for {num_steps} steps")
        if self.mode == "dynamic" and (self.patience < 1 or self.start < 1):
            raise SorakitError("dynamic LPL needs start >= 1 and patience >= 1")


@dataclass
class SampleReport:
    model_calls: int = 0  # transformer evaluations (each a batch of 2 x active samples)
    leap_step: list[int | None] = field(default_factory=list)  # per sample; None = no leap
    cosine: list[list[float]] = field(default_factory=list)  # per step, per active sample (nan if n/a)
    timesteps: list[float] = field(default_factory=list)
    cfg_scales: list[float] = field(default_factory=list)  # the CFG scale used at each step
    cached_steps: int = 0  # model calls answered by the step cache (blocks skipped; runtime only)


# velocity_fn(z_in, t, step, active sample indices [k]) -> output with z_in's batch: z_in is
# [2k, C, T, h, w] (prompt half, then null-caption half) at guided steps and [k, ...] (prompt
# only) at steps with CFG scale 1 (outside the guidance interval, or cfg 1), where the null
# half would be thrown away; t has z_in's batch.
VelocityFn = Callable[[np.ndarray, np.ndarray, int, np.ndarray], np.ndarray]


def cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 0.0)


def rflow_sample(
    model: VelocityFn,
    z: np.ndarray,
    timesteps: np.ndarray,
    cfg_scale: float,
    lpl: LPL = LPL(),
    num_timesteps: int = 1000,
    on_step: Callable[[int, SampleReport], None] | None = None,
    guidance_max_t: float | None = None,
) -> tuple[np.ndarray, SampleReport]:
    """Run the sampler on noise z [n, C, T, h, w]; returns the final latent and a report.

    ``guidance_max_t``: the guidance interval; steps whose timestep is above it use the prompt's
    velocity alone (CFG scale 1, the model runs on the prompt half only). None: CFG at every step.
    """
    n, C = z.shape[0], z.shape[1]
    num_steps = len(timesteps)
    lpl.validate(num_steps)
    z = z.astype(np.float32).copy()
    report = SampleReport(leap_step=[None] * n, timesteps=[float(t) for t in timesteps])
    active = np.arange(n)
    prev_v: np.ndarray | None = None
    best = np.full(n, -np.inf)
    patience = np.full(n, lpl.patience)
    for i, t in enumerate(timesteps):
        if active.size == 0:
            break
        za = z[active]
        scale = np.float32(guidance_scale(float(t), cfg_scale, guidance_max_t))
        report.cfg_scales.append(float(scale))
        if scale == 1:  # the prompt's velocity alone: the null-caption half is not computed
            v = model(za, np.full(active.size, t, dtype=np.float32), i, active)[:, :C].astype(np.float32)
        else:
            t_in = np.full(2 * active.size, t, dtype=np.float32)
            out = model(np.concatenate([za, za]), t_in, i, active)[:, :C]
            v_cond, v_uncond = out[: active.size], out[active.size :]
            v = (v_uncond + scale * (v_cond - v_uncond)).astype(np.float32)
        report.model_calls += 1

        cos = np.full(n, np.nan)
        if prev_v is not None:
            cos[active] = cosine_per_sample(v, prev_v[active])
        report.cosine.append([float(c) for c in cos])

        leap = np.zeros(active.size, dtype=bool)
        # at the edge of the guidance interval v changes meaning (prompt alone -> CFG): a cosine
        # across it says nothing about straightening, so dynamic LPL starts its watch afresh
        switched = i > 0 and report.cfg_scales[-1] != report.cfg_scales[-2]
        if lpl.mode == "fixed" and i == lpl.leap_at:
            leap[:] = True
        elif lpl.mode == "dynamic" and switched:
            best[active], patience[active] = -np.inf, lpl.patience
        elif lpl.mode == "dynamic" and i >= lpl.start and prev_v is not None:
            for j, s in enumerate(active):
                if cos[s] > best[s] + lpl.tolerance:
                    best[s], patience[s] = cos[s], lpl.patience
                else:
                    patience[s] -= 1
                leap[j] = patience[s] <= 0

        dt_step = (timesteps[i] - timesteps[i + 1]) if i < num_steps - 1 else timesteps[i]
        dt = np.where(leap, t, dt_step).astype(np.float32) / np.float32(num_timesteps)
        z[active] = za + v * dt[:, None, None, None, None]
        if prev_v is None:
            prev_v = np.zeros_like(z)
        prev_v[active] = v
        for j in np.flatnonzero(leap):
            report.leap_step[active[j]] = i
        active = active[~leap]
        if on_step is not None:
            on_step(i, report)
    return z, report


def first_guided_step(timesteps: np.ndarray, guidance_max_t: float | None) -> int:
    """Index of the first step inside the guidance interval (len(timesteps) if none is)."""
    if guidance_max_t is None:
        return 0
    inside = np.flatnonzero(np.asarray(timesteps) <= guidance_max_t)
    return int(inside[0]) if inside.size else len(timesteps)


def to_uint8_video(video: np.ndarray) -> np.ndarray:
    """[n, 3, F, H, W] in about [-1, 1] -> [n, F, H, W, 3] uint8 (Open-Sora's save_sample)."""
    x = (np.clip(video, -1.0, 1.0) + 1.0) / 2.0
    x = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))
