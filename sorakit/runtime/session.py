"""Sessions for bundle graphs: ONNX Runtime with the device profile's providers, or OpenVINO.

The profile lists providers in order of preference. A provider this installation does not
have is dropped with a reported fallback, or refused in strict mode. In strict mode ORT's
own silent fallbacks are disabled too (no CPU nodes under Core ML, no retry on CPU).

``OpenVINO`` in a profile is a second runtime rather than an ORT execution provider: the
``openvino`` package (extra ``sorakit[openvino]``) reads the same ONNX files and computes in
bf16 on CPUs that have it (AVX512-BF16, AMX). It is reported like an execution provider when
it is missing. Which graphs it runs is the execution plan's choice (``plan.py``); every
other graph runs on ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from sorakit.errors import BundleError, ProviderError
from sorakit.profiles import OPENVINO, DeviceProfile

log = logging.getLogger(__name__)
ORT = "onnxruntime"


@dataclass
class ProviderPlan:
    requested: list[str]
    selected: list[tuple[str, dict[str, str]]]  # ONNX Runtime's providers, CPU last
    fallbacks: list[str] = field(default_factory=list)  # human-readable notes
    openvino: dict[str, str] | None = None  # OpenVINO's options when the profile asks for it and it is here

    @property
    def engines(self) -> list[str]:
        return ([OPENVINO] if self.openvino is not None else []) + [ORT]


def openvino_problem(options: dict[str, str]) -> str | None:
    """Why OpenVINO cannot serve this profile here, or None."""
    if importlib.util.find_spec("openvino") is None:
        return "the openvino package is not installed (pip install 'sorakit[openvino]')"
    want = options.get("INFERENCE_PRECISION_HINT", "f32")
    if want == "bf16":
        caps = _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in caps:
            return "this CPU has no bf16 arithmetic (OpenVINO lists " + ", ".join(caps) + ")"
    return None


def plan_providers(profile: DeviceProfile, strict: bool = False, cache_dir: str | Path | None = None) -> ProviderPlan:
    available = set(ort.get_available_providers())
    requested = [p.name for p in profile.providers]
    selected, notes = [], []
    openvino = None
    for name, options in profile.provider_options(cache_dir):
        if name == OPENVINO:
            why = openvino_problem(options)
            if why is None:
                openvino = options
                continue
            msg = f"OpenVINO cannot run device {profile.name!r}: {why}; falls back to the next provider"
        elif name in available:
            if name == "CoreMLExecutionProvider" and "ModelCacheDirectory" in options:
                os.makedirs(options["ModelCacheDirectory"], exist_ok=True)
            selected.append((name, options))
            continue
        else:
            msg = (f"{name} is not available in this onnxruntime build (it has: {', '.join(sorted(available))}); "
                   f"device {profile.name!r} falls back to the next provider")
        if strict:
            raise ProviderError(msg.replace("falls back to the next provider", "cannot run in strict mode"),
                                hint="drop --strict to allow the fallback, or install what is missing")
        notes.append(msg)
    if not selected or selected[-1][0] != "CPUExecutionProvider":
        selected.append(("CPUExecutionProvider", {}))
    for n in notes:
        log.warning(n)
    return ProviderPlan(requested, selected, notes, openvino)


@dataclass
class SessionOptions:
    threads: int = 0  # intra-op threads; 0 = the engine's default (all cores)
    # Repack MatMul weights at load (the scheduler turns it off for streamed sessions). On a
    # real-size STDiT3 block pair (2 cores) runs take ~1.06 s with it and ~1.25 s without.
    prepack: bool = True
    # CPU memory arena: "off" (activations are allocated at each run and freed), "shared" (one
    # arena for every session of the process: blocks that run one after another reuse the same
    # activation memory), "session" (ORT's default: an arena per session, which keeps its own
    # activation memory after each run)
    arena: str = "off"
    # ONNX Runtime's worker threads spin after a run, waiting for the next one. A generation runs
    # dozens of sessions one after another, each with its own pool: the previous session's
    # spinning threads take the cores from the next one (real-size int8 transformer call, 28
    # block sessions, 2 threads: 5.0 s without spinning, 5.5 s with it).
    spin: bool = False
    strict: bool = False


@dataclass
class LoadOptions:
    """How to build one session: the engine, and ONNX Runtime's options when it is ORT."""

    engine: str
    threads: int
    ort_options: ort.SessionOptions | None = None

    def cancel(self) -> None:
        """Ask a load in progress to stop (ORT only; an OpenVINO compile runs to its end)."""
        if self.ort_options is not None:
            try:
                self.ort_options.set_load_cancellation_flag(True)
            except (AttributeError, RuntimeError):  # older onnxruntime: let it finish, then drop it
                pass


class OpenVINOSession:
    """One graph compiled by OpenVINO, with ONNX Runtime's ``run(names, feeds)`` interface."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.compiled = _core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.ports = {name: port for port in self.compiled.outputs for name in port.get_names()}

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer(feeds, share_inputs=True)
        # copies: the request reuses its output buffers at the next call
        return [np.array(self.request.get_tensor(self.ports[n]).data) for n in names]

    def get_providers(self) -> list[str]:
        return [OPENVINO]


_CORE = None
_SHARED_ARENA = False


def register_shared_arena() -> None:
    """One CPU arena in ONNX Runtime's environment, used by every session that opts in."""
    global _SHARED_ARENA
    if _SHARED_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # grow by what is asked (not doubling), so the arena ends at the largest working set
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
    _SHARED_ARENA = True


_SHRINK: ort.RunOptions | None = None


def shrink_arena_options() -> ort.RunOptions:
    """Run options that hand the CPU arena's free memory back at the end of the run."""
    global _SHRINK
    if _SHRINK is None:
        _SHRINK = ort.RunOptions()
        _SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return _SHRINK


def _core():
    global _CORE
    if _CORE is None:
        import openvino

        _CORE = openvino.Core()
    return _CORE


def _load_error(engine: str, path: Path, e: Exception) -> BundleError:
    detail = " ".join(str(e).split())[:400]
    return BundleError(f"{engine} cannot load {path.parent.name}/{path.name}: {detail}",
                       hint="the graph is damaged or not for this engine's version; re-export the bundle")


class SessionFactory:
    def __init__(self, plan: ProviderPlan, defaults: SessionOptions | None = None):
        self.plan = plan
        self.defaults = defaults or SessionOptions()

    def options(self, threads: int | None = None, prepack: bool | None = None, engine: str = ORT) -> LoadOptions:
        d = self.defaults
        t = d.threads if threads is None else threads
        if engine == OPENVINO:
            return LoadOptions(OPENVINO, t)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = d.arena != "off"
        if d.arena == "shared":
            register_shared_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
        if t:
            so.intra_op_num_threads = t
        so.inter_op_num_threads = 1
        if not d.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if not (d.prepack if prepack is None else prepack):
            so.add_session_config_entry("session.disable_prepacking", "1")
        if d.strict and any(name != "CPUExecutionProvider" for name, _ in self.plan.selected):
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return LoadOptions(ORT, t, so)

    def create(self, path: Path, options: LoadOptions | None = None):
        options = options or self.options()
        if options.engine == OPENVINO:
            if self.plan.openvino is None:
                raise ProviderError(f"{path.name}: OpenVINO was planned but is not available")
            config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, **self.plan.openvino}
            if options.threads:
                config["INFERENCE_NUM_THREADS"] = options.threads
            try:
                return OpenVINOSession(path, config)
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError and its own types
                raise _load_error("OpenVINO", path, e) from e
        names = [n for n, _ in self.plan.selected]
        opts = [o for _, o in self.plan.selected]
        try:
            sess = ort.InferenceSession(str(path), options.ort_options, providers=names, provider_options=opts)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types (Fail, InvalidProtobuf, ...)
            raise _load_error("ONNX Runtime", path, e) from e
        if self.defaults.strict:
            sess.disable_fallback()
            missing = [n for n in names if n not in sess.get_providers()]
            if missing:
                raise ProviderError(f"{path.name}: onnxruntime did not enable {missing} (strict mode)")
        return sess
