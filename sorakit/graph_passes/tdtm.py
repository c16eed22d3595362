"""Temporal Dimension Token Merging (On-device Sora, section 2) as a graph pass.

In a transformer block graph, before each spatial self-attention, temporal self-attention
and cross-attention, consecutive latent-frame pairs (0,1), (2,3), ... are averaged; after it,
each result is repeated for both frames. An odd last frame goes through unmerged (the
reference code drops or mis-restores it for T = 5, 10, 14, 25). Only Slice, Add, Mul,
Unsqueeze, Concat and Reshape are inserted, all in Core ML's ML Program op set.

The exporter marks the boundaries it guarantees (``mark_boundaries``): each attention
module's input and output are named ``<module>.tdtm_in`` / ``<module>.tdtm_out`` and the
RoPE tables of temporal blocks ``rope_cos`` / ``rope_sin``. The pass reads only those names.

RoPE positions of merged frames: "midpoint" (2j + 0.5, the mean of the pair's positions;
the default) or "compressed" (j, what the reference code does). The variant graph keeps the
plain graph's initializers and external-data file, so weights are not stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from sorakit.errors import SorakitError
from sorakit.graph_passes.onnx_utils import (
    clear_shapes,
    const,
    constant_names,
    consumers,
    in_module,
    module_path,
    rename_value,
    static_shapes,
    toposort,
)

TDTM_IN, TDTM_OUT = ".tdtm_in", ".tdtm_out"
ROPE_COS, ROPE_SIN = "rope_cos", "rope_sin"
POSITIONS = ("midpoint", "compressed")
SCOPES = ("attention", "block")


# ---------------------------------------------------------------------------------------------
# exporter side: name the boundaries
# ---------------------------------------------------------------------------------------------
def mark_boundaries(model: onnx.ModelProto) -> list[str]:
    """Name the attention (and MLP) boundaries of a block graph; returns the modules marked.

    Every attention must be markable (TDTM needs them); an MLP that cannot be marked is left
    unmarked, which only rules out ``scope="block"`` for that graph.
    """
    g = model.graph
    nodes = list(g.node)
    users: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            users.setdefault(i, []).append(k)
    owner = _attention_owners(nodes, users)
    modules = sorted(set(owner) - {None})
    consts = constant_names(g)
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {x.name for x in g.output}
    floats = _float_values(model)  # shape arithmetic (ints) may cross module borders in dynamic graphs
    found = []
    for m in modules:
        region = [k for k in range(len(nodes)) if owner[k] == m]
        produced = {o for k in region for o in nodes[k].output}
        ext_in = []
        for k in region:
            for i in nodes[k].input:
                if (i and i not in produced and i not in consts and i not in graph_inputs and i not in ext_in
                        and i in floats):
                    ext_in.append(i)
        ext_out = [o for o in produced if o in floats and (
            any(owner[c] != m for c in users.get(o, [])) or o in graph_outputs)]
        if len(ext_in) != 1 or len(ext_out) != 1:
            if m.endswith(".mlp"):
                continue
            raise SorakitError(f"cannot mark TDTM boundaries of {m}: inputs {ext_in}, outputs {ext_out}")
        rename_value(g, ext_in[0], m + TDTM_IN)
        rename_value(g, ext_out[0], m + TDTM_OUT)
        found.append(m)
    _mark_rope(model, [m for m in found if m.startswith("temporal_blocks.") and m.endswith(".attn")])
    return found


def _attention_owners(nodes: list[onnx.NodeProto], users: dict[str, list[int]]) -> list[str | None]:
    """Attention module of every node (by position). Nodes the exporter left without a scope
    (the dynamo optimizer drops it on some rewritten nodes) take the module all their
    consumers share."""
    owner = [_attention_module(module_path(n)) for n in nodes]
    unscoped = [k for k, n in enumerate(nodes) if not module_path(n)]
    for _ in range(4):
        changed = False
        for k in unscoped:
            if owner[k] is not None:
                continue
            mods = {owner[c] for o in nodes[k].output for c in users.get(o, [])}
            if len(mods) == 1 and None not in mods:
                owner[k] = mods.pop()
                changed = True
        if not changed:
            break
    return owner


def _float_values(model: onnx.ModelProto) -> set[str]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    return {v.name for v in list(g.value_info) + list(g.input) + list(g.output)
            if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}


def _attention_module(path: str) -> str | None:
    """'spatial_blocks.3.attn.qkv' -> 'spatial_blocks.3.attn' (also cross_attn and mlp), else None."""
    parts = path.split(".")
    for i in range(len(parts) - 2):
        if parts[i] in ("spatial_blocks", "temporal_blocks") and parts[i + 2] in ("attn", "cross_attn", "mlp"):
            return ".".join(parts[: i + 3])
    return None


def _mark_rope(model: onnx.ModelProto, temporal_attn: list[str]) -> None:
    """Give the temporal blocks' RoPE tables one name each (the tracer may copy them per use)."""
    if not temporal_attn:
        return
    g = model.graph
    _constants_to_initializers(g)
    inits = {i.name: i for i in g.initializer}
    used = set()
    for n in g.node:
        if any(in_module(n, m) for m in temporal_attn):
            used.update(i for i in n.input if i in inits and len(inits[i].dims) == 2
                        and inits[i].data_location != onnx.TensorProto.EXTERNAL)  # tables are small, inline
    groups: dict[str, list[str]] = {"cos": [], "sin": []}
    arrays = {name: onnx.numpy_helper.to_array(inits[name]) for name in used}
    for name, arr in arrays.items():
        if np.allclose(arr[0], 1.0):
            groups["cos"].append(name)
        elif np.allclose(arr[0], 0.0):
            groups["sin"].append(name)
    if not used:
        return  # dynamic frame count: the tables are computed in the graph (TDTM needs pinning first)
    for kind, canonical in (("cos", ROPE_COS), ("sin", ROPE_SIN)):
        names = sorted(groups[kind])
        if not names or any(not np.array_equal(arrays[n], arrays[names[0]]) for n in names):
            raise SorakitError(f"cannot find one RoPE {kind} table in {temporal_attn} (found {sorted(used)})")
        for n in g.node:
            n.input[:] = [canonical if i in names else i for i in n.input]
        keep = [i for i in g.initializer if i.name not in names[1:]]
        del g.initializer[:]
        g.initializer.extend(keep)
        rename_value(g, names[0], canonical)


def _constants_to_initializers(g: onnx.GraphProto) -> None:
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------
def merged_positions(T: int, mode: str = "midpoint") -> np.ndarray:
    """RoPE positions of the merged frames (the last, odd frame keeps its own position)."""
    if mode not in POSITIONS:
        raise SorakitError(f"unknown TDTM position mode {mode!r}; one of {POSITIONS}")
    pairs = T // 2
    if mode == "compressed":
        return np.arange(pairs + T % 2, dtype=np.float32)
    pos = [2 * j + 0.5 for j in range(pairs)] + ([T - 1] if T % 2 else [])
    return np.asarray(pos, dtype=np.float32)


# Mirror of sorakit.export.stdit3.rope_tables: keep in sync
# (tests/test_graph_passes.py::test_tdtm_mirrors_the_torch_reference and test_tdtm_matches_torch_reference).
def rope_tables_np(freqs: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed-sin tables [T, D] of interleaved-pair RoPE (as ``export.stdit3.rope_tables``)."""
    angles = (positions.astype(np.float32)[:, None] * freqs.astype(np.float32)[None, :]).astype(np.float32)
    angles = np.repeat(angles, 2, axis=1)
    sin = np.sin(angles).astype(np.float32)
    sin[:, 0::2] *= -1
    return np.cos(angles).astype(np.float32), sin


def boundaries(model: onnx.ModelProto) -> list[str]:
    names = {o for n in model.graph.node for o in n.output}
    return sorted(m[: -len(TDTM_IN)] for m in names | {i.name for i in model.graph.input} if m.endswith(TDTM_IN))


@dataclass
class TDTMResult:
    model: onnx.ModelProto
    frames: int
    merged_frames: int
    modules: list[str]


def inject(model: onnx.ModelProto, positions: str = "midpoint", scope: str = "attention") -> TDTMResult:
    """Return a copy of a marked block graph with merge/unmerge around every attention.

    ``scope="attention"`` merges where the paper does (self- and cross-attention);
    ``scope="block"`` also around each MLP, so nearly all of a merged step's work is halved.
    """
    if scope not in SCOPES:
        raise SorakitError(f"unknown TDTM scope {scope!r}; one of {SCOPES}")
    marked = boundaries(model)
    mods = [m for m in marked if not m.endswith(".mlp")]
    if not mods:
        raise SorakitError("not a transformer block graph: it has no TDTM boundaries (attention inputs/outputs)")
    if scope == "block":
        mlps = [m for m in marked if m.endswith(".mlp")]
        if len(mlps) != len({m.rsplit(".", 1)[0] for m in mods}):
            raise SorakitError(
                "TDTM scope 'block' needs the MLP boundaries, which this graph lacks (exported by an older "
                "sorakit, or the MLP could not be marked); re-export the bundle or use scope 'attention'"
            )
        mods = sorted(mods + mlps)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    shapes = static_shapes(m)
    shape = shapes.get(mods[0] + TDTM_IN)
    if not shape or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise SorakitError(
            "TDTM needs static shapes (the frame count is part of the rewrite); pin the bundle first: "
            "sorakit optimize BUNDLE --passes pin --resolution HxW --frames N --out BUNDLE2"
        )
    _, T, S, C = shape
    if any(n.name.endswith(".tdtm.merge_add") for n in g.node):
        raise SorakitError("graph already carries TDTM merge/unmerge nodes")
    Tm = T // 2 + T % 2
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    tag = "tdtm"
    new_inits += [
        const(f"{tag}.axis1", np.array([1], np.int64)),
        const(f"{tag}.step2", np.array([2], np.int64)),
        const(f"{tag}.half", np.array(0.5, np.float32)),
        const(f"{tag}.starts_even", np.array([0], np.int64)),
        const(f"{tag}.starts_odd", np.array([1], np.int64)),
        const(f"{tag}.end_pairs", np.array([T - T % 2], np.int64)),
        const(f"{tag}.last_start", np.array([T - 1], np.int64)),
        const(f"{tag}.last_end", np.array([T], np.int64)),
        const(f"{tag}.pairs", np.array([T // 2], np.int64)),
        const(f"{tag}.pairs_end", np.array([T // 2 + 1], np.int64)),
        const(f"{tag}.zero", np.array([0], np.int64)),
        const(f"{tag}.axis2", np.array([2], np.int64)),
        const(f"{tag}.unmerged_shape", np.array([0, -1, S, C], np.int64)),
    ]
    cons = consumers(g)
    for mod in mods:
        x, y = mod + TDTM_IN, mod + TDTM_OUT
        merged, unmerged = mod + ".tdtm_merged", mod + ".tdtm_unmerged"
        new_nodes += _merge_nodes(x, merged, T, tag, mod)
        new_nodes += _unmerge_nodes(y, unmerged, T, tag, mod)
        # inside the attention: consumers of x that lead to y read the merged frames
        region = _reaches(g, cons, x, y)
        for n in region:
            n.input[:] = [merged if i == x else i for i in n.input]
        # outside: everything that read the attention's output reads the unmerged one
        for n in cons.get(y, []):
            n.input[:] = [unmerged if i == y else i for i in n.input]
        for o in g.output:
            if o.name == y:
                raise SorakitError(f"{y} is a graph output; cannot unmerge it")
    if any(mod.startswith("temporal_blocks.") and mod.endswith(".attn") for mod in mods):
        _replace_rope(g, T, positions, new_inits)
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    _drop_unused_initializers(g)
    clear_shapes(g)
    toposort(g)
    return TDTMResult(m, T, Tm, mods)


def _drop_unused_initializers(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _reaches(g: onnx.GraphProto, cons, start: str, goal: str) -> list[onnx.NodeProto]:
    """Consumers of ``start`` from which ``goal`` can be reached."""
    result = []
    for c in cons.get(start, []):
        seen, stack = set(), list(c.output)
        hit = goal in stack
        while stack and not hit:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            for n in cons.get(v, []):
                if goal in n.output:
                    hit = True
                    break
                stack.extend(n.output)
        if hit:
            result.append(c)
    return result


# Mirror of sorakit.export.tdtm.TokenMerge.merge: keep in sync
# (tests/test_graph_passes.py::test_tdtm_mirrors_the_torch_reference and test_tdtm_matches_torch_reference).
def _merge_nodes(x: str, out: str, T: int, tag: str, mod: str) -> list[onnx.NodeProto]:
    p = mod + ".tdtm"
    nodes = [
        helper.make_node("Slice", [x, f"{tag}.starts_even", f"{tag}.end_pairs", f"{tag}.axis1", f"{tag}.step2"],
                         [p + ".even"], name=p + ".merge_even"),
        helper.make_node("Slice", [x, f"{tag}.starts_odd", f"{tag}.end_pairs", f"{tag}.axis1", f"{tag}.step2"],
                         [p + ".odd"], name=p + ".merge_odd"),
        helper.make_node("Add", [p + ".even", p + ".odd"], [p + ".sum"], name=p + ".merge_add"),
    ]
    if T % 2 == 0:
        nodes.append(helper.make_node("Mul", [p + ".sum", f"{tag}.half"], [out], name=p + ".merge_mean"))
        return nodes
    nodes += [
        helper.make_node("Mul", [p + ".sum", f"{tag}.half"], [p + ".mean"], name=p + ".merge_mean"),
        helper.make_node("Slice", [x, f"{tag}.last_start", f"{tag}.last_end", f"{tag}.axis1"], [p + ".last"],
                         name=p + ".merge_last"),
        helper.make_node("Concat", [p + ".mean", p + ".last"], [out], axis=1, name=p + ".merge_concat"),
    ]
    return nodes


# Mirror of sorakit.export.tdtm.TokenMerge.unmerge_to: keep in sync
# (tests/test_graph_passes.py::test_tdtm_mirrors_the_torch_reference and test_tdtm_matches_torch_reference).
def _unmerge_nodes(y: str, out: str, T: int, tag: str, mod: str) -> list[onnx.NodeProto]:
    p = mod + ".tdtm"
    pairs_in = y
    nodes = []
    if T % 2:
        pairs_in = p + ".pairs_out"
        nodes += [
            helper.make_node("Slice", [y, f"{tag}.zero", f"{tag}.pairs", f"{tag}.axis1"], [pairs_in],
                             name=p + ".unmerge_pairs"),
            helper.make_node("Slice", [y, f"{tag}.pairs", f"{tag}.pairs_end", f"{tag}.axis1"], [p + ".last_out"],
                             name=p + ".unmerge_last"),
        ]
    dup = p + ".dup" if T % 2 else out
    nodes += [
        helper.make_node("Unsqueeze", [pairs_in, f"{tag}.axis2"], [p + ".u"], name=p + ".unmerge_unsqueeze"),
        helper.make_node("Concat", [p + ".u", p + ".u"], [p + ".uu"], axis=2, name=p + ".unmerge_repeat"),
        helper.make_node("Reshape", [p + ".uu", f"{tag}.unmerged_shape"], [dup], name=p + ".unmerge_reshape"),
    ]
    if T % 2:
        nodes.append(helper.make_node("Concat", [dup, p + ".last_out"], [out], axis=1, name=p + ".unmerge_concat"))
    return nodes


def _replace_rope(g: onnx.GraphProto, T: int, positions: str, new_inits: list) -> None:
    inits = {i.name: i for i in g.initializer}
    if ROPE_COS not in inits or ROPE_SIN not in inits:
        raise SorakitError("temporal block graph lacks the named RoPE tables (rope_cos, rope_sin); re-export it")
    if any(inits[n].data_location == onnx.TensorProto.EXTERNAL for n in (ROPE_COS, ROPE_SIN)):
        raise SorakitError("the RoPE tables are stored as external data; re-export the bundle with this sorakit")
    cos = onnx.numpy_helper.to_array(inits[ROPE_COS]).astype(np.float64)
    sin = onnx.numpy_helper.to_array(inits[ROPE_SIN]).astype(np.float64)
    if T < 2:
        return
    # row 1 holds angle = 1 * freq for every pair: recover the frequencies from the table itself
    freqs = np.arctan2(sin[1, 1::2], cos[1, 0::2]).astype(np.float32)
    new_cos, new_sin = rope_tables_np(freqs, merged_positions(T, positions))
    new_inits += [const(ROPE_COS + "_tdtm", new_cos), const(ROPE_SIN + "_tdtm", new_sin)]
    for n in g.node:
        n.input[:] = [ROPE_COS + "_tdtm" if i == ROPE_COS else ROPE_SIN + "_tdtm" if i == ROPE_SIN else i
                      for i in n.input]


def saved_fraction(T: int) -> float:
    """Attention FLOPs kept under TDTM, as a fraction (for reports)."""
    return (T // 2 + T % 2) / T if T else 1.0


__all__ = ["mark_boundaries", "inject", "merged_positions", "boundaries", "POSITIONS", "SCOPES", "saved_fraction"]
