"""`sorakit package`: a bundle -> an app package for ONNX Runtime Mobile (ORT format).

The package holds one ``.ort`` file per graph (weights embedded; variants such as TDTM get
their own file), one merged ``required_operators.config`` for a reduced ORT build, the
tokenizer, the CFG null caption (and the T5 token table when the lookup is done outside the
graph) as raw little-endian float32, and ``package.json``: everything an app needs to drive
the graphs (order, inputs and outputs, shapes, sampler defaults, LPL/TDTM settings, memory
budget, session and provider options) plus a size report, the partition audit and the
verification results. See docs/ios-app.md for the app side and docs/devices.md for the rest.

Every ``.ort`` is checked against its ``.onnx`` on identical inputs (the chain's own
activations) before the package is moved into place; nothing half-written is left behind.

Optimization style: ``runtime`` for devices with a compiling EP (Core ML, NNAPI), ``fixed``
for CPU-only devices. The Fixed style bakes CPU-EP fusions (FusedMatMul, FusedConv,
SkipLayerNormalization, ...) into the file *before* the EP sees the graph, so nodes Core ML
could have taken turn into contrib ops it cannot. The Runtime style stores the graph at the
basic level (what the audit checks) and records the extra fusions, which ORT replays at load
only for the nodes left on the CPU (``session.enable_saved_runtime_optimizations=1``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from sorakit.bundle.io import Bundle, sha256_file
from sorakit.bundle.manifest import GraphEntry, Manifest, TensorSpec
from sorakit.devices._ort_tools import ensure_ort_tools_without_torch
from sorakit.errors import SorakitError, VerificationError
from sorakit.profiles import DeviceProfile, get_profile

PACKAGE_FORMAT = "sorakit-package"
PACKAGE_VERSION = 1
PACKAGE_MANIFEST = "package.json"
CONFIG = "required_operators.config"
# FlatBuffers addresses a buffer with 32-bit signed offsets: an .ort file cannot reach 2 GiB
# (onnxruntime#16573). Module-level so tests can lower it; the check itself is the real one.
ORT_FORMAT_LIMIT = 2**31 - 1
STYLES = ("auto", "fixed", "runtime")


class PackageError(SorakitError):
    """A bundle cannot be packaged for a device (shapes, sizes, audit in strict mode)."""


@dataclass
class PackagedGraph:
    name: str
    component: str
    role: str
    source: str  # the .onnx in the bundle
    file: str  # the .ort in the package
    onnx_bytes: int  # .onnx plus its external data (shared data counted once per graph)
    ort_bytes: int = 0
    variant_of: str | None = None
    max_abs_err: float | None = None
    exact: bool | None = None
    audit: dict[str, Any] | None = None


@dataclass
class PackageReport:
    out: Path
    device: str
    style: str
    graphs: list[PackagedGraph] = field(default_factory=list)
    total_bytes: int = 0
    bundle_bytes: int = 0
    duplicated_bytes: int = 0
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------
# checks before any work
# ---------------------------------------------------------------------------------------------
def dynamic_tensors(m: Manifest) -> list[tuple[str, TensorSpec]]:
    return [(g.name, t) for g in m.all_graphs() for t in g.inputs + g.outputs if not t.static]


def pin_command(bundle_root: Path | str, m: Manifest) -> str:
    geo = m.geometry
    h, w = geo.get("height", "H"), geo.get("width", "W")
    n = geo.get("num_frames", "N")
    return f"sorakit optimize {bundle_root} --passes pin --resolution {h}x{w} --frames {n} --out {bundle_root}-pinned"


def check_static(b: Bundle, profile: DeviceProfile) -> None:
    """Refuse a bundle with dynamic shapes for a device that needs static ones."""
    m = b.manifest
    dyn = dynamic_tensors(m)
    if not profile.requires_static_input_shapes or (m.static and not dyn):
        return
    examples = ", ".join(f"{g}:{t.name}{t.shape}" for g, t in dyn[:3]) or "geometry.static is false"
    cmd = pin_command(b.root, m)
    raise PackageError(
        f"bundle {b.root} has dynamic shapes ({examples}{', ...' if len(dyn) > 3 else ''}), but device "
        f"{profile.name!r} needs static shapes; pin them first with: {cmd}",
        hint=f"then package the pinned bundle: sorakit package {b.root}-pinned --device {profile.name} --out PKG",
    )


def graph_bytes(b: Bundle, g: GraphEntry) -> int:
    """What an .ort of this graph holds at most: the graph and all the weights it references."""
    files = [g.file] + ([g.data] if g.data else [])
    return sum(b.manifest.files[f]["bytes"] if f in b.manifest.files else b.path(f).stat().st_size for f in files)


def check_sizes(b: Bundle, graphs: list[GraphEntry], limit: int | None = None) -> None:
    limit = ORT_FORMAT_LIMIT if limit is None else limit
    over = [(g.name, graph_bytes(b, g)) for g in graphs if graph_bytes(b, g) > limit]
    if over:
        names = ", ".join(f"{n} ({_gb(s)})" for n, s in over)
        raise PackageError(
            f"graph {names} would make an .ort file over the ORT format's {_gb(limit)} limit "
            "(FlatBuffers, onnxruntime#16573); nothing was written",
            hint="re-export with a finer --granularity (pair or single), or shrink the weights "
                 "(sorakit optimize --passes fp16 or int8)",
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------
def resolve_style(style: str, profile: DeviceProfile) -> str:
    if style not in STYLES:
        raise PackageError(f"unknown optimization style {style!r}; one of {', '.join(STYLES)}")
    if style == "auto":
        return "runtime" if profile.compiling_provider else "fixed"
    return style


def convert_to_ort(src: Path, dst: Path, style: str, arm: bool = True, runtime_opt: str | None = None) -> Path:
    """One .onnx -> .ort with ORT's own serializer (what convert_onnx_models_to_ort does per model).

    ``style``: "fixed" (all optimizations applied now) or "runtime" (basic now, the rest saved
    for replay); ``runtime_opt="apply"`` produces the graph a runtime-style file becomes when
    every saved optimization is replayed (used only for the operator config).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.qdqisint8allowed", "1" if arm else "0")
    mode = runtime_opt or ("save" if style == "runtime" else None)
    if mode:
        so.add_session_config_entry("optimization.minimal_build_optimizations", mode)
    # NCHWc is an x86-only layout: a package must run on any CPU of its device class
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
    except Exception as e:  # noqa: BLE001 - ORT raises several types
        raise PackageError(
            f"onnxruntime could not convert {src.name} to the ORT format: {str(e).splitlines()[0]}") from None
    if not dst.is_file():
        raise PackageError(f"onnxruntime wrote no ORT file for {src.name}")
    return dst


def write_operator_config(ort_files: list[Path], out: Path, names: dict[Path, str]) -> list[str]:
    """One merged required-operators config (``domain;opset;op,op,...``) for a reduced build."""
    ensure_ort_tools_without_torch()
    from onnxruntime.tools.ort_format_model import create_config_from_models

    quiet = logging.getLogger("ort_format_model.utils")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="sorakit-ops-") as tmp:
            cfg = Path(tmp) / CONFIG
            create_config_from_models(ort_files, cfg, False)
            lines = [ln for ln in cfg.read_text().splitlines() if ln and not ln.startswith("#")]
    finally:
        quiet.setLevel(level)
    header = ["# Operators needed by every graph of this package (sorakit package); use it with",
              "#   build.py --include_ops_by_config required_operators.config --minimal_build extended ...",
              "# Generated from:"]
    header += sorted({f"# - {names.get(f, f.name)}" for f in ort_files})
    out.write_text("\n".join(header + lines) + "\n")
    return lines


# ---------------------------------------------------------------------------------------------
# verification: every .ort against its .onnx, on the chain's own activations
# ---------------------------------------------------------------------------------------------
def app_config_entries(profile: DeviceProfile, style: str) -> dict[str, str]:
    """Session config entries the app sets for every graph of the package (and the check uses).

    CPU-only devices keep the .ort bytes and let initializers point into them (no second copy
    of the weights). With a compiling EP the weights end up in the compiled Core ML / NNAPI
    model, so ORT is left free to drop its buffer after the session is built.
    """
    entries = {"session.load_model_format": "ORT", "session.disable_prepacking": "1"}
    if profile.compiling_provider is None:
        entries["session.use_ort_model_bytes_directly"] = "1"
        entries["session.use_ort_model_bytes_for_initializers"] = "1"
    if style == "runtime":
        entries["session.enable_saved_runtime_optimizations"] = "1"
    return entries


def _session(path: Path, entries: dict[str, str] | None, style: str = "fixed") -> ort.InferenceSession:
    """An .ort session with the app's config entries, or (``entries=None``) the .onnx reference.

    The reference gets the same optimizations the .ort carries (all of them for the Fixed
    style; for the Runtime style the ones a minimal build replays), so the two run the same
    kernels and agree exactly; any difference is a conversion fault, not float noise.
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if entries is not None:
        for k, v in entries.items():
            so.add_session_config_entry(k, v)
    else:
        so.add_session_config_entry("session.disable_prepacking", "1")
        if style == "runtime":
            so.add_session_config_entry("optimization.minimal_build_optimizations", "apply")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["NchwcTransformer"])


class _Inputs:
    """Inputs for a component's first graphs, the rest come from the chain (output ``binds``)."""

    def __init__(self, m: Manifest, seed: int = 0):
        self.m = m
        self.rng = np.random.default_rng(seed)
        self.symbols: dict[str, int] = self._default_symbols()

    def _default_symbols(self) -> dict[str, int]:
        from sorakit.presets import ModelPreset, decode_chunks

        geo = self.m.geometry
        out = {"batch": 1, "batch2": 2}
        try:
            p = ModelPreset.from_dict(self.m.preset)
            h, w, n = geo["height"], geo["width"], geo["num_frames"]
            t, lh, lw = p.latent_size(n, h, w)
            ph, pw = p.stdit.patch_size[1], p.stdit.patch_size[2]
            zt, nf = decode_chunks(n, p.vae.micro_frame_size, p.vae.temporal.time_downsample)[0]
            out.update(latent_frames=t, latent_height=lh, latent_width=lw, tokens=-(-lh // ph) * -(-lw // pw),
                       chunk_latent_frames=zt, chunk_frames=nf,
                       chunk_decoded_frames=zt * p.vae.temporal.time_downsample,
                       frames=p.vae.spatial.micro_batch_size)
        except (KeyError, TypeError, SorakitError):
            pass
        return out

    def learn(self, spec: TensorSpec, value: np.ndarray) -> None:
        for d, actual in zip(spec.shape, value.shape):
            if isinstance(d, str):
                self.symbols.setdefault(d, int(actual))

    def make(self, spec: TensorSpec) -> np.ndarray:
        shape = [d if isinstance(d, int) else self.symbols.get(d, 2) for d in spec.shape]
        name = spec.name
        if spec.dtype in ("int64", "int32"):
            dt = np.int64 if spec.dtype == "int64" else np.int32
            if "mask" in name:
                a = np.zeros(shape, dtype=dt)
                if a.ndim:
                    a[..., : max(1, (2 * shape[-1]) // 3)] = 1
                return a
            vocab = int(self.m.preset.get("t5", {}).get("vocab_size", 100))
            return self.rng.integers(0, vocab, size=shape).astype(dt)
        dt = np.float16 if spec.dtype == "float16" else np.float32
        geo = self.m.geometry
        special = {"timestep": lambda: self.rng.uniform(0, 1000, shape),
                   "fps": lambda: np.full(shape, float(self.m.sampler.get("fps", 24))),
                   "height": lambda: np.full(shape, float(geo.get("height", 256))),
                   "width": lambda: np.full(shape, float(geo.get("width", 256)))}
        if name in special:
            return special[name]().astype(dt)
        return self.rng.standard_normal(shape).astype(dt)


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, bool]:
    if ref.shape != got.shape or ref.dtype != got.dtype:
        raise VerificationError(f"output {ref.shape} {ref.dtype} vs {got.shape} {got.dtype}")
    if np.array_equal(ref, got, equal_nan=True):
        return 0.0, True
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    return float(np.nanmax(diff)) if diff.size else 0.0, False


def verify_component(
    b: Bundle, entries: list[GraphEntry], ort_paths: dict[str, Path], results: dict[str, PackagedGraph],
    atol: float, feeds: _Inputs, style: str = "fixed", config: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Run the component's chain on the .onnx graphs; every .ort (and variant) on the same inputs."""
    ctx: dict[str, np.ndarray] = {}

    def feed(specs: list[TensorSpec]) -> dict[str, np.ndarray]:
        inputs = {}
        for spec in specs:
            if spec.name not in ctx:
                ctx[spec.name] = feeds.make(spec)
            feeds.learn(spec, ctx[spec.name])
            inputs[spec.name] = ctx[spec.name]
        return inputs

    for g in entries:
        ref = _session(b.path(g.file), None, style).run([o.name for o in g.outputs], feed(g.inputs))
        for target in [g, *g.variants.values()]:
            if progress:
                progress(target.name)
            inputs = feed(target.inputs)
            names = [o.name for o in target.outputs]
            want = ref if target is g else _session(b.path(target.file), None, style).run(names, inputs)
            got = _session(ort_paths[target.name], config or {"session.load_model_format": "ORT"}, style).run(
                names, inputs)
            worst, exact = 0.0, True
            for o, r, x in zip(target.outputs, want, got):
                err, same = compare(np.asarray(r), np.asarray(x))
                scale = max(1.0, float(np.nanmax(np.abs(r))) if np.asarray(r).size else 1.0)
                if err > atol * scale:
                    raise VerificationError(
                        f"{ort_paths[target.name].name} differs from {target.file} on output {o.name}: "
                        f"max abs error {err:.3g} (limit {atol * scale:.3g})")
                worst, exact = max(worst, err), exact and same
            results[target.name].max_abs_err = worst
            results[target.name].exact = exact
        for o, val in zip(g.outputs, ref):
            ctx[o.binds or o.name] = np.asarray(val)
            feeds.learn(o, np.asarray(val))


# ---------------------------------------------------------------------------------------------
# the package
# ---------------------------------------------------------------------------------------------
def _ort_rel(onnx_rel: str) -> str:
    return "models/" + (onnx_rel[: -len(".onnx")] if onnx_rel.endswith(".onnx") else onnx_rel) + ".ort"


def _io(specs: list[TensorSpec]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in specs]


def _nbytes(spec: TensorSpec) -> int | None:
    if not spec.static:
        return None
    size = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1}.get(spec.dtype, 4)
    return int(np.prod(spec.shape, dtype=np.int64)) * size if spec.shape else size


def _graph_json(g: GraphEntry, pg: dict[str, PackagedGraph]) -> dict[str, Any]:
    p = pg[g.name]
    io = [_nbytes(s) for s in g.inputs + g.outputs]
    d = {
        "name": g.name,
        "role": g.role,
        "file": p.file,
        "bytes": p.ort_bytes,
        "inputs": _io(g.inputs),
        "outputs": _io(g.outputs),
        "io_bytes": None if None in io else int(sum(io)),
        "params": g.params,
        "flops": g.flops,
        "verification": {"max_abs_err": p.max_abs_err, "exact": p.exact},
    }
    if p.audit is not None:
        d["audit"] = p.audit
    if g.variants:
        d["variants"] = {k: _graph_json(v, pg) for k, v in g.variants.items()}
    return d


def _write_raw(src: Path, dst: Path) -> dict[str, Any]:
    a = np.load(src, mmap_mode="r")
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(a, dtype="<f4").tofile(dst)
    return {"shape": list(a.shape), "dtype": "float32", "byte_order": "little", "layout": "C (row-major)"}


def _session_section(profile: DeviceProfile, style: str) -> dict[str, Any]:
    entries = app_config_entries(profile, style)
    return {
        "providers": [{"name": p.name, "options": dict(p.options)} for p in profile.providers],
        "placeholders": {"{cache}": "a writable cache directory of the app (e.g. Library/Caches/sorakit)"},
        "config_entries": entries,
        "strict_config_entries": {"session.disable_cpu_ep_fallback": "1"},
        "intra_op_num_threads": profile.threads,
        "inter_op_num_threads": 1,
        "enable_cpu_mem_arena": False,
        "graph_optimization_level": "ORT_ENABLE_ALL",
    }


def _sampler_section(m: Manifest, tdtm: bool) -> dict[str, Any]:
    from sorakit.runtime.sampler import LPL

    lpl = LPL()
    tdtm_pass = next((p for p in m.passes if p.get("name") == "tdtm"), {})
    return {
        **m.sampler,
        "cfg": {"batch": 2, "order": ["prompt", "null caption"], "keep_channels": m.preset["stdit"]["in_channels"],
                "formula": "v = v_null + s * (v_prompt - v_null); s = cfg_scale, or 1 at t > guidance_max_t "
                           "(when guidance_max_t is set)"},
        "noise": {"convention": "z ~ N(0, 1), shape = latent_shape; sorakit uses numpy PCG64 "
                                "(np.random.default_rng(seed).standard_normal) for bit-exact parity"},
        "lpl": {"default": "off", "fixed": {"leap_at": lpl.leap_at},
                "dynamic": {"start": lpl.start, "tolerance": lpl.tolerance, "patience": lpl.patience}},
        "tdtm": {"available": tdtm, "variant": "tdtm", "default_steps": 0,
                 "recommended_steps": "up to half of num_steps (On-device Sora merges in the first 15 of 30)",
                 "settings": tdtm_pass.get("settings") if tdtm_pass else None},
    }


def package_bundle(
    bundle: str | Path | Bundle,
    device: str | DeviceProfile,
    out: str | Path,
    style: str = "auto",
    verify: bool = True,
    strict: bool = False,
    audit: bool = True,
    atol: float = 1e-6,
    progress: ProgressFn | None = None,
) -> PackageReport:
    """Package a bundle for a device. Raises PackageError before writing anything it must refuse."""
    t_start = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify="lazy")
    profile = get_profile(device) if isinstance(device, str) else device
    m = b.manifest
    out = Path(out)
    if out.resolve() == b.root.resolve() or b.root.resolve() in out.resolve().parents:
        raise PackageError(f"the package cannot go inside the bundle ({out})")
    if out.exists() and not (out / PACKAGE_MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise PackageError(f"output {out} exists and is not a sorakit package; choose another path or remove it")
    style = resolve_style(style, profile)
    check_static(b, profile)
    order: list[tuple[str, GraphEntry, str | None]] = []
    for comp, c in m.components.items():
        for g in c.graphs:
            order.append((comp, g, None))
            order += [(comp, v, g.name) for v in g.variants.values()]
    check_sizes(b, [g for _, g, _ in order])

    audits: dict[str, Any] = {}
    if audit:
        from sorakit.devices.audit import audit_bundle

        rep = audit_bundle(b, profile, verify=True,
                           progress=(lambda n, i, t: progress("audit", i, t)) if progress else None)
        audits = {a.graph: a for a in rep.graphs}
        if strict and not rep.clean:
            bad = ", ".join(f"{a.graph} ({a.nodes - a.nodes_on_ep} CPU nodes, {a.partitions} partitions)"
                            for a in rep.dirty())
            raise PackageError(f"strict: graphs that would not run wholly on {rep.provider}: {bad}",
                               hint=f"see `sorakit audit {b.root} --device {profile.name}` for the reasons and fixes")

    report = PackageReport(out, profile.name, style)
    results: dict[str, PackagedGraph] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        ort_paths: dict[str, Path] = {}
        names: dict[Path, str] = {}
        config_inputs: list[Path] = []
        extra_dir = staging / ".apply"
        for i, (comp, g, parent) in enumerate(order):
            if progress:
                progress("convert", i, len(order))
            b.verify_graph_files(g)
            rel = _ort_rel(g.file)
            dst = convert_to_ort(b.path(g.file), staging / rel, style, profile.is_arm)
            size = dst.stat().st_size
            if size > ORT_FORMAT_LIMIT:
                raise PackageError(f"graph {g.name} made a {_gb(size)} .ort file, over the ORT format's "
                                   f"{_gb(ORT_FORMAT_LIMIT)} limit", hint="re-export with a finer --granularity")
            ort_paths[g.name] = dst
            names[dst] = rel
            config_inputs.append(dst)
            if style == "runtime":  # the ops replayed optimizations may add, for the reduced build
                applied = convert_to_ort(b.path(g.file), extra_dir / rel, "fixed", profile.is_arm, runtime_opt="apply")
                names[applied] = rel + " (runtime optimizations applied)"
                config_inputs.append(applied)
            a = audits.get(g.name)
            results[g.name] = PackagedGraph(
                g.name, comp, g.role, g.file, rel, graph_bytes(b, g), size, parent,
                audit=None if a is None else {"clean": a.clean, "nodes": a.nodes, "nodes_on_ep": a.nodes_on_ep,
                                              "partitions": a.partitions, "fallback_ops": a.fallback_ops(),
                                              "reasons": a.reason_counts()})
        if progress:
            progress("convert", len(order), len(order))
        op_lines = write_operator_config(config_inputs, staging / CONFIG, names)
        shutil.rmtree(extra_dir, ignore_errors=True)

        if verify:
            feeds = _Inputs(m)
            done = [0]

            def tick(_name: str) -> None:
                if progress:
                    progress("verify", done[0], len(order))
                done[0] += 1

            for c in m.components.values():
                verify_component(b, c.graphs, ort_paths, results, atol, feeds, style,
                                 app_config_entries(profile, style), tick)
            if progress:
                progress("verify", len(order), len(order))

        manifest = _write_side_files_and_manifest(b, profile, style, staging, order, results, op_lines, audits,
                                                  verify, atol)
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.graphs = [results[g.name] for _, g, _ in order]
    report.manifest = manifest
    report.total_bytes = manifest["sizes"]["package_bytes"]
    report.bundle_bytes = manifest["sizes"]["bundle_bytes"]
    report.duplicated_bytes = manifest["sizes"]["duplicated_by_variants"]
    report.seconds = time.perf_counter() - t_start
    return report


def reduced_build_command(profile: DeviceProfile) -> str:
    """The onnxruntime build.py line for a minimal build with just this package's operators."""
    common = (f"python tools/ci_build/build.py --config MinSizeRel --minimal_build extended "
              f"--include_ops_by_config <package>/{CONFIG} --skip_tests --parallel")
    text = f"{profile.name} {profile.description}".lower()
    if profile.uses_coreml and ("iphone" in text or "ios" in text or "ipad" in text):
        return (common + " --use_xcode --ios --apple_sysroot iphoneos --osx_arch arm64 --apple_deploy_target 16.0 "
                "--build_apple_framework --use_coreml")
    if profile.uses_coreml:
        return common + " --osx_arch arm64 --apple_deploy_target 13.3 --build_apple_framework --use_coreml"
    names = {p.name for p in profile.providers}
    if "NnapiExecutionProvider" in names or "XnnpackExecutionProvider" in names:
        return (common + " --android --android_sdk_path $ANDROID_HOME --android_ndk_path $ANDROID_NDK_HOME "
                "--android_abi arm64-v8a --android_api 29 --build_java"
                + (" --use_nnapi" if "NnapiExecutionProvider" in names else "")
                + (" --use_xnnpack" if "XnnpackExecutionProvider" in names else ""))
    return common + " --build_shared_lib"


def _write_side_files_and_manifest(b, profile, style, staging, order, results, op_lines, audits, verify, atol):
    m = b.manifest
    shutil.copyfile(b.path(m.tokenizer["file"]), _mk(staging / "tokenizer/tokenizer.json"))
    null = {"file": "null_caption.f32", **_write_raw(b.path(m.null_caption["file"]), staging / "null_caption.f32")}
    text_embedding = None
    emb = m.components.get("text_encoder").info.get("embedding_file") if "text_encoder" in m.components else None
    if emb:
        text_embedding = {"file": "text_encoder/embedding.f32",
                          **_write_raw(b.path(emb), staging / "text_encoder/embedding.f32"),
                          "use": "inputs_embeds[0, i, :] = table[input_ids[0, i], :]"}

    # sizes: the bundle stores shared data once; every .ort embeds its own copy
    bundle_files = {f for _, g, _ in order for f in ([g.file] + ([g.data] if g.data else []))}
    bundle_bytes = sum(m.files[f]["bytes"] for f in bundle_files if f in m.files)
    data_users: dict[str, list[str]] = {}
    for _, g, _ in order:
        if g.data:
            data_users.setdefault(g.data, []).append(g.name)
    duplicated = sum(m.files[d]["bytes"] * (len(u) - 1) for d, u in data_users.items() if d in m.files)
    by_comp: dict[str, int] = {}
    for r in results.values():
        by_comp[r.component] = by_comp.get(r.component, 0) + r.ort_bytes
    largest = max(results.values(), key=lambda r: r.ort_bytes)

    comps = {}
    tdtm = False
    for comp, c in m.components.items():
        comps[comp] = {"graphs": [_graph_json(g, results) for g in c.graphs], "info": c.info}
        if comp == "transformer":
            blocks = c.by_role("block")
            tdtm = bool(blocks) and all("tdtm" in g.variants for g in blocks)
    preset = m.preset
    geo = m.geometry
    latent = geo.get("latent")
    files = {}
    for p in sorted(staging.rglob("*")):
        if p.is_file():
            files[p.relative_to(staging).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    package_bytes = sum(f["bytes"] for f in files.values())
    budget_bytes = None if profile.memory_budget.strip().endswith("%") else profile.budget_bytes()
    import sorakit

    manifest = {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_VERSION,
        "created_by": {"sorakit": getattr(sorakit, "__version__", "0"), "onnxruntime": ort.__version__,
                       "onnx": onnx.__version__},
        "source_bundle": {"path": str(b.root), "preset": preset.get("name"), "passes": m.passes,
                          "export": {k: m.export.get(k) for k in ("opset", "exporter", "granularity",
                                                                   "t5_lookup_outside")}},
        "device": {**profile.to_dict(), "memory_budget_bytes": budget_bytes},
        "memory": {
            "budget": profile.memory_budget,
            "budget_bytes": budget_bytes,
            "largest_graph": {"name": largest.name, "bytes": largest.ort_bytes},
            "prefetch": "load graph i+1 on a background queue while graph i runs; cancel it when the plan changes",
        },
        "session": _session_section(profile, style),
        "ort_format": {
            "optimization_style": style.capitalize(),
            "why": ("Runtime: the file keeps the basic-level graph the CoreML/NNAPI EP partitions; the CPU-only "
                    "fusions are replayed at load for nodes left on the CPU") if style == "runtime" else
                   "Fixed: every optimization for the CPU EP is applied now (no compiling EP on this device)",
            "required_operators": CONFIG,
            "reduced_build": reduced_build_command(profile),
        },
        "model": {
            "preset": preset.get("name"),
            "geometry": geo,
            "latent_shape": [1, preset["stdit"]["in_channels"], *latent] if isinstance(latent, list) else None,
            "transformer": {"in_channels": preset["stdit"]["in_channels"],
                            "out_channels": preset["stdit"]["in_channels"] * (2 if preset["stdit"].get("pred_sigma")
                                                                             else 1),
                            "caption_length": preset["stdit"]["model_max_length"],
                            "caption_channels": preset["stdit"]["caption_channels"]},
        },
        "sampler": _sampler_section(m, tdtm),
        "tokenizer": {**m.tokenizer, "file": "tokenizer/tokenizer.json"},
        "null_caption": null,
        "text_embedding": text_embedding,
        "components": comps,
        "run_order": {
            "text": [g.name for g in m.components["text_encoder"].graphs] if "text_encoder" in m.components else [],
            "step": [g.name for g in m.components["transformer"].graphs] if "transformer" in m.components else [],
            "decode_temporal": [g.name for g in m.components["vae"].by_role("temporal")] if "vae" in m.components
            else [],
            "decode_spatial": [g.name for g in m.components["vae"].by_role("spatial")] if "vae" in m.components
            else [],
        },
        "sizes": {
            "package_bytes": package_bytes,
            "bundle_bytes": bundle_bytes,
            "graphs_bytes": sum(r.ort_bytes for r in results.values()),
            "by_component": by_comp,
            "duplicated_by_variants": duplicated,
            "duplicated_note": ("each .ort embeds its weights, so a variant (e.g. TDTM) that shares the plain "
                                "block's external data in the bundle holds a second copy here") if duplicated else None,
            "graphs": {r.name: {"onnx_bytes": r.onnx_bytes, "ort_bytes": r.ort_bytes} for r in results.values()},
            "ort_limit_bytes": ORT_FORMAT_LIMIT,
        },
        "required_operators": op_lines,
        "verification": {"enabled": verify, "atol": atol, "reference": ".onnx in ONNX Runtime (CPU EP)",
                         "all_exact": all(r.exact for r in results.values()) if verify else None},
        "audit": ({"provider": next(iter(audits.values())).provider if audits else None,
                   "clean_graphs": sum(a.clean for a in audits.values()), "graphs": len(audits)} if audits else None),
        "files": files,
    }
    (staging / PACKAGE_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _mk(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _commit(staging: Path, out: Path) -> None:
    old = None
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{int(time.time())}")
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_package(path: str | Path) -> dict[str, Any]:
    """Read a package's manifest and check its files (sizes and sha256)."""
    root = Path(path)
    mf = root / PACKAGE_MANIFEST
    if not mf.is_file():
        raise PackageError(f"{root} is not a sorakit package (no {PACKAGE_MANIFEST})")
    data = json.loads(mf.read_text())
    if data.get("format") != PACKAGE_FORMAT or data.get("format_version") != PACKAGE_VERSION:
        raise PackageError(f"{mf} is not a sorakit package manifest of version {PACKAGE_VERSION}")
    for rel, rec in data["files"].items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != rec["bytes"]:
            raise PackageError(f"package file {rel} is missing or truncated")
        if sha256_file(p) != rec["sha256"]:
            raise PackageError(f"package file {rel} is corrupt (sha256 mismatch)")
    return data


__all__ = ["package_bundle", "load_package", "PackageError", "PackageReport", "ORT_FORMAT_LIMIT", "convert_to_ort",
           "check_static", "check_sizes", "pin_command"]
