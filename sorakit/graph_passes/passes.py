"""The built-in passes: pin, tdtm, prune, simplify, fp16, int8 (each registers itself in ``registry``)."""

from __future__ import annotations

import copy
import logging
from typing import Any

import onnx
from onnx import numpy_helper

from sorakit.bundle.manifest import GraphEntry, Manifest, TensorSpec
from sorakit.errors import SorakitError
from sorakit.graph_passes import tdtm as tdtm_mod
from sorakit.graph_passes.base import GraphChange, GraphPass, Workspace, new_name, save_shared
from sorakit.graph_passes.flops import count_flops
from sorakit.graph_passes.onnx_utils import clear_shapes
from sorakit.graph_passes.prune import prune_model
from sorakit.graph_passes.registry import register
from sorakit.presets import ModelPreset, decode_chunks

log = logging.getLogger(__name__)


def _applied(manifest: Manifest) -> list[str]:
    return [p["name"] for p in manifest.passes]


def _refuse_after(manifest: Manifest, name: str, later: tuple[str, ...]) -> None:
    done = [p for p in _applied(manifest) if p in later]
    if done:
        raise SorakitError(
            f"pass {name!r} must run before {', '.join(done)}, which this bundle already carries; "
            f"apply it to the bundle as exported (e.g. --passes {name},{','.join(done)})"
        )


def _refuse_twice(manifest: Manifest, name: str) -> None:
    if name in _applied(manifest):
        raise SorakitError(f"the bundle already carries pass {name!r}; applying it twice is refused")


def _all(manifest: Manifest, components=None, variants: bool = True) -> list[tuple[str, GraphEntry]]:
    out = []
    for comp, c in manifest.components.items():
        if components is None or comp in components:
            for g in c.graphs:
                out.append((comp, g))
    return out


# ---------------------------------------------------------------------------------------------
# tdtm
# ---------------------------------------------------------------------------------------------
@register
class TDTMPass(GraphPass):
    """Add a TDTM variant to every transformer block graph (sharing its weight file)."""

    name = "tdtm"
    order = 20
    lossy = True
    gate = 0.50  # TDTM for half the steps vs none; what it costs is measured by `sorakit eval`
    requires_static = True

    def __init__(self, positions: str = "midpoint", scope: str = "attention", **kw: Any):
        if positions not in tdtm_mod.POSITIONS:
            raise SorakitError(f"unknown TDTM positions {positions!r}; one of {tdtm_mod.POSITIONS}")
        if scope not in tdtm_mod.SCOPES:
            raise SorakitError(f"unknown TDTM scope {scope!r}; one of {tdtm_mod.SCOPES}")
        super().__init__(positions=positions, scope=scope, **kw)

    def check(self, manifest: Manifest) -> None:
        _refuse_twice(manifest, self.name)
        _refuse_after(manifest, self.name, ("prune", "simplify", "fp16", "int8"))
        if "transformer" not in manifest.components:
            raise SorakitError("pass 'tdtm' needs the transformer component, which this bundle lacks")
        if not manifest.static:
            raise SorakitError("pass 'tdtm' needs static shapes; add 'pin' before it (--passes pin,tdtm ...)")
        if (manifest.export or {}).get("exporter") == "dynamo" and not any(p["name"] == "pin" for p in manifest.passes):
            # dynamo writes a static graph's reshape targets as constants holding the frame count,
            # so a merged (shorter) time axis no longer fits them inside the TDTM regions
            raise SorakitError("pass 'tdtm' cannot merge frames in static graphs from the dynamo exporter (their "
                               "reshape targets are constants holding the frame count)",
                               hint="export with --exporter torchscript (the default), or --dynamic and then "
                                    "--passes pin,tdtm")

    def targets(self, manifest):
        return [(c, g) for c, g in _all(manifest, ("transformer",)) if g.role == "block"]

    def rewrite(self, ws: Workspace, manifest, component, entry) -> list[GraphChange]:
        model = ws.load(entry.file)
        if not tdtm_mod.boundaries(model):
            raise SorakitError(f"graph {entry.name} is not a transformer block with TDTM boundaries; pass 'tdtm' "
                               "applies only to blocks exported by sorakit")
        result = tdtm_mod.inject(model, self._settings["positions"], self._settings["scope"])
        rel = new_name(entry.file, "tdtm")
        ws.save(result.model, rel)  # initializers keep pointing at the plain graph's data file
        flops_before, flops_after = count_flops(model), count_flops(result.model)
        variant = GraphEntry(
            name=entry.name + ".tdtm", role="block", file=rel, data=entry.data,
            inputs=[copy.deepcopy(t) for t in entry.inputs], outputs=[copy.deepcopy(t) for t in entry.outputs],
            modules=list(entry.modules), params=entry.params, flops=flops_after,
            info={"frames": result.frames, "merged_frames": result.merged_frames,
                  "positions": self._settings["positions"], "scope": self._settings["scope"],
                  "flops_saved": flops_before - flops_after},
        )
        entry.variants["tdtm"] = variant
        saved = 100.0 * (flops_before - flops_after) / max(flops_before, 1)
        return [GraphChange(variant.name, len(model.graph.node), len(result.model.graph.node), 0,
                            ws.path(rel).stat().st_size,
                            note=f"T {result.frames} -> {result.merged_frames}; FLOPs {flops_before / 1e9:.3f} -> "
                                 f"{flops_after / 1e9:.3f} G (-{saved:.1f}%)", new_variant="tdtm")]


# ---------------------------------------------------------------------------------------------
# prune: exact clean-up on onnxscript's optimizer and onnx-ir's passes (``prune.py``)
# ---------------------------------------------------------------------------------------------
@register
class PrunePass(GraphPass):
    """Exact clean-up after structural surgery; never touches the weights (variants keep sharing)."""

    name = "prune"
    order = 30

    def check(self, manifest):
        _refuse_twice(manifest, self.name)
        _refuse_after(manifest, self.name, ("fp16", "int8", "simplify"))

    def targets(self, manifest):
        return _all(manifest)

    def rewrite(self, ws, manifest, component, entry) -> list[GraphChange]:
        return _rewrite_each(ws, entry, "prune", lambda e: prune_model(ws.load(e.file)), new_data=False)


def _rewrite_each(ws: Workspace, entry: GraphEntry, tag: str, transform, new_data: bool) -> list[GraphChange]:
    """Apply ``transform`` to a graph and each of its variants; write ``<stem>.<tag>.onnx`` files.

    With ``new_data`` the result's weights go to a new external-data file of its own; without,
    the graph keeps pointing at its current weight file (shared with its variants).
    """
    changes = []
    for e in [entry] + list(entry.variants.values()):
        nodes_before = len(ws.load(e.file).graph.node)
        before = ws.size(e)
        model = transform(e)
        old = copy.deepcopy(e)
        e.file = new_name(e.file, tag)
        if new_data:
            e.data = e.file + ".data"
        ws.save(model, e.file, e.data if new_data else None)
        changes.append(GraphChange(e.name, nodes_before, len(model.graph.node), before, ws.size(e), replaced=old))
    return changes


@register
class SimplifyPass(GraphPass):
    """onnxsim (constant folding and its fusions). Rewrites weights, so TDTM variants get their own copy."""

    name = "simplify"
    order = 35

    def check(self, manifest):
        _refuse_twice(manifest, self.name)
        _refuse_after(manifest, self.name, ("fp16", "int8"))

    def targets(self, manifest):
        return _all(manifest)

    def rewrite(self, ws, manifest, component, entry) -> list[GraphChange]:
        import onnxsim

        def simplify(e: GraphEntry) -> onnx.ModelProto:
            simplified, ok = onnxsim.simplify(ws.load(e.file, with_data=True), perform_optimization=False)
            if not ok:
                raise SorakitError(f"onnxsim could not validate its result for {e.name}")
            return simplified

        return _rewrite_each(ws, entry, "simplify", simplify, new_data=True)


# ---------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------
FP32_ISLANDS = ["Softmax", "LayerNormalization", "GroupNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal",
                "InstanceNormalization", "Exp", "Log", "Cos", "Sin"]
# fp16 island sets, from none (fp16 throughout: what the Neural Engine needs) to the cautious default
ISLAND_SETS = {
    "none": [],
    "norms": ["LayerNormalization", "GroupNormalization", "InstanceNormalization", "ReduceMean", "Pow", "Sqrt",
              "Reciprocal"],
    "safe": FP32_ISLANDS,
}
AUTO_ISLANDS = ("none", "norms", "safe")  # "auto" tries these in order; the first that passes the gate is kept


class _PrecisionPass(GraphPass):
    components: tuple[str, ...] = ()
    tag = ""

    def check(self, manifest):
        _refuse_twice(manifest, self.name)
        other = {"fp16": "int8", "int8": "fp16"}[self.name]
        if other in _applied(manifest):
            raise SorakitError(f"the bundle already carries {other!r}; fp16 and int8 do not combine")

    def targets(self, manifest):
        # the transformer's prologue and epilogue stay fp32 under every lossy precision: they are
        # tiny; fp16 loses the phase of the timestep and position sinusoids (arguments up to
        # ~1000), and int8 rounding of the final projection lands directly on the velocity
        comps = self._settings.get("components") or self.components
        return [(c, g) for c, g in _all(manifest) if c in comps and g.role not in ("prologue", "epilogue")]

    def convert(self, ws: Workspace, e: GraphEntry) -> onnx.ModelProto:
        raise NotImplementedError

    def rewrite(self, ws, manifest, component, entry) -> list[GraphChange]:
        if self._settings.get("variant"):
            return self._add_variants(ws, entry)
        base_before = ws.size(entry)
        base_nodes = len(ws.load(entry.file).graph.node)
        base = self.convert(ws, entry)
        variants = {}
        olds = {entry.name: copy.deepcopy(entry)}
        nodes_before = {}
        for v in entry.variants.values():
            olds[v.name] = copy.deepcopy(v)
            nodes_before[v.name] = len(ws.load(v.file).graph.node)
            variants[new_name(v.file, self.tag)] = (v, self.convert(ws, v))
        rel = new_name(entry.file, self.tag)
        entry.file, entry.data = rel, rel + ".data"
        save_shared(ws, base, rel, entry.data, {r: m for r, (_, m) in variants.items()})
        changes = [GraphChange(entry.name, base_nodes, len(base.graph.node), base_before, ws.size(entry),
                               replaced=olds[entry.name])]
        for r, (v, m) in variants.items():
            before = ws.size(v)
            v.file, v.data = r, entry.data
            changes.append(GraphChange(v.name, nodes_before[v.name], len(m.graph.node), before,
                                       ws.path(r).stat().st_size, note="weights shared with " + entry.name,
                                       replaced=olds[v.name]))
        return changes


    def _add_variants(self, ws: Workspace, entry: GraphEntry) -> list[GraphChange]:
        """Keep the graph and add this precision as variants: ``<tag>`` of the graph and
        ``<variant>+<tag>`` of each existing variant (e.g. ``tdtm+int8``), sharing one new weight
        file. The runtime picks a precision per component from these (``runtime.plan``)."""
        sources = [("", entry)] + [(k, v) for k, v in entry.variants.items() if self.tag not in k.split("+")]
        converted = {key: (src, self.convert(ws, src)) for key, src in sources}
        base_key = self.tag
        rel = new_name(entry.file, self.tag)
        data = rel + ".data"
        base_src, base_model = converted.pop("")
        others = {new_name(src.file, self.tag): model for _, (src, model) in converted.items()}
        save_shared(ws, base_model, rel, data, others)
        changes = []
        for key, src, model, file in [(base_key, base_src, base_model, rel)] + [
                (f"{k}+{self.tag}", src, model, new_name(src.file, self.tag)) for k, (src, model) in converted.items()]:
            variant = GraphEntry(
                name=f"{src.name}.{self.tag}", role=entry.role, file=file, data=data,
                inputs=[copy.deepcopy(t) for t in src.inputs], outputs=[copy.deepcopy(t) for t in src.outputs],
                modules=list(src.modules), params=src.params, flops=src.flops,
                info={**src.info, "precision": self.tag})
            entry.variants[key] = variant
            changes.append(GraphChange(variant.name, len(ws.load(src.file).graph.node), len(model.graph.node),
                                       ws.size(src), ws.path(file).stat().st_size,
                                       note=f"variant {key!r} beside the fp32 graph", new_variant=key))
        return changes


def square_pow_as_mul(g: onnx.GraphProto) -> int:
    """Pow(x, 2) -> Mul(x, x) (bit-identical in fp32; Core ML's EP takes Pow only on fp32 inputs)."""
    consts = {i.name: i for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    done = 0
    for n in g.node:
        if n.op_type == "Pow" and len(n.input) == 2 and n.input[1] in consts:
            t = consts[n.input[1]]
            if t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            e = numpy_helper.to_array(t)
            if e.size == 1 and float(e.reshape(-1)[0]) == 2.0:
                n.op_type = "Mul"
                n.input[1] = n.input[0]
                done += 1
    return done


def _drop_duplicate_casts(g: onnx.GraphProto) -> None:
    first: dict[str, onnx.NodeProto] = {}
    keep = []
    for n in g.node:
        dup = [o for o in n.output if o in first]
        if dup:
            other = first[dup[0]]
            same = (n.op_type == other.op_type == "Cast" and list(n.input) == list(other.input)
                    and n.attribute == other.attribute)
            if not same:
                raise SorakitError(f"fp16 conversion produced two different definitions of {dup[0]}")
            continue
        for o in n.output:
            first[o] = n
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def _unique_node_names(g: onnx.GraphProto) -> None:
    seen: dict[str, int] = {}
    for n in g.node:
        if n.name in seen:
            seen[n.name] += 1
            n.name = f"{n.name}_{seen[n.name]}"
        else:
            seen[n.name] = 0


@register
class FP16Pass(_PrecisionPass):
    """fp16 weights and compute, with fp32 islands (softmax, normalisation) and fp32 I/O.

    The text encoder stays fp32: T5 overflows in fp16 (its activations exceed 65504).
    """

    name = "fp16"
    order = 40
    lossy = True
    gate = 0.95
    components = ("transformer", "vae")
    tag = "fp16"

    def __init__(self, islands: str | list[str] = "auto", **kw: Any):
        if isinstance(islands, str) and islands not in (*ISLAND_SETS, "auto"):
            islands = [s.strip() for s in islands.split(",") if s.strip()]
        super().__init__(islands=islands, **kw)

    def island_ops(self) -> list[str]:
        islands = self._settings["islands"]
        if islands == "auto":  # applied without its gate: the cautious set
            islands = AUTO_ISLANDS[-1]
        return list(ISLAND_SETS[islands]) if isinstance(islands, str) else list(islands)

    def candidates(self) -> list[GraphPass]:
        if self._settings["islands"] != "auto":
            return [self]
        rest = {k: v for k, v in self._settings.items() if k != "islands"}
        return [FP16Pass(islands=level, **rest) for level in AUTO_ISLANDS]

    def finish(self, manifest):
        comps = self._settings.get("components") or self.components
        for c, g in _all(manifest):
            for e in [g, *g.variants.values()]:
                if c not in comps:
                    e.info["fp32_reason"] = ("the fp16 pass keeps the text encoder fp32: T5's activations overflow "
                                             "fp16 (above 65504)" if c == "text_encoder" else
                                             f"the fp16 pass was not applied to the {c} component")
                elif g.role in ("prologue", "epilogue"):
                    e.info["fp32_reason"] = ("the fp16 pass keeps the transformer's prologue and epilogue fp32: fp16 "
                                             "loses the phase of the timestep and position sinusoids, and the "
                                             "epilogue writes the velocity directly")
                else:
                    e.info.pop("fp32_reason", None)

    def convert(self, ws, e):
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = ws.load(e.file, with_data=True)
        islands = self.island_ops()
        if "Pow" not in islands:
            square_pow_as_mul(model.graph)  # exact; the EP takes Pow only in fp32
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=islands)
        _drop_duplicate_casts(converted.graph)  # the converter may insert one Cast per consumer, alike
        _unique_node_names(converted.graph)
        return converted


@register
class Int8Pass(_PrecisionPass):
    """Dynamic int8 weight quantisation (QInt8) of MatMul weights; activations quantised at run time."""

    name = "int8"
    order = 40
    lossy = True
    gate = 0.90
    components = ("transformer", "text_encoder")
    tag = "int8"

    def convert(self, ws, e):
        import tempfile
        from pathlib import Path

        from onnxruntime.quantization import QuantType, quantize_dynamic

        model = ws.load(e.file, with_data=True)
        clear_shapes(model.graph)
        with tempfile.TemporaryDirectory(dir=ws.root) as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save(model, str(src), save_as_external_data=True, location="in.onnx.data")
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # the quantiser advises pre-processing on every call
            try:
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                                 per_channel=bool(self._settings.get("per_channel", False)),
                                 use_external_data_format=True,
                                 # DefaultTensorType: types behind contrib ops (FastGelu) that
                                 # ONNX shape inference cannot see are float
                                 extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
            finally:
                root.setLevel(level)
            return onnx.load(str(dst), load_external_data=True)


# ---------------------------------------------------------------------------------------------
# pin: dynamic -> static shapes
# ---------------------------------------------------------------------------------------------
@register
class PinPass(GraphPass):
    """Fix every dynamic dimension for one resolution and frame count (Core ML wants static shapes)."""

    name = "pin"
    order = 10

    def __init__(self, resolution: tuple[int, int] | None = None, frames: int | None = None, **kw):
        super().__init__(resolution=list(resolution) if resolution else None, frames=frames, **kw)

    def check(self, manifest):
        if manifest.static:
            raise SorakitError("the bundle already has static shapes; 'pin' applies to bundles exported with --dynamic")
        if not self._settings.get("resolution") or not self._settings.get("frames"):
            raise SorakitError("pass 'pin' needs --resolution HxW and --frames N")
        preset = ModelPreset.from_dict(manifest.preset)
        h, w = self._settings["resolution"]
        n = self._settings["frames"]
        from sorakit.presets import check_geometry

        check_geometry(preset, n, h, w)
        if "vae" in manifest.components and len(set(decode_chunks(n, preset.vae.micro_frame_size,
                                                                  preset.vae.temporal.time_downsample))) > 1:
            mfs = preset.vae.micro_frame_size
            raise SorakitError(f"static bundles decode in equal chunks: frames must be a multiple of {mfs} "
                               f"or below it (got {n})")

    def dims(self, manifest: Manifest) -> dict[str, int]:
        preset = ModelPreset.from_dict(manifest.preset)
        h, w = self._settings["resolution"]
        n = self._settings["frames"]
        T, lh, lw = preset.latent_size(n, h, w)
        ph, pw = preset.stdit.patch_size[1:]
        zt, nf = decode_chunks(n, preset.vae.micro_frame_size, preset.vae.temporal.time_downsample)[0]
        d = {"batch": 1, "batch2": 2, "latent_frames": T, "latent_height": lh, "latent_width": lw,
             "tokens": (-(-lh // ph)) * (-(-lw // pw)), "frames": preset.vae.spatial.micro_batch_size,
             "chunk_latent_frames": zt, "chunk_frames": nf,
             "chunk_decoded_frames": zt * preset.vae.temporal.time_downsample,
             "text_tokens": int(manifest.tokenizer["max_length"])}
        for level in range(len(preset.vae.temporal.channel_multipliers)):
            ups = sum(preset.vae.temporal.temporal_downsample[level:])
            d[f"frames_l{level}"] = zt * 2**ups
        return d

    def targets(self, manifest):
        return _all(manifest)

    def rewrite(self, ws, manifest, component, entry) -> list[GraphChange]:
        dims = self.dims(manifest)

        def fixed(spec: TensorSpec) -> list[int]:
            try:
                return [d if isinstance(d, int) else dims[d] for d in spec.shape]
            except KeyError as e:
                raise SorakitError(f"cannot pin {entry.name}: unknown dimension {e.args[0]!r}") from None

        model = ws.load(entry.file)
        before = ws.size(entry)
        g = model.graph
        for coll, specs in ((g.input, entry.inputs), (g.output, entry.outputs)):
            by_name = {t.name: fixed(t) for t in specs}
            for vi in coll:
                for d, v in zip(vi.type.tensor_type.shape.dim, by_name.get(vi.name, [])):
                    d.ClearField("dim_param")
                    d.dim_value = v
        pinned = prune_model(model)  # folds the now-constant shape arithmetic; weights untouched
        left = [n.op_type for n in pinned.graph.node if n.op_type in ("Shape", "Size")]
        if left:
            raise SorakitError(f"pinning {entry.name} left {len(left)} shape computations unresolved")
        if entry.role == "block":
            tdtm_mod.mark_boundaries(pinned)  # names the TDTM boundaries now that the graph is static
        old = copy.deepcopy(entry)
        rel = new_name(entry.file, "pin")
        entry.file = rel  # the weights stay in the original external-data file
        ws.save(pinned, rel)
        entry.inputs = [TensorSpec(t.name, fixed(t), t.dtype, t.binds) for t in entry.inputs]
        entry.outputs = [TensorSpec(t.name, fixed(t), t.dtype, t.binds) for t in entry.outputs]
        entry.flops = count_flops(pinned)
        return [GraphChange(entry.name, len(model.graph.node), len(pinned.graph.node), before, ws.size(entry),
                            replaced=old)]

    def finish(self, manifest):
        h, w = self._settings["resolution"]
        n = self._settings["frames"]
        preset = ModelPreset.from_dict(manifest.preset)
        manifest.geometry = {"static": True, "height": h, "width": w, "num_frames": n,
                             "latent": list(preset.latent_size(n, h, w)), "batch": 1, "batch2": 2}
        if "vae" in manifest.components:
            manifest.components["vae"].info["chunks"] = decode_chunks(
                n, preset.vae.micro_frame_size, preset.vae.temporal.time_downsample)


__all__ = ["prune_model"]
