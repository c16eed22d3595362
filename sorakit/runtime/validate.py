"""The arguments of ``Pipeline.from_bundle`` and ``Pipeline.__call__``, checked before any work.

``open_args`` and ``generation_args`` are called first thing by the pipeline; ``cli_options``
checks the same settings under their command-line names before `sorakit generate` loads
anything (and is what the property tests drive). Every failure is an ``InvalidArgument``
(``ValueError``) or ``InvalidArgumentType`` (``TypeError``) naming the argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sorakit import validate as v
from sorakit.errors import InvalidArgument, InvalidArgumentType
from sorakit.memory import available_memory, total_memory
from sorakit.runtime.sampler import LPL
from sorakit.units import human_bytes, parse_bytes

UNLIMITED = ("unlimited", "none")
MAX_STEP_CACHE = 10.0  # an accumulated relative change; beyond a few, every step would be skipped
VIDEO_SUFFIXES = (".mp4", ".gif")


def _api(name: str) -> str:
    return name


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def memory_budget(spec: Any, force: bool = False, name: str = "memory_budget") -> int | str | None:
    """None (the device's default), "unlimited", or a number of bytes (from 2GB, 40 %, 3e9, ...).

    A budget above the machine's physical memory is refused unless ``force``: it cannot be
    honoured here (use it only to plan for a bigger device).
    """
    if spec is None:
        return None
    if isinstance(spec, str) and spec.strip().lower() in UNLIMITED:
        return "unlimited"
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool) and spec == 0:
        return "unlimited"
    try:
        n = parse_bytes(spec, available_memory())
    except InvalidArgument as e:
        raise type(e)(f"{name}: {e}", hint=e.hint or "use e.g. 2GB, 512MiB, 40% or unlimited") from None
    total = total_memory()
    if n > total and not force:
        raise InvalidArgument(
            f"{name} {spec} ({human_bytes(n)}) is more than this machine's physical memory ({human_bytes(total)})",
            hint=f"use at most {human_bytes(total)}, 'unlimited', or force it (--force-budget; force_budget=True) "
                 "to plan for a bigger device")
    return n


PRECISIONS = ("fp32", "int8", "bf16", "fp16", "f32")  # f32: OpenVINO computing in fp32 (fp32 lets the plan choose)


def open_args(path: Any, device: Any, memory_budget_: Any, strict: Any, threads: Any, prefetch: Any, verify: Any,
              force_budget: Any = False, precision: Any = None
              ) -> tuple[Path, Any, int | str | None, bool, int | None, bool, bool, str | None]:
    """The arguments of ``Pipeline.from_bundle``, checked; the budget is resolved to bytes."""
    if path is None:
        raise InvalidArgumentType("path is None; give a bundle directory (made by `sorakit export`)")
    path = v.path_like("bundle path", path)
    from sorakit.profiles import DeviceProfile

    if not isinstance(device, (str, DeviceProfile)):
        raise InvalidArgumentType(f"device must be a profile name (e.g. 'cpu') or a DeviceProfile, "
                                  f"got {type(device).__name__}")
    force_budget = v.boolean("force_budget", force_budget)
    budget = memory_budget(memory_budget_, force_budget)
    strict = v.boolean("strict", strict)
    threads = None if threads is None else v.threads(threads)
    prefetch = v.boolean("prefetch", prefetch)
    verify = v.boolean("verify", verify)
    precision = None if precision is None else v.choice("precision", precision, PRECISIONS)
    return path, device, budget, strict, threads, prefetch, verify, precision


def lpl_setting(spec: Any, steps: int | None = None, name: str = "lpl") -> LPL:
    """Parse an LPL setting and, when the step count is known, check it fits the schedule."""
    try:
        lpl = LPL.parse(spec)
        if steps is not None:
            lpl.validate(steps)
    except InvalidArgument as e:
        msg = str(e)
        raise type(e)(msg if msg.lower().startswith(("lpl", "dynamic lpl", "unknown lpl")) else f"{name}: {msg}",
                      hint=e.hint) from None
    return lpl


def cli_options(*, prompt: Any = "x", steps: Any = None, cfg: Any = None, cfg_max_t: Any = None, seed: Any = 0,
                lpl: Any = None, tdtm_steps: Any = 0, threads: Any = None, fps: Any = 24, memory_budget_: Any = None,
                force_budget: bool = False, out: Any = None, device: str | None = None, precision: Any = None,
                step_cache: Any = None, name: Callable[[str], str] = cli_flag) -> dict[str, Any]:
    """Everything `sorakit generate` can check before it opens a bundle, under the options' names.

    Returns the normalised values (``memory_budget`` in bytes or "unlimited")."""
    ok: dict[str, Any] = {"prompt": v.prompt(prompt)}
    ok["steps"] = None if steps is None else v.steps(steps, name("steps"))
    ok["cfg"] = None if cfg is None else v.cfg(cfg, name("cfg"))
    ok["cfg_max_t"] = None if cfg_max_t is None else v.timestep_bound(cfg_max_t, name("cfg_max_t"))
    ok["seed"] = v.seed(seed, name("seed"))
    ok["lpl"] = lpl_setting(lpl, ok["steps"], name("lpl"))
    ok["tdtm_steps"] = v.integer(name("tdtm_steps"), tdtm_steps, min=0, max=ok["steps"] or v.MAX_STEPS)
    ok["threads"] = None if threads is None else v.threads(threads, name("threads"))
    ok["fps"] = v.fps(fps, name("fps"))
    ok["memory_budget"] = memory_budget(memory_budget_, force_budget, name("memory_budget"))
    ok["out"] = None if out is None else v.output_file(out, VIDEO_SUFFIXES, name("out"))
    ok["precision"] = None if precision is None else v.choice(name("precision"), precision, PRECISIONS)
    ok["step_cache"] = None if step_cache is None else v.number(name("step_cache"), step_cache, min=0.0,
                                                                max=MAX_STEP_CACHE)
    if device is not None:
        from sorakit.profiles import get_profile

        ok["device"] = get_profile(device)
    return ok


@dataclass
class GenerationArgs:
    prompts: list[str]
    steps: int
    cfg: float
    cfg_max_t: float | None
    seed: int
    lpl: LPL
    tdtm_steps: int
    height: int
    width: int
    num_frames: int
    noise: np.ndarray | None
    callback: Callable | None
    step_cache: float | None = None


def generation_args(pipe, prompt: Any, *, steps: Any, cfg: Any, cfg_max_t: Any, seed: Any, lpl: Any,
                    tdtm_steps: Any, height: Any, width: Any, num_frames: Any, noise: Any,
                    callback: Any, step_cache: Any = None) -> GenerationArgs:
    """The arguments of ``Pipeline.__call__`` checked against the pipeline's bundle, defaults filled in."""
    prompts = v.prompts(prompt)
    for key, val in (("height", height), ("width", width)):
        if val is not None:
            v.integer(key, val, min=1, max=v.MAX_SIDE)
    if num_frames is not None:
        v.frames(num_frames, "num_frames")
    height, width, num_frames = pipe._geometry(height, width, num_frames)
    sampler = pipe.preset.sampler
    ms = pipe.manifest.sampler
    steps = int(ms.get("num_steps", sampler.num_steps)) if steps is None else v.steps(steps)
    cfg = v.cfg(ms.get("cfg_scale", sampler.cfg_scale) if cfg is None else cfg)
    if cfg_max_t is None:
        cfg_max_t = ms.get("guidance_max_t", sampler.guidance_max_t)
    cfg_max_t = None if cfg_max_t is None else v.timestep_bound(cfg_max_t)
    seed = v.seed(seed)
    lpl = lpl_setting(lpl, steps)
    tdtm_steps = v.integer("tdtm_steps", tdtm_steps, min=0, max=steps)
    if tdtm_steps:
        pipe._blocks(True)  # the bundle must have TDTM variants
    if noise is not None:
        shape = (len(prompts), pipe.preset.stdit.in_channels, *pipe.preset.latent_size(num_frames, height, width))
        noise = v.finite_array("noise", noise, shape)
    callback = v.callback(callback)
    step_cache = None if step_cache is None else v.number("step_cache", step_cache, min=0.0, max=MAX_STEP_CACHE)
    return GenerationArgs(prompts, steps, cfg, cfg_max_t, seed, lpl, tdtm_steps, height, width, num_frames, noise,
                          callback, step_cache)


__all__ = ["GenerationArgs", "cli_options", "generation_args", "lpl_setting", "memory_budget", "open_args",
           "InvalidArgument", "InvalidArgumentType"]
