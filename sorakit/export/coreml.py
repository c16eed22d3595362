"""The Core ML path: one ML Program ``.mlpackage`` per block, straight from the torch pieces.

This is the alternative to ORT's CoreML EP: Core ML runs the whole block itself (no
partitioning, no CPU fallback inside ORT), and its own ops cover what the EP does not
(3-D convolutions of the temporal VAE, Gather, Pad). The pieces are the exporter's
(``pieces.py``), built and filled block by block (``build_piece``/``WeightSource``), so peak
memory stays at one block. Shapes are static, taken from the bundle geometry.

Per piece: build, adapt for Core ML (``adapt_for_coreml``: GroupNorm on 5-D tensors as 3-D,
which Core ML would otherwise lower through a rank-6 reshape), trace with ``torch.jit.trace``
(fallback: ``torch.export``), ``ct.convert(..., convert_to="mlprogram")``, save, and check
that the saved package's input/output names and shapes are the piece's (and the ``--like``
bundle's). Int64 inputs become int32 (Core ML has no int64 inputs). Precision: fp16 by
default, but the T5 pieces stay fp32 (T5 overflows in fp16; On-device Sora keeps it fp32).
Numerical checks need the Core ML runtime, i.e. macOS; elsewhere they are skipped and the
report says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sorakit.errors import SorakitError, VerificationError
from sorakit.export import models
from sorakit.export.exporter import ExportSettings, WeightSource, build_piece, compare, plan_for
from sorakit.export.pieces import PieceSpec
from sorakit.presets import ModelPreset, get_preset

log = logging.getLogger(__name__)
FORMAT = "sorakit-coreml"
FORMAT_VERSION = 1
MANIFEST = "coreml_manifest.json"
TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
MIN_PSNR = 35.0  # Apple's gate for a Core ML conversion (ml-stable-diffusion)


@dataclass
class CoreMLSettings:
    like: Path | None = None  # a bundle to follow (preset, geometry, granularity, graph list)
    preset: str | None = None
    resolution: tuple[int, int] | None = None
    num_frames: int | None = None
    components: tuple[str, ...] | None = None
    granularity: str | None = None
    precision: str = "fp16"  # fp16 or fp32 (the text encoder stays fp32 either way)
    target: str = "iOS17"
    seed: int = 0
    random_weights: bool = False
    checkpoints: dict[str, Path] = field(default_factory=dict)
    t5_lookup_outside: bool | None = None
    numeric_check: bool | None = None  # None: on macOS only
    only: tuple[str, ...] | None = None  # convert only graphs whose name starts with one of these
    tdtm: bool = True  # also convert each transformer block's TDTM variant (as `sorakit optimize --passes tdtm`)
    gate: float | None = None  # fp16: minimum SSIM (None: the fp16 pass's registered gate); <= 0 skips the gate
    gate_steps: int | None = None
    force: bool = False  # convert in fp16 even when the gate fails (recorded)
    tdtm_positions: str = "midpoint"
    tdtm_scope: str = "attention"


@dataclass
class CoreMLPiece:
    name: str
    component: str
    role: str
    file: str
    precision: str
    method: str = ""
    spec_check: str = ""
    numeric: dict[str, float] | None = None
    seconds: float = 0.0
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CoreMLReport:
    out: Path
    precision: str
    target: str
    pieces: list[CoreMLPiece] = field(default_factory=list)
    numeric_note: str = ""
    gate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "precision": self.precision, "target": self.target, "gate": self.gate,
                "numeric_note": self.numeric_note, "pieces": [p.__dict__ for p in self.pieces]}


# ---------------------------------------------------------------------------------------------
# adapting a piece for Core ML
# ---------------------------------------------------------------------------------------------
class GroupNorm3d(nn.Module):
    """GroupNorm that normalises an [N, C, *] tensor as [N, C, prod(*)]: same numbers, rank <= 5.

    coremltools lowers a GroupNorm of a 5-D tensor through a rank-6 reshape, which Core ML
    rejects ("only supports tensors with rank <= 5").
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 4:
            return self.norm(x)
        n = self.norm
        y = nn.functional.group_norm(x.reshape(x.shape[0], x.shape[1], -1), n.num_groups, n.weight, n.bias, n.eps)
        return y.reshape(x.shape)


def adapt_for_coreml(module: nn.Module) -> nn.Module:
    """Swap in Core ML-friendly equivalents (exact same math); returns the module."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, GroupNorm3d(child))
        elif not isinstance(child, GroupNorm3d):
            adapt_for_coreml(child)
    return module


class TDTMBlock(nn.Module):
    """A transformer block group run the TDTM way (frame pairs merged around its attentions): the same
    computation as the TDTM graph pass injects into the ONNX block, from ``export.tdtm``'s reference."""

    def __init__(self, group: nn.Module, positions: str = "midpoint", scope: str = "attention"):
        super().__init__()
        self.group = group
        self.positions = positions
        self.scope = scope

    def forward(self, x, y, y_bias, t_mlp):
        from sorakit.export.tdtm import block_group_forward

        return block_group_forward(self.group, x, y, y_bias, t_mlp, self.positions, self.scope)


def example_inputs(spec: PieceSpec, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in spec.inputs:
        shape = [int(d) for d in i.shape]
        if i.dtype.startswith("int"):
            t = torch.zeros(shape, dtype=torch.int64)
            if "mask" in i.name and shape:
                t[..., : max(1, (2 * shape[-1]) // 3)] = 1
            out.append(t)
        elif i.name == "timestep":
            out.append(torch.full(shape, 500.0))
        elif i.name in ("fps", "height", "width"):
            out.append(torch.full(shape, 24.0 if i.name == "fps" else 64.0))
        else:
            out.append(torch.randn(shape, generator=g))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------
def _ct():
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        import coremltools as ct
    return ct


def _target(ct, name: str):
    if name not in TARGETS:
        raise SorakitError(f"unknown deployment target {name!r}; one of {', '.join(TARGETS)}")
    return getattr(ct.target, name)


def convert_piece(module: nn.Module, spec: PieceSpec, precision: str, target: str, seed: int = 0):
    """-> (MLModel, method). Tries torch.jit.trace, then torch.export."""
    ct = _ct()
    args = example_inputs(spec, seed)
    inputs = [ct.TensorType(name=i.name, shape=[int(d) for d in i.shape],
                            dtype=np.int32 if i.dtype.startswith("int") else np.float32) for i in spec.inputs]
    # float32 at every interface, like the ONNX graphs (fp16 stays inside the model)
    outputs = [ct.TensorType(name=o.name, dtype=np.int32 if o.dtype.startswith("int") else np.float32)
               for o in spec.outputs]
    kw = dict(inputs=inputs, outputs=outputs, convert_to="mlprogram", minimum_deployment_target=_target(ct, target),
              compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
    errors = []
    for method in ("jit.trace", "torch.export"):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
                warnings.simplefilter("ignore")
                if method == "jit.trace":
                    source = torch.jit.trace(module, args, check_trace=False)
                    # fold constant subexpressions (e.g. torch.ones(()) * S, which coremltools mis-types)
                    with contextlib.suppress(Exception):
                        torch._C._jit_pass_constant_propagation(source.graph)
                else:
                    source = torch.export.export(module, args).run_decompositions({})
                return ct.convert(source, **kw), method
        except Exception as e:  # noqa: BLE001 - coremltools raises many types; keep both messages
            errors.append(f"{method}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    raise SorakitError(f"coremltools could not convert {spec.name}: " + " | ".join(errors))


def package_spec(path: Path) -> tuple[list[tuple[str, list[int], str]], list[tuple[str, list[int], str]]]:
    """(inputs, outputs) of a saved .mlpackage as (name, shape, dtype); works without the Core ML runtime."""
    ct = _ct()
    spec = ct.utils.load_spec(str(path))
    names = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}

    def read(features):
        out = []
        for f in features:
            arr = f.type.multiArrayType
            out.append((f.name, [int(d) for d in arr.shape], names.get(arr.dataType, str(arr.dataType))))
        return out

    return read(spec.description.input), read(spec.description.output)


def check_spec(path: Path, spec: PieceSpec, entry: dict[str, Any] | None = None) -> None:
    """The saved package's I/O must be the piece's (and the bundle graph's) names and shapes, in order."""
    ins, outs = package_spec(path)
    for kind, got, want in (("input", ins, spec.inputs), ("output", outs, spec.outputs)):
        exp = [(w.name, [int(d) for d in w.shape]) for w in want]
        have = [(n, s) for n, s, _ in got]
        if kind == "output":  # Core ML leaves output shapes empty when it cannot infer them
            have = [(n, s or e[1]) for (n, s), e in zip(have, exp)]
        if have != exp:
            raise VerificationError(f"{path.name}: {kind}s {have} differ from the piece's {exp}")
        for (n, _, dt), w in zip(got, want):
            ok = {"int64": "int32"}.get(w.dtype, w.dtype)
            if dt != ok:
                raise VerificationError(f"{path.name}: {kind} {n} is {dt}, the piece's is {w.dtype}")
    if entry is not None:
        for kind, got in (("inputs", ins), ("outputs", outs)):
            exp = [(t["name"], list(t["shape"])) for t in entry[kind]]
            have = [(n, s or e[1]) for (n, s, _), e in zip(got, exp)]
            if have != exp:
                raise VerificationError(f"{path.name}: {kind} {have} differ from the bundle's {entry['name']}: {exp}")


def numeric_check(mlmodel, module: nn.Module, spec: PieceSpec, seed: int = 0) -> dict[str, float]:
    """Core ML prediction vs torch on the same inputs (macOS only: it needs the Core ML runtime)."""
    args = example_inputs(spec, seed)
    with torch.no_grad():
        ref = module(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    feed = {i.name: (a.numpy().astype(np.int32) if i.dtype.startswith("int") else a.numpy())
            for i, a in zip(spec.inputs, args)}
    got = mlmodel.predict(feed)
    worst_err, worst_psnr = 0.0, float("inf")
    for o, r in zip(spec.outputs, ref):
        err, psnr = compare(r.numpy(), np.asarray(got[o.name]).reshape(r.shape))
        worst_err, worst_psnr = max(worst_err, err), min(worst_psnr, psnr)
    if worst_psnr < MIN_PSNR:
        raise VerificationError(f"{spec.name}: Core ML output differs from torch (PSNR {worst_psnr:.1f} dB < "
                                f"{MIN_PSNR} dB, max abs error {worst_err:.3g})")
    return {"max_abs_err": worst_err, "psnr_db": worst_psnr}


# ---------------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------------
def _resolve(settings: CoreMLSettings) -> tuple[ExportSettings, dict[str, Any] | None]:
    like = None
    if settings.like is not None:
        from sorakit.bundle.io import Bundle

        like = Bundle.open(settings.like, verify="none").manifest
        if not like.static:
            raise SorakitError(f"bundle {settings.like} has dynamic shapes; the Core ML path needs static ones",
                               hint="export a static bundle (without --dynamic) for the device's size")
    if like is not None:
        preset = ModelPreset.from_dict(like.preset)
        if settings.preset and settings.preset != preset.name:
            raise SorakitError(f"--preset {settings.preset} differs from the bundle's preset {preset.name}")
        geo = like.geometry
        h, w = settings.resolution or (geo["height"], geo["width"])
        frames = settings.num_frames or geo["num_frames"]
        if (h, w, frames) != (geo["height"], geo["width"], geo["num_frames"]):
            raise SorakitError(f"--resolution/--frames {h}x{w}/{frames} differ from the bundle's "
                               f"{geo['height']}x{geo['width']}/{geo['num_frames']}")
        granularity = settings.granularity or like.export.get("granularity", "pair")
        comps = settings.components or tuple(like.components)
        lookup = like.export.get("t5_lookup_outside", False) if settings.t5_lookup_outside is None \
            else settings.t5_lookup_outside
    else:
        preset = get_preset(settings.preset or "opensora-v1.2")
        h, w = settings.resolution or preset.resolution
        frames = settings.num_frames or preset.num_frames
        granularity = settings.granularity or "pair"
        comps = settings.components or models.COMPONENTS
        lookup = bool(settings.t5_lookup_outside)
    bad = [c for c in comps if c not in models.COMPONENTS]
    if bad:
        raise SorakitError(f"unknown components {bad}; choose from {', '.join(models.COMPONENTS)}")
    if not settings.random_weights:
        missing = [c for c in comps if c not in settings.checkpoints]
        if missing:
            raise SorakitError(f"no checkpoint given for {', '.join(missing)}",
                               hint="pass " + " ".join(f"--{c.replace('_', '-')} DIR" for c in missing)
                               + " or --random-weights")
    if settings.precision not in ("fp16", "fp32"):
        raise SorakitError(f"precision must be fp16 or fp32, not {settings.precision!r}")
    es = ExportSettings(preset, h, w, frames, static=True, granularity=granularity, components=tuple(comps),
                        verify=False, seed=settings.seed, t5_lookup_outside=lookup)
    return es, (like.to_dict() if like is not None else None)


def export_coreml(settings: CoreMLSettings, out: str | Path, progress=None) -> CoreMLReport:
    """Convert every piece to an .mlpackage under ``out`` with ``coreml_manifest.json``, atomically."""
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise SorakitError(f"output {out} exists and is not a sorakit Core ML directory; choose another path")
    es, like = _resolve(settings)
    ct = _ct()
    _target(ct, settings.target)
    geo = es.geometry()
    numeric = sys.platform == "darwin" if settings.numeric_check is None else settings.numeric_check
    report = CoreMLReport(out, settings.precision, settings.target)
    report.gate = run_fp16_gate(es, settings) if settings.precision == "fp16" else None
    report.numeric_note = (
        "numeric check: Core ML predictions compared with torch (PSNR >= 35 dB)" if numeric else
        f"numeric check skipped: Core ML predictions need macOS (this is {sys.platform}); the conversion and every "
        "package's input/output spec were checked"
    )
    like_entries = {}
    if like:
        for comp in like["components"].values():
            for g in comp["graphs"]:
                like_entries[g["name"]] = g
                for v in g.get("variants", {}).values():
                    like_entries[v["name"]] = v
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        components: dict[str, Any] = {}
        for comp in es.components:
            source = WeightSource(comp, es.preset, settings.checkpoints.get(comp) if not settings.random_weights
                                  else None, settings.seed)
            plan = plan_for(comp, es, geo)
            if like and comp in like["components"]:
                names = [g["name"] for g in like["components"][comp]["graphs"]]
                if names != [p.name for p in plan]:
                    raise SorakitError(f"the {comp} pieces {[p.name for p in plan]} differ from the bundle's {names}")
            if settings.only:
                plan = [p for p in plan if any(p.name.startswith(o) for o in settings.only)]
            graphs = []
            for i, spec in enumerate(plan):
                if progress:
                    progress(comp, i, len(plan))
                t0 = time.perf_counter()
                precision = "fp32" if comp == "text_encoder" else settings.precision
                module = adapt_for_coreml(build_piece(spec, source, str(source.path or "random weights")))
                mlmodel, method = convert_piece(module, spec, precision, settings.target, settings.seed)
                rel = spec.rel_file[: -len(".onnx")] + ".mlpackage"
                dst = staging / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    mlmodel.save(str(dst))
                check_spec(dst, spec, like_entries.get(spec.name))
                piece = CoreMLPiece(spec.name, comp, spec.role, rel, precision, method,
                                    "matches the bundle" if spec.name in like_entries else "matches the piece")
                if numeric:
                    piece.numeric = numeric_check(mlmodel, module, spec, settings.seed)
                ins, outs = package_spec(dst)
                piece.inputs = [{"name": n, "shape": s, "dtype": d} for n, s, d in ins]
                piece.outputs = [{"name": o.name, "shape": [int(x) for x in o.shape], "dtype": d,
                                  **({"binds": o.binds} if o.binds else {})} for o, (_, _, d) in zip(spec.outputs, outs)]
                piece.seconds = time.perf_counter() - t0
                report.pieces.append(piece)
                graph = {"name": spec.name, "role": spec.role, "file": rel, "precision": precision,
                         "inputs": piece.inputs, "outputs": piece.outputs, "modules": spec.modules,
                         "converted_via": method}
                del mlmodel
                if spec.role == "block" and settings.tdtm and int(spec.inputs[0].shape[1]) >= 2:
                    variant = _convert_tdtm(module, spec, rel, precision, settings, staging, numeric,
                                            like_entries.get(spec.name + ".tdtm"))
                    report.pieces.append(variant)
                    graph["variants"] = {"tdtm": {"name": variant.name, "role": "block", "file": variant.file,
                                                  "precision": precision, "inputs": variant.inputs,
                                                  "outputs": variant.outputs, "converted_via": variant.method,
                                                  "tdtm": {"positions": settings.tdtm_positions,
                                                           "scope": settings.tdtm_scope}}}
                graphs.append(graph)
                del module
                if progress:
                    progress(comp, i + 1, len(plan))
            components[comp] = {"graphs": graphs}
        _side_files(es, settings, staging, like)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "preset": es.preset.to_dict(),
            "geometry": geo,
            "sampler": es.preset.to_dict()["sampler"],
            "precision": settings.precision,
            "text_encoder_precision": "fp32",
            "minimum_deployment_target": settings.target,
            "model_type": "mlprogram",
            "tokenizer": {"file": "tokenizer/tokenizer.json", "max_length": es.preset.t5.max_length,
                          "pad_id": es.preset.t5.pad_token_id, "eos_id": es.preset.t5.eos_token_id,
                          "prompt_suffix": es.preset.prompt_suffix},
            "null_caption": {"file": "null_caption.npy",
                             "shape": [es.preset.stdit.model_max_length, es.preset.stdit.caption_channels]},
            "t5_lookup_outside": es.t5_lookup_outside,
            "like_bundle": str(settings.like) if settings.like else None,
            "components": components,
            "notes": ["int64 inputs of the ONNX graphs are int32 here (Core ML has no int64 inputs)",
                      "TDTM variants (block_NN.tdtm.mlpackage) hold their own copy of the block's weights"
                      if settings.tdtm else "TDTM variants not converted (--no-tdtm)"],
            "tdtm": ({"available": True, "positions": settings.tdtm_positions, "scope": settings.tdtm_scope,
                      "variant": "tdtm", "default_steps": 0} if settings.tdtm and "transformer" in components
                     else {"available": False}),
            "numeric_check": report.numeric_note,
            "fp16_gate": report.gate,
            "tools": _tool_versions(),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def run_fp16_gate(es: ExportSettings, settings: CoreMLSettings) -> dict[str, Any]:
    """The fp16 pass's quality gate for Core ML's fp16 compute precision (emulated in torch: ``export.fp16``).

    Needs the whole model (text encoder, transformer and VAE, from checkpoints or random weights);
    a failing gate refuses the conversion unless ``force``.
    """
    if settings.gate is not None and settings.gate <= 0:
        return {"skipped": "not gated on request (--gate 0)"}
    missing = [c for c in models.COMPONENTS if settings.random_weights is False and c not in settings.checkpoints]
    if missing:
        return {"skipped": f"the gate runs the whole model; no checkpoint for {', '.join(missing)}"}
    from sorakit.export.fp16 import fp16_gate

    if settings.random_weights:
        tm = models.TorchModels.random(es.preset, settings.seed)
    else:
        tok = Path(settings.checkpoints["text_encoder"]) / "tokenizer.json"
        if settings.like is not None:  # the bundle's tokenizer (the one the app ships)
            from sorakit.bundle.io import Bundle

            b = Bundle.open(settings.like, verify="none")
            tok = b.path(b.manifest.tokenizer["file"])
        tm = models.TorchModels.from_checkpoints(es.preset, settings.checkpoints["transformer"],
                                                 settings.checkpoints["vae"], settings.checkpoints["text_encoder"],
                                                 tok if tok.is_file() else None)
    gate = fp16_gate(tm, settings.gate, settings.gate_steps)
    if not gate["passed"]:
        if not settings.force:
            raise VerificationError(
                f"fp16 compute precision fails its quality gate: mean SSIM {gate['value']:.3f} < {gate['threshold']} "
                f"(PSNR {gate['psnr_db']:.1f} dB{', non-finite values' if not gate['finite'] else ''}) on "
                f"{len(gate['prompts'])} fixed prompts; nothing was converted",
                hint="convert with --precision fp32, or --force to convert in fp16 anyway")
        gate["forced"] = True
    return gate


def _convert_tdtm(module: nn.Module, spec: PieceSpec, rel: str, precision: str, settings: CoreMLSettings,
                  staging: Path, numeric: bool, like_entry: dict[str, Any] | None) -> CoreMLPiece:
    """The TDTM variant of a converted block: same inputs and outputs, its own .mlpackage."""
    from sorakit.graph_passes.tdtm import POSITIONS, SCOPES

    if settings.tdtm_positions not in POSITIONS or settings.tdtm_scope not in SCOPES:
        raise SorakitError(f"TDTM positions must be one of {POSITIONS} and scope one of {SCOPES}")
    t0 = time.perf_counter()
    wrapped = TDTMBlock(module, settings.tdtm_positions, settings.tdtm_scope).eval()
    mlmodel, method = convert_piece(wrapped, spec, precision, settings.target, settings.seed)
    vrel = rel[: -len(".mlpackage")] + ".tdtm.mlpackage"
    dst = staging / vrel
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        mlmodel.save(str(dst))
    check_spec(dst, spec, like_entry)
    piece = CoreMLPiece(spec.name + ".tdtm", spec.component, "block", vrel, precision, method,
                        "matches the bundle's TDTM variant" if like_entry else "matches the piece")
    if numeric:
        piece.numeric = numeric_check(mlmodel, wrapped, spec, settings.seed)
    ins, outs = package_spec(dst)
    piece.inputs = [{"name": n, "shape": s, "dtype": d} for n, s, d in ins]
    piece.outputs = [{"name": o.name, "shape": [int(x) for x in o.shape], "dtype": d,
                      **({"binds": o.binds} if o.binds else {})} for o, (_, _, d) in zip(spec.outputs, outs)]
    piece.seconds = time.perf_counter() - t0
    return piece


def _side_files(es: ExportSettings, settings: CoreMLSettings, staging: Path, like: dict | None) -> None:
    """Tokenizer, null caption (and the T5 table when looked up outside), as in the bundle."""
    tok = staging / "tokenizer" / "tokenizer.json"
    if settings.like is not None:
        root = Path(settings.like)
        tok.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / like["tokenizer"]["file"], tok)
        shutil.copyfile(root / like["null_caption"]["file"], staging / "null_caption.npy")
        emb = like["components"].get("text_encoder", {}).get("info", {}).get("embedding_file")
        if emb and es.t5_lookup_outside:
            (staging / emb).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / emb, staging / emb)
        return
    models.tokenizer_json(None if settings.random_weights else settings.checkpoints.get("text_encoder"), tok)
    path = None if settings.random_weights else settings.checkpoints.get("transformer")
    src = WeightSource("transformer", es.preset, path, settings.seed)
    null = src.read(["y_embedder.y_embedding"])["y_embedder.y_embedding"]
    np.save(staging / "null_caption.npy", null.detach().cpu().numpy().astype(np.float32))
    if es.t5_lookup_outside and "text_encoder" in es.components:
        path = None if settings.random_weights else settings.checkpoints.get("text_encoder")
        table = WeightSource("text_encoder", es.preset, path, settings.seed).read(["shared.weight"])["shared.weight"]
        (staging / "text_encoder").mkdir(parents=True, exist_ok=True)
        np.save(staging / "text_encoder" / "embedding.npy", table.detach().cpu().numpy())


def _tool_versions() -> dict[str, str]:
    ct = _ct()
    return {"torch": torch.__version__, "coremltools": ct.__version__}


__all__ = ["CoreMLSettings", "CoreMLReport", "export_coreml", "adapt_for_coreml", "convert_piece", "check_spec",
           "package_spec", "GroupNorm3d"]
