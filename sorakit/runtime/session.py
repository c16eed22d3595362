"""ONNX Runtime sessions for bundle graphs, with the device profile's providers.

The profile lists providers in order of preference. A provider this onnxruntime build does
not have is dropped with a reported fallback, or refused in strict mode. In strict mode ORT's
own silent fallbacks are disabled too (no CPU nodes under Core ML, no retry on CPU).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from sorakit.errors import ProviderError
from sorakit.profiles import DeviceProfile

log = logging.getLogger(__name__)


@dataclass
class ProviderPlan:
    requested: list[str]
    selected: list[tuple[str, dict[str, str]]]
    fallbacks: list[str] = field(default_factory=list)  # human-readable notes


def plan_providers(profile: DeviceProfile, strict: bool = False, cache_dir: str | Path | None = None) -> ProviderPlan:
    available = set(ort.get_available_providers())
    requested = [p.name for p in profile.providers]
    selected, notes = [], []
    for name, options in profile.provider_options(cache_dir):
        if name in available:
            if name == "CoreMLExecutionProvider" and "ModelCacheDirectory" in options:
                os.makedirs(options["ModelCacheDirectory"], exist_ok=True)
            selected.append((name, options))
            continue
        msg = (
            f"{name} is not available in this onnxruntime build (it has: {', '.join(sorted(available))}); "
            f"device {profile.name!r} falls back to the next provider"
        )
        if strict:
            raise ProviderError(msg.replace("falls back to the next provider", "cannot run in strict mode"),
                                hint="drop --strict to allow the CPU fallback, or use an onnxruntime build with it")
        notes.append(msg)
    if not selected or selected[-1][0] != "CPUExecutionProvider":
        selected.append(("CPUExecutionProvider", {}))
    for n in notes:
        log.warning(n)
    return ProviderPlan(requested, selected, notes)


@dataclass
class SessionOptions:
    threads: int = 0  # intra-op threads; 0 = ORT's default (all cores)
    # Repack MatMul weights at load (the scheduler turns it off for streamed sessions). On a
    # real-size STDiT3 block pair (2 cores) runs take ~1.06 s with it and ~1.25 s without.
    prepack: bool = True
    arena: bool = False  # CPU memory arena (keeps activation memory per session)
    strict: bool = False


class SessionFactory:
    def __init__(self, plan: ProviderPlan, defaults: SessionOptions | None = None):
        self.plan = plan
        self.defaults = defaults or SessionOptions()

    def options(self, threads: int | None = None, prepack: bool | None = None) -> ort.SessionOptions:
        d = self.defaults
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = d.arena
        t = d.threads if threads is None else threads
        if t:
            so.intra_op_num_threads = t
        so.inter_op_num_threads = 1
        if not (d.prepack if prepack is None else prepack):
            so.add_session_config_entry("session.disable_prepacking", "1")
        if d.strict and any(name != "CPUExecutionProvider" for name, _ in self.plan.selected):
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return so

    def create(self, path: Path, so: ort.SessionOptions | None = None) -> ort.InferenceSession:
        so = so or self.options()
        names = [n for n, _ in self.plan.selected]
        opts = [o for _, o in self.plan.selected]
        sess = ort.InferenceSession(str(path), so, providers=names, provider_options=opts)
        if self.defaults.strict:
            sess.disable_fallback()
            missing = [n for n in names if n not in sess.get_providers()]
            if missing:
                raise ProviderError(f"{path.name}: onnxruntime did not enable {missing} (strict mode)")
        return sess
