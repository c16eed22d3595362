"""`sorakit export`: checkpoint -> bundle, one block at a time, verified against torch.

For every piece of every component (see ``pieces.py``): build it on the meta device, read
only its tensors from the checkpoint (or make the deterministic random ones), export it to
ONNX with its weights in an external-data file, run the graph in ONNX Runtime on the
inputs the torch chain actually produces and compare (max abs error, PSNR), then free it.
The whole bundle is written into ``<out>.partial`` and renamed into place at the end;
finished graphs are recorded there, so an interrupted export resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sorakit.bundle.io import BundleStaging, disk_full_message
from sorakit.bundle.manifest import Component, GraphEntry, Manifest, TensorSpec
from sorakit.errors import SorakitError, VerificationError
from sorakit.export import models
from sorakit.export.checkpoint import load_module
from sorakit.export.init import constructor_values, random_state_dict
from sorakit.export.pieces import PieceSpec, text_encoder_plan, transformer_plan, vae_plan
from sorakit.memory import release_memory
from sorakit.presets import ModelPreset, check_geometry, decode_chunks
from sorakit.runtime.sampler import initial_noise

log = logging.getLogger(__name__)
EXPORTERS = ("torchscript", "dynamo")  # the first is the default (docs/export.md: "Exporter")


@dataclass
class ExportSettings:
    preset: ModelPreset
    height: int
    width: int
    num_frames: int
    static: bool = True
    granularity: str = "pair"
    opset: int = 18
    # TorchScript: dynamo (torch.export) is as fast on real-size blocks with 30-60 % less peak RSS
    # (docs/benchmarks/exporters.md), but its static graphs hold the frame count in reshape
    # constants, so TDTM variants cannot be built from them (docs/export.md, "Exporter")
    exporter: str = "torchscript"
    components: tuple[str, ...] = models.COMPONENTS
    verify: bool = True
    seed: int = 0  # random weights
    t5_lookup_outside: bool = False
    atol: float = 1e-3  # relative to max(1, max|reference|)
    min_psnr: float = 60.0

    def __post_init__(self) -> None:
        if not self.static and self.exporter == "torchscript":
            # TorchScript tracing bakes sizes into the graph; dynamic shapes need the dynamo exporter
            self.exporter = "dynamo"

    def geometry(self) -> dict[str, Any]:
        check_geometry(self.preset, self.num_frames, self.height, self.width)
        latent = list(self.preset.latent_size(self.num_frames, self.height, self.width))
        geo = {
            "static": self.static,
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
            "latent": latent,
            "batch": 1,
            "batch2": 2,
        }
        if self.static:
            chunks = decode_chunks(self.num_frames, self.preset.vae.micro_frame_size,
                                   self.preset.vae.temporal.time_downsample)
            if len(set(chunks)) > 1 and "vae" in self.components:
                mfs = self.preset.vae.micro_frame_size
                raise SorakitError(
                    f"a static bundle decodes the video in equal chunks of {mfs} frames, so the frame count must "
                    f"be a multiple of {mfs} or below it (got {self.num_frames}; try "
                    f"{max(mfs, self.num_frames // mfs * mfs)}), or export with --dynamic"
                )
        else:
            geo["latent"] = ["latent_frames", "latent_height", "latent_width"]
            geo["batch"], geo["batch2"] = "batch", "batch2"
        return geo


@dataclass
class PieceResult:
    entry: GraphEntry
    max_abs_err: float | None = None
    psnr: float | None = None
    seconds: float = 0.0
    skipped: bool = False


@dataclass
class ExportReport:
    out: Path
    pieces: list[PieceResult] = field(default_factory=list)
    chain: dict[str, dict[str, float]] = field(default_factory=dict)  # component -> errors of the ORT chain
    end_to_end: dict[str, float] | None = None


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------
def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max abs error, PSNR in dB with the reference's range as peak)."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise VerificationError(f"shape mismatch: reference {ref.shape} vs exported {got.shape}")
    err = float(np.abs(ref - got).max()) if ref.size else 0.0
    mse = float(((ref - got) ** 2).mean()) if ref.size else 0.0
    peak = float(ref.max() - ref.min()) if ref.size else 0.0
    psnr = math.inf if mse == 0 else 10 * math.log10(max(peak, 1e-12) ** 2 / mse)
    return err, psnr


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
class WeightSource:
    """Where a component's tensors come from: a checkpoint, or the deterministic random recipe."""

    def __init__(self, component: str, preset: ModelPreset, path: str | Path | None, seed: int):
        self.component = component
        self.path = path
        self.seed = seed
        self.ckpt = models.open_checkpoint(component, path, preset) if path is not None else None
        self.shapes = models.component_shapes(component, preset)
        self.constructor = constructor_values(preset.vae.scale, preset.vae.shift, preset.stdit.head_dim)

    def fingerprint(self, keys: list[str]) -> str:
        if self.ckpt is None:
            return f"random:{self.seed}"
        files = sorted({self.ckpt.ckpt.index[self.ckpt.to_ckpt[k]].file for k in keys if self.ckpt.has(k)})
        return ";".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self.ckpt is None:
            return random_state_dict({k: self.shapes[k] for k in keys if k in self.shapes}, self.seed, self.constructor)
        return self.ckpt.read(keys)


def build_piece(spec: PieceSpec, source: WeightSource, where: str) -> torch.nn.Module:
    with torch.device("meta"):
        module = spec.build()
    key_map = spec.ckpt_keys(module)
    tensors = source.read(list(key_map.values()))
    piece_tensors = {pk: tensors[ck] for pk, ck in key_map.items() if ck in tensors}
    return load_module(module, piece_tensors, where, spec.component).eval()


# ---------------------------------------------------------------------------------------------
# one graph
# ---------------------------------------------------------------------------------------------
def export_graph(module, spec: PieceSpec, args: tuple, path: Path, opset: int, exporter: str) -> None:
    """torch -> ONNX with weights in ``<file>.data`` next to it."""
    import onnx

    input_names = [i.name for i in spec.inputs]
    output_names = [o.name for o in spec.outputs]
    dynamic_axes = {}
    for io_ in spec.inputs + spec.outputs:
        axes = {ax: d for ax, d in enumerate(io_.shape) if isinstance(d, str)}
        if axes:
            dynamic_axes[io_.name] = axes
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            tmp = path.with_suffix(".dynamo.onnx")
            dyn_shapes = None
            if dynamic_axes:
                dyn_shapes = tuple(
                    {ax: torch.export.Dim.AUTO for ax in dynamic_axes[n]} if n in dynamic_axes else None
                    for n in input_names
                )
            tmp_in = [f"in__{i}" for i in range(len(input_names))]
            tmp_out = [f"out__{i}" for i in range(len(output_names))]
            torch.onnx.export(module, args, str(tmp), dynamo=True, opset_version=opset, input_names=tmp_in,
                              output_names=tmp_out, dynamic_shapes=dyn_shapes, external_data=True)
            model = onnx.load(str(tmp))
            rename_values(model, dict(zip(tmp_in + tmp_out, input_names + output_names)))
            tmp.unlink()
            data = Path(str(tmp) + ".data")
            if data.exists():
                data.unlink()
        else:
            # straight to the file (no in-memory serialized copy of the weights), then re-saved
            # below with the weights moved to external data
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes or None,
                              do_constant_folding=True)
            release_memory(collect=True)
            model = onnx.load(str(path))
    if spec.role == "block" and not dynamic_axes:
        from sorakit.graph_passes.tdtm import mark_boundaries

        mark_boundaries(model)  # the contract the TDTM pass relies on (dynamic graphs: after `pin`)
    save_with_external_data(model, path)


def rename_values(model, mapping: dict[str, str]) -> None:
    """Rename graph values (inputs/outputs), moving any internal value out of the way first."""
    g = model.graph
    taken = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    clash = {new: f"{new}__internal" for old, new in mapping.items() if new in taken and new not in mapping}
    full = {**clash, **mapping}
    for n in g.node:
        n.input[:] = [full.get(i, i) for i in n.input]
        n.output[:] = [full.get(o, o) for o in n.output]
    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            v.name = full.get(v.name, v.name)
    for init in g.initializer:
        init.name = full.get(init.name, init.name)


def save_with_external_data(model, path: Path) -> None:
    import onnx

    data = path.name + ".data"
    for stale in (path, path.parent / data):
        if stale.exists():
            stale.unlink()
    from onnx.external_data_helper import convert_model_to_external_data

    from sorakit.graph_passes.tdtm import ROPE_COS, ROPE_SIN

    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data, size_threshold=1024)
    for init in model.graph.initializer:
        if init.name in (ROPE_COS, ROPE_SIN):  # small tables the TDTM pass rewrites: keep them inline
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
    onnx.save_model(model, str(path))
    if not (path.parent / data).exists():
        (path.parent / data).write_bytes(b"")  # every graph has a data file, even if all weights are tiny


def ort_session(path: Path, threads: int = 0):
    """A CPU session for verification: run a few times, so lean (no weight prepacking, no arena).

    Prepacking would keep a second, repacked copy of every MatMul weight for the session's
    short life, and the arena would hold its peak after the run; both count towards the
    export's peak RSS for no gain here.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False
    so.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def graph_params(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(sum(math.prod(t.dims) for t in m.graph.initializer))


def graph_flops(path: Path) -> int:
    from sorakit.graph_passes.flops import count_flops

    try:
        return count_flops(path)
    except Exception:  # noqa: BLE001 - a FLOP count is informational only
        return 0


# ---------------------------------------------------------------------------------------------
# sample inputs that start each component's chain
# ---------------------------------------------------------------------------------------------
def chain_start(component: str, preset: ModelPreset, geo: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 17)
    T, h, w = (geo["latent"] if geo["static"] else preset.latent_size(geo["num_frames"], geo["height"], geo["width"]))
    if component == "transformer":
        s = preset.stdit
        L = s.model_max_length
        mask = torch.zeros(2, L, dtype=torch.int64)
        mask[:, : max(1, (2 * L) // 3)] = 1
        return {
            "x": torch.from_numpy(initial_noise(seed, (2, s.in_channels, T, h, w))),
            "timestep": torch.tensor([750.0, 750.0]),
            "y": torch.randn(2, L, s.caption_channels, generator=g),
            "y_mask": mask,
            "fps": torch.tensor([float(preset.sampler.fps)]),
            "height": torch.tensor([float(geo["height"])]),
            "width": torch.tensor([float(geo["width"])]),
        }
    if component == "text_encoder":
        t5 = preset.t5
        L = t5.max_length
        ids = torch.randint(3, t5.vocab_size, (1, L), generator=g)
        mask = torch.zeros(1, L, dtype=torch.int64)
        mask[:, : max(1, L // 2)] = 1
        ids[mask == 0] = t5.pad_token_id
        return {"input_ids": ids, "attention_mask": mask}
    if component == "vae":
        zt = decode_chunks(geo["num_frames"], preset.vae.micro_frame_size, preset.vae.temporal.time_downsample)[0][0]
        return {"z": torch.randn(1, preset.vae.temporal.embed_dim, zt, h, w, generator=g)}
    raise ValueError(component)


def bridge(spec: PieceSpec, ctx: dict[str, Any], preset: ModelPreset, lookup_table: torch.Tensor | None) -> None:
    """Adapt the context between stages that the runtime also adapts (VAE temporal -> spatial)."""
    if spec.name == "vae.spatial.stem" and "frames" not in ctx:
        lat = ctx["latent_frames"]  # [1, 4, F, h, w] -> first micro-batch of frames
        n = spec.inputs[0].shape[0] if isinstance(spec.inputs[0].shape[0], int) else 4
        frames = lat[0].transpose(0, 1)[:n]
        ctx["frames"] = frames
    if spec.name == "text_encoder.embed" and lookup_table is not None and "inputs_embeds" not in ctx:
        ctx["inputs_embeds"] = lookup_table[ctx["input_ids"]]


# ---------------------------------------------------------------------------------------------
# the bundle
# ---------------------------------------------------------------------------------------------
def settings_key(settings: ExportSettings, spec: PieceSpec, fingerprint: str, geo: dict) -> str:
    import onnx
    import onnxruntime

    payload = {
        "preset": settings.preset.to_dict(),
        "piece": spec.name,
        "modules": spec.modules,
        "geometry": geo,
        "opset": settings.opset,
        "exporter": settings.exporter,
        "weights": fingerprint,
        "lookup_outside": settings.t5_lookup_outside,
        "granularity": settings.granularity,
        "versions": [torch.__version__, onnx.__version__, onnxruntime.__version__],
        "schema": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def plan_for(component: str, settings: ExportSettings, geo: dict) -> list[PieceSpec]:
    if component == "transformer":
        return transformer_plan(settings.preset, geo, settings.granularity)
    if component == "text_encoder":
        return text_encoder_plan(settings.preset, geo, settings.t5_lookup_outside)
    return vae_plan(settings.preset, geo)


ProgressFn = Callable[[str, int, int, PieceResult | None], None]


def export_bundle(
    settings: ExportSettings,
    out: str | Path,
    checkpoints: dict[str, str | Path | None] | None = None,
    progress: ProgressFn | None = None,
    fail_after: str | None = None,
    tokenizer_source: str | Path | None = None,
) -> ExportReport:
    """Export the selected components into a bundle at ``out``.

    ``checkpoints`` maps component -> checkpoint path; a missing entry means deterministic
    random weights. ``fail_after`` (tests only) raises after that graph to simulate a crash.
    """
    checkpoints = checkpoints or {}
    geo = settings.geometry()
    if settings.exporter not in EXPORTERS:
        raise SorakitError(f"unknown exporter {settings.exporter!r}; one of {EXPORTERS}")
    preset = settings.preset
    sources = {c: WeightSource(c, preset, checkpoints.get(c), settings.seed) for c in settings.components}
    staging = BundleStaging(out)
    report = ExportReport(Path(out))
    components: dict[str, Component] = {}
    files: list[str] = []
    try:
        for comp in settings.components:
            components[comp] = _export_component(comp, settings, geo, sources[comp], staging, report, files,
                                                 progress, fail_after)
        files += _write_side_files(settings, sources, staging, checkpoints, tokenizer_source)
        manifest = _manifest(settings, geo, components, staging.records(files), report, checkpoints)
    except OSError as e:
        msg = disk_full_message(e, str(staging.dir))
        if msg:
            raise SorakitError(msg) from None
        raise
    if settings.verify and set(settings.components) == set(models.COMPONENTS):
        report.end_to_end = _verify_end_to_end(settings, manifest, staging, sources)
        manifest.export["verification"]["end_to_end"] = report.end_to_end
    staging.commit(manifest)
    return report


def _export_component(comp, settings, geo, source, staging, report, files, progress, fail_after) -> Component:
    preset = settings.preset
    plan = plan_for(comp, settings, geo)
    graphs: list[GraphEntry] = []
    ctx = chain_start(comp, preset, geo, settings.seed)
    ort_ctx: dict[str, np.ndarray] = {}
    lookup_table = None
    info: dict[str, Any] = {}
    if comp == "text_encoder" and settings.t5_lookup_outside:
        lookup_table = source.read(["shared.weight"])["shared.weight"]
        rel = "text_encoder/embedding.npy"
        np.save(staging.file(rel), to_numpy(lookup_table))
        files.append(rel)
        info["embedding_file"] = rel
    if comp == "vae":
        info["chunks"] = decode_chunks(geo["num_frames"], preset.vae.micro_frame_size,
                                       preset.vae.temporal.time_downsample) if geo["static"] else None
        info["micro_frame_size"] = preset.vae.micro_frame_size
        info["time_downsample"] = preset.vae.temporal.time_downsample
        info["spatial_batch"] = preset.vae.spatial.micro_batch_size
    for idx, spec in enumerate(plan):
        t0 = time.perf_counter()
        if progress:
            progress(comp, idx, len(plan), None)
        bridge(spec, ctx, preset, lookup_table)
        for name in list(ctx):
            if name not in ort_ctx:
                ort_ctx[name] = to_numpy(ctx[name]) if isinstance(ctx[name], torch.Tensor) else ctx[name]
        if comp == "vae" and spec.name == "vae.spatial.stem":
            ort_ctx["frames"] = _frames_from(ort_ctx["latent_frames"], spec)
        module = build_piece(spec, source, str(source.path or "random weights"))
        key_map = spec.ckpt_keys(module)
        skey = settings_key(settings, spec, source.fingerprint(list(key_map.values())), geo)
        path = staging.file(spec.rel_file)
        args = tuple(ctx[i.name] for i in spec.inputs)
        result = PieceResult(entry=None)  # type: ignore[arg-type]
        if staging.is_done(spec.name, skey):
            result.skipped = True
        else:
            export_graph(module, spec, args, path, settings.opset, settings.exporter)
            release_memory(collect=True)
        with torch.no_grad():
            outs = module(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        entry = _graph_entry(spec, path, staging, module)
        result.entry = entry
        # the block's torch weights are not needed any more: free them before ONNX Runtime loads
        # its own copy, so a block is in memory once at a time (streaming export's peak RSS)
        del module
        release_memory(collect=True)
        if settings.verify:
            sess = ort_session(path)
            feeds = {i.name: to_numpy(a) for i, a in zip(spec.inputs, args)}
            got = sess.run([o.name for o in spec.outputs], feeds)
            errs = [compare(to_numpy(ref), g) for ref, g in zip(outs, got)]
            result.max_abs_err = max(e for e, _ in errs)
            result.psnr = min(p for _, p in errs)
            scale = max(1.0, max(float(to_numpy(r).__abs__().max()) for r in outs))
            if result.max_abs_err > settings.atol * scale or result.psnr < settings.min_psnr:
                raise VerificationError(
                    f"graph {spec.name} differs from its torch module: max abs error {result.max_abs_err:.3g}, "
                    f"PSNR {result.psnr:.1f} dB (limits {settings.atol * scale:.3g}, {settings.min_psnr} dB)"
                )
            chained = sess.run([o.name for o in spec.outputs], {i.name: ort_ctx[i.name] for i in spec.inputs})
            for o, val in zip(spec.outputs, chained):
                ort_ctx[o.binds or o.name] = val
            entry.info["verification"] = {"max_abs_err": result.max_abs_err, "psnr_db": result.psnr}
            del sess
        for o, val in zip(spec.outputs, outs):
            ctx[o.binds or o.name] = val
        if not result.skipped:
            staging.done(spec.name, skey, entry.files())
        files.extend(entry.files())
        graphs.append(entry)
        result.seconds = time.perf_counter() - t0
        report.pieces.append(result)
        if progress:
            progress(comp, idx + 1, len(plan), result)
        del outs
        release_memory(collect=True)
        if fail_after == spec.name:
            raise SorakitError(f"simulated failure after {spec.name}")
    last = plan[-1].outputs[0]
    if settings.verify:
        err, psnr = compare(to_numpy(ctx[last.binds or last.name]), ort_ctx[last.binds or last.name])
        report.chain[comp] = {"max_abs_err": err, "psnr_db": psnr}
        info["chain_verification"] = report.chain[comp]
    return Component(graphs, info)


def _frames_from(latent_frames: np.ndarray, spec: PieceSpec) -> np.ndarray:
    n = spec.inputs[0].shape[0] if isinstance(spec.inputs[0].shape[0], int) else 4
    return np.ascontiguousarray(latent_frames[0].transpose(1, 0, 2, 3)[:n])


def _graph_entry(spec: PieceSpec, path: Path, staging: BundleStaging, module) -> GraphEntry:
    rel = spec.rel_file
    return GraphEntry(
        name=spec.name,
        role=spec.role,
        file=rel,
        data=rel + ".data",
        inputs=[TensorSpec(i.name, list(i.shape), i.dtype) for i in spec.inputs],
        outputs=[TensorSpec(o.name, list(o.shape), o.dtype, o.binds) for o in spec.outputs],
        modules=spec.modules,
        params=graph_params(path),
        flops=graph_flops(path),
    )


def _write_side_files(settings, sources, staging, checkpoints, tokenizer_source) -> list[str]:
    """The tokenizer and the CFG null caption."""
    preset = settings.preset
    tok_rel = "tokenizer/tokenizer.json"
    src = tokenizer_source if tokenizer_source is not None else checkpoints.get("text_encoder")
    if tokenizer_source is not None:
        import shutil

        shutil.copyfile(tokenizer_source, staging.file(tok_rel))
    else:
        models.tokenizer_json(src, staging.file(tok_rel))
    null_rel = "null_caption.npy"
    src = sources.get("transformer") or WeightSource("transformer", preset, checkpoints.get("transformer"),
                                                     settings.seed)
    null = src.read(["y_embedder.y_embedding"])["y_embedder.y_embedding"]
    np.save(staging.file(null_rel), to_numpy(null).astype(np.float32))
    return [tok_rel, null_rel]


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    import sorakit

    return {"sorakit": getattr(sorakit, "__version__", "0"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _manifest(settings, geo, components, records, report, checkpoints) -> Manifest:
    preset = settings.preset
    p = preset.to_dict()
    return Manifest(
        preset=p,
        geometry=geo,
        sampler=p["sampler"],
        tokenizer={"file": "tokenizer/tokenizer.json", "max_length": preset.t5.max_length,
                   "pad_id": preset.t5.pad_token_id, "eos_id": preset.t5.eos_token_id,
                   "prompt_suffix": preset.prompt_suffix},
        null_caption={"file": "null_caption.npy", "shape": [preset.stdit.model_max_length,
                                                            preset.stdit.caption_channels]},
        components=components,
        files=records,
        export={
            "opset": settings.opset,
            "exporter": settings.exporter,
            "granularity": settings.granularity,
            "t5_lookup_outside": settings.t5_lookup_outside,
            "weights": {c: (f"random:{settings.seed}" if checkpoints.get(c) is None
                            else str(Path(checkpoints[c]).resolve())) for c in settings.components},
            "seed": settings.seed,
            "tools": tool_versions(),
            "verification": {"enabled": settings.verify, "chain": report.chain},
        },
        passes=[],
    )


def _verify_end_to_end(settings, manifest, staging, sources) -> dict[str, float]:
    """A short generation through the runtime on the staged bundle vs the torch reference."""
    from sorakit.bundle.io import Bundle
    from sorakit.export.reference import ReferencePipeline
    from sorakit.runtime.pipeline import Pipeline

    preset = settings.preset
    params = sum(math.prod(s) for src in sources.values() for s in src.shapes.values())
    if params > 200_000_000:  # the full torch models would not fit comfortably; the chain checks stand in
        return {"skipped": 1.0}
    (staging.dir / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    try:
        bundle = Bundle(staging.dir, manifest, verify="none")
        torch_models = models.TorchModels(
            preset,
            _full(sources["text_encoder"], "text_encoder", preset),
            _full(sources["transformer"], "transformer", preset),
            _full(sources["vae"], "vae", preset),
            staging.dir / manifest.tokenizer["file"],
        )
        kw = dict(seed=settings.seed, steps=2, height=settings.height, width=settings.width,
                  num_frames=settings.num_frames)
        ref = ReferencePipeline(torch_models)("a red circle moving right", **kw)
        pipe = Pipeline(bundle, device="cpu")
        got = pipe("a red circle moving right", cfg=preset.sampler.cfg_scale, **kw)
        err, psnr = compare(ref.video_float, got.video_float)
        lat_err, _ = compare(ref.latents, got.latents)
        result = {"max_abs_err": err, "psnr_db": psnr, "latent_max_abs_err": lat_err}
        if err > 1e-2 or psnr < 40:
            raise VerificationError(
                f"end-to-end check failed: the bundle's video differs from the torch reference by up to {err:.3g} "
                f"(PSNR {psnr:.1f} dB)"
            )
        return result
    finally:
        (staging.dir / "manifest.json").unlink(missing_ok=True)


def _full(source: WeightSource, component: str, preset: ModelPreset):
    if source.ckpt is None:
        return models.randomized(component, preset, source.seed)
    return models.load(component, source.path, preset)
